"""Pretrain a base GPT on a built-in task's corpus or on a UTF-8 text file.

The base model learns the domain's text (sums, stories, reviews) but not the chat format: that is what
SFT teaches next (train_sft.py --init OUT).

CPU (a few minutes on 2 cores, ~1M parameters):
    python train_base.py --task arith --out out/base-arith
GPU (GPT-2 small shape, bf16 autocast):
    python train_base.py --task arith --preset gpt2 --device cuda --batch-size 64 --max-steps 5000 --out out/base-gpt2
Resume a killed run:   add --resume (picks up OUT/ckpt: model, optimizer, RNG and step)
Several GPUs (or CPU processes): torchrun --standalone --nproc_per_node N -- train_base.py ... (--batch-size stays
the global batch; minipost/distributed.py)
"""
import argparse
import time
from pathlib import Path

import torch
from tqdm import tqdm

from minipost import distributed
from minipost.checkpoint import load_resumed
from minipost.cli import (UserError, autocast, cosine_lr, pick_device, require_numbers, require_positive, run_main,
                          task_from_flag, writable_dir)
from minipost.data import existing_file
from minipost.engine import generate
from minipost.loop import adamw, decay_groups, end_step, optimizer_step, start_run, training_steps
from minipost.model import GPT, PRESETS, GPTConfig
from minipost.tasks import TASKS
from minipost.tokenizer import train_bpe


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Model
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model shape (model.PRESETS)")
    p.add_argument("--block-size", type=int, default=None, help="context length (default: the preset's)")
    p.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary to train, specials included")
    p.add_argument("--dropout", type=float, default=0.0, help="residual/embedding dropout")
    # Data
    p.add_argument("--task", default="arith", help=f"built-in corpus: {', '.join(TASKS)}")
    p.add_argument("--data", default=None, help="UTF-8 text file instead of --task (documents split on blank lines)")
    p.add_argument("--corpus-docs", type=int, default=40000, help="documents to generate for --task")
    p.add_argument("--val-frac", type=float, default=0.05, help="fraction of documents held out for validation")
    # Optimisation
    p.add_argument("--max-steps", type=int, default=400, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW)")
    p.add_argument("--min-lr", type=float, default=3e-4, help="learning rate at the end of the cosine")
    p.add_argument("--warmup", type=int, default=30, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (matrices only)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the global gradient norm (0: off)")
    p.add_argument("--seed", type=int, default=0, help="seeds init and batch order")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    # Logging
    p.add_argument("--out", default="out/base", help="checkpoint directory (OUT/ckpt) and OUT/metrics.jsonl")
    p.add_argument("--eval-every", type=int, default=100, help="steps between validation runs")
    p.add_argument("--eval-batches", type=int, default=8, help="batches per validation run")
    p.add_argument("--ckpt-every", type=int, default=100, help="steps between checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt if it exists")
    args = p.parse_args(argv)
    require_positive(args, "max_steps", "batch_size", "eval_every", "ckpt_every", "eval_batches", "corpus_docs")
    require_numbers(args, lr="> 0", min_lr=">= 0", weight_decay=">= 0", grad_clip=">= 0", dropout="in [0, 1)",
                    val_frac="in [0, 1)", warmup=">= 0")
    if args.block_size is not None and args.block_size < 2:  # one token to read, one to predict
        raise UserError(f"--block-size must be >= 2 (got {args.block_size})")
    return args


def load_documents(args) -> list[str]:
    if args.data is None:
        return task_from_flag(args.task).corpus(args.corpus_docs, seed=0)  # the corpus is data: fixed seed
    path = existing_file(args.data, "--data")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"--data {path}: not UTF-8 text (byte {e.start})")
    docs = [d.strip() for d in text.split("\n\n") if d.strip()]
    if not docs:
        raise UserError(f"--data {path}: empty file")
    return docs


def token_stream(tokenizer, docs) -> torch.Tensor:
    """Documents -> one long tensor of ids, each document opened by <|endoftext|>."""
    ids = []
    for d in docs:
        ids.append(tokenizer.bos_id)
        ids.extend(tokenizer.encode(d))
    return torch.tensor(ids, dtype=torch.long)


def get_batch(stream, batch_size, block_size, generator):
    """Random windows of the stream -> inputs x (B, T) and next tokens y (B, T)."""
    starts = torch.randint(0, len(stream) - block_size - 1, (batch_size,), generator=generator)
    windows = torch.stack([stream[s:s + block_size + 1] for s in starts.tolist()])  # (B, T+1)
    return windows[:, :-1], windows[:, 1:]


def lm_loss(model, x, y):
    """Mean next-token cross-entropy, x and y (B, T), through the fused log-prob op (no (B*T, V) logits on GPU)."""
    return -model.teacher_forced_logprobs(x, y).mean()


@torch.no_grad()
def evaluate(model, stream, args, block_size, device):
    model.eval()
    gen = torch.Generator().manual_seed(1234)  # the same validation windows at every evaluation
    losses = []
    lo, hi = distributed.share(args.batch_size)
    for _ in range(args.eval_batches):
        x, y = get_batch(stream, args.batch_size, block_size, gen)  # the global batch; this rank scores its share
        with autocast(device):
            part = lm_loss(model, x[lo:hi].to(device), y[lo:hi].to(device)).item() / distributed.world()
        losses.append(distributed.all_sum(part))
    model.train()
    return sum(losses) / len(losses)


def sample_text(model, tokenizer, n_tokens=60, seed=0):
    model.eval()
    with autocast(next(model.parameters()).device):
        g = generate(model, [[tokenizer.bos_id]], n_tokens, eos_id=tokenizer.bos_id, pad_id=tokenizer.pad_id,
                     temperature=0.8, top_k=50, seed=seed)
    model.train()
    return tokenizer.decode(g.completions()[0])


def main(argv=None):
    args = parse_args(argv)
    device = distributed.init(pick_device(args.device))
    distributed.check_divisible(args.batch_size, "--batch-size")
    out = Path(args.out)
    docs = load_documents(args)
    n_val = max(1, int(len(docs) * args.val_frac))
    if len(docs) < 2:
        raise UserError(f"--data {args.data}: need at least 2 documents (separated by blank lines)")

    # Model and tokenizer: fresh, or from OUT/ckpt when resuming
    config = GPTConfig(**PRESETS[args.preset], dropout=args.dropout)
    if args.block_size:
        config.block_size = args.block_size
    try:
        config.check()
    except ValueError as e:
        raise UserError(f"--preset {args.preset} with --block-size {config.block_size}: {e}")
    writable_dir(out)  # before the work
    task = None if args.data else args.task  # what the checkpoint records: a --data base belongs to no task
    ckpt = load_resumed(out, "base", task=task) if args.resume else None
    resuming = ckpt is not None
    if resuming:
        model, tokenizer = ckpt.model, ckpt.tokenizer
        want = {k: v for k, v in config.to_dict().items() if k != "vocab_size"}
        have = {k: v for k, v in ckpt.model.config.to_dict().items() if k != "vocab_size"}
        if want != have:
            diff = ", ".join(f"{k}={have[k]} (flags ask {want[k]})" for k in want if want[k] != have[k])
            raise UserError(f"--resume: checkpoint {ckpt.path} has another shape: {diff}")
    else:
        t0 = time.time()
        try:
            tokenizer = train_bpe(docs, args.vocab_size)
        except ValueError as e:  # too small a vocabulary
            raise UserError(f"--vocab-size: {e}")
        print(f"trained BPE tokenizer: {tokenizer.vocab_size} tokens in {time.time() - t0:.1f}s")
        config.vocab_size = tokenizer.vocab_size
        torch.manual_seed(args.seed)
        model = GPT(config)
    model.to(device).train()
    print(f"model: {model.num_params() / 1e6:.2f}M parameters, {config}")

    train_stream = token_stream(tokenizer, docs[n_val:])
    val_stream = token_stream(tokenizer, docs[:n_val])
    block = config.block_size
    if min(len(train_stream), len(val_stream)) <= block + 1:
        raise UserError(f"not enough text: {len(train_stream)} train / {len(val_stream)} validation tokens for "
                        f"block size {block} (use more documents or --block-size)")
    print(f"data: {len(train_stream):,} train tokens, {len(val_stream):,} validation tokens")

    # AdamW with weight decay on matrices only (not on biases, LayerNorms); no step 0 evaluation, and time_s is
    # the training time before each evaluation
    meta = {"script": "train_base.py", "kind": "base", "task": task, "args": vars(args)}
    run, _ = start_run(args, out, adamw(decay_groups(model.parameters(), args.weight_decay), args.lr), tokenizer,
                       ckpt, [model], meta, desc="base", step_time=False, time_with_eval=False, costs=False,
                       postfix=lambda last: {"loss": f"{last['loss']:.3f}", "lr": f"{last['lr']:.1e}"})
    trained = distributed.wrap(model)  # what the training forward calls: DDP under torchrun

    def evaluate_val(step):
        final["val_loss"] = evaluate(model, val_stream, args, block, device)
        tqdm.write(f"step {step}: train {last['loss']:.3f}  val {final['val_loss']:.3f}  "
                   f"sample: {sample_text(model, tokenizer, seed=step - 1)!r}")
        return {"val_loss": final["val_loss"]}

    final = {}  # the last evaluation, for the closing line
    for step in training_steps(run, None, lambda step: cosine_lr(step, args.max_steps, args.lr, args.min_lr,
                                                                  args.warmup)):
        # the global batch is a function of (seed, step): resuming needs no data-loader state
        x, y = get_batch(train_stream, args.batch_size, block,
                         torch.Generator().manual_seed(args.seed * 1_000_003 + step))
        lo, hi = distributed.share(args.batch_size)  # equal shares: this rank's part of the mean is its mean / W
        with autocast(device):
            part = lm_loss(trained, x[lo:hi].to(device), y[lo:hi].to(device)) / distributed.world()
        loss, grad_norm = optimizer_step(run, step, part, [model])
        last = {"loss": loss, "lr": run.lr, "grad_norm": grad_norm, "tokens": (step + 1) * args.batch_size * block}
        end_step(run, step, last, evaluate_val, model)
    print(f"done: step {args.max_steps}, val loss {final.get('val_loss', float('nan')):.3f}, checkpoint in {out / 'ckpt'}")


if __name__ == "__main__":
    run_main(main)
