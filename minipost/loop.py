"""The training loop of train_base.py, train_sft.py and train_rlhf.py, called (not inherited) by each script:

    opt = adamw(groups, lr)                                              the optimizer every script uses
    run, saved = start_run(args, out, opt, tokenizer, resumed, models)   resume state, metrics log
    for step in training_steps(run, evaluate, lr_at):                    progress bar, LR, step 0 evaluation
        ... the script's own batch and loss ...
        loss, grad_norm = optimizer_step(run, step, part, models)        backward, clip, finite checks, step
        end_step(run, step, logs, evaluate, model)                       log; evaluate and checkpoint on cadence

A script keeps everything that is its algorithm (its batches, losses, learning-rate schedule, what it logs);
this module keeps what every loop repeats: the optimizer's settings, what a resume restores, when to evaluate
and checkpoint (--eval-every, --ckpt-every, the last step), what a checkpoint's meta and resume state hold,
the finiteness checks (cli.finite_or_stop, cli.weights_finite_or_stop) and the costs logged at the end
(trainable parameters, tensor and peak memory). Extra trained models (PPO's critic) are just more models.

Under torchrun (minipost/distributed.py) every rank runs the loop; a script hands optimizer_step this rank's
part of the global loss, and rank 0 alone writes the metrics, the checkpoints and the progress bar.
"""
import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from . import distributed
from .checkpoint import load_train_state, rng_state, save_checkpoint, set_rng_state
from .cli import MetricsLog, finite_or_stop, peak_memory_mb, tensor_memory_mb, weights_finite_or_stop


def adamw(groups, lr, weight_decay=0.0):
    """AdamW as every script runs it (betas 0.9, 0.95); groups: parameter groups (their own weight_decay wins)."""
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)


def decay_groups(params, weight_decay):
    """Weight decay on matrices only (not on biases, norms' gains): two AdamW parameter groups."""
    params = list(params)
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


@dataclass
class Run:
    """One training run's shared state: optimizer, metrics log, clock, progress bar, and what its log holds."""
    args: argparse.Namespace  # the script's flags: max_steps, eval_every, ckpt_every, grad_clip
    out: Path
    tokenizer: object
    opt: torch.optim.Optimizer
    metrics: MetricsLog
    start_step: int
    elapsed: float  # training seconds of the run before this process (resume)
    models: list  # every model the run holds, trained or frozen (memory accounting)
    meta: dict  # the checkpoint meta's fixed part: script, kind, task, args, init
    desc: str = ""  # the progress bar's label
    step_time: bool = True  # log step_time_s (wall time of the step)
    time_with_eval: bool = True  # time_s taken after the step's evaluation (else before it)
    costs: bool = True  # at the last step, log trainable_params, tensor_memory_mb, peak_memory_mb
    postfix: object = None  # last metrics -> the progress bar's postfix (default: loss, reward, accuracy, kl)
    t_start: float = 0.0
    t_step: float = 0.0
    lr: float = 0.0
    bar: tqdm | None = field(default=None, repr=False)

    @property
    def trainable(self) -> int:
        """Parameters the optimizer updates."""
        return sum(p.numel() for group in self.opt.param_groups for p in group["params"])


def start_run(args, out, opt, tokenizer, resumed, models, meta, **options):
    """A run of `opt` over the trained models; with resumed (a checkpoint with .path, or None) its optimizer,
    RNG, step and clock are restored -> (Run, the script's own saved state or None). models: every model the
    run holds, trained ones first (memory accounting); meta: the fixed part of each checkpoint's meta.json;
    options: Run's fields desc, step_time, time_with_eval, costs, postfix."""
    start_step, elapsed, saved = 0, 0.0, None
    if resumed is not None:
        state = load_train_state(resumed.path)
        opt.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        start_step, elapsed, saved = state["step"], state["elapsed"], state.get("trainer")
    metrics = MetricsLog(out / "metrics.jsonl", resume_step=start_step if resumed is not None else None,
                         enabled=distributed.is_main())
    return Run(args, out, tokenizer, opt, metrics, start_step, elapsed, list(models), meta, **options), saved


def training_steps(run, evaluate, lr_at):
    """Yields the step numbers still to run, under a progress bar, each with the learning rate lr_at(step) set.
    A fresh run first logs step 0 (the starting point on the same evaluation) unless evaluate is None."""
    a = run.args
    if run.start_step == 0 and evaluate is not None:
        run.metrics.log(step=0, **evaluate(0))
    run.t_start = time.time()
    run.bar = tqdm(range(run.start_step, a.max_steps), initial=run.start_step, total=a.max_steps, desc=run.desc,
                   disable=not distributed.is_main())
    for step in run.bar:
        run.t_step = time.time()
        run.lr = lr_at(step)
        for group in run.opt.param_groups:
            group["lr"] = run.lr
        yield step


def optimizer_step(run, step, part, models) -> tuple[float, float]:
    """Backward of this rank's part of the loss (the parts of all ranks sum to it; in one process, the loss),
    then apply_gradients -> (the loss, the first model's gradient norm)."""
    distributed.backward(part)
    return apply_gradients(run, step, distributed.all_sum(part), models)


def apply_gradients(run, step, loss, models) -> tuple[float, float]:
    """One optimizer step on gradients already accumulated, each model's gradient norm clipped on its own
    (--grad-clip; 0: off) -> (loss, the first model's norm). loss: the whole (summed over ranks) loss. A
    non-finite loss or norm stops the run (cli.Diverged) before the weights move, and trained weights whose
    norm is not finite after the update stop it before anything is saved, on every rank alike: the norms are
    of the averaged gradients and of the replicas."""
    norms = [torch.nn.utils.clip_grad_norm_(m.parameters(), run.args.grad_clip or float("inf")) for m in models]
    names = ["gradient norm", "critic gradient norm"][:len(models)]  # PPO's second model is its critic
    checked = finite_or_stop(step + 1, {"loss": loss, **dict(zip(names, norms))})
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    weights_finite_or_stop(step + 1, dict(zip(["parameter norm", "critic parameter norm"], models)))
    return checked["loss"], checked[names[0]]


def _postfix(last):
    return {k: f"{last[k]:.3f}" for k in ("loss", "reward", "accuracy", "kl") if k in last}


def end_step(run, step, logs, evaluate, model, save_state=None, save_meta=dict):
    """Log a finished step (logs: the script's numbers, in the order logged; lr is added after them unless
    they hold it); evaluate and checkpoint `model` (+ save_state() for --resume, save_meta() for meta.json)
    every --eval-every / --ckpt-every steps and at the last. A non-finite number among the step's logs
    (KL, entropy, rewards, ...) or its evaluation stops the run (cli.Diverged) before it is logged or saved."""
    a = run.args
    finite_or_stop(step + 1, logs)
    last = {"step": step + 1, **logs}
    last.setdefault("lr", run.lr)
    if run.step_time:
        last["step_time_s"] = time.time() - run.t_step
    if not run.time_with_eval:
        last["time_s"] = run.elapsed + time.time() - run.t_start
    done = step + 1 == a.max_steps
    if (step + 1) % a.eval_every == 0 or done:
        evaluated = evaluate(step + 1)
        finite_or_stop(step + 1, evaluated)
        last.update(evaluated)
    if run.time_with_eval:
        last["time_s"] = run.elapsed + time.time() - run.t_start
    if done and run.costs:  # what the run cost: its parameters, tensors and the process's peak memory
        last.update(trainable_params=run.trainable, tensor_memory_mb=tensor_memory_mb(run.models, run.opt),
                    peak_memory_mb=peak_memory_mb(next(run.models[0].parameters()).device))
    run.metrics.log(**last)
    run.bar.set_postfix((run.postfix or _postfix)(last))
    if (step + 1) % a.ckpt_every == 0 or done:
        checkpoint(run, step, last, model, save_state, save_meta)


def checkpoint(run, step, last, model, save_state, save_meta):
    """OUT/ckpt: the model, meta.json (the run's fixed meta, step, clock, save_meta()'s numbers, the last
    metrics) and the resume state (optimizer, RNG, step, clock, save_state()'s)."""
    # save_meta runs on every rank: it may be a collective, or change the model (rm's bias) on every replica
    extra = save_meta()
    finite_or_stop(step + 1, extra)  # rm's re-centred bias: a number that is also a weight
    meta = {**run.meta, "step": step + 1, "elapsed_s": last["time_s"], **extra, "metrics": last}
    if not distributed.is_main():
        return
    state = {"optimizer": run.opt.state_dict(), "rng": rng_state(), "step": step + 1, "elapsed": last["time_s"]}
    if save_state is not None:
        state["trainer"] = save_state()
    save_checkpoint(run.out, model, run.tokenizer, meta, state)
