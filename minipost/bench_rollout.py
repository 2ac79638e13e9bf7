"""How fast RL steps sample, side by side with Hugging Face, in one run (issue 27):

    OMP_NUM_THREADS=1 python -m minipost.bench_rollout          # CPU, one thread: generation and a GRPO step
    python -m minipost.bench_rollout --gpu                       # CUDA: decode tokens/s and the bandwidth bound

CPU: greedy decoding of batch 64 x 64 new tokens on a 6 x 384 GPT-2 (random weights, minipost's 2048-token
vocabulary), minipost's engine against transformers' `generate` on a GPT2LMHeadModel holding the same weights,
and the floor of any float32 engine on this machine (the generation's matmuls timed alone + its KV-cache reads
at the measured memory bandwidth), which bounds the speed-up any float32 engine can have over `generate`; then the
time split of GRPO steps on the arith task (sampling / old log-probs / reference log-probs / update).
GPU: GPT-2-small size (12 x 768, 50257 tokens, bf16 weights) at batch 64 and 256, the engine (CUDA graphs)
against `generate`, and the decode step's time against reading the weights and the KV cache once at the
memory bandwidth given by --bandwidth-gbs (H200: 4800 GB/s). Weights are random: speed does not depend on them.
"""
import argparse
import time

import torch

from minipost.cli import UserError, require_numbers, require_positive, run_main
from minipost.engine import generate, left_pad
from minipost.gpt2 import _CONV1D
from minipost.model import GPT, PRESETS, GPTConfig


def hf_twin(model: GPT):
    """A transformers GPT2LMHeadModel with the same weights (Conv1D holds nn.Linear's weight transposed)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    c = model.config
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd,
                                    n_layer=c.n_layer, n_head=c.n_head, activation_function="gelu_new",
                                    layer_norm_epsilon=c.norm_eps, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                    tie_word_embeddings=True))
    state = {k: (v.T if k.endswith(_CONV1D) else v) for k, v in model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith(".attn.bias") or k.endswith("masked_bias") for k in missing), missing
    return hf.to(next(model.parameters()).device, next(model.parameters()).dtype).eval()


def bench_prompts(batch, vocab, seed=0, lo=8, hi=32):
    """`batch` prompts of lengths lo..hi (left-padded by both engines), token ids 2..vocab-1."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (batch,), generator=g).tolist()
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lengths]


def timed(fn, repeats):
    """Best wall time of `repeats` calls after one warm-up call, and the warm-up call's result."""
    out = fn()
    best = float("inf")
    for _ in range(repeats):
        best = min(best, once(fn))
    return best, out


def once(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def generation(model, batch, new_tokens, repeats, hf=None):
    """Greedy tokens/s of minipost's engine and of transformers' generate on the same prompts and weights;
    -> (ours, hf, tokens_equal). EOS is never reached (id -1), so every row decodes new_tokens tokens."""
    device = next(model.parameters()).device
    prompts = bench_prompts(batch, model.config.vocab_size)
    hf = hf or hf_twin(model)
    ids, valid, _ = left_pad(prompts, pad_id=0)  # as the engine pads them
    ids, attn, P = ids.to(device), valid.long().to(device), ids.shape[1]

    def ours():
        return generate(model, prompts, new_tokens, eos_id=-1, pad_id=0, temperature=0).tokens

    def theirs():
        with torch.no_grad():
            out = hf.generate(input_ids=ids, attention_mask=attn, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False, pad_token_id=0, eos_token_id=None)
        return out[:, P:]

    a, b = ours(), theirs()  # warm-up
    pairs = sorted((once(ours), once(theirs)) for _ in range(repeats))  # back to back: one load for both
    t_ours, t_hf = pairs[len(pairs) // 2]  # the median pair (by minipost's time)
    speedup = sorted(hf / us for us, hf in pairs)[len(pairs) // 2]  # the median of the pairs' ratios
    n = batch * new_tokens
    return n / t_ours, n / t_hf, speedup, bool((a == b).all())


def decode_kv_bytes(config, batch, P, new_tokens, itemsize=4):
    """Bytes of keys and values that the decode steps of a generation read at the least: step t (of the
    new_tokens - 1 after the prefill) reads, in every layer, the K and V of its P + t + 1 slots for each row."""
    width = config.kv_heads * config.head_dim
    slots = sum(P + t + 1 for t in range(new_tokens - 1))
    return 2 * config.n_layer * batch * width * itemsize * slots


def floor(model, batch, P, new_tokens, repeats):
    """A lower bound, on this machine, for any float32 engine's greedy generation of `batch` rows (prompts
    left-padded to P) and new_tokens tokens -> (s matmuls, s cache reads, GB read, GB/s). The matmuls are timed
    alone, in the order an engine does them (the prefill's batch x P rows through every linear layer, then
    new_tokens - 1 decode steps of `batch` rows, weights streamed from memory each step; the LM head on batch
    rows new_tokens times); the KV cache reads (decode_kv_bytes) at the bandwidth of summing 256 MB. Attention's
    arithmetic, norms, GELU and sampling are left out: the bound is not reachable, only approachable."""
    linears = [m for m in model.transformer.h.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {}  # one random input per shape: the matmul's speed does not depend on the values

    def x(rows, width):
        if (rows, width) not in inputs:
            inputs[rows, width] = torch.randn(rows, width)
        return inputs[rows, width]

    @torch.no_grad()
    def matmuls():
        for lin in linears:
            lin(x(batch * P, lin.in_features))
        for _ in range(new_tokens - 1):
            for lin in linears:
                lin(x(batch, lin.in_features))
        for _ in range(new_tokens):
            model.lm_head(x(batch, model.config.n_embd))

    t_matmuls, _ = timed(matmuls, repeats)
    big = torch.randn(64 * 2 ** 20)  # 256 MB: far beyond the caches
    t_read, _ = timed(big.sum, repeats)
    gbs = big.numel() * 4 / t_read / 1e9
    gb = decode_kv_bytes(model.config, batch, P, new_tokens) / 1e9
    return t_matmuls, gb / gbs, gb, gbs


def cpu_generation(args):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=2048)).eval()
    batch = new = 64
    ours, hf, speedup, same = generation(model, batch, new, args.repeats)
    print("| setting | minipost tokens/s | HF generate tokens/s | speed-up (median pair) | same tokens |")
    print("|---|---:|---:|---:|---|")
    print(f"| CPU, {torch.get_num_threads()} thread(s), 6 x 384, batch {batch} x {new} new tokens, greedy | "
          f"{ours:,.0f} | {hf:,.0f} | {speedup:.2f}x | {'yes' if same else 'NO'} |")
    P = max(map(len, bench_prompts(batch, model.config.vocab_size)))
    t_mm, t_kv, gb, gbs = floor(model, batch, P, new, args.repeats)
    bound, t_ours, t_hf = t_mm + t_kv, batch * new / ours, batch * new / hf
    print(f"\nFloor of a float32 engine here: its matmuls alone {t_mm:.2f} s + reading the KV cache once a step "
          f"{t_kv:.2f} s ({gb:.2f} GB at {gbs:.1f} GB/s) = {bound:.2f} s a generation. minipost {t_ours:.2f} s "
          f"({t_ours / bound:.2f}x the floor), generate {t_hf:.2f} s ({t_hf / bound:.2f}x): no float32 engine "
          f"can be more than {t_hf / bound:.2f}x faster than generate on this machine.")


class PhaseTimer:
    """Wraps train_rlhf's sampling, log-prob and optimizer calls and adds up their wall time by phase:
    sampling, no-grad log-probs (old and reference), update (the training forwards, backward and step)."""

    def __init__(self, train_rlhf):
        self.total = {"sampling": 0.0, "no-grad log-probs": 0.0, "update": 0.0}
        for name, phase in (("sample_rollout", "sampling"), ("sequence_logprobs", None), ("optimizer_step", "update")):
            setattr(train_rlhf, name, self.wrap(getattr(train_rlhf, name), phase))

    def wrap(self, fn, phase):
        def timed_call(*args, **kwargs):
            key = phase or ("update" if torch.is_grad_enabled() else "no-grad log-probs")
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            self.total[key] += time.perf_counter() - t0
            return out
        return timed_call


def odd_length(prompts, completions, **columns):
    """A 0/1 reward that varies within every group (the parity of the answer's length), so that all samples
    train, as in tests/test_rlhf.py: a tiny SFT model never solves arith, and its groups would all be dropped."""
    return [float(len(c) % 2) for c in completions]


def grpo_split(args):
    """GRPO steps of the study's arith setting (32 prompts x 8 samples, 64 new tokens, minibatch 128) from
    --init, or from a tiny base + SFT model trained here in seconds (train_base / train_sft), evaluation off,
    with the odd_length reward unless --init is given; -> the mean step time and its split by phase."""
    import tempfile
    from pathlib import Path

    import train_rlhf
    from minipost.cli import read_metrics

    with tempfile.TemporaryDirectory() as tmp:
        init = args.init
        if init is None:
            import train_base
            import train_sft
            init = str(Path(tmp) / "sft")
            train_base.main(["--task", "arith", "--corpus-docs", "400", "--vocab-size", "320", "--block-size", "96",
                             "--batch-size", "8", "--eval-batches", "1", "--max-steps", "30", "--lr", "3e-3",
                             "--warmup", "5", "--out", str(Path(tmp) / "base")])
            train_sft.main(["--init", str(Path(tmp) / "base"), "--n-train", "64", "--n-eval", "2",
                            "--max-new-tokens", "4", "--max-steps", "60", "--batch-size", "8", "--lr", "3e-3",
                            "--warmup", "2", "--eval-every", "60", "--out", init])
        timer = PhaseTimer(train_rlhf)
        train_rlhf.policy_evaluation = lambda *a, **k: (lambda step: {})  # time the steps only
        out = Path(tmp) / "grpo"
        reward = [] if args.init else ["--reward", "minipost.bench_rollout:odd_length"]
        train_rlhf.main(["--algo", "grpo", "--init", init, "--task", "arith", "--max-steps", str(args.grpo_steps),
                         "--eval-every", "100000", "--out", str(out), *reward])
        steps = [r["step_time_s"] for r in read_metrics(out / "metrics.jsonl") if "step_time_s" in r]
    step = sum(steps) / len(steps)
    split = {k: v / len(steps) for k, v in timer.total.items()}
    split["other (rewards, bookkeeping)"] = step - sum(split.values())
    print(f"\nGRPO on arith, {len(steps)} steps, mean {step:.2f} s a step:")
    print("| phase | s a step | share |")
    print("|---|---:|---:|")
    for k, v in split.items():
        print(f"| {k} | {v:.2f} | {v / step:.0%} |")


def gpu(args):
    """GPT-2-small size, bf16 weights: decode tokens/s against generate at batch 64 and 256, the decode step's
    time against the bandwidth bound, greedy tokens with and without CUDA graphs, and the gap between the
    sampler's log-probs and a teacher-forced pass under bf16 autocast (the production path)."""
    import os

    from minipost.rollout import pack, response_layout, sequence_logprobs

    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**PRESETS["gpt2"], "vocab_size": 50257})).eval()
    model = model.to("cuda", torch.bfloat16)
    params = sum(p.numel() for n, p in model.named_parameters() if "wpe" not in n)  # a step reads one wpe row
    new = 64  # new tokens a call: enough for a steady decode rate, and the whole mode fits its ~40 s in gpu_check.sh
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; GPT-2-small size (12 x 768, 50257 tokens), "
          f"bf16 weights, prompts of 8-32 tokens, {new} new tokens, greedy")
    print("| batch | minipost tokens/s | HF generate tokens/s | speed-up | decode step ms | bound ms | "
          "step / bound | same tokens as HF |")
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    twin = hf_twin(model)
    for batch in (64, 256):
        ours, hf, speedup, same = generation(model, batch, new, 1, twin)
        prompts = bench_prompts(batch, model.config.vocab_size)
        t_long, _ = timed(lambda: generate(model, prompts, new, -1, 0, temperature=0), 1)
        t_short, _ = timed(lambda: generate(model, prompts, new // 2, -1, 0, temperature=0), 1)
        step = (t_long - t_short) / (new - new // 2)  # prefill and graph capture cancel out
        T_max = max(map(len, prompts)) + new
        kv = 2 * model.config.n_layer * batch * T_max * model.config.n_embd * 2  # the step reads the whole cache
        bound = (params * 2 + kv) / (args.bandwidth_gbs * 1e9)
        print(f"| {batch} | {ours:,.0f} | {hf:,.0f} | {speedup:.1f}x | {step * 1e3:.2f} | {bound * 1e3:.3f} | "
              f"{step / bound:.1f}x | {'yes' if same else 'no (bf16 rounding)'} |")
    prompts = bench_prompts(64, model.config.vocab_size)
    graphed = generate(model, prompts, 64, -1, 0, temperature=0).tokens
    os.environ["MINIPOST_CUDA_GRAPHS"] = "0"
    eager = generate(model, prompts, 64, -1, 0, temperature=0).tokens
    del os.environ["MINIPOST_CUDA_GRAPHS"]
    print(f"greedy tokens, CUDA graphs vs eager steps, batch 64 x 64: {(graphed == eager).float().mean():.1%} equal")
    model = model.float()  # the training scripts' path: float32 weights under bf16 autocast
    with torch.autocast("cuda", torch.bfloat16):
        g = generate(model, prompts, 64, model.config.vocab_size - 1, 0, temperature=1.0, seed=0)
        seqs = pack(prompts, g.completions(), 0, "cuda")
        sampler = response_layout(g.logprobs, prompts, seqs)
        forward = sequence_logprobs(model, seqs)
    gap = (sampler - forward)[seqs.mask == 1].abs()
    print(f"sampler vs teacher-forced log-probs under bf16 autocast, T = 1: max {gap.max():.2e}, "
          f"mean {gap.mean():.2e} over {int(seqs.mask.sum())} tokens")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="the CUDA measurements instead of the CPU ones")
    p.add_argument("--repeats", type=int, default=5, help="CPU: timed pairs of generation calls (minipost, then HF; "
                   "the median is kept)")
    p.add_argument("--init", default=None, help="CPU: the SFT checkpoint GRPO starts from (default: a tiny one "
                   "trained here first)")
    p.add_argument("--grpo-steps", type=int, default=4, help="CPU: GRPO steps timed")
    p.add_argument("--bandwidth-gbs", type=float, default=4800.0, help="--gpu: memory bandwidth for the bound "
                   "(H200: 4800)")
    p.add_argument("--skip-grpo", action="store_true", help="CPU: generation only")
    args = p.parse_args(argv)
    require_positive(args, "repeats", "grpo_steps")
    require_numbers(args, bandwidth_gbs="> 0")
    if args.gpu:
        if not torch.cuda.is_available():
            raise UserError("--gpu: no CUDA device here (torch.cuda.is_available() is false)")
        return gpu(args)
    cpu_generation(args)
    if not args.skip_grpo:
        grpo_split(args)


if __name__ == "__main__":
    run_main(main)
