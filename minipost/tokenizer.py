"""Byte-level BPE tokenizer: training in pure Python, encoding by tiktoken, chat rendering with loss masks.

The vocabulary is a tiktoken.Encoding: the 256 single bytes get ranks 0..255 (byte b -> rank b), every merge
learned by `train_bpe` gets the next rank, and the special tokens come after the last rank. tiktoken encodes a
pre-token piece by repeatedly merging the adjacent pair of tokens whose concatenation has the lowest rank
(leftmost on ties) until no concatenation is in the vocabulary. The trainer keeps every training word in exactly
the state tiktoken would produce with the ranks learned so far, so tiktoken reproduces training exactly.

Chat rendering, in minipost's own format by default:
    <|endoftext|> <|system|> ... <|end|> <|user|> ... <|end|> <|assistant|> ... <|end|> ...
or, for a model imported from Hugging Face (minipost/hf.py), in that model's own: ChatML (Qwen2, SmolLM2)
    <|im_start|>user\n ... <|im_end|>\n<|im_start|>assistant\n ... <|im_end|>\n
or Llama 3's headers
    <|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n ... <|eot_id|><|start_header_id|>assistant...
with loss mask 1 on assistant content tokens and their end-of-turn token, 0 everywhere else.
"""

import base64
import functools
import heapq
import json
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path

import regex  # tiktoken's own dependency: the \p{..} regex syntax of tiktoken's patterns, for Python
import tiktoken

SPECIAL_TOKENS = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|pad|>"]
ROLES = ("system", "user", "assistant")

# How render() lays out a conversation: `start`, then per message header(role) + content + end + trailer.
# Items of the form <|...|> are special tokens, the others text ({role} becomes the message's role); the end
# token is the EOS generation stops at. `strip`: contents are stripped of surrounding whitespace, as Llama 3's
# template does. bos: the document separator (`text` rows start with it); pad: padding (always masked out:
# any id serves, and the end token stands in when a model has no pad of its own). None: given by the model.
CHAT_FORMATS = {
    "minipost": dict(start=["<|endoftext|>"], header=["<|{role}|>"], end="<|end|>", trailer=[], strip=False,
                     bos="<|endoftext|>", pad="<|pad|>"),
    "chatml": dict(start=[], header=["<|im_start|>", "{role}\n"], end="<|im_end|>", trailer=["\n"], strip=False,
                   bos=None, pad=None),
    "llama3": dict(start=["<|begin_of_text|>"], header=["<|start_header_id|>", "{role}", "<|end_header_id|>", "\n\n"],
                   end="<|eot_id|>", trailer=[], strip=True, bos="<|begin_of_text|>", pad=None),
}


def _is_special(item: str) -> bool:
    return item.startswith("<|") and item.endswith("|>")

# Pre-tokenizer for tiktoken (Rust regex syntax), in the GPT-4 style: contractions; a word with at most one
# leading non-letter (usually a space); ONE digit per piece (as in Llama: a small model learns arithmetic on
# digits, and no vocabulary slots go to numbers); punctuation runs with trailing newlines; newlines with their
# leading whitespace; whitespace runs that leave their last space to the next word. The possessive quantifiers
# of the GPT-4 pattern are left out: here they never change what matches, and Python < 3.11 lacks them.
PATTERN = r"""'(?:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""

# Rust's \s is Unicode White_Space; Python's \s also takes U+001C..U+001F, so the whitespace class is spelt out.
_WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"


@functools.cache
def _category_class(major: str) -> str:
    """Inside of a character class (no brackets) matching every code point whose Unicode category starts
    with `major` ("L" = \\p{L}, "N" = \\p{N}) in Python's unicodedata, as literal ranges."""
    parts, start = [], None
    for cp in range(0x110001):
        inside = cp < 0x110000 and unicodedata.category(chr(cp))[0] == major
        if inside and start is None:
            start = cp
        elif not inside and start is not None:
            parts.append(chr(start) if cp - 1 == start else f"{chr(start)}-{chr(cp - 1)}")
            start = None
    return "".join(parts)


@functools.cache
def training_regex() -> re.Pattern:
    """PATTERN for Python's `re` (which has no \\p{..}): the same alternatives, with \\p{L}, \\p{N}, \\s and \\S
    written as explicit classes. Splits exactly as tiktoken does, up to characters whose category differs
    between Python's Unicode database and the one in tiktoken's Rust regex (characters newer than Python's).
    tests/test_tokenizer.py checks the two splits are equal."""
    L, N, S = _category_class("L"), _category_class("N"), _WHITESPACE
    return re.compile(
        rf"""'(?:[sdmt]|ll|ve|re)|[^\r\n{L}{N}]?[{L}]+|[{N}]| ?[^{S}{L}{N}]+[\r\n]*|[{S}]*[\r\n]|[{S}]+(?![^{S}])|[{S}]+"""
    )


# -----------------------------------------------------------------------------
# BPE training


def _merge_word(tokens: list[bytes], ranks: dict[bytes, int]) -> list[bytes]:
    """tiktoken's merge loop: while some adjacent pair's concatenation is in `ranks`, merge the leftmost pair
    with the lowest rank. Started from a state that was final for a smaller vocabulary, it gives the state
    that is final for `ranks` (a newly added token has the highest rank, so it only acts once the older ones
    are done)."""
    tokens = list(tokens)
    while len(tokens) > 1:
        best_rank, best_i = None, -1
        for i in range(len(tokens) - 1):
            rank = ranks.get(tokens[i] + tokens[i + 1])
            if rank is not None and (best_rank is None or rank < best_rank):
                best_rank, best_i = rank, i
        if best_rank is None:
            break
        tokens[best_i : best_i + 2] = [tokens[best_i] + tokens[best_i + 1]]
    return tokens


def _train_ranks(word_counts: Mapping[bytes, int], n_ranks: int) -> tuple[dict[bytes, int], list[list[bytes]]]:
    """Learn up to n_ranks mergeable ranks (256 bytes included) from pre-token counts.

    A candidate is the concatenation c = a + b of two adjacent tokens; its count is
        count(c) = sum over words w of freq(w) * #{adjacent (a, b) in w with a + b = c}.
    Each step adds the candidate with the largest count (ties: smallest bytes, so training is deterministic)
    as the next rank, and re-merges only the words that contain it (found through the index candidate ->
    words), updating counts by their old and new pairs. Stops when no candidate occurs at least twice.
    Returns the ranks and every word's final tokens (in the order of word_counts).
    """
    if n_ranks < 256:
        raise ValueError(f"need at least 256 ranks for the single bytes, got {n_ranks}")
    ranks = {bytes([b]): b for b in range(256)}
    words = [[bytes([b]) for b in word] for word in word_counts]
    freqs = list(word_counts.values())
    counts: Counter[bytes] = Counter()
    where: defaultdict[bytes, set[int]] = defaultdict(set)  # candidate -> indices of the words holding it
    for j, tokens in enumerate(words):
        for a, b in zip(tokens, tokens[1:]):
            counts[a + b] += freqs[j]
            where[a + b].add(j)
    heap = [(-count, pair) for pair, count in counts.items()]  # max-heap with stale entries left in
    heapq.heapify(heap)

    while len(ranks) < n_ranks and heap:
        neg_count, new = heapq.heappop(heap)
        if counts.get(new) != -neg_count:
            continue  # stale: the count changed after this entry was pushed
        if -neg_count < 2:
            break
        ranks[new] = len(ranks)
        changed = set()
        for j in where.pop(new):
            old_pairs = [a + b for a, b in zip(words[j], words[j][1:])]
            words[j] = _merge_word(words[j], ranks)
            new_pairs = [a + b for a, b in zip(words[j], words[j][1:])]
            for pair in old_pairs:
                counts[pair] -= freqs[j]
            for pair in new_pairs:
                counts[pair] += freqs[j]
            old_set, new_set = set(old_pairs), set(new_pairs)
            for pair in old_set - new_set - {new}:
                where[pair].discard(j)
            for pair in new_set - old_set:
                where[pair].add(j)
            changed |= old_set | new_set
        for pair in changed:
            if counts[pair] > 0:
                heapq.heappush(heap, (-counts[pair], pair))
            else:  # keep both maps small; a final state never holds a pair that is already a token
                del counts[pair]
                where.pop(pair, None)
    return ranks, words


def train_bpe(texts: Iterable[str], vocab_size: int) -> "Tokenizer":
    """Train a byte-level BPE tokenizer with vocab_size = mergeable ranks + len(SPECIAL_TOKENS) tokens
    (fewer if training runs out of pairs occurring at least twice). Special-token strings inside `texts`
    count as ordinary text."""
    n_ranks = vocab_size - len(SPECIAL_TOKENS)
    if n_ranks < 256:
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)}, got {vocab_size}")
    split = training_regex()
    pieces: Counter[str] = Counter()
    for text in texts:
        pieces.update(split.findall(text))
    word_counts: Counter[bytes] = Counter()
    for piece, count in pieces.items():
        word_counts[piece.encode("utf-8", "replace")] += count  # a lone surrogate is not UTF-8: "?"
    ranks, _ = _train_ranks(word_counts, n_ranks)
    specials = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
    return Tokenizer(_encoding("minipost", PATTERN, ranks, specials))


def _encoding(name: str, pattern: str, ranks: dict[bytes, int], specials: dict[str, int]) -> tiktoken.Encoding:
    """A tiktoken.Encoding whose ranks and special ids together fill 0..n_vocab-1, each id once (ValueError)."""
    ids = sorted([*ranks.values(), *specials.values()])
    if ids != list(range(len(ids))):
        raise ValueError("token ids must be 0..n-1, each used once by a rank or a special token")
    return tiktoken.Encoding(
        name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials, explicit_n_vocab=len(ranks) + len(specials)
    )


# -----------------------------------------------------------------------------
# Tokenizer


class Tokenizer:
    """A tiktoken.Encoding plus a chat format (CHAT_FORMATS). Plain text never yields special ids; specials are
    inserted only by `render`.

    chat: the format's name; bos, pad: special-token names where the format leaves them to the model;
    nfc: NFC-normalise text before encoding (Qwen2's tokenizer does).

    A vocabulary imported from Hugging Face may lack some single bytes (`absent`): real byte-level BPE
    vocabularies leave out bytes never seen in training (SmolLM2 lacks 21: 0x04, 0x06, 0x13, 0x14, 0x16, 0x1D,
    0xC0, 0xC1, 0xF1, 0xF2, 0xF5-0xFF). A Python str can still hold the ASCII control characters among them and,
    through 0xF1 / 0xF2, the code points U+40000..U+BFFFF (0xC0, 0xC1 and 0xF5-0xFF never occur in UTF-8).
    encode() drops such bytes exactly as Hugging Face's BPE does: the text is split into pre-tokens first, the
    missing bytes are removed from each pre-token, and what is left of it is merged as usual (so "!\x04!"
    encodes as "!!" would, and "\x04" alone as nothing). tiktoken itself would panic on them."""

    def __init__(self, enc: tiktoken.Encoding, chat: str = "minipost", bos: str | None = None,
                 pad: str | None = None, nfc: bool = False):
        if chat not in CHAT_FORMATS:
            raise ValueError(f"unknown chat format {chat!r}; expected one of {', '.join(CHAT_FORMATS)}")
        fmt = CHAT_FORMATS[chat]
        self.enc, self.chat, self.nfc = enc, chat, nfc
        self.format = fmt
        bos, pad = fmt["bos"] or bos or fmt["end"], fmt["pad"] or pad or fmt["end"]
        needed = [*fmt["start"], *(h.format(role=r) for h in fmt["header"] for r in ROLES), fmt["end"], bos, pad]
        missing = [name for name in dict.fromkeys(needed) if _is_special(name) and name not in enc.special_tokens_set]
        if missing:
            raise ValueError(f"encoding {enc.name!r} lacks the special tokens {missing} of the {chat} chat format")
        self.bos_id = enc.encode_single_token(bos)  # document separator; `text` rows start with it
        self.eos_id = enc.encode_single_token(fmt["end"])  # end of a turn; generation stops here
        self.pad_id = enc.encode_single_token(pad)
        self.bos, self.pad = bos, pad
        if chat == "minipost":  # the role tokens, for code that builds minipost conversations by hand
            self.system_id, self.user_id, self.assistant_id = (enc.encode_single_token(f"<|{r}|>") for r in ROLES)
        self.vocab_size = enc.n_vocab
        ranks = enc._mergeable_ranks
        self.absent = bytes(b for b in range(256) if bytes([b]) not in ranks)  # single bytes with no id
        try:
            self._split = regex.compile(enc._pat_str) if self.absent else None
        except regex.error as e:
            raise ValueError(f"pattern of {enc.name!r} does not compile in Python's regex: {e}")

    def __repr__(self):
        return f"Tokenizer({self.enc.name!r}, vocab_size={self.vocab_size}, chat={self.chat!r})"

    def encode(self, text: str) -> list[int]:
        """Plain text -> ids. Special-token strings in the text are encoded as the ordinary text they are."""
        if self.nfc:
            text = unicodedata.normalize("NFC", text)
        if self.absent:
            try:
                data = text.encode("utf-8")
            except UnicodeEncodeError:  # lone surrogates: U+FFFD, as tiktoken replaces them
                text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
                data = text.encode("utf-8")
            if len(data.translate(None, self.absent)) != len(data):
                return self._encode_dropping(text)
        return self.enc.encode(text, allowed_special=set(), disallowed_special=())

    def _encode_dropping(self, text: str) -> list[int]:
        """encode() for text holding bytes the vocabulary lacks (see the class docstring): per pre-token, the
        bytes that are left, merged by tiktoken's own BPE for one piece (the whole piece if it is a token, else
        the adjacent pair of lowest rank first; tiktoken >= 0.7 has it, in Rust: a pure-Python merge took 23 s
        for one 16k-character pre-token). No absent byte is left in a piece, so tiktoken never meets one."""
        ids = []
        for match in self._split.finditer(text):
            data = match.group().encode("utf-8").translate(None, self.absent)
            if data:
                ids += self.enc._encode_single_piece(data)
        return ids

    def decode(self, ids) -> str:
        """ids (any iterable of ints, e.g. a 1-D tensor) -> text. Specials decode to their names; byte
        sequences that are not valid UTF-8 (a cut-off character) decode to U+FFFD, and so does an id past the
        vocabulary (a model may have more rows than its tokenizer has ids: Qwen2.5 pads to a multiple of 128)."""
        ids = [int(i) for i in ids]
        cut = [n for n, i in enumerate(ids) if not 0 <= i < self.vocab_size]  # positions of unknown ids
        if not cut:
            return self.enc.decode(ids, errors="replace")
        pieces = [self.enc.decode(ids[a + 1:b], errors="replace") for a, b in zip([-1] + cut, cut + [len(ids)])]
        return "\ufffd".join(pieces)

    def _pieces(self, items, role: str = "") -> list[int]:
        ids = []
        for item in items:
            item = item.format(role=role)
            ids += [self.enc.encode_single_token(item)] if _is_special(item) else self.encode(item)
        return ids

    def _check(self, i: int, message) -> tuple[str, str]:
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise ValueError(f"message {i} must be a mapping with 'role' and 'content', got {message!r:.200}")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise ValueError(f"message {i} has role {role!r}; expected one of {ROLES}")
        if not isinstance(content, str):
            raise ValueError(f"message {i} content must be a string, got {type(content).__name__}")
        return role, content.strip() if self.format["strip"] else content

    def render(self, messages) -> tuple[list[int], list[int]]:
        """[{"role", "content"}, ...] -> (ids, mask) in the chat format, with
            ids  = start + for each message: header(role) + encode(content) + [eos] + trailer
            mask = 1 on assistant content and its eos, 0 everywhere else.
        The mask is written while rendering, so it cannot drift from the ids."""
        ids = self._pieces(self.format["start"])
        mask = [0] * len(ids)
        trailer = self._pieces(self.format["trailer"])
        for i, message in enumerate(messages):
            role, content = self._check(i, message)
            header, body = self._pieces(self.format["header"], role), self.encode(content) + [self.eos_id]
            trained = int(role == "assistant")
            ids += header + body + trailer
            mask += [0] * len(header) + [trained] * len(body) + [0] * len(trailer)
        return ids, mask

    def render_prompt(self, messages) -> list[int]:
        """The conversation so far plus the assistant header: what generation continues from, so that
        render_prompt(m) + encode(answer) + [eos] starts render(m + [assistant answer])[0] (and is all of it
        when the format has no trailer after the eos, as minipost's and Llama 3's)."""
        return self.render(messages)[0] + self._pieces(self.format["header"], "assistant")

    def show(self, ids, mask=None) -> str:
        """Debug view of a rendered sequence: the decoded text, with each run of trained (mask 1) tokens
        wrapped in [[ ]], e.g. '<|endoftext|><|user|>2+2?<|end|><|assistant|>[[4<|end|>]]'."""
        ids = [int(i) for i in ids]
        mask = [0] * len(ids) if mask is None else [int(m) for m in mask]
        if len(mask) != len(ids):
            raise ValueError(f"ids and mask differ in length: {len(ids)} vs {len(mask)}")
        out, start = [], 0
        for end in range(1, len(ids) + 1):  # cut into runs of equal mask; decode each run whole
            if end == len(ids) or mask[end] != mask[start]:
                text = self.decode(ids[start:end])
                out.append(f"[[{text}]]" if mask[start] else text)
                start = end
        return "".join(out)

    # -- files: one UTF-8 JSON text, no pickle -----------------------------------------------------------

    def save(self, path) -> None:
        """Write {"name", "pattern", "special_tokens": {name: id}, "mergeable_ranks": [base64 of rank 0, 1, ...],
        "chat": {"format", "bos", "pad", "nfc"}}, plus "ranks" (the rank of each listed token) when the ranks
        are not 0..n-1 (a Hugging Face vocabulary whose special tokens come first, say)."""
        ranks = self.enc._mergeable_ranks  # tiktoken has no public accessor for ranks, pattern or specials
        by_rank = sorted(ranks, key=ranks.__getitem__)
        state = {
            "format": "minipost-tokenizer-v1",
            "name": self.enc.name,
            "pattern": self.enc._pat_str,
            "special_tokens": dict(sorted(self.enc._special_tokens.items(), key=lambda item: item[1])),
            "mergeable_ranks": [base64.b64encode(token).decode("ascii") for token in by_rank],
            "chat": {"format": self.chat, "bos": self.bos, "pad": self.pad, "nfc": self.nfc},
        }
        if [ranks[token] for token in by_rank] != list(range(len(by_rank))):
            state["ranks"] = [ranks[token] for token in by_rank]
        Path(path).write_text(json.dumps(state, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path) -> "Tokenizer":
        """Inverse of save. Any malformed file raises ValueError naming the path."""
        text = Path(path).read_bytes()  # a missing file raises FileNotFoundError, which names it already
        try:
            state = json.loads(text.decode("utf-8"))
            if not isinstance(state, dict) or state.get("format") != "minipost-tokenizer-v1":
                raise ValueError("not a minipost tokenizer file (format must be 'minipost-tokenizer-v1')")
            name, pattern, specials, ranks = (state.get(k) for k in ("name", "pattern", "special_tokens", "mergeable_ranks"))
            if not isinstance(name, str) or not isinstance(pattern, str):
                raise ValueError("'name' and 'pattern' must be strings")
            if not isinstance(ranks, list) or not all(isinstance(t, str) for t in ranks):
                raise ValueError("'mergeable_ranks' must be a list of base64 strings")
            if not isinstance(specials, dict) or not all(type(i) is int for i in specials.values()):
                raise ValueError("'special_tokens' must map names to integer ids")
            tokens = [base64.b64decode(t, validate=True) for t in ranks]
            if len(set(tokens)) != len(tokens):
                raise ValueError("'mergeable_ranks' holds a token twice")
            ids = state.get("ranks", list(range(len(tokens))))
            if not isinstance(ids, list) or len(ids) != len(tokens) or not all(type(i) is int for i in ids):
                raise ValueError("'ranks' must be a list of integers, one per mergeable token")
            chat = state.get("chat", {"format": "minipost"})  # files from before chat formats: minipost's own
            if not isinstance(chat, dict) or not isinstance(chat.get("format"), str):
                raise ValueError("'chat' must be an object with a 'format'")
            if not all(chat.get(k) is None or isinstance(chat[k], str) for k in ("bos", "pad")) or \
                    type(chat.get("nfc", False)) is not bool:
                raise ValueError("'chat': 'bos' and 'pad' must be null or token names, 'nfc' true or false")
            enc = _encoding(name, pattern, dict(zip(tokens, ids)), specials)
            return cls(enc, chat["format"], chat.get("bos"), chat.get("pad"), chat.get("nfc", False) is True)
        except (ValueError, AssertionError, TypeError) as e:
            # json.JSONDecodeError and binascii.Error are ValueErrors; a bad regex fails in tiktoken's constructor
            raise ValueError(f"cannot load tokenizer from {path}: {e}") from e
