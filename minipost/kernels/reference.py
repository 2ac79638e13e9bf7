"""What the two kernels compute, in plain PyTorch.

This is the CPU path of minipost (dispatch in minipost/kernels/__init__.py) and the readable statement of each op.
The Triton versions in flash_attention.py and logprob.py must agree with these; the tests compare both against
float64 runs of these same functions.
"""
import torch
import torch.nn.functional as F


def attention_reference(q, k, v, causal=True):
    """Softmax attention. q (B, H, Tq, D), k and v (B, Hkv, Tk, D) with Tq <= Tk -> o (B, H, Tq, D).

    Queries are the last Tq positions of the key sequence, so the causal mask is aligned bottom-right:
    query i may see keys j <= i + (Tk - Tq). This is what a prefill onto a KV cache needs.
    Grouped-query attention: Hkv divides H and query head h reads key/value head h // (H / Hkv), which is
    what repeating each kv head H / Hkv times in place (repeat_interleave) gives.
    """
    Tq, Tk = q.shape[-2], k.shape[-2]
    gqa = k.shape[1] != q.shape[1]
    if not causal or Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
    # SDPA's is_causal aligns top-left when Tq != Tk; build the bottom-right mask ourselves
    keep = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - Tq)  # (Tq, Tk)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, enable_gqa=gqa)


def token_logprobs_reference(hidden, weight, targets, temperature=1.0, return_entropy=False):
    """Per-token log-prob of the target under softmax(hidden @ weight.T / temperature).

    hidden (N, C), weight (V, C), targets (N,) int64; a negative target means "ignored" (0, no gradient).
    Returns logp (N,) float32 and, if asked, entropy (N,) float32 of the same distribution.
    Materialises the (N, V) logits in float32: fine on a CPU, the Triton path avoids it.
    """
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32  # float64 only for test oracles
    logits = (hidden.to(dtype) @ weight.to(dtype).T) / temperature  # (N, V)
    logprobs = torch.log_softmax(logits, dim=-1)  # (N, V)
    ignored = targets < 0
    logp = logprobs.gather(1, targets.clamp(min=0).unsqueeze(1)).squeeze(1)  # (N,)
    logp = logp.masked_fill(ignored, 0.0)
    if not return_entropy:
        return logp
    entropy = -(logprobs.exp() * logprobs).sum(dim=-1)  # (N,)
    return logp, entropy.masked_fill(ignored, 0.0)
