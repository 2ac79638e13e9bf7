"""Fused per-token log-prob (and entropy) of the LM head, in Triton: the (N, V) logits never reach memory.

    triton_token_logprobs(hidden, weight, targets, temperature=1.0, return_entropy=False) -> logp [, entropy]

hidden (N, C), weight (V, C), targets (N,) int64 (negative = ignored: logp 0, entropy 0, no gradient).
With logits z = hidden @ weight.T / temperature  (N, V),  lse_i = log sum_j exp(z_ij),  p_ij = exp(z_ij - lse_i):

    logp_i    = z_i,t_i - lse_i                                  (<= 0: z_i,t_i <= max_j z_ij <= lse_i)
    entropy_i = -sum_j p_ij log p_ij = log s_i - u_i / s_i,
        with m_i = max_j z_ij,  s_i = sum_j e^(z_ij - m_i),  u_i = sum_j e^(z_ij - m_i) (z_ij - m_i)

Both are float32 of shape (N,). Semantics are those of kernels/reference.py:token_logprobs_reference.

Forward (_token_logprob_fwd_kernel): one program per (token block, vocabulary split). It walks its vocabulary
tiles; each logits tile (BLOCK_N, BLOCK_V) is a float32 tl.dot accumulated over C in BLOCK_C chunks, then folded
into a running max m, sum s and u (online log-sum-exp, base-2 exp2), and the target logit is picked out when its
column passes by. The splits (there only to fill the GPU when N is small) are merged on the host in O(N * splits).
Saved for backward: hidden, weight, targets, lse (N,) float32 and, if returned, entropy (N,). Nothing (N, V).

Backward. With upstream gradients g_i = dL/dlogp_i and k_i = dL/dentropy_i (both 0 on ignored rows):
    dlogp_i/dz_ij    = [j = t_i] - p_ij
    dentropy_i/dz_ij = -p_ij (log p_ij + entropy_i)
        (H = lse - sum_k p_k z_k;  d/dz_j sum_k p_k z_k = p_j + p_j (z_j - sum_k p_k z_k) = p_j + p_j (log p_j + H))
    dz_ij = g_i ([j = t_i] - p_ij) - k_i p_ij (log p_ij + entropy_i)
    dhidden = (dz / temperature) @ weight   (N, C)        dweight = (dz / temperature).T @ hidden   (V, C)
Both backward kernels recompute logits tiles from (hidden, weight) and get p from the saved lse, so no atomics:
  _token_logprob_bwd_kernel     (dhidden): program per (token block, vocabulary split), walks vocabulary tiles;
  _token_logprob_bwd_dw_kernel  (dweight): program per vocabulary block, walks token blocks.
Each adds dz_tile @ (weight or hidden) chunk by chunk of C into a float32 buffer it alone owns (read-modify-write:
C up to 4096+ does not fit on chip), cast to the input dtype at the end. Token blocks whose targets are all
ignored are skipped in every kernel (prompt and padding tokens cost nothing).

Cost: forward 2NCV flops; backward 8NCV (each kernel recomputes the logits, 2NCV, then one 2NCV matmul), against
6NCV for an unfused forward+backward that keeps the (N, V) logits. The float32 read-modify-write moves about
8NC * V/BLOCK_V bytes (dhidden) and 8VC * N/BLOCK_N bytes (dweight): 64 flops per byte at 128 x 128 tiles, which
L2 only partly absorbs when C is large; this, not the matmuls, is what to watch in a GPU profile.

Precision: float32 accumulation everywhere. Float32 inputs use input_precision="ieee" dots (full float32; TF32's
10-bit mantissa would miss the 1e-5 target). bf16/fp16 inputs use tensor-core dots with float32 accumulation:
products of 16-bit numbers are exact in float32, so logits lose nothing; dz is rounded to the input dtype only as
the operand of the gradient matmuls (as in any bf16 autograd graph), never the logits or lse.
"""
import math
import os

import torch
import triton
import triton.language as tl

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * log2(e))


# ----------------------------------------------------------------------------------------------------------
# Triton building blocks


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b with float32 accumulation. UPCAST: only under Triton's interpreter, whose bf16 dot is broken
    (Triton 3.9 multiplies the raw uint16 storage); bf16 -> float32 is exact, so the result is what the GPU computes."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


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
        acc = _dot(a, tl.trans(b), acc, DOT_PRECISION, UPCAST)
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


@triton.jit
def _accumulate_rows(out_ptr, out_idx, out_mask, stride_out, d, src_ptr, src_idx, src_mask, stride_s0, stride_s1,
                     K, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """out[out_idx, :] += d @ src[src_idx, :] on a float32 buffer this program owns, BLOCK_K columns at a time."""
    out_rows = out_ptr + out_idx.to(tl.int64)[:, None] * stride_out  # (BLOCK_A, 1)
    src_rows = src_ptr + src_idx.to(tl.int64)[:, None] * stride_s0  # (BLOCK_B, 1)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        src = tl.load(src_rows + ks[None, :] * stride_s1, mask=src_mask[:, None] & k_ok[None, :], other=0.0)  # (B, K)
        out_ptrs = out_rows + ks[None, :]  # (A, K)
        out_ok = out_mask[:, None] & k_ok[None, :]
        acc = tl.load(out_ptrs, mask=out_ok, other=0.0)
        acc = _dot(d, src, acc, DOT_PRECISION, UPCAST)
        tl.store(out_ptrs, acc, mask=out_ok)


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
def _token_logprob_bwd_kernel(
    h_ptr, w_ptr, tgt_ptr, lse_ptr, ent_ptr, g_ptr, k_ptr,  # (N, C), (V, C), then (N,) each
    dh_ptr,  # (SPLITS, N, C) float32, zero-initialised; summed over splits on the host
    N, V, C, tiles_per_split, inv_temp,
    stride_hn, stride_hc, stride_wv, stride_wc,
    HAS_ENT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """dhidden[rows] += (dz / temperature) @ weight over one vocabulary split; logits recomputed from lse."""
    pid_n, pid_s = tl.program_id(0), tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
    valid = tgt >= 0
    n_valid = tl.sum(valid.to(tl.int32), axis=0)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    g = tl.where(valid, tl.load(g_ptr + rows, mask=row_ok, other=0.0), 0.0)
    if HAS_ENT:
        k = tl.where(valid, tl.load(k_ptr + rows, mask=row_ok, other=0.0), 0.0)
        ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
    else:
        k = g
        ent = lse
    dh_split = dh_ptr + pid_s.to(tl.int64) * N * C

    v_begin = pid_s * tiles_per_split * BLOCK_V
    v_end = tl.minimum(v_begin + tiles_per_split * BLOCK_V, V)
    v_end = tl.where(n_valid > 0, v_end, v_begin)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        z = _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, stride_hn, stride_hc, stride_wv, stride_wc, C,
                         BLOCK_N, BLOCK_V, BLOCK_C, DOT_PRECISION, UPCAST) * inv_temp  # (BLOCK_N, BLOCK_V)
        dz = _dlogits(z, cols[None, :] == tgt[:, None], col_ok[None, :], lse[:, None], g[:, None], k[:, None],
                      ent[:, None], HAS_ENT) * inv_temp
        _accumulate_rows(dh_split, rows, row_ok, C, dz.to(w_ptr.dtype.element_ty), w_ptr, cols, col_ok,
                         stride_wv, stride_wc, C, BLOCK_C, DOT_PRECISION, UPCAST)


@triton.jit
def _token_logprob_bwd_dw_kernel(
    h_ptr, w_ptr, tgt_ptr, lse_ptr, ent_ptr, g_ptr, k_ptr,
    dw_ptr,  # (V, C) float32, zero-initialised
    N, V, C, inv_temp,
    stride_hn, stride_hc, stride_wv, stride_wc,
    HAS_ENT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """dweight[cols] += (dz / temperature).T @ hidden over all token blocks; logits recomputed from lse."""
    cols = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < V
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
        valid = tgt >= 0
        if tl.sum(valid.to(tl.int32), axis=0) > 0:  # skip token blocks whose targets are all ignored
            lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
            g = tl.where(valid, tl.load(g_ptr + rows, mask=row_ok, other=0.0), 0.0)
            if HAS_ENT:
                k = tl.where(valid, tl.load(k_ptr + rows, mask=row_ok, other=0.0), 0.0)
                ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
            else:
                k = g
                ent = lse
            # tokens on the row axis, as in the other kernels: per-token values then cost a few registers
            z = _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, stride_hn, stride_hc, stride_wv, stride_wc,
                             C, BLOCK_N, BLOCK_V, BLOCK_C, DOT_PRECISION, UPCAST) * inv_temp  # (BLOCK_N, BLOCK_V)
            dz = _dlogits(z, cols[None, :] == tgt[:, None], col_ok[None, :], lse[:, None], g[:, None], k[:, None],
                          ent[:, None], HAS_ENT) * inv_temp
            _accumulate_rows(dw_ptr, cols, col_ok, C, tl.trans(dz.to(h_ptr.dtype.element_ty)), h_ptr, rows, row_ok,
                             stride_hn, stride_hc, C, BLOCK_C, DOT_PRECISION, UPCAST)


# ----------------------------------------------------------------------------------------------------------
# Host side


def _interpreted(t):
    return not t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def _config(hidden):
    """Tile and launch options (BLOCK_N, BLOCK_V, BLOCK_C, num_warps, num_stages), and programs to aim for.

    One tile shape for all three kernels: then the backward's recomputed logits are bit-identical to those the
    forward's lse came from. (With different shapes, rounding differs; on near-one-hot rows p_target then
    strays from 1 by the logits' rounding error and so does the gradient.)
    Under Triton's interpreter (CPU tensors) tiles are small, so the tests cross tile edges at small shapes.
    On CUDA: 128 x 128 x 64 for 16-bit inputs, picked by compiling for sm_90 and reading register use (255 at
    most, no spills), not by timing: a GPU run should tune it (kernels/bench_logprob.py). Float32 inputs
    (ieee dots on CUDA cores) get 64 x 64 x 16.
    """
    if _interpreted(hidden):
        return (32, 64, 32, 1, 1), 4
    sms = torch.cuda.get_device_properties(hidden.device).multi_processor_count
    if hidden.dtype == torch.float32:
        return (64, 64, 16, 4, 2), 2 * sms
    return (128, 128, 64, 8, 3), 2 * sms


def _vocab_splits(n_blocks, n_vtiles, programs, max_splits):
    """Split the vocabulary loop so that n_blocks * splits reaches `programs`; every split gets >= 1 tile."""
    want = min(max(1, math.ceil(programs / n_blocks)), n_vtiles, max_splits)
    tiles_per_split = math.ceil(n_vtiles / want)
    return math.ceil(n_vtiles / tiles_per_split), tiles_per_split


def _launch_options(hidden):
    """-> (BLOCK_N, BLOCK_V, programs, keyword arguments shared by the three kernel launches)."""
    (bn, bv, bc, warps, stages), programs = _config(hidden)
    opts = dict(BLOCK_N=bn, BLOCK_V=bv, BLOCK_C=bc, num_warps=warps, num_stages=stages,
                # "ieee" only matters for float32 operands: full-precision dots (TF32 would miss 1e-5)
                DOT_PRECISION="ieee" if hidden.dtype == torch.float32 else "tf32",
                UPCAST=_interpreted(hidden) and hidden.dtype == torch.bfloat16)  # see _dot
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


def _backward(hidden, weight, targets, lse, entropy, g_logp, g_ent, inv_temp, need_dh, need_dw):
    """Launch the dhidden and/or dweight kernels -> (dhidden, dweight) in the input dtypes (or None)."""
    N, C = hidden.shape
    V = weight.shape[0]
    bn, bv, programs, opts = _launch_options(hidden)
    has_ent = g_ent is not None
    g = g_logp.float().contiguous() if g_logp is not None else torch.zeros_like(lse)
    k = g_ent.float().contiguous() if has_ent else g  # unread without HAS_ENT
    ent = entropy if has_ent else lse
    common = (N, V, C)
    strides = (hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1))
    dh = dw = None
    if need_dh:
        n_blocks = triton.cdiv(N, bn)
        # a few vocabulary splits when N is small: each costs one more float32 (N, C) buffer
        splits, tiles_per_split = _vocab_splits(n_blocks, triton.cdiv(V, bv), programs, max_splits=4)
        dh32 = torch.zeros(splits, N, C, device=hidden.device, dtype=torch.float32)  # (SPLITS, N, C)
        _token_logprob_bwd_kernel[(n_blocks, splits)](
            hidden, weight, targets, lse, ent, g, k, dh32, *common, tiles_per_split, inv_temp, *strides,
            HAS_ENT=has_ent, **opts)
        dh = (dh32[0] if splits == 1 else dh32.sum(dim=0)).to(hidden.dtype)
    if need_dw:
        dw32 = torch.zeros(V, C, device=weight.device, dtype=torch.float32)  # (V, C)
        _token_logprob_bwd_dw_kernel[(triton.cdiv(V, bv),)](
            hidden, weight, targets, lse, ent, g, k, dw32, *common, inv_temp, *strides, HAS_ENT=has_ent, **opts)
        dw = dw32.to(weight.dtype)
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
