"""Compile every CUDA config of both kernels for sm_90 (H100/H200) on any machine, GPU or not, and report it.

    python -m minipost.kernels.bench compile [--dtypes bf16 fp16 fp32] [--head-dims 64 128] [--gqa-groups 1 4] [--jobs 2]

Each config the kernels would launch on a GPU (the autotune lists of flash_attention.py per padded head dim, the
tile of logprob.py per dtype) is compiled ahead of time with `triton.compile` for GPUTarget("cuda", 90, 32),
with the argument layout training passes: q, k, v as strided views of the packed c_attn output (inner stride 1,
row stride 3C), contiguous outputs, GPT-2's odd vocabulary 50257 for the LM head. From the cubin, with the
cuobjdump that ships in the triton wheel:
    registers     per thread (255 at most; more live values spill to local memory)
    spill         stack bytes per thread (`cuobjdump -res-usage`) and local loads/stores (LDL/STL) in the SASS
    shared        bytes per block, against the 227 KiB an H100 block may use
    wgmma/mma     Hopper warpgroup tensor-core instructions (HGMMA) and older ones (HMMA) in the SASS: 0 means
                  the dots run on CUDA cores (float32 "ieee" dots do, by design)
A config that spills or does not fit is a bug: the command then exits 1. (Float32 configs are small: their
"ieee" dots are FMA loops that hold many more live values; float32 is for tests and users who ask for it.)
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

SHARED_LIMIT = 232448  # bytes of shared memory one block may use on sm_90 (227 KiB)
DTYPES = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}
VOCAB, N_TOKENS, BATCH, SEQ, HEADS = 50257, 16384, 4, 1024, 12  # the shapes the example arguments describe


class Ptr:
    """Stands for a pointer argument of element type `dtype` ("bf16", "fp32", "i64", ...), 16-byte aligned."""

    def __init__(self, dtype):
        self.dtype = dtype


def _compile(kernel_name, args, constexprs, num_warps, num_stages):
    """Compile one kernel for sm_90 -> resources read from its cubin and SASS (see the module docstring)."""
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget

    fn = _kernels()[kernel_name]
    signature, consts, attrs = {}, dict(constexprs), {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        value = args[name]
        if isinstance(value, Ptr):
            signature[name] = "*" + value.dtype
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1:  # as the JIT does: an integer argument equal to 1 is specialised to the constant
            signature[name], consts[name] = "constexpr", 1
        else:
            signature[name] = "i64" if abs(value) >= 2**31 else "i32"
            if value % 16 == 0:  # as the JIT does: multiples of 16 are marked divisible (wider loads)
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    target = GPUTarget("cuda", 90, 32)
    options = triton.compiler.make_backend(target).parse_options(dict(num_warps=num_warps, num_stages=num_stages))
    compiled = triton.compile(src, target=target, options=options.__dict__)
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, kernel_name + ".cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([os.path.join(tools, "cuobjdump"), "-res-usage", cubin], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([os.path.join(tools, "cuobjdump"), "-sass", cubin], capture_output=True, text=True,
                              check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    return dict(registers=int(m.group(1)), stack=int(m.group(2)), ldl=len(re.findall(r"\bLDL\b", sass)),
                stl=len(re.findall(r"\bSTL\b", sass)), shared=compiled.metadata.shared,
                wgmma=len(re.findall(r"\bHGMMA\b", sass)), mma=len(re.findall(r"\bHMMA\b", sass)))


def _kernels():
    """name -> the plain JITFunction of every kernel the report compiles."""
    from minipost.kernels import flash_attention as fa
    from minipost.kernels import logprob as lp

    if fa._INTERPRET:
        raise RuntimeError("the kernels were imported under TRITON_INTERPRET=1: run the report in a fresh process")
    return dict(fwd=fa._attn_fwd_kernel, dkdv=fa._attn_bwd_dkdv_kernel, dq=fa._attn_bwd_dq_kernel,
                logprob_fwd=lp._token_logprob_fwd_kernel, dlogits=lp._dlogits_kernel)


def _attention_args(name, dtype, head_dim, group=1):
    """Example arguments for attention kernel `name`: what CausalSelfAttention passes at (B, T, H) above, with
    `group` query heads per kv head (1: GPT-2; 3 or 4 in Llama-style models: GROUP is then a runtime value)."""
    D, C = head_dim, HEADS * head_dim
    width = (HEADS + 2 * HEADS // group) * D  # c_attn's output row: q, then the kv heads' k and v
    packed = (SEQ * width, D, width, 1)  # q, k, v: views of c_attn's (B, T, width) output as (B, H, T, D)
    fresh = (HEADS * SEQ * D, SEQ * D, D, 1)  # o, dq, dk, dv: contiguous (B, H, T, D)
    incoming = (SEQ * C, D, C, 1)  # dO: the transpose of the (B, T, H, D) gradient of the merged heads
    qkv = {f"stride_{t}{a}": s for t in "qkv" for a, s in zip("bhtd", packed)}
    tail = dict(H=HEADS, GROUP=group, Tq=SEQ, Tk=SEQ, D=D, TQ_BUCKET=SEQ, TK_BUCKET=SEQ)
    ptr = {p: Ptr(dtype) for p in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")}
    ptr.update(LSE=Ptr("fp32"), DELTA=Ptr("fp32"))
    if name == "fwd":
        return {**ptr, **qkv, **{f"stride_o{a}": s for a, s in zip("bhtd", fresh)}, **tail, "qk_scale": 0.18}
    grads = {f"stride_g{a}": s for a, s in zip("bhtd", fresh)}
    dos = {f"stride_do{a}": s for a, s in zip("bhtd", incoming)}
    return {**ptr, **qkv, **dos, **grads, **tail, "sm_scale": 0.125, "qk_scale": 0.18}


def _logprob_args(name, dtype, C=768):
    """Example arguments for the log-prob kernels: contiguous (N, C) hidden, (V, C) weight, padded dz rows."""
    from minipost.kernels.logprob import padded_vocab

    common = dict(h_ptr=Ptr(dtype), w_ptr=Ptr(dtype), tgt_ptr=Ptr("i64"), N=N_TOKENS, V=VOCAB, C=C, inv_temp=1.0,
                  stride_hn=C, stride_hc=1, stride_wv=C, stride_wc=1)
    if name == "logprob_fwd":
        return {**common, **{p: Ptr("fp32") for p in ("m_ptr", "s_ptr", "u_ptr", "zt_ptr")}, "tiles_per_split": 7}
    return {**common, **{p: Ptr("fp32") for p in ("lse_ptr", "ent_ptr", "g_ptr", "k_ptr")}, "dz_ptr": Ptr(dtype),
            "stride_dn": padded_vocab(VOCAB)}


def cases(dtypes, head_dims, groups=(1,)):
    """(kernel, dtype, head dim or None, tile label, args, constexprs, warps, stages) for every config."""
    from minipost.kernels import flash_attention as fa
    from minipost.kernels import logprob as lp

    torch_dtype = dict(bf16=lp.torch.bfloat16, fp16=lp.torch.float16, fp32=lp.torch.float32)
    out = []
    for dtype in dtypes:
        for name in ("fwd", "dkdv", "dq"):
            for head_dim in head_dims:
                for group in groups:
                    for bm, bn, stages, warps in fa.cuda_configs(name, torch_dtype[dtype], head_dim, group):
                        const = dict(HEAD_DIM=head_dim, CAUSAL=True, EVEN_D=True, UPCAST=False, BLOCK_M=bm,
                                     BLOCK_N=bn, PREC="ieee" if dtype == "fp32" else "tf32")
                        label = f"{bm}x{bn}" + (f" GQA {group}" if group > 1 else "")
                        out.append((name, dtype, head_dim, label, _attention_args(name, dtype, head_dim, group),
                                    const, warps, stages))
        bn, bv, bc, warps, stages = lp.CUDA_CONFIGS[torch_dtype[dtype]]
        for name in ("logprob_fwd", "dlogits"):
            const = dict(BLOCK_N=bn, BLOCK_V=bv, BLOCK_C=bc, UPCAST=False,
                         DOT_PRECISION="ieee" if dtype == "fp32" else "tf32")
            if name == "dlogits":
                const["HAS_ENT"] = True
            out.append((name, dtype, None, f"{bn}x{bv}x{bc}", _logprob_args(name, dtype), const, warps, stages))
    return out


def _run_case(case):
    name, dtype, head_dim, tile, args, const, warps, stages = case
    try:
        return case, _compile(name, args, const, warps, stages), None
    except Exception as e:  # noqa: BLE001 -- one config failing to compile is a row of the report, not a crash
        return case, None, f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"


def report(dtypes, head_dims, groups, jobs):
    """Compile every case (in `jobs` processes) -> (markdown table, number of configs that spill or fail)."""
    todo = cases(dtypes, head_dims, groups)
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as pool:
            results = list(pool.map(_run_case, todo))
    else:
        results = [_run_case(c) for c in todo]
    lines = ["| kernel | dtype | D | tile | warps | stages | registers | spill B | LDL/STL | shared KiB | wgmma | mma | ok |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    bad = 0
    for (name, dtype, head_dim, tile, _, _, warps, stages), r, error in results:
        head = f"| {name} | {dtype} | {head_dim or '-'} | {tile} | {warps} | {stages} |"
        if error:
            lines.append(f"{head} {error} | | | | | | |")
            bad += 1
            continue
        spills = r["stack"] > 0 or r["ldl"] + r["stl"] > 0
        fits = r["shared"] <= SHARED_LIMIT
        verdict = "yes" if fits and not spills else ("SPILLS" if spills else "") + (" SHARED" if not fits else "")
        bad += verdict != "yes"
        lines.append(f"{head} {r['registers']} | {r['stack']} | {r['ldl']}/{r['stl']} | {r['shared'] / 1024:.0f} | "
                     f"{r['wgmma']} | {r['mma']} | {verdict.strip()} |")
    return "\n".join(lines), bad


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m minipost.kernels.bench compile", description="sm_90 compile report of "
                                "every CUDA config of both kernels (no GPU needed)")
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--head-dims", nargs="+", type=int, default=[64, 128], choices=[16, 32, 64, 128],
                   help="padded attention head dims (GPT-2: 64; Llama/Qwen: 64 or 128)")
    p.add_argument("--gqa-groups", nargs="+", type=int, default=[1, 4], help="query heads per kv head to compile "
                   "attention for (1: GPT-2's plain heads; 4: e.g. Llama 3.2's 32 / 8; GROUP is a runtime loop)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile in this many processes")
    args = p.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # compile for real, also when called from an interpreted session
    table, bad = report(args.dtypes, args.head_dims, args.gqa_groups, max(1, args.jobs))
    print(table)
    shapes = f"B={BATCH} T={SEQ} H={HEADS} (attention), N={N_TOKENS} C=768 V={VOCAB} (log-prob)"
    if bad:
        print(f"\n{bad} config(s) spill, fail to compile or exceed shared memory ({shapes})", file=sys.stderr)
        return 1
    print(f"\nall {table.count(chr(10)) - 1} configs compile for sm_90 without spilling and fit in shared memory "
          f"({shapes})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
