#!/usr/bin/env bash
# What a GPU session measures for the kernels and the training path, in one run of at most 6 minutes on an
# H100/H200 (the section budgets below plus their kill graces sum to 336 s; tests/test_bench.py checks <= 340):
#     bash minipost/kernels/gpu_check.sh 2>&1 | tee gpu_check.log
# then paste its tables into minipost/kernels/BENCHMARKS.md with the date and the device line they print.
# Runs on what the machine has (torch >= 2.8, triton >= 3.2; no network, installs nothing, minipost need not be
# pip-installed: PYTHONPATH is the checkout; liger-kernel and pytest-xdist only if already installed), with
# $PYTHON, default python3. Every section runs under its own `timeout`; a section that fails or runs out of
# time prints "FAILED: ..." and the next one runs; a summary of all sections comes last.
#     bash minipost/kernels/gpu_check.sh --cpu-dry-run
# runs every section on the CPU with tiny sizes (Triton in its interpreter), to show that each one executes:
# the benchmarks then print their interpreter correctness tables instead of timings.
set -uo pipefail  # no -e: a failing section must not stop the others
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # `import minipost` from this checkout, from any script path
export PYTHONUNBUFFERED=1  # a section cut by its timeout still shows every line it printed
PY=${PYTHON:-python3}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
DRY=0
if [[ "${1:-}" == "--cpu-dry-run" ]]; then
    DRY=1
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
elif [[ $# -gt 0 ]]; then
    echo "usage: bash minipost/kernels/gpu_check.sh [--cpu-dry-run]" >&2
    exit 2
fi
START=$SECONDS
SUMMARY=()

# section NAME BUDGET_S GRACE_S COMMAND...: run COMMAND under a timeout, record its outcome. At BUDGET_S seconds
# COMMAND gets SIGINT (Python stops with a KeyboardInterrupt; pytest still prints its summary), GRACE_S later
# SIGKILL if it is still running.
section() {
    local name=$1 budget=$2 grace=$3 t0=$SECONDS rc status
    shift 3
    echo
    echo "== $name (budget ${budget} s)"
    timeout -s INT -k "$grace" "$budget" "$@"
    rc=$?
    if [[ $rc -eq 0 ]]; then
        status="ok"
    elif [[ $rc -eq 124 || $rc -eq 137 ]]; then
        status="FAILED: timed out after ${budget} s"
    else
        status="FAILED: exit status $rc"
    fi
    [[ $status != ok ]] && echo "FAILED: $name: $status"
    SUMMARY+=("$name: $status, $((SECONDS - t0)) s")
}

has_module() { $PY -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)" 2>/dev/null; }

# 0. The device, and a first (cold) import of torch and triton, which the next sections then find cached
if [[ $DRY -eq 1 ]]; then
    section "0. device (dry run)" 20 2 $PY -c "import torch, triton; print('CPU dry run; torch', torch.__version__, 'triton', triton.__version__)"
else
    section "0. device" 20 2 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; \
        $PY -c \"import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'CUDA', torch.version.cuda)\""
fi

# 1. Correctness first. MINIPOST_AUTOTUNE=0: one config per kernel variant (the tests' many shapes would
# otherwise each tune 4-5 configs); the benchmarks below tune. ~220 tests, most of the time compiling: 8
# pytest-xdist workers where it is installed. (test_every_diagonal_offset's 130 shifts cost no compile each:
# Triton specialises an int argument only on divisibility by 16, so they share two binaries per kernel.)
XDIST=""
has_module xdist && XDIST="-n 8"
if [[ $DRY -eq 1 ]]; then
    section "1. kernel tests (dry run: a subset, interpreter)" 60 5 env MINIPOST_AUTOTUNE=0 $PY -m pytest -p no:cacheprovider -rf \
        tests/test_logprob_kernel.py tests/test_attention_kernel.py -k "gpt2_head or grid and 7-1-16 or autotuning or float32_matches and 17-17"
else
    section "1. kernel tests, compiled on CUDA" 55 5 env MINIPOST_AUTOTUNE=0 $PY -m pytest -p no:cacheprovider -rf $XDIST \
        tests/test_logprob_kernel.py tests/test_attention_kernel.py
fi

# 2. Token log-prob (issue 26 items 2-4): GPT-2's head at 16k tokens and Llama-3's vocabulary at C = 2048
# (memory), against unfused torch and Liger where installed; torch.compile on one cell (its compile takes long).
# bf16 tensors, as in issue 26's table (the benchmark's default, autocast, is the training path: section 7).
METHODS="minipost torch"
has_module liger_kernel && METHODS="$METHODS liger" || echo "(for section 2: liger-kernel not installed, no Liger column)"
section "2. token log-prob, bf16" 30 2 $PY -m minipost.kernels.bench_logprob --cells 16384x768x50257 8192x2048x128256 \
    --methods $METHODS --dtype bf16 --warmup 10 --rep 40
section "3. token log-prob, torch.compile baseline" 30 2 $PY -m minipost.kernels.bench_logprob --cells 8192x768x50257 \
    --methods compile minipost --dtype bf16 --warmup 10 --rep 40

# 4. Attention (issue 26 item 6): minipost vs FlashAttention-2 and cuDNN through SDPA, B*T = 16k, H*D = 2048.
# 5: the unfused baselines at one shape whose minipost row section 4 has (errors there are against naive).
section "4. attention vs SDPA flash / cuDNN" 40 2 $PY -m minipost.kernels.bench_attention --T 1024 4096 8192 --D 64 128 \
    --paths sdpa-flash minipost sdpa-cudnn
section "5. attention, naive and torch.compile baselines" 25 2 $PY -m minipost.kernels.bench_attention --T 1024 --D 64 \
    --paths naive compile

# 6. Autotuning persists across processes (item 5): two fresh processes run one new shape; each must finish and
# print its line, and the second must find every tuning on disk (no "Triton autotuning for function" lines).
# The inputs are laid out as section 4's (strided views of a packed qkv, every int a multiple of 16), so its
# compiled binaries serve here and only the tuning is new: T = 320 is bucket 512, which no other section tunes.
TUNE_PY=$(mktemp --suffix .py)
trap 'rm -f "$TUNE_PY"' EXIT
cat > "$TUNE_PY" <<'PY'
import sys, time, torch
from minipost import kernels
dev = "cuda" if torch.cuda.is_available() else "cpu"
B, H, T, D = (2, 32, 320, 64) if dev == "cuda" else (1, 1, 40, 64)
t0 = time.perf_counter()
qkv = torch.randn(B, T, 3 * H * D, device=dev, dtype=torch.bfloat16, requires_grad=True)  # c_attn's output
q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in qkv.split(H * D, dim=2))  # (B, H, T, D) views
do = torch.randn(B, T, H, D, device=dev, dtype=torch.bfloat16).transpose(1, 2)  # (B, H, T, D), as the model's
kernels.attention(q, k, v).backward(do)
if dev == "cuda":
    torch.cuda.synchronize()
print(f"process {sys.argv[1]}: first forward+backward {time.perf_counter() - t0:.2f} s")
PY
# bash -c script, $0 = python, $1 = TUNE_PY, $2 = 1 in the dry run (the interpreter does not tune)
TUNE_CHECK='
    export TRITON_PRINT_AUTOTUNING=1 MINIPOST_KERNELS=triton
    for i in 1 2; do
        out=$("$0" "$1" $i 2>&1); rc=$?
        grep -v "^best config\|^with key\|^finished after" <<<"$out"
        [[ $rc -eq 0 ]] || { echo "process $i failed: exit status $rc"; exit 1; }
        grep -q "^process $i: first forward+backward" <<<"$out" || { echo "process $i printed no result"; exit 1; }
        n[$i]=$(grep -c "Triton autotuning for function" <<<"$out")
    done
    echo "tunings: first process ${n[1]}, second process ${n[2]} (want > 0, then 0)"
    [[ $2 -eq 1 ]] && { echo "(dry run: the interpreter does not tune)"; exit 0; }
    [[ ${n[1]} -eq 0 ]] && echo "(the first process found its tunings on disk too: an earlier run of this script?)"
    [[ ${n[2]} -eq 0 ]]'
if [[ $DRY -eq 1 ]]; then
    section "6. autotuning cache across processes (dry run: both processes run, nothing to tune)" 60 2 \
        bash -c "$TUNE_CHECK" "$PY" "$TUNE_PY" 1
else
    section "6. autotuning cache across processes" 35 2 bash -c "$TUNE_CHECK" "$PY" "$TUNE_PY" 0
fi

# 7. End to end (item 8): GPT-2 small (12 x 768, block 1024, vocabulary 50257) SFT, DPO and GRPO steps,
# Triton kernels vs MINIPOST_KERNELS=torch: s/step, tokens/s, peak memory, MFU
if [[ $DRY -eq 1 ]]; then
    section "7. GPT-2-small training steps (dry run: tiny model)" 120 2 $PY -m minipost.bench_train --cpu-dry-run
else
    section "7. GPT-2-small SFT / DPO / GRPO steps, triton vs torch" 40 2 $PY -m minipost.bench_train --batch 8 --warmup 2 --steps 6
fi

# == 8. decode (issue 27): slot for the decode-throughput benchmark; runs only where that module exists
if has_module minipost.bench_rollout; then
    if [[ $DRY -eq 1 ]]; then
        section "8. decode (issue 27) (dry run: --help only)" 45 2 $PY -m minipost.bench_rollout --help
    else
        section "8. decode (issue 27)" 40 2 $PY -m minipost.bench_rollout --gpu
    fi
else
    echo; echo "== 8. decode (issue 27): skipped, minipost.bench_rollout not present"
    SUMMARY+=("8. decode (issue 27): skipped (no minipost.bench_rollout)")
fi

echo
echo "== summary ($((SECONDS - START)) s in all)"
printf '%s\n' "${SUMMARY[@]}"
for line in "${SUMMARY[@]}"; do [[ $line == *FAILED* ]] && exit 1; done
exit 0
