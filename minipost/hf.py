"""Today's small open models: Hugging Face folders of Llama, Qwen2 and Mistral models in and out, read and
written by hand (no transformers, tokenizers or safetensors packages).

A folder, as `huggingface-cli download HuggingFaceTB/SmolLM2-135M-Instruct` leaves it or `export_hf` writes it:

    config.json                    model_type llama | qwen2 | mistral, sizes, rms_norm_eps, and the rotary settings:
                                   transformers 4.x's rope_theta + rope_scaling, or 5.x's rope_parameters
    model.safetensors              the weights (float32, bfloat16 or float16), or shards
    model-00001-of-00002.safetensors ...   with model.safetensors.index.json {"weight_map": {tensor: shard}}
    tokenizer.json                 byte-level BPE: vocab, merges, pre-tokenizer regex, normalizer, added tokens
    tokenizer_config.json          chat_template (which chat format render() writes), bos / pad token names

The model becomes minipost's GPT with the Llama-style options (minipost/model.py): RMSNorm, rotary positions,
SwiGLU, grouped-query attention, q/k/v biases for Qwen2, the head tied or not. Hugging Face's parameter names
map onto minipost's GPT-2 names, per layer N (model.layers.N. -> transformer.h.N.):

    model.embed_tokens                         transformer.wte
    input_layernorm / post_attention_layernorm ln_1 / ln_2
    self_attn.q_proj, k_proj, v_proj           attn.c_attn (stacked by rows in that order; biases likewise)
    self_attn.o_proj                           attn.c_proj
    mlp.gate_proj, up_proj                     mlp.c_fc (stacked by rows: gate, then up)
    mlp.down_proj                              mlp.c_proj
    model.norm                                 transformer.ln_f
    lm_head                                    lm_head (left out of a tied model's files, as HF does)

Refused with one line: other model types, mixtures of experts, sliding-window attention, rope scaling other
than linear and llama3 (or with fields minipost does not compute), partial rotary, biases beyond q/k/v,
activations other than SiLU, a head_dim that is not hidden_size / num_attention_heads. A Mistral folder
without a sliding window is a Llama and is exported as one.

Config schemas: transformers 5 writes the rotary settings as "rope_parameters": {"rope_theta", "rope_type",
<scaling fields>} and 4.x as top-level rope_theta and rope_scaling; both are read, and a file holding both
must hold the same values in each. A field that changes the numbers is never filled in by a guess: rope_theta
absent everywhere is refused; elsewhere an absent field gets what transformers' own config class gives it
(rms_norm_eps 1e-6, silu, an untied head, num_key_value_heads as many as the query heads for Llama but 32
for Qwen2 and 8 for Mistral), and a Mistral config without sliding_window, which transformers would run with a
window of 4096, is refused. The dtype (5.x `dtype`, 4.x `torch_dtype`) is not read: the weights' own is.
export_hf writes both rotary schemas, equal, and both dtype names, so that transformers 4.x and 5.x read it.

Tokenizer: tiktoken merges the adjacent pair whose joined token has the lowest id; Hugging Face's BPE applies
merges in the order of the merges list. The two agree when the ids of merged tokens grow down the merges list
(true of Llama 3's and Qwen2's vocabularies, converted from tiktoken, and of vocabularies trained by HF's BPE
trainer, which numbers tokens as it creates them); the reader checks it. Later merges that make a token
again (HF's converter lists every split of a token) keep that token's id as their priority; tiktoken also
uses a whole pre-token that is itself in the vocabulary directly (HF's ignore_merges). Single bytes may be
missing from the vocabulary (real ones lack bytes never seen in training: SmolLM2 lacks 21); text holding one
is encoded as Hugging Face encodes it, the byte dropped from its pre-token (minipost.tokenizer.Tokenizer).
Added tokens become tiktoken special tokens: render() inserts them, text never produces them (minipost's rule
for every tokenizer); export lists them in the vocabulary too, where transformers keeps their ids.
The chat format is read off the chat template's markers (minipost does not run Jinja): ChatML or Llama 3's
headers, else minipost's own on new ids. A default system message that a template inserts by itself (Qwen2.5's,
SmolLM2's, Llama 3.1's date header) is not added: pass it as the first message if the model expects it.
"""
import json
from pathlib import Path

import tiktoken
import torch

from .adapters import merge_adapters
from .gpt2 import (GPT2_PATTERN, _derive_merges, bytes_to_unicode, model_from_state, read_safetensors, resize_vocab,
                   write_safetensors)
from .model import GPT, ROPE_SCALING, SIZE_LIMITS, GPTConfig
from .tokenizer import CHAT_FORMATS, SPECIAL_TOKENS, Tokenizer, _encoding

MODEL_TYPES = ("llama", "qwen2", "mistral")
# num_key_value_heads when config.json leaves it out: each transformers config class's default (None: as many
# as the query heads)
KV_HEADS = {"llama": None, "qwen2": 32, "mistral": 8}
INDEX = "model.safetensors.index.json"
# SmolLM2's pre-tokenizer, Digits(individual) then ByteLevel's GPT-2 regex, as one regex: GPT-2's with a digit
# always alone, and a run of spaces before a digit ending there (the digit was the end of its segment)
GPT2_DIGITS_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


# ----------------------------------------------------------------------------- config

def is_hf_folder(path) -> bool:
    """True if `path` holds a config.json naming a model_type other than gpt2 (gpt2.py reads those): loading
    it then either works or says in one line what is not supported."""
    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and isinstance(cfg.get("model_type"), str) and cfg["model_type"] != "gpt2"


def _rope_dict(hf: dict, key: str):
    """config[key] (rope_parameters or rope_scaling) as minipost's (theta or None, {"type", ...} or None), or
    None when absent; ValueError for what minipost does not compute, including keys it does not know."""
    rp = hf.get(key)
    if rp is None:
        return None
    if not isinstance(rp, dict):
        raise ValueError(f"{key} must be an object, got {rp!r:.80}")
    kind = rp.get("rope_type", rp.get("type", "default"))  # no type: transformers computes the default rotary
    if not isinstance(kind, str) or kind != "default" and kind not in ROPE_SCALING:
        raise ValueError(f"{key} type {kind!r} is not supported (minipost computes default, "
                         f"{' and '.join(ROPE_SCALING)})")
    fields = ROPE_SCALING.get(kind, ())
    if missing := [k for k in fields if k not in rp]:
        raise ValueError(f"{key} {kind} lacks {missing}")
    if rp.get("partial_rotary_factor", 1) != 1:
        raise ValueError(f"{key} partial_rotary_factor={rp['partial_rotary_factor']}: minipost rotates every pair")
    if unknown := sorted(set(rp) - {"rope_type", "type", "rope_theta", "partial_rotary_factor", *fields}):
        raise ValueError(f"{key} {kind} has {unknown}, which minipost does not compute")
    return rp.get("rope_theta"), None if kind == "default" else {"type": kind, **{k: rp[k] for k in fields}}


def _rope(hf: dict):
    """(rope_theta, rope_scaling or None) from either schema: transformers 4.x's top-level rope_theta and
    rope_scaling, or 5.x's rope_parameters {"rope_theta", "rope_type", <scaling fields>}. Where a file holds
    both, they must agree. No default: a config without rope_theta anywhere is refused (transformers would
    take its class default, and a wrong theta moves every logit while loading without a word)."""
    if hf.get("partial_rotary_factor", 1) != 1:
        raise ValueError(f"partial_rotary_factor={hf['partial_rotary_factor']}: minipost rotates every pair")
    found = {key: d for key in ("rope_parameters", "rope_scaling") if (d := _rope_dict(hf, key)) is not None}
    thetas = {where: t for where, t in [("rope_theta", hf.get("rope_theta")),
                                        *((f"{key}.rope_theta", d[0]) for key, d in found.items())] if t is not None}
    if not thetas:
        raise ValueError("rope_theta is neither at the top level nor in rope_parameters (no default is assumed)")
    for where, theta in thetas.items():
        if type(theta) not in (int, float) or not 0 < theta < float("inf"):
            raise ValueError(f"{where} must be a positive number, got {theta!r:.80}")
    if len(set(thetas.values())) > 1:
        raise ValueError("rope_theta differs between " + " and ".join(f"{k}={v}" for k, v in thetas.items()))
    theta = next(iter(thetas.values()))
    scalings = [d[1] for d in found.values()]
    if len(scalings) == 2 and scalings[0] != scalings[1]:
        raise ValueError(f"rope_parameters {scalings[0]} and rope_scaling {scalings[1]} disagree")
    return float(theta), scalings[0] if scalings else None


def hf_config(hf: dict) -> GPTConfig:
    """HF LlamaConfig / Qwen2Config / MistralConfig dict (as transformers 4.x or 5.x writes it) -> GPTConfig,
    refusing what minipost would compute differently (ValueError, one line). A field that changes the numbers
    is read, or, where absent, given the value transformers' own config class gives it (KV_HEADS and the
    rms_norm_eps, hidden_act, tie_word_embeddings, attention_bias defaults below), or refused (rope_theta,
    Mistral's sliding_window)."""
    kind = hf.get("model_type")
    if kind not in MODEL_TYPES:
        raise ValueError(f"model_type {kind!r} is not supported (minipost reads {', '.join(MODEL_TYPES)} and gpt2)")
    if moe := [k for k in ("num_local_experts", "num_experts", "n_routed_experts") if hf.get(k)]:
        raise ValueError(f"{moe[0]}={hf[moe[0]]}: mixture-of-experts models are not supported")
    if kind == "mistral" and "sliding_window" not in hf:
        raise ValueError("a mistral config without sliding_window: transformers then uses a window of 4096 "
                         "(sliding-window attention is not supported; write null for none)")
    if hf.get("sliding_window") is not None and (kind == "mistral" or hf.get("use_sliding_window")):
        raise ValueError(f"sliding_window={hf['sliding_window']}: sliding-window attention is not supported")
    layer_types = hf.get("layer_types")  # transformers 5's per-layer attention kinds (Qwen2 writes them)
    attention_kinds = set(map(str, layer_types)) if isinstance(layer_types, list) else None
    if layer_types is not None and (attention_kinds is None or attention_kinds - {"full_attention"}):
        shown = sorted(attention_kinds) if attention_kinds is not None else layer_types
        raise ValueError(f"layer_types {shown!r:.120}: only full_attention layers are supported")
    if hf.get("hidden_act", "silu") != "silu":  # silu: every one of the three classes' default
        raise ValueError(f"hidden_act={hf['hidden_act']!r}: minipost's SwiGLU uses silu")
    for flag in ("attention_bias", "mlp_bias"):  # LlamaConfig's, false by default; Qwen2's q/k/v biases are fixed
        if hf.get(flag):
            raise ValueError(f"{flag}=true: only Qwen2's q/k/v biases are supported")
    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                           "vocab_size", "max_position_embeddings") if k not in hf]
    if missing:
        raise ValueError(f"config.json lacks {', '.join(missing)}")
    heads, width = hf["num_attention_heads"], hf["hidden_size"]
    rope_theta, rope_scaling = _rope(hf)
    # null: every class takes num_attention_heads; absent: the class default (the weights' shapes confirm it)
    kv_heads = hf.get("num_key_value_heads", KV_HEADS[kind]) or heads
    config = GPTConfig(
        # rotary positions need no table: block_size is only the longest sequence allowed, kept in range
        block_size=min(hf["max_position_embeddings"], SIZE_LIMITS["block_size"]), vocab_size=hf["vocab_size"],
        n_layer=hf["num_hidden_layers"], n_head=heads, n_embd=width, dropout=0.0, bias=False,
        # 1e-6 and an untied head: the default of all three classes, which transformers applies when absent
        norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6), pos="rope", rope_theta=rope_theta,
        rope_scaling=rope_scaling, mlp="swiglu", mlp_hidden=hf["intermediate_size"],
        n_kv_head=kv_heads, qkv_bias=kind == "qwen2", tie_embeddings=hf.get("tie_word_embeddings", False) is True)
    config.check()
    if hf.get("head_dim") not in (None, config.head_dim):
        raise ValueError(f"head_dim={hf['head_dim']} is not hidden_size / num_attention_heads = {config.head_dim}")
    return config


# ----------------------------------------------------------------------------- weights

def _layer_map(config: GPTConfig) -> dict:
    """minipost name inside block N -> [(HF name inside model.layers.N, rows)]: the HF tensors stacked by rows
    into that minipost tensor, in order."""
    C, F = config.n_embd, config.hidden
    q, kv = config.n_head * config.head_dim, config.kv_heads * config.head_dim
    m = {"ln_1.weight": [("input_layernorm.weight", C)],
         "attn.c_attn.weight": [("self_attn.q_proj.weight", q), ("self_attn.k_proj.weight", kv),
                                ("self_attn.v_proj.weight", kv)],
         "attn.c_proj.weight": [("self_attn.o_proj.weight", C)],
         "ln_2.weight": [("post_attention_layernorm.weight", C)],
         "mlp.c_fc.weight": [("mlp.gate_proj.weight", F), ("mlp.up_proj.weight", F)],
         "mlp.c_proj.weight": [("mlp.down_proj.weight", C)]}
    if config.qkv_bias:
        m["attn.c_attn.bias"] = [("self_attn.q_proj.bias", q), ("self_attn.k_proj.bias", kv),
                                 ("self_attn.v_proj.bias", kv)]
    return m


def read_hf_weights(path: Path) -> dict:
    """{HF name: tensor} from model.safetensors, or from every shard model.safetensors.index.json names."""
    index = path / INDEX
    if not index.is_file():
        if not (path / "model.safetensors").is_file():
            raise ValueError(f"{path}: no model.safetensors or {INDEX}")
        return read_safetensors(path / "model.safetensors")
    weight_map = json.loads(index.read_text()).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index}: no weight_map of tensor name -> shard file")
    tensors = {}
    for shard in sorted(set(weight_map.values())):
        f = path / shard
        if Path(shard).name != shard or not f.is_file():  # a bare file name in this folder, nothing else
            raise ValueError(f"{index}: shard {shard} is missing from {path}")
        tensors.update(read_safetensors(f))
    if absent := sorted(set(weight_map) - set(tensors)):
        raise ValueError(f"{index}: tensor {absent[0]} is in no shard ({len(absent)} missing)")
    return tensors


def load_hf_model(path) -> GPT:
    """config.json + weights -> minipost GPT (float32, CPU)."""
    path = Path(path)
    try:
        config = hf_config(json.loads((path / "config.json").read_text()))
    except ValueError as e:  # a JSONDecodeError is one too
        raise ValueError(f"{path / 'config.json'}: {e}")
    return model_from_hf_tensors(config, read_hf_weights(path), path)


def model_from_hf_tensors(config: GPTConfig, hf: dict, path, source="config.json") -> GPT:
    """GPT(config) from {HF name: tensor} (consumed); `source` names where the sizes came from in errors.
    minipost/gguf.py comes through here too, its tensors renamed to HF's."""
    def take(name, rows=None):
        if name not in hf:
            raise ValueError(f"{path}: weights lack {name}")
        t = hf.pop(name).float()
        if rows is not None and t.shape[0] != rows:
            raise ValueError(f"{path}: {name} has {t.shape[0]} rows, {source} implies {rows}")
        return t

    sd = {"transformer.wte.weight": take("model.embed_tokens.weight")}
    for i in range(config.n_layer):
        for name, parts in _layer_map(config).items():
            sd[f"transformer.h.{i}.{name}"] = torch.cat([take(f"model.layers.{i}.{hf_name}", rows)
                                                         for hf_name, rows in parts])
    sd["transformer.ln_f.weight"] = take("model.norm.weight")
    head = take("lm_head.weight") if "lm_head.weight" in hf or not config.tie_embeddings else None
    if config.tie_embeddings and head is not None and not torch.equal(head, sd["transformer.wte.weight"]):
        raise ValueError(f"{path}: lm_head.weight differs from embed_tokens but tie_word_embeddings is true")
    sd["lm_head.weight"] = sd["transformer.wte.weight"] if config.tie_embeddings else head
    for name in [k for k in hf if k.startswith("score_head.")]:  # a reward / value model exported by minipost
        sd[name] = take(name)
    config.scalar_head = "score_head.weight" in sd
    if rest := sorted(k for k in hf if not k.endswith("rotary_emb.inv_freq")):  # old files store the rope table
        raise ValueError(f"{path}: unexpected tensors {rest[:3]} ({len(rest)} in all)")
    return model_from_state(config, sd, path)


# ----------------------------------------------------------------------------- tokenizer

def _token_name(value):
    """tokenizer_config's bos_token / pad_token: a string, or {"content": string}, or null."""
    return value.get("content") if isinstance(value, dict) else value if isinstance(value, str) else None


def _pattern(pre, f) -> str:
    """The pre-tokenizer of a byte-level BPE tokenizer.json as one tiktoken regex."""
    steps = pre.get("pretokenizers", []) if isinstance(pre, dict) and pre.get("type") == "Sequence" else [pre]
    steps = [s if isinstance(s, dict) else {} for s in steps]
    kinds = [s.get("type") for s in steps]
    byte_level = steps[-1] if kinds and kinds[-1] == "ByteLevel" else None
    if byte_level is not None and not byte_level.get("add_prefix_space", True):
        regex = byte_level.get("use_regex", True)
        if kinds == ["ByteLevel"] and regex:  # GPT-2's own
            return GPT2_PATTERN
        if kinds == ["Digits", "ByteLevel"] and regex and steps[0].get("individual_digits"):  # SmolLM2
            return GPT2_DIGITS_PATTERN
        split = steps[0]
        if (kinds == ["Split", "ByteLevel"] and not regex and split.get("behavior") == "Isolated"
                and not split.get("invert") and isinstance(split.get("pattern", {}).get("Regex"), str)):
            return split["pattern"]["Regex"]  # Llama 3, Qwen2
    raise ValueError(f"{f}: pre-tokenizer {kinds} is not supported (minipost reads byte-level BPE: ByteLevel "
                     "without a prefix space, alone, after Digits, or after one Split regex)")


def _ranks(model: dict, specials: dict, f) -> dict:
    """A BPE model's {"vocab": {token: id}, "merges": ["a b" or [a, b], ...]} (tokens in the byte-level
    alphabet, as tokenizer.json and GGUF's tokenizer.ggml.tokens / merges hold them) -> tiktoken ranks
    {bytes: id}, leaving out the added tokens `specials` {name: id}; checked as the module docstring says.
    f names the source in errors."""
    decoder = {c: b for b, c in bytes_to_unicode().items()}
    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or not all(type(i) is int for i in vocab.values()):
        raise ValueError(f"{f}: model.vocab must map token strings to integer ids")

    def to_bytes(s):
        try:
            return bytes(decoder[c] for c in s)
        except KeyError:
            raise ValueError(f"{f}: token {s!r} has a character outside the byte-level alphabet (not byte-level BPE)")

    ranks = {}
    for s, i in vocab.items():
        if s in specials:  # some files list added tokens in the vocab too
            if specials[s] != i:
                raise ValueError(f"{f}: added token {s!r} has id {specials[s]} but vocab id {i}")
            continue
        ranks[to_bytes(s)] = i
    # single bytes never seen in training may be absent (SmolLM2 lacks 21); Tokenizer.encode drops them as HF does
    made, prev = {bytes([b]) for b in range(256)} & set(ranks), -1
    for n, merge in enumerate(model.get("merges", []), 1):
        ab = merge.split(" ") if isinstance(merge, str) else merge  # "a b" (older files) or ["a", "b"]
        if not isinstance(ab, list) or len(ab) != 2 or not all(isinstance(x, str) for x in ab):
            raise ValueError(f"{f}: merge {n} is not a pair of tokens: {merge!r}")
        a, b = map(to_bytes, ab)
        r, ra, rb = ranks.get(a + b), ranks.get(a), ranks.get(b)
        if r is None or ra is None or rb is None:
            raise ValueError(f"{f}: merge {n} {merge!r} uses or makes a token not in the vocab")
        if a + b in made:
            continue  # another split of a token made earlier: it keeps that token's priority
        if not (r > prev and r > ra and r > rb):
            raise ValueError(f"{f}: merge {n} {merge!r} makes id {r}, out of order with the merges before it "
                             "(tiktoken would merge in another order)")
        prev = r
        made.add(a + b)
    if stray := set(ranks) - made:
        raise ValueError(f"{f}: {len(stray)} tokens are neither bytes nor made by a merge, e.g. {sorted(stray)[0]!r}")
    return ranks


def _chat_template(path: Path, config: dict) -> str:
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    if not isinstance(template, str) and (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text(encoding="utf-8")
    return template if isinstance(template, str) else ""


def load_hf_tokenizer(path) -> Tokenizer:
    """tokenizer.json (+ tokenizer_config.json) -> Tokenizer in the model's own chat format: ChatML when the
    chat template (or, without one, the vocabulary) has <|im_start|>, Llama 3's when it has <|start_header_id|>,
    else minipost's, whose special tokens are then appended after the last id."""
    path = Path(path)
    f = path / "tokenizer.json"
    if not f.is_file():
        raise ValueError(f"{path}: no tokenizer.json")
    try:
        tj = json.loads(f.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{f}: not JSON ({e})")
    model = tj.get("model") if isinstance(tj, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE":
        kind = model.get("type") if isinstance(model, dict) else None
        raise ValueError(f"{f}: a {kind} tokenizer; minipost reads byte-level BPE tokenizers only")
    if model.get("byte_fallback") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise ValueError(f"{f}: a BPE with byte fallback or subword affixes (SentencePiece-style), not byte-level BPE")
    normalizer = tj.get("normalizer")
    if normalizer not in (None, {"type": "NFC"}):
        raise ValueError(f"{f}: normalizer {normalizer.get('type') if isinstance(normalizer, dict) else normalizer} "
                         "is not supported (none or NFC)")
    added = tj.get("added_tokens") or []
    if not all(isinstance(t, dict) and isinstance(t.get("content"), str) and type(t.get("id")) is int for t in added):
        raise ValueError(f"{f}: added_tokens must be objects with a string content and an integer id")
    specials = {t["content"]: t["id"] for t in added}
    ranks = _ranks(model, specials, f)
    pattern = _pattern(tj.get("pre_tokenizer"), f)
    cfg_file = path / "tokenizer_config.json"
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8")) if cfg_file.is_file() else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{cfg_file}: not JSON ({e})")
    cfg = cfg if isinstance(cfg, dict) else {}
    try:
        return byte_level_tokenizer(path.name or "hf", ranks, specials, pattern, _chat_template(path, cfg),
                                    _token_name(cfg.get("bos_token")), _token_name(cfg.get("pad_token")),
                                    nfc=normalizer is not None)
    except ValueError as e:
        raise ValueError(f"{f}: {e}")


def byte_level_tokenizer(enc_name, ranks, specials, pattern, template, bos, pad, nfc=False) -> Tokenizer:
    """A Tokenizer from a byte-level BPE's ranks and special tokens (specials grows when minipost's own are
    needed), in the chat format the template's markers name; bos, pad: the model's token names or None.
    minipost/gguf.py builds GGUF tokenizers through here too."""
    chat = next((fmt for fmt, marker in (("chatml", "<|im_start|>"), ("llama3", "<|start_header_id|>"))
                 if marker in template or (not template and marker in specials)), "minipost")
    if chat == "minipost":  # no chat format of its own that minipost knows: minipost's, on new ids
        next_id = max([*ranks.values(), *specials.values()]) + 1
        for token in SPECIAL_TOKENS:
            if token not in specials:
                specials[token], next_id = next_id, next_id + 1
    # the document separator of `text` rows: <|endoftext|> where the model has it (Qwen2, SmolLM2), not a
    # chat marker some configs call bos; Llama 3's and minipost's formats fix their own
    bos = "<|endoftext|>" if "<|endoftext|>" in specials else bos
    enc = _encoding(enc_name, pattern, ranks, specials)
    return Tokenizer(enc, chat, bos if bos in specials else None, pad if pad in specials else None, nfc=nfc)


def load_hf_folder(path):
    """(GPT, Tokenizer) from one Hugging Face folder; wte grows when the tokenizer needed minipost's specials."""
    model, tokenizer = load_hf_model(path), load_hf_tokenizer(path)
    if tokenizer.vocab_size > model.config.vocab_size:
        resize_vocab(model, tokenizer.vocab_size)
    return model, tokenizer


# ----------------------------------------------------------------------------- export

# Jinja chat templates written into tokenizer_config.json, so that tools other than minipost render the same
# format: messages with role and content, then, if asked, the assistant's header
CHAT_TEMPLATES = {
    "minipost": "{{ '<|endoftext|>' }}{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}",
    "chatml": "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
    "llama3": "{{ '<|begin_of_text|>' }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + "
              "'<|end_header_id|>\n\n' + (m['content'] | trim) + '<|eot_id|>' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
}
assert set(CHAT_TEMPLATES) == set(CHAT_FORMATS)


def export_hf_tokenizer(tokenizer: Tokenizer, out: Path, block_size: int):
    """tokenizer.json (byte-level BPE, merges derived from the ranks, the split regex as a Split pre-tokenizer)
    and tokenizer_config.json (chat template, bos / eos / pad names)."""
    ranks, specials = tokenizer.enc._mergeable_ranks, tokenizer.enc._special_tokens
    byte_enc = bytes_to_unicode()

    def text(tok: bytes) -> str:
        return "".join(byte_enc[b] for b in tok)

    tj = {"version": "1.0", "truncation": None, "padding": None,
          "added_tokens": [{"id": i, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
                            "normalized": False, "special": True} for name, i in sorted(specials.items(),
                                                                                       key=lambda kv: kv[1])],
          "normalizer": {"type": "NFC"} if tokenizer.nfc else None,
          "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
              {"type": "Split", "pattern": {"Regex": tokenizer.enc._pat_str}, "behavior": "Isolated", "invert": False},
              {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
          "post_processor": None,
          "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
          # ignore_merges: a pre-token that is itself a token is used whole, as tiktoken does
          "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                    "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                    # the added tokens too: tokenizers keeps an added token's id only if the vocab has it
                    # (else it numbers it after the vocab; SmolLM2's are ids 0-16)
                    "vocab": dict(sorted([*((text(t), r) for t, r in ranks.items()), *specials.items()],
                                         key=lambda kv: kv[1])),
                    "merges": [[text(a), text(b)] for a, b in _derive_merges(ranks)]}}
    (out / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    end = CHAT_FORMATS[tokenizer.chat]["end"]
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tokenizer.bos, "eos_token": end,
           "pad_token": tokenizer.pad, "model_max_length": block_size, "chat_template": CHAT_TEMPLATES[tokenizer.chat]}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")


def _shards(tensors: dict, max_bytes: int | None) -> list[dict]:
    """Tensors in order, cut into groups of at most max_bytes each (a bigger tensor alone); None: one group."""
    groups, size = [{}], 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if max_bytes is not None and groups[-1] and size + n > max_bytes:
            groups.append({})
            size = 0
        groups[-1][name], size = t, size + n
    return groups


def export_hf(model: GPT, tokenizer: Tokenizer, out_dir, dtype=torch.float32, max_shard_bytes=None):
    """Write model + tokenizer as a Hugging Face folder that load_hf_folder and transformers read: model_type
    qwen2 when c_attn has a bias, else llama; weights in `dtype` (float32 keeps them exact), in shards of at
    most max_shard_bytes with an index when that is given and they do not fit one. LoRA adapters are merged
    first; a prompt-tuned model cannot be exported (ValueError)."""
    model = merge_adapters(model)
    cfg = model.config
    if (cfg.norm, cfg.pos, cfg.mlp, cfg.bias) != ("rmsnorm", "rope", "swiglu", False):
        raise ValueError("export_hf writes the Llama-style layout (rmsnorm, rope, swiglu, no biases but q/k/v); "
                         "use minipost.gpt2.export_gpt2 for a GPT-2-layout model")
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype {dtype}: choose float32, bfloat16 or float16")
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only {cfg.vocab_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    tensors = {"model.embed_tokens.weight": sd.pop("transformer.wte.weight")}
    for i in range(cfg.n_layer):
        for name, parts in _layer_map(cfg).items():
            pieces = sd.pop(f"transformer.h.{i}.{name}").split([rows for _, rows in parts])
            tensors.update({f"model.layers.{i}.{hf_name}": t for (hf_name, _), t in zip(parts, pieces)})
    tensors["model.norm.weight"] = sd.pop("transformer.ln_f.weight")
    head = sd.pop("lm_head.weight")
    if not cfg.tie_embeddings:
        tensors["lm_head.weight"] = head
    tensors.update(sd)  # what is left: a scalar head (score_head.*), kept under minipost's name
    tensors = {k: v.to(dtype).contiguous() for k, v in tensors.items()}
    groups = _shards(tensors, max_shard_bytes)
    if len(groups) == 1:
        write_safetensors(out / "model.safetensors", tensors)
    else:
        weight_map = {}
        for n, group in enumerate(groups, 1):
            name = f"model-{n:05d}-of-{len(groups):05d}.safetensors"
            write_safetensors(out / name, group)
            weight_map.update({k: name for k in group})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    kind = "qwen2" if cfg.qkv_bias else "llama"
    rope_scaling = None
    if cfg.rope_scaling is not None:
        rope_scaling = {"rope_type": cfg.rope_scaling["type"], **{k: v for k, v in cfg.rope_scaling.items()
                                                                   if k != "type"}}
    # rotary settings in both schemas, equal: transformers 5.x reads rope_parameters, 4.x (and tools that
    # follow it) the top-level rope_theta and rope_scaling; the dtype likewise under its 5.x and 4.x names
    rope_parameters = {"rope_theta": cfg.rope_theta, **(rope_scaling or {"rope_type": "default"})}
    hf = dict(architectures=["Qwen2ForCausalLM" if kind == "qwen2" else "LlamaForCausalLM"], model_type=kind,
              vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.hidden,
              num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.kv_heads,
              head_dim=cfg.head_dim, max_position_embeddings=cfg.block_size, rms_norm_eps=cfg.norm_eps,
              rope_theta=cfg.rope_theta, rope_scaling=rope_scaling, rope_parameters=rope_parameters,
              hidden_act="silu", tie_word_embeddings=cfg.tie_embeddings, attention_dropout=0.0,
              bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id,
              dtype=_DTYPE_NAMES[dtype], torch_dtype=_DTYPE_NAMES[dtype])
    if kind == "llama":
        hf.update(attention_bias=False, mlp_bias=False)
    else:
        hf.update(use_sliding_window=False, sliding_window=None)
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    export_hf_tokenizer(tokenizer, out, cfg.block_size)
    return out
