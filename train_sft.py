"""Supervised fine-tuning (SFT) or Dynamic Fine-Tuning (DFT) of a base model on demonstrations.

Loss only on assistant tokens and their <|end|>; the denominator is the token count of the whole global
batch, also under gradient accumulation (minipost/losses.py). Evaluates validation loss and, for tasks with
a verifier, greedy accuracy on the test and out-of-distribution splits.

CPU (a few minutes on 2 cores):
    python train_sft.py --init out/base-arith --task arith --out out/sft-arith
    python train_sft.py --init out/base-arith --task arith --loss dft --out out/dft-arith
GPU:
    python train_sft.py --init out/base-gpt2 --task arith --device cuda --batch-size 64 --out out/sft-gpt2
Chats of 1, 2, 3 demonstrations instead of one each (every answer trained; the model then also answers after
earlier turns, as few-shot and retrieval prompts ask): --turns 3, with half the --batch-size for as many
demonstrations a step.
Own data (JSONL with `messages`, `prompt`+`completion` or `text`):
    python train_sft.py --init out/base-arith --data demos.jsonl --out out/sft-mine
Several GPUs (or CPU processes), the same global batch split over them (minipost/distributed.py):
    torchrun --standalone --nproc_per_node 4 -- train_sft.py --init out/base-gpt2 --task arith --device cuda \
        --batch-size 64 --out out/sft-gpt2
"""
import argparse
from pathlib import Path

import torch
from tqdm import tqdm

from minipost import distributed, losses
from minipost.adapters import adapt, add_adapter_flags, check_adapter_flags, has_adapters, merge_adapters
from minipost.checkpoint import load_checkpoint, load_resumed
from minipost.cli import (UserError, autocast, cosine_lr, pick_device, require_numbers, require_positive, run_main,
                          task_from_flag, writable_dir)
from minipost.data import collate, encode_conversations, epoch_indices, multi_turn, read_jsonl
from minipost.evaluate import evaluate_policy
from minipost.loop import adamw, apply_gradients, decay_groups, end_step, start_run, training_steps
from minipost.tasks import TASKS

LOSSES = {"sft": losses.sft_loss, "dft": losses.dft_loss}
DEFAULT_N_TRAIN = 4000  # task demonstrations when --n-train is not given


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Model
    p.add_argument("--init", required=True, help="checkpoint directory to start from (a base model)")
    add_adapter_flags(p)
    # Data
    p.add_argument("--task", default="arith", help=f"built-in task: {', '.join(TASKS)}")
    p.add_argument("--allow-other-task", action="store_true", help="accept an --init trained on another task "
                   "than --task (refused by default)")
    p.add_argument("--data", default=None, help="JSONL demonstrations instead of the task's (messages, "
                   "prompt+completion or text); the task still provides evaluation")
    p.add_argument("--n-train", type=int, default=None, help="demonstrations to train on: the task's first N "
                   f"(default {DEFAULT_N_TRAIN}), or the first N rows of --data (default: every row)")
    p.add_argument("--turns", type=int, default=1, help="join consecutive demonstrations into chats of 1, 2, ..., "
                   "N questions and answers (every answer trained): teaches the format late in the context and "
                   "after earlier turns, as few-shot and retrieval prompts need (minipost.data.multi_turn)")
    p.add_argument("--n-eval", type=int, default=200, help="prompts per evaluation split")
    p.add_argument("--max-new-tokens", type=int, default=64, help="generation budget when evaluating")
    # Optimisation
    p.add_argument("--loss", default="sft", choices=sorted(LOSSES), help="sft: cross-entropy; dft: "
                   "probability-weighted cross-entropy (Wu et al. 2025)")
    p.add_argument("--max-steps", type=int, default=400, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per optimizer step (global batch: under "
                   "torchrun each rank takes an equal share)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step and rank (must divide the "
                   "rank's share of --batch-size)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (AdamW)")
    p.add_argument("--min-lr", type=float, default=2e-4, help="learning rate at the end of the cosine")
    p.add_argument("--warmup", type=int, default=20, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (matrices only)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the global gradient norm (0: off)")
    p.add_argument("--seed", type=int, default=0, help="seeds the batch order and sampling")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    # Logging
    p.add_argument("--out", default="out/sft", help="checkpoint directory (OUT/ckpt) and OUT/metrics.jsonl")
    p.add_argument("--eval-every", type=int, default=100, help="steps between evaluations")
    p.add_argument("--ckpt-every", type=int, default=100, help="steps between checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt if it exists")
    args = p.parse_args(argv)
    require_positive(args, "max_steps", "batch_size", "grad_accum", "eval_every", "ckpt_every", "n_train", "n_eval",
                     "max_new_tokens", "turns")
    require_numbers(args, lr="> 0", min_lr=">= 0", weight_decay=">= 0", grad_clip=">= 0", warmup=">= 0")
    check_adapter_flags(args)
    if args.batch_size % args.grad_accum:
        raise UserError(f"--batch-size {args.batch_size} is not divisible by --grad-accum {args.grad_accum}")
    return args


def training_rows(args, task) -> tuple[list[dict], list[str] | None]:
    """The demonstrations to train on and where each comes from (file:line, None for the task's): the task's
    first --n-train train demos, or the first --n-train rows of --data (all of them by default), so that two
    runs on one file can train on nested prefixes of it."""
    if not args.data:
        return task.demos("train", args.n_train or DEFAULT_N_TRAIN, seed=0), None
    rows, _, where = read_jsonl(args.data, expect=("messages", "prompt_completion", "text"))
    if args.n_train is not None:
        print(f"data: the first {min(args.n_train, len(rows))} of {len(rows)} rows of {args.data} (--n-train "
              f"{args.n_train})")
        rows, where = rows[:args.n_train], where[:args.n_train]
    return rows, where


def micro_batches(examples, indices, grad_accum, pad_id, device):
    """Split a step's examples into micro-batches of (inputs, targets, mask) shifted for next-token loss."""
    size = len(indices) // grad_accum
    out = []
    for m in range(grad_accum):
        ids, mask = collate([examples[i] for i in indices[m * size:(m + 1) * size]], pad_id, device)
        out.append((ids[:, :-1], ids[:, 1:], mask[:, 1:]))  # mask marks the token being predicted
    return out


def masked_logprobs(model, inputs, targets, mask):
    """logp (B, T) of targets, 0 off the mask: masked-out targets are passed as -1 so the kernel skips them."""
    return model.teacher_forced_logprobs(inputs, targets.masked_fill(mask == 0, -1))


@torch.no_grad()
def validation_loss(model, examples, pad_id, device, batch_size=64):
    """Plain cross-entropy (nats per trained token) over the validation demonstrations (under torchrun each
    rank scores its share and the sums are added up)."""
    model.eval()
    lo, hi = distributed.share(len(examples))
    examples = examples[lo:hi]
    total, count = 0.0, 0.0
    for start in range(0, len(examples), batch_size):
        ids, mask = collate(examples[start:start + batch_size], pad_id, device)
        with autocast(device):
            logp = masked_logprobs(model, ids[:, :-1], ids[:, 1:], mask[:, 1:])
        total += -(logp * mask[:, 1:]).sum().item()
        count += mask[:, 1:].sum().item()
    model.train()
    total, count = distributed.all_sum([total, count])
    return total / count


def main(argv=None):
    args = parse_args(argv)
    device = distributed.init(pick_device(args.device))
    distributed.check_divisible(args.batch_size, "--batch-size", per=args.grad_accum)
    out = Path(args.out)
    task = task_from_flag(args.task)

    task_check = None if args.allow_other_task else task.name
    resumed = load_resumed(out, args.loss, task=task.name) if args.resume else None
    resuming = resumed is not None
    ckpt = resumed or load_checkpoint(args.init, flag="--init", task=task_check)
    if ckpt.is_reward_model:  # its scalar head would ride along into a checkpoint labelled as a policy
        raise UserError(f"--init {args.init} is a reward model (kind 'rm'); SFT starts from a base or a policy "
                        "checkpoint")
    if resuming and has_adapters(ckpt.model) != bool(args.lora_r or args.prompt_tuning):
        raise UserError(f"--resume: {ckpt.path} was trained {'with' if has_adapters(ckpt.model) else 'without'} "
                        "adapters; pass the same --lora-r / --prompt-tuning as the first run")
    # an adapter checkpoint as --init is merged into plain weights first; new adapters (if asked) go on top
    model = adapt((ckpt.model if resuming else merge_adapters(ckpt.model)).to(device), args, args.init, args.seed)
    tokenizer = ckpt.tokenizer
    block = model.config.block_size - model.n_prefix  # prompt tuning's virtual tokens take context too
    writable_dir(out)  # before the work

    # Data: demonstrations -> (ids, mask) with mask 1 on assistant tokens and their <|end|>
    rows, where = training_rows(args, task)
    rows, where = multi_turn(rows, args.turns, where)
    train, dropped = encode_conversations(tokenizer, rows, block, where)
    if not train:
        raise UserError(f"{args.data or args.task}: every demonstration is longer than the context ({block})")
    val, _ = encode_conversations(tokenizer, task.demos("test", args.n_eval, seed=0), block)
    eval_splits = {s: task.prompts(s, args.n_eval, seed=0) for s in task.splits if s != "train"}
    print(f"data: {len(train)} {'chats' if args.turns > 1 else 'demonstrations'} ({dropped} dropped as longer than "
          f"{block} tokens), "
          f"{sum(sum(m) for _, m in train):,} trained tokens; evaluating on {', '.join(eval_splits)}")

    trainable = [p for p in model.parameters() if p.requires_grad]  # the adapters only, with --lora-r / --prompt-tuning
    print(f"trainable parameters: {sum(p.numel() for p in trainable):,} of {model.num_params():,}")
    opt = adamw(decay_groups(trainable, args.weight_decay), args.lr)
    meta = {"script": "train_sft.py", "kind": args.loss, "task": args.task, "args": vars(args), "init": str(args.init)}
    run, _ = start_run(args, out, opt, tokenizer, resumed, [model], meta, desc=args.loss, time_with_eval=False,
                       postfix=lambda last: {"loss": f"{last['loss']:.3f}", "ce": f"{last['ce']:.3f}"})
    loss_fn = LOSSES[args.loss]
    trained = distributed.wrap(model)  # what the training forward calls: DDP under torchrun

    def evaluate(step):
        with autocast(device):  # scored under the same autocast as the training forward
            result = {"val_loss": validation_loss(model, val, tokenizer.pad_id, device)}
            for split, prompts in eval_splits.items():
                r = evaluate_policy(model, tokenizer, task, prompts, args.max_new_tokens, task.eval_temperature)
                result[f"{split}_reward"], result[f"{split}_format"] = r["reward"], r["format"]
        tqdm.write(f"step {step}: " + "  ".join(f"{k} {v:.3f}" for k, v in result.items()))
        return result

    model.train()
    for step in training_steps(run, evaluate, lambda step: cosine_lr(step, args.max_steps, args.lr, args.min_lr,
                                                                      args.warmup)):
        # the global batch, the same on every rank; this rank trains on its share of it
        indices = epoch_indices(step, args.batch_size, len(train), args.seed)
        lo, hi = distributed.share(len(indices))
        batches = micro_batches(train, indices[lo:hi], args.grad_accum, tokenizer.pad_id, device)
        # the denominator is the global batch's trained-token count, across micro-batches and ranks: each
        # micro-batch loss is then its part of the global loss, and the parts add up to it
        n_tokens = distributed.all_sum(sum(m.sum() for _, _, m in batches))
        loss_sum, ce_sum, p_sum = 0.0, 0.0, 0.0
        for m, (inputs, targets, mask) in enumerate(batches):
            with distributed.accumulating(trained, last=m == len(batches) - 1):
                with autocast(device):
                    logp = masked_logprobs(trained, inputs, targets, mask)
                loss = loss_fn(logp, mask, n_tokens)
                distributed.backward(loss)
            loss_sum += loss.item()
            ce_sum += losses.sft_loss(logp.detach(), mask, n_tokens).item()  # plain CE, logged beside DFT
            p_sum += (logp.detach().exp() * mask).sum().item() / n_tokens.item()  # what DFT maximises
        loss_sum, ce_sum, p_sum = distributed.all_sum([loss_sum, ce_sum, p_sum])
        loss_sum, grad_norm = apply_gradients(run, step, loss_sum, [model])
        logs = {"loss": loss_sum, "ce": ce_sum, "p_mean": p_sum, "lr": run.lr, "grad_norm": grad_norm,
                "tokens": int(n_tokens)}
        end_step(run, step, logs, evaluate, model)  # the loss parts, DFT's p_mean, the evaluation: checked
    print(f"done: checkpoint in {out / 'ckpt'}")


if __name__ == "__main__":
    run_main(main)
