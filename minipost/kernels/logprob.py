"""Fused per-token log-prob (and entropy) of the LM head, in Triton, without ever holding the (N, V) logits.

    triton_token_logprobs(hidden, weight, targets, temperature=1.0, return_entropy=False) -> logp [, entropy]

hidden (N, C), weight (V, C), targets (N,) int64 (negative = ignored: logp 0, entropy 0, no gradient).
With logits z = hidden @ weight.T / temperature  (N, V),  lse_i = log sum_j exp(z_ij),  p_ij = exp(z_ij - lse_i):

    logp_i    = z_i,t_i - lse_i                                  (<= 0: z_i,t_i <= max_j z_ij <= lse_i)
    entropy_i = -sum_j p_ij log p_ij = log s_i - u_i / s_i,
        with m_i = max_j z_ij,  s_i = sum_j e^(z_ij - m_i),  u_i = sum_j e^(z_ij - m_i) (z_ij - m_i)

Both are float32 of shape (N,). Semantics are those of minipost/kernels/reference.py:token_logprobs_reference.

Forward (_token_logprob_fwd_kernel): one program per (token block, vocabulary split). It walks its vocabulary
tiles; each logits tile (BLOCK_N, BLOCK_V) is a tl.dot accumulated in float32 over C in BLOCK_C chunks, then
folded into a running max m, sum s and u (online log-sum-exp, base-2 exp2), and the target logit is picked out
when its column passes by. The splits (there only to fill the GPU when N is small) are merged on the host in
O(N * splits). Saved for backward: hidden, weight, targets, lse (N,) float32 and, if returned, entropy (N,).

Backward. With upstream gradients g_i = dL/dlogp_i and k_i = dL/dentropy_i (both 0 on ignored rows):
    dlogp_i/dz_ij    = [j = t_i] - p_ij
    dentropy_i/dz_ij = -p_ij (log p_ij + entropy_i)
        (H = lse - sum_k p_k z_k;  d/dz_j sum_k p_k z_k = p_j + p_j (z_j - sum_k p_k z_k) = p_j + p_j (log p_j + H))
    dz_ij = g_i ([j = t_i] - p_ij) - k_i p_ij (log p_ij + entropy_i)
    dhidden = (dz / temperature) @ weight   (N, C)        dweight = (dz / temperature).T @ hidden   (V, C)
It goes through the kept tokens (target >= 0) by vocabulary slices and, in each, token chunks (CHUNK_BYTES and
SLICE_BYTES): `_dlogits_kernel` recomputes a block's logits from (hidden, weight) and writes dz (n, cols) in the
input dtype, with p from the saved lse; then two GEMMs (cuBLAS) into float32 accumulators: dh32 += dz @ W[slice]
and dW32 += dz^T h, each rounded once to the input dtype (dW32 when its slice is done, dh32 at the end).

Why recompute rather than keep gradients from the forward (Liger's fused linear cross-entropy computes dh and
dW during the forward and needs no backward matmuls at all): this op returns per-token log-probs, and their
upstream gradient (a PPO ratio, a DPO margin, an entropy bonus) is unknown until the backward. So the logits
are computed twice; the question is only how the backward spends its 6NCV flops and its bytes.

Cost of forward + backward, flops and bytes of the (N, V) terms (B: 2 for bf16):
                                           flops    bytes per logit      memory beyond inputs
  unfused torch (16-bit matmul, float32     6NCV    ~42: B logits, float32  ~14 bytes x N x V
    log_softmax and its backward)                   copies, softmax grad
  this kernel                               8NCV    6: dz written, read     CHUNK_BYTES + SLICE_BYTES
                                                    by both GEMMs; + dW     + N x C x 4 (dh32)
                                                    float32 adds per chunk
  Cut Cross-Entropy (recompute inside one   8NCV    ~0 (all on chip),       none
    kernel, atomics for the gradients)              plus atomics
  previous version here (two recompute      10NCV   N V C/16 of float32     none
    kernels, read-modify-write of dh/dW)            read-modify-write
Predicted on an H100/H200 (bf16 GEMMs at ~600 TFLOP/s achieved, ~3 TB/s; not yet measured on a GPU):
  (N, C, V) = (16384, 768, 50257): unfused 3.8 TFLOP = 6.3 ms + 35 GB = 11.5 ms -> ~18 ms, ~10 GB;
      this kernel 5.1 TFLOP = 8.4 ms + 4.9 GB dz + ~4.5 GB float32 dW and dh adds (3 slices x 11 chunks) = 3 ms
      -> ~11 ms (1.6x), 0.3 GB. (Measured on an H200, issue 26, before the slices: 17.4 ms, 0.57 GB.)
  (N, C, V) = (8192, 2048, 2048): unfused 0.21 TFLOP = 0.34 ms + 0.7 GB = 0.23 ms -> ~0.6 ms;
      this kernel 0.27 TFLOP = 0.46 ms + 0.1 GB -> ~0.5 ms (1.1x): a small vocabulary gains little either way.
minipost/kernels/bench_logprob.py measures these; minipost/kernels/BENCHMARKS.md records what a GPU gave.

Precision: float32 accumulation everywhere. Float32 inputs use input_precision="ieee" dots (full float32; TF32's
10-bit mantissa would miss the 1e-5 target). bf16/fp16 inputs use tensor-core dots with float32 accumulation:
products of 16-bit numbers are exact in float32, so logits lose nothing; dz is rounded to the input dtype only as
the operand of the gradient GEMMs (as in any bf16 autograd graph), never the logits or lse. Under autocast,
minipost/kernels/__init__.py hands this op the autocast dtype (hidden and weight rounded to it), so training takes the
tensor-core path.
"""
import math
import os

import torch
import triton
import triton.language as tl

from .triton_blocks import LOG2E, dot


# ----------------------------------------------------------------------------------------------------------
# Triton building blocks


@triton.jit
def _to_bf16_rounded(x, dtype, INTERPRETED_BF16: tl.constexpr):
    """x.to(dtype), rounding to nearest even. Compiled Triton rounds float32 -> bf16 that way; its interpreter
    (3.6 - 3.9) truncates, a bias of up to 1 ulp that doubled the interpreter's dhidden error. There, add half an ulp
    (minus one, plus the kept bit: ties to even) to the float32 bits first, so that truncating rounds to nearest.
    Finite normal numbers only (dz is finite); zeros and subnormals, which the interpreter converts its own way,
    pass unchanged."""
    if INTERPRETED_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        nearest = (bits + 0x7FFF + ((bits >> 16) & 1)).to(tl.float32, bitcast=True)
        x = tl.where(tl.abs(x) >= 1.1754943508222875e-38, nearest, x)  # float32's smallest normal
    return x.to(dtype)


@triton.jit
def _logits_tile(a_ptr, b_ptr, a_idx, b_idx, a_mask, b_mask, stride_a0, stride_a1, stride_b0, stride_b1, K,
                 BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a[a_idx, :] @ b[b_idx, :].T in float32, BLOCK_K columns at a time -> (BLOCK_A, BLOCK_B). Masked rows give 0."""
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    a_rows = a_ptr + a_idx.to(tl.int64)[:, None] * stride_a0  # (BLOCK_A, 1); int64: V * C can pass 2**31
    b_rows = b_ptr + b_idx.to(tl.int64)[:, None] * stride_b0  # (BLOCK_B, 1)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(a_rows + ks[None, :] * stride_a1, mask=a_mask[:, None] & k_ok[None, :], other=0.0)  # (A, K)
        b = tl.load(b_rows + ks[None, :] * stride_b1, mask=b_mask[:, None] & k_ok[None, :], other=0.0)  # (B, K)
        acc = dot(a, tl.trans(b), acc, DOT_PRECISION, UPCAST)
    return acc


@triton.jit
def _dlogits(z, is_target, col_ok, lse, g, k, ent, HAS_ENT: tl.constexpr):
    """dL/dz for one logits tile; per-token operands (lse, g, k, ent) come pre-broadcast along the token axis."""
    logp = z - lse
    # logp <= 0 on real columns (lse >= max z, bit-identical z); the clamp only keeps padding columns, zeroed
    # next, from overflowing when lse is far below 0
    p = tl.where(col_ok, tl.exp2(tl.minimum(logp, 0.0) * LOG2E), 0.0)
    dz = tl.where(is_target, g, 0.0) - g * p
    if HAS_ENT:
        dz -= k * p * (logp + ent)
    return dz


# ----------------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _token_logprob_fwd_kernel(
    h_ptr, w_ptr, tgt_ptr,  # (N, C), (V, C), (N,)
    m_ptr, s_ptr, u_ptr, zt_ptr,  # (SPLITS, N) float32 partial statistics, one row per vocabulary split
    N, V, C, tiles_per_split, inv_temp,
    stride_hn, stride_hc, stride_wv, stride_wc,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Running max m, sum s = sum e^(z-m), u = sum e^(z-m) (z-m) and target logit over one vocabulary split."""
    pid_n, pid_s = tl.program_id(0), tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)  # (BLOCK_N,)
    n_valid = tl.sum((tgt >= 0).to(tl.int32), axis=0)

    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    u = tl.zeros((BLOCK_N,), dtype=tl.float32)
    zt = tl.zeros((BLOCK_N,), dtype=tl.float32)
    v_begin = pid_s * tiles_per_split * BLOCK_V
    v_end = tl.minimum(v_begin + tiles_per_split * BLOCK_V, V)
    v_end = tl.where(n_valid > 0, v_end, v_begin)  # every target ignored: nothing to compute
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        z = _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, stride_hn, stride_hc, stride_wv, stride_wc, C,
                         BLOCK_N, BLOCK_V, BLOCK_C, DOT_PRECISION, UPCAST) * inv_temp  # (BLOCK_N, BLOCK_V)
        z = tl.where(col_ok[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        d = z - m_new[:, None]  # <= 0; -inf on padding columns
        e = tl.exp2(d * LOG2E)
        alpha = tl.exp2((m - m_new) * LOG2E)  # rescales old sums; 0 on the first tile (m = -inf)
        shift = tl.where(s > 0, m - m_new, 0.0)  # (-inf) * 0 would be NaN on the first tile
        # sum e^(z-m') (z-m') over old columns = alpha * (u + (m - m') s)
        u = alpha * (u + shift * s) + tl.sum(e * tl.where(col_ok[None, :], d, 0.0), axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        zt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
        m = m_new

    done = s > 0  # rows of a skipped block get the harmless stats of one zero logit
    out = pid_s * N + rows
    tl.store(m_ptr + out, tl.where(done, m, 0.0), mask=row_ok)
    tl.store(s_ptr + out, tl.where(done, s, 1.0), mask=row_ok)
    tl.store(u_ptr + out, u, mask=row_ok)
    tl.store(zt_ptr + out, zt, mask=row_ok)


@triton.jit
def _dlogits_kernel(
    h_ptr, w_ptr, tgt_ptr, lse_ptr, ent_ptr, g_ptr, k_ptr,  # (N, C), (V, C), then (N,) each: one token chunk
    dz_ptr,  # (N, V) in the input dtype: this chunk's dL/dlogits, times 1/temperature
    N, V, C, inv_temp,
    stride_hn, stride_hc, stride_wv, stride_wc, stride_dn,
    HAS_ENT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """dz[rows, cols] = dL/dz / temperature for one (token block, vocabulary block); logits recomputed, p from lse.

    Token blocks vary fastest along the grid, so the programs running together share one weight tile (read once
    from memory) and re-read the chunk's hidden rows, which stay in L2."""
    pid_n, pid_v = tl.program_id(0), tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < V
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)  # (BLOCK_N,) relative to the slice: may lie outside it
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
    if HAS_ENT:
        k = tl.load(k_ptr + rows, mask=row_ok, other=0.0)
        ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
    else:
        k = g
        ent = lse
    z = _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, stride_hn, stride_hc, stride_wv, stride_wc, C,
                     BLOCK_N, BLOCK_V, BLOCK_C, DOT_PRECISION, UPCAST) * inv_temp  # (BLOCK_N, BLOCK_V)
    dz = _dlogits(z, cols[None, :] == tgt[:, None], col_ok[None, :], lse[:, None], g[:, None], k[:, None],
                  ent[:, None], HAS_ENT) * inv_temp
    ptrs = dz_ptr + rows.to(tl.int64)[:, None] * stride_dn + cols[None, :]
    tl.store(ptrs, _to_bf16_rounded(dz, dz_ptr.dtype.element_ty, UPCAST), mask=row_ok[:, None] & col_ok[None, :])


# ----------------------------------------------------------------------------------------------------------
# Host side


def _interpreted(t):
    return not t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


# (BLOCK_N, BLOCK_V, BLOCK_C, num_warps, num_stages) on CUDA, per input dtype, for both kernels: one tile shape
# so that the backward's recomputed logits are bit-identical to those the forward's lse came from (with other
# shapes rounding differs, and on near-one-hot rows p_target strays from 1 by the logits' rounding error, and
# so does the gradient). Chosen by compiling for sm_90 (`python -m minipost.kernels.bench compile`: registers, no
# spills, shared memory, wgmma instructions), not by timing: a GPU run should tune them (minipost/kernels/bench_logprob.py).
# Float32 (ieee dots on CUDA cores, for tests and users who ask for it) gets smaller tiles.
CUDA_CONFIGS = {torch.bfloat16: (128, 128, 64, 8, 3), torch.float16: (128, 128, 64, 8, 3),
                torch.float32: (64, 64, 16, 8, 2)}
INTERPRET_CONFIG = (32, 64, 32, 1, 1)  # small tiles under Triton's interpreter: tests cross tile edges cheaply


def _config(hidden):
    """Tile and launch options (BLOCK_N, BLOCK_V, BLOCK_C, num_warps, num_stages), and programs to aim for."""
    if _interpreted(hidden):
        return INTERPRET_CONFIG, 4
    sms = torch.cuda.get_device_properties(hidden.device).multi_processor_count
    return CUDA_CONFIGS[hidden.dtype], 2 * sms


def _vocab_splits(n_blocks, n_vtiles, programs, max_splits):
    """Split the vocabulary loop so that n_blocks * splits reaches `programs`; every split gets >= 1 tile."""
    want = min(max(1, math.ceil(programs / n_blocks)), n_vtiles, max_splits)
    tiles_per_split = math.ceil(n_vtiles / want)
    return math.ceil(n_vtiles / tiles_per_split), tiles_per_split


def _launch_options(hidden):
    """-> (BLOCK_N, BLOCK_V, programs, keyword arguments shared by both kernels' launches)."""
    (bn, bv, bc, warps, stages), programs = _config(hidden)
    opts = dict(BLOCK_N=bn, BLOCK_V=bv, BLOCK_C=bc, num_warps=warps, num_stages=stages,
                # "ieee" only matters for float32 operands: full-precision dots (TF32 would miss 1e-5)
                DOT_PRECISION="ieee" if hidden.dtype == torch.float32 else "tf32",
                UPCAST=_interpreted(hidden) and hidden.dtype == torch.bfloat16)  # see triton_blocks.dot
    return bn, bv, programs, opts


def _forward(hidden, weight, targets, inv_temp):
    """Launch the forward kernel and merge its vocabulary splits -> logp, entropy, lse, all (N,) float32."""
    N, C = hidden.shape
    V = weight.shape[0]
    bn, bv, programs, opts = _launch_options(hidden)
    n_blocks = triton.cdiv(N, bn)
    splits, tiles_per_split = _vocab_splits(n_blocks, triton.cdiv(V, bv), programs, max_splits=64)
    m, s, u, zt = torch.empty(4, splits, N, device=hidden.device, dtype=torch.float32)  # (SPLITS, N) each
    _token_logprob_fwd_kernel[(n_blocks, splits)](
        hidden, weight, targets, m, s, u, zt, N, V, C, tiles_per_split, inv_temp,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), **opts)
    # merge splits: rescale every split's sums to the global max M
    M = m.max(dim=0).values  # (N,)
    scale = torch.exp(m - M)  # (SPLITS, N)
    S = (scale * s).sum(dim=0)  # (N,) >= 1: the max logit contributes exp(0)
    U = (scale * (u + (m - M) * s)).sum(dim=0)  # (N,)
    lse = M + torch.log(S)
    ignored = targets < 0
    logp = (zt.sum(dim=0) - lse).masked_fill(ignored, 0.0)  # only the split holding the target adds to zt
    entropy = (torch.log(S) - U / S).masked_fill(ignored, 0.0)
    return logp, entropy, lse


# Working memory of the backward beyond its outputs (dh, dW in the input dtype), in two buffers:
#   dz      (tokens, columns) in the input dtype, <= CHUNK_BYTES
#   dW32    (columns, C) float32, the accumulator of one vocabulary slice, <= SLICE_BYTES
# plus dh32 (kept tokens, C) float32 (N C 4 bytes: 50 MB at N = 16384, C = 768). The backward walks the vocabulary
# in slices of `columns` and, inside each, the kept tokens in chunks: a slice's dW is finished (summed over every
# token in float32) and rounded before the next slice starts, so no (V, C) float32 tensor ever exists; dh sums its
# slices' contributions in dh32. 64 MiB each keeps every GEMM dimension >= ~1500 at GPT-2 and Llama-3 head shapes
# (tensor cores stay near full speed; smaller chunks would only add launches and dh32 read-modify-writes):
#   (N, C, V) = (16384, 768, 50257):  columns 21760 (3 slices), tokens 1536 (11 chunks), ~0.13 GB + dh32 0.05 GB
#   (8192, 2048, 128256):             columns 8192 (16 slices), tokens 4096 (2 chunks), ~0.13 GB + dh32 0.07 GB
#       predicted peak beyond the inputs ~0.8 GB with the 0.53 GB bf16 dW every method returns (was one (V, C)
#       float32 accumulator plus its float32 GEMM output, 2 x 1.05 GB: 2.26 GB on an H200; Liger 0.58 GB).
# Predicted time: about unchanged (the same 8NCV flops and dz bytes; dh32's read-modify-write, 2 x N C 4 bytes per
# slice, adds 2.1 GB = 0.7 ms at 16 slices on a 3 TB/s GPU to ~28 ms). Tests shrink both to cross their edges.
CHUNK_BYTES = 64 * 2**20
SLICE_BYTES = 64 * 2**20


def _slice_columns(V, C, block_v):
    """Vocabulary columns per slice: all of V if its float32 dW fits SLICE_BYTES, else a multiple of the tile."""
    if V * C * 4 <= SLICE_BYTES:
        return V
    return max(block_v, SLICE_BYTES // (4 * C) // block_v * block_v)


def _chunk_tokens(n, V, itemsize, block_n):
    """Tokens per backward chunk for V (padded) columns: as many as CHUNK_BYTES holds, a multiple of the token tile,
    at least one tile."""
    fit = max(block_n, CHUNK_BYTES // (V * itemsize) // block_n * block_n)
    return min(n, fit)


def padded_vocab(V):
    """Row stride of the dz buffer: V rounded up to a multiple of 64 elements."""
    return (V + 63) // 64 * 64


def _mm_f32(a, b):
    """a @ b with float32 output. 16-bit CUDA operands: a tensor-core GEMM that accumulates and writes float32
    (torch >= 2.8's out_dtype). Elsewhere widen first: exact for 16-bit values, so the result is the same.

    Also for dh = dz @ W, whose output is small (n, C) and whose reduction long (V): with a bf16 output, cuBLAS
    splits such a K = V sum and may add the partial sums in bf16 (torch.backends.cuda.matmul.
    allow_bf16_reduced_precision_reduction, on by default), several roundings of 2^-9 each: the likely cause of
    dhidden's 2.2e-2 error on an H200 at (16384, 768, 50257), vs 3.7e-3 for unfused torch, whose (N, V) gradient
    has an odd row stride that rules out those cuBLAS kernels. A float32 output rounds once, at the end."""
    if a.is_cuda and a.dtype in (torch.float16, torch.bfloat16):
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


_ADDMM_OUT_DTYPE = {}  # (device type, 16-bit dtype) -> whether addmm_out_dtype_works: probed once each


def addmm_out_dtype_works(device, dtype):
    """Whether torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc) adds a @ b (16-bit `dtype`) into a float32
    acc on `device`, correctly. Probed once on 16 x 16 tensors and cached: torch builds or versions that lack
    it (or, as some may, want acc in the operands' dtype) raise a TypeError or RuntimeError, and _addmm_f32_
    then takes its fallback on every call without trying again. Out of memory is no answer: it propagates."""
    key = (torch.device(device).type, dtype)
    if key not in _ADDMM_OUT_DTYPE:
        acc = torch.ones(16, 16, device=device)
        a = torch.ones(16, 16, device=device, dtype=dtype)
        try:
            torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
            works = bool((acc == 17).all())
        except torch.cuda.OutOfMemoryError:
            raise
        except (TypeError, RuntimeError):
            works = False
        _ADDMM_OUT_DTYPE[key] = works
    return _ADDMM_OUT_DTYPE[key]


def _addmm_f32_(acc, a, b):
    """acc += a @ b in place, acc float32: on CUDA one GEMM accumulating into acc (torch >= 2.8's addmm
    out_dtype, where addmm_out_dtype_works); elsewhere through a float32 product (see _mm_f32)."""
    if a.is_cuda and a.dtype in (torch.float16, torch.bfloat16) and addmm_out_dtype_works(a.device, a.dtype):
        return torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    return acc.add_(_mm_f32(a, b))


def accumulation_path(dtype):
    """How the backward's GEMMs accumulate dh and dW for CUDA inputs of `dtype` (for benchmark headers)."""
    if dtype not in (torch.float16, torch.bfloat16):
        return "float32 GEMMs"
    if addmm_out_dtype_works("cuda", dtype):
        return "addmm(out_dtype=float32) into the float32 accumulators"
    return "fallback: float32-output mm, then add (addmm(out_dtype=float32) unsupported here)"


def _backward(hidden, weight, targets, lse, entropy, g_logp, g_ent, inv_temp, need_dh, need_dw):
    """dhidden and/or dweight (input dtypes, or None) by vocabulary slices and token chunks (see CHUNK_BYTES).

    Only tokens whose target is not ignored are visited, so prompt and padding cost nothing. Per block of n tokens
    and a slice of columns: one Triton launch recomputes the block's logits (2 n C cols flops on tensor cores) and
    writes dz = dL/dlogits / temperature (n, cols) in the input dtype; then two GEMMs with float32 accumulators:
    dh32[rows] += dz @ W[slice] (n x cols x C) and dW32 += dz^T @ h (cols x n x C). dW32 is rounded into dW once
    its slice has seen every token, dh32 into dh at the end: each gradient entry is rounded once.
    """
    N, C = hidden.shape
    V = weight.shape[0]
    bn, bv, _, opts = _launch_options(hidden)
    dh = torch.zeros_like(hidden) if need_dh else None
    dw = torch.zeros_like(weight) if need_dw else None
    keep = (targets >= 0).nonzero().squeeze(1)  # (n_kept,): one device sync per backward
    n_kept = keep.numel()
    if not n_kept:
        return dh, dw
    has_ent = g_ent is not None
    h, tgt, lse = hidden[keep], targets[keep], lse[keep].contiguous()  # (n_kept, C), (n_kept,), (n_kept,)
    g = g_logp[keep].float() if g_logp is not None else torch.zeros_like(lse)
    k = g_ent[keep].float() if has_ent else g  # unread without HAS_ENT
    ent = entropy[keep].contiguous() if has_ent else lse
    cols = _slice_columns(V, C, bv)
    chunk = _chunk_tokens(n_kept, padded_vocab(cols), hidden.element_size(), bn)
    # rows padded to a multiple of 64 elements: aligned, vectorised stores (GPT-2's V = 50257 is odd)
    dz_buf = torch.empty(chunk, padded_vocab(cols), device=hidden.device, dtype=hidden.dtype)  # (chunk, cols)
    dh32 = torch.zeros(n_kept, C, device=hidden.device, dtype=torch.float32) if need_dh else None  # (n_kept, C)
    dw32 = torch.empty(cols, C, device=weight.device, dtype=torch.float32) if need_dw else None  # (cols, C)
    for v0 in range(0, V, cols):
        v1 = min(v0 + cols, V)
        w, tgt_slice = weight[v0:v1], tgt - v0  # (v1 - v0, C); targets outside the slice match no column
        if need_dw:
            dw32.zero_()
        for s in range(0, n_kept, chunk):
            e = min(s + chunk, n_kept)
            dz = dz_buf[:e - s, :v1 - v0]  # (n, v1 - v0)
            _dlogits_kernel[(triton.cdiv(e - s, bn), triton.cdiv(v1 - v0, bv))](
                h[s:e], w, tgt_slice[s:e], lse[s:e], ent[s:e], g[s:e], k[s:e], dz, e - s, v1 - v0, C, inv_temp,
                h.stride(0), h.stride(1), w.stride(0), w.stride(1), dz.stride(0),
                HAS_ENT=has_ent, **opts)
            if need_dh:
                _addmm_f32_(dh32[s:e], dz, w)  # (n, C)
            if need_dw:
                _addmm_f32_(dw32[:v1 - v0], dz.T, h[s:e])  # (v1 - v0, C)
        if need_dw:
            dw[v0:v1] = dw32[:v1 - v0]  # rounded once, to the weight's dtype
    if need_dh:
        dh.index_copy_(0, keep, dh32.to(hidden.dtype))
    return dh, dw


class TokenLogprob(torch.autograd.Function):
    """logp (N,) and entropy (N,) of softmax(hidden @ weight.T / temperature); see the module docstring."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, return_entropy):
        inv_temp = 1.0 / temperature
        logp, entropy, lse = _forward(hidden, weight, targets, inv_temp)
        ctx.inv_temp, ctx.return_entropy = inv_temp, return_entropy
        ctx.set_materialize_grads(False)  # an unused output gets grad None: its backward term is skipped
        if return_entropy:
            ctx.save_for_backward(hidden, weight, targets, lse, entropy)
            return logp, entropy
        ctx.save_for_backward(hidden, weight, targets, lse)
        return logp

    @staticmethod
    def backward(ctx, g_logp, g_ent=None):
        if ctx.return_entropy:
            hidden, weight, targets, lse, entropy = ctx.saved_tensors
        else:
            (hidden, weight, targets, lse), entropy = ctx.saved_tensors, None
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if (g_logp is None and g_ent is None) or not (need_dh or need_dw):
            dh = torch.zeros_like(hidden) if need_dh else None
            dw = torch.zeros_like(weight) if need_dw else None
            return dh, dw, None, None, None
        dh, dw = _backward(hidden, weight, targets, lse, entropy, g_logp, g_ent, ctx.inv_temp, need_dh, need_dw)
        return dh, dw, None, None, None


def triton_token_logprobs(hidden, weight, targets, temperature=1.0, return_entropy=False):
    """log softmax(hidden @ weight.T / temperature)[targets] (N,) float32, 0 where targets < 0 [, entropy (N,)].

    hidden (N, C) and weight (V, C) in float32, float16 or bfloat16 (mixed dtypes are promoted to a common one;
    gradients come back in each input's dtype), targets (N,) integer. Targets must be < V (not checked: that
    would cost a device sync).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1] or weight.shape[0] == 0:
        raise ValueError(f"token_logprobs: need hidden (N, C) and weight (V, C), got {tuple(hidden.shape)} "
                         f"and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"token_logprobs: targets {tuple(targets.shape)} must be ({hidden.shape[0]},)")
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"triton_token_logprobs: unsupported dtype {dtype} (float32, float16, bfloat16)")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    hidden, weight = hidden.to(dtype), weight.to(dtype)  # no-ops in the usual single-dtype case
    targets = targets.to(torch.int64).contiguous()
    if hidden.shape[0] == 0:  # nothing to launch; keep the outputs attached to the graph
        zero = hidden.sum() * 0.0 + weight.sum() * 0.0
        logp = zero.float().expand(0)
        return (logp, logp.clone()) if return_entropy else logp
    return TokenLogprob.apply(hidden, weight, targets, float(temperature), bool(return_entropy))
