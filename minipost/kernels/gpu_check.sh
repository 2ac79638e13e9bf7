#!/usr/bin/env bash
# What a GPU session measures for the kernels, in one run on an H100/H200 (about 10 minutes):
#     bash minipost/kernels/gpu_check.sh 2>&1 | tee gpu_check.log
# then paste its tables into minipost/kernels/BENCHMARKS.md with the date and the device line they print.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=8
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'CUDA', torch.version.cuda)"

echo "== 1. the kernel tests, compiled Triton on CUDA tensors"
python -m pytest -q tests/test_logprob_kernel.py tests/test_attention_kernel.py

echo "== 2. sm_90 compile report (the same table a CPU machine prints)"
python -m minipost.kernels.bench compile --jobs 8 | tail -3

echo "== 3. token log-prob, production path (float32 tensors under bf16 autocast), the two cost-model cells"
python -m minipost.kernels.bench_logprob --quick
python -m minipost.kernels.bench_logprob --n 4096 16384 --c 768 --v 2048 50257 --methods minipost torch compile liger

echo "== 4. attention, q/k/v as strided views of the packed c_attn output"
python -m minipost.kernels.bench_attention --T 512 1024 2048 --D 64 128

echo "== 5. GPT-2-shaped (12 x 768, block 1024) SFT and DPO, kernels vs torch path"
# vocabulary: minipost's own BPE on the built-in corpus (2048 tokens; no GPT-2 tokenizer without a network),
# so the LM head is small here: the 50257-token head is what step 3 measures
out=out/gpu-check
python train_base.py --task sentiment --preset gpt2 --device cuda --batch-size 32 --max-steps 50 \
    --eval-every 1000 --out $out/base
for kernels in triton torch; do
    MINIPOST_KERNELS=$kernels python train_sft.py --init $out/base --task sentiment --device cuda \
        --batch-size 64 --max-steps 40 --eval-every 1000 --n-eval 16 --out $out/sft-$kernels
    MINIPOST_KERNELS=$kernels python train_rlhf.py --algo dpo --pairs-from-demos --init $out/sft-$kernels --task sentiment \
        --device cuda --batch-size 32 --max-steps 20 --eval-every 1000 --n-eval 16 --n-kl 16 --out $out/dpo-$kernels
done
python - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print("| run | kernels | s/step (median) | trained tokens/s (SFT) | peak memory MiB |")
print("|---|---|---:|---:|---:|")
for run in ("sft", "dpo"):
    for kernels in ("triton", "torch"):
        rows = [json.loads(line) for line in (out / f"{run}-{kernels}" / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in rows if r.get("step", 0) > 2 and "step_time_s" in r]  # past compile and autotune
        med = sorted(r["step_time_s"] for r in steps)[len(steps) // 2]
        tok = sum(r.get("tokens", 0) for r in steps) / sum(r["step_time_s"] for r in steps)
        peak = next(r["peak_memory_mb"] for r in reversed(rows) if "peak_memory_mb" in r)
        print(f"| {run} | {kernels} | {med:.3f} | {tok:,.0f} | {peak:,.0f} |" if run == "sft" else
              f"| {run} | {kernels} | {med:.3f} | - | {peak:,.0f} |")
PY
