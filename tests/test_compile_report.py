"""minipost/kernels/compile_report.py: compiling for sm_90 without a GPU, and reading the cubin right.

Runs in a fresh Python without TRITON_INTERPRET (the test session's Triton is the interpreter). Each compile
takes seconds on a CPU, so only a few configs: the shipped bf16 and float32 tiles of the log-prob backward, and
one attention config the issue found spilling beside its spill-free replacement.
"""
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

CODE = """
import json
from minipost.kernels import compile_report as cr
out = {}
for dtype in ("bf16", "fp32"):
    case = [c for c in cr.cases([dtype], [128]) if c[0] == "dlogits"][0]
    out[dtype] = cr._run_case(case)[1]
args = cr._attention_args("dkdv", "bf16", 128)
const = dict(HEAD_DIM=128, CAUSAL=True, EVEN_D=True, UPCAST=False, BLOCK_M=32, BLOCK_N=128, PREC="tf32")
out["4 warps"] = cr._compile("dkdv", args, const, 4, 3)  # 256 threads hold 32x128 dK and dV: too many registers
out["8 warps"] = cr._compile("dkdv", args, const, 8, 3)
gqa = dict(const, BLOCK_M=16, BLOCK_N=64)  # the group loop needs smaller tiles: flash_attention._GQA_DKDV_CONFIGS
out["GQA"] = cr._compile("dkdv", cr._attention_args("dkdv", "bf16", 128, group=4), gqa, 8, 2)
out["GQA 32x128"] = cr._compile("dkdv", cr._attention_args("dkdv", "bf16", 128, group=4), const, 8, 3)
print(json.dumps(out))
"""


def test_compile_report_reads_registers_spills_and_tensor_cores():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", CODE], cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    r = json.loads(run.stdout.strip().splitlines()[-1])
    # bf16 dots become Hopper warpgroup MMAs; float32 "ieee" dots stay on CUDA cores (no tensor-core op at all)
    assert r["bf16"]["wgmma"] > 0
    assert r["fp32"]["wgmma"] == 0 and r["fp32"]["mma"] == 0
    for name in ("bf16", "fp32", "8 warps", "GQA"):  # shipped or replacement configs: no spill, registers within 255
        assert r[name]["stack"] == 0 and r[name]["ldl"] == r[name]["stl"] == 0, (name, r[name])
        assert 0 < r[name]["registers"] <= 255 and 0 < r[name]["shared"] <= 232448, (name, r[name])
    # the spilling config: stack bytes in the resource usage and local loads/stores in the SASS
    assert r["4 warps"]["stack"] > 0 and r["4 warps"]["ldl"] > 0 and r["4 warps"]["stl"] > 0, r["4 warps"]
    assert r["4 warps"]["registers"] == 255
    assert r["GQA 32x128"]["stack"] > 0  # the tile that fits GPT-2's heads spills once it loops over a group
