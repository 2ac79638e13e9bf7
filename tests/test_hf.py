"""Hugging Face Llama / Qwen2 / Mistral folders in and out (minipost/hf.py), and the Llama-style block.

Every folder here is written by the test: config.json, weights under HF's names through the test's own
safetensors writer (single file or shards with an index; float32, bfloat16, float16), and a tokenizer.json
whose vocabulary and merges come from a naive BPE trainer written below. Imported logits are checked against
a float64 forward written here over the raw HF tensors; tokenization against a naive merges-list BPE.
"""
import json
import math
import re
import unicodedata
from collections import Counter

import pytest
import torch

import train_rlhf
import train_sft
from minipost import adapters
from minipost.checkpoint import load_checkpoint
from minipost.cli import read_metrics
from minipost.gpt2 import bytes_to_unicode, read_safetensors
from minipost.hf import (GPT2_DIGITS_PATTERN, export_hf, hf_config, is_hf_folder, load_hf_folder, load_hf_model,
                         load_hf_tokenizer)
from minipost.model import GPT, GPTConfig, rope_frequencies
from minipost.tasks import get_task
from minipost.tokenizer import _WHITESPACE, PATTERN, Tokenizer, _category_class, training_regex
from test_gpt2 import write_st

LLAMA = dict(model_type="llama", hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=64, max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=10000.0,
             hidden_act="silu", tie_word_embeddings=False,
             # D = 8: speeds 1, 0.1, 0.01, 0.001; wavelengths 6.3 (kept), 63 (blended), 628 and 6283 (slowed)
             rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=16.0,
                               original_max_position_embeddings=512))
QWEN2 = dict(model_type="qwen2", hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=1, vocab_size=64, max_position_embeddings=64, rms_norm_eps=1e-5,
             rope_theta=1000000.0, hidden_act="silu", tie_word_embeddings=True, use_sliding_window=False,
             sliding_window=4096, rope_scaling=None)
MISTRAL = dict(LLAMA, model_type="mistral", sliding_window=None, rope_scaling=None, num_key_value_heads=4)


# ----------------------------------------------------------------------------- fixtures written by the test

def hf_tensors(cfg, seed=0):
    """Random weights under HF's names: q/k/v/o, gate/up/down, RMSNorm gains away from 1, Qwen2's q/k/v biases."""
    g = torch.Generator().manual_seed(seed)
    C, F, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    H, Hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    D = C // H

    def r(*shape, std=0.2):
        return torch.randn(*shape, generator=g) * std

    sd = {"model.embed_tokens.weight": r(V, C, std=0.25)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd.update({p + "input_layernorm.weight": 1 + r(C), p + "self_attn.q_proj.weight": r(H * D, C),
                   p + "self_attn.k_proj.weight": r(Hkv * D, C), p + "self_attn.v_proj.weight": r(Hkv * D, C),
                   p + "self_attn.o_proj.weight": r(C, H * D), p + "post_attention_layernorm.weight": 1 + r(C),
                   p + "mlp.gate_proj.weight": r(F, C), p + "mlp.up_proj.weight": r(F, C),
                   p + "mlp.down_proj.weight": r(C, F)})
        if cfg["model_type"] == "qwen2":
            sd.update({p + "self_attn.q_proj.bias": r(H * D), p + "self_attn.k_proj.bias": r(Hkv * D),
                       p + "self_attn.v_proj.bias": r(Hkv * D)})
    sd["model.norm.weight"] = 1 + r(C)
    if not cfg["tie_word_embeddings"]:
        sd["lm_head.weight"] = r(V, C, std=0.25)
    return sd


def write_folder(path, cfg, tensors, dtype="F32", shards=1):
    """config.json + weights: one model.safetensors, or `shards` files and model.safetensors.index.json."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    if shards == 1:
        write_st(path / "model.safetensors", tensors, dtype)
        return path
    names, weight_map = list(tensors), {}
    for n in range(shards):
        file = f"model-{n + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in names[n::shards]}
        write_st(path / file, part, dtype)
        weight_map.update({k: file for k in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def rounded(tensors, dtype):
    """The values a folder of this dtype holds (the reference must read what the file stores)."""
    to = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}[dtype]
    return {k: v.to(to).float() for k, v in tensors.items()}


# ----------------------------------------------------------------------------- independent float64 forward

def llama3_speeds(cfg):
    """Rotary speeds per pair, with Llama 3's scaling written as Meta's reference states it: per frequency,
    keep it (short wavelength), divide it by factor (long), or blend the two by where 1/wavelength falls."""
    D = cfg["hidden_size"] // cfg["num_attention_heads"]
    speeds = [cfg["rope_theta"] ** (-2 * i / D) for i in range(D // 2)]
    rs = cfg.get("rope_scaling")
    if not rs:
        return speeds
    old, lo, hi, factor = (rs[k] for k in ("original_max_position_embeddings", "low_freq_factor", "high_freq_factor",
                                           "factor"))
    out = []
    for f in speeds:
        wavelength = 2 * math.pi / f
        if wavelength < old / hi:
            out.append(f)
        elif wavelength > old / lo:
            out.append(f / factor)
        else:
            smooth = (old / wavelength - lo) / (hi - lo)
            out.append((1 - smooth) * f / factor + smooth * f)
    return out


def reference_logits(sd, cfg, idx):
    """A Llama / Qwen2 / Mistral forward in float64 over the HF tensors: RMSNorm, rotary positions in HF's
    rotate-half layout, grouped-query attention with query head h on kv head h // (H / Hkv), SwiGLU."""
    W = {k: v.double() for k, v in sd.items()}
    C, H, Hkv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    D, (B, T) = C // H, idx.shape
    eps = cfg["rms_norm_eps"]

    def rms(x, name):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * W[name]

    def proj(x, name):
        y = x @ W[name + ".weight"].T
        return y + W[name + ".bias"] if name + ".bias" in W else y

    angle = torch.arange(T, dtype=torch.float64)[:, None] * torch.tensor(llama3_speeds(cfg), dtype=torch.float64)
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)  # (T, D): pair i with i + D/2

    def rotate(x):  # (B, T, D): x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1)
        return x * cos + torch.cat([-x[..., D // 2:], x[..., :D // 2]], -1) * sin

    visible = torch.ones(T, T, dtype=torch.bool).tril()  # (T, T): key j visible to query i iff j <= i
    x = W["model.embed_tokens.weight"][idx]  # (B, T, C)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms(x, p + "input_layernorm.weight")
        q, k, v = (proj(h, p + f"self_attn.{n}_proj") for n in "qkv")  # (B, T, H*D), (B, T, Hkv*D) x 2
        heads = []
        for head in range(H):
            g = head // (H // Hkv)  # the kv head this query head reads
            qh, kh = rotate(q[..., head * D:(head + 1) * D]), rotate(k[..., g * D:(g + 1) * D])
            s = (qh @ kh.transpose(1, 2) / math.sqrt(D)).masked_fill(~visible, float("-inf"))  # (B, T, T)
            heads.append(s.softmax(-1) @ v[..., g * D:(g + 1) * D])
        x = x + proj(torch.cat(heads, -1), p + "self_attn.o_proj")
        h = rms(x, p + "post_attention_layernorm.weight")
        gate, up = proj(h, p + "mlp.gate_proj"), proj(h, p + "mlp.up_proj")
        x = x + proj(gate * torch.sigmoid(gate) * up, p + "mlp.down_proj")
    head = W.get("lm_head.weight", W["model.embed_tokens.weight"])
    return rms(x, "model.norm.weight") @ head.T  # (B, T, V)


IDX = torch.tensor([[3, 17, 60, 5, 33, 42, 7, 25, 1, 0, 12, 13], [63, 2, 2, 2, 40, 41, 42, 43, 44, 9, 8, 7]])


@pytest.mark.parametrize("cfg,dtype,shards", [(LLAMA, "F32", 1), (QWEN2, "BF16", 3), (MISTRAL, "F16", 2)],
                         ids=["llama-f32", "qwen2-bf16-sharded", "mistral-f16-sharded"])
def test_import_matches_float64_forward(tmp_path, cfg, dtype, shards):
    sd = rounded(hf_tensors(cfg, seed=len(cfg)), dtype)
    folder = write_folder(tmp_path / "m", cfg, sd, dtype, shards)
    assert is_hf_folder(folder)
    model = load_hf_model(folder)
    assert next(model.parameters()).dtype == torch.float32
    with torch.no_grad():
        got = model.logits(model(IDX)).double()
    want = reference_logits(sd, cfg, IDX)
    # float32 against float64 through two layers of width 32: measured within 3.3e-6 on logits of size ~5; a
    # wrong rotary layout, kv head or scaling branch moves them by 1e-2 or more
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (model.lm_head.weight is model.transformer.wte.weight) == cfg["tie_word_embeddings"]
    assert model.transformer.h[0].attn.c_attn.weight.shape == (32 + 2 * 8 * cfg["num_key_value_heads"], 32)


def test_rope_frequencies_by_hand():
    config = hf_config(LLAMA)
    want = torch.tensor(llama3_speeds(LLAMA), dtype=torch.float64)
    torch.testing.assert_close(rope_frequencies(config).double(), want, rtol=1e-6, atol=0)
    assert 0.1 / 8 < want[1] < 0.1 and want[0] == 1 and want[2] == 0.01 / 8  # each branch taken once or more
    linear = hf_config({**LLAMA, "rope_scaling": {"type": "linear", "factor": 4.0}})
    torch.testing.assert_close(rope_frequencies(linear), 1 / 10000 ** (torch.arange(0, 8, 2) / 8) / 4)


# ----------------------------------------------------------------------------- tokenizer.json

BYTE = bytes_to_unicode()
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2
CORPUS = ("the cat sat on the mat; the dog ran 123 and 4567 laps. it's the cattle's mat!\n" * 3
          + "naïve café über 日本語 🙂  spaces   and\ttabs\n\n 2024-01-02 x1 y22 ")
TEXTS = ["the cat sat", "the cattle's 8 mats and 99 dogs", "über naïve 日本 🙂🙂", "a  1 b\n 2\t\t3 $4,5",
         "  leading and trailing  ", "it's 1234567 the end.", "", "\n\n", "<|im_end|> is text"]


def gpt2_digits_split(text):
    """SmolLM2's pre-tokenizer in two stages, as HF runs it: every digit its own piece, then GPT-2's regex
    (\\p classes spelt out for Python's re) on each stretch between digits."""
    L, N, S = _category_class("L"), _category_class("N"), _WHITESPACE
    gpt2 = re.compile(rf"""'s|'t|'re|'ve|'m|'ll|'d| ?[{L}]+| ?[{N}]+| ?[^{S}{L}{N}]+|[{S}]+(?![^{S}])|[{S}]+""")
    pieces = []
    for part in re.split(rf"([{N}])", text):
        pieces += [part] if re.fullmatch(rf"[{N}]", part) else gpt2.findall(part)
    return pieces


def train_naive(split, n_merges, text=CORPUS):
    """HF-style BPE training: the most frequent adjacent pair (ties: smallest) becomes a merge; ids: the added
    tokens, the 256 byte characters in code-point order, then each new token as it is made."""
    words = Counter(tuple(BYTE[b] for b in piece.encode()) for piece in split(text))
    vocab = {s: i for i, s in enumerate(SPECIALS + sorted(BYTE.values()))}
    merges = []
    for _ in range(n_merges):
        pairs = Counter()
        for w, n in words.items():
            for pair in zip(w, w[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        vocab.setdefault(best[0] + best[1], len(vocab))
        new = Counter()
        for w, n in words.items():
            out, i = [], 0
            while i < len(w):  # every occurrence, left to right
                if w[i:i + 2] == best:
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new[tuple(out)] += n
        words = new
    return vocab, merges


def naive_encode(text, split, vocab, merges):
    """HF's BPE on each piece: merge the adjacent pair that comes first in the merges list (leftmost on ties)."""
    prio = {m: i for i, m in enumerate(merges)}
    ids = []
    for piece in split(text):
        parts = [BYTE[b] for b in piece.encode()]
        while True:
            found = [(prio[p], i) for i, p in enumerate(zip(parts, parts[1:])) if p in prio]
            if not found:
                break
            i = min(found)[1]
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        ids += [vocab[p] for p in parts]
    return ids


CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}")


def write_tokenizer(path, vocab, merges, pre, specials=SPECIALS, template=CHATML, normalizer=None, as_pairs=True):
    path.mkdir(parents=True, exist_ok=True)
    added = [{"id": vocab[s], "content": s, "special": True} for s in specials]
    tj = {"version": "1.0", "added_tokens": added, "normalizer": normalizer, "pre_tokenizer": pre,
          "decoder": {"type": "ByteLevel"},
          "model": {"type": "BPE", "vocab": vocab, "byte_fallback": False,
                    "merges": [list(m) if as_pairs else " ".join(m) for m in merges]}}
    (path / "tokenizer.json").write_text(json.dumps(tj), encoding="utf-8")
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "bos_token": None,
                                                            "pad_token": "<|im_end|>"}))
    return path


SPLIT_PRE = {"type": "Sequence", "pretokenizers": [
    {"type": "Split", "pattern": {"Regex": PATTERN}, "behavior": "Isolated", "invert": False},
    {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]}
DIGITS_PRE = {"type": "Sequence", "pretokenizers": [
    {"type": "Digits", "individual_digits": True}, {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}]}


@pytest.mark.parametrize("pre,split,as_pairs", [(SPLIT_PRE, lambda t: training_regex().findall(t), True),
                                                (DIGITS_PRE, gpt2_digits_split, False)], ids=["split-regex", "digits"])
def test_tokenizer_json_matches_naive_bpe(tmp_path, pre, split, as_pairs):
    vocab, merges = train_naive(split, 60)
    tok = load_hf_tokenizer(write_tokenizer(tmp_path / "t", vocab, merges, pre, as_pairs=as_pairs))
    assert tok.chat == "chatml" and (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 2, 2)
    assert tok.vocab_size == len(vocab) and tok.enc._special_tokens == {s: i for i, s in enumerate(SPECIALS)}
    if pre is DIGITS_PRE:
        assert tok.enc._pat_str == GPT2_DIGITS_PATTERN
    for text in TEXTS + [CORPUS]:
        assert tok.encode(text) == naive_encode(text, split, vocab, merges), text
        assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode("the cattle")) < len("the cattle")  # the merges do act


def test_nfc_normalizer(tmp_path):
    vocab, merges = train_naive(lambda t: training_regex().findall(t), 10)
    tok = load_hf_tokenizer(write_tokenizer(tmp_path / "t", vocab, merges, SPLIT_PRE, normalizer={"type": "NFC"}))
    decomposed = unicodedata.normalize("NFD", "café")  # e + combining acute
    assert tok.nfc and tok.encode(decomposed) == tok.encode("café") != tok.enc.encode(decomposed)
    # a model row past the tokenizer's ids (Qwen2.5 has 271 of them) decodes to U+FFFD, not an exception
    assert tok.decode(tok.encode("ab") + [tok.vocab_size + 3] + tok.encode("c")) == "ab\ufffdc"


CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4 <|im_end|>"}, {"role": "user", "content": "and 3+3?"},
                {"role": "assistant", "content": "6"}]


def test_chatml_render_is_the_models_format_with_an_exact_mask(tmp_path):
    vocab, merges = train_naive(lambda t: training_regex().findall(t), 40)
    tok = load_hf_tokenizer(write_tokenizer(tmp_path / "t", vocab, merges, SPLIT_PRE))
    ids, mask = tok.render(CONVERSATION)
    text = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
            "[[4 <|im_end|><|im_end|>]]\n<|im_start|>user\nand 3+3?<|im_end|>\n<|im_start|>assistant\n"
            "[[6<|im_end|>]]\n")
    assert tok.show(ids, mask) == text  # [[ ]]: exactly the trained tokens (the content's <|im_end|> is text)
    assert ids.count(tok.eos_id) == 5 and sum(mask) == len(tok.encode("4 <|im_end|>")) + 1 + len(tok.encode("6")) + 1
    # HF renders the template to one string and tokenizes it whole: the same ids
    plain = [{**m, "content": m["content"].replace(" <|im_end|>", "")} for m in CONVERSATION]
    whole = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in plain)
    assert tok.render(plain)[0] == tok.enc.encode(whole, allowed_special="all")
    prompt = tok.render_prompt(CONVERSATION[:2])
    assert tok.decode(prompt) == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n" \
                                 "<|im_start|>assistant\n"
    assert ids[:len(prompt)] == prompt and ids[len(prompt):mask.index(0, len(prompt))] == \
        tok.encode("4 <|im_end|>") + [tok.eos_id]
    tok.save(tmp_path / "saved.json")  # minipost checkpoints keep the format, ids and normaliser
    again = Tokenizer.load(tmp_path / "saved.json")
    assert again.render(CONVERSATION) == (ids, mask) and again.chat == "chatml"


def test_llama3_header_format(tmp_path):
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    vocab, merges = train_naive(lambda t: training_regex().findall(t), 20)
    vocab = {s: i - len(SPECIALS) for s, i in vocab.items() if s not in SPECIALS}  # bytes and merges from id 0 ...
    vocab.update({s: len(vocab) + i for i, s in enumerate(specials)})  # ... and the specials after, as Llama 3
    template = "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>..."
    tok = load_hf_tokenizer(write_tokenizer(tmp_path / "t", vocab, merges, SPLIT_PRE, specials, template))
    ids, mask = tok.render(CONVERSATION[1:3] + [{"role": "user", "content": "  padded  "}])
    assert tok.show(ids, mask) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|><|start_header_id|>assistant"
        "<|end_header_id|>\n\n[[4 <|im_end|><|eot_id|>]]<|start_header_id|>user<|end_header_id|>\n\npadded<|eot_id|>")
    assert tok.decode(tok.render_prompt([])) == "<|begin_of_text|><|start_header_id|>assistant<|end_header_id|>\n\n"


def test_no_known_chat_template_falls_back_to_minipost_format(tmp_path):
    vocab, merges = train_naive(lambda t: training_regex().findall(t), 10)
    tok = load_hf_tokenizer(write_tokenizer(tmp_path / "t", vocab, merges, SPLIT_PRE, template="[INST] ..."))
    assert tok.chat == "minipost" and tok.enc._special_tokens["<|endoftext|>"] == 0  # the model's own kept
    assert tok.enc._special_tokens["<|end|>"] == len(vocab) + 3  # after <|system|>, <|user|>, <|assistant|>


# ----------------------------------------------------------------------------- export round trip

def chatml_tokenizer(tmp_path):
    vocab, merges = train_naive(lambda t: training_regex().findall(t), 30)
    return load_hf_tokenizer(write_tokenizer(tmp_path / "tok", vocab, merges, SPLIT_PRE))


def assert_same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert a.config == b.config and sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("cfg", [LLAMA, QWEN2], ids=["llama", "qwen2"])
def test_export_import_is_exact(tmp_path, cfg):
    tok = chatml_tokenizer(tmp_path)
    cfg = {**cfg, "vocab_size": tok.vocab_size + 5}  # a model may have more rows than its tokenizer has ids
    sd = hf_tensors(cfg, seed=3)
    write_folder(tmp_path / "src", cfg, sd)
    (tmp_path / "src" / "tokenizer.json").write_bytes((tmp_path / "tok" / "tokenizer.json").read_bytes())
    (tmp_path / "src" / "tokenizer_config.json").write_bytes((tmp_path / "tok" / "tokenizer_config.json").read_bytes())
    model, tok = load_hf_folder(tmp_path / "src")
    for shard in (None, 3000):  # one file, then shards of at most 3000 bytes with an index
        out = export_hf(model, tok, tmp_path / f"out-{shard}", max_shard_bytes=shard)
        assert (out / "model.safetensors.index.json").is_file() == (shard is not None)
        model2, tok2 = load_hf_folder(out)
        assert_same(model, model2)
        assert tok2.enc._mergeable_ranks == tok.enc._mergeable_ranks and tok2.enc._pat_str == tok.enc._pat_str
        assert tok2.enc._special_tokens == tok.enc._special_tokens and tok2.chat == tok.chat
        assert (tok2.bos_id, tok2.eos_id, tok2.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
        assert tok2.encode(CORPUS) == tok.encode(CORPUS)
    exported = json.loads((tmp_path / "out-None" / "config.json").read_text())
    same = [k for k in cfg if k != "sliding_window"]  # Qwen2's is kept as null: no window is used either way
    assert {k: exported[k] for k in same} == {k: cfg[k] for k in same}
    names = set(read_safetensors(tmp_path / "out-None" / "model.safetensors"))
    assert ("lm_head.weight" in names) == (not cfg["tie_word_embeddings"])  # a tied head is left out, as HF does
    half = load_hf_model(export_hf(model, tok, tmp_path / "bf16", dtype=torch.bfloat16))
    assert torch.equal(half.transformer.h[1].mlp.c_fc.weight, model.transformer.h[1].mlp.c_fc.weight.bfloat16().float())


def test_lora_on_the_llama_block():
    config = hf_config({**LLAMA, "tie_word_embeddings": False})
    torch.manual_seed(0)
    model, x = GPT(config).eval(), torch.randint(0, 64, (2, 9))
    fp = adapters.fingerprint(model)
    with torch.no_grad():
        before = model(x)
        adapters.adapt(model, adapters_flags(lora_r=4), "base")
        layers = {n for n, m in model.named_modules() if isinstance(m, adapters.LoRALinear)}
        assert layers == {f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj",
                                                                                 "mlp.c_fc", "mlp.c_proj")}
        assert torch.equal(model(x), before)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
        adapted = model(x)
        torch.testing.assert_close(adapters.merge_adapters(model)(x), adapted, rtol=0, atol=1e-5)
        model.lm_head.weight.add_(1)  # an untied head is part of the base the adapters belong to
    assert adapters.fingerprint(model) != fp


def adapters_flags(lora_r=None, prompt_tuning=None):
    import types
    return types.SimpleNamespace(lora_r=lora_r, lora_alpha=None, lora_dropout=0.0, prompt_tuning=prompt_tuning,
                                 lora_targets="c_attn,c_proj,c_fc")


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("change,message", [
    ({"model_type": "gemma"}, "model_type 'gemma' is not supported"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling type 'yarn' is not supported"),
    ({"model_type": "mistral", "sliding_window": 4096}, "sliding_window=4096: sliding-window attention"),
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 64}, "sliding-window attention"),
    ({"num_local_experts": 8}, "mixture-of-experts models are not supported"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"attention_bias": True}, "only Qwen2's q/k/v biases"),
    ({"head_dim": 16}, "head_dim=16 is not hidden_size / num_attention_heads"),
    ({"num_key_value_heads": 3}, "n_head 4 is not a multiple of n_kv_head 3"),
    # transformers 5's schema: rope_parameters, which must agree with the 4.x fields where both are given
    ({"rope_scaling": None, "rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}},
     "rope_parameters type 'dynamic' is not supported"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 50000.0}},
     "rope_theta differs between rope_theta=10000.0 and rope_parameters.rope_theta=50000.0"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0}}, "disagree"),
    ({"rope_scaling": None, "rope_parameters": {"rope_type": "linear", "factor": 2.0, "attention_factor": 2.0}},
     "rope_parameters linear has ['attention_factor'], which minipost does not compute"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0}}, "rope_parameters llama3 lacks ['low_freq_factor'"),
    ({"rope_scaling": "linear"}, "rope_scaling must be an object"),
    ({"rope_theta": "1e4"}, "rope_theta must be a positive number, got '1e4'"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5: minipost rotates every pair"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, "layer_types ['full_attention', 'sliding_attention']"),
])
def test_unsupported_configs(change, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        hf_config({**LLAMA, **change})


@pytest.mark.parametrize("cfg,field,message", [
    (LLAMA, "rope_theta", "rope_theta is neither at the top level nor in rope_parameters (no default is assumed)"),
    # transformers' MistralConfig and Qwen2Config fill these in with their defaults: a window of 4096 (refused),
    # 32 key/value heads (taken, and then the shapes disagree)
    (MISTRAL, "sliding_window", "a mistral config without sliding_window: transformers then uses a window of 4096"),
    (QWEN2, "num_key_value_heads", "n_head 4 is not a multiple of n_kv_head 32"),
])
def test_absent_fields_that_change_the_numbers(cfg, field, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        hf_config({k: v for k, v in cfg.items() if k != field})


def test_bad_folders(tmp_path):
    folder = write_folder(tmp_path / "m", QWEN2, hf_tensors(QWEN2), shards=2)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ValueError, match="shard model-00002-of-00002.safetensors is missing"):
        load_hf_model(folder)
    vocab, merges = train_naive(lambda t: training_regex().findall(t), 5)
    for kind in ("WordPiece", "Unigram"):
        path = write_tokenizer(tmp_path / kind, vocab, merges, SPLIT_PRE)
        tj = json.loads((path / "tokenizer.json").read_text())
        (path / "tokenizer.json").write_text(json.dumps({**tj, "model": {"type": kind, "vocab": {}}}))
        with pytest.raises(ValueError, match=f"a {kind} tokenizer; minipost reads byte-level BPE"):
            load_hf_tokenizer(path)
    out_of_order = merges[:2] + [merges[3], merges[2]] + merges[4:]
    with pytest.raises(ValueError, match="out of order"):
        load_hf_tokenizer(write_tokenizer(tmp_path / "order", vocab, out_of_order, SPLIT_PRE))
    metaspace = {"type": "Metaspace", "replacement": "▁"}
    with pytest.raises(ValueError, match=re.escape("pre-tokenizer ['Metaspace'] is not supported")):
        load_hf_tokenizer(write_tokenizer(tmp_path / "meta", vocab, merges, metaspace))


# ----------------------------------------------------------------------------- end to end on a Llama-style model

@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    """A small random Llama-style model (ChatML tokenizer trained on the arith corpus) exported as an HF folder."""
    root = tmp_path_factory.mktemp("llama")
    text = "\n".join(get_task("arith").corpus(300, seed=0))
    vocab, merges = train_naive(training_regex().findall, 120, text)
    tok = load_hf_tokenizer(write_tokenizer(root / "tok", vocab, merges, SPLIT_PRE))
    config = hf_config({**LLAMA, "vocab_size": tok.vocab_size, "max_position_embeddings": 256})
    torch.manual_seed(0)
    return export_hf(GPT(config), tok, root / "llama")


def test_sft_dpo_grpo_end_to_end_on_a_llama_folder(llama_folder, tmp_path, monkeypatch):
    sft, common = tmp_path / "sft", ["--n-eval", "2", "--max-new-tokens", "6", "--batch-size", "4"]
    train_sft.main(["--init", str(llama_folder), "--n-train", "16", "--max-steps", "3", "--eval-every", "3",
                    "--warmup", "1", "--out", str(sft), *common])
    ck = load_checkpoint(sft)
    assert ck.model.config.pos == "rope" and ck.model.config.kv_heads == 2 and ck.tokenizer.chat == "chatml"
    steps = [r for r in read_metrics(sft / "metrics.jsonl") if r["step"] > 0]
    assert len(steps) == 3 and steps[-1]["loss"] < steps[0]["loss"]  # it learns the ChatML demonstrations
    demos = get_task("arith").demos("train", 8, seed=1)
    pairs = [{"prompt": d["messages"][0]["content"], "chosen": d["messages"][1]["content"],
              "rejected": "The answer is 0."} for d in demos]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    rl = [*common, "--n-kl", "2", "--warmup", "1", "--max-steps", "2", "--eval-every", "2"]
    train_rlhf.main(["--algo", "dpo", "--init", str(sft), "--data", str(tmp_path / "pairs.jsonl"), *rl,
                     "--out", str(tmp_path / "dpo")])
    # a reward that varies within a group (a random policy never answers arith right), so GRPO has signal
    (tmp_path / "hf_rewards.py").write_text("def odd(prompts, completions, **kw):\n"
                                            "    return [float(len(c) % 2) for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    train_rlhf.main(["--algo", "grpo", "--init", str(sft), "--k", "4", "--reward", "hf_rewards:odd", *rl,
                     "--out", str(tmp_path / "grpo")])
    for run in ("dpo", "grpo"):
        steps = [r for r in read_metrics(tmp_path / run / "metrics.jsonl") if "loss" in r]
        assert [r["step"] for r in steps] == [1, 2] and all(math.isfinite(r["loss"]) for r in steps)
        assert load_checkpoint(tmp_path / run).model.config == ck.model.config
    assert sum(r["samples_used"] for r in read_metrics(tmp_path / "grpo" / "metrics.jsonl") if "loss" in r) > 0
    # and back out as an HF folder that imports to the same weights
    model, tok = load_hf_folder(export_hf(load_checkpoint(tmp_path / "dpo").model, ck.tokenizer, tmp_path / "out"))
    assert_same(model, load_checkpoint(tmp_path / "dpo").model)
