#!/usr/bin/env bash
# What a GPU session measures for the kernels and the training path, in one run of at most 6 minutes on an
# H100/H200 (the section budgets below sum to 355 s):
#     bash minipost/kernels/gpu_check.sh 2>&1 | tee gpu_check.log
# then paste its tables into minipost/kernels/BENCHMARKS.md with the date and the device line they print.
# Runs on what the machine has (torch >= 2.8, triton >= 3.2; no network, installs nothing; liger-kernel only
# if already installed). Every section runs under its own `timeout`; a section that fails or runs out of time
# prints "FAILED: ..." and the next one runs; a summary of all sections comes last.
#     bash minipost/kernels/gpu_check.sh --cpu-dry-run
# runs every section on the CPU with tiny sizes (Triton in its interpreter), to show that each one executes:
# the benchmarks then print their interpreter correctness tables instead of timings.
set -uo pipefail  # no -e: a failing section must not stop the others
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1  # a section cut by its timeout still shows every line it printed
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

# section NAME BUDGET_S COMMAND...: run COMMAND under a timeout, record its outcome
section() {
    local name=$1 budget=$2 t0=$SECONDS rc status
    shift 2
    echo
    echo "== $name (budget ${budget} s)"
    timeout -k 2 "$budget" "$@"
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

has_module() { python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)" 2>/dev/null; }

if [[ $DRY -eq 1 ]]; then
    section "0. device (dry run)" 20 python -c "import torch, triton; print('CPU dry run; torch', torch.__version__, 'triton', triton.__version__)"
else
    section "0. device" 10 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; \
        python -c \"import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'CUDA', torch.version.cuda)\""
fi

# 1. Correctness first. MINIPOST_AUTOTUNE=0: one config per kernel variant (the tests' many shapes would
# otherwise each tune 4-5 configs); the benchmarks below tune.
if [[ $DRY -eq 1 ]]; then
    section "1. kernel tests (dry run: a subset, interpreter)" 60 env MINIPOST_AUTOTUNE=0 python -m pytest -p no:cacheprovider -rf \
        tests/test_logprob_kernel.py tests/test_attention_kernel.py -k "gpt2_head or grid and 7-1-16 or autotuning or float32_matches and 17-17"
else
    section "1. kernel tests, compiled on CUDA" 60 env MINIPOST_AUTOTUNE=0 python -m pytest -p no:cacheprovider -rf \
        tests/test_logprob_kernel.py tests/test_attention_kernel.py
fi

# 2. Token log-prob (issue 26 items 2-4): GPT-2's head at 16k tokens and Llama-3's vocabulary at C = 2048
# (memory), against unfused torch and Liger where installed; torch.compile on one cell (its compile takes long).
METHODS="minipost torch"
has_module liger_kernel && METHODS="$METHODS liger" || echo "(for section 2: liger-kernel not installed, no Liger column)"
section "2. token log-prob, bf16" 55 python -m minipost.kernels.bench_logprob --cells 16384x768x50257 8192x2048x128256 \
    --methods $METHODS --warmup 10 --rep 40
section "3. token log-prob, torch.compile baseline" 25 python -m minipost.kernels.bench_logprob --cells 8192x768x50257 \
    --methods compile minipost --warmup 10 --rep 40

# 4. Attention (issue 26 item 6): minipost vs FlashAttention-2 and cuDNN through SDPA, B*T = 16k, H*D = 2048
section "4. attention vs SDPA flash / cuDNN" 60 python -m minipost.kernels.bench_attention --T 1024 4096 8192 --D 64 128 \
    --paths sdpa-flash minipost sdpa-cudnn
section "5. attention, naive and torch.compile baselines" 25 python -m minipost.kernels.bench_attention --T 1024 --D 64 \
    --paths minipost naive compile

# 6. Autotuning persists across processes (item 5): two fresh processes run one new shape; the second must
# find every tuning on disk (no "Triton autotuning for function" lines) and start faster.
TUNE_PY=$(mktemp --suffix .py)
trap 'rm -f "$TUNE_PY"' EXIT
cat > "$TUNE_PY" <<'PY'
import sys, time, torch
from minipost import kernels
dev = "cuda" if torch.cuda.is_available() else "cpu"
B, H, T = (3, 12, 300) if dev == "cuda" else (1, 1, 40)  # T = 300: bucket 512, which no other section tunes
t0 = time.perf_counter()
q = torch.randn(B, H, T, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
kernels.attention(q, q, q).sum().backward()
if dev == "cuda":
    torch.cuda.synchronize()
print(f"process {sys.argv[1]}: first forward+backward {time.perf_counter() - t0:.2f} s")
PY
if [[ $DRY -eq 1 ]]; then
    section "6. autotuning cache across processes (dry run: the interpreter does not tune)" 40 \
        env MINIPOST_KERNELS=triton python "$TUNE_PY" 1
else
    section "6. autotuning cache across processes" 20 bash -c '
        export TRITON_PRINT_AUTOTUNING=1 MINIPOST_KERNELS=triton
        a=$(python "$1" 1 2>&1); echo "$a" | grep -v "^best config\|^with key\|^finished after"
        b=$(python "$1" 2 2>&1); echo "$b" | grep -v "^best config\|^with key\|^finished after"
        na=$(echo "$a" | grep -c "Triton autotuning for function"); nb=$(echo "$b" | grep -c "Triton autotuning for function")
        echo "tunings: first process $na, second process $nb (want > 0, then 0)"
        [[ $na -eq 0 ]] && echo "(the first process found its tunings on disk too: an earlier run of this script?)"
        [[ $nb -eq 0 ]]' _ "$TUNE_PY"
fi

# 7. End to end (item 8): GPT-2 small (12 x 768, block 1024, vocabulary 50257) SFT, DPO and GRPO steps,
# Triton kernels vs MINIPOST_KERNELS=torch: s/step, tokens/s, peak memory, MFU
if [[ $DRY -eq 1 ]]; then
    section "7. GPT-2-small training steps (dry run: tiny model)" 120 python -m minipost.bench_train --cpu-dry-run
else
    section "7. GPT-2-small SFT / DPO / GRPO steps, triton vs torch" 55 python -m minipost.bench_train --batch 8 --warmup 2 --steps 6
fi

# == 8. decode (issue 27): slot for the decode-throughput benchmark; runs only where that module exists
if has_module minipost.bench_rollout; then
    if [[ $DRY -eq 1 ]]; then
        section "8. decode (issue 27) (dry run: --help only)" 45 python -m minipost.bench_rollout --help
    else
        section "8. decode (issue 27)" 45 python -m minipost.bench_rollout --gpu
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
