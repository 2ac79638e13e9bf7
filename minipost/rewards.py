"""Reward sources, in one place, for every script that scores completions: RL (train_rlhf.py), the
preference pairs of the reward model and DPO, best-of-N (sample_bon.py) and evaluation.

A source is one of three things, chosen by make_reward:
    --reward-model CKPT     a reward model (train_rlhf.py --algo rm): its scalar head read at the EOS token
    --reward module:fn      a TRL-style function f(prompts, completions, **columns) -> list[float]
    (neither)               the built-in task's own reward (arith's verifier, sentiment's hidden lexicon)
and is called the same way whatever it is: reward(rows, prompt_ids, completion_ids, texts) -> (N,) scores.

    load_reward_fn(spec) -> fn
        "module:function" (or "module:Class.method") -> the callable. The module is imported the normal way,
        with the working directory on the import path, so `--reward my_rewards:score` finds ./my_rewards.py.
        UserError (one line, exit 2) if the spec is malformed, the module cannot be imported, the name is
        missing or not callable.
    checked_rewards(fn, prompts, completions, **columns) -> list[float]
        Calls fn(prompts, completions, **columns) (the TRL convention: extra dataset columns arrive as lists)
        and checks that it returns one finite number per completion; a UserError naming the function if not.
        An exception raised inside fn (a missing column, a bad signature, a bug) becomes a UserError too,
        naming its type, message and the file:line it came from. call_reward(fn, rows, texts) does the same
        from prompt rows (reward_columns(rows)).
    load_reward_model(path, tokenizer, device) -> frozen GPT
        A checkpoint whose meta["kind"] == "rm", whose model has the scalar head and whose tokenizer is the
        policy's; UserError otherwise.
    eos_scores(model, ids, last) -> (N,) float32
        THE reward-model score, used for training it, for PPO and for best-of-N alike: score_head(h[last])
        where h are the final hidden states of the right-padded rows ids (N, T) and last (N,) is the position
        of each row's last real token: the completion's EOS (<|end|>), or, for a completion cut off by the
        length budget, its last token. A causal model never attends to the right padding, so a score does
        not depend on its batch. bf16 autocast on CUDA, float32 on CPU.
    score_with_reward_model(model, tokenizer, prompt_ids, completion_ids, batch_size=64) -> (N,) float32
        eos_scores of prompt + completion id lists, batched; the tensor is on the model's device.
    same_tokenizer(a, b) -> bool
        True when two tokenizers map every text and special token to the same ids.
"""
import importlib
import math
import numbers
import os
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .checkpoint import load_checkpoint
from .cli import UserError, autocast


def load_reward_fn(spec: str, flag: str = "--reward"):
    """"module:function" -> the function (see the module docstring)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UserError(f"{flag} {spec!r}: expected MODULE:FUNCTION, e.g. minipost.tasks:arith_reward")
    if os.getcwd() not in sys.path:  # a script's sys.path starts at its own folder, not at the user's
        sys.path.append(os.getcwd())
    try:
        obj = importlib.import_module(module_name)
    except Exception as e:  # ModuleNotFoundError, or the module itself failing on import (SyntaxError, ...)
        raise UserError(f"{flag} {spec}: cannot import module '{module_name}' ({type(e).__name__}: {e})")
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UserError(f"{flag} {spec}: module '{module_name}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserError(f"{flag} {spec}: '{attr}' is a {type(obj).__name__}, not a function")
    return obj


def reward_fn_name(fn) -> str:
    """module:qualname of a reward function, for error messages."""
    qualname = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{getattr(fn, '__module__', '?')}:{qualname}"


def checked_rewards(fn, prompts, completions, **columns) -> list[float]:
    """fn(prompts, completions, **columns), checked: one finite number per completion, as floats."""
    name = reward_fn_name(fn)
    try:
        out = fn(prompts, completions, **columns)
    except Exception as e:  # the user's code failing (a missing column, a bad signature, a bug in it)
        frame = traceback.extract_tb(e.__traceback__)[-1]
        raise UserError(f"reward function {name} failed: {type(e).__name__}: {e} (raised at "
                        f"{Path(frame.filename).name}:{frame.lineno})")
    if hasattr(out, "tolist"):  # a torch tensor or a numpy array
        out = out.tolist()
    if not isinstance(out, (list, tuple)):
        raise UserError(f"reward function {name} returned a {type(out).__name__}; expected a list of numbers")
    if len(out) != len(completions):
        raise UserError(f"reward function {name} returned {len(out)} rewards for {len(completions)} completions")
    for i, r in enumerate(out):
        if not isinstance(r, numbers.Real):
            raise UserError(f"reward function {name} returned {r!r:.60} ({type(r).__name__}) for completion {i}; "
                            "rewards must be numbers")
        if not math.isfinite(r):
            raise UserError(f"reward function {name} returned {r} for completion {i}; rewards must be finite")
    return [float(r) for r in out]


def reward_columns(rows: list[dict]) -> dict:
    """Extra columns of prompt rows, as lists, for a TRL-style reward function (e.g. arith's `answer`)."""
    keys = [k for k in rows[0] if k != "prompt"]
    return {k: [r.get(k) for r in rows] for k in keys}


def call_reward(fn, rows: list[dict], texts: list[str]) -> list[float]:
    """checked_rewards of decoded completions, one per prompt row (rows may repeat a prompt)."""
    return checked_rewards(fn, [r["prompt"] for r in rows], texts, **reward_columns(rows))


def load_reward_model(path, tokenizer, device="cpu", flag: str = "--reward-model", task=None):
    """A reward-model checkpoint (train_rlhf.py --algo rm) for a policy with this tokenizer (and of this task
    when given) -> the model, frozen and in eval mode; UserError if it is not a reward model or reads token
    ids differently."""
    ckpt = load_checkpoint(path, device, flag, task=task)
    kind = ckpt.meta.get("kind")
    if kind != "rm" or not ckpt.model.config.scalar_head:
        raise UserError(f"{flag} {path}: not a reward model (kind {kind!r}, scalar head "
                        f"{ckpt.model.config.scalar_head}); train one with train_rlhf.py --algo rm")
    if not same_tokenizer(ckpt.tokenizer, tokenizer):
        raise UserError(f"{flag} {path}: its tokenizer differs from the policy's (train the reward model "
                        "from the same SFT checkpoint family)")
    return ckpt.model.eval().requires_grad_(False)


def same_tokenizer(a, b) -> bool:
    """Same merges, same pre-tokenisation pattern, same special tokens: ids mean the same text in both."""
    return (a.enc._mergeable_ranks == b.enc._mergeable_ranks and a.enc._pat_str == b.enc._pat_str
            and a.enc._special_tokens == b.enc._special_tokens)


def eos_scores(model, ids, last):
    """Scalar-head model -> (N,) float32 score read at the hidden state of each row's last real token.
    ids (N, T) right-padded; last (N,) positions. Differentiable (the reward model trains through it)."""
    rows = torch.arange(ids.shape[0], device=ids.device)
    with autocast(ids.device):
        hidden = model(ids)  # (N, T, C); the right padding comes after `last`, so it is never seen
        return model.scores(hidden[rows, last][:, None])[:, 0]  # (N,)


@torch.no_grad()
def score_with_reward_model(rm_model, tokenizer, prompt_ids: list[list[int]], completion_ids: list[list[int]],
                            batch_size: int = 64) -> torch.Tensor:
    """eos_scores of each prompt + completion (see the module docstring), `batch_size` rows at a time."""
    if len(prompt_ids) != len(completion_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(completion_ids)} completions")
    if not rm_model.config.scalar_head:
        raise ValueError("score_with_reward_model needs a model with config.scalar_head=True")
    seqs = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids)]
    if any(len(s) == 0 for s in seqs):
        raise ValueError("score_with_reward_model: an empty prompt + completion has no token to read")
    longest = max((len(s) for s in seqs), default=0)
    if longest > rm_model.config.block_size:
        raise UserError(f"reward model context is {rm_model.config.block_size} tokens but a prompt + completion "
                        f"has {longest}")
    device = next(rm_model.parameters()).device
    was_training = rm_model.training
    rm_model.eval()
    out = torch.empty(len(seqs), dtype=torch.float32, device=device)
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start:start + batch_size]
        ids = torch.full((len(chunk), max(len(s) for s in chunk)), tokenizer.pad_id, dtype=torch.long)
        for i, s in enumerate(chunk):
            ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        last = torch.tensor([len(s) - 1 for s in chunk], device=device)  # (b,) the EOS, or the last token
        out[start:start + len(chunk)] = eos_scores(rm_model, ids.to(device), last)
    rm_model.train(was_training)
    return out


# ------------------------------------------------------------------------------------ the one reward source

@dataclass
class Reward:
    """A reward source: a function of the decoded texts (fn) or a reward model scored at the EOS (model).
    reward(rows, prompt_ids, completion_ids, texts) -> (N,) float64 on the CPU, one per completion (a
    function's floats exactly, so best-of-N ranks and ties on the very values it returned; RL casts to
    float32); rows[i] is the prompt row (with its extra columns) that completion i answers."""
    name: str
    fn: Callable | None = None
    model: torch.nn.Module | None = None
    tokenizer: object = None  # the reward model's (= the policy's) tokenizer: its pad id
    batch_size: int = 64

    @torch.no_grad()
    def __call__(self, rows, prompt_ids, completion_ids, texts) -> torch.Tensor:
        if self.model is not None:
            scores = score_with_reward_model(self.model, self.tokenizer, prompt_ids, completion_ids, self.batch_size)
            if not torch.isfinite(scores).all():  # a function's rewards are checked in checked_rewards
                raise UserError(f"{self.name} gave a NaN or infinite score (are its weights sound?)")
            return scores.cpu().double()
        return torch.tensor(call_reward(self.fn, rows, texts), dtype=torch.float64)


def make_reward(task, tokenizer, device, reward: str | None = None, reward_model: str | None = None,
                batch_size: int = 64, other_task_ok: bool = False) -> Reward:
    """--reward-model CKPT (trained on `task`, unless other_task_ok), else --reward module:function, else the
    task's own reward."""
    if reward and reward_model:
        raise UserError("choose one of --reward and --reward-model")
    if reward_model:
        model = load_reward_model(reward_model, tokenizer, device, task=None if other_task_ok else task.name)
        return Reward(f"reward model {reward_model}", model=model, tokenizer=tokenizer, batch_size=batch_size)
    if reward:
        return Reward(reward, fn=load_reward_fn(reward))
    return Reward(f"{task.name} reward", fn=task.reward)
