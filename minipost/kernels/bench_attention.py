"""Benchmark of the fused attention kernel on the path training takes, or a correctness check without a GPU.

    python -m minipost.kernels.bench_attention                      # T in 512..2048, D in 64, 128, bf16, causal
    python -m minipost.kernels.bench_attention --T 2048 --D 128     # one shape
    python -m minipost.kernels.bench_attention --non-causal --dtype fp16

On CUDA, for each (T, D): B*T = --tokens (16k) and H*D = --hidden (2048). The inputs are what the model passes
under autocast: q, k, v (B, H, T, D) are strided views of one packed (B, T, 3*H*D) c_attn output in the 16-bit
dtype, and the gradient flows back into that packed tensor. Paths:
  minipost    kernels.attention (the Triton kernel on CUDA)
  sdpa-flash  F.scaled_dot_product_attention with the FlashAttention-2 backend pinned (sdpa_kernel)
  sdpa-cudnn  the same with the cuDNN backend ("n/a" where it is unavailable or fails)
  naive       softmax(q k^T / sqrt(D) + mask) v in plain torch: the (T, T) scores in memory
  compile     torch.compile of naive
Times are triton.testing.do_bench medians (ms) after warm-up (compilation and autotuning done beforehand); the
backward is (forward+backward) - forward (fwd_bwd_times: torch.compile refuses a retained graph).
FLOPs follow FlashAttention's convention: forward 4*B*H*T^2*D, halved when causal; backward 2.5x forward.
"peak MiB" is the peak memory allocated by one forward+backward beyond the inputs. "max err" compares the
output and the packed qkv gradient with those of the shape's reference path, relative to their largest value:
sdpa-flash, or where it fails or is not listed the first path that ran; the reference's own row shows "ref".
A path that fails prints "n/a" and makes the exit status 1, except sdpa-cudnn (unavailable on some GPUs/builds).

Without CUDA the kernels run in Triton's interpreter on small CPU shapes and the script prints their max
errors against a float64 run of minipost/kernels/reference.py (exit status 1 if any exceeds its tolerance).
"""
import argparse
import datetime
import os
import subprocess
import sys

import torch


PATHS = ["sdpa-flash", "minipost", "sdpa-cudnn", "naive", "compile"]


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m minipost.kernels.bench_attention", description=__doc__.split("\n")[0])
    p.add_argument("--T", type=int, nargs="+", default=[512, 1024, 2048], help="sequence lengths")
    p.add_argument("--D", type=int, nargs="+", default=[64, 128], help="head dims")
    p.add_argument("--tokens", type=int, default=16384, help="B*T, total tokens per batch")
    p.add_argument("--hidden", type=int, default=2048, help="H*D, model width")
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    p.add_argument("--non-causal", action="store_true", help="full attention instead of causal")
    p.add_argument("--paths", nargs="+", choices=PATHS, default=PATHS, help="which paths to time; the errors "
                   "are relative to the first that runs (sdpa-flash, when listed)")
    return p.parse_args(argv)


def flops_fwd(B, H, T, D, causal):
    return 4 * B * H * T * T * D * (0.5 if causal else 1.0)


# ----------------------------------------------------------------------------------------------------------
# GPU benchmark


def sdpa_path(backend):
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v, causal):
        with sdpa_kernel(backend):  # pinned: raises instead of silently falling back to another backend
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return run


def naive_attention(q, k, v, causal):
    """The unfused baseline: (B, H, T, T) scores in memory, float32 softmax."""
    T, D = q.shape[-2], q.shape[-1]
    s = (q @ k.transpose(-1, -2)).float() / D**0.5  # (B, H, T, T)
    if causal:
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return torch.softmax(s, dim=-1).to(v.dtype) @ v  # (B, H, T, D)


def minipost_path(q, k, v, causal):
    from minipost import kernels

    return kernels.attention(q, k, v, causal=causal)


def fwd_bwd_times(fwd, fwd_bwd, timer):
    """(forward, backward, both) ms by timer(callable). The backward is (forward + backward) - forward, each graph
    built and consumed once as in training: torch.compile's backward donates its saved buffers and refuses
    backward(retain_graph=True) on one graph (issue 26). The same for every path, so the columns compare."""
    t_fwd = timer(fwd)
    t_all = timer(fwd_bwd)
    return t_fwd, t_all - t_fwd, t_all


def bench_path(fn, qkv, split, do, causal):
    """(fwd ms, bwd ms, fwd+bwd ms, peak MiB, o, dqkv); the first calls compile and autotune."""
    from triton.testing import do_bench

    def fwd():
        return fn(*split(qkv), causal)

    def fwd_bwd():
        fwd().backward(do)

    fwd_bwd()  # compile + autotune outside the timed region (do_bench sizes its loop from a first call)
    fwd_bwd()
    torch.cuda.synchronize()
    t_fwd, t_bwd, t_all = fwd_bwd_times(fwd, fwd_bwd, lambda f: do_bench(f, grad_to_none=[qkv], return_mode="median"))
    qkv.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    o = fwd()
    o.backward(do)
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    grad, qkv.grad = qkv.grad, None
    return t_fwd, t_bwd, t_all, peak, o.detach(), grad


def _rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-6)).item()


def gpu_main(args):
    import triton
    from torch.nn.attention import SDPBackend

    dtype = dict(bf16=torch.bfloat16, fp16=torch.float16)[args.dtype]
    causal = not args.non_causal
    paths = [("sdpa-flash", sdpa_path(SDPBackend.FLASH_ATTENTION)), ("minipost", minipost_path),
             ("sdpa-cudnn", sdpa_path(SDPBackend.CUDNN_ATTENTION)), ("naive", naive_attention),
             ("compile", torch.compile(naive_attention, dynamic=False))]
    paths = [(name, fn) for name, fn in paths if name in args.paths]
    print(f"device: {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
          f"{datetime.date.today()} | {args.dtype}, {'causal' if causal else 'non-causal'}, "
          f"B*T={args.tokens}, H*D={args.hidden}, q/k/v strided views of the packed qkv")
    print("command: python -m minipost.kernels.bench_attention " + " ".join(sys.argv[1:]))
    rows, failed = [], set()
    for D in args.D:
        H = args.hidden // D
        for T in args.T:
            B = args.tokens // T
            if B < 1 or H < 1:
                print(f"skip T={T} D={D}: B*T={args.tokens} or H*D={args.hidden} too small")
                continue
            C = H * D
            g = torch.Generator(device="cuda").manual_seed(0)
            qkv = torch.randn(B, T, 3 * C, device="cuda", dtype=dtype, generator=g).requires_grad_()  # c_attn out
            do = torch.randn(B, T, H, D, device="cuda", dtype=dtype, generator=g).transpose(1, 2)  # as the model's

            def split(packed):  # (B, T, 3C) -> q, k, v (B, H, T, D): the views CausalSelfAttention makes
                return [t.view(B, T, H, D).transpose(1, 2) for t in packed.split(C, dim=2)]

            f = flops_fwd(B, H, T, D, causal)
            ref = None
            for name, fn in paths:
                try:
                    t_fwd, t_bwd, t_all, peak, o, grad = bench_path(fn, qkv, split, do, causal)
                except Exception as e:  # e.g. cuDNN attention missing for this GPU / build, or out of memory
                    print(f"{name} T={T} D={D}: n/a ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
                    rows.append((D, T, B, H, name) + ("n/a",) * 9)
                    if name != "sdpa-cudnn":  # cuDNN attention may be missing for this GPU / build
                        failed.add(name)
                    torch.cuda.empty_cache()
                    continue
                if ref is None:  # the first path that ran (sdpa-flash when listed): its row shows "ref"
                    ref = (o, grad)
                    errs = ("ref", "ref")
                else:
                    errs = (f"{_rel_err(o, ref[0]):.1e}", f"{_rel_err(grad, ref[1]):.1e}")
                tf = lambda flops, ms: f"{flops / (ms * 1e-3) / 1e12:.0f}"  # noqa: E731
                rows.append((D, T, B, H, name, f"{t_fwd:.3f}", tf(f, t_fwd), f"{t_bwd:.3f}", tf(2.5 * f, t_bwd),
                             f"{t_all:.3f}", tf(3.5 * f, t_all), f"{peak:.0f}", *errs))
                print(" | ".join(map(str, rows[-1])), flush=True)
                del o, grad
            del qkv, do, ref
            torch.cuda.empty_cache()
    header = ["D", "T", "B", "H", "path", "fwd ms", "fwd TFLOP/s", "bwd ms", "bwd TFLOP/s", "fwd+bwd ms",
              "fwd+bwd TFLOP/s", "peak MiB", "max err o", "max err dqkv"]
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(map(str, r)) + " |")
    if failed:
        print(f"FAILED: {', '.join(sorted(failed))} (see above)")
    return 1 if failed else 0


# ----------------------------------------------------------------------------------------------------------
# CPU: correctness in the interpreter


def interpreter_main():
    from minipost.kernels.flash_attention import triton_attention
    from minipost.kernels.reference import attention_reference

    # (B, H, Tq, Tk, D, causal, dtype, tolerance as a fraction of the reference's max |value|)
    cases = [(1, 2, 64, 64, 16, True, torch.float32, 1e-5), (1, 2, 37, 100, 32, True, torch.float32, 1e-5),
             (2, 1, 50, 50, 64, False, torch.float32, 1e-5), (1, 1, 1, 1, 128, True, torch.float32, 1e-5),
             (1, 2, 100, 100, 64, True, torch.bfloat16, 3e-2), (1, 1, 33, 33, 128, True, torch.float16, 4e-3)]
    rows, ok = [], True
    for B, H, Tq, Tk, D, causal, dtype, tol in cases:
        g = torch.Generator().manual_seed(0)
        q = torch.randn(B, H, Tq, D, generator=g).to(dtype).requires_grad_()  # (B, H, Tq, D)
        k = torch.randn(B, H, Tk, D, generator=g).to(dtype).requires_grad_()  # (B, H, Tk, D)
        v = torch.randn(B, H, Tk, D, generator=g).to(dtype).requires_grad_()  # (B, H, Tk, D)
        do = torch.randn(B, H, Tq, D, generator=g).to(dtype)  # (B, H, Tq, D)
        o = triton_attention(q, k, v, causal=causal)
        o.backward(do)
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        o64 = attention_reference(q64, k64, v64, causal=causal)
        o64.backward(do.double())
        errs = [(got.double() - want).abs().max().item() / max(want.abs().max().item(), 1e-3)
                for got, want in [(o, o64), (q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)]]
        good = max(errs) <= tol
        ok &= good
        rows.append((f"{B}x{H}", Tq, Tk, D, "causal" if causal else "full", str(dtype).split(".")[1],
                     *(f"{e:.1e}" for e in errs), f"{tol:.0e}", "ok" if good else "FAIL"))
    print()
    print("Max |error| / max |float64 reference| (Triton interpreter, CPU):")
    header = ["B x H", "Tq", "Tk", "D", "mask", "dtype", "o", "dq", "dk", "dv", "tolerance", "result"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(map(str, r)) + " |")
    return 0 if ok else 1


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if torch.cuda.is_available():
        return gpu_main(args)
    print("no GPU found: running correctness check in the Triton interpreter only")
    os.environ["TRITON_INTERPRET"] = "1"  # must be set before kernels.flash_attention (and its @triton.jit) is imported
    mod = sys.modules.get("minipost.kernels.flash_attention")
    if mod is not None and not getattr(mod, "_INTERPRET", False):
        # the kernels were already compiled for a GPU in this process: redo the check in a fresh one
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        return subprocess.run([sys.executable, "-m", "minipost.kernels.bench_attention", *argv], env=env).returncode
    return interpreter_main()


if __name__ == "__main__":
    sys.exit(main())
