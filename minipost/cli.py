"""Plumbing every script shares: user-facing errors and flag checks, the device, the metrics log, the LR schedule.

Two kinds of failure end a script with one line on stderr (`error: ...`), never a traceback:
    UserError  bad input found by a check (a missing file, a bad flag value, a malformed row, a checkpoint of
               the wrong kind, a reward function that fails): exit code 2, fix the command or the input.
    Diverged   a training run's own numbers went non-finite: exit code 1, the run failed although every
               input passed its checks. What counts (finite_or_stop, weights_finite_or_stop): anything a step
               measures (loss, gradient norm, KL, entropy, rewards, evaluations) that is NaN or infinite, and
               trained parameters whose float32 norm is (a NaN or infinite weight, or weights so large, a norm
               above ~1.8e19, that their sum of squares overflows float32: such a model's activations do too).
               Every script checks a step before it logs or saves it, so no checkpoint ever holds a diverged step.
Bugs still raise normally (a traceback, exit code 1).
"""
import json
import math
import operator
import os
import sys
from pathlib import Path

import torch
from tqdm import tqdm


class UserError(Exception):
    """Bad input from the user: reported as one line, exit code 2."""


class Diverged(Exception):
    """A training run's numbers or weights became NaN or infinite: reported as one line, exit code 1."""


def run_main(main):
    """Call main(); report a UserError (exit 2) or a Diverged run (exit 1) as one line `error: ...`.

    Under torchrun, a rank whose main() returned waits at a barrier for the others before it exits. A gloo
    worker thread frees each collective's tensors just after the collective has returned, and freeing a tensor
    that Python also held needs the GIL: a rank leaving within milliseconds of its last collective could reach
    interpreter shutdown first, and that thread then aborted the process (SIGABRT, "terminate called without
    an active exception": about 1 run in 25-60 of the two-rank reward-model test; the core dump showed the
    thread in ~AsyncAllgatherWork waiting for the GIL). The barrier waits with the GIL released, so the thread
    finishes first. Only here, on a clean return: a rank that failed must not wait for ranks that may be
    blocked in another collective (it exits, and its closed connections end their collectives)."""
    try:
        main()
    except (UserError, Diverged) as e:
        for bar in list(getattr(tqdm, "_instances", ())):  # a bar left mid-line would swallow the message
            bar.close()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, UserError) else 1)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def finite_or_stop(step: int, values: dict) -> dict:
    """{name: tensor or number} -> {name: float}; Diverged naming the step and the first non-finite value.
    Other values (a string, a list, None) are passed over: a step's whole log can be handed in. Called before
    the step is logged or saved (the loss and gradient norm also before the update). One .item() per tensor,
    which the loops log anyway."""
    out = {}
    for name, value in values.items():
        if torch.is_tensor(value) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out[name] = float(value)
        if not math.isfinite(out[name]):
            raise Diverged(f"step {step}: {name} is {out[name]}; training diverged and stopped, nothing of this step "
                           "was saved (the last checkpoint stays as it was): lower --lr, or check --init's weights")
    return out


def weights_finite_or_stop(step: int, models: dict) -> dict:
    """{name: model} -> {name: float32 L2 norm of its trainable parameters}; Diverged unless each is finite.
    Called after the optimizer step, before anything is saved: one norm kernel per device and one sync."""
    norms = {name: torch.nn.utils.get_total_norm([p.detach() for p in m.parameters() if p.requires_grad])
             for name, m in models.items()}
    return finite_or_stop(step, norms)


def require_positive(args, *flags):
    """UserError unless each named integer flag (argparse dest, e.g. "max_steps") is >= 1. A flag left at
    None (optional, unset) passes."""
    for flag in flags:
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1")


_COMPARE = {">": operator.gt, ">=": operator.ge}


def require_numbers(args, **rules):
    """UserError unless each named float flag (argparse dest) is finite and obeys its rule, written as the
    message shows it: "> 0", ">= 0", "in [0, 1)", "in (0, 1]". A flag left at None (unset) passes.
    argparse's float() accepts "nan" and "inf"; this is where they stop."""
    for dest, rule in rules.items():
        value = getattr(args, dest)
        if value is not None and not (math.isfinite(value) and _obeys(value, rule)):
            raise UserError(f"--{dest.replace('_', '-')} must be {rule} (got {value})")


def _obeys(value, rule: str) -> bool:
    if rule.startswith("in "):  # "in [lo, hi)": the brackets say which ends are included
        lo, hi = (float(x) for x in rule[4:-1].split(","))
        return (value >= lo if rule[3] == "[" else value > lo) and (value <= hi if rule[-1] == "]" else value < hi)
    op, bound = rule.split()
    return _COMPARE[op](value, float(bound))


def writable_dir(path, flag="--out") -> Path:
    """Create the output directory now and check that a file can be written in it, so that an unwritable
    --out fails before the work, not after it."""
    path = Path(path)
    _probe(path, f"{flag} {path}")
    return path


def writable_file(path, flag="--out") -> Path:
    """As writable_dir, for an output file: its directory must take a file, and the path must not be a directory."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a directory; give a file name")
    _probe(path.parent, f"{flag} {path}")
    return path


def _probe(directory: Path, where: str):
    probe = directory / f".write-test-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except FileExistsError:  # a file where the directory should be
        raise UserError(f"{where}: cannot write there ({directory} is a file, not a directory)")
    except OSError as e:
        raise UserError(f"{where}: cannot write there ({type(e).__name__}: {e.strerror or e})")


def pick_device(flag: str) -> torch.device:
    if flag == "auto":
        flag = "cuda" if torch.cuda.is_available() else "cpu"
    if flag == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available (use --device cpu)")
    return torch.device(flag)


def autocast(device: torch.device):
    """The precision policy of every script: bf16 autocast on CUDA (matmuls and both kernels in bf16 on tensor
    cores; log-probs, softmax statistics and rewards stay float32); float32 on CPU, where the study's numbers come
    from. MINIPOST_PRECISION=fp32 keeps float32 on CUDA too (full-precision "ieee" kernels: slower, exact)."""
    precision = os.environ.get("MINIPOST_PRECISION", "bf16")
    if precision not in ("bf16", "fp32"):
        raise UserError(f"MINIPOST_PRECISION={precision!r}: expected bf16 (the default) or fp32")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and precision == "bf16")


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process so far: CUDA allocations on a GPU, else the resident set size (which on a
    CPU is mostly the Python and torch runtime, a few hundred MB, whatever the model)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def tensor_memory_mb(models, opt) -> float:
    """MB of the distinct parameter tensors a run holds (a base shared by a policy and its reference counted
    once), a gradient for each trainable one, and the optimizer's state: what full fine-tuning, a frozen
    reference copy or adapters change. models: anything with .parameters()."""
    params = {p.data_ptr(): p for m in models for p in m.parameters()}
    total = sum(p.numel() * p.element_size() * (2 if p.requires_grad else 1) for p in params.values())
    total += sum(v.numel() * v.element_size() for state in opt.state.values() for v in state.values()
                 if torch.is_tensor(v))
    return total / 2**20


def cosine_lr(step: int, max_steps: int, lr: float, min_lr: float, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay from lr to min_lr at max_steps (step is 0-based)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


class MetricsLog:
    """Append-only JSONL of metrics beside the checkpoint, one object per line, each with a "step".

    On resume, lines past the checkpoint's step are dropped first, so a resumed run's log reads exactly like
    an uninterrupted one.
    """

    def __init__(self, path, resume_step=None, enabled=True):
        self.path = Path(path)
        self.enabled = enabled  # only rank 0 writes once runs go multi-GPU
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, **metrics):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(metrics) + "\n")


def read_metrics(path):
    """All records of a metrics JSONL file, as a list of dicts."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def task_from_flag(name: str):
    """The built-in task named by --task, or a UserError naming the choices."""
    from .tasks import get_task

    try:
        return get_task(name)
    except ValueError as e:
        raise UserError(f"--task: {e}")
