"""Tokenizer: training-time splitting and merging agree with tiktoken, lossless round trips, chat rendering
masks, save/load. Every tokenizer here is trained inside the test on a small generated corpus."""

import base64
import json
import random
import re
import unicodedata
from collections import Counter

import pytest
import tiktoken

from minipost.tokenizer import (
    _WHITESPACE,
    PATTERN,
    SPECIAL_TOKENS,
    Tokenizer,
    _category_class,
    _encoding,
    _train_ranks,
    train_bpe,
    training_regex,
)

WORDS = (
    "the a cat dog sat on mat and ran to house big small red blue one two three is was what how many apples "
    "he she they it gave took has had there their then these those"
).split()

SAMPLES = [
    "naïve café, Crème brûlée — déjà vu",
    "日本語のテキストと中文字符。",
    "emoji 😀👍🏽 👨‍👩‍👧 flags 🇫🇷🇯🇵",
    "e\u0301 a\u0308\u0304 combining marks \u0301 alone",
    "tabs\tand   spaces  \n\n\r\n  trailing   ",
    "null\x00byte, \x1c\x1f separators, \u200b zero width, \u3000 ideographic space",
    "digits 1234567 ١٢٣ ٤٥ ²³ Ⅻ 1.5e-3",
    "I'm you're he'll we've they'd it's DON'T ''' ",
    "<|endoftext|><|user|>hi<|end|><|pad|>",
    "",
    " ",
    "\n",
]


def english_like(n_sentences: int, seed: int) -> str:
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ren", "tas", "bor", "quel", "di", "nu", "st", "ph", "ow"]
    made_up = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(300)]
    lines = []
    for _ in range(n_sentences):
        words = [rng.choice(WORDS) if rng.random() < 0.7 else rng.choice(made_up) for _ in range(rng.randint(3, 12))]
        sentence = " ".join(words).capitalize()
        if rng.random() < 0.3:
            sentence += f" {rng.randint(0, 9999)}"
        lines.append(sentence + rng.choice([".", "!", "?", "'s.", ", don't.", ":\n"]))
    return "\n".join(lines)


def random_text(rng: random.Random, n: int, assigned_only: bool = False) -> str:
    """n draws from pools of awkward characters; assigned_only keeps code points Python's unicodedata knows."""
    pools = [
        lambda: chr(rng.randint(0x20, 0x7E)),
        lambda: rng.choice(" \t\n\r\x0b\x0c\x00\x1c\x1f\x85\xa0\u2000\u2028\u3000\u200b") * rng.randint(1, 4),
        lambda: "\r\n",
        lambda: chr(rng.randint(0x1F300, 0x1FAFF)),  # emoji
        lambda: chr(rng.randint(0x4E00, 0x9FFF)),  # CJK
        lambda: chr(rng.randint(0x0300, 0x036F)),  # combining marks
        lambda: chr(rng.choice([rng.randint(0, 0xD7FF), rng.randint(0xE000, 0x10FFFF)])),  # any scalar value
    ]
    out = []
    while len(out) < n:
        piece = rng.choice(pools)()
        if not (assigned_only and any(unicodedata.category(c) == "Cn" for c in piece)):
            out.append(piece)
    return "".join(out)


def naive_bpe(piece: bytes, ranks: dict[bytes, int]) -> list[bytes]:
    """Merge the adjacent pair whose concatenation has the lowest rank (leftmost on ties) until none has one."""
    parts = [piece[i : i + 1] for i in range(len(piece))]
    while True:
        found = [(ranks[parts[i] + parts[i + 1]], i) for i in range(len(parts) - 1) if parts[i] + parts[i + 1] in ranks]
        if not found:
            return parts
        _, i = min(found)
        parts[i : i + 2] = [parts[i] + parts[i + 1]]


def tiktoken_pieces(text: str, pattern: str = PATTERN) -> list[bytes]:
    """The pieces tiktoken's own regex cuts `text` into. With every substring of the text in the vocabulary
    (shorter ones ranked first) every adjacent pair inside a piece can merge, so each piece becomes exactly one
    token, and tokens never cross pieces: the tokens are the pieces."""
    data = text.encode("utf-8")
    ranks = {bytes([b]): b for b in range(256)}
    for sub in sorted({data[i:j] for i in range(len(data)) for j in range(i + 2, len(data) + 1)}, key=lambda s: (len(s), s)):
        ranks[sub] = len(ranks)
    enc = tiktoken.Encoding("pieces", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
    return [enc.decode_single_token_bytes(t) for t in enc.encode_ordinary(text)]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_bpe([english_like(1500, seed=0)] + SAMPLES, vocab_size=600)


# -----------------------------------------------------------------------------
# training


def test_training_by_hand():
    # "aaabdaaabac" is one piece. Candidate counts (overlaps count): aa 4, ab 2, the rest 1 -> rank 256 = aa,
    # leaving [aa a b d aa a b a c]. Then aaa 2 and ab 2 tie; the smaller bytes win -> 257 = aaa, leaving
    # [aaa b d aaa b a c]. Then aaab 2 -> 258 = aaab, leaving [aaab d aaab a c]: every candidate occurs once, stop.
    tok = train_bpe(["aaabdaaabac"], vocab_size=10_000)
    learned = sorted((r, t) for t, r in tok.enc._mergeable_ranks.items() if r >= 256)
    assert learned == [(256, b"aa"), (257, b"aaa"), (258, b"aaab")]
    assert tok.encode("aaabdaaabac") == [258, ord("d"), 258, ord("a"), ord("c")]
    assert tok.vocab_size == 259 + len(SPECIAL_TOKENS)
    assert (tok.bos_id, tok.system_id, tok.user_id, tok.assistant_id, tok.eos_id, tok.pad_id) == tuple(range(259, 265))
    # the vocabulary budget stops training after the first merge
    small = train_bpe(["aaabdaaabac"], vocab_size=257 + len(SPECIAL_TOKENS))
    assert small.vocab_size == 257 + len(SPECIAL_TOKENS) and small.encode("aaab") == [256, ord("a"), ord("b")]
    with pytest.raises(ValueError):
        train_bpe(["abc"], vocab_size=255 + len(SPECIAL_TOKENS))


def naive_train(counts: dict[bytes, int], n_ranks: int) -> dict[bytes, int]:
    """Training without incremental updates: recount every candidate from scratch before each merge."""
    ranks = {bytes([b]): b for b in range(256)}
    while len(ranks) < n_ranks:
        tally = Counter()
        for word, n in counts.items():
            tokens = naive_bpe(word, ranks)
            for a, b in zip(tokens, tokens[1:]):
                tally[a + b] += n
        if not tally:
            break
        best = min(tally, key=lambda c: (-tally[c], c))  # most frequent, then smallest bytes
        if tally[best] < 2:
            break
        ranks[best] = len(ranks)
    return ranks


def test_incremental_training_equals_recounting():
    text = english_like(150, seed=3) + "".join(SAMPLES)
    counts = Counter(p.encode("utf-8") for p in training_regex().findall(text))
    assert _train_ranks(counts, 256 + 120)[0] == naive_train(counts, 256 + 120)
    rng = random.Random(6)  # two letters: overlapping and competing pairs; runs until nothing occurs twice
    counts = {bytes(rng.choice(b"ab") for _ in range(rng.randint(1, 10))): rng.randint(1, 3) for _ in range(60)}
    ranks = _train_ranks(counts, 10_000)[0]
    assert 256 < len(ranks) < 10_000 and ranks == naive_train(counts, 10_000)


def test_training_is_deterministic(tok):
    texts = [english_like(1500, seed=0)] + SAMPLES
    again = train_bpe(texts[::-1], vocab_size=600)  # counting does not depend on the order of documents
    assert again.enc._mergeable_ranks == tok.enc._mergeable_ranks
    assert tok.vocab_size == 600
    assert b" the" in tok.enc._mergeable_ranks  # a frequent word of the corpus became a token


def test_training_regex_classes_match_tiktoken():
    # The building blocks of the two patterns hold the same characters, over every code point that Python's
    # unicodedata assigns (newer ones are unknown to Python; see training_regex).
    everything = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000)
    assigned = {c for c in everything if unicodedata.category(c) != "Cn"}
    ranks = {bytes([b]): b for b in range(256)}
    for rust, python in [(r"\p{L}", _category_class("L")), (r"\p{N}", _category_class("N")), (r"\s", _WHITESPACE)]:
        enc = tiktoken.Encoding("probe", pat_str=rust, mergeable_ranks=ranks, special_tokens={})
        by_tiktoken = set(enc.decode(enc.encode_ordinary(everything))) & assigned  # unmatched text is dropped
        by_re = set(re.findall(f"[{python}]", everything))
        assert by_tiktoken == by_re, rust


def test_training_split_equals_tiktoken_split():
    rng = random.Random(1)
    texts = SAMPLES + [english_like(3, seed=5)] + [random_text(rng, rng.randint(1, 40), assigned_only=True) for _ in range(60)]
    for text in texts:
        ours = training_regex().findall(text)
        assert "".join(ours) == text  # every character lands in some piece
        assert [p.encode("utf-8") for p in ours] == tiktoken_pieces(text), repr(text)


def test_tiktoken_applies_the_merges_as_trained():
    text = english_like(400, seed=1) + "".join(SAMPLES)
    pieces = training_regex().findall(text)
    counts = Counter(p.encode("utf-8") for p in pieces)
    ranks, words = _train_ranks(counts, 256 + 300)
    assert len(ranks) == 256 + 300
    final = dict(zip(counts, words))
    for word, tokens in final.items():  # the trainer's state of each word is what BPE-by-rank makes of it
        assert tokens == naive_bpe(word, ranks), word
    enc = tiktoken.Encoding("t", pat_str=PATTERN, mergeable_ranks=ranks, special_tokens={})
    trained = [t for p in pieces for t in final[p.encode("utf-8")]]
    assert [enc.decode_single_token_bytes(i) for i in enc.encode_ordinary(text)] == trained
    # train_bpe on the same text learns the same ranks
    assert train_bpe([text], 256 + 300 + len(SPECIAL_TOKENS)).enc._mergeable_ranks == ranks
    # unseen text: tiktoken == naive BPE on the training-time pieces
    rng = random.Random(2)
    for held_out in [english_like(50, seed=9), random_text(rng, 300, assigned_only=True)]:
        expected = [t for p in training_regex().findall(held_out) for t in naive_bpe(p.encode("utf-8"), ranks)]
        assert [enc.decode_single_token_bytes(i) for i in enc.encode_ordinary(held_out)] == expected


def test_tiktoken_applies_the_merges_as_trained_small_alphabet():
    # Two letters: many overlapping and competing pairs ("aaa", "abab"), a stress test for the incremental counts.
    rng = random.Random(3)
    counts = {bytes(rng.choice(b"ab") for _ in range(rng.randint(1, 14))): rng.randint(1, 9) for _ in range(400)}
    ranks, words = _train_ranks(counts, 256 + 150)
    enc = tiktoken.Encoding("ab", pat_str=r"[\s\S]+", mergeable_ranks=ranks, special_tokens={})
    for word, tokens in zip(counts, words):
        assert tokens == naive_bpe(word, ranks)
        assert [enc.decode_single_token_bytes(i) for i in enc.encode_ordinary(word.decode())] == tokens
    # the counts the trainer kept incrementally must equal a recount of its final state
    recount = Counter()
    for tokens, n in zip(words, counts.values()):
        for a, b in zip(tokens, tokens[1:]):
            recount[a + b] += n
    assert not any(pair in ranks for pair in recount)  # a final state holds no pair that is a token
    if len(ranks) < 256 + 150:  # stopped early: nothing left occurs twice
        assert max(recount.values(), default=0) < 2


# -----------------------------------------------------------------------------
# encode / decode


def test_round_trip_arbitrary_unicode(tok):
    bytes_only = train_bpe([], vocab_size=256 + len(SPECIAL_TOKENS))
    rng = random.Random(4)
    texts = SAMPLES + [random_text(rng, rng.randint(1, 200)) for _ in range(200)] + ["\x00" * 5, " " * 33 + "\r\n" * 3]
    for t in (tok, bytes_only):
        for text in texts:
            ids = t.encode(text)
            assert all(0 <= i < t.bos_id for i in ids)  # plain text never yields a special id
            assert t.decode(ids) == text, repr(text)
    assert len(bytes_only.encode("héllo")) == len("héllo".encode("utf-8"))  # no merges: one id per byte


def test_decode_invalid_utf8_and_tensors(tok):
    import torch

    assert tok.decode([ord("a"), 0xFF, ord("b")]) == "a\ufffdb"
    assert tok.decode([0xE6, 0x97]) == "\ufffd"  # the first two bytes of a three-byte character
    assert tok.decode(torch.tensor(tok.encode("cat sat"))) == "cat sat"


def test_special_strings_in_text_stay_text(tok):
    text = "say " + " ".join(SPECIAL_TOKENS) + "".join(SPECIAL_TOKENS)
    ids = tok.encode(text)
    assert max(ids) < tok.bos_id and tok.decode(ids) == text
    n = len(tok.enc._mergeable_ranks)  # specials follow the last rank, in SPECIAL_TOKENS order
    assert (tok.bos_id, tok.system_id, tok.user_id, tok.assistant_id, tok.eos_id, tok.pad_id) == tuple(range(n, n + 6))
    assert tok.vocab_size == n + 6 == tok.enc.n_vocab
    for i, name in enumerate(SPECIAL_TOKENS):
        assert tok.decode([n + i]) == name


def test_init_requires_every_special():
    ranks = {bytes([b]): b for b in range(256)}
    specials = {name: 256 + i for i, name in enumerate(SPECIAL_TOKENS[:-1])}  # no <|pad|>
    enc = tiktoken.Encoding("partial", pat_str=PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    with pytest.raises(ValueError, match=re.escape("<|pad|>")):
        Tokenizer(enc)


# -----------------------------------------------------------------------------
# chat rendering


CONVERSATION = [
    {"role": "system", "content": "You add numbers."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "2+2 = 4. <|end|> is just text here"},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6"},
]


def test_render_mask_multi_turn(tok):
    E = tok.encode
    system, user1, asst1, user2, asst2 = (E(m["content"]) for m in CONVERSATION)
    expected_ids = (
        [tok.bos_id]
        + [tok.system_id] + system + [tok.eos_id]
        + [tok.user_id] + user1 + [tok.eos_id]
        + [tok.assistant_id] + asst1 + [tok.eos_id]
        + [tok.user_id] + user2 + [tok.eos_id]
        + [tok.assistant_id] + asst2 + [tok.eos_id]
    )  # fmt: skip
    expected_mask = (
        [0]
        + [0] + [0] * len(system) + [0]
        + [0] + [0] * len(user1) + [0]
        + [0] + [1] * len(asst1) + [1]
        + [0] + [0] * len(user2) + [0]
        + [0] + [1] * len(asst2) + [1]
    )  # fmt: skip
    ids, mask = tok.render(CONVERSATION)
    assert ids == expected_ids
    assert mask == expected_mask
    assert sum(mask) == len(asst1) + len(asst2) + 2
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "2+2 = 4. <|end|> is just text here<|end|>6<|end|>"
    # an empty assistant turn trains only its <|end|>
    ids, mask = tok.render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}])
    assert ids[-2:] == [tok.assistant_id, tok.eos_id] and mask[-2:] == [0, 1] and sum(mask) == 1
    assert tok.render([]) == ([tok.bos_id], [0])


def test_render_prompt_identity(tok):
    for history, answer in [
        (CONVERSATION[:2], "4"),
        (CONVERSATION[:4], "3+3 = 6 😀 <|assistant|>"),
        ([{"role": "user", "content": ""}], ""),
        ([], "first words"),
    ]:
        full, mask = tok.render(history + [{"role": "assistant", "content": answer}])
        prompt = tok.render_prompt(history)
        assert prompt + tok.encode(answer) + [tok.eos_id] == full
        assert prompt[-1] == tok.assistant_id
        assert mask == tok.render(history)[1] + [0] + [1] * (len(full) - len(prompt))


def test_render_rejects_bad_messages(tok):
    bad = [
        [{"role": "tool", "content": "x"}],
        [{"role": "user"}],
        [{"content": "x"}],
        ["just a string"],
        [{"role": "user", "content": None}],
        [{"role": "user", "content": "ok"}, {"role": "Assistant", "content": "x"}],
    ]
    for messages in bad:
        with pytest.raises(ValueError):
            tok.render(messages)
        with pytest.raises(ValueError):
            tok.render_prompt(messages)


def test_show(tok):
    ids, mask = tok.render([{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4, é"}])
    assert tok.show(ids, mask) == "<|endoftext|><|user|>2+2?<|end|><|assistant|>[[4, é<|end|>]]"
    assert tok.show(ids) == "<|endoftext|><|user|>2+2?<|end|><|assistant|>4, é<|end|>"
    with pytest.raises(ValueError):
        tok.show(ids, mask[:-1])


# -----------------------------------------------------------------------------
# save / load


def test_save_load_round_trip(tok, tmp_path):
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    state = json.loads(path.read_text(encoding="utf-8"))  # plain UTF-8 JSON, nothing to unpickle
    assert state["pattern"] == PATTERN
    assert state["special_tokens"] == {name: tok.bos_id + i for i, name in enumerate(SPECIAL_TOKENS)}
    tokens = [base64.b64decode(s) for s in state["mergeable_ranks"]]
    assert tokens[:256] == [bytes([b]) for b in range(256)]
    assert {t: r for r, t in enumerate(tokens)} == tok.enc._mergeable_ranks
    loaded = Tokenizer.load(path)
    assert loaded.vocab_size == tok.vocab_size
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    rng = random.Random(5)
    for text in SAMPLES + [english_like(20, seed=7)] + [random_text(rng, 100) for _ in range(20)]:
        assert loaded.encode(text) == tok.encode(text)
    assert loaded.render(CONVERSATION) == tok.render(CONVERSATION)


def test_load_malformed_names_the_file(tok, tmp_path):
    good = tmp_path / "good.json"
    tok.save(good)
    state = json.loads(good.read_text(encoding="utf-8"))
    n = len(state["mergeable_ranks"])

    def edited(**changes):
        return json.dumps({**state, **changes}).encode("utf-8")

    no_pad = {k: v for k, v in state["special_tokens"].items() if k != "<|pad|>"}
    cases = {
        "not_json": b"not json at all",
        "truncated": good.read_bytes()[: len(good.read_bytes()) // 2],
        "not_utf8": b"\xff\xfe{}",
        "a_list": b"[]",
        "wrong_format": edited(format="something-else"),
        "missing_ranks": json.dumps({k: v for k, v in state.items() if k != "mergeable_ranks"}).encode(),
        "bad_base64": edited(mergeable_ranks=state["mergeable_ranks"][:-1] + ["!!not base64!!"]),
        "duplicate_token": edited(mergeable_ranks=state["mergeable_ranks"][:-1] + [state["mergeable_ranks"][0]]),
        "special_collides": edited(special_tokens={**state["special_tokens"], "<|pad|>": 3}),
        "special_missing": edited(special_tokens=no_pad),
        "special_not_int": edited(special_tokens={**state["special_tokens"], "<|pad|>": str(n + 5)}),
        "bad_pattern": edited(pattern="(unclosed"),
        "chat_bos_object": edited(chat={**state["chat"], "bos": {"__reduce__": "os.system"}}),
        "chat_pad_list": edited(chat={**state["chat"], "pad": ["<|pad|>"]}),
        "chat_nfc_string": edited(chat={**state["chat"], "nfc": "yes"}),
    }
    for name, data in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_bytes(data)
        with pytest.raises(ValueError, match=re.escape(str(path))):
            Tokenizer.load(path)
    assert Tokenizer.load(good).vocab_size == tok.vocab_size


def _tokenizer_with_gaps():
    """(Tokenizer, ranks): every single byte but 0x04 and 0xF1, plus the merges "!!", "ab", " c"."""
    singles = [bytes([b]) for b in range(256) if b not in (0x04, 0xF1)]
    ranks = {t: i for i, t in enumerate(singles + [b"!!", b"ab", b" c"])}  # ids 0..256
    specials = {name: 257 + i for i, name in enumerate(SPECIAL_TOKENS)}  # <|endoftext|> 257 ... <|end|> 261
    return Tokenizer(_encoding("gaps", r" ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+", ranks, specials)), ranks


def test_bytes_missing_from_the_vocabulary_are_dropped_per_pre_token():
    """A vocabulary without some single bytes (real ones lack bytes never seen in training): the byte is removed
    from its pre-token and the rest merges as usual, as Hugging Face's BPE does (tests/test_hf_transformers.py
    checks it against transformers on the real SmolLM2 vocabulary); tiktoken itself would panic on it."""
    tok, ranks = _tokenizer_with_gaps()
    assert tok.absent == b"\x04\xf1"
    bang, ab, c = ranks[b"!!"], ranks[b"ab"], ranks[b" c"]
    # pre-tokens: "ab" | "!\x04!" | " c" -> ab | !! (the two marks merge across the dropped byte) | " c"
    assert tok.encode("ab!\x04! c") == [ab, bang, c]
    assert tok.encode("a\x04b") == [ranks[b"a"], ranks[b"b"]]  # \x04 is a pre-token of its own: gone, no merge
    assert tok.encode("\x04") == [] and tok.encode(" \x04") == [ranks[b" "]]
    # U+40000 is F1 80 80 80 in UTF-8: the lead byte goes, the three continuation bytes stay
    assert tok.encode("!" + chr(0x40000)) == [ranks[b"!"], *[ranks[b"\x80"]] * 3]
    assert tok.encode("ab! c") == tok.enc.encode("ab! c")  # text without a missing byte: tiktoken's own result
    assert tok.render([{"role": "user", "content": "!\x04!"}])[0] == [257, 259, bang, 261]


def test_a_long_pre_token_with_a_missing_byte():
    """16001 marks around one missing byte form one pre-token: what is left merges leftmost pair first into
    8000 "!!" and a last "!" (tiktoken's single-piece BPE; a pure-Python merge took 23 s at this length)."""
    tok, ranks = _tokenizer_with_gaps()
    assert tok.encode("!" * 8000 + "\x04" + "!" * 8001) == [ranks[b"!!"]] * 8000 + [ranks[b"!"]]
    # a long pre-token beside one holding a missing byte (F1 of U+40000)
    assert tok.encode("ab" * 3000 + chr(0x40000)) == [ranks[b"ab"]] * 3000 + [ranks[b"\x80"]] * 3
