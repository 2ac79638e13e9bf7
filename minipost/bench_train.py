"""Training-step benchmark at GPT-2 small's shape: SFT, DPO and GRPO steps, Triton kernels vs the torch path.

    python -m minipost.bench_train [--algos sft dpo grpo] [--kernels triton torch] [--batch 8] [--steps 8]
    python -m minipost.bench_train --cpu-dry-run      # tiny model on the CPU (Triton in its interpreter)

A GPT (12 layers, 12 heads, C = 768, block 1024, vocabulary 50257: GPT-2 small, 124M parameters) with float32
parameters under bf16 autocast, AdamW, random token batches of full length (the steps' cost does not depend on
the token values). One step of each objective, as train_sft.py / train_rlhf.py compute it:
  sft   policy forward+backward on B sequences; the first quarter of each is prompt (not trained)
  dpo   B pairs: a no-grad forward of the frozen reference on both sequences of each pair, then the policy's
        forward+backward on them (2B sequences), dpo_loss on summed response log-probs
  grpo  the update on B sampled sequences (sampling itself is decoding, measured apart: issue 27): no-grad
        forwards of the policy (old log-probs) and the reference, then the policy's forward+backward, grpo_loss
Each (objective, kernel path) runs --warmup steps (compilation, autotuning), then --steps timed ones (CUDA
synchronised). Reported: median seconds per step, tokens/s (sequence tokens through the policy's backward per
second), peak memory allocated during the timed steps, and model FLOPs utilisation (MFU): model FLOPs per step
over the step time and the GPU's dense bf16 peak. Model FLOPs (PaLM's convention, non-causal attention counted
in full): forward 2N + 4 L T C per token, backward twice that, N = parameters without position embeddings
(the tied head counted once, as the LM-head matmul). The peak is looked up from the GPU's name (H100 SXM and
H200: 989 TFLOP/s, H100 NVL: 835, H100 PCIe: 756) or given by --peak-tflops; "-" where unknown.
MINIPOST_KERNELS is set per run (read per call by minipost.kernels).
"""
import argparse
import os
import statistics
import sys
import time

import torch

from . import kernels  # noqa: F401  (the dispatch these steps go through)
from .losses import dpo_loss, grpo_loss, sft_loss
from .model import GPT, GPTConfig

PEAK_BF16_TFLOPS = [("H200", 989.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0)]  # dense


def peak_tflops(name):
    """Dense bf16 tensor-core peak of a GPU by its name, or None."""
    for key, peak in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return peak
    return None


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m minipost.bench_train", description=__doc__.split("\n\n")[0])
    p.add_argument("--algos", nargs="+", choices=["sft", "dpo", "grpo"], default=["sft", "dpo", "grpo"])
    p.add_argument("--kernels", nargs="+", choices=["triton", "torch"], default=["triton", "torch"])
    p.add_argument("--batch", type=int, default=8, help="sequences per step (pairs for dpo)")
    p.add_argument("--seq", type=int, default=1024, help="tokens per sequence")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, for MFU")
    p.add_argument("--cpu-dry-run", action="store_true", help="tiny model, CPU, Triton interpreter: checks that "
                   "every step runs, measures nothing")
    args = p.parse_args(argv)
    if min(args.batch, args.seq, args.steps) < 1 or args.warmup < 0:
        p.error("--batch, --seq and --steps must be >= 1, --warmup >= 0")
    return args


def model_config(args):
    if args.cpu_dry_run:
        return GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=args.seq, vocab_size=96)
    return GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=args.seq, vocab_size=50257)


def flops_per_token(model):
    """Forward model FLOPs per token: 2N + 4 L T C (see the module docstring)."""
    c = model.config
    n = model.num_params() - (model.transformer.wpe.weight.numel() if c.pos == "learned" else 0)
    return 2 * n + 4 * c.n_layer * c.block_size * c.n_embd


class Step:
    """One objective's training step on fixed random batches -> (loss, forward tokens, backward tokens)."""

    def __init__(self, algo, model, ref, args, device):
        g = torch.Generator().manual_seed(0)
        V, B, T = model.config.vocab_size, args.batch, args.seq
        rows = 2 * B if algo == "dpo" else B
        self.algo, self.model, self.ref = algo, model, ref
        seqs = torch.randint(0, V, (rows, T + 1), generator=g)  # (rows, T + 1)
        self.inputs, self.targets = seqs[:, :-1].to(device), seqs[:, 1:].to(device)  # (rows, T) each
        self.mask = torch.ones(rows, T, device=device)
        self.mask[:, : T // 4] = 0  # a prompt: not trained
        self.targets = self.targets.masked_fill(self.mask == 0, -1)
        self.advantages = torch.randn(rows, generator=g).to(device)  # (rows,) one per sampled sequence

    def __call__(self):
        m = self.model
        rows, T = self.inputs.shape
        if self.algo == "sft":
            loss = sft_loss(m.teacher_forced_logprobs(self.inputs, self.targets), self.mask)
            return loss, rows * T, rows * T
        with torch.no_grad():
            ref_logp = self.ref.teacher_forced_logprobs(self.inputs, self.targets)  # (rows, T)
            old_logp = m.teacher_forced_logprobs(self.inputs, self.targets) if self.algo == "grpo" else None
        logp = m.teacher_forced_logprobs(self.inputs, self.targets)  # (rows, T)
        if self.algo == "dpo":
            sums, ref_sums = (logp * self.mask).sum(dim=1), (ref_logp * self.mask).sum(dim=1)  # (2B,)
            loss, _ = dpo_loss(sums[0::2], sums[1::2], ref_sums[0::2], ref_sums[1::2])
            return loss, 2 * rows * T, rows * T
        loss = grpo_loss(logp, old_logp, ref_logp, self.advantages, self.mask, kl_coef=0.04)
        return loss, 3 * rows * T, rows * T


def run_one(algo, path, args, device):
    """-> dict of the measurements of one (objective, kernel path), under MINIPOST_KERNELS=path."""
    before = os.environ.get("MINIPOST_KERNELS")
    os.environ["MINIPOST_KERNELS"] = path
    try:
        return _measure(algo, args, device)
    finally:  # the caller's setting comes back (tests call main in their own process)
        if before is None:
            os.environ.pop("MINIPOST_KERNELS", None)
        else:
            os.environ["MINIPOST_KERNELS"] = before


def _measure(algo, args, device):
    torch.manual_seed(0)
    model = GPT(model_config(args)).to(device)
    ref = GPT(model_config(args)).to(device).requires_grad_(False)
    ref.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device == "cuda")
    step = Step(algo, model, ref, args, device)
    cuda = device == "cuda"
    times = []
    for i in range(args.warmup + args.steps):
        if i == args.warmup and cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16):
            loss, fwd_tokens, bwd_tokens = step()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    if not torch.isfinite(loss):
        raise RuntimeError(f"{algo} / {path}: loss {loss.item()}")
    sec = statistics.median(times)
    flops = flops_per_token(model) * (fwd_tokens + 2 * bwd_tokens)  # backward: twice the forward
    out = dict(algo=algo, path=os.environ["MINIPOST_KERNELS"], sec=sec, tok_s=bwd_tokens / sec,
               tflops=flops / sec / 1e12,
               mem_gb=torch.cuda.max_memory_allocated() / 2**30 if cuda else None, loss=loss.item())
    del model, ref, opt, step
    if cuda:
        torch.cuda.empty_cache()
    return out


def main(argv=None):
    args = parse_args(argv)
    if args.cpu_dry_run:
        args.seq, args.batch, args.steps, args.warmup = min(args.seq, 32), min(args.batch, 2), 1, 1
        device = "cpu"
        if "triton" in args.kernels and os.environ.get("TRITON_INTERPRET") != "1":
            print("error: --cpu-dry-run with the triton path needs TRITON_INTERPRET=1 in the environment",
                  file=sys.stderr)
            return 2
        name = "CPU (dry run: tiny model, nothing measured)"
    elif not torch.cuda.is_available():
        print("error: no GPU found (use --cpu-dry-run to check that the steps run)", file=sys.stderr)
        return 2
    else:
        device, name = "cuda", torch.cuda.get_device_name()
    peak = args.peak_tflops or (peak_tflops(name) if device == "cuda" else None)
    c = model_config(args)
    print(f"device: {name}; torch {torch.__version__}; GPT {c.n_layer} x {c.n_embd}, vocabulary {c.vocab_size}, "
          f"{args.batch} x {args.seq} tokens a step, bf16 autocast; {args.warmup} warm-up + {args.steps} timed steps; "
          f"MFU against {f'{peak:.0f} TFLOP/s dense bf16' if peak else 'an unknown peak (-)'}", flush=True)
    rows = []
    for algo in args.algos:
        for path in args.kernels:
            try:
                r = run_one(algo, path, args, device)
            except Exception as e:  # one failing run must not hide the others' numbers
                print(f"FAILED: {algo} / {path}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                r = dict(algo=algo, path=path)
            rows.append(r)
            print(_row(r, peak), flush=True)
    print("\n| step | kernels | s/step (median) | tokens/s | model TFLOP/s | MFU | peak memory GB |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(_row(r, peak))
    return 0 if all("sec" in r for r in rows) else 1


def _row(r, peak):
    if "sec" not in r:
        return f"| {r['algo']} | {r['path']} | failed | - | - | - | - |"
    mfu = f"{100 * r['tflops'] / peak:.0f}%" if peak else "-"
    mem = f"{r['mem_gb']:.1f}" if r["mem_gb"] is not None else "-"
    return (f"| {r['algo']} | {r['path']} | {r['sec']:.3f} | {r['tok_s']:,.0f} | {r['tflops']:.0f} | {mfu} "
            f"| {mem} |")


if __name__ == "__main__":
    sys.exit(main())
