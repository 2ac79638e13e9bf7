"""Real GPT-2: read and write GPT-2 folders (Hugging Face / OpenAI layout) without transformers or safetensors.

A GPT-2 folder, as `huggingface-cli download gpt2` leaves it or `export_gpt2` writes it:

    config.json                    HF GPT2Config: model_type "gpt2", n_embd, n_layer, n_head, n_positions, vocab_size
    model.safetensors              the weights (or pytorch_model.bin, read only as a plain tensor file)
    encoder.json | vocab.json      token string -> id, strings over GPT-2's byte-to-unicode alphabet (OpenAI | HF name)
    vocab.bpe    | merges.txt      "#version: 0.2", then one merge "a b" a line, highest priority first
    added_tokens.json              {name: id} special tokens past the byte-level vocabulary (HF's file and format)
    *.tiktoken                     instead of the two files above: "base64(token bytes) rank" a line
    tokenizer_pattern.txt          only when the pre-tokenizer regex is not GPT-2's (minipost's own BPE may differ)

Weights: HF GPT-2 uses Conv1D, y = x @ W + b with W (in, out); minipost uses nn.Linear, y = x @ W.T + b with
W (out, in). So c_attn, c_proj, c_fc and mlp.c_proj weights are transposed on the way in and back on the way out.
lm_head is tied to wte (a checkpoint that stores it must hold a copy of wte). The attn.bias / attn.masked_bias
buffers some checkpoints carry are the causal mask, which minipost's attention applies by construction.

Tokenizer: ids are tiktoken ranks. <|endoftext|> keeps GPT-2's id 50256; minipost's other chat specials are
appended after the last id (50257..50261), and `resize_vocab` grows the model's wte to match.
"""
import base64
import json
import pickle
import sys
from pathlib import Path

import tiktoken
import torch
import torch.nn as nn

from .adapters import merge_adapters
from .model import GPT, GPTConfig
from .tokenizer import SPECIAL_TOKENS, Tokenizer

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOT = "<|endoftext|>"
_CONV1D = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")  # (in, out) in HF, (out, in) in minipost
_MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")
_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


# ----------------------------------------------------------------------------- safetensors, by hand

def read_safetensors(path) -> dict:
    """A .safetensors file -> {name: tensor} in the stored dtype (F32, F16 or BF16).

    Format: 8 bytes little-endian u64 n; n bytes of JSON {name: {"dtype", "shape", "data_offsets": [begin, end]},
    "__metadata__": {...}}; then the raw little-endian tensor bytes, offsets counted from the end of the header.
    Each tensor is read straight into its own storage: one copy, no memory map kept open.
    """
    if sys.byteorder != "little":
        raise ValueError("reading safetensors needs a little-endian machine")
    path = Path(path)
    size = path.stat().st_size
    out = {}
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > size - 8:
            raise ValueError(f"{path}: not a safetensors file (header length {n} exceeds the file)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a safetensors file (bad JSON header: {e})")
        start = 8 + n
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info.get("dtype") not in _ST_DTYPES:
                raise ValueError(f"{path}: tensor {name} has dtype {info.get('dtype')}; supported: F32, F16, BF16")
            t = torch.empty(info["shape"], dtype=_ST_DTYPES[info["dtype"]])
            begin, end = info["data_offsets"]
            if end - begin != t.numel() * t.element_size() or start + end > size:
                raise ValueError(f"{path}: tensor {name}: data_offsets {begin, end} do not fit shape "
                                 f"{info['shape']} or the file")
            f.seek(start + begin)
            buf = memoryview(t.view(-1).view(torch.uint8).numpy())  # t's own bytes, written in place
            got = 0
            while got < len(buf):  # readinto may return short reads for huge tensors
                k = f.readinto(buf[got:])
                if not k:
                    raise ValueError(f"{path}: truncated in tensor {name}")
                got += k
            out[name] = t
    return out


def write_safetensors(path, tensors: dict):
    """{name: tensor} -> a .safetensors file, tensors in insertion order, each in its own dtype."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0  # transformers refuses files without format "pt"
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # pad with spaces so the data starts 8-byte aligned, as the reference writer does
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for t in tensors.values():
            f.write(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().data)


# ----------------------------------------------------------------------------- model

def is_gpt2_folder(path) -> bool:
    """True if `path` is a folder with a GPT-2 config.json and model.safetensors or pytorch_model.bin."""
    path = Path(path)
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    keys = ("n_embd", "n_layer", "n_head", "n_positions", "vocab_size")
    return (isinstance(cfg, dict) and cfg.get("model_type") == "gpt2" and all(k in cfg for k in keys)
            and ((path / "model.safetensors").is_file() or (path / "pytorch_model.bin").is_file()))


def gpt2_config(hf: dict) -> GPTConfig:
    """HF GPT2Config dict -> GPTConfig, refusing variants minipost's GPT would compute differently."""
    if hf.get("model_type") != "gpt2":
        raise ValueError(f"model_type is {hf.get('model_type')!r}, not 'gpt2'")
    eps = hf.get("layer_norm_epsilon", 1e-5)
    if eps != 1e-5:
        raise ValueError(f"layer_norm_epsilon={eps}: minipost's LayerNorm uses 1e-5, so this model would run wrong")
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):  # both are GELU's tanh approximation
        raise ValueError(f"activation_function={act!r}: minipost's MLP uses GPT-2's tanh GELU (gelu_new)")
    if hf.get("n_inner") not in (None, 4 * hf["n_embd"]):
        raise ValueError(f"n_inner={hf['n_inner']}: minipost's MLP width is 4 * n_embd")
    if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx", False):
        raise ValueError("attention scaling other than 1/sqrt(head_dim) is not supported")
    # dropout 0: post-training runs it off (RL, DPO, reward models); a script that wants it sets it itself
    config = GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                       n_head=hf["n_head"], n_embd=hf["n_embd"], dropout=0.0, bias=True)
    config.check()
    return config


def _read_weights(path: Path) -> dict:
    if (path / "model.safetensors").is_file():
        return read_safetensors(path / "model.safetensors")
    f = path / "pytorch_model.bin"
    try:
        # weights_only: the unpickler only rebuilds tensors and plain containers, anything else stops it
        sd = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's own message suggests weights_only=False: never repeat that
        raise ValueError(f"{f}: refused as unsafe: not a plain tensor file (the weights-only load failed); "
                         "minipost never executes code from a checkpoint")
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{f}: refused: not a plain tensor file (expected a dict of tensors)")
    return sd


def load_gpt2_model(path) -> GPT:
    """A GPT-2 folder's config.json + weights -> minipost GPT (float32, CPU), key for key, Conv1D transposed."""
    path = Path(path)
    if not is_gpt2_folder(path):
        raise ValueError(f"{path}: not a GPT-2 folder (config.json with model_type gpt2 and model.safetensors "
                         f"or pytorch_model.bin)")
    config = gpt2_config(json.loads((path / "config.json").read_text()))
    sd, lm_head = {}, None
    for key, t in _read_weights(path).items():
        k = key.removeprefix("transformer.")
        if k.endswith(_MASK_BUFFERS):
            continue
        if k == "lm_head.weight":
            lm_head = t
            continue
        if k.endswith(_CONV1D):
            t = t.T  # Conv1D (in, out) -> Linear (out, in)
        sd[k if k.startswith("score_head.") else "transformer." + k] = t.float().contiguous()
    wte = sd.get("transformer.wte.weight")
    if lm_head is not None and (wte is None or not torch.equal(lm_head.float(), wte)):
        raise ValueError(f"{path}: lm_head.weight differs from wte.weight; minipost ties the two")
    if wte is not None:
        sd["lm_head.weight"] = wte
    config.scalar_head = "score_head.weight" in sd  # a reward / value model exported by minipost
    return model_from_state(config, sd, path)


def model_from_state(config, sd, path) -> GPT:
    """GPT(config) holding the state dict sd; a mismatch is one ValueError naming the folder."""
    model = GPT(config)
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()]
        raise ValueError(f"{path}: weights do not fit config.json: {'; '.join(lines)[:500]}")
    return model


@torch.no_grad()
def resize_vocab(model: GPT, new_vocab_size: int) -> GPT:
    """Grow wte and lm_head (tied or not) to new_vocab_size rows, in place; new rows = mean of the old rows.

    Why the mean (Hewitt, 2021, "Initializing new word embeddings"): with the head tied, a new token's logit is
    h . mean(e) = the mean of the old logits, so by Jensen exp(mean logit) <= mean(exp(logit)): each new token
    gets probability <= 1/V and the distribution over old tokens barely moves (KL <= log(1 + k/V) for k new
    tokens). Random rows could sit near a real token or draw a large logit; zero rows give logit 0, which can be
    far above GPT-2's typical (negative) logits.
    """
    old = model.transformer.wte.weight  # (V, C)
    V, C = old.shape
    if new_vocab_size < V:
        raise ValueError(f"resize_vocab only grows: model has {V} tokens, asked for {new_vocab_size}")
    if new_vocab_size == V:
        return model
    mean = old.double().mean(0).to(old.dtype)  # (C,) summed in float64: 50k rows
    w = nn.Parameter(torch.cat([old, mean.expand(new_vocab_size - V, C)]), requires_grad=old.requires_grad)
    model.transformer.wte.weight = w  # (V', C)
    model.transformer.wte.num_embeddings = new_vocab_size
    if model.config.tie_embeddings:
        model.lm_head.weight = w  # re-tie
    else:  # an untied head grows by the mean of its own rows: the same argument, on the head's rows
        head = model.lm_head.weight
        mean = head.double().mean(0).to(head.dtype)
        model.lm_head.weight = nn.Parameter(torch.cat([head, mean.expand(new_vocab_size - V, C)]),
                                            requires_grad=head.requires_grad)
    model.lm_head.out_features = new_vocab_size
    model.config.vocab_size = new_vocab_size
    return model


# ----------------------------------------------------------------------------- tokenizer

def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, so BPE files can store any byte sequence as visible text.

    Bytes that are printable and not whitespace stand for themselves (! to ~, inverted-! to not-sign, registered-
    sign to y-umlaut: 188 bytes); the other 68 (controls, space, DEL, 0x80-0xA0, soft hyphen) take chr(256),
    chr(257), ... in byte order: space -> 'Ġ' (U+0120), newline -> 'Ċ' (U+010A).
    """
    keep = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    out, n = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b], n = chr(256 + n), n + 1
    return out


def _bpe_parts(ranks: dict, token: bytes, max_rank: int) -> list:
    """tiktoken's merge rule on one token: merge the adjacent pair whose join has the lowest rank < max_rank."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        best, at = max_rank, None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best:
                best, at = r, i
        if at is None:
            break
        parts[at:at + 2] = [parts[at] + parts[at + 1]]
    return parts


def _first_file(path: Path, names) -> Path | None:
    return next((path / n for n in names if (path / n).is_file()), None)


def _read_gpt2_bpe(encoder_file: Path, merges_file: Path):
    """encoder.json + vocab.bpe -> (ranks {bytes: id}, specials {name: id}), checked against each other.

    tiktoken merges the adjacent pair whose joined token has the lowest rank; that equals GPT-2's merge-list
    order when every merged token's id grows down the merge file and exceeds its parts' ids. Checked here, with:
    all 256 bytes present, every merge's parts and result in the vocabulary, every other token a merge result.
    """
    decoder = {c: b for b, c in bytes_to_unicode().items()}

    def to_bytes(s):
        try:
            return bytes(decoder[c] for c in s)
        except KeyError:
            raise ValueError(f"{encoder_file}: token {s!r} has a character outside GPT-2's byte alphabet")

    ranks, specials = {}, {}
    for s, i in json.loads(encoder_file.read_text(encoding="utf-8")).items():
        if s in SPECIAL_TOKENS:  # GPT-2's <|endoftext|> sits in encoder.json but is no byte sequence to merge into
            specials[s] = i
        else:
            ranks[to_bytes(s)] = i
    made = {bytes([b]) for b in range(256)}
    if missing := made - set(ranks):
        raise ValueError(f"{encoder_file}: {len(missing)} of the 256 single bytes are missing")
    prev = max(ranks[b] for b in made)
    lines = merges_file.read_text(encoding="utf-8").split("\n")
    for lineno, line in enumerate(lines, 1):
        line = line.rstrip("\r")
        if not line or (lineno == 1 and line.startswith("#version")):
            continue
        ab = line.split(" ")
        if len(ab) != 2:
            raise ValueError(f"{merges_file}:{lineno}: expected two tokens 'a b', got {line!r}")
        a, b = map(to_bytes, ab)
        r, ra, rb = ranks.get(a + b), ranks.get(a), ranks.get(b)
        if r is None or ra is None or rb is None:
            raise ValueError(f"{merges_file}:{lineno}: merge {line!r} uses or makes a token not in {encoder_file.name}")
        if not (r > prev and r > ra and r > rb):
            raise ValueError(f"{merges_file}:{lineno}: merge {line!r} -> id {r} is out of order with "
                             f"{encoder_file.name} (ids must grow down the merge list)")
        prev = r
        made.add(a + b)
    if stray := set(ranks) - made:
        raise ValueError(f"{encoder_file}: {len(stray)} tokens are neither bytes nor merges in {merges_file.name}, "
                         f"e.g. {sorted(stray)[0]!r}")
    return ranks, specials


def _read_tiktoken(f: Path) -> dict:
    ranks = {}
    for lineno, line in enumerate(f.read_text().splitlines(), 1):
        if line.strip():
            try:
                tok, rank = line.split()
                ranks[base64.b64decode(tok, validate=True)] = int(rank)
            except ValueError as e:
                raise ValueError(f"{f}:{lineno}: expected 'base64 rank' ({e})")
    if missing := {bytes([b]) for b in range(256)} - set(ranks):
        raise ValueError(f"{f}: {len(missing)} of the 256 single bytes are missing")
    return ranks


def _make_tokenizer(ranks: dict, specials: dict, pattern: str) -> Tokenizer:
    """Append the chat specials the files lack after the last id, then wrap in minipost's Tokenizer."""
    if len(set(ranks.values())) != len(ranks) or set(ranks.values()) & set(specials.values()):
        raise ValueError("tokenizer files give two tokens the same id")
    specials = dict(specials)
    next_id = max([*ranks.values(), *specials.values()]) + 1
    for name in SPECIAL_TOKENS:
        if name not in specials:
            specials[name], next_id = next_id, next_id + 1
    enc = tiktoken.Encoding("gpt2-minipost", pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)
    return Tokenizer(enc)


def load_gpt2_tokenizer(path) -> Tokenizer:
    """GPT-2 tokenizer files in a folder -> Tokenizer: encoder.json + vocab.bpe (or HF's vocab.json + merges.txt),
    or a *.tiktoken ranks file; plus added_tokens.json and tokenizer_pattern.txt if present."""
    path = Path(path)
    encoder_file = _first_file(path, ("encoder.json", "vocab.json"))
    merges_file = _first_file(path, ("vocab.bpe", "merges.txt"))
    tiktoken_files = sorted(path.glob("*.tiktoken"))
    if encoder_file and merges_file:
        ranks, specials = _read_gpt2_bpe(encoder_file, merges_file)
    elif tiktoken_files:
        ranks, specials = _read_tiktoken(tiktoken_files[0]), {}
    else:
        raise ValueError(f"{path}: no GPT-2 tokenizer (encoder.json + vocab.bpe, vocab.json + merges.txt, "
                         f"or *.tiktoken)")
    if (path / "added_tokens.json").is_file():
        specials.update(json.loads((path / "added_tokens.json").read_text(encoding="utf-8")))
    if EOT not in specials and EOT.encode() not in ranks:  # tiktoken's gpt2 file leaves it out; it follows the ranks
        specials[EOT] = max(ranks.values()) + 1
    pattern_file = path / "tokenizer_pattern.txt"
    pattern = pattern_file.read_text(encoding="utf-8") if pattern_file.is_file() else GPT2_PATTERN
    return _make_tokenizer(ranks, specials, pattern)


def load_gpt2_folder(path):
    """(GPT, Tokenizer) from one GPT-2 folder, wte grown to the tokenizer's vocabulary (chat specials added)."""
    model, tokenizer = load_gpt2_model(path), load_gpt2_tokenizer(path)
    if tokenizer.vocab_size > model.config.vocab_size:
        resize_vocab(model, tokenizer.vocab_size)
    return model, tokenizer


# ----------------------------------------------------------------------------- export

def _derive_merges(ranks: dict) -> list:
    """Merges (a, b) in rank order: for each multi-byte token, the split into two lower-ranked tokens that
    tiktoken's rule itself produces when only ranks below the token's are allowed, so that GPT-2's pair-by-pair
    merging of vocab.bpe builds each token the way tiktoken's rank order does. A token that rule does not build
    in isolation (it can still arise next to other bytes) takes the split whose later half was ranked first."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = _bpe_parts(ranks, token, rank)
        if len(parts) != 2:
            splits = [(max(ranks[token[:i]], ranks[token[i:]]), i) for i in range(1, len(token))
                      if ranks.get(token[:i], rank) < rank and ranks.get(token[i:], rank) < rank]
            if not splits:
                raise ValueError(f"token {token!r} (rank {rank}) is not a merge of two lower-ranked tokens")
            i = min(splits)[1]
            parts = [token[:i], token[i:]]
        merges.append(tuple(parts))
    return merges


def export_tokenizer(tokenizer: Tokenizer, out_dir):
    """Write encoder.json + vocab.bpe (and the same text as HF's vocab.json + merges.txt), added_tokens.json for
    every special except <|endoftext|> (which lives in encoder.json, as in GPT-2), and tokenizer_pattern.txt if
    the split regex is not GPT-2's (tools other than minipost ignore that file and split with GPT-2's)."""
    out = Path(out_dir)
    ranks, specials = tokenizer.enc._mergeable_ranks, tokenizer.enc._special_tokens
    byte_enc = bytes_to_unicode()

    def text(tok: bytes) -> str:
        return "".join(byte_enc[b] for b in tok)

    encoder = {text(tok): r for tok, r in sorted(ranks.items(), key=lambda kv: kv[1])}
    if EOT in encoder:
        raise ValueError(f"a byte-level token spells {EOT}; it cannot also be the special token")
    encoder[EOT] = specials[EOT]
    merges = "#version: 0.2\n" + "".join(f"{text(a)} {text(b)}\n" for a, b in _derive_merges(ranks))
    encoder_json = json.dumps(encoder, ensure_ascii=False)
    for name in ("encoder.json", "vocab.json"):
        (out / name).write_text(encoder_json, encoding="utf-8")
    for name in ("vocab.bpe", "merges.txt"):
        (out / name).write_text(merges, encoding="utf-8")
    added = {k: v for k, v in sorted(specials.items(), key=lambda kv: kv[1]) if k != EOT}
    (out / "added_tokens.json").write_text(json.dumps(added, indent=1), encoding="utf-8")
    if tokenizer.enc._pat_str != GPT2_PATTERN:
        (out / "tokenizer_pattern.txt").write_text(tokenizer.enc._pat_str, encoding="utf-8")


def export_gpt2(model: GPT, tokenizer: Tokenizer, out_dir):
    """Write model + tokenizer as a GPT-2 folder (HF layout, float32 safetensors) that load_gpt2_folder and
    transformers' GPT2LMHeadModel read. A scalar head is kept as score_head.* (HF ignores it). LoRA adapters
    are merged into the weights first; a prompt-tuned model cannot be exported (ValueError)."""
    model = merge_adapters(model)
    cfg = model.config
    if not cfg.bias:
        raise ValueError("GPT-2 has biases in every Linear and LayerNorm; this model was built with bias=False")
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only {cfg.vocab_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied to wte; GPT-2 checkpoints leave it out and loaders re-tie it
        k = name.removeprefix("transformer.")
        tensors[k] = (t.T if k.endswith(_CONV1D) else t).detach().float().cpu().contiguous()  # Linear -> Conv1D
    write_safetensors(out / "model.safetensors", tensors)
    hf = dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=cfg.vocab_size,
              n_positions=cfg.block_size, n_ctx=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
              n_head=cfg.n_head, n_inner=None, activation_function="gelu_new", layer_norm_epsilon=1e-5,
              resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=0.0, scale_attn_weights=True,
              tie_word_embeddings=True, bos_token_id=tokenizer.bos_id,
              eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id, torch_dtype="float32")
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    export_tokenizer(tokenizer, out)
    return out
