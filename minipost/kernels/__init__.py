"""minipost's two fused ops and the switch between Triton and plain PyTorch.

    attention(q, k, v, causal=True) -> o                       q (B, H, Tq, D), k/v (B, Hkv, Tk, D), Tq <= Tk
    token_logprobs(hidden, weight, targets, temperature=1.0, return_entropy=False) -> logp (N,) [, entropy (N,)]

Autocast: inside torch.autocast (bf16 on CUDA for every training and sampling script, see minipost/cli.py)
both ops first round their float inputs to the autocast dtype, so the kernels take their tensor-core path
(float32 accumulation; log-probs, lse and softmax statistics stay float32) -- under autocast ln_f returns
float32 and the LM head is a float32 parameter, which would otherwise send float32 to the kernels. Outside
autocast, inputs are used as they come (float32: full-precision dots, for tests and for users who ask).
The ops then run with autocast off, so the torch reference too computes in float32 from the rounded inputs.

Dispatch: CUDA tensors use Triton, CPU tensors use the torch reference (minipost/kernels/reference.py).
MINIPOST_KERNELS=triton|torch forces one path (auto: the default). Forcing Triton on CPU tensors needs Triton's interpreter
(TRITON_INTERPRET=1, set before Triton is imported): that is how the tests check the kernels without a GPU.
Note: this `kernels` package is minipost's own, unrelated to the `kernels` project on PyPI.
"""
import os
from contextlib import nullcontext

import torch

from ..cli import UserError
from .reference import attention_reference, token_logprobs_reference

_MODES = ("auto", "triton", "torch")


def env_setting(name: str, choices: tuple) -> str:
    """Environment variable `name`, choices[0] where unset; any other value than `choices` is a UserError (in
    every script: one line, exit code 2)."""
    value = os.environ.get(name, choices[0])
    if value not in choices:
        raise UserError(f"{name}={value!r}: expected one of {', '.join(choices)}")
    return value


def use_triton(t: torch.Tensor) -> bool:
    """True when an op on tensor `t` should run the Triton kernel (read per call so tests can flip it)."""
    mode = env_setting("MINIPOST_KERNELS", _MODES)
    if mode != "auto":
        return mode == "triton"
    return t.is_cuda


def autocast_off(device_type: str):
    """A context that switches autocast off on this device type; a no-op (no per-call cost) where it is off."""
    return torch.autocast(device_type, enabled=False) if torch.is_autocast_enabled(device_type) else nullcontext()


def autocast_inputs(*tensors):
    """The tensors rounded to the autocast dtype when autocast is on for their device, else as they are.
    Casting is differentiable: gradients come back in each original dtype."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t for t in tensors)


def attention(q, k, v, causal=True):
    """Causal (or full) softmax attention; see minipost/kernels/reference.py for the exact semantics. k and v may
    have fewer heads than q (grouped-query attention: Hkv divides H)."""
    if q.shape[-2] > k.shape[-2]:
        raise ValueError(f"attention: T_q={q.shape[-2]} must be <= T_k={k.shape[-2]}")
    if q.dim() != 4 or k.dim() != 4 or q.shape[1] % k.shape[1]:
        raise ValueError(f"attention: q (B, H, Tq, D) and k (B, Hkv, Tk, D) with Hkv dividing H, got "
                         f"{tuple(q.shape)} and {tuple(k.shape)}")
    q, k, v = autocast_inputs(q, k, v)
    with autocast_off(q.device.type):
        if use_triton(q):
            from .flash_attention import triton_attention  # imported lazily: Triton is Linux-only

            return triton_attention(q, k, v, causal=causal)
        return attention_reference(q, k, v, causal=causal)


def token_logprobs(hidden, weight, targets, temperature=1.0, return_entropy=False):
    """log softmax(hidden @ weight.T / temperature)[targets] in float32, 0 where targets < 0."""
    hidden, weight = autocast_inputs(hidden, weight)
    with autocast_off(hidden.device.type):
        if use_triton(hidden):
            from .logprob import triton_token_logprobs  # imported lazily: Triton is Linux-only

            return triton_token_logprobs(hidden, weight, targets, temperature, return_entropy)
        return token_logprobs_reference(hidden, weight, targets, temperature, return_entropy)
