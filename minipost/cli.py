"""Plumbing every script shares: user-facing errors and flag checks, the device, the metrics log, the LR schedule.

A user's mistake (a missing file, a bad flag value, a malformed row) raises UserError; `run_main` turns it
into one line on stderr and exit code 2, never a traceback. Bugs still raise normally.
"""
import json
import math
import sys
from pathlib import Path

import torch


class UserError(Exception):
    """Bad input from the user: reported as one line, exit code 2."""


def run_main(main):
    """Call main(); report a UserError as `error: ...` and exit 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def require_positive(args, *flags):
    """UserError unless each named integer flag (argparse dest, e.g. "max_steps") is >= 1. A flag left at
    None (optional, unset) passes."""
    for flag in flags:
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1")


def pick_device(flag: str) -> torch.device:
    if flag == "auto":
        flag = "cuda" if torch.cuda.is_available() else "cpu"
    if flag == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available (use --device cpu)")
    return torch.device(flag)


def autocast(device: torch.device):
    """bf16 autocast on CUDA (matmuls in bf16, log-probs stay float32 in the kernels); float32 on CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


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
