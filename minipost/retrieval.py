"""Retrieval-augmented prompting for a frozen model: each prompt is preceded by the solved examples whose
questions are most similar to its own, as earlier chat turns (few-shot prompting with chosen examples).

Similarity is Okapi BM25 over lower-cased words (regex \\w+, so "12" is a word: the numbers of an arithmetic
word problem count). For a query q_1..q_m (repeated words count each time) and a document d of |d| words,

    score(d) = sum_i idf(q_i) * tf(q_i, d) * (k1 + 1) / (tf(q_i, d) + k1 * (1 - b + b * |d| / avgdl))
    idf(t)   = log(1 + (N - n_t + 0.5) / (n_t + 0.5))        k1 = 1.5, b = 0.75

with N documents, n_t of them containing t and avgdl their mean length. The k best examples are returned,
equal scores in index order; a zero score still ranks (an unrelated example still shows the answer format).
An example whose question equals the query's (whitespace stripped) is never returned, so retrieving from
the split being evaluated cannot hand the model its own answer.

The model must know the shape of such a prompt: answers late in the context, after solved turns. A small model
tuned only on one-turn chats (absolute position embeddings never trained on the format past its first ~70
tokens) answers a few-shot prompt in no format at all (format 0.00 with one example on 48 arith test prompts, 1.00
without retrieval); tuned on chats of 1-3 problems (train_sft.py --turns 3) it keeps the format (0.88-0.98).
pipeline.py's arith warm-up is tuned that way; SFT on one-turn chats after it unlearns it again (0.12).

    python -m minipost.evaluate --init out/sft-arith --task arith --retrieve 2     # examples from train
    python sample_bon.py --init out/sft-arith --retrieve 2 --retrieve-from demos.jsonl --out out/bon-rag
"""
import math
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from .cli import UserError
from .data import as_messages, conversation, read_jsonl

K1, B = 1.5, 0.75
_WORD_RE = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """Lower-cased \\w+ runs: letters, digits and underscores."""
    return _WORD_RE.findall(text.lower())


class Retriever:
    """BM25 over the questions of solved examples [(question, answer)], as an inverted index: for each
    word, the documents holding it and the word's whole BM25 term there (a query only adds them up)."""

    def __init__(self, demos: list[tuple[str, str]], k1: float = K1, b: float = B):
        self.demos = list(demos)
        counts = [Counter(words(q)) for q, _ in self.demos]
        N = len(counts)
        lengths = np.array([sum(c.values()) for c in counts], dtype=np.float64)  # (N,)
        avgdl = lengths.mean() if N else 0.0
        avgdl = avgdl or 1.0  # every document empty: no word has postings, so the ratio is never used
        docs_of, tf_of = defaultdict(list), defaultdict(list)
        for i, c in enumerate(counts):
            for word, tf in c.items():
                docs_of[word].append(i)
                tf_of[word].append(tf)
        self.postings = {}  # word -> (doc indices (n_t,) int, BM25 term in each (n_t,) float64)
        for word, docs in docs_of.items():
            docs, tf = np.array(docs), np.array(tf_of[word], dtype=np.float64)
            idf = math.log(1 + (N - len(docs) + 0.5) / (len(docs) + 0.5))
            norm = k1 * (1 - b + b * lengths[docs] / avgdl)  # (n_t,)
            self.postings[word] = (docs, idf * tf * (k1 + 1) / (tf + norm))
        self.by_question = defaultdict(list)  # stripped question -> indices: what a query must not retrieve
        for i, (q, _) in enumerate(self.demos):
            self.by_question[q.strip()].append(i)

    def __len__(self):
        return len(self.demos)

    def scores(self, query: str) -> np.ndarray:
        """(N,) BM25 score of every example's question for the query."""
        out = np.zeros(len(self.demos))
        for word in words(query):
            if word in self.postings:
                docs, terms = self.postings[word]
                out[docs] += terms  # a word's documents are distinct: no lost updates
        return out

    def nearest(self, question: str, k: int) -> list[int]:
        """Indices of the (at most) k highest-scoring examples, most similar first; equal scores: lower index
        first. Examples whose question is the query's own text are left out."""
        keep = np.ones(len(self.demos), dtype=bool)
        keep[self.by_question.get(question.strip(), [])] = False
        candidates = np.flatnonzero(keep)  # (M,) ascending, so a stable sort breaks ties by index
        order = np.argsort(-self.scores(question)[candidates], kind="stable")
        return candidates[order[:k]].tolist()


# ------------------------------------------------------------------------------------------ prompts


def fits_context(tokenizer, block_size: int, max_new_tokens: int):
    """messages -> True when the rendered prompt leaves max_new_tokens of room in the model's context."""
    return lambda messages: len(tokenizer.render_prompt(messages)) + max_new_tokens <= block_size


def augment(rows: list[dict], retriever: Retriever, k: int, fits=None) -> tuple[list[dict], int]:
    """Prompt rows {"prompt": str | messages, **extra} -> (rows with the k nearest examples as earlier turns,
    how many rows got fewer than k).

    The new prompt is [user q1, assistant a1, ..., user qk, assistant ak] + the row's own messages (after any
    leading system messages), the most similar example last, next to the question. The query is the row's
    last user turn. With fits (see fits_context), the least similar examples are dropped until the prompt
    fits; a question that does not fit even alone is left as it was, for the script's own check. Extra
    columns (e.g. arith's answer, which the reward reads) are kept.
    """
    out, short = [], 0
    for row in rows:
        messages = as_messages(row["prompt"], "user")
        question = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        shots = retriever.nearest(question, k)[::-1]  # least similar first: the first to go
        prompt = with_examples(messages, retriever, shots)
        while shots and fits is not None and not fits(prompt):
            shots = shots[1:]
            prompt = with_examples(messages, retriever, shots)
        short += len(shots) < k
        out.append({**row, "prompt": prompt if shots else row["prompt"]})
    return out, short


def with_examples(messages: list[dict], retriever: Retriever, shots: list[int]) -> list[dict]:
    """messages with the examples `shots` (in that order) as user/assistant turns after any system messages."""
    head = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
    examples = []
    for i in shots:
        question, answer = retriever.demos[i]
        examples += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return messages[:head] + examples + messages[head:]


# ------------------------------------------------------------------------------------------ sources


def load_demos(source: str, task, pool: int) -> list[tuple[str, str]]:
    """Solved examples [(question, answer)] from --retrieve-from: a split of the task (its first `pool`
    demonstrations, seed 0) or a JSONL file of demonstrations (messages, or prompt + completion), whose first
    user turn is the question and first assistant turn the answer. Write ./train for a file named like a split."""
    if source in task.splits:
        rows, where = task.demos(source, pool, seed=0), None
    elif Path(source).is_file():
        try:
            rows, _, where = read_jsonl(source, expect=("messages", "prompt_completion"))
        except UserError as e:
            raise UserError(f"--retrieve-from {e}") from None
    else:
        raise UserError(f"--retrieve-from {source}: no such file, and not a split of task '{task.name}' "
                        f"({', '.join(task.splits)})")
    demos = []
    for i, row in enumerate(rows):
        turns = conversation(row)
        question = next((m["content"] for m in turns if m["role"] == "user"), None)
        answer = next((m["content"] for m in turns if m["role"] == "assistant"), None)
        if question is None or answer is None:
            at = where[i] if where else f"{source} row {i + 1}"
            raise UserError(f"--retrieve-from {at}: a demonstration needs a user turn and an assistant turn")
        demos.append((question, answer))
    if not demos:  # --retrieve-pool 0 from a caller that did not check it
        raise UserError(f"--retrieve-from {source}: no demonstrations to retrieve from")
    return demos


# ------------------------------------------------------------------------------------ the scripts' flags

def add_retrieval_flags(p):
    """--retrieve, --retrieve-from, --retrieve-pool: shared by python -m minipost.evaluate and sample_bon.py."""
    p.add_argument("--retrieve", type=int, default=0, metavar="K", help="precede every prompt with its K most "
                   "similar solved examples (BM25 over their questions, minipost/retrieval.py) as earlier turns; "
                   "0: none")
    p.add_argument("--retrieve-from", default="train", metavar="SPLIT|FILE", help="the examples: a split of --task "
                   "or a JSONL file of demonstrations (messages, or prompt + completion)")
    p.add_argument("--retrieve-pool", type=int, default=4000, metavar="N", help="examples taken from a "
                   "--retrieve-from split")


def check_retrieval_flags(args):
    if args.retrieve < 0:
        raise UserError("--retrieve must be >= 0 (0: no retrieval)")
    if args.retrieve_pool < 1:
        raise UserError("--retrieve-pool must be >= 1")


def retrieval_prompts(args, task, tokenizer, block_size, splits: dict) -> tuple[dict, int]:
    """Every list of prompt rows in `splits` augmented with --retrieve examples (as many as fit beside
    --max-new-tokens) -> (the augmented splits, how many prompts got fewer than K); one line on stderr."""
    retriever = Retriever(load_demos(args.retrieve_from, task, args.retrieve_pool))
    fits = fits_context(tokenizer, block_size, args.max_new_tokens)
    out, short = {}, 0
    for name, rows in splits.items():
        out[name], n = augment(rows, retriever, args.retrieve, fits)
        short += n
    print(f"retrieval: {short} of {sum(len(r) for r in out.values())} prompts got fewer than {args.retrieve} "
          f"examples (context {block_size} tokens, response budget {args.max_new_tokens})", file=sys.stderr)
    return out, short
