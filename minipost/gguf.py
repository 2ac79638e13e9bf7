"""GGUF files (llama.cpp's and ollama's format) in: a llama-architecture model and its byte-level BPE tokenizer,
read by hand (no gguf package), e.g. `--init SmolLM2-135M-Instruct.Q4_1.gguf`.

The file, little-endian throughout (GGUF v2 and v3 are laid out alike; v1 used 32-bit counts and is refused):

    "GGUF"  u32 version  u64 n_tensors  u64 n_kv
    n_kv x       key (string)  u32 value type  value
    n_tensors x  name (string)  u32 n_dims  u64 ne[n_dims]  u32 ggml type  u64 offset
    padding to `general.alignment` (32 when absent), then the tensor data; each offset counts from there
    string = u64 byte length + UTF-8 bytes; array = u32 element type + u64 count + the elements

ne[0] is the fastest-moving dimension, so a tensor with ne = [576, 49152] is a torch (49152, 576) matrix whose
rows are contiguous; quantisation blocks run along a row. The block layouts read here (d, m are float16):

    Q8_0  34 bytes per 32 weights: d, then 32 int8 q;    w[j] = d * q[j]
    Q4_0  18 bytes per 32 weights: d, then 16 bytes;     byte j holds q[j] in its low nibble and q[j + 16] in its
                                                         high nibble; w = d * (q - 8)
    Q4_1  20 bytes per 32 weights: d, m, then 16 bytes;  nibbles as Q4_0; w = d * q + m
    F32, F16, BF16 as they are (bfloat16: the top half of a float32)

Every other ggml type (the K-quants, IQ*, Q5_*) is refused with one line naming it and the tensor.

The model: general.architecture "llama", its llama.* keys mapped onto a Hugging Face LlamaConfig and through
minipost/hf.py's hf_config (so the same refusals hold), the tensors renamed to HF's and loaded as hf.py loads
a folder:

    token_embd                      model.embed_tokens         output_norm   model.norm
    output (absent: tied head)      lm_head                    blk.N.        model.layers.N.
    attn_norm / ffn_norm            input_layernorm / post_attention_layernorm
    attn_q, attn_k, attn_v, attn_output   self_attn.q_proj, k_proj, v_proj, o_proj
    ffn_gate, ffn_up, ffn_down     mlp.gate_proj, up_proj, down_proj

llama.cpp's converter reorders the rows of attn_q and attn_k within each head: HF's rotary pairs dimension i
with i + D/2 (rotate-half), llama.cpp's llama kernel pairs 2i with 2i + 1, so row i of an HF head is stored as
row 2i and row i + D/2 as row 2i + 1. `_unpermute` puts them back so minipost's rotate-half rotary applies.

The tokenizer: tokenizer.ggml.model "gpt2" (byte-level BPE) with tokens, merges and token types; CONTROL and
USER_DEFINED tokens become special tokens (render inserts them, text never makes them), the others the BPE
vocabulary, built through hf.py's reader of tokenizer.json vocabularies (single bytes the vocabulary lacks,
21 in SmolLM2's, are dropped from text as Hugging Face's tokenizer drops them). tokenizer.ggml.pre names the
pre-tokenizer (PRE_TOKENIZERS; others are refused). The chat format comes from tokenizer.chat_template's markers,
as for a folder (hf.py): ChatML for SmolLM2, whose template's default system message is not added by minipost.
"""
import math
import struct
from pathlib import Path

import numpy as np
import torch

from .gpt2 import GPT2_PATTERN, resize_vocab
from .hf import GPT2_DIGITS_PATTERN, _ranks, byte_level_tokenizer, hf_config, model_from_hf_tensors
from .model import GPT
from .tokenizer import Tokenizer

MAGIC = b"GGUF"
VERSIONS = (2, 3)
ALIGNMENT = 32
ARCHITECTURES = ("llama",)

# metadata value types -> struct format; 8 is a string, 9 an array
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9

# ggml tensor types by id, the names llama.cpp gives them (for refusals); the readable ones in READABLE
GGML_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1", 10: "Q2_K",
              11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS",
              18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16",
              26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4"}
# readable types: (weights per block, bytes per block)
READABLE = {"F32": (1, 4), "F16": (1, 2), "BF16": (1, 2), "Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20)}

# tokenizer.ggml.pre -> the split regex (llama.cpp's names); SmolLM2's: GPT-2's with every digit alone
PRE_TOKENIZERS = {"gpt-2": GPT2_PATTERN, "smollm": GPT2_DIGITS_PATTERN}
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 3, 4

# GGUF tensor name inside blk.N -> HF name inside model.layers.N
_LAYER_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
                "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


# ----------------------------------------------------------------------------- the container

class _Reader:
    """Reads values off the file's bytes; running past the end is a ValueError saying the file is truncated."""

    def __init__(self, buf: memoryview, f):
        self.buf, self.pos, self.f = buf, 0, f

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.buf):
            raise ValueError(f"{self.f}: truncated ({len(self.buf)} bytes; the header needs more at byte {self.pos})")
        self.pos += n
        return self.buf[self.pos - n:self.pos]

    def scalar(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        raw = self.take(self.scalar("<Q"))
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{self.f}: a string at byte {self.pos - len(raw)} is not UTF-8")

    def value(self, kind: int, key: str):
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind])
        if kind == STRING:
            return self.string()
        if kind != ARRAY:
            raise ValueError(f"{self.f}: metadata {key} has unknown value type {kind}")
        item, n = self.scalar("<I"), self.scalar("<Q")
        if item in _SCALARS and item != 7:  # numbers in one go: vocabularies hold ~10^5 of them
            size = struct.calcsize(_SCALARS[item])
            return np.frombuffer(self.take(n * size), dtype=np.dtype(_SCALARS[item])).tolist()
        return [self.value(item, key) for _ in range(n)]


def read_gguf(path):
    """(metadata {key: value}, tensors {name: (ggml type name, torch shape, bytes)}) of a GGUF file; the bytes
    are views into the file's contents. ValueError (one line naming the file) for what is not GGUF v2/v3 or
    is cut short."""
    f = Path(path)
    try:
        buf = memoryview(f.read_bytes())
    except OSError as e:
        raise ValueError(f"{f}: unreadable ({e.strerror or e})")
    r = _Reader(buf, f)
    if len(buf) < 4 or bytes(buf[:4]) != MAGIC:
        raise ValueError(f"{f}: not a GGUF file (it starts with {bytes(buf[:4])!r}, not {MAGIC!r})")
    r.take(4)
    version = r.scalar("<I")
    if version not in VERSIONS:
        raise ValueError(f"{f}: GGUF version {version} is not supported (minipost reads versions 2 and 3)")
    n_tensors, n_kv = r.scalar("<Q"), r.scalar("<Q")
    meta = {}
    for _ in range(n_kv):
        key = r.string()
        meta[key] = r.value(r.scalar("<I"), key)
    infos = []
    for _ in range(n_tensors):
        name, n_dims = r.string(), r.scalar("<I")
        if n_dims > 4:
            raise ValueError(f"{f}: tensor {name} has {n_dims} dimensions (GGUF allows at most 4)")
        ne = [r.scalar("<Q") for _ in range(n_dims)]
        infos.append((name, ne, r.scalar("<I"), r.scalar("<Q")))
    align = meta.get("general.alignment", ALIGNMENT)
    if type(align) is not int or align < 1 or align & (align - 1):
        raise ValueError(f"{f}: general.alignment {align!r} is not a power of two")
    start = -(-r.pos // align) * align
    tensors = {}
    for name, ne, kind, offset in infos:
        tensors[name] = _tensor_bytes(f, buf, name, ne, kind, start + offset)
    return meta, tensors


def _tensor_bytes(f, buf, name, ne, kind, at):
    type_name = GGML_TYPES.get(kind, f"ggml type {kind}")
    if type_name not in READABLE:
        raise ValueError(f"{f}: tensor {name} is {type_name}, which minipost does not read "
                         f"(it reads {', '.join(READABLE)})")
    per_block, block_bytes = READABLE[type_name]
    if ne and ne[0] % per_block:
        raise ValueError(f"{f}: tensor {name} has rows of {ne[0]}, not whole {type_name} blocks of {per_block}")
    n = math.prod(ne)  # Python integers: a garbage shape cannot overflow into a small size
    size = n // per_block * block_bytes
    if at + size > len(buf):
        raise ValueError(f"{f}: truncated: tensor {name} ends at byte {at + size}, the file at {len(buf)}")
    return type_name, tuple(reversed(ne)), buf[at:at + size]


# ----------------------------------------------------------------------------- dequantisation

def dequantize(type_name: str, shape, raw) -> torch.Tensor:
    """One tensor's bytes -> float32 tensor of `shape`, by the block layouts in the module docstring."""
    if type_name == "F32":
        w = np.frombuffer(raw, dtype="<f4")
    elif type_name == "F16":
        w = np.frombuffer(raw, dtype="<f2").astype(np.float32)
    elif type_name == "BF16":  # the 16 bits are the high half of a float32
        w = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    elif type_name == "Q8_0":
        b = np.frombuffer(raw, dtype=np.dtype([("d", "<f2"), ("q", "i1", 32)]))
        w = b["d"].astype(np.float32)[:, None] * b["q"]  # (blocks, 32)
    elif type_name in ("Q4_0", "Q4_1"):
        fields = [("d", "<f2"), ("m", "<f2")] if type_name == "Q4_1" else [("d", "<f2")]
        b = np.frombuffer(raw, dtype=np.dtype([*fields, ("q", "u1", 16)]))
        q = np.concatenate([b["q"] & 0x0F, b["q"] >> 4], axis=1).astype(np.float32)  # (blocks, 32): low, then high
        d = b["d"].astype(np.float32)[:, None]
        w = d * q + b["m"].astype(np.float32)[:, None] if type_name == "Q4_1" else d * (q - 8)
    else:
        raise ValueError(f"ggml type {type_name} is not readable")
    return torch.from_numpy(np.array(w, dtype=np.float32).reshape(shape))  # a copy: the file bytes stay read-only


def _unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """attn_q / attn_k rows as llama.cpp stores them -> HF's order: per head, stored row 2i is HF row i and
    stored row 2i + 1 is HF row i + D/2. (heads * D, C) -> (heads * D, C)."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# ----------------------------------------------------------------------------- model

def _key(meta, key, f, kinds=(int,), default=None):
    value = meta.get(key, default)
    if value is None:
        raise ValueError(f"{f}: metadata lacks {key}")
    if type(value) not in kinds:
        raise ValueError(f"{f}: metadata {key} = {value!r} is not a {' or '.join(k.__name__ for k in kinds)}")
    return value


def _rope_scaling(meta, arch, f):
    """llama.rope.scaling.* (or the older rope.scale_linear) -> HF rope_scaling; what minipost does not compute
    is refused."""
    kind = meta.get(f"{arch}.rope.scaling.type", "linear" if f"{arch}.rope.scale_linear" in meta else "none")
    factor = meta.get(f"{arch}.rope.scaling.factor", meta.get(f"{arch}.rope.scale_linear"))
    if kind == "none" or (kind == "linear" and factor == 1.0):
        return None
    if kind != "linear" or type(factor) is not float:
        raise ValueError(f"{f}: {arch}.rope.scaling.type {kind!r} (factor {factor!r}) is not supported "
                         "(minipost reads none and linear)")
    return {"rope_type": "linear", "factor": factor}


def gguf_hf_config(meta: dict, tensors: dict, f) -> dict:
    """The llama.* metadata as a Hugging Face LlamaConfig dict (hf_config then checks and converts it)."""
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{f}: general.architecture {arch!r} is not supported (minipost reads "
                         f"{', '.join(ARCHITECTURES)} GGUF files)")
    if meta.get(f"{arch}.expert_count"):
        raise ValueError(f"{f}: {arch}.expert_count={meta[f'{arch}.expert_count']}: mixture-of-experts models are "
                         "not supported")
    if "rope_freqs.weight" in tensors:
        raise ValueError(f"{f}: rope_freqs.weight (per-frequency rotary factors, as in Llama 3.1 files) is not "
                         "supported")
    width, heads = _key(meta, f"{arch}.embedding_length", f), _key(meta, f"{arch}.attention.head_count", f)
    head_dim = width // heads if heads else 0
    for key in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
        if meta.get(f"{arch}.{key}", head_dim) != head_dim:
            raise ValueError(f"{f}: {arch}.{key}={meta[f'{arch}.{key}']} is not embedding_length / head_count = "
                             f"{head_dim} (partial rotary or other head sizes are not supported)")
    embd = tensors.get("token_embd.weight")
    if embd is None:
        raise ValueError(f"{f}: no tensor token_embd.weight")
    return dict(model_type="llama", hidden_size=width, num_attention_heads=heads,
                intermediate_size=_key(meta, f"{arch}.feed_forward_length", f),
                num_hidden_layers=_key(meta, f"{arch}.block_count", f),
                num_key_value_heads=_key(meta, f"{arch}.attention.head_count_kv", f, default=heads),
                vocab_size=_key(meta, f"{arch}.vocab_size", f, default=embd[1][0]),
                max_position_embeddings=_key(meta, f"{arch}.context_length", f),
                rms_norm_eps=_key(meta, f"{arch}.attention.layer_norm_rms_epsilon", f, (float,)),
                # llama.cpp's own default when a file leaves the base out
                rope_theta=_key(meta, f"{arch}.rope.freq_base", f, (float,), default=10000.0),
                rope_scaling=_rope_scaling(meta, arch, f), hidden_act="silu",
                tie_word_embeddings="output.weight" not in tensors)


def _hf_name(name: str, f) -> str:
    base, _, suffix = name.rpartition(".")
    if suffix in ("weight", "bias"):
        if base in _TOP_NAMES:
            return f"{_TOP_NAMES[base]}.{suffix}"
        parts = base.split(".")
        if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
            return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{suffix}"
    raise ValueError(f"{f}: tensor {name} is not part of a llama model minipost reads")


def load_gguf_model(path, meta=None, tensors=None) -> GPT:
    """A GGUF file's llama model as minipost's GPT (float32, CPU)."""
    f = Path(path)
    if meta is None:
        meta, tensors = read_gguf(f)
    config = hf_config(gguf_hf_config(meta, tensors, f))
    hf = {}
    for name, (type_name, shape, raw) in tensors.items():
        w = dequantize(type_name, shape, raw)
        if name.endswith(("attn_q.weight", "attn_k.weight")):
            w = _unpermute(w, config.n_head if "attn_q" in name else config.kv_heads)
        hf[_hf_name(name, f)] = w
    return model_from_hf_tensors(config, hf, f, source="the metadata")


# ----------------------------------------------------------------------------- tokenizer

def load_gguf_tokenizer(path, meta=None) -> Tokenizer:
    """tokenizer.ggml.* and tokenizer.chat_template -> Tokenizer (see the module docstring)."""
    f = Path(path)
    if meta is None:
        meta, _ = read_gguf(f)
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"{f}: tokenizer.ggml.model {kind!r} is not supported (minipost reads byte-level BPE, "
                         "'gpt2'; not SentencePiece 'llama' vocabularies)")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise ValueError(f"{f}: tokenizer.ggml.pre {pre!r} is not supported (minipost reads "
                         f"{', '.join(PRE_TOKENIZERS)})")
    tokens, merges = meta.get("tokenizer.ggml.tokens"), meta.get("tokenizer.ggml.merges", [])
    types = meta.get("tokenizer.ggml.token_type", [TOKEN_NORMAL] * len(tokens or []))
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens) or len(types) != len(tokens):
        raise ValueError(f"{f}: tokenizer.ggml.tokens must be strings, as many as tokenizer.ggml.token_type")
    specials, vocab = {}, {}
    for i, (token, t) in enumerate(zip(tokens, types)):
        if t not in (TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED):
            raise ValueError(f"{f}: token {i} {token!r} has token type {t} (minipost reads normal, control and "
                             "user-defined tokens)")
        (vocab if t == TOKEN_NORMAL else specials)[token] = i
    ranks = _ranks({"vocab": vocab, "merges": merges}, specials, f)

    def name(key):
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if type(i) is int and 0 <= i < len(tokens) else None

    template = meta.get("tokenizer.chat_template", "")
    try:
        return byte_level_tokenizer(f.stem, ranks, specials, PRE_TOKENIZERS[pre],
                                    template if isinstance(template, str) else "", name("bos_token_id"),
                                    name("padding_token_id"))
    except ValueError as e:
        raise ValueError(f"{f}: {e}")


def is_gguf_file(path) -> bool:
    """True for a file named *.gguf or starting with GGUF's magic: loading it then works or says why not."""
    p = Path(path)
    if not p.is_file():
        return False
    if p.suffix.lower() == ".gguf":
        return True
    try:
        with open(p, "rb") as fh:
            return fh.read(4) == MAGIC
    except OSError:
        return False


def load_gguf(path):
    """(GPT, Tokenizer) from one GGUF file; wte grows when the tokenizer needed minipost's specials."""
    meta, tensors = read_gguf(path)
    model, tokenizer = load_gguf_model(path, meta, tensors), load_gguf_tokenizer(path, meta)
    if tokenizer.vocab_size > model.config.vocab_size:
        resize_vocab(model, tokenizer.vocab_size)
    return model, tokenizer
