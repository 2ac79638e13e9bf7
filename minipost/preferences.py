"""Preference pairs for the reward model and DPO: built from the SFT policy's own samples, or read from JSONL.

Built-in pairs follow the DPO paper's sentiment experiment: sample K >= 2 responses per task prompt from
the SFT model, score them with the task's ground-truth reward, and pair the best with the worst when the
best is strictly better (for arith's 0/1 verifier: one correct and one wrong sample). Only responses that
ended with EOS are used, so a reward model always reads a real EOS token, and only non-empty ones, so the
written pairs file reads back with --data.

Under torchrun (minipost/distributed.py) the builders below share the prompts out over the ranks, each rank
sampling its share with the seeds one process would use, and every rank gets every pair back in prompt order.
"""
import json
from pathlib import Path

import torch

from . import distributed
from .cli import UserError
from .data import encode_pairs, read_jsonl
from .engine import generate
from .rollout import pack, prompt_ids, sample_rollout, sequence_logprobs


def build_pairs(model, tokenizer, reward, rows, k, max_new_tokens, temperature=1.0, seed=0, batch_prompts=64):
    """Sample k responses per prompt row, rank them by `reward` (a rewards.Reward) and keep (best, worst).

    Returns (pairs, records): pairs [(prompt_ids, chosen_ids, rejected_ids)], responses ending in EOS;
    records [{"prompt", "chosen", "rejected", "chosen_reward", "rejected_reward"}] the same pairs as text.
    """
    if k < 2:
        raise UserError(f"--k {k}: preference pairs need at least 2 samples per prompt")
    lo, hi = distributed.share(len(rows))
    rows, seed = rows[lo:hi], seed + lo * k  # this rank's prompts; their samples as one process draws them
    pairs, records = [], []
    for start in range(0, len(rows), batch_prompts):
        chunk = rows[start:start + batch_prompts]
        # the engine seeds row r with seed + r: offsetting by the global row index makes the samples
        # independent of batch_prompts
        r = sample_rollout(model, tokenizer, chunk, k, max_new_tokens, temperature, seed + start * k)
        scores = r.score(reward).view(len(chunk), k).tolist()  # (G, K)
        ids = r.seqs.ids.tolist()
        prompts = prompt_ids(tokenizer, chunk)
        for g, row in enumerate(chunk):
            # finished with EOS and not blank (a blank answer could not be read back from the pairs file)
            done = [i for i in range(k) if bool(r.finished[g * k + i]) and r.texts[g * k + i].strip()]
            if len(done) < 2:
                continue
            best = max(done, key=lambda i: scores[g][i])  # first of equals: deterministic
            worst = min(done, key=lambda i: scores[g][i])
            if scores[g][best] <= scores[g][worst]:
                continue  # a tie carries no preference
            P = len(prompts[g])
            resp = []
            for i in (best, worst):
                n = int(r.seqs.mask[g * k + i].sum())
                resp.append(ids[g * k + i][P:P + n])
            pairs.append((prompts[g], resp[0], resp[1]))
            records.append({"prompt": row["prompt"], "chosen": r.texts[g * k + best],
                            "rejected": r.texts[g * k + worst], "chosen_reward": scores[g][best],
                            "rejected_reward": scores[g][worst]})
    return distributed.gather(pairs), distributed.gather(records)


def demo_pairs(model, tokenizer, reward, rows, demos, k, max_new_tokens, block_size, temperature=1.0, seed=0,
               batch_prompts=64):
    """Pairs whose chosen side is the prompt's demonstration (demos[i]: its text) and whose rejected side is the
    policy's worst of k samples, kept where the reward ranks the demonstration above that sample (for arith's
    verifier: wherever the sample is wrong). A reward model trained on them learns from demonstrations, as SFT
    does (the setting of Somerstep et al.'s best-of-N with a learned reward). -> (pairs, records) as in
    build_pairs; records also carry their rewards."""
    lo, hi = distributed.share(len(rows))
    rows, demos, seed = rows[lo:hi], demos[lo:hi], seed + lo * k
    records = []
    for start in range(0, len(rows), batch_prompts):
        chunk, refs = rows[start:start + batch_prompts], demos[start:start + batch_prompts]
        r = sample_rollout(model, tokenizer, chunk, k, max_new_tokens, temperature, seed + start * k)
        scores = r.score(reward).view(len(chunk), k).tolist()  # (G, K)
        ref_ids = [tokenizer.encode(t) + [tokenizer.eos_id] for t in refs]
        ref_scores = reward(chunk, prompt_ids(tokenizer, chunk), ref_ids, refs).tolist()
        for g, row in enumerate(chunk):
            # any non-blank sample may be rejected: one cut off at the length budget is a worse answer too
            done = [i for i in range(k) if r.texts[g * k + i].strip()]
            if not done:
                continue
            worst = min(done, key=lambda i: scores[g][i])
            if ref_scores[g] > scores[g][worst]:
                records.append({"prompt": row["prompt"], "chosen": refs[g], "rejected": r.texts[g * k + worst],
                                "chosen_reward": ref_scores[g], "rejected_reward": scores[g][worst]})
    records = distributed.gather(records)
    pairs, _ = encode_pairs(tokenizer, records, block_size)
    return pairs, records


def load_pairs(path, tokenizer, block_size, flag="--data"):
    """--data JSONL with prompt/chosen/rejected (strings or message lists) -> (pairs as in build_pairs,
    {reason: pairs dropped}); a line says how many were dropped and why."""
    rows, _, _ = read_jsonl(path, expect=("preference",))
    pairs, dropped = encode_pairs(tokenizer, rows, block_size)
    why = ", ".join(f"{n} {reason}" for reason, n in dropped.items() if n) or "none"
    print(f"{flag} {path}: {len(pairs)} of {len(rows)} pairs kept; dropped: {why}")
    if not pairs:
        raise UserError(f"{flag} {path}: none of its {len(rows)} pairs is usable ({why}; context {block_size} "
                        "tokens)")
    return pairs, dropped


def split_pairs(pairs, val_frac, seed=0):
    """Deterministic held-out split -> (train, val); at least one pair in each."""
    if len(pairs) < 2:
        raise UserError(f"need at least 2 preference pairs (one to train, one held out), got {len(pairs)}")
    n_val = min(len(pairs) - 1, max(1, int(len(pairs) * val_frac)))
    perm = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed)).tolist()
    return [pairs[i] for i in perm[n_val:]], [pairs[i] for i in perm[:n_val]]


def write_pairs(path, records):
    """The built pairs as JSONL (prompt/chosen/rejected + their rewards), readable back with --data."""
    with open(Path(path), "w") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")


def pair_sequences(pairs, pad_id, device="cpu"):
    """P pairs -> Sequences of 2P rows: the P chosen responses, then the P rejected ones (one forward)."""
    prompts = [p for p, _, _ in pairs] * 2
    responses = [c for _, c, _ in pairs] + [r for _, _, r in pairs]
    return pack(prompts, responses, pad_id, device)


def pair_totals(logp, mask, average=False):
    """Token log-probs (2P, T) of pair_sequences' rows (off-mask entries 0) -> (chosen (P,), rejected (P,)):
    each response's summed log-prob, or for IPO its mean over the response's tokens."""
    total = logp.sum(1)  # (2P,)
    if average:
        total = total / mask.sum(1)
    return total.view(2, -1)


def pair_logprob_sums(model, pairs, pad_id, device, average=False, chunk=64):
    """Summed (or, for IPO, length-averaged) response log-probs -> (chosen (P,), rejected (P,)). Under torchrun
    each rank scores its share of the pairs and every rank gets all of them back."""
    lo, hi = distributed.share(len(pairs))
    out = [torch.zeros(2, 0, device=device)]  # (2, 0): an empty share's contribution
    for s in range(lo, hi, chunk):
        seqs = pair_sequences(pairs[s:min(s + chunk, hi)], pad_id, device)
        out.append(pair_totals(sequence_logprobs(model, seqs), seqs.mask, average))
    both = torch.cat(out, dim=1)  # (2, P)
    return distributed.cat(both[0]), distributed.cat(both[1])


def pair_accuracy(r_chosen, r_rejected):
    """Fraction of pairs ranked right, a tie counting half (at step 0 DPO's implicit rewards all tie at 0)."""
    return ((r_chosen > r_rejected).float() + 0.5 * (r_chosen == r_rejected).float()).mean().item()


@torch.no_grad()
def reference_samples(model, tokenizer, prompts, max_new_tokens, seed=0, batch_prompts=64):
    """One finished sample of `model` per prompt (id lists) -> Sequences; the reward model is centred on these."""
    model.eval()
    lo, hi = distributed.share(len(prompts))
    prompts, seed = prompts[lo:hi], seed + lo
    kept_p, kept_r = [], []
    for start in range(0, len(prompts), batch_prompts):
        chunk = prompts[start:start + batch_prompts]
        g = generate(model, chunk, max_new_tokens, tokenizer.eos_id, tokenizer.pad_id, temperature=1.0,
                     seed=seed + start)
        for p, resp, done in zip(chunk, g.completions(), g.finished.tolist()):
            if done:
                kept_p.append(p)
                kept_r.append(resp)
    kept_p, kept_r = distributed.gather(kept_p), distributed.gather(kept_r)
    if not kept_p:
        raise UserError("the SFT model finished none of its reference samples with EOS (is --init an SFT model?)")
    return pack(kept_p, kept_r, tokenizer.pad_id, next(model.parameters()).device)
