"""JSONL reading and validation (file:line errors), rendering into examples, collation."""
import json

import pytest
import torch

from minipost.cli import UserError
from minipost.data import collate, conversation, encode_conversations, encode_pairs, multi_turn, read_jsonl


def write(tmp_path, lines, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return p


@pytest.mark.parametrize("row,fmt", [
    ({"text": "hello"}, "text"),
    ({"prompt": "2+2?", "completion": "4"}, "prompt_completion"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, "messages"),
    ({"prompt": "p", "chosen": "a", "rejected": "b"}, "preference"),
    ({"prompt": [{"role": "user", "content": "p"}], "answer": "3"}, "prompt"),
])
def test_formats_detected(tmp_path, row, fmt):
    rows, got, where = read_jsonl(write(tmp_path, [row, row]))
    assert got == fmt and rows == [row, row]
    assert where[1].endswith("d.jsonl:2")


@pytest.mark.parametrize("lines,message", [
    (['{"text": "a"}', '{"text": '], r"d.jsonl:2: invalid JSON"),
    (['{"txt": "a"}'], r"d.jsonl:1: unrecognised columns \['txt'\]"),
    (['[1, 2]'], r"d.jsonl:1: expected a JSON object"),
    (['{"text": "a"}', '{"prompt": "p", "completion": "c"}'], r"d.jsonl:2: row has columns"),
    (['{"text": 3}'], r"d.jsonl:1: column 'text' must be a string"),
    (['{"messages": [{"role": "user", "content": "hi"}]}'], r"d.jsonl:1: 'messages' has no assistant turn"),
    (['{"messages": [{"role": "bot", "content": "hi"}]}'], r"d.jsonl:1: messages\[0\] has role 'bot'"),
    (['{"prompt": "p", "chosen": "", "rejected": "b"}'], r"d.jsonl:1: column 'chosen' is empty"),
    ([''], r"d.jsonl: empty dataset"),
    (['{"messages": [{"role": "user"}]}'], r"d.jsonl:1: messages\[0\] must be an object with 'role' and 'content'"),
    (['{"messages": [{"role": "user", "name": "x"}]}'], r"d.jsonl:1: messages\[0\] must be an object with"),
    (['{"prompt": "p", "completion": [{"role": "assistant", "content": " "}]}'],
     r"d.jsonl:1: completion\[0\] is an assistant message with empty content"),
])
def test_bad_rows_name_file_and_line(tmp_path, lines, message):
    with pytest.raises(UserError, match=message):
        read_jsonl(write(tmp_path, lines))


def test_missing_file_and_wrong_format(tmp_path):
    with pytest.raises(UserError, match="nope.jsonl: no such file"):
        read_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(UserError, match=": is a directory, not a file"):
        read_jsonl(tmp_path)
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(UserError, match=r"latin1.jsonl:2: not UTF-8 text \(byte 13 of the line\)"):
        read_jsonl(tmp_path / "latin1.jsonl")
    with pytest.raises(UserError, match="d.jsonl:1: rows of format 'text'.*expected prompt\\+chosen\\+rejected"):
        read_jsonl(write(tmp_path, [{"text": "x"}]), expect=("preference",))


def test_prompt_files_may_end_at_a_user_turn(tmp_path):
    row = {"messages": [{"role": "user", "content": "hi"}]}
    rows, fmt, _ = read_jsonl(write(tmp_path, [row]), expect=("prompt", "messages"))
    assert fmt == "messages" and rows == [row]


def test_conversation_from_prompt_completion():
    row = {"prompt": "2+2?", "completion": "4"}
    assert conversation(row) == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    row = {"prompt": msgs, "completion": [{"role": "assistant", "content": "a"}]}
    assert conversation(row) == msgs + [{"role": "assistant", "content": "a"}]


class CharTokenizer:
    """A stand-in with the Tokenizer rendering contract: one id per character, specials 0..5."""
    bos_id, eos_id, pad_id, user_id, assistant_id = 0, 1, 2, 3, 4

    def encode(self, text):
        return [10 + ord(c) % 50 for c in text]

    def render_prompt(self, msgs):
        return self.render(msgs)[0] + [self.assistant_id]

    def render(self, msgs):
        ids, mask = [self.bos_id], [0]
        for m in msgs:
            body = self.encode(m["content"]) + [self.eos_id]
            ids += [self.user_id if m["role"] == "user" else self.assistant_id] + body
            mask += [0] + [int(m["role"] == "assistant")] * len(body)
        return ids, mask


def test_encode_conversations_drops_long_rows_with_count():
    tok = CharTokenizer()
    rows = [{"prompt": "ab", "completion": "c"}, {"prompt": "x" * 30, "completion": "y"},
            {"prompt": "x" * 5, "completion": "y" * 10}]
    examples, dropped = encode_conversations(tok, rows[::2], block_size=12)
    assert dropped == 1 and len(examples) == 1
    ids, mask = examples[0]
    # [bos] [user] a b [end] [assistant] c [end]
    assert ids == [0, 3, tok.encode("a")[0], tok.encode("b")[0], 1, 4, tok.encode("c")[0], 1]
    assert mask == [0, 0, 0, 0, 0, 0, 1, 1]
    with pytest.raises(UserError, match="f.jsonl:3: the prompt alone is 34 tokens"):  # bos, user, 30 x, end, assistant
        encode_conversations(tok, rows[1:], block_size=12, where=["f.jsonl:3"])


def test_encode_pairs():
    tok = CharTokenizer()
    pairs, dropped = encode_pairs(tok, [{"prompt": "p", "chosen": "good", "rejected": "bad"},
                                        {"prompt": "p" * 20, "chosen": "a", "rejected": "b"},
                                        {"prompt": "p", "chosen": "same", "rejected": "same"}], block_size=12)
    assert dropped == {"longer than the context": 1, "with identical chosen and rejected": 1}
    prompt, chosen, rejected = pairs[0]
    assert prompt == tok.render_prompt([{"role": "user", "content": "p"}])
    assert chosen == tok.encode("good") + [1] and rejected == tok.encode("bad") + [1]


def test_collate_right_pads():
    ids, mask = collate([([5, 6, 7], [0, 1, 1]), ([8], [1])], pad_id=2)
    assert ids.tolist() == [[5, 6, 7], [8, 2, 2]]
    assert mask.tolist() == [[0, 1, 1], [1, 0, 0]]
    assert ids.dtype == torch.long and mask.dtype == torch.float32


def test_multi_turn_joins_rows_in_cycling_group_sizes():
    turn = lambda role, text: {"role": role, "content": text}  # noqa: E731
    rows = [{"messages": [turn("system", "be brief"), turn("user", f"q{i}"), turn("assistant", f"a{i}")]}
            for i in range(4)] + [{"prompt": "q4", "completion": "a4"}, {"prompt": "q5", "completion": "a5"}]
    where = [f"f.jsonl:{i + 1}" for i in range(6)]
    out, out_where = multi_turn(rows, 3, where)
    # sizes 1, 2, 3, then the one row left: every row once, in order; a system message only where a chat opens
    assert [[m["content"] for m in r["messages"]] for r in out] == [
        ["be brief", "q0", "a0"], ["be brief", "q1", "a1", "q2", "a2"],
        ["be brief", "q3", "a3", "q4", "a4", "q5", "a5"]]
    assert out_where == ["f.jsonl:1", "f.jsonl:2", "f.jsonl:4"]
    assert multi_turn(rows, 1, where) == (rows, where)
    # every answer of a joined chat is trained: the mask covers each assistant turn and its <|end|>
    tok = CharTokenizer()
    chats, _ = multi_turn([rows[4], rows[4], rows[5]], 2)  # [q4 a4], [q4 a4 q5 a5]
    (ids, mask), = encode_conversations(tok, chats[1:], block_size=64)[0]
    q4, a4, q5, a5 = (tok.encode(t) for t in ("q4", "a4", "q5", "a5"))
    assert ids == [0, 3, *q4, 1, 4, *a4, 1, 3, *q5, 1, 4, *a5, 1]
    assert mask == [0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 1]
    with pytest.raises(UserError, match="f.jsonl:2: --turns joins chat demonstrations"):
        multi_turn([rows[0], {"text": "plain"}], 2, where[:2])
