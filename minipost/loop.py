"""The plumbing of train_rlhf.py's loops, called (not inherited) by each algorithm family:

    run, saved = start_run(args, out, models, tokenizer, resumed, held)   AdamW, resume state, metrics log
    for step in training_steps(run, evaluate):                            progress bar, warm-up LR, step 0 eval
        ... the family's own rollout and loss ...
        loss, grad_norm = optimizer_step(run, step, part, models)         backward, clip, finite check, step
        end_step(run, step, logs, evaluate, model, save_state, save_meta) log; evaluate and checkpoint on cadence

A family keeps everything that is its algorithm; this module keeps what every loop repeats: when to
evaluate and checkpoint (--eval-every, --ckpt-every, the last step), what a checkpoint's meta and resume state
hold, and the costs logged at the end (trainable parameters, tensor and peak memory).

Under torchrun (minipost/distributed.py) every rank runs the loop; a family hands optimizer_step this rank's
part of the global loss, and rank 0 alone writes the metrics, the checkpoints and the progress bar.
"""
import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from . import distributed
from .adapters import has_adapters
from .checkpoint import load_train_state, rng_state, save_checkpoint, set_rng_state
from .cli import MetricsLog, finite_or_stop, peak_memory_mb, tensor_memory_mb, weights_finite_or_stop


@dataclass
class Run:
    """One training run's shared state: optimizer, metrics log, clock, progress bar."""
    args: argparse.Namespace  # the script's flags: max_steps, lr, warmup, eval_every, ckpt_every, algo, init
    out: Path
    tokenizer: object
    opt: torch.optim.Optimizer
    metrics: MetricsLog
    start_step: int
    elapsed: float  # training seconds of the run before this process (resume)
    models: list  # every model the run holds, trained or frozen (memory accounting)
    trainable: int  # parameters the optimizer updates
    t_start: float = 0.0
    t_step: float = 0.0
    lr: float = 0.0
    bar: tqdm | None = None

def start_run(args, out, models, tokenizer, resumed, held=()):
    """AdamW over the trainable parameters of the trained models (one param group each) and, when resuming,
    the optimizer, RNG and step of the checkpoint -> (Run, the family's own saved state or None). held: the
    other models the run keeps (reference, reward model), for the memory it reports."""
    opt = torch.optim.AdamW([{"params": [p for p in m.parameters() if p.requires_grad]} for m in models],
                            lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    start_step, elapsed, family_state = 0, 0.0, None
    if resumed is not None:
        state = load_train_state(resumed.path)
        opt.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        start_step, elapsed, family_state = state["step"], state["elapsed"], state["trainer"]
    metrics = MetricsLog(out / "metrics.jsonl", resume_step=start_step if resumed is not None else None,
                         enabled=distributed.is_main())
    trainable = sum(p.numel() for group in opt.param_groups for p in group["params"])
    print(f"trainable parameters: {trainable:,}" + (" (adapters)" if has_adapters(models[0]) else ""))
    run = Run(args, out, tokenizer, opt, metrics, start_step, elapsed, [*models, *held], trainable)
    return run, family_state


def training_steps(run, evaluate):
    """Yields the step numbers still to run, under a progress bar, with the warm-up LR set. A fresh run
    first logs step 0: the starting point (the SFT model; an untrained head for rm) on the same evaluation."""
    a = run.args
    if run.start_step == 0:
        run.metrics.log(step=0, **evaluate(0))
    run.t_start = time.time()
    run.bar = tqdm(range(run.start_step, a.max_steps), initial=run.start_step, total=a.max_steps, desc=a.algo,
                   disable=not distributed.is_main())
    for step in run.bar:
        run.lr = a.lr * min(1.0, (step + 1) / a.warmup)
        for group in run.opt.param_groups:
            group["lr"] = run.lr
        run.t_step = time.time()
        yield step


def optimizer_step(run, step, part, models) -> tuple[float, float]:
    """One optimizer step on the loss, each model's gradient norm clipped on its own (--grad-clip; 0: off) ->
    (the loss, the first model's norm). part: this rank's part of the loss (the parts of all ranks sum to it;
    in one process, the loss). A non-finite loss or norm stops the run (cli.Diverged) before the weights move,
    and trained weights whose norm is not finite after the update stop it before anything is saved, on every
    rank alike: the loss checked is the summed one, the norms are of the averaged gradients and the replicas."""
    distributed.backward(part)
    norms = [torch.nn.utils.clip_grad_norm_(m.parameters(), run.args.grad_clip or float("inf")) for m in models]
    names = ["gradient norm", "critic gradient norm"][:len(models)]  # PPO's second model is its critic
    checked = finite_or_stop(step + 1, {"loss": distributed.all_sum(part), **dict(zip(names, norms))})
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    weights_finite_or_stop(step + 1, dict(zip(["parameter norm", "critic parameter norm"], models)))
    return checked["loss"], checked[names[0]]


def end_step(run, step, logs, evaluate, model, save_state=dict, save_meta=dict):
    """Log a finished step; evaluate and checkpoint `model` (+ save_state() for --resume, save_meta() for
    meta.json) every --eval-every / --ckpt-every steps and at the last. A non-finite number among the step's
    logs (KL, entropy, rewards, ...) or its evaluation stops the run (cli.Diverged) before it is logged or saved."""
    a = run.args
    finite_or_stop(step + 1, logs)
    last = {"step": step + 1, **logs, "lr": run.lr, "step_time_s": time.time() - run.t_step}
    done = step + 1 == a.max_steps
    if (step + 1) % a.eval_every == 0 or done:
        evaluated = evaluate(step + 1)
        finite_or_stop(step + 1, evaluated)
        last.update(evaluated)
    last["time_s"] = run.elapsed + time.time() - run.t_start
    if done:  # what the run cost: its parameters, tensors and the process's peak memory
        last.update(trainable_params=run.trainable, tensor_memory_mb=tensor_memory_mb(run.models, run.opt),
                    peak_memory_mb=peak_memory_mb(next(run.models[0].parameters()).device))
    run.metrics.log(**last)
    run.bar.set_postfix({k: f"{last[k]:.3f}" for k in ("loss", "reward", "accuracy", "kl") if k in last})
    if (step + 1) % a.ckpt_every == 0 or done:
        # save_meta runs on every rank: it may be a collective, or change the model (rm's bias) on every replica
        extra = save_meta()
        finite_or_stop(step + 1, extra)  # rm's re-centred bias: a number that is also a weight
        meta = {"script": "train_rlhf.py", "kind": a.algo, "task": a.task, "args": vars(a), "step": step + 1,
                "init": str(a.init), "elapsed_s": last["time_s"], **extra, "metrics": last}
        if not distributed.is_main():
            return
        save_checkpoint(run.out, model, run.tokenizer, meta, {"optimizer": run.opt.state_dict(), "rng": rng_state(),
                                                              "step": step + 1, "elapsed": last["time_s"],
                                                              "trainer": save_state()})

