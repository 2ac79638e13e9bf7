"""Sampling and teacher-forced scoring of prompt + response rows: what RL rollouts, preference pairs,
best-of-N and evaluation share. Rewards live in minipost/rewards.py.

Layout of a scored batch (Sequences): each row is prompt + response, right-padded with <|pad|>. The
model reads inputs = ids[:, :-1] and predicts targets = ids[:, 1:], so position j of every (N, T-1) tensor
(log-probs, values, the mask) is about the token ids[:, j+1]. mask is 1 exactly on response targets (the
final EOS included) and 0 on prompt and padding; targets outside the mask are passed to the kernel as -1.
"""
from dataclasses import dataclass

import torch
from tqdm import tqdm

from . import distributed
from .cli import UserError
from .engine import generate
from .rewards import call_reward


def step_seed(seed: int, step: int) -> int:
    """Sampling seed of a training step. The engine seeds row r with this + r, so rows of different steps
    never share a generator (up to 100,000 rows a step) and a resumed run draws the same samples."""
    return (seed * 1_000_003 + step) * 100_000


def prompt_ids(tokenizer, rows) -> list[list[int]]:
    """Rows with a `prompt` column (string or messages) -> rendered prompts ending in <|assistant|>."""
    return [tokenizer.render_prompt([{"role": "user", "content": r["prompt"]}] if isinstance(r["prompt"], str)
                                    else r["prompt"]) for r in rows]


def completion_text(tokenizer, ids: list[int]) -> str:
    """Decode a completion, without its closing <|end|>."""
    if ids and ids[-1] == tokenizer.eos_id:
        ids = ids[:-1]
    return tokenizer.decode(ids)


# ------------------------------------------------------------------------------------------- sequences

@dataclass
class Sequences:
    """prompt + response rows, right-padded. ids (N, T) long; mask (N, T-1) float, 1 on response targets."""
    ids: torch.Tensor
    mask: torch.Tensor

    @property
    def inputs(self):
        return self.ids[:, :-1]  # (N, T-1)

    @property
    def targets(self):
        return self.ids[:, 1:].masked_fill(self.mask == 0, -1)  # (N, T-1); -1: the kernel skips it

    @property
    def last(self):
        """(N,) target index of each row's last response token (its EOS when it finished). The token itself
        sits at ids position last + 1: the EOS whose hidden state a reward model reads."""
        T = self.mask.shape[1]
        return T - 1 - self.mask.flip(1).argmax(dim=1)

    def __getitem__(self, idx):
        return Sequences(self.ids[idx], self.mask[idx])

    def __len__(self):
        return self.ids.shape[0]


def pack(prompts: list[list[int]], responses: list[list[int]], pad_id: int, device="cpu") -> Sequences:
    """Prompt and response id lists -> Sequences. Every response needs at least one token."""
    T = max(len(p) + len(r) for p, r in zip(prompts, responses))
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), T - 1)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        assert r, "empty response"
        ids[i, :len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
        mask[i, len(p) - 1:len(p) + len(r) - 1] = 1  # targets len(p)-1 .. are the response tokens
    return Sequences(ids.to(device), mask.to(device))


def sequence_logprobs(model, seqs: Sequences, temperature=1.0, entropy=False, chunk=128):
    """Teacher-forced log-probs of the response tokens under softmax(logits / temperature):
    logp (N, T-1), 0 off the mask [, entropy (N, T-1) of the same distribution, 0 off the mask].

    Rows go through the model `chunk` at a time sorted by length, each chunk cut to its longest row: one
    long sample no longer makes every row pay for its padding (nor does a big batch hold all its logits).
    """
    N, T1 = seqs.mask.shape
    need = seqs.last + 1  # (N,) target positions a row needs, through its last response token
    order = need.argsort(descending=True)
    logp = ent = None
    for start in range(0, N, chunk):
        rows = order[start:start + chunk]
        L = int(need[rows].max())
        part = Sequences(seqs.ids[rows, :L + 1], seqs.mask[rows, :L])
        out = model.teacher_forced_logprobs(part.inputs, part.targets, temperature, return_entropy=entropy)
        lp, en = out if entropy else (out, None)
        if logp is None:  # the kernel's dtype (float32, or float64 for a float64 model)
            logp = lp.new_zeros(N, T1)
            ent = lp.new_zeros(N, T1) if entropy else None
        logp[rows, :L] = lp
        if entropy:
            ent[rows, :L] = en
    return (logp, ent) if entropy else logp


def token_values(critic, seqs: Sequences):
    """Value head -> (N, T-1): V at target position j is read from the hidden state before token j+1, the
    state in which the policy chose it."""
    return critic.scores(critic(seqs.inputs)) * seqs.mask


# ------------------------------------------------------------------------------------------- rollouts

@dataclass
class Rollout:
    """K samples for each of G prompts, prompt-major: row i belongs to prompt i // K."""
    seqs: Sequences
    rows: list[dict]  # the prompt row of every sample (its extra columns feed the reward function)
    prompts: list[list[int]]  # the rendered prompt of every sample
    completions: list[list[int]]  # the sampled response ids, EOS included when it finished
    texts: list[str]  # decoded responses without their EOS
    finished: torch.Tensor  # (N,) bool: the response ended with EOS within the budget
    # the sampler's own log-prob of every response token and entropy of its distribution, both at the sampling
    # temperature, in the layout of seqs.mask: (N, T-1) float32, 0 off the mask. They are the sampling policy's
    # "old" log-probs, with no second forward. Not bit-equal to a teacher-forced pass (sequence_logprobs): the
    # sampler reads a KV-cache decode step's logits (model.logits), the pass a full-sequence forward through
    # kernels.token_logprobs. Float32 on CPU they differ by float rounding: at most 3.1e-6, 2.2e-7 on average
    # (minipost/kernels/BENCHMARKS.md; tests/test_rlhf.py holds them within 1e-5). Under bf16 autocast on CUDA
    # by more (other attention and head kernels): python -m minipost.bench_rollout --gpu measures it.
    logprobs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None

    def score(self, reward, step=None) -> torch.Tensor:
        """(N,) float32 reward of every sample, on the rollout's device (reward: a rewards.Reward); step: the
        training step, named in the error."""
        values = reward(self.rows, self.prompts, self.completions, self.texts).to(self.seqs.ids.device, torch.float32)
        if not torch.isfinite(values).all():  # finite as float64 (checked_rewards) but not once in float32
            at = f"step {step}: " if step is not None else ""
            raise UserError(f"{at}{reward.name} gave a reward beyond float32's range (|r| > 3.4e38); rescale it")
        return values


@torch.no_grad()
def sample_rollout(model, tokenizer, rows, k, max_new_tokens, temperature, seed) -> Rollout:
    """Sample k responses per prompt row through the engine (one prefill per prompt)."""
    device = next(model.parameters()).device
    prompts = prompt_ids(tokenizer, rows)
    was_training = model.training
    model.eval()
    g = generate(model, prompts, max_new_tokens, tokenizer.eos_id, tokenizer.pad_id, temperature=temperature,
                 num_samples=k, seed=seed)
    model.train(was_training)
    responses = g.completions()
    expanded = [prompts[i // k] for i in range(len(responses))]
    seqs = pack(expanded, responses, tokenizer.pad_id, device)
    return Rollout(seqs, [rows[i // k] for i in range(len(responses))], expanded, responses,
                   [completion_text(tokenizer, r) for r in responses], g.finished,
                   response_layout(g.logprobs, expanded, seqs), response_layout(g.entropy, expanded, seqs))


def response_layout(values, prompts, seqs: Sequences):
    """Per response token values (N, L), row i's first len(response i) entries -> (N, T-1) in the layout of
    seqs.mask: response token j of row i sits at target position len(prompt i) - 1 + j."""
    out = torch.zeros_like(seqs.mask)
    lengths = seqs.mask.sum(1).long().tolist()
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        out[i, len(p) - 1:len(p) - 1 + n] = values[i, :n]
    return out


@torch.no_grad()
def sample_candidates(model, tokenizer, prompts: list[list[int]], n: int, max_new_tokens: int,
                      temperature: float = 1.0, top_k=None, top_p=None, batch_size: int = 64, seed: int = 0):
    """n completions per prompt -> (completions [ids], finished [bool]), prompt-major: entry i*n + j is sample
    j of prompt i, drawn with seed + i*n + j. Each generate call takes batch_size // n prompts (at least one)
    and prefills each prompt once before fanning its cache out to the n samples."""
    per_call = max(1, batch_size // n)
    was_training = model.training
    model.eval()
    completions, finished = [], []
    for start in tqdm(range(0, len(prompts), per_call), desc=f"sampling x{n}", leave=False, disable=None):
        g = generate(model, prompts[start:start + per_call], max_new_tokens, tokenizer.eos_id, tokenizer.pad_id,
                     temperature, top_k, top_p, num_samples=n, seed=seed + start * n)
        completions += g.completions()
        finished += g.finished.tolist()
    model.train(was_training)
    return completions, finished


@torch.no_grad()
def sample_kl(policy, ref, tokenizer, rows, max_new_tokens, temperature=1.0, seed=0, reward_fn=None, k=1,
              proxy=None) -> dict:
    """Sequence KL(policy || ref) on the policy's own samples (k per prompt) and its token entropy:
    kl = mean over sequences of sum_t (logp_t - ref_t), both at the sampling temperature.
    With reward_fn (a TRL-style reward function), also "reward": its mean over the same samples ("rewards":
    per sample, prompt-major). With proxy (a rewards.Reward, e.g. a reward model), also "proxy" and "proxies",
    its scores of the same samples: proxy and ground truth side by side show reward over-optimisation.
    Under torchrun each rank samples its share of the rows (seeds as one process) and every rank gets the
    whole result."""
    lo, hi = distributed.share(len(rows))
    device = next(policy.parameters()).device
    # what an empty share contributes (fewer rows than ranks): the same dtypes as a full one's, for the collectives
    kl_rows = torch.zeros(0, device=device)
    ent_sum = n_tokens = torch.zeros((), device=device)
    values, scores = [], []
    if hi > lo:
        r = sample_rollout(policy, tokenizer, rows[lo:hi], k, max_new_tokens, temperature, seed + lo * k)
        logp, ent = sequence_logprobs(policy, r.seqs, temperature, entropy=True)
        ref_logp = sequence_logprobs(ref, r.seqs, temperature)
        kl_rows = ((logp - ref_logp) * r.seqs.mask).sum(1)  # (N,) sequence KL
        ent_sum, n_tokens = (ent * r.seqs.mask).sum(), r.seqs.mask.sum()
        if reward_fn is not None:
            values = call_reward(reward_fn, r.rows, r.texts)  # prompt-major: k consecutive values per prompt
        if proxy is not None:
            scores = r.score(proxy).tolist()
    out = {"kl": distributed.cat(kl_rows).mean().item(),
           "entropy": (distributed.all_sum(ent_sum) / distributed.all_sum(n_tokens)).item()}
    if reward_fn is not None:
        values = distributed.gather(values)
        out["reward"], out["rewards"] = sum(values) / len(values), values
    if proxy is not None:
        scores = distributed.gather(scores)
        out["proxy"], out["proxies"] = sum(scores) / len(scores), scores
    return out
