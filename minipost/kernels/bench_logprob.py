"""Benchmark of the fused token log-prob op on the path training takes, against the library paths.

    python -m minipost.kernels.bench_logprob [--n 4096 16384] [--c 768 2048] [--v 2048 50257] [--dtype autocast]
                                    [--methods minipost torch compile liger] [--quick] [--cells NxCxV ...]

On CUDA, for every (N, C, V) cell and method, the SFT objective -mean(logp) over the kept tokens (a prompt-like
first quarter of the targets is ignored, -100), forward and backward:
  minipost  kernels.token_logprobs: the fused Triton forward, the chunked backward; no (N, V) tensor
  torch     unfused PyTorch: matmul -> float32 log_softmax -> gather (what a plain LM loss does)
  compile   torch.compile of the same function
  liger     Liger-Kernel's fused linear cross-entropy, when liger_kernel is installed ("n/a" otherwise)
--dtype autocast (the default) is the production path: hidden states and LM head are float32 tensors (what
ln_f and the parameter are) and everything runs under torch.autocast(bf16). bf16 / fp16 / fp32 pass tensors of
that dtype without autocast. Reported: median times (triton.testing.do_bench) of forward and forward+backward,
and their difference as the backward (fwd_bwd_times: no retained graph, which torch.compile's backward refuses);
TFLOP/s counting only kept tokens (forward 2 n C V, backward 4 n C V: the useful matmuls, not the kernel's
recomputation); peak memory of one forward+backward above the inputs; and the errors of logp, dhidden and
dweight against a float32 torch run on the same (rounded) inputs, relative to their largest value.
A cell that runs out of memory prints "OOM", one that raises "error"; either makes the exit status 1 (liger
not installed does not). The header names how the backward accumulates (logprob.accumulation_path). A
markdown table is printed last. It first runs the small correctness comparison below, on the GPU.

Without CUDA it says so and runs only that correctness comparison (against float64 runs of the torch
reference) in Triton's interpreter on CPU tensors.
"""
import argparse
import gc
import os
import sys

import torch

GRID = dict(n=[4096, 16384], c=[768, 2048], v=[2048, 50257])  # 50257: GPT-2's vocabulary, an odd size
DTYPES = {"autocast": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
IGNORE = -100  # the ignore index every method understands


def unfused_token_logprobs(hidden, weight, targets, temperature=1.0):
    """The plain PyTorch path: (N, V) logits in the input dtype, then float32 log_softmax and gather."""
    logits = (hidden @ weight.T).float() / temperature  # (N, V)
    logp = torch.log_softmax(logits, dim=-1).gather(1, targets.clamp(min=0).unsqueeze(1)).squeeze(1)  # (N,)
    return logp.masked_fill(targets < 0, 0.0)


def correctness(device):
    """Max errors of the Triton kernel vs a float64 run of the torch reference, at small shapes."""
    from minipost.kernels.logprob import triton_token_logprobs
    from minipost.kernels.reference import token_logprobs_reference

    rows = []
    for N, V, C, dtype in [(7, 37, 48, torch.float32), (129, 1000, 16, torch.float32), (64, 300, 48, torch.bfloat16),
                           (64, 300, 48, torch.float16)]:
        g = torch.Generator().manual_seed(N * V + C)
        hidden = torch.randn(N, C, generator=g).to(device, dtype)  # (N, C)
        weight = (torch.randn(V, C, generator=g) * 2 / C**0.5).to(device, dtype)  # (V, C)
        targets = torch.randint(0, V, (N,), generator=g).to(device)  # (N,)
        targets[1::3] = -1
        g_logp, g_ent = torch.randn(2, N, generator=g).to(device)
        results = []
        for fn, dt in ((triton_token_logprobs, dtype), (token_logprobs_reference, torch.float64)):
            h = hidden.detach().to(dt).requires_grad_()
            w = weight.detach().to(dt).requires_grad_()
            logp, ent = fn(h, w, targets, 0.8, True)
            (logp * g_logp.to(logp.dtype) + ent * g_ent.to(ent.dtype)).sum().backward()
            results.append((logp, ent, h.grad, w.grad))
        errs = [((a.double() - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()
                for a, b in zip(*results)]
        max_logp = results[0][0][targets >= 0].max().item()
        rows.append((N, V, C, str(dtype).replace("torch.", ""), *errs, max_logp))
    print("\n| N | V | C | dtype | logp | entropy | dhidden | dweight | max logp |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print("| %d | %d | %d | %s | %.1e | %.1e | %.1e | %.1e | %.2g |" % r)
    print("(errors: max |triton - float64 reference| / max |reference|; max logp must be <= 0)")
    return rows


def _free():
    gc.collect()
    torch.cuda.empty_cache()


def _methods():
    """name -> fn(hidden, weight, targets) -> SFT loss, or None where the method is not installed."""
    from minipost import kernels

    def minipost(hidden, weight, targets):
        keep = targets >= 0
        return -(kernels.token_logprobs(hidden, weight, targets) * keep).sum() / keep.sum()

    def torch_loss(hidden, weight, targets):
        return -(unfused_token_logprobs(hidden, weight, targets) * (targets >= 0)).sum() / (targets >= 0).sum()

    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger_fn = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE)
        liger = lambda hidden, weight, targets: liger_fn(weight, hidden, targets)  # noqa: E731
    except ImportError:
        liger = None
    return dict(minipost=minipost, torch=torch_loss, compile=torch.compile(torch_loss, dynamic=False), liger=liger)


def _reference(hidden, weight, targets):
    """dhidden, dweight of the SFT loss in float32 torch, from the inputs as the methods round them."""
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    dtype = torch.bfloat16 if hidden.dtype == torch.float32 and torch.is_autocast_enabled("cuda") else hidden.dtype
    with torch.autocast("cuda", enabled=False):
        logits = h.to(dtype).float() @ w.to(dtype).float().T  # (N, V) float32 from the rounded inputs
        logp = torch.log_softmax(logits, dim=-1).gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
        keep = targets >= 0
        (-(logp * keep).sum() / keep.sum()).backward()
    return h.grad, w.grad


def fwd_bwd_times(fn, hidden, weight, targets, timer):
    """(forward, backward, both) times of loss = fn(hidden, weight, targets) by timer(callable) -> ms.

    The backward is timed as (forward + backward) - forward, each graph built and consumed once as in training,
    not as loss.backward(retain_graph=True) over one graph: torch.compile's backward reuses ("donates") the
    buffers of the tensors saved for it and refuses a retained graph (issue 26; it also keeps every saved
    tensor alive, which no training step does). Same for every method, so the columns stay comparable."""
    t_fwd = timer(lambda: fn(hidden, weight, targets))
    t_all = timer(lambda: fn(hidden, weight, targets).backward())
    return t_fwd, t_all - t_fwd, t_all


def bench_cell(method, fn, N, C, V, args):
    """Times, peak memory and errors of one method at one size -> dict (missing values where it failed)."""
    import triton.testing

    device, dtype = "cuda", DTYPES[args.dtype]
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(N, C, device=device, generator=g).to(dtype).requires_grad_()  # (N, C): ln_f output
    weight = (torch.randn(V, C, device=device, generator=g) / C**0.5).to(dtype).requires_grad_()  # (V, C)
    targets = torch.randint(0, V, (N,), device=device, generator=g)  # (N,)
    targets[: N // 4] = IGNORE  # a prompt-like ignored prefix: not counted in the flops
    out = dict(method=method, N=N, C=C, V=V, kept=int((targets >= 0).sum()))
    bench = dict(warmup=args.warmup, rep=args.rep, return_mode="median")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.dtype == "autocast")
    try:
        with autocast:
            want = _reference(hidden, weight, targets) if args.check else None
            hidden.grad = weight.grad = None
            _free()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            loss = fn(hidden, weight, targets)
            loss.backward()
            torch.cuda.synchronize()
            out["mem_gb"] = (torch.cuda.max_memory_allocated() - base) / 2**30
            if want is not None:
                out["err_dh"], out["err_dw"] = [((a.float() - b).abs().max() / b.abs().max()).item()
                                                for a, b in zip((hidden.grad, weight.grad), want)]
            del loss, want
            hidden.grad = weight.grad = None
            timer = lambda f: triton.testing.do_bench(f, grad_to_none=[hidden, weight], **bench)  # noqa: E731
            out["fwd"], out["bwd"], out["fwd+bwd"] = fwd_bwd_times(fn, hidden, weight, targets, timer)
    except torch.cuda.OutOfMemoryError:
        out["oom"] = True
    except Exception as e:  # e.g. torch.compile or liger failing: report it, keep the other cells
        out["error"] = True
        print(f"{method} N={N} C={C} V={V}: {type(e).__name__}: {str(e)[:200]}", flush=True)
    hidden.grad = weight.grad = None
    _free()
    return out


def _missing(cell):
    return "OOM" if cell.get("oom") else "error" if cell.get("error") else "n/a" if cell.get("absent") else "-"


def _fmt(cell, key, pattern="%.3f"):
    return pattern % cell[key] if key in cell else _missing(cell)


def _fmt_tflops(cell, key, flops):
    return "%.0f" % (flops / (cell[key] * 1e-3) / 1e12) if key in cell else _missing(cell)


def bench(args):
    import torch._dynamo
    import triton

    from minipost.kernels.logprob import accumulation_path

    for name in ("recompile_limit", "cache_size_limit"):  # one compiled graph per cell, never an eager fallback
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 256)
    methods = _methods()
    name = torch.cuda.get_device_name()
    print(f"device: {name}; torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}; "
          f"--dtype {args.dtype}; median of do_bench(warmup={args.warmup} ms, rep={args.rep} ms)")
    compute = torch.bfloat16 if args.dtype == "autocast" else DTYPES[args.dtype]
    print(f"minipost's backward accumulates dh and dW by {accumulation_path(compute)}")
    print("command: python -m minipost.kernels.bench_logprob " + " ".join(sys.argv[1:]))
    cells = []
    for N, C, V in args.cells:
        for method in args.methods:
            if methods[method] is None:
                cells.append(dict(method=method, N=N, C=C, V=V, kept=0, absent=True))
                print(f"{method}: not installed (pip install liger-kernel)")
                continue
            cells.append(bench_cell(method, methods[method], N, C, V, args))
            print(_row(cells[-1]), flush=True)
    print(f"\n### token log-prob (SFT loss), --dtype {args.dtype}, {name}\n")
    print("| N | C | V | method | fwd ms | fwd TFLOP/s | bwd ms | bwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s "
          "| peak mem GB | err dhidden | err dweight |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for cell in cells:
        print(_row(cell))
    print("\nTFLOP/s count kept tokens n only: 2nCV forward, 4nCV backward, 6nCV both. Peak memory is above the "
          "inputs. Errors: max |grad - float32 torch on the same rounded inputs| / max |that grad|.")
    failed = sorted({c["method"] for c in cells if c.get("error") or c.get("oom")})
    if failed:
        print(f"FAILED: {', '.join(failed)} (see above)")
    return 1 if failed else 0


def _row(cell):
    ncv = cell["kept"] * cell["C"] * cell["V"]
    return (f"| {cell['N']} | {cell['C']} | {cell['V']} | {cell['method']} | {_fmt(cell, 'fwd')} | "
            f"{_fmt_tflops(cell, 'fwd', 2 * ncv)} | {_fmt(cell, 'bwd')} | {_fmt_tflops(cell, 'bwd', 4 * ncv)} | "
            f"{_fmt(cell, 'fwd+bwd')} | {_fmt_tflops(cell, 'fwd+bwd', 6 * ncv)} | {_fmt(cell, 'mem_gb', '%.2f')} | "
            f"{_fmt(cell, 'err_dh', '%.1e')} | {_fmt(cell, 'err_dw', '%.1e')} |")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python -m minipost.kernels.bench_logprob")
    p.add_argument("--n", type=int, nargs="+", default=GRID["n"], help="tokens N")
    p.add_argument("--c", type=int, nargs="+", default=GRID["c"], help="hidden size C")
    p.add_argument("--v", type=int, nargs="+", default=GRID["v"], help="vocabulary size V")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="autocast", help="autocast (the production "
                   "path: float32 tensors under bf16 autocast), or tensors of that dtype without autocast")
    p.add_argument("--methods", nargs="+", choices=["minipost", "torch", "compile", "liger"],
                   default=["minipost", "torch", "compile", "liger"])
    p.add_argument("--no-check", dest="check", action="store_false", help="skip the gradient check (it holds "
                   "float32 (N, V) logits: large cells may not fit)")
    p.add_argument("--quick", action="store_true", help="two cells: (N, C, V) = (16384, 768, 50257), (8192, 2048, 2048)")
    p.add_argument("--cells", nargs="+", metavar="NxCxV", help="exact cells instead of the --n x --c x --v grid, "
                   "e.g. 16384x768x50257 8192x2048x128256")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms")
    args = p.parse_args(argv)
    if args.cells:
        try:
            args.cells = [tuple(int(x) for x in cell.lower().split("x")) for cell in args.cells]
        except ValueError:
            args.cells = [()]
        if any(len(c) != 3 or min(c) < 1 for c in args.cells):
            p.error("--cells: each cell is NxCxV with positive integers, e.g. 16384x768x50257")
    elif args.quick:  # the two cells minipost/kernels/logprob.py's cost model predicts
        args.cells = [(16384, 768, 50257), (8192, 2048, 2048)]
    else:
        args.cells = [(n, c, v) for n in args.n for c in args.c for v in args.v]
    return args


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("no GPU found: running correctness check in the Triton interpreter only")
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            print("warning: triton was imported before TRITON_INTERPRET=1 could be set; the check may fail")
        os.environ["TRITON_INTERPRET"] = "1"  # before kernels.logprob imports triton
        correctness("cpu")
        return 0
    print("correctness on the GPU (small shapes) before timing:")
    correctness("cuda")
    return bench(args)


if __name__ == "__main__":
    sys.exit(main())
