"""JSONL datasets in the TRL column conventions, validated row by row, and collation into padded batches.

Accepted rows (one JSON object per line; extra columns are kept and passed along, e.g. to reward functions):
    {"text": str}                                            raw text (pretraining)
    {"prompt": str|messages, "completion": str|messages}     demonstrations
    {"messages": [{"role", "content"}, ...]}                 conversations
    {"prompt": ..., "chosen": ..., "rejected": ...}          preference pairs
    {"prompt": ...}                                          prompts only (RL rollouts, best-of-N)
Every problem is reported as `FILE:LINE: what is wrong`, through cli.UserError (exit code 2).
"""
import json
from pathlib import Path

import torch

from .cli import UserError

FORMATS = {  # format name -> required columns
    "preference": ("prompt", "chosen", "rejected"),
    "prompt_completion": ("prompt", "completion"),
    "messages": ("messages",),
    "text": ("text",),
    "prompt": ("prompt",),
}
ROLES = ("system", "user", "assistant")


def read_jsonl(path, expect: tuple[str, ...] | None = None) -> tuple[list[dict], str, list[str]]:
    """Read and validate a JSONL file -> (rows, format, where) with where[i] = "FILE:LINE" of rows[i].
    `expect` restricts the formats a script accepts."""
    path = existing_file(path)
    rows, fmt, wheres = [], None, []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{where}: not UTF-8 text (byte {e.start} of the line)")
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: invalid JSON ({e.msg} at column {e.colno})")
            if not isinstance(row, dict):
                raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
            row_fmt = detect_format(row, where)
            if fmt is None:
                fmt = row_fmt
                if expect is not None and fmt not in expect:
                    raise UserError(f"{where}: rows of format '{fmt}' (columns {sorted(row)}) cannot be used here; "
                                    f"expected {' or '.join(_describe(e) for e in expect)}")
            elif row_fmt != fmt:
                raise UserError(f"{where}: row has columns {sorted(row)} but earlier rows are '{fmt}' "
                                f"({_describe(fmt)})")
            validate_row(row, fmt, where, prompts_only=expect is not None and "prompt" in expect)
            rows.append(row)
            wheres.append(where)
    if not rows:
        raise UserError(f"{path}: empty dataset (no rows)")
    return rows, fmt, wheres


def existing_file(path, flag=None) -> Path:
    """The path of an input file, or a UserError saying what is there instead (nothing, a directory)."""
    path = Path(path)
    where = f"{flag} {path}" if flag else str(path)
    if path.is_dir():
        raise UserError(f"{where}: is a directory, not a file")
    if not path.is_file():
        raise UserError(f"{where}: no such file")
    return path


def _describe(fmt):
    return "+".join(FORMATS[fmt])


def detect_format(row: dict, where: str) -> str:
    for fmt, cols in FORMATS.items():  # ordered from most to least specific
        if all(c in row for c in cols):
            return fmt
    raise UserError(f"{where}: unrecognised columns {sorted(row)}; expected one of "
                    + ", ".join(_describe(f) for f in FORMATS))


def validate_row(row: dict, fmt: str, where: str, prompts_only=False):
    """Check one row of a known format; `prompts_only`: a conversation may end at a user turn."""
    if fmt == "text":
        _check_str(row["text"], "text", where)
    elif fmt == "messages":
        _check_messages(row["messages"], "messages", where)
        if not prompts_only and not any(m["role"] == "assistant" for m in row["messages"]):
            raise UserError(f"{where}: 'messages' has no assistant turn to learn from")
    else:
        for col in FORMATS[fmt]:
            value = row[col]
            if isinstance(value, list):
                _check_messages(value, col, where)
            else:
                _check_str(value, col, where)


def _check_str(value, col, where):
    if not isinstance(value, str):
        raise UserError(f"{where}: column '{col}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise UserError(f"{where}: column '{col}' is empty")


def _check_messages(msgs, col, where):
    if not isinstance(msgs, list) or not msgs:
        raise UserError(f"{where}: column '{col}' must be a non-empty list of {{role, content}} messages")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not {"role", "content"} <= set(m):
            raise UserError(f"{where}: {col}[{i}] must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise UserError(f"{where}: {col}[{i}] has role {m['role']!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise UserError(f"{where}: {col}[{i}].content must be a string")
        if m["role"] == "assistant" and not m["content"].strip():  # nothing to learn, or to prefer
            raise UserError(f"{where}: {col}[{i}] is an assistant message with empty content")


def as_messages(value, role: str) -> list[dict]:
    """A TRL column that is either a plain string (one message of `role`) or already a message list."""
    return [{"role": role, "content": value}] if isinstance(value, str) else list(value)


def conversation(row: dict) -> list[dict]:
    """The full conversation of a demonstration row (messages, or prompt + completion)."""
    if "messages" in row:
        return row["messages"]
    return as_messages(row["prompt"], "user") + as_messages(row["completion"], "assistant")


def multi_turn(rows, turns: int, where=None):
    """Demonstrations -> longer chats: consecutive rows joined into one conversation of 1, 2, ..., turns rows (the
    sizes cycle, so every row is used once and the conversations are the same on every run), each row's
    user/assistant turns after the previous row's; a system message is kept only where a conversation opens.
    SFT on them trains every answer, including answers late in the context and after earlier solved turns,
    which is what a few-shot or retrieval prompt (minipost/retrieval.py) puts before the question; a model
    tuned only on one-turn chats has never produced the format there. -> (rows, where of each first row)."""
    if turns == 1:
        return rows, where
    out, out_where, i, size = [], [], 0, 1
    while i < len(rows):
        group = rows[i:i + size]
        messages = []
        for j, row in enumerate(group):
            if "text" in row:
                at = where[i + j] if where else f"row {i + j + 1}"
                raise UserError(f"{at}: --turns joins chat demonstrations (messages, or prompt + completion); "
                                "a text row has no turns")
            turns_of_row = conversation(row)
            messages += turns_of_row if not messages else [m for m in turns_of_row if m["role"] != "system"]
        out.append({"messages": messages})
        out_where.append(where[i] if where else None)
        i, size = i + len(group), size % turns + 1
    return out, (out_where if where else None)


def encode_conversations(tokenizer, rows, block_size: int, where=None):
    """Render demonstrations -> (examples [(ids, mask)], n_dropped). `text` rows train on every token.

    Rows longer than block_size are dropped, not truncated: a cut-off answer would teach the model to stop
    mid-sentence without EOS. A row whose prompt alone (everything before the first trained token) does
    not fit is an error, reported at where[i] ("FILE:LINE"), since no part of it could ever be learned.
    """
    examples, dropped = [], 0
    for i, row in enumerate(rows):
        if "text" in row:
            ids = [tokenizer.bos_id] + tokenizer.encode(row["text"])
            mask = [0] + [1] * (len(ids) - 1)
        else:
            ids, mask = tokenizer.render(conversation(row))
        if len(ids) > block_size:
            if mask.index(1) >= block_size:
                at = where[i] if where else f"row {i + 1}"
                raise UserError(f"{at}: the prompt alone is {mask.index(1)} tokens, longer than the model's "
                                f"context of {block_size}")
            dropped += 1
            continue
        examples.append((ids, mask))
    return examples, dropped


def encode_pairs(tokenizer, rows, block_size: int):
    """Preference rows -> ([(prompt_ids, chosen_ids, rejected_ids)], {reason: rows dropped}). Responses end
    with EOS. Dropped: pairs longer than block_size, and pairs whose two responses are the same tokens (no
    preference to learn: DPO's loss would sit at log 2 and a reward model's at chance)."""
    pairs, dropped = [], {"longer than the context": 0, "with identical chosen and rejected": 0}
    for row in rows:
        prompt = tokenizer.render_prompt(as_messages(row["prompt"], "user"))
        responses = []
        for col in ("chosen", "rejected"):
            msgs = as_messages(row[col], "assistant")
            responses.append(tokenizer.encode(msgs[-1]["content"]) + [tokenizer.eos_id])
        if len(prompt) + max(len(r) for r in responses) > block_size:
            dropped["longer than the context"] += 1
        elif responses[0] == responses[1]:
            dropped["with identical chosen and rejected"] += 1
        else:
            pairs.append((prompt, *responses))
    return pairs, dropped


def epoch_indices(step: int, size: int, n: int, seed: int) -> list[int]:
    """Row indices of a step's batch: epochs are permutations seeded by (seed, epoch), so the position in
    the data is a function of the step (no loader state to save)."""
    out = []
    for k in range(step * size, (step + 1) * size):
        epoch, i = divmod(k, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        out.append(int(perm[i]))
    return out


def collate(examples, pad_id: int, device="cpu"):
    """Right-pad [(ids, mask)] -> ids (B, T) long, mask (B, T) float, where T is the longest example.

    For next-token losses use inputs ids[:, :-1], targets ids[:, 1:], mask[:, 1:] (the mask marks the
    token being predicted). Padding has mask 0, so it never enters a loss.
    """
    T = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.float32)
    for i, (seq, m) in enumerate(examples):
        ids[i, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[i, :len(m)] = torch.tensor(m, dtype=torch.float32)
    return ids.to(device), mask.to(device)
