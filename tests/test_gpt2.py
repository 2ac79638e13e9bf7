"""GPT-2 folders in and out (minipost/gpt2.py).

Every folder here is written by the test itself: config.json, HF-layout weights (Conv1D (in, out) matrices) through
the test's own safetensors writer or torch.save of a plain dict, and GPT-2-format tokenizer files over a tiny
merge list. Imported logits are checked against a float64 GPT-2 forward written below over the HF tensors.
"""
import base64
import json
import math
import struct

import pytest
import tiktoken
import torch

from minipost.gpt2 import (GPT2_PATTERN, _derive_merges, bytes_to_unicode, export_gpt2, gpt2_config,
                           is_gpt2_folder, load_gpt2_folder, load_gpt2_model, load_gpt2_tokenizer,
                           read_safetensors, resize_vocab)
from minipost.model import GPT, PRESETS, GPTConfig
from minipost.tokenizer import SPECIAL_TOKENS, Tokenizer

# A tiny merge list over GPT-2's byte alphabet ('Ġ' is the space byte; 'Ã' '¼' are the UTF-8 bytes of 'ü')
MERGES = [("h", "e"), ("l", "l"), ("Ġ", "t"), ("Ġt", "he"), ("he", "ll"), ("hell", "o"), ("Ġ", "hello"),
          ("o", "w"), ("e", "ll"), ("y", "ell"), ("yell", "ow"), ("Ġ", "w"), ("o", "r"), ("Ġw", "or"),
          ("l", "d"), ("Ġwor", "ld"), ("Ã", "¼")]
EOT_ID = 256 + len(MERGES)  # GPT-2's layout: 256 bytes, one id per merge, then <|endoftext|>
HF_CFG = dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=2, n_positions=16, vocab_size=EOT_ID + 1,
              layer_norm_epsilon=1e-5, activation_function="gelu_new", n_inner=None)


# ----------------------------------------------------------------------------- fixtures written by the test

def hf_tensors(cfg, seed=0):
    """Random GPT-2 weights in HF's layout: Conv1D weights (in, out); LayerNorm gains away from 1."""
    g = torch.Generator().manual_seed(seed)
    C, V, T = cfg["n_embd"], cfg["vocab_size"], cfg["n_positions"]

    def r(*shape, std=0.3):
        return torch.randn(*shape, generator=g) * std

    sd = {"wte.weight": r(V, C), "wpe.weight": r(T, C)}
    for layer in range(cfg["n_layer"]):
        p = f"h.{layer}."
        sd.update({p + "ln_1.weight": 1 + r(C, std=0.2), p + "ln_1.bias": r(C, std=0.1),
                   p + "attn.c_attn.weight": r(C, 3 * C), p + "attn.c_attn.bias": r(3 * C, std=0.1),
                   p + "attn.c_proj.weight": r(C, C), p + "attn.c_proj.bias": r(C, std=0.1),
                   p + "ln_2.weight": 1 + r(C, std=0.2), p + "ln_2.bias": r(C, std=0.1),
                   p + "mlp.c_fc.weight": r(C, 4 * C), p + "mlp.c_fc.bias": r(4 * C, std=0.1),
                   p + "mlp.c_proj.weight": r(4 * C, C), p + "mlp.c_proj.bias": r(C, std=0.1)})
    sd.update({"ln_f.weight": 1 + r(C, std=0.2), "ln_f.bias": r(C, std=0.1)})
    return sd


def write_st(path, tensors, dtype="F32"):
    """Minimal safetensors writer, independent of minipost's: bf16 bytes are the top 16 bits of the float32 bits
    (exact for values already rounded to bf16); no alignment padding, to check the reader does not need it."""
    header, blobs, off = {"__metadata__": {"format": "pt"}}, [], 0
    for k, t in tensors.items():
        a = t.float().numpy().astype("<f4")
        b = {"F32": lambda: a.tobytes(), "F16": lambda: a.astype("<f2").tobytes(),
             "BF16": lambda: (a.view("<u4") >> 16).astype("<u2").tobytes()}[dtype]()
        header[k] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def write_model_folder(path, cfg, tensors, fmt="safetensors", dtype="F32"):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    if fmt == "safetensors":
        write_st(path / "model.safetensors", tensors, dtype)
    else:
        torch.save(dict(tensors), path / "pytorch_model.bin")
    return path


def tiny_encoder():
    """GPT-2's id order: the 256 byte characters sorted by code point (printable bytes first), then merges."""
    enc = {c: i for i, c in enumerate(sorted(bytes_to_unicode().values()))}
    enc.update({a + b: 256 + i for i, (a, b) in enumerate(MERGES)})
    enc["<|endoftext|>"] = EOT_ID
    return enc


def write_tokenizer_folder(path, merges=MERGES, encoder=None):
    path.mkdir(parents=True, exist_ok=True)
    (path / "encoder.json").write_text(json.dumps(encoder or tiny_encoder()), encoding="utf-8")
    (path / "vocab.bpe").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- independent references

def reference_logits(sd, cfg, idx):
    """GPT-2's forward in float64 straight over HF tensors: LayerNorm (eps 1e-5), Conv1D x @ W + b, gelu_new,
    causal softmax attention scaled by 1/sqrt(D), tied head."""
    W = {k.removeprefix("transformer."): v.double() for k, v in sd.items()}
    C, H = cfg["n_embd"], cfg["n_head"]
    D = C // H
    B, T = idx.shape

    def ln(x, p):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-5) * W[p + ".weight"] + W[p + ".bias"]

    def conv1d(x, p):
        return x @ W[p + ".weight"] + W[p + ".bias"]

    def gelu_new(x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))

    causal = torch.ones(T, T, dtype=torch.bool).tril()
    x = W["wte.weight"][idx] + W["wpe.weight"][:T]  # (B, T, C)
    for layer in range(cfg["n_layer"]):
        p = f"h.{layer}"
        q, k, v = conv1d(ln(x, p + ".ln_1"), p + ".attn.c_attn").split(C, -1)
        q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        att = (q @ k.transpose(-1, -2) / math.sqrt(D)).masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + conv1d((att @ v).transpose(1, 2).reshape(B, T, C), p + ".attn.c_proj")
        x = x + conv1d(gelu_new(conv1d(ln(x, p + ".ln_2"), p + ".mlp.c_fc")), p + ".mlp.c_proj")
    return ln(x, "ln_f") @ W["wte.weight"].T  # (B, T, V)


def naive_gpt2_bpe(word, merges, encoder):
    """GPT-2's original BPE: bytes -> alphabet characters, then repeatedly join every occurrence of the adjacent
    pair listed first in the merge file."""
    prio = {m: i for i, m in enumerate(merges)}
    be = bytes_to_unicode()
    parts = [be[b] for b in word.encode()]
    while True:
        found = [(prio[p], p) for p in zip(parts, parts[1:]) if p in prio]
        if not found:
            return [encoder[p] for p in parts]
        a, b = min(found)[1]
        out, i = [], 0
        while i < len(parts):
            if i + 1 < len(parts) and parts[i] == a and parts[i + 1] == b:
                out.append(a + b)
                i += 2
            else:
                out.append(parts[i])
                i += 1
        parts = out


def minipost_logits(model, idx):
    with torch.no_grad():
        return model.logits(model(idx)).double()


IDX = torch.tensor([[3, 17, 200, 5, 99, 42, 7, 250, 1, 0, 12, 13], [260, 2, 2, 2, 80, 81, 82, 83, 84, 9, 8, 7]])
# float32 forward vs float64: rounding is ~1e-6 relative through two layers of width 32 (logits of size ~3);
# 1e-4 leaves wide margin, while a mis-transposed or mis-mapped weight moves logits by O(1).
TOL = dict(rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- model

def test_bytes_to_unicode_hand_values():
    m = bytes_to_unicode()
    assert len(set(m.values())) == 256 and all(c.isprintable() and not c.isspace() for c in m.values())
    assert all(m[b] == chr(b) for b in range(ord("!"), ord("~") + 1))
    # the 68 remapped bytes in order: 0..32 -> U+0100..U+0120, 127..160 -> U+0121..U+0142, 173 -> U+0143
    assert (m[0], m[10], m[32], m[127], m[160], m[173]) == ("Ā", "Ċ", "Ġ", "ġ", "ł", "Ń")
    assert m[0xC3] == "Ã" and m[0xBC] == "¼"


def test_is_gpt2_folder(tmp_path):
    good = write_model_folder(tmp_path / "good", HF_CFG, hf_tensors(HF_CFG))
    assert is_gpt2_folder(good)
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text(json.dumps(HF_CFG))
    assert not is_gpt2_folder(tmp_path / "noweights")
    other = write_model_folder(tmp_path / "llama", {**HF_CFG, "model_type": "llama"}, hf_tensors(HF_CFG))
    assert not is_gpt2_folder(other)
    assert not is_gpt2_folder(tmp_path / "missing")


@pytest.mark.parametrize("variant", ["safetensors", "hf_prefixed", "pytorch_bin"])
def test_import_matches_reference_forward(tmp_path, variant):
    sd = hf_tensors(HF_CFG)
    stored = dict(sd)
    if variant == "hf_prefixed":  # GPT2LMHeadModel.save_pretrained layout: prefix, stored head, mask buffers
        stored = {"transformer." + k: v for k, v in sd.items()}
        stored["lm_head.weight"] = sd["wte.weight"].clone()
        for layer in range(HF_CFG["n_layer"]):
            stored[f"transformer.h.{layer}.attn.bias"] = torch.ones(1, 1, 16, 16).tril()
            stored[f"transformer.h.{layer}.attn.masked_bias"] = torch.tensor(-1e4)
    folder = write_model_folder(tmp_path / "m", HF_CFG, stored, "bin" if variant == "pytorch_bin" else "safetensors")
    model = load_gpt2_model(folder)
    assert model.config.block_size == 16 and model.config.vocab_size == EOT_ID + 1 and model.config.dropout == 0
    assert model.lm_head.weight is model.transformer.wte.weight
    torch.testing.assert_close(minipost_logits(model, IDX), reference_logits(sd, HF_CFG, IDX), **TOL)


@pytest.mark.parametrize("dtype,torch_dtype", [("F16", torch.float16), ("BF16", torch.bfloat16)])
def test_half_precision_safetensors(tmp_path, dtype, torch_dtype):
    sd = {k: v.to(torch_dtype).float() for k, v in hf_tensors(HF_CFG, seed=1).items()}  # exactly representable
    folder = write_model_folder(tmp_path / "m", HF_CFG, sd, dtype=dtype)
    raw = read_safetensors(folder / "model.safetensors")
    assert set(raw) == set(sd)
    for k, v in sd.items():
        assert raw[k].dtype == torch_dtype and raw[k].shape == v.shape and torch.equal(raw[k].float(), v), k
    model = load_gpt2_model(folder)
    assert torch.equal(model.transformer.h[0].mlp.c_fc.weight, sd["h.0.mlp.c_fc.weight"].T)  # (4C, C)
    torch.testing.assert_close(minipost_logits(model, IDX), reference_logits(sd, HF_CFG, IDX), **TOL)


class _Evil:
    """Unpickling this calls open(marker, "w"): code execution a plain tensor file must never trigger."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pytorch_bin_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "evil"
    tensors = hf_tensors(HF_CFG)
    tensors["wte.weight"] = _Evil(str(marker))
    write_model_folder(folder, HF_CFG, tensors, "bin")
    with pytest.raises(ValueError, match="refused as unsafe: not a plain tensor file"):
        load_gpt2_model(folder)
    assert not marker.exists()
    # the payload is live: a full unpickle does run it (so the assertion above can fail)
    torch.load(folder / "pytorch_model.bin", weights_only=False)["wte.weight"].close()
    assert marker.exists()


def test_config_and_weight_checks(tmp_path):
    sd = hf_tensors(HF_CFG)
    for bad, msg in [({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon"), ({"activation_function": "relu"},
                     "activation_function"), ({"n_inner": 100}, "n_inner")]:
        folder = write_model_folder(tmp_path / msg, {**HF_CFG, **bad}, sd)
        with pytest.raises(ValueError, match=msg):
            load_gpt2_model(folder)
    untied = write_model_folder(tmp_path / "untied", HF_CFG, {**sd, "lm_head.weight": sd["wte.weight"] + 1})
    with pytest.raises(ValueError, match="lm_head"):
        load_gpt2_model(untied)
    missing = write_model_folder(tmp_path / "missing", HF_CFG, {k: v for k, v in sd.items() if k != "h.1.ln_2.bias"})
    with pytest.raises(ValueError, match="h.1.ln_2.bias"):
        load_gpt2_model(missing)


def test_gpt2_sizes_map_to_presets():
    sizes = {"gpt2": (768, 12, 12), "gpt2-medium": (1024, 24, 16), "gpt2-large": (1280, 36, 20),
             "gpt2-xl": (1600, 48, 25)}  # n_embd, n_layer, n_head from the published config.json files
    for name, (C, L, H) in sizes.items():
        cfg = gpt2_config(dict(model_type="gpt2", n_embd=C, n_layer=L, n_head=H, n_positions=1024, n_ctx=1024,
                               vocab_size=50257, layer_norm_epsilon=1e-5, activation_function="gelu_new"))
        assert dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, block_size=cfg.block_size) \
            == PRESETS[name]
        assert cfg.vocab_size == 50257 and cfg.bias


def test_resize_vocab_mean_rows_keep_old_logits():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=16))
    idx = torch.randint(0, 20, (2, 6))
    before, old = minipost_logits(model, idx), model.transformer.wte.weight.detach().clone()
    resize_vocab(model, 23)
    w = model.transformer.wte.weight
    assert w.shape == (23, 16) and model.lm_head.weight is w and model.config.vocab_size == 23
    assert torch.equal(w[:20], old) and torch.equal(w[20:], old.double().mean(0).float().expand(3, 16))
    after = minipost_logits(model, idx)
    torch.testing.assert_close(after[..., :20], before, rtol=1e-5, atol=1e-6)
    # tied head: each new token's logit is the mean of the old logits
    torch.testing.assert_close(after[..., 20], before.mean(-1), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        resize_vocab(model, 10)


# ----------------------------------------------------------------------------- tokenizer

WORDS = [" hello", "hello", "yellow", " the", " world", "shell", "hellohello", "über", " yellowhello", "w"]
TEXT = "hello the world\n\tshell  yellow über 123 it's\u00a0ok \u2028 é漢字🙂 <x>"


def test_gpt2_tokenizer_matches_naive_bpe_and_round_trips(tmp_path):
    tok = load_gpt2_tokenizer(write_tokenizer_folder(tmp_path / "t"))
    encoder = tiny_encoder()
    for w in WORDS:
        assert tok.encode(w) == naive_gpt2_bpe(w, MERGES, encoder), w
    assert tok.encode(" hello") == [encoder["Ġhello"]] and tok.encode("ü") == [encoder["Ã¼"]]
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert tok.enc._pat_str == GPT2_PATTERN
    # <|endoftext|> keeps its encoder.json id; the other chat specials follow in order
    sp = tok.enc._special_tokens
    assert sp["<|endoftext|>"] == EOT_ID
    assert [sp[s] for s in SPECIAL_TOKENS[1:]] == list(range(EOT_ID + 1, EOT_ID + 6))
    assert tok.vocab_size == EOT_ID + 6
    # minipost checkpoints store it through Tokenizer.save / load
    tok.save(tmp_path / "tokenizer.json")
    assert Tokenizer.load(tmp_path / "tokenizer.json").encode(TEXT) == tok.encode(TEXT)


def test_gpt2_tokenizer_file_checks(tmp_path):
    swapped = MERGES[:2] + [MERGES[3], MERGES[2]] + MERGES[4:]  # ids no longer grow down the merge list
    with pytest.raises(ValueError, match="out of order"):
        load_gpt2_tokenizer(write_tokenizer_folder(tmp_path / "a", merges=swapped))
    dropped = [m for m in MERGES if m != ("o", "w")]  # 'ow' stays in encoder.json but no merge makes it
    with pytest.raises(ValueError, match="neither bytes nor merges"):
        load_gpt2_tokenizer(write_tokenizer_folder(tmp_path / "b", merges=dropped))
    no_byte = {k: v for k, v in tiny_encoder().items() if k != "Ā"}
    with pytest.raises(ValueError, match="single bytes"):
        load_gpt2_tokenizer(write_tokenizer_folder(tmp_path / "c", encoder=no_byte))


def test_tiktoken_ranks_file(tmp_path):
    ref = load_gpt2_tokenizer(write_tokenizer_folder(tmp_path / "bpe"))
    (tmp_path / "tk").mkdir()
    lines = [f"{base64.b64encode(t).decode()} {r}" for t, r in ref.enc._mergeable_ranks.items()]
    (tmp_path / "tk" / "tiny.tiktoken").write_text("\n".join(lines) + "\n")
    tok = load_gpt2_tokenizer(tmp_path / "tk")
    assert tok.enc._mergeable_ranks == ref.enc._mergeable_ranks
    assert tok.enc._special_tokens == ref.enc._special_tokens  # <|endoftext|> right after the last rank
    assert tok.encode(TEXT) == ref.encode(TEXT)


# ----------------------------------------------------------------------------- export

def _randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _assert_same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert a.config == b.config and sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert b.lm_head.weight is b.transformer.wte.weight


def test_export_import_round_trip_gpt2_folder(tmp_path):
    src = write_model_folder(tmp_path / "src", HF_CFG, hf_tensors(HF_CFG, seed=2))
    write_tokenizer_folder(src)
    model, tok = load_gpt2_folder(src)
    assert model.config.vocab_size == tok.vocab_size == EOT_ID + 6  # wte grown for the chat specials
    _randomise(model, 3)  # new rows no longer all equal
    out = export_gpt2(model, tok, tmp_path / "out")
    assert is_gpt2_folder(out)
    model2, tok2 = load_gpt2_folder(out)
    _assert_same_model(model, model2)
    assert tok2.enc._mergeable_ranks == tok.enc._mergeable_ranks and tok2.enc._special_tokens == tok.enc._special_tokens
    # the derived merges are GPT-2's own file, line for line; HF's names hold the same text
    assert (out / "vocab.bpe").read_text("utf-8") == (src / "vocab.bpe").read_text("utf-8")
    assert (out / "merges.txt").read_text("utf-8") == (out / "vocab.bpe").read_text("utf-8")
    assert json.loads((out / "encoder.json").read_text("utf-8")) == tiny_encoder()
    assert json.loads((out / "added_tokens.json").read_text("utf-8")) == {
        s: EOT_ID + i for i, s in enumerate(SPECIAL_TOKENS) if i}
    # HF naming and Conv1D layout in the file itself
    n = struct.unpack("<Q", (out / "model.safetensors").read_bytes()[:8])[0]
    header = json.loads((out / "model.safetensors").read_bytes()[8:8 + n])
    assert header["h.0.attn.c_attn.weight"]["shape"] == [32, 96]  # Conv1D (in, out)
    assert header["h.1.mlp.c_proj.weight"]["shape"] == [128, 32]
    assert "lm_head.weight" not in header and not any(k.startswith("transformer.") for k in header)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "gpt2" and cfg["architectures"] == ["GPT2LMHeadModel"]
    assert (cfg["n_positions"], cfg["n_ctx"], cfg["vocab_size"]) == (16, 16, EOT_ID + 6)
    assert (cfg["activation_function"], cfg["layer_norm_epsilon"]) == ("gelu_new", 1e-5)
    # and the exported weights still run GPT-2's forward
    hf = read_safetensors(out / "model.safetensors")
    torch.testing.assert_close(minipost_logits(model2, IDX), reference_logits(hf, cfg, IDX), **TOL)


def test_export_minipost_bpe(tmp_path):
    # a minipost-style BPE: byte-value ranks, merges after, its own split regex, specials in its own order
    ranks = {bytes([b]): b for b in range(256)}
    for a, b in [(b"t", b"h"), (b"th", b"e"), (b" ", b"the"), (b"a", b"b"), (b"b", b"c"), (b"ab", b"c"),
                 (b"e", b"r"), (b"the", b"r"), (b"\xc3", b"\xa9"), (b" ", b"abc")]:
        ranks[a + b] = len(ranks)
    specials = {s: len(ranks) + i for i, s in enumerate(reversed(SPECIAL_TOKENS))}
    pattern = r"""\p{L}+| ?\p{N}{1,3}| ?[^\s\p{L}\p{N}]+|\s+"""
    tok = Tokenizer(tiktoken.Encoding("mini", pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials))
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=8, n_layer=1, n_head=2, n_embd=16, scalar_head=True))
    _randomise(model, 4)
    out = export_gpt2(model, tok, tmp_path / "out")
    assert (out / "tokenizer_pattern.txt").read_text() == pattern
    model2, tok2 = load_gpt2_folder(out)
    _assert_same_model(model, model2)
    assert tok2.enc._pat_str == pattern
    assert tok2.enc._mergeable_ranks == ranks and tok2.enc._special_tokens == specials
    text = "there abc theabc thé 12345 the the"
    assert tok2.encode(text) == tok.encode(text) and tok2.decode(tok2.encode(text)) == text


def test_derive_merges_splits():
    ranks = {bytes([b]): b for b in range(256)}
    ranks.update({b"bc": 256, b"ab": 257, b"cd": 258, b"abcd": 259, b"abc": 260})
    # tiktoken's rule merges bc first (lowest rank), so abc is a + bc, and abcd alone ends as a, bc, d: it takes
    # its one valid split ab + cd
    assert _derive_merges(ranks) == [(b"b", b"c"), (b"a", b"b"), (b"c", b"d"), (b"ab", b"cd"), (b"a", b"bc")]
    ranks[b"xyz"] = 261  # no two lower-ranked tokens make it
    with pytest.raises(ValueError, match="not a merge"):
        _derive_merges(ranks)
