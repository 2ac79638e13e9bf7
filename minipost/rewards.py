"""Reward sources for best-of-N and RL: a Python reward function, or a reward-model checkpoint.

The API (what sample_bon.py and train_rlhf.py use):

    load_reward_fn(spec) -> fn
        "module:function" (or "module:Class.method") -> the callable. The module is imported the normal way,
        with the working directory on the import path, so `--reward my_rewards:score` finds ./my_rewards.py.
        UserError (one line, exit 2) if the spec is malformed, the module cannot be imported, the name is
        missing or not callable.
    checked_rewards(fn, prompts, completions, **columns) -> list[float]
        Calls fn(prompts, completions, **columns) (the TRL convention: extra dataset columns arrive as lists)
        and checks that it returns one finite number per completion; a UserError naming the function if not.
        ValueError / TypeError / KeyError raised inside fn (a missing column, a bad signature) become
        UserErrors too.
    load_reward_model(path, device, flag="--reward-model") -> Checkpoint
        A checkpoint whose meta["kind"] == "rm" and whose model has the scalar head; UserError otherwise.
    score_with_reward_model(rm_model, tokenizer, prompt_ids, completion_ids, batch_size=64) -> (B,) float32
        r_b = score_head(h_b[last]) where h_b are the final hidden states of prompt_ids[b] + completion_ids[b]
        and `last` is the position of its last real token: the completion's EOS (<|end|>), or, for a
        completion cut off by the length budget, its last token. Sequences are batched with right padding,
        which a causal model never attends to, so a score does not depend on its batch. The tensor is on the
        reward model's device.
    same_tokenizer(a, b) -> bool
        True when two tokenizers map every text and special token to the same ids.
"""
import importlib
import math
import numbers
import os
import sys

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
    except (ValueError, TypeError, KeyError) as e:
        raise UserError(f"reward function {name} failed: {type(e).__name__}: {e}")
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


def load_reward_model(path, device="cpu", flag: str = "--reward-model"):
    """A reward-model checkpoint (train_rlhf.py --algo rm), in eval mode; UserError if it is not one."""
    ckpt = load_checkpoint(path, device, flag)
    kind = ckpt.meta.get("kind")
    if kind != "rm" or not ckpt.model.config.scalar_head:
        raise UserError(f"{flag} {path}: not a reward model (kind {kind!r}, scalar head "
                        f"{ckpt.model.config.scalar_head}); train one with train_rlhf.py --algo rm")
    ckpt.model.eval()
    return ckpt


def same_tokenizer(a, b) -> bool:
    """Same merges, same pre-tokenisation pattern, same special tokens: ids mean the same text in both."""
    return (a.enc._mergeable_ranks == b.enc._mergeable_ranks and a.enc._pat_str == b.enc._pat_str
            and a.enc._special_tokens == b.enc._special_tokens)


@torch.no_grad()
def score_with_reward_model(rm_model, tokenizer, prompt_ids: list[list[int]], completion_ids: list[list[int]],
                            batch_size: int = 64) -> torch.Tensor:
    """Scalar reward of each prompt + completion, read at its last real token (see the module docstring)."""
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
        rows = torch.arange(len(chunk), device=device)
        with autocast(device):
            hidden = rm_model(ids.to(device))  # (b, T, C); right padding comes after `last`, so it is unseen
            out[start:start + len(chunk)] = rm_model.scores(hidden[rows, last][:, None])[:, 0]  # (b,)
    rm_model.train(was_training)
    return out
