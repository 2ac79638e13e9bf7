"""Triton building blocks that both kernels use (flash_attention.py and logprob.py)."""
import triton
import triton.language as tl

# log2(e): both kernels take exponentials as exp2(x * log2(e)), the hardware's native exp. A constexpr, so that
# @triton.jit code can read it as a global; Python code reads LOG2E.value.
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)


@triton.jit
def dot(a, b, acc, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b with float32 accumulation. PREC: "ieee" for float32 inputs (exact products), "tf32" otherwise
    (16-bit inputs ignore it). UPCAST: only under Triton's interpreter, whose bfloat16 dot multiplies the raw uint16
    storage (Triton 3.6 - 3.9): the tiles are widened to float32 there, exactly (bf16 -> float32 is exact and so are
    the products in "ieee"), so the result is what the GPU computes."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PREC)
