"""The fused attention kernel (minipost/kernels/flash_attention.py) against a float64 softmax(QK^T)V written here.

Without a GPU this runs the Triton kernels in Triton's interpreter on CPU tensors (conftest.py sets
TRITON_INTERPRET=1 before Triton is imported); with a GPU the same tests run the compiled kernels on CUDA.
Shapes are small because the interpreter executes every program instance in Python.
"""
import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from minipost import kernels
from minipost.cli import UserError

import minipost.kernels.flash_attention as attn_mod
from minipost.kernels.flash_attention import triton_attention
from minipost.model import GPT, GPTConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = DEVICE == "cpu"

# Tolerances, as a fraction of the largest magnitude of the float64 reference tensor being compared, or of the
# terms it sums where those are larger (resolvable_scales: a result that cancels to ~0 is still only known to
# the rounding of its terms; a fixed floor such as 1e-3 would be right for no input scale in particular):
# - float32: every kernel value is a float32 sum over at most ~130 keys (or queries) of D <= 128-long dot
#   products, each rounding at ~6e-8 relative; the errors measured here are below 1e-6, so 1e-5 leaves a
#   10x margin and still catches any real mistake (a wrong mask or scale moves values by 1e-2 or more).
# - bfloat16 (8-bit mantissa): P and dS are rounded to bf16 before their matmuls (as in FlashAttention) and
#   outputs are stored in bf16, each a relative rounding of up to 2^-9 = 2e-3; measured errors reach 1.1e-2
#   of the tensor's maximum after a few such roundings pile up in the gradients, so 3e-2.
# - float16 (11-bit mantissa): the same roundings 8x smaller (measured 8e-4), so 4e-3.
TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}


def naive_attention(q, k, v, causal):
    """float64 softmax(q k^T / sqrt(D) + mask) v; causal mask bottom-right: key j visible iff j <= i + Tk - Tq.
    k, v may have fewer heads (grouped-query attention): query head h reads kv head h // (H / Hkv)."""
    Tq, Tk = q.shape[-2], k.shape[-2]
    group = q.shape[1] // k.shape[1]
    kv_head = torch.arange(q.shape[1], device=q.device) // group  # (H,): which kv head each query head reads
    k, v = k[:, kv_head], v[:, kv_head]  # (B, H, Tk, D): gathered copies, fine for an oracle
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, Tq, Tk)
    if causal:
        visible = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - Tq)  # (Tq, Tk)
        s = s.masked_fill(~visible, float("-inf"))
    return torch.softmax(s, dim=-1) @ v  # (B, H, Tq, D)


def make_inputs(B, H, Tq, Tk, D, dtype, scale=1.0, seed=0, Hkv=None):
    g = torch.Generator().manual_seed(seed)
    Hkv = Hkv or H
    q = (torch.randn(B, H, Tq, D, generator=g) * scale).to(dtype)  # (B, H, Tq, D)
    k = torch.randn(B, Hkv, Tk, D, generator=g).to(dtype)  # (B, Hkv, Tk, D)
    v = torch.randn(B, Hkv, Tk, D, generator=g).to(dtype)  # (B, Hkv, Tk, D)
    do = torch.randn(B, H, Tq, D, generator=g).to(dtype)  # (B, H, Tq, D)
    return [t.to(DEVICE) for t in (q, k, v, do)]


def check_against_float64(q, k, v, do, causal, tol=None):
    """Run the kernel forward and backward and compare o, dq, dk, dv with the float64 oracle."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    o = triton_attention(q, k, v, causal=causal)
    o.backward(do)
    # the oracle sees the very same (already rounded) inputs, in float64
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    o64 = naive_attention(q64, k64, v64, causal)
    o64.backward(do.double())
    assert o.dtype == q.dtype and o.shape == q.shape
    tol = tol or TOL[q.dtype]
    pairs = [("o", o, o64), ("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad), ("dv", v.grad, v64.grad)]
    scales = resolvable_scales(q, k, v, do, causal)
    for name, got, want in pairs:
        assert got.dtype == q.dtype, name
        assert torch.isfinite(got).all(), f"{name} has NaN/inf"
        scale = max(want.abs().max().item(), scales[name])
        torch.testing.assert_close(got.double(), want, rtol=0, atol=tol * scale, msg=lambda m: f"{name}: {m}")


def resolvable_scales(q, k, v, do, causal):
    """Per output, the size of the terms it sums (not of the sum): what its rounding is relative to, from the inputs.

    o = P V and dV = P^T dO are sums of nonnegative weights times v or dO: their errors scale with P |V| and
    P^T |dO| (computed here in float64), which an o or dV that cancels to ~0 would not show. dQ and dK are sums
    of dS = P * (dP - delta), a difference of terms of size |dO| |V| that cancels exactly when a query sees one
    key (dq = dk = 0): their rounding is relative to max |dO| max |V|."""
    q64, k64, v64 = (t.detach().double() for t in (q, k, v))
    v_abs = v64.abs().requires_grad_()
    o_abs = naive_attention(q64, k64, v_abs, causal)  # P |V|
    o_abs.backward(do.detach().double().abs())  # v_abs.grad = P^T |dO|
    cancelling = (do.abs().max() * v.abs().max()).item()
    return dict(o=o_abs.max().item(), dv=v_abs.grad.max().item(), dq=cancelling, dk=cancelling)


# (B, H, Tq, Tk, D, causal): single token, odd tails, Tq < Tk (prefill onto a cache), every native head dim
FP32_CASES = [
    (1, 2, 1, 1, 16, True),  # one query, one key: the diagonal is the only visible key
    (1, 2, 1, 1, 16, False),
    (1, 2, 17, 17, 16, True),
    (2, 1, 17, 17, 32, False),
    (1, 2, 100, 100, 16, True),
    (1, 1, 100, 100, 16, False),
    (1, 2, 129, 129, 32, True),
    (1, 1, 1, 17, 16, True),  # decoding one token against a cache
    (1, 2, 5, 100, 32, True),
    (1, 1, 5, 100, 16, False),
    (1, 1, 37, 100, 16, True),  # bottom-right offset not a multiple of any block size
    (1, 1, 33, 33, 64, True),
    (1, 1, 17, 40, 64, False),
    (1, 1, 17, 17, 128, True),
    (1, 1, 3, 20, 128, True),
]


@pytest.mark.parametrize("B,H,Tq,Tk,D,causal", FP32_CASES)
def test_float32_matches_float64(B, H, Tq, Tk, D, causal):
    check_against_float64(*make_inputs(B, H, Tq, Tk, D, torch.float32), causal)


# Tk - Tq through every residue modulo the block sizes (16 and 32 in the interpreter, up to 128 on a GPU),
# with at least two query blocks: an off-by-one in where the unmasked key blocks end, where the masked ones
# stop, or where dK/dV's query walk starts shows only for some offsets
SHIFT_TQ, SHIFTS = (40, range(34)) if INTERPRETED else (300, range(130))


@pytest.mark.parametrize("shift", SHIFTS)
def test_every_diagonal_offset(shift):
    q, k, v, do = make_inputs(1, 1, SHIFT_TQ, SHIFT_TQ + shift, 16, torch.float32, seed=shift)
    check_against_float64(q, k, v, do, causal=True)


# grouped-query attention, (B, H, Hkv, Tq, Tk, D, causal): dK/dV of a kv head sum over its query heads, which
# see different keys near the diagonal; Tq < Tk puts the diagonal off the block grid
GQA_CASES = [
    (1, 4, 2, 17, 40, 16, True),
    (2, 6, 2, 33, 33, 32, True),
    (1, 3, 1, 5, 37, 16, True),  # every query head on one kv head (multi-query attention)
    (1, 4, 2, 9, 30, 16, False),
]


@pytest.mark.parametrize("B,H,Hkv,Tq,Tk,D,causal", GQA_CASES)
def test_grouped_kv_heads_match_float64(B, H, Hkv, Tq, Tk, D, causal):
    check_against_float64(*make_inputs(B, H, Tq, Tk, D, torch.float32, seed=H + Tq, Hkv=Hkv), causal)


def test_grouped_kv_heads_bfloat16_and_dispatch(monkeypatch):
    check_against_float64(*make_inputs(1, 4, 20, 20, 32, torch.bfloat16, Hkv=2), causal=True)
    q, k, v, _ = make_inputs(2, 4, 7, 19, 16, torch.float32, Hkv=1)
    monkeypatch.setenv("MINIPOST_KERNELS", "triton")
    got = kernels.attention(q, k, v, causal=True)
    want = kernels.reference.attention_reference(q, k, v, causal=True)  # the CPU path, SDPA's enable_gqa
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("D", [8, 24, 80])  # padded to 16, 32, 128 with masked loads
def test_head_dim_not_a_power_of_two(D):
    check_against_float64(*make_inputs(1, 1, 19, 19, D, torch.float32), causal=True)


@pytest.mark.parametrize("B,H,Tq,Tk,D,causal,dtype", [
    (1, 2, 100, 100, 64, True, torch.bfloat16),
    (1, 1, 129, 129, 16, False, torch.bfloat16),
    (1, 1, 5, 100, 32, True, torch.bfloat16),
    (1, 2, 100, 100, 32, True, torch.float16),
    (1, 1, 1, 17, 128, True, torch.float16),
])
def test_half_precision_matches_float64(B, H, Tq, Tk, D, causal, dtype):
    check_against_float64(*make_inputs(B, H, Tq, Tk, D, dtype), causal)


def test_large_scores_stay_finite():
    # |scores| up to ~100: exp of them overflows float32 without the running max; hidden keys score higher
    # than visible ones half the time, so a leak through the causal mask would show up as an O(1) error.
    # Rounding a score s in float32 moves exp(s) by |s| * 6e-8 relative, ~6e-6 here (measured 5e-6): 5e-5.
    check_against_float64(*make_inputs(1, 2, 40, 40, 16, torch.float32, scale=25.0), causal=True, tol=5e-5)


@pytest.mark.skipif(not INTERPRETED, reason="block sizes are autotuned on CUDA")
@pytest.mark.parametrize("blocks", [
    dict(fwd=(16, 16), dkdv=(16, 16), dq=(16, 16)),  # square tiles: the diagonal sits inside one block
    dict(fwd=(16, 32), dkdv=(32, 16), dq=(16, 32)),  # key tiles wider than query tiles in fwd / dq
])
@pytest.mark.parametrize("Tq,Tk", [(100, 100), (37, 100), (1, 50)])
def test_other_block_layouts(monkeypatch, blocks, Tq, Tk):
    monkeypatch.setattr(attn_mod, "INTERPRET_BLOCKS", blocks)
    # two query heads on one kv head: dK/dV's walk over the group runs under each layout too
    check_against_float64(*make_inputs(1, 2, Tq, Tk, 16, torch.float32, Hkv=1), causal=True)


def test_non_contiguous_inputs():
    # q, k, v as the model makes them: (B, T, H, D) storage viewed as (B, H, T, D); dO likewise
    B, H, T, D = 2, 2, 21, 16
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(B, T, 3, H, D, generator=g).to(DEVICE)  # (B, T, 3, H, D)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # each (B, H, T, D), strided
    do = torch.randn(B, T, H, D, generator=g).to(DEVICE).transpose(1, 2)  # (B, H, T, D), strided
    assert not q.is_contiguous() and not do.is_contiguous()
    check_against_float64(q, k, v, do, causal=True)


def test_dispatch_matches_reference(monkeypatch):
    # kernels.attention forced onto Triton agrees with the torch reference path it replaces
    q, k, v, _ = make_inputs(1, 2, 9, 30, 16, torch.float32)
    monkeypatch.setenv("MINIPOST_KERNELS", "triton")
    got = kernels.attention(q, k, v, causal=True)
    want = kernels.reference.attention_reference(q, k, v, causal=True)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())


def test_public_attention_survives_kernel_import():
    # in a fresh interpreter: the first Triton-path call imports minipost/kernels/flash_attention.py; the model calls
    # kernels.attention again in the next layer, so the package must still hold the function afterwards
    code = ("import torch; from minipost import kernels; q = torch.randn(1, 1, 4, 16, device='%s'); "
            "[kernels.attention(q, q, q) for _ in range(2)]; assert callable(kernels.attention)" % DEVICE)
    env = {**os.environ, "MINIPOST_KERNELS": "triton"}
    if INTERPRETED:
        env["TRITON_INTERPRET"] = "1"
    root = pathlib.Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]


def test_rejects_bad_inputs():
    q, k, v, _ = make_inputs(1, 1, 4, 4, 16, torch.float32)
    with pytest.raises(ValueError, match="16, 32, 64 and 128"):
        big = torch.zeros(1, 1, 4, 256, device=DEVICE)
        triton_attention(big, big, big)
    with pytest.raises(ValueError, match="dtype"):
        triton_attention(q, k.half(), v)
    with pytest.raises(ValueError, match="T_q=5 must be <= T_k=4"):
        triton_attention(torch.zeros(1, 1, 5, 16, device=DEVICE), k, v)
    q3, k2, v2, _ = make_inputs(1, 3, 4, 4, 16, torch.float32, Hkv=2)
    with pytest.raises(ValueError, match="Hkv dividing H"):  # 2 kv heads cannot serve 3 query heads
        triton_attention(q3, k2, v2)


def train_losses(mode, monkeypatch, steps=4):
    """Losses of a few AdamW steps of a tiny GPT with attention on path `mode` (the rest is plain torch)."""
    monkeypatch.setenv("MINIPOST_KERNELS", mode)
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=64)).to(DEVICE)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    idx = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(0)).to(DEVICE)  # (B, T)
    losses = []
    for _ in range(steps):
        hidden = model(idx[:, :-1])  # (B, T-1, C): attention goes through kernels.attention
        # cross-entropy in plain torch so that only the attention kernel differs between the two runs
        loss = F.cross_entropy(model.logits(hidden).flatten(0, 1), idx[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_tiny_gpt_training_matches_torch(monkeypatch):
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return triton_attention(*args, **kwargs)

    monkeypatch.setattr(attn_mod, "triton_attention", counted)  # minipost/kernels/__init__ looks it up per call
    triton_losses = train_losses("triton", monkeypatch)
    assert len(calls) == 4 * 2  # steps * layers: the kernel really ran
    torch_losses = train_losses("torch", monkeypatch)
    assert len(calls) == 8
    assert triton_losses[-1] < triton_losses[0]  # it does train
    # Both runs are float32 and differ only by rounding inside attention (~1e-7 relative). Four AdamW
    # steps can amplify that on coordinates whose gradient is ~0 (Adam normalises them), but the losses
    # (~4.2 = log 64) agree to ~1e-6 in practice; 1e-4 absolute is still far below the ~0.1 the loss moves
    # per step, so a wrong gradient anywhere in attention fails this.
    torch.testing.assert_close(torch.tensor(triton_losses), torch.tensor(torch_losses), rtol=0, atol=1e-4)


@pytest.mark.parametrize("mode", ["triton", "torch"])
def test_autocast_hands_attention_bf16(monkeypatch, mode):
    """Under torch.autocast(bf16), float32 q, k, v reach attention rounded to bf16 on either path (the Triton
    kernel then uses tensor cores on a GPU); the output is bf16 and matches float64 on the rounded inputs,
    gradients come back float32."""
    q, k, v, do = make_inputs(1, 2, 20, 45, 16, torch.float32)
    seen = []

    def spy(q, k, v, causal=True):
        seen.append((q.dtype, k.dtype, v.dtype))
        return triton_attention(q, k, v, causal=causal)

    monkeypatch.setattr(attn_mod, "triton_attention", spy)
    monkeypatch.setenv("MINIPOST_KERNELS", mode)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        o = kernels.attention(q, k, v, causal=True)
    o.backward(do.bfloat16())
    assert seen == ([(torch.bfloat16,) * 3] if mode == "triton" else [])
    assert o.dtype == torch.bfloat16 and q.grad.dtype == k.grad.dtype == v.grad.dtype == torch.float32
    q64, k64, v64 = (t.detach().bfloat16().double().requires_grad_() for t in (q, k, v))
    o64 = naive_attention(q64, k64, v64, causal=True)
    o64.backward(do.bfloat16().double())
    scales = resolvable_scales(q64, k64, v64, do.bfloat16(), causal=True)
    for name, got, want in [("o", o, o64), ("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad), ("dv", v.grad, v64.grad)]:
        scale = max(want.abs().max().item(), scales[name])
        torch.testing.assert_close(got.double(), want, rtol=0, atol=TOL[torch.bfloat16] * scale, msg=name)


def test_autotuning_persists_and_buckets_lengths():
    """The interpreter does not autotune, so this checks the tuning's set-up, not its speed: the autotuners keep
    their results on disk (Triton's cache_results, which 3.6 and 3.9 both take; Triton turns it off only under
    the interpreter), time configs briefly, and key lengths by bucket: one for T <= 256, then powers of two (3
    buckets up to 1024, not 7)."""
    opts = attn_mod.autotune_options()
    assert opts["cache_results"] is True and opts["key"] == attn_mod._TUNE_KEY
    assert opts["do_bench"].keywords == dict(warmup=attn_mod.TUNE_WARMUP_MS, rep=attn_mod.TUNE_REP_MS)
    tuned = attn_mod.make_tuned()  # what CUDA runs: triton.autotune takes every option and key name
    assert sorted(tuned) == ["dkdv", "dq", "fwd"]
    for tuner in tuned.values():
        assert tuner.keys == attn_mod._TUNE_KEY
        assert tuner.do_bench.keywords == opts["do_bench"].keywords
        assert len(tuner.configs) > 1  # something to tune
    assert [attn_mod._bucket(t) for t in (1, 17, 256, 257, 512, 513, 1024, 1025, 10**6)] == \
        [256, 256, 256, 512, 512, 1024, 1024, 2048, 16384]
    assert len({attn_mod._bucket(t) for t in range(1, 1025)}) == 3


@pytest.mark.parametrize("name, group", [("fwd", 1), ("dkdv", 1), ("dkdv", 4), ("dq", 1)])
def test_untuned_config_is_the_first_listed(monkeypatch, name, group):
    """MINIPOST_AUTOTUNE=0 runs the first config of each kernel's list (the compile report's favourite)."""
    monkeypatch.setenv("MINIPOST_AUTOTUNE", "0")
    assert not attn_mod.tuning_enabled()
    for dtype in (torch.bfloat16, torch.float32):
        for head_dim in (16, 64, 128):
            want = attn_mod.cuda_configs(name, dtype, head_dim, group)[0]
            assert attn_mod.untuned_config(name, dtype, head_dim, group) == want
    monkeypatch.setenv("MINIPOST_AUTOTUNE", "1")
    assert attn_mod.tuning_enabled()
    for bad in ("off", "false", ""):  # not silently "on": a UserError, one line and exit code 2 in scripts
        monkeypatch.setenv("MINIPOST_AUTOTUNE", bad)
        with pytest.raises(UserError, match=f"MINIPOST_AUTOTUNE='{bad}': expected one of 1, 0"):
            attn_mod.tuning_enabled()


def test_untuned_launch_path_matches_float64(monkeypatch):
    """The CUDA launch with MINIPOST_AUTOTUNE=0 (the raw kernels, each with its first listed config and launch
    options), driven through the interpreter: the same grid and arguments a GPU gets, checked against float64.
    Float32 inputs (the interpreter's bf16 dot needs the UPCAST flag that this path, as on a GPU, leaves off)."""
    monkeypatch.setattr(attn_mod, "_INTERPRET", False)  # the launch a GPU takes (the kernels stay interpreted here)
    monkeypatch.setenv("MINIPOST_AUTOTUNE", "0")
    launched = []
    kernels_ = dict(attn_mod._KERNELS)

    class Spy:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched.append((self.name, kwargs["BLOCK_M"], kwargs["BLOCK_N"], kwargs["num_stages"],
                                 kwargs["num_warps"]))
                return kernels_[self.name][grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(attn_mod, "_KERNELS", {name: Spy(name) for name in kernels_})
    q, k, v, do = make_inputs(1, 2, 40, 40, 16, torch.float32)
    o, lse = attn_mod._forward(q, k, v, True)
    dq, dk, dv = attn_mod._backward(q, k, v, o, lse, do, True)
    assert launched == [(name, *attn_mod.cuda_configs(name, torch.float32, 16)[0]) for name in ("fwd", "dkdv", "dq")]
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    o64 = naive_attention(q64, k64, v64, True)
    o64.backward(do.double())
    for got, want in [(o, o64), (dq, q64.grad), (dk, k64.grad), (dv, v64.grad)]:
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5 * want.abs().max().item())
