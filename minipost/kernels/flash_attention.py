"""Fused softmax attention in Triton, forward and backward (FlashAttention-2 structure).

    triton_attention(q, k, v, causal=True) -> o        q (B, H, Tq, D), k and v (B, Hkv, Tk, D), Tq <= Tk

Same semantics as minipost/kernels/reference.py: o = softmax(q k^T / sqrt(D) + mask) v, where with causal=True the
queries are the last Tq positions of the key sequence, so query i sees keys j <= i + (Tk - Tq) (the mask is
aligned bottom-right). The (Tq, Tk) score matrix never reaches device memory. Grouped-query attention: Hkv
divides H and query head h reads key/value head h // (H / Hkv) straight from k and v (GROUP = H / Hkv query
heads share one; no repeated copy of K/V is made).

Forward (`_attn_fwd_kernel`, one program per (query block, batch*head)): the Q block stays on chip while
the program walks over K/V blocks with an online softmax in base 2. With s2 = (q . k) * sm_scale * log2(e):
    m_new = max(m, rowmax(s2));  p = exp2(s2 - m_new);  alpha = exp2(m - m_new)
    l = l * alpha + rowsum(p);   acc = acc * alpha + p @ V;   m = m_new
and at the end o = acc / l and lse2 = m + log2(l) = log2 sum_j exp2(s2_j) (float32, base 2, one per row).
Causal: key blocks that every row of the query block sees run without any mask code, only the blocks on
the diagonal (and the key tail when Tk is not a multiple of the block) are masked, and blocks above the
diagonal are never visited.

Backward (P recomputed from lse2, no atomics, every gradient accumulated in float32):
    P = exp2(s2 - lse2)                        (Tq, Tk), never stored
    Delta = rowsum(O * dO)                     `_attn_bwd_preprocess`, float32 (B*H, Tq)
    dV = P^T dO;   dP = dO V^T;   dS = P * (dP - Delta)
    dK = sm_scale * dS^T Q                     `_attn_bwd_dkdv_kernel`: K/V block on chip, walk over queries
                                               (of every query head in its group, summed)
    dQ = sm_scale * dS K                       `_attn_bwd_dq_kernel`: Q block on chip, walk over keys
Saved for backward: q, k, v, o and lse2 (B*H, Tq) float32; nothing of size Tq x Tk.

Head dims 16, 32, 64 and 128 run as they are; any other D <= 128 is padded to the next power of two with
masked loads. Inputs may be float32 (full-precision "ieee" dots), float16 or bfloat16 (tensor cores,
float32 accumulation; P and dS are rounded to the input dtype before their matmuls, as in FlashAttention).
Any strides are accepted. On CUDA the block sizes are autotuned over a few configs per dtype and head dim, none
of which spills on sm_90 (`python -m minipost.kernels.bench compile`), with the results kept on disk across
processes (MINIPOST_AUTOTUNE=0: no tuning, the first config; see _TUNE_KEY); under Triton's interpreter
(TRITON_INTERPRET=1, CPU tensors) small fixed blocks keep the tests fast.
"""
import functools
import math

import torch
import triton
import triton.language as tl

from . import env_setting
from .triton_blocks import LOG2E, dot

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 128

# Block sizes under the interpreter. Deliberately unequal so the tests cover a diagonal that spans several
# key blocks (forward, dQ) or several query blocks (dK/dV). Tests may swap these to cover other layouts.
INTERPRET_BLOCKS = dict(fwd=(32, 16), dkdv=(16, 32), dq=(32, 16))  # (BLOCK_M, BLOCK_N) per kernel


# ----------------------------------------------------------------------------------------------------------
# helpers shared by the kernels


@triton.jit
def _load_rows(ptr, rows, offs_d, stride_t, stride_d, n_rows, D, MASK_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    """Load a (len(rows), HEAD_DIM) tile; rows >= n_rows and columns >= D read as zero when masked."""
    ptrs = ptr + rows[:, None] * stride_t + offs_d[None, :] * stride_d
    if MASK_ROWS:
        if EVEN_D:
            x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < D), other=0.0)
    else:
        if EVEN_D:
            x = tl.load(ptrs)  # the hot path: a full block, no mask at all
        else:
            x = tl.load(ptrs, mask=offs_d[None, :] < D, other=0.0)
    return x


@triton.jit
def _key_range(start_m, Tq, Tk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """Key range of query block start_m: [0, full) needs no mask, [full, hi) is masked, [hi, Tk) is skipped.

    Query row i sees keys j <= i + (Tk - Tq). A key block [n, n + BLOCK_N) needs no mask when its last key
    is visible to the block's first row and it lies inside Tk; `full` is the largest multiple of BLOCK_N
    with that property. `hi` is one past the last key the block's last row sees.
    """
    if CAUSAL:
        shift = Tk - Tq
        full = tl.minimum(start_m * BLOCK_M + shift + 1, Tk) // BLOCK_N * BLOCK_N
        hi = tl.minimum((start_m + 1) * BLOCK_M + shift, Tk)
    else:
        full = Tk // BLOCK_N * BLOCK_N
        hi = Tk
    return full, hi


# ----------------------------------------------------------------------------------------------------------
# forward


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd, lo, hi, offs_m, Tq, Tk, D,
                    qk_scale, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,
                    CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(K, offs_n, offs_d, stride_kn, stride_kd, Tk, D, MASKED, EVEN_D)  # (BLOCK_N, HEAD_DIM)
        s = dot(q, tl.trans(k), tl.zeros([q.shape[0], BLOCK_N], tl.float32), PREC, UPCAST) * qk_scale
        if MASKED:  # key tail and, when causal, keys right of the diagonal
            keep = offs_n[None, :] < Tk
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None] + (Tk - Tq))
            s = tl.where(keep, s, float("-inf"))
        # every row sees key 0, which is always in the first block visited, so m_new is finite from the start
        m_new = tl.maximum(m_i, tl.max(s, 1))  # (BLOCK_M,)
        p = tl.math.exp2(s - m_new[:, None])  # (BLOCK_M, BLOCK_N)
        alpha = tl.math.exp2(m_i - m_new)  # rescales what was accumulated under the old max
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(V, offs_n, offs_d, stride_vn, stride_vd, Tk, D, MASKED, EVEN_D)  # (BLOCK_N, HEAD_DIM)
        acc = dot(p.to(v.dtype), v, acc * alpha[:, None], PREC, UPCAST)  # P in the input dtype, as FA2
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE,
                     stride_qb, stride_qh, stride_qt, stride_qd, stride_kb, stride_kh, stride_kt, stride_kd,
                     stride_vb, stride_vh, stride_vt, stride_vd, stride_ob, stride_oh, stride_ot, stride_od,
                     H, GROUP, Tq, Tk, D, qk_scale, TQ_BUCKET, TK_BUCKET,
                     HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, PREC: tl.constexpr,
                     UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """o[rows] and lse2[rows] for one query block of one (batch, head). TQ/TK_BUCKET only key the autotuner."""
    # last query blocks first: under a causal mask they walk the most keys, so the short ones fill the tail
    start_m = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)  # int64 offsets: B*H*T*D may pass 2^31
    h = (bh % H).to(tl.int64)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + (h // GROUP) * stride_kh  # the kv head this query head reads
    V += b * stride_vb + (h // GROUP) * stride_vh
    O += b * stride_ob + h * stride_oh
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)

    q = _load_rows(Q, offs_m, offs_d, stride_qt, stride_qd, Tq, D, True, EVEN_D)  # (BLOCK_M, HEAD_DIM)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of s2 per row
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(s2 - m_i)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)  # running sum of exp2(s2 - m_i) v

    full, hi = _key_range(start_m, Tq, Tk, BLOCK_M, BLOCK_N, CAUSAL)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K, V, stride_kt, stride_kd, stride_vt, stride_vd, 0, full,
                                    offs_m, Tq, Tk, D, qk_scale, BLOCK_N, HEAD_DIM, False, CAUSAL, EVEN_D, PREC,
                                    UPCAST)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K, V, stride_kt, stride_kd, stride_vt, stride_vd, full, hi,
                                    offs_m, Tq, Tk, D, qk_scale, BLOCK_N, HEAD_DIM, True, CAUSAL, EVEN_D, PREC,
                                    UPCAST)

    o = acc / l_i[:, None]  # l_i >= 1: the row maximum contributes exp2(0)
    o_ptrs = O + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=(offs_m[:, None] < Tq) & (offs_d[None, :] < D))
    tl.store(LSE + bh.to(tl.int64) * Tq + offs_m, m_i + tl.math.log2(l_i), mask=offs_m < Tq)


# ----------------------------------------------------------------------------------------------------------
# backward


@triton.jit
def _attn_bwd_preprocess(O, DO, DELTA, stride_ob, stride_oh, stride_ot, stride_od,
                         stride_dob, stride_doh, stride_dot, stride_dod, H, Tq, D,
                         HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """Delta[bh, i] = sum_d O[i, d] * dO[i, d] in float32 (the softmax-Jacobian term of every row)."""
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    o = _load_rows(O + b * stride_ob + h * stride_oh, offs_m, offs_d, stride_ot, stride_od, Tq, D, True, False)
    do = _load_rows(DO + b * stride_dob + h * stride_doh, offs_m, offs_d, stride_dot, stride_dod, Tq, D, True,
                    False)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # (BLOCK_M,)
    tl.store(DELTA + bh.to(tl.int64) * Tq + offs_m, delta, mask=offs_m < Tq)


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, stride_qt, stride_qd, stride_dot, stride_dod, lo, hi,
                         offs_n, Tq, Tk, D, qk_scale, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
                         MASKED: tl.constexpr, CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, PREC: tl.constexpr,
                         UPCAST: tl.constexpr):
    """Accumulate dK, dV of one key block over the query blocks in [lo, hi); works on transposed scores."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _load_rows(Q, offs_m, offs_d, stride_qt, stride_qd, Tq, D, MASKED, EVEN_D)  # (BLOCK_M, HEAD_DIM)
        do = _load_rows(DO, offs_m, offs_d, stride_dot, stride_dod, Tq, D, MASKED, EVEN_D)  # (BLOCK_M, HEAD_DIM)
        if MASKED:
            lse = tl.load(LSE + offs_m, mask=offs_m < Tq, other=0.0)  # (BLOCK_M,)
            delta = tl.load(DELTA + offs_m, mask=offs_m < Tq, other=0.0)
        else:
            lse = tl.load(LSE + offs_m)
            delta = tl.load(DELTA + offs_m)
        s_t = dot(k, tl.trans(q), tl.zeros([k.shape[0], BLOCK_M], tl.float32), PREC, UPCAST) * qk_scale
        p_t = tl.math.exp2(s_t - lse[None, :])  # (BLOCK_N, BLOCK_M) = P^T
        if MASKED:  # query tail and, when causal, queries that cannot see these keys
            keep = offs_m[None, :] < Tq
            if CAUSAL:
                keep = keep & (offs_n[:, None] <= offs_m[None, :] + (Tk - Tq))
            p_t = tl.where(keep, p_t, 0.0)  # a select, so an overflowed exp2 of a hidden score cannot leak
        dv = dot(p_t.to(do.dtype), do, dv, PREC, UPCAST)  # dV += P^T dO
        dp_t = dot(v, tl.trans(do), tl.zeros([k.shape[0], BLOCK_M], tl.float32), PREC, UPCAST)  # (dO V^T)^T
        ds_t = p_t * (dp_t - delta[None, :])  # (BLOCK_N, BLOCK_M) = dS^T
        dk = dot(ds_t.to(q.dtype), q, dk, PREC, UPCAST)  # dK += dS^T Q (sm_scale applied at the end)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA,
                          stride_qb, stride_qh, stride_qt, stride_qd, stride_kb, stride_kh, stride_kt, stride_kd,
                          stride_vb, stride_vh, stride_vt, stride_vd, stride_dob, stride_doh, stride_dot, stride_dod,
                          stride_gb, stride_gh, stride_gt, stride_gd,
                          H, GROUP, Tq, Tk, D, sm_scale, qk_scale, TQ_BUCKET, TK_BUCKET,
                          HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, PREC: tl.constexpr,
                          UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dK, dV for one key block of one (batch, kv head), summed over the GROUP query heads that read it.
    DK and DV share the strides stride_g*."""
    start_n = tl.program_id(0)
    bh = tl.program_id(1)  # (batch, kv head)
    b = (bh // (H // GROUP)).to(tl.int64)
    hk = (bh % (H // GROUP)).to(tl.int64)
    K += b * stride_kb + hk * stride_kh
    V += b * stride_vb + hk * stride_vh
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    k = _load_rows(K, offs_n, offs_d, stride_kt, stride_kd, Tk, D, True, EVEN_D)  # (BLOCK_N, HEAD_DIM)
    v = _load_rows(V, offs_n, offs_d, stride_vt, stride_vd, Tk, D, True, EVEN_D)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)

    # Query range of this key block: [lo, mid) masked (the diagonal), [mid, full) unmasked, [full, end)
    # masked (the query tail). Query i sees key j iff i >= j - (Tk - Tq); earlier query blocks are skipped.
    end = tl.cdiv(Tq, BLOCK_M) * BLOCK_M
    full = Tq // BLOCK_M * BLOCK_M
    if CAUSAL:
        shift = Tk - Tq
        lo = tl.maximum(start_n * BLOCK_N - shift, 0) // BLOCK_M * BLOCK_M  # first block with a row that sees
        # first block whose every row sees the whole key block (its first row sees the block's last key)
        last = tl.maximum(start_n * BLOCK_N + BLOCK_N - 1 - shift, 0)  # kept >= 0: no rounding of negatives
        mid = tl.minimum(tl.maximum(tl.cdiv(last, BLOCK_M) * BLOCK_M, lo), end)
    else:
        lo = 0
        mid = 0
    tail = tl.maximum(mid, full)
    # Grouped-query attention: the GROUP query heads reading this kv head take turns in this one program and
    # add into the same dk, dv accumulators, so dK and dV are written once at their own (B, Hkv, Tk, D) size:
    # no atomics, and no (B, H, Tk, D) float32 buffer summed over each group afterwards (GROUP times K/V's
    # size in memory). The cost: GROUP times fewer programs, each GROUP times longer, which only idles
    # streaming multiprocessors when B * Hkv * Tk / BLOCK_N is small. GROUP = 1 is the plain kernel.
    for g in range(GROUP):
        h = hk * GROUP + g  # a query head of this group
        Qh = Q + b * stride_qb + h * stride_qh
        DOh = DO + b * stride_dob + h * stride_doh
        rows = (b * H + h) * Tq  # its rows of lse2 and Delta, (B*H, Tq)
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, Qh, DOh, LSE + rows, DELTA + rows, stride_qt, stride_qd,
                                      stride_dot, stride_dod, lo, mid, offs_n, Tq, Tk, D, qk_scale, BLOCK_M,
                                      HEAD_DIM, True, CAUSAL, EVEN_D, PREC, UPCAST)
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, Qh, DOh, LSE + rows, DELTA + rows, stride_qt, stride_qd,
                                      stride_dot, stride_dod, mid, full, offs_n, Tq, Tk, D, qk_scale, BLOCK_M,
                                      HEAD_DIM, False, CAUSAL, EVEN_D, PREC, UPCAST)
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, Qh, DOh, LSE + rows, DELTA + rows, stride_qt, stride_qd,
                                      stride_dot, stride_dod, tail, end, offs_n, Tq, Tk, D, qk_scale, BLOCK_M,
                                      HEAD_DIM, True, CAUSAL, EVEN_D, PREC, UPCAST)

    mask = (offs_n[:, None] < Tk) & (offs_d[None, :] < D)
    g_off = b * stride_gb + hk * stride_gh + offs_n[:, None] * stride_gt + offs_d[None, :] * stride_gd
    tl.store(DK + g_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + g_off, dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse, delta, K, V, stride_kt, stride_kd, stride_vt, stride_vd, lo, hi, offs_m,
                       Tq, Tk, D, qk_scale, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,
                       CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Accumulate dQ of one query block over the key blocks in [lo, hi)."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(K, offs_n, offs_d, stride_kt, stride_kd, Tk, D, MASKED, EVEN_D)  # (BLOCK_N, HEAD_DIM)
        v = _load_rows(V, offs_n, offs_d, stride_vt, stride_vd, Tk, D, MASKED, EVEN_D)
        s = dot(q, tl.trans(k), tl.zeros([q.shape[0], BLOCK_N], tl.float32), PREC, UPCAST) * qk_scale
        p = tl.math.exp2(s - lse[:, None])  # (BLOCK_M, BLOCK_N)
        if MASKED:
            keep = offs_n[None, :] < Tk
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None] + (Tk - Tq))
            p = tl.where(keep, p, 0.0)
        dp = dot(do, tl.trans(v), tl.zeros([q.shape[0], BLOCK_N], tl.float32), PREC, UPCAST)  # dO V^T
        ds = p * (dp - delta[:, None])  # (BLOCK_M, BLOCK_N)
        dq = dot(ds.to(k.dtype), k, dq, PREC, UPCAST)  # dQ += dS K (sm_scale applied at the end)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA,
                        stride_qb, stride_qh, stride_qt, stride_qd, stride_kb, stride_kh, stride_kt, stride_kd,
                        stride_vb, stride_vh, stride_vt, stride_vd, stride_dob, stride_doh, stride_dot, stride_dod,
                        stride_gb, stride_gh, stride_gt, stride_gd,
                        H, GROUP, Tq, Tk, D, sm_scale, qk_scale, TQ_BUCKET, TK_BUCKET,
                        HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, PREC: tl.constexpr,
                        UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dQ for one query block of one (batch, head); same key ranges as the forward."""
    # last query blocks first: under a causal mask they walk the most keys, so the short ones fill the tail
    start_m = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    K += b * stride_kb + (h // GROUP) * stride_kh  # the kv head this query head reads
    V += b * stride_vb + (h // GROUP) * stride_vh
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = _load_rows(Q + b * stride_qb + h * stride_qh, offs_m, offs_d, stride_qt, stride_qd, Tq, D, True, EVEN_D)
    do = _load_rows(DO + b * stride_dob + h * stride_doh, offs_m, offs_d, stride_dot, stride_dod, Tq, D, True,
                    EVEN_D)
    # rows past Tq read lse = delta = 0 with q = dO = 0: their dS is exactly 0 and they are never stored
    lse = tl.load(LSE + bh.to(tl.int64) * Tq + offs_m, mask=offs_m < Tq, other=0.0)  # (BLOCK_M,)
    delta = tl.load(DELTA + bh.to(tl.int64) * Tq + offs_m, mask=offs_m < Tq, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    full, hi = _key_range(start_m, Tq, Tk, BLOCK_M, BLOCK_N, CAUSAL)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, K, V, stride_kt, stride_kd, stride_vt, stride_vd, 0, full,
                            offs_m, Tq, Tk, D, qk_scale, BLOCK_N, HEAD_DIM, False, CAUSAL, EVEN_D, PREC, UPCAST)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, K, V, stride_kt, stride_kd, stride_vt, stride_vd, full, hi,
                            offs_m, Tq, Tk, D, qk_scale, BLOCK_N, HEAD_DIM, True, CAUSAL, EVEN_D, PREC, UPCAST)

    g_ptrs = DQ + b * stride_gb + h * stride_gh + offs_m[:, None] * stride_gt + offs_d[None, :] * stride_gd
    tl.store(g_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=(offs_m[:, None] < Tq) & (offs_d[None, :] < D))


# ----------------------------------------------------------------------------------------------------------
# launch: block sizes, autotuning, validation

# what the @triton.jit decorators above did: TRITON_INTERPRET=1 at import time makes them interpreted functions
_INTERPRET = not isinstance(_attn_fwd_kernel, triton.runtime.JITFunction)

# (BLOCK_M, BLOCK_N, num_stages, num_warps) tried per padded head dim on CUDA, for 16-bit inputs (H100-sized:
# 128-row query tiles, 64/128-key tiles). Every one compiles for sm_90 without spilling and within shared
# memory: `python -m minipost.kernels.bench compile` checks it (registers, spills and wgmma counts from the cubin).
_CONFIGS = {
    "fwd": {16: [(128, 64, 3, 4), (128, 128, 3, 8), (64, 64, 3, 4), (64, 32, 2, 4)],
            64: [(128, 64, 3, 4), (128, 128, 3, 8), (128, 64, 4, 8), (64, 64, 3, 4), (64, 32, 2, 4)],
            128: [(128, 64, 3, 8), (128, 128, 3, 8), (128, 64, 2, 8), (64, 64, 3, 4), (64, 32, 2, 4)]},
    # dK/dV: BLOCK_N keys stay on chip while BLOCK_M queries stream past. The first config of each list is the one
    # MINIPOST_AUTOTUNE=0 runs; at D = 64 that is 64 x 128 (BENCHMARKS.md, "attention backward"): twice the
    # queries per step of 32 x 128 (the K side of the dS^T Q and P^T dO wgmmas), no spill, same occupancy
    "dkdv": {16: [(32, 128, 3, 4), (64, 128, 3, 8), (64, 64, 3, 4), (32, 32, 2, 4)],
             64: [(64, 128, 3, 8), (32, 128, 3, 8), (64, 64, 3, 4), (32, 32, 2, 4)],
             128: [(32, 128, 3, 8), (32, 128, 2, 8), (32, 64, 3, 4), (64, 64, 2, 8), (32, 32, 2, 4)]},
    # dQ: BLOCK_M queries stay on chip while BLOCK_N keys stream past; first 128 x 64 at D >= 64 (the K side of
    # dS K twice that of 128 x 32, no spill, 8 resident warps per SM either way)
    "dq": {16: [(128, 32, 3, 4), (128, 64, 3, 8), (64, 64, 3, 4), (32, 32, 2, 4)],
           64: [(128, 64, 3, 8), (128, 32, 3, 4), (64, 64, 3, 4), (32, 32, 2, 4)],
           128: [(128, 64, 2, 8), (128, 32, 3, 8), (64, 64, 3, 4), (32, 32, 2, 4)]},
}
# Float32 inputs take "ieee" dots: FMA loops on CUDA cores that hold far more live values, so small tiles, also
# spill-free on sm_90 (for tests and users who ask for float32; training runs bf16 under autocast).
_FP32_CONFIGS = {
    "fwd": {16: [(32, 32, 2, 4), (32, 16, 2, 4)], 64: [(32, 32, 2, 4), (32, 16, 2, 4)], 128: [(32, 16, 2, 4)]},
    "dkdv": {16: [(32, 32, 2, 4), (32, 16, 2, 4)], 64: [(32, 32, 2, 8), (32, 16, 2, 4)], 128: [(32, 16, 2, 8)]},
    "dq": {16: [(32, 32, 2, 4), (32, 16, 2, 4)], 64: [(32, 32, 2, 4), (32, 16, 2, 4)],
           128: [(32, 32, 2, 8), (32, 16, 2, 4)]},
}
# dK/dV under grouped-query attention (GROUP > 1): the program loops over its group's query heads around the
# three query loops, and with that loop the configs above spill; these do not (16-bit, then float32).
_GQA_DKDV_CONFIGS = {16: [(32, 128, 2, 8), (32, 64, 3, 8), (32, 64, 2, 4), (32, 32, 2, 4)],
                     64: [(32, 128, 2, 8), (32, 64, 3, 8), (32, 64, 2, 4), (32, 32, 2, 4)],
                     128: [(16, 64, 2, 8), (64, 32, 2, 8), (32, 32, 2, 8), (32, 32, 2, 4)]}
_GQA_DKDV_FP32_CONFIGS = {16: [(32, 32, 2, 4), (32, 16, 2, 4)], 64: [(32, 32, 2, 8), (32, 16, 2, 4)],
                          128: [(32, 16, 2, 4), (16, 32, 2, 8)]}
_CONFIGS = {name: {**table, 32: table[16]} for name, table in _CONFIGS.items()}  # D = 32 tiles like D = 16
_FP32_CONFIGS = {name: {**table, 32: table[16]} for name, table in _FP32_CONFIGS.items()}
_CONFIGS["dkdv_gqa"] = {**_GQA_DKDV_CONFIGS, 32: _GQA_DKDV_CONFIGS[16]}
_FP32_CONFIGS["dkdv_gqa"] = {**_GQA_DKDV_FP32_CONFIGS, 32: _GQA_DKDV_FP32_CONFIGS[16]}


def cuda_configs(name, dtype, head_dim, group=1):
    """The (BLOCK_M, BLOCK_N, num_stages, num_warps) configs kernel `name` tries for this dtype, padded head dim
    and number of query heads per kv head."""
    table = _FP32_CONFIGS if dtype == torch.float32 else _CONFIGS
    return table["dkdv_gqa" if name == "dkdv" and group > 1 else name][head_dim]


def _configs(name):
    """The union of one kernel's configs over dtypes, head dims and groups; `_pruner` keeps the call's own list."""
    seen = {}
    names = [name, "dkdv_gqa"] if name == "dkdv" else [name]
    for table in (_CONFIGS, _FP32_CONFIGS):
        for dims in (d for n in names for d in table[n].values()):
            for bm, bn, stages, warps in dims:
                seen[(bm, bn, stages, warps)] = triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn), num_stages=stages,
                                                              num_warps=warps)
    return list(seen.values())


def _pruner(name):
    def prune(configs, named_args, **kwargs):
        head_dim = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM"))
        wanted = set(cuda_configs(name, named_args["Q"].dtype, head_dim, named_args["GROUP"]))
        return [c for c in configs
                if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages, c.num_warps) in wanted]
    return prune


_KERNELS = dict(fwd=_attn_fwd_kernel, dkdv=_attn_bwd_dkdv_kernel, dq=_attn_bwd_dq_kernel)
# Autotuning on CUDA. A GPT-2-shaped SFT run spent 9.2 s of its first step here on an H200 (issue 26): every
# process re-tuned the three kernels for every new length bucket, timing each config for Triton's default 125 ms.
#  - Results persist across processes: autotune(cache_results=True) (Triton >= 3.2; 3.6 and 3.9 checked) keeps
#    each tuning in Triton's cache directory (TRITON_CACHE_DIR, default ~/.triton/cache), keyed by the Triton
#    version, the GPU architecture, the kernel's source, the tuning key below and the config list: a second
#    process with the same shapes tunes nothing.
#  - The sequence lengths enter the key as buckets: powers of two, so decoding (Tk growing by one per step)
#    retunes at most once per doubling, and one bucket for every length <= 256, where a whole forward+backward is
#    launch-bound (tens of microseconds) whichever tile runs: 3 buckets up to GPT-2's 1024, not 7.
#  - Each config is timed for ~30 ms (TUNE_WARMUP_MS + TUNE_REP_MS) instead of 125: kernels of microseconds to
#    milliseconds get tens of repetitions or more, enough to rank configs that differ by >5%.
#  - MINIPOST_AUTOTUNE=0: no tuning at all; each kernel runs the first config of its list (the one the sm_90
#    compile report favours), for short runs or when timings are unreliable (a shared GPU).
_TUNE_KEY = ["HEAD_DIM", "CAUSAL", "GROUP", "TQ_BUCKET", "TK_BUCKET"]  # the autotuner adds the tensor dtypes
TUNE_WARMUP_MS, TUNE_REP_MS = 5, 25
SHORT_BUCKET = 256


def autotune_options():
    """Keyword arguments of triton.autotune for the three kernels (their configs and pruner aside)."""
    from triton.testing import do_bench
    return dict(key=_TUNE_KEY, cache_results=True,
                do_bench=functools.partial(do_bench, warmup=TUNE_WARMUP_MS, rep=TUNE_REP_MS))


def tuning_enabled():
    """MINIPOST_AUTOTUNE: 1 (the default) or 0; any other value is refused (a UserError, see env_setting)."""
    return env_setting("MINIPOST_AUTOTUNE", ("1", "0")) == "1"


def make_tuned():
    """kernel name -> its triton.autotune wrapper (used on CUDA only)."""
    return {name: triton.autotune(_configs(name), prune_configs_by=dict(early_config_prune=_pruner(name)),
                                  **autotune_options())(fn)
            for name, fn in _KERNELS.items()}


_TUNED = {} if _INTERPRET else make_tuned()


def _bucket(t):
    """Tuning-key bucket of a sequence length: SHORT_BUCKET for t <= SHORT_BUCKET, else the next power of two."""
    return min(max(triton.next_power_of_2(t), SHORT_BUCKET), 16384)


def untuned_config(name, dtype, head_dim, group):
    """(BLOCK_M, BLOCK_N, num_stages, num_warps) that kernel `name` runs with MINIPOST_AUTOTUNE=0."""
    return cuda_configs(name, dtype, head_dim, group)[0]


def _launch(name, n_rows, grid_block, BH, args, meta, group):
    """Run kernel `name` on a grid (blocks over n_rows rows, B*H); grid_block names the tile along n_rows;
    group: query heads per kv head (selects the dK/dV configs)."""
    if _INTERPRET:
        bm, bn = INTERPRET_BLOCKS[name]
        block = dict(BLOCK_M=bm, BLOCK_N=bn)
        _KERNELS[name][(triton.cdiv(n_rows, block[grid_block]), BH)](*args, **meta, **block)
    elif not tuning_enabled():
        bm, bn, stages, warps = untuned_config(name, args[0].dtype, meta["HEAD_DIM"], group)
        block = dict(BLOCK_M=bm, BLOCK_N=bn)
        _KERNELS[name][(triton.cdiv(n_rows, block[grid_block]), BH)](*args, **meta, **block, num_stages=stages,
                                                                       num_warps=warps)
    else:
        _TUNED[name][lambda META: (triton.cdiv(n_rows, META[grid_block]), BH)](*args, **meta)


def _check_inputs(q, k, v):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"triton_attention: expected 4-d (B, H, T, D) tensors, got {q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[1] % k.shape[1] or q.shape[3] != k.shape[3]:
        raise ValueError(f"triton_attention: shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)} (want q (B, H, Tq, D), k and v (B, Hkv, Tk, D), Hkv dividing H)")
    if q.shape[2] > k.shape[2]:
        raise ValueError(f"triton_attention: T_q={q.shape[2]} must be <= T_k={k.shape[2]}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"triton_attention: q, k, v must share one dtype among float32, float16, bfloat16; "
                         f"got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"triton_attention: q, k, v on different devices: {q.device}, {k.device}, {v.device}")
    if not 1 <= q.shape[3] <= MAX_HEAD_DIM:
        raise ValueError(f"triton_attention: head dim {q.shape[3]} not supported: 16, 32, 64 and 128 run natively, "
                         f"other sizes up to {MAX_HEAD_DIM} are padded to the next power of two")
    if q.shape[0] * q.shape[1] > 65535:
        raise ValueError(f"triton_attention: B*H={q.shape[0] * q.shape[1]} exceeds the grid limit 65535")
    if not q.is_cuda and not _INTERPRET:
        raise RuntimeError("triton_attention: CPU tensors need Triton's interpreter (set TRITON_INTERPRET=1 before "
                           "triton is imported), or use kernels.attention, which falls back to plain torch")


def _meta(q, causal):
    D = q.shape[3]
    head_dim = max(16, triton.next_power_of_2(D))  # tl.dot wants every tile side >= 16
    return dict(HEAD_DIM=head_dim, CAUSAL=bool(causal), EVEN_D=head_dim == D,
                PREC="ieee" if q.dtype == torch.float32 else "tf32",  # ieee: no TF32 rounding of float32 inputs
                UPCAST=_INTERPRET and q.dtype == torch.bfloat16)


def _forward(q, k, v, causal):
    """o (B, H, Tq, D) in q's dtype and lse2 (B*H, Tq) float32, the base-2 log-sum-exp of each row."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    o = torch.empty((B, H, Tq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B * H, Tq), dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return o, lse
    qk_scale = LOG2E.value / math.sqrt(D)  # softmax scale 1/sqrt(D), moved to base 2
    args = (q, k, v, o, lse, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
            H, H // k.shape[1], Tq, Tk, D, qk_scale, _bucket(Tq), _bucket(Tk))
    _launch("fwd", Tq, "BLOCK_M", B * H, args, _meta(q, causal), H // k.shape[1])
    return o, lse


def _backward(q, k, v, o, lse, do, causal):
    """dq, dk, dv (like q, k, v) from the saved forward tensors and the output gradient do."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    do = do.to(q.dtype)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if dq.numel() == 0:
        return dq, dk.zero_(), dv.zero_()
    meta = _meta(q, causal)
    delta = torch.empty((B * H, Tq), dtype=torch.float32, device=q.device)
    block = 32 if _INTERPRET else 64
    _attn_bwd_preprocess[(triton.cdiv(Tq, block), B * H)](o, do, delta, *o.stride(), *do.stride(), H, Tq, D,
                                                          HEAD_DIM=meta["HEAD_DIM"], BLOCK_M=block)
    sm_scale = 1.0 / math.sqrt(D)
    common = (*q.stride(), *k.stride(), *v.stride(), *do.stride())
    tail = (H, H // k.shape[1], Tq, Tk, D, sm_scale, sm_scale * LOG2E.value, _bucket(Tq), _bucket(Tk))
    assert dk.stride() == dv.stride()  # both fresh tensors of one shape: the kernel takes one set of strides
    # one dK/dV program per (key block, batch, kv head): it sums over the query heads of its group
    _launch("dkdv", Tk, "BLOCK_N", B * k.shape[1], (q, k, v, do, dk, dv, lse, delta, *common, *dk.stride(), *tail),
            meta, H // k.shape[1])
    _launch("dq", Tq, "BLOCK_M", B * H, (q, k, v, do, dq, lse, delta, *common, *dq.stride(), *tail), meta,
            H // k.shape[1])
    return dq, dk, dv


class FlashAttention(torch.autograd.Function):
    """o = softmax(q k^T / sqrt(D) + causal mask) v with the fused kernels above.

    forward(q (B, H, Tq, D), k (B, Hkv, Tk, D), v (B, Hkv, Tk, D), causal) -> o (B, H, Tq, D)
    Saves q, k, v, o and lse2 (B*H, Tq) float32 = log2 sum_j exp2(s2_ij), s2 = q.k * log2(e) / sqrt(D).
    backward recomputes P = exp2(s2 - lse2) block by block:
        Delta = rowsum(o * do), dS = P * (do v^T - Delta), dq = dS k / sqrt(D), dk = dS^T q / sqrt(D), dv = P^T do
    """

    @staticmethod
    def forward(ctx, q, k, v, causal):
        o, lse = _forward(q, k, v, causal)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal = causal
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, o, lse, do, ctx.causal)
        return dq, dk, dv, None


def triton_attention(q, k, v, causal=True):
    """Fused attention, differentiable in q, k, v; semantics of kernels.reference.attention_reference.

    q (B, H, Tq, D), k and v (B, Hkv, Tk, D) with Hkv dividing H (query head h reads kv head h // (H / Hkv)),
    Tq <= Tk, one dtype among float32 / float16 / bfloat16, any strides -> o (B, H, Tq, D) in that dtype.
    causal=True: query i sees keys j <= i + (Tk - Tq).
    """
    _check_inputs(q, k, v)
    return FlashAttention.apply(q, k, v, causal)
