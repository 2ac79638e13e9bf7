"""Benchmarks of both kernels against their library baselines.

    python -m minipost.kernels.bench                  both, default grids (on a GPU: minutes)
    python -m minipost.kernels.bench logprob [...]    minipost/kernels/bench_logprob.py flags, e.g. --n 8192 --c 4096 --v 131072
    python -m minipost.kernels.bench attention [...]  minipost/kernels/bench_attention.py flags, e.g. --T 2048 4096 --D 128
    python -m minipost.kernels.bench compile [...]    every CUDA config compiled for sm_90, no GPU needed: registers,
                                             spills, shared memory, tensor-core instructions (compile_report.py)

On a GPU each prints TFLOP/s, times and peak memory as a markdown table (last). Without one they say so and
run the correctness comparison in Triton's interpreter instead. Record GPU results in minipost/kernels/BENCHMARKS.md.
"""
import os
import sys

import torch


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    which = argv[0] if argv and not argv[0].startswith("-") else "all"
    rest = argv[1:] if which != "all" or (argv and argv[0] == "all") else argv
    if which not in ("all", "logprob", "attention", "compile"):
        print(f"error: unknown benchmark {which!r} (choose logprob, attention, compile or all)", file=sys.stderr)
        return 2
    if which == "compile":  # ahead-of-time sm_90 compilation: no GPU needed, no interpreter wanted
        from minipost.kernels import compile_report
        return compile_report.main(rest)
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton's @jit functions
    status = 0
    if which in ("all", "logprob"):
        from minipost.kernels import bench_logprob
        status |= bench_logprob.main(rest) or 0
    if which in ("all", "attention"):
        from minipost.kernels import bench_attention
        status |= bench_attention.main(rest) or 0
    return status


if __name__ == "__main__":
    sys.exit(main())
