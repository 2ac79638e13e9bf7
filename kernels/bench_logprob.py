"""Benchmark of the fused token log-prob kernel (kernels/logprob.py) against the library paths.

    python -m kernels.bench_logprob [--n 4096 16384] [--c 768 4096] [--v 50257 131072] [--dtype bf16]
                                    [--methods triton torch compile] [--quick]

On CUDA, for every (N, C, V) cell and method:
  triton   the fused kernel: no (N, V) tensor
  torch    unfused PyTorch: 16-bit matmul -> float32 log_softmax -> gather (what a plain LM loss does)
  compile  torch.compile of the same function
it reports the median time (triton.testing.do_bench) of forward, backward and forward+backward, effective
TFLOP/s (forward 2*N*C*V, backward 4*N*C*V, both 6*N*C*V: the three matmuls; the kernel's recomputation of
the logits is not counted) and peak memory of one forward+backward above what was allocated before it
(torch.cuda.max_memory_allocated delta). A cell that runs out of memory prints "OOM". A markdown table is
printed last. It first runs the small correctness comparison below, on the GPU.

Without CUDA it says so and runs only that correctness comparison (against float64 runs of the torch
reference) in Triton's interpreter on CPU tensors.
"""
import argparse
import gc
import os
import sys

import torch

GRID = dict(n=[4096, 16384], c=[768, 4096], v=[50257, 131072])  # 50257: GPT-2's vocabulary, an odd size
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def unfused_token_logprobs(hidden, weight, targets, temperature=1.0):
    """The plain PyTorch path: (N, V) logits in the input dtype, then float32 log_softmax and gather."""
    logits = (hidden @ weight.T).float() / temperature  # (N, V)
    logp = torch.log_softmax(logits, dim=-1).gather(1, targets.clamp(min=0).unsqueeze(1)).squeeze(1)  # (N,)
    return logp.masked_fill(targets < 0, 0.0)


def correctness(device):
    """Max errors of the Triton kernel vs a float64 run of the torch reference, at small shapes."""
    from kernels.logprob import triton_token_logprobs
    from kernels.reference import token_logprobs_reference

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


def bench_cell(method, fn, N, C, V, dtype, args):
    """Times and peak memory of one method at one size -> dict (values None where it ran out of memory)."""
    import triton.testing

    device = "cuda"
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(N, C, device=device, dtype=dtype, generator=g).requires_grad_()  # (N, C)
    weight = (torch.randn(V, C, device=device, generator=g) / C**0.5).to(dtype).requires_grad_()  # (V, C)
    targets = torch.randint(0, V, (N,), device=device, generator=g)  # (N,)
    targets[: N // 8] = -1  # a prompt-like ignored prefix
    upstream = torch.randn(N, device=device, generator=g)  # dL/dlogp
    out = dict(method=method, N=N, C=C, V=V)
    bench = dict(warmup=args.warmup, rep=args.rep, return_mode="median")
    try:
        # peak memory of one forward+backward, above the inputs already allocated
        hidden.grad = weight.grad = None
        _free()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        logp = fn(hidden, weight, targets)
        logp.backward(upstream)
        torch.cuda.synchronize()
        out["mem_gb"] = (torch.cuda.max_memory_allocated() - base) / 2**30
        out["logp"] = logp.detach()[targets >= 0]
        del logp
        grads = [hidden, weight]
        out["fwd"] = triton.testing.do_bench(lambda: fn(hidden, weight, targets), **bench)
        logp = fn(hidden, weight, targets)
        out["bwd"] = triton.testing.do_bench(lambda: logp.backward(upstream, retain_graph=True), grad_to_none=grads,
                                             **bench)
        del logp
        out["fwd+bwd"] = triton.testing.do_bench(lambda: fn(hidden, weight, targets).backward(upstream),
                                                 grad_to_none=grads, **bench)
    except torch.cuda.OutOfMemoryError:
        out["oom"] = True
    except Exception as e:  # e.g. torch.compile failing: report it, keep the other cells
        out["error"] = True
        print(f"{method} N={N} C={C} V={V}: {type(e).__name__}: {str(e)[:200]}", flush=True)
    hidden.grad = weight.grad = None
    _free()
    return out


def _missing(cell):
    return "OOM" if cell.get("oom") else "error" if cell.get("error") else "-"


def _fmt_ms(cell, key):
    return "%.3f" % cell[key] if key in cell else _missing(cell)


def _fmt_tflops(cell, key, flops):
    return "%.1f" % (flops / (cell[key] * 1e-3) / 1e12) if key in cell else _missing(cell)


def bench(args):
    import torch._dynamo
    import triton

    from kernels.logprob import triton_token_logprobs

    dtype = DTYPES[args.dtype]
    for name in ("recompile_limit", "cache_size_limit"):  # one compiled graph per cell, never an eager fallback
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 256)
    methods = {"triton": lambda h, w, t: triton_token_logprobs(h, w, t), "torch": unfused_token_logprobs,
               "compile": torch.compile(unfused_token_logprobs, dynamic=False)}
    name = torch.cuda.get_device_name()
    print(f"device: {name}; torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}; "
          f"dtype {args.dtype}; median of do_bench(warmup={args.warmup} ms, rep={args.rep} ms)")
    cells = []
    for N in args.n:
        for C in args.c:
            for V in args.v:
                reference = None
                for method in args.methods:
                    cell = bench_cell(method, methods[method], N, C, V, dtype, args)
                    logp = cell.pop("logp", None)
                    if logp is not None and method == "torch":
                        reference = logp
                    if logp is not None:
                        cell["max_logp"] = logp.max().item()
                        if reference is not None:
                            cell["err"] = (logp - reference).abs().max().item()
                    cells.append(cell)
                    print(_row(cell), flush=True)
                    del logp
                del reference
                _free()
    print(f"\n### token log-prob, {args.dtype}, {name}\n")
    print("| N | C | V | method | fwd ms | fwd TFLOP/s | bwd ms | bwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s "
          "| peak mem GB | max logp | max abs diff vs torch* |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for cell in cells:
        print(_row(cell))
    print("\nTFLOP/s are effective: 2NCV forward, 4NCV backward, 6NCV both; peak memory is above the inputs.")
    print("* max |logp - logp_torch| over non-ignored tokens; the torch path rounds its logits to the input dtype,"
          " so this is mostly the torch path's own rounding")


def _row(cell):
    ncv = cell["N"] * cell["C"] * cell["V"]
    mem = "%.2f" % cell["mem_gb"] if "mem_gb" in cell else _missing(cell)
    return (f"| {cell['N']} | {cell['C']} | {cell['V']} | {cell['method']} | {_fmt_ms(cell, 'fwd')} | "
            f"{_fmt_tflops(cell, 'fwd', 2 * ncv)} | {_fmt_ms(cell, 'bwd')} | {_fmt_tflops(cell, 'bwd', 4 * ncv)} | "
            f"{_fmt_ms(cell, 'fwd+bwd')} | {_fmt_tflops(cell, 'fwd+bwd', 6 * ncv)} | {mem} | "
            + ("%.2g" % cell["max_logp"] if "max_logp" in cell else "-") + " | "
            + ("%.2g" % cell["err"] if "err" in cell else "-") + " |")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python -m kernels.bench_logprob")
    p.add_argument("--n", type=int, nargs="+", default=GRID["n"], help="tokens N")
    p.add_argument("--c", type=int, nargs="+", default=GRID["c"], help="hidden size C")
    p.add_argument("--v", type=int, nargs="+", default=GRID["v"], help="vocabulary size V")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--methods", nargs="+", choices=["triton", "torch", "compile"],
                   default=["triton", "torch", "compile"])
    p.add_argument("--quick", action="store_true", help="one mid-size cell: N=8192, C=2048, V=50257")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.c, args.v = [8192], [2048], [50257]
    if "torch" in args.methods:  # run first: the others report their difference from it
        args.methods = ["torch"] + [m for m in args.methods if m != "torch"]
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
    bench(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
