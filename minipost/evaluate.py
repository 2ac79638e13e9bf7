"""Scoring a policy on a task split: batched generation through the engine, then the task's reward.

Under torchrun (minipost/distributed.py) the prompts are shared out over the ranks and the completions
gathered back in prompt order, so every rank gets the same result: call these on every rank.

    torchrun --standalone --nproc_per_node 2 -m minipost.evaluate --init out/sft-arith --task arith
"""
import argparse
import json
import time
from pathlib import Path

from . import distributed
from .checkpoint import load_checkpoint
from .cli import UserError, autocast, pick_device, require_positive, run_main, task_from_flag, writable_file
from .retrieval import add_retrieval_flags, check_retrieval_flags, retrieval_prompts
from .rewards import call_reward, make_reward, same_tokenizer
from .rollout import completion_text, prompt_ids, sample_candidates, sample_kl


def sample_completions(model, tokenizer, rows, max_new_tokens=64, temperature=0.0, num_samples=1,
                       batch_size=64, seed=0) -> list[str]:
    """Decoded completions for every prompt row (rollout.sample_candidates), prompt-major. Under torchrun each
    rank samples its share of the rows, with the seeds one process would use for them (rows lo.. start at
    seed + lo * num_samples), and gets every completion back."""
    lo, hi = distributed.share(len(rows))
    ids = []
    if hi > lo:
        ids, _ = sample_candidates(model, tokenizer, prompt_ids(tokenizer, rows[lo:hi]), num_samples, max_new_tokens,
                                   temperature, batch_size=batch_size * num_samples, seed=seed + lo * num_samples)
    return distributed.gather([completion_text(tokenizer, c) for c in ids])


def evaluate_policy(model, tokenizer, task, rows, max_new_tokens=64, temperature=0.0, batch_size=64, seed=0):
    """Mean task reward (accuracy for arith's verifier) and format rate of one completion per prompt
    (+ "rewards": the per-prompt values, for paired comparisons between policies on the same prompts)."""
    texts = sample_completions(model, tokenizer, rows, max_new_tokens, temperature, 1, batch_size, seed)
    rewards = call_reward(task.reward, rows, texts)
    formats = task.format_ok(texts)
    return {"reward": sum(rewards) / len(rewards), "format": sum(formats) / len(formats), "n": len(rows),
            "example": texts[0], "rewards": [float(v) for v in rewards]}


def validation_prompts(task, start: int, n: int) -> list[dict]:
    """The task's train prompts start .. start + n - 1 (seed 0). SFT trains on the first --n-train train demos
    (seed 0), which are the same problems in the same order (a split is drawn as one stream, and a longer
    request extends a shorter one), so with start = n_train none of these was trained on."""
    return task.prompts("train", start + n, seed=0)[start:]


# ------------------------------------------------------------------------------------------ command line

def samples_used(run_dir, meta) -> int | None:
    """Training samples a run consumed: demonstrations (SFT, DFT) or preference pairs (DPO) seen, batch size x
    steps, or the sequences an RL run trained on, as logged per step by train_rlhf.py ("samples_used")."""
    if meta.get("kind") in ("sft", "dft", "dpo", "rm"):  # typed on load (minipost/meta.py), perhaps absent
        batch_size, step = meta.get("args", {}).get("batch_size"), meta.get("step")
        turns = meta.get("args", {}).get("turns") or 1  # SFT on chats of 1..turns demos: (turns + 1) / 2 each
        return round(batch_size * step * (turns + 1) / 2) if batch_size is not None and step is not None else None
    path = Path(run_dir) / "metrics.jsonl"
    logged = [json.loads(line).get("samples_used") for line in path.read_text().splitlines()] if path.is_file() else []
    logged = [v for v in logged if v is not None]
    return sum(logged) if logged else None


def parse_args(argv):
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--init", required=True, help="policy checkpoint directory")
    p.add_argument("--task", required=True, help="built-in task whose test splits are scored")
    p.add_argument("--allow-other-task", action="store_true", help="accept checkpoints trained on another task "
                   "than --task (refused by default)")
    p.add_argument("--reference", default=None, help="checkpoint for the sequence KL (default: --init itself)")
    p.add_argument("--n-eval", type=int, default=200, help="prompts per split (the same prompts for every policy)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="response budget")
    p.add_argument("--k", type=int, default=4, help="T = 1 samples per test prompt for the KL and the sampled "
                   "reward")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (sampled tasks; greedy ignores it)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--reward-model", default=None, metavar="CKPT", help="also score the k T = 1 test samples "
                   "with this reward model (test_proxy_reward, beside their ground truth test_sample_reward): "
                   "proxy and true reward against KL show reward over-optimisation")
    p.add_argument("--validation-from", type=int, default=None, metavar="N", help="also score the task's train "
                   "prompts N .. N + n_eval - 1 as split 'val' (val_reward, ...): with N = the SFT run's --n-train, "
                   "problems of the training distribution that SFT never saw")
    p.add_argument("--out", default=None, help="write the JSON row here (atomically) instead of stdout")
    add_retrieval_flags(p)
    args = p.parse_args(argv)
    require_positive(args, "n_eval", "k", "max_new_tokens")
    if args.validation_from is not None and args.validation_from < 0:
        raise UserError("--validation-from must be >= 0")
    check_retrieval_flags(args)
    return args


def main(argv=None):
    """python -m minipost.evaluate --init RUN --task arith [--reference SFT_RUN]: one uniform evaluation of a
    policy (what pipeline.py runs for every method) -> JSON on stdout or --out FILE."""
    args = parse_args(argv)
    task, device = task_from_flag(args.task), distributed.init(pick_device(args.device))
    t0 = time.time()
    task_check = None if args.allow_other_task else task.name
    ck = load_checkpoint(args.init, device, flag="--init", task=task_check)
    ref = load_checkpoint(args.reference, device, flag="--reference", task=task_check) if args.reference else ck
    for flag, path, c in (("--init", args.init, ck), ("--reference", args.reference, ref)):
        if c.is_reward_model:
            raise UserError(f"{flag} {path} is a reward model, not a policy")
    if not same_tokenizer(ck.tokenizer, ref.tokenizer):  # the KL compares the two models' ids token by token
        raise UserError(f"--reference {args.reference}: its tokenizer differs from --init {args.init}'s")
    # loaded before any sampling, so that a bad path fails at once (UserError naming --reward-model)
    proxy = (make_reward(task, ck.tokenizer, device, reward_model=args.reward_model,
                         other_task_ok=args.allow_other_task) if args.reward_model else None)
    if args.out is not None:
        writable_file(args.out)  # before the evaluation, not after it
    model = ck.model.eval()
    row = {"init": str(args.init), "kind": ck.meta.get("kind"), "step": ck.meta.get("step"),
           "train_time_s": ck.meta.get("elapsed_s"), "samples_used": samples_used(args.init, ck.meta),
           "n_eval": args.n_eval, "k": args.k}
    if proxy is not None:
        row["reward_model"] = str(args.reward_model)
    trained = ck.meta.get("metrics") or {}  # what its training cost, as logged at its last step
    row.update({key: trained.get(key) for key in ("trainable_params", "tensor_memory_mb", "peak_memory_mb")})
    splits = {s: task.prompts(s, args.n_eval, seed=1) for s in task.splits if s != "train"}
    if args.validation_from is not None:
        splits["val"] = validation_prompts(task, args.validation_from, args.n_eval)
        row["validation_from"] = args.validation_from
    if args.retrieve:  # every split, so the KL and sampled reward below see the same prompts as the greedy score
        splits, short = retrieval_prompts(args, task, ck.tokenizer, model.config.block_size - model.n_prefix, splits)
        row.update({"retrieve": args.retrieve, "retrieve_from": args.retrieve_from, "retrieve_short": short})
    with autocast(device):  # the scripts' policy: bf16 on CUDA, off on CPU
        for split, prompts in splits.items():
            r = evaluate_policy(model, ck.tokenizer, task, prompts, args.max_new_tokens, task.eval_temperature,
                                seed=args.seed)
            row[f"{split}_reward"], row[f"{split}_format"] = r["reward"], r["format"]
            row[f"{split}_rewards"] = r["rewards"]  # per prompt, same prompts for every policy
            if split == "test":  # what the model was shown (a retrieval prompt's examples too) and what it said
                row["test_example"] = {"prompt": ck.tokenizer.decode(prompt_ids(ck.tokenizer, prompts[:1])[0]),
                                       "completion": r["example"]}
        # KL to the reference and the reward of the policy's own T = 1 samples (k per test prompt): for a
        # verifier task evaluated greedily, this shows a sharpened sampling distribution the greedy answer hides
        kl = sample_kl(model, ref.model.eval(), ck.tokenizer, splits["test"], args.max_new_tokens, 1.0,
                       seed=7 + args.seed, reward_fn=task.reward, k=args.k, proxy=proxy)
    row["kl_to_ref"], row["entropy"], row["test_sample_reward"] = kl["kl"], kl["entropy"], kl["reward"]
    if proxy is not None:
        row["test_proxy_reward"] = kl["proxy"]  # the reward model's score of those same samples
    k = args.k
    row["test_sample_rewards"] = [sum(kl["rewards"][i:i + k]) / k for i in range(0, len(kl["rewards"]), k)]
    row["eval_time_s"] = time.time() - t0
    text = json.dumps(row)
    if not distributed.is_main():
        return
    if args.out is None:
        print(text)
    else:
        out = Path(args.out)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(text + "\n")
        tmp.replace(out)  # atomic: a killed evaluation leaves no half-written row


if __name__ == "__main__":
    run_main(main)
