"""What a checkpoint's meta.json and resume state may hold: every field's type and range, checked on load.

A checkpoint is input read from disk like any other: a field of the wrong type (`"kind": {"__reduce__": ...}`,
a string `step`, an adapter rank of -1) would otherwise ride along into comparisons, messages, evaluation rows
and tensor shapes. check_meta and check_train_state refuse it with one line naming the file and the field
(a UserError, exit code 2). Every field minipost writes is typed; a field missing from an older or hand-made
checkpoint is allowed wherever the code reading it has a default (all of meta.json's top-level fields), and
an unknown extra field is kept as written (nothing reads it). Of a run's "args" and "metrics", only the
entries something reads are typed (args batch_size, k and turns: samples counted by minipost.evaluate and the
plots; the run's costs in metrics, copied into evaluation rows).

    kind          one of KINDS              step         integer >= 0         elapsed_s   number >= 0
    task          null or a string          script, init a string             args, metrics  objects
    reward_bias   a number (rm)             centred_on   integer >= 0 (rm)
    adapter       {"lora": null | {r, alpha, dropout, targets}, "prompt_tuning": null | integer, "base":
                  {"path", "fingerprint"}}: all of its fields required, one kind of adapter at least
    state.pt      optimizer {"state", "param_groups"}, rng {"torch": uint8 tensor, ...}, step, elapsed;
                  trainer null or {"critic": tensors, "kl_coef": a number} (PPO)
"""
import math
import re

import torch

from .adapters import LORA_TARGETS
from .cli import UserError, _obeys

# train_base.py's, train_sft.py's (--loss) and train_rlhf.py's (--algo) kinds of run
KINDS = ("base", "sft", "dft", "rm", "dpo", "ppo", "nft", "rft", "grpo")

# A rule: (what the value must be, as the message says it; a test of the value)
OBJECT = ("an object", lambda v: isinstance(v, dict))
STRING = ("a string", lambda v: isinstance(v, str))


def integer(lo, hi=None):
    return (f"an integer in {lo}..{hi}" if hi is not None else f"an integer >= {lo}",
            lambda v: type(v) is int and lo <= v and (hi is None or v <= hi))


def number(rule):  # rule: cli.require_numbers' notation, ">= 0", "> 0", "in [0, 1)"
    return (f"a number {rule}", lambda v: type(v) in (int, float) and math.isfinite(v) and _obeys(v, rule))


def optional(rule):
    what, test = rule
    return (f"null or {what}", lambda v: v is None or test(v))


def one_of(choices):
    return (f"one of {', '.join(choices)}", lambda v: isinstance(v, str) and v in choices)


ANY_NUMBER = ("a finite number", lambda v: type(v) in (int, float) and math.isfinite(v))
TARGETS = (f"a non-empty list of {', '.join(LORA_TARGETS)}",
           lambda v: isinstance(v, list) and v and all(isinstance(t, str) and t in LORA_TARGETS for t in v))
FINGERPRINT = ("16 hexadecimal digits", lambda v: isinstance(v, str) and re.fullmatch(r"[0-9a-f]{16}", v))
PATH = ("a non-empty string", lambda v: isinstance(v, str) and v != "")

META = {"kind": one_of(KINDS), "task": optional(STRING), "script": STRING, "init": STRING, "step": integer(0),
        "elapsed_s": number(">= 0"), "reward_bias": ANY_NUMBER, "centred_on": integer(0), "args": OBJECT,
        "metrics": OBJECT, "adapter": OBJECT}
ARGS = {"batch_size": optional(integer(1)), "k": optional(integer(1)), "turns": optional(integer(1))}
METRICS = {"trainable_params": integer(0), "tensor_memory_mb": number(">= 0"), "peak_memory_mb": number(">= 0")}
ADAPTER = {"lora": optional(OBJECT), "prompt_tuning": optional(integer(1, 2**17)), "base": OBJECT}
LORA = {"r": integer(1, 2**15), "alpha": number("> 0"), "dropout": number("in [0, 1)"), "targets": TARGETS}
BASE = {"path": PATH, "fingerprint": FINGERPRINT}


def check_fields(obj: dict, rules: dict, where: str, prefix="", required=False):
    """UserError naming the first field of obj (prefix.name) that breaks its rule, or that is missing when
    every field is required."""
    for name, (what, test) in rules.items():
        if name not in obj:
            if required:
                raise UserError(f"{where}: field '{prefix}{name}' is missing")
            continue
        if not test(obj[name]):
            raise UserError(f"{where}: field '{prefix}{name}' must be {what}, got {obj[name]!r:.80}")


def check_meta(meta: dict, where: str) -> dict:
    """meta.json's fields (where: '--init PATH: meta.json', as the message starts) -> meta, or UserError."""
    check_fields(meta, META, where)
    check_fields(meta.get("args", {}), ARGS, where, "args.")
    check_fields(meta.get("metrics", {}), METRICS, where, "metrics.")
    if "adapter" in meta:
        spec = meta["adapter"]
        check_fields(spec, ADAPTER, where, "adapter.", required=True)
        if spec["lora"] is None and spec["prompt_tuning"] is None:
            raise UserError(f"{where}: field 'adapter' names no adapter (both 'lora' and 'prompt_tuning' are null)")
        if spec["lora"] is not None:
            check_fields(spec["lora"], LORA, where, "adapter.lora.", required=True)
        check_fields(spec["base"], BASE, where, "adapter.base.", required=True)
    return meta


def tensors(what):
    return (what, lambda v: isinstance(v, dict) and all(isinstance(k, str) and torch.is_tensor(t)
                                                        for k, t in v.items()))


STATE = {"optimizer": OBJECT, "rng": OBJECT, "step": integer(0), "elapsed": number(">= 0")}
OPTIMIZER = {"state": OBJECT, "param_groups": ("a list of objects", lambda v: isinstance(v, list) and
                                                all(isinstance(g, dict) for g in v))}
RNG = {"torch": ("a uint8 tensor", lambda v: torch.is_tensor(v) and v.dtype == torch.uint8 and v.dim() == 1),
       "cuda": ("a list of uint8 tensors", lambda v: isinstance(v, list) and
                all(torch.is_tensor(t) and t.dtype == torch.uint8 for t in v))}
TRAINER = {"critic": tensors("a dict of named tensors"), "kl_coef": ANY_NUMBER}  # --target-kl may take it below 0


def check_train_state(state: dict, where: str) -> dict:
    """state.pt's fields (where: '--resume from DIR: state.pt') -> state, or UserError."""
    check_fields(state, STATE, where, required=True)
    check_fields(state, {"trainer": optional(OBJECT)}, where)  # train_rlhf.py's runs only
    check_fields(state["optimizer"], OPTIMIZER, where, "optimizer.", required=True)
    check_fields(state["rng"], {"torch": RNG["torch"]}, where, "rng.", required=True)
    check_fields(state["rng"], RNG, where, "rng.")
    check_fields(state.get("trainer") or {}, TRAINER, where, "trainer.")
    return state
