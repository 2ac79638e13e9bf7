"""minipost/retrieval.py and the --retrieve flags of minipost.evaluate and sample_bon.py: BM25 against a hand
computation, neighbours known by construction, no self-retrieval, deterministic ties, the prompt layout, the
context budget, the demonstration sources, both scripts end to end, and bad input.

The checkpoint is a tiny arith base + SFT model trained for two steps each (its samples are gibberish, which
is all the plumbing needs), with a context of 256 so that retrieved examples fit.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import sample_bon
import train_base
import train_sft
from minipost import evaluate
from minipost.checkpoint import load_checkpoint
from minipost.cli import UserError
from minipost.retrieval import Retriever, augment, fits_context, load_demos, words
from minipost.tasks import get_task
from minipost.tokenizer import train_bpe

ROOT = Path(__file__).resolve().parent.parent

# neighbours by construction: each document has a rare word or two of its own
DOCS = ["Mia has apples and buys more apples",
        "The bus has people and more people get on",
        "A bakery bakes muffins and sells muffins",
        "Birds land in a tree and fly away",
        "Leo has marbles and loses marbles",
        "The bakery sells pies to a school"]


def retriever_of(questions):
    return Retriever([(q, f"answer {i}") for i, q in enumerate(questions)])


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


@pytest.fixture(scope="module")
def tok():
    return train_bpe(get_task("arith").corpus(200, seed=0), vocab_size=320)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny arith SFT checkpoint with a 256-token context (about 3 s)."""
    root = tmp_path_factory.mktemp("retrieval")
    train_base.main(["--task", "arith", "--corpus-docs", "200", "--vocab-size", "320", "--block-size", "256",
                     "--batch-size", "4", "--eval-batches", "1", "--max-steps", "2", "--warmup", "1",
                     "--eval-every", "2", "--ckpt-every", "2", "--out", str(root / "base")])
    train_sft.main(["--init", str(root / "base"), "--n-train", "16", "--n-eval", "1", "--max-new-tokens", "2",
                    "--max-steps", "2", "--batch-size", "4", "--warmup", "1", "--eval-every", "2",
                    "--ckpt-every", "2", "--out", str(root / "sft")])
    return root / "sft"


def run(*argv):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)


# -----------------------------------------------------------------------------------------------------------
# BM25


def test_words_are_lower_cased_and_numbers_count():
    assert words("Mia has 12 Apples. She buys 7 more!") == ["mia", "has", "12", "apples", "she", "buys", "7", "more"]


def test_nearest_shares_the_rare_words():
    r = retriever_of(DOCS)
    # "muffins" (one document) beats "bakery" (two) beats "the" (two, and nothing else shared)
    assert r.nearest("How many muffins does the bakery bake?", 3) == [2, 5, 1]
    assert r.nearest("Leo loses his marbles", 1) == [4]
    assert r.nearest("birds in a tree", 1) == [3]
    # numbers are words: the problem with the same number is the nearer one
    r = retriever_of(["Sam has 13 coins.", "Sam has 12 coins.", "Sam has 14 coins."])
    assert r.nearest("Sam has 12 coins. How many coins does Sam have?", 1) == [1]


def test_bm25_score_by_hand():
    r = retriever_of(["the cat sat", "the dog sat on the mat", "a cat and a cat"])
    k1, b, N, avgdl = 1.5, 0.75, 3, (3 + 6 + 5) / 3
    idf_cat = math.log(1 + (N - 2 + 0.5) / (2 + 0.5))  # "cat" is in documents 0 and 2
    idf_mat = math.log(1 + (N - 1 + 0.5) / (1 + 0.5))  # "mat" only in document 1

    def term(idf, tf, length):
        return idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * length / avgdl))

    want = [term(idf_cat, 1, 3), term(idf_mat, 1, 6), term(idf_cat, 2, 5)]
    assert r.scores("cat mat").tolist() == pytest.approx(want, rel=1e-12)
    # each query word counts each time it occurs; unknown words add nothing
    assert r.scores("cat cat zebra").tolist() == pytest.approx([2 * want[0], 0.0, 2 * term(idf_cat, 2, 5)], rel=1e-12)


def test_query_never_retrieves_its_own_question():
    q = "Mia has 12 apples. She buys 7 more. How many apples does Mia have now?"
    questions = ["Leo has 3 cards.", q, "  " + q + "\n", q.replace("12", "13"), q + " Think.", "Birds fly."]
    r = retriever_of(questions)
    got = r.nearest(q, 6)
    assert 1 not in got and 2 not in got  # the question itself, also with other whitespace around it
    assert set(got[:2]) == {3, 4} and len(got) == 4  # its near-duplicates are fair game
    assert r.nearest("  " + q, 6) == got
    rows, short = augment([{"prompt": q, "answer": "19"}], r, 6)
    assert short == 1  # only four examples are left to give
    assert [m["content"] for m in rows[0]["prompt"][:-1:2]] == [questions[i] for i in reversed(got)]


def test_ties_break_by_lower_index_and_repeat():
    questions = ["red apple", "green pear", "red apple", "red apple", "blue plum"]
    r = retriever_of(questions)
    assert r.nearest("a red apple", 3) == [0, 2, 3]  # equal scores
    assert r.nearest("zebra", 5) == [0, 1, 2, 3, 4]  # all zero: index order
    assert r.nearest("pear or plum", 5) == [1, 4, 0, 2, 3]  # equal idf and length for pear and plum
    assert retriever_of(questions).nearest("a red apple", 3) == r.nearest("a red apple", 3)
    assert r.nearest("a red apple", 99) == [0, 2, 3, 1, 4]  # k beyond the pool: all of it


# -----------------------------------------------------------------------------------------------------------
# prompts


def test_augment_puts_the_nearest_example_last_and_keeps_columns():
    r = retriever_of(DOCS)
    row = {"prompt": "How many muffins does the bakery bake?", "answer": "7", "id": 3}
    (out,), short = augment([row], r, 2)
    assert short == 0
    assert out["prompt"] == [user(DOCS[5]), assistant("answer 5"), user(DOCS[2]), assistant("answer 2"),
                             user(row["prompt"])]
    assert out["answer"] == "7" and out["id"] == 3 and row["prompt"] == "How many muffins does the bakery bake?"
    # a message-list prompt: system messages stay first; the query is the last user turn
    system = {"role": "system", "content": "Be brief."}
    (out,), _ = augment([{"prompt": [system, user("Leo loses his marbles")]}], r, 1)
    assert out["prompt"] == [system, user(DOCS[4]), assistant("answer 4"), user("Leo loses his marbles")]
    # k = 0 examples: the prompt is left as it was
    assert augment([row], r, 0) == ([row], 0)


def test_budget_drops_the_least_similar_examples_first(tok):
    task = get_task("arith")
    r = Retriever([(d["messages"][0]["content"], d["messages"][1]["content"]) for d in task.demos("train", 300)])
    row = task.prompts("test", 1, seed=0)[0]
    (full,), _ = augment([row], r, 3)
    length = [len(tok.render_prompt(full["prompt"][2 * (3 - m):])) for m in range(4)]  # with the m nearest
    assert length == sorted(length) and len(set(length)) == 4
    max_new = 8
    (two,), short = augment([row], r, 3, fits_context(tok, length[2] + max_new, max_new))
    assert two["prompt"] == full["prompt"][2:] and short == 1  # the least similar went, the nearest stayed last
    (one,), _ = augment([row], r, 3, fits_context(tok, length[2] + max_new - 1, max_new))
    assert one["prompt"] == full["prompt"][4:]
    (all3,), short = augment([row], r, 3, fits_context(tok, length[3] + max_new, max_new))
    assert all3 == full and short == 0
    # not even the bare question fits: left as it was, for the script's own check
    (bare,), short = augment([row], r, 3, fits_context(tok, length[0], max_new))
    assert bare == row and short == 1


# -----------------------------------------------------------------------------------------------------------
# sources


def test_load_demos_from_a_split_or_a_file(tmp_path):
    task = get_task("arith")
    demos = load_demos("train", task, 50)
    first = task.demos("train", 1, seed=0)[0]["messages"]
    assert len(demos) == 50 and demos[0] == (first[0]["content"], first[1]["content"])

    msgs = tmp_path / "messages.jsonl"
    msgs.write_text(json.dumps({"messages": [{"role": "system", "content": "s"}, user("q1"), assistant("a1"),
                                             user("q2"), assistant("a2")]}) + "\n")
    assert load_demos(str(msgs), task, 50) == [("q1", "a1")]  # the first exchange
    pc = tmp_path / "pc.jsonl"
    pc.write_text(json.dumps({"prompt": "q", "completion": "a", "answer": "1"}) + "\n")
    assert load_demos(str(pc), task, 50) == [("q", "a")]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "completion": "a"}) + "\n{oops\n")
    with pytest.raises(UserError, match=r"--retrieve-from .*bad.jsonl:2: invalid JSON"):
        load_demos(str(bad), task, 50)
    prompts_only = tmp_path / "prompts.jsonl"
    prompts_only.write_text(json.dumps({"prompt": "q"}) + "\n")
    with pytest.raises(UserError, match=r"prompts.jsonl:1: rows of format 'prompt'"):
        load_demos(str(prompts_only), task, 50)
    with pytest.raises(UserError, match=r"--retrieve-from nope: no such file, and not a split of task 'arith'"):
        load_demos("nope", task, 50)
    with pytest.raises(UserError, match=r"--retrieve-from train: no demonstrations"):
        load_demos("train", task, 0)


# -----------------------------------------------------------------------------------------------------------
# the scripts


def test_evaluate_with_retrieval(ckpt, tmp_path, monkeypatch):
    out = tmp_path / "eval.json"
    r = run("-m", "minipost.evaluate", "--init", str(ckpt), "--task", "arith", "--retrieve", "2", "--n-eval", "4",
            "--k", "1", "--max-new-tokens", "8", "--device", "cpu", "--out", str(out))
    assert r.returncode == 0, r.stderr
    row = json.loads(out.read_text())
    assert row["retrieve"] == 2 and row["retrieve_from"] == "train" and 0 <= row["retrieve_short"] <= 8
    assert f"retrieval: {row['retrieve_short']} of 8 prompts got fewer than 2 examples" in r.stderr
    assert len(row["test_rewards"]) == 4 and len(row["ood_rewards"]) == 4

    # in process: every split's prompts, and the KL's, are the augmented ones
    seen = {}
    policy = evaluate.evaluate_policy
    kl = evaluate.sample_kl
    monkeypatch.setattr(evaluate, "evaluate_policy", lambda m, t, task, rows, *a, **k: (
        seen.setdefault("eval", []).append(rows), policy(m, t, task, rows, *a, **k))[1])
    monkeypatch.setattr(evaluate, "sample_kl", lambda p, ref, t, rows, *a, **k: (
        seen.setdefault("kl", []).append(rows), kl(p, ref, t, rows, *a, **k))[1])
    common = ["--init", str(ckpt), "--task", "arith", "--n-eval", "2", "--k", "1", "--max-new-tokens", "4",
              "--device", "cpu"]
    evaluate.main(common + ["--retrieve", "1", "--out", str(tmp_path / "one.json")])
    assert len(seen["eval"]) == 2 and all(len(row["prompt"]) == 3 for rows in seen["eval"] for row in rows)
    assert seen["kl"] == [seen["eval"][0]]  # the test split, augmented the same way
    # --validation-from: the val split (train problems 16, 17) is augmented too, never with its own problem,
    # which the train pool holds
    seen.clear()
    evaluate.main(common + ["--retrieve", "1", "--validation-from", "16", "--out", str(tmp_path / "val.json")])
    val = seen["eval"][2]
    assert [r["prompt"][-1] for r in val] == [r["prompt"][0] for r in get_task("arith").prompts("train", 18)[16:]]
    assert all(len(r["prompt"]) == 3 and r["prompt"][0]["content"] != r["prompt"][2]["content"] for r in val)
    assert len(json.loads((tmp_path / "val.json").read_text())["val_rewards"]) == 2
    # --retrieve 0 (the default): the row has no retrieval keys and the prompts are the task's own
    seen.clear()
    evaluate.main(common + ["--out", str(tmp_path / "zero.json")])
    assert not any(key.startswith("retrieve") for key in json.loads((tmp_path / "zero.json").read_text()))
    assert seen["eval"][0] == get_task("arith").prompts("test", 2, seed=1)


def test_sample_bon_with_retrieval(ckpt, tmp_path):
    out = tmp_path / "bon"
    r = run("sample_bon.py", "--init", str(ckpt), "--retrieve", "2", "--n", "2", "--n-prompts", "3",
            "--max-new-tokens", "8", "--device", "cpu", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "retrieval: " in r.stderr and "of 3 prompts got fewer than 2 examples" in r.stderr
    recs = [json.loads(line) for line in (out / "bon.jsonl").read_text().splitlines()]
    rows = get_task("arith").prompts("test", 3, seed=0)
    demos = dict(load_demos("train", get_task("arith"), 4000))
    for rec, row in zip(recs, rows, strict=True):
        assert [m["role"] for m in rec["prompt"]] == ["user", "assistant"] * 2 + ["user"]
        assert rec["prompt"][-1] == row["prompt"][0] and rec["answer"] == row["answer"]
        assert all(demos[q["content"]] == a["content"] for q, a in zip(rec["prompt"][:-1:2], rec["prompt"][1::2]))


def test_sample_bon_sweep_with_retrieval(ckpt, tmp_path):
    """In process: the sweep's pool is drawn from the augmented prompts, and its rows say so."""
    out = tmp_path / "sweep"
    sample_bon.main(["--init", str(ckpt), "--retrieve", "1", "--sweep", "1,2", "--n-prompts", "2",
                     "--time-prompts", "1", "--max-new-tokens", "4", "--keep-all", "--device", "cpu",
                     "--out", str(out)])
    rows = [json.loads(line) for line in (out / "sweep.jsonl").read_text().splitlines()]
    assert [r["n"] for r in rows] == [1, 2] and all(r["retrieve"] == 1 for r in rows)
    pool = [json.loads(line) for line in (out / "pool.jsonl").read_text().splitlines()]
    assert [len(p["prompt"]) for p in pool] == [3, 3]

    # and the plain sampler samples from exactly the augmented prompt ids
    task, ck = get_task("arith"), load_checkpoint(ckpt, "cpu")
    sample_bon.main(["--init", str(ckpt), "--retrieve", "1", "--n", "1", "--n-prompts", "2", "--seed", "5",
                     "--max-new-tokens", "6", "--device", "cpu", "--out", str(out)])
    rows, _ = augment(task.prompts("test", 2, seed=0), Retriever(load_demos("train", task, 4000)), 1,
                      fits_context(ck.tokenizer, ck.model.config.block_size, 6))
    want = evaluate.sample_completions(ck.model.eval(), ck.tokenizer, rows, 6, temperature=1.0, seed=5)
    recs = [json.loads(line) for line in (out / "bon.jsonl").read_text().splitlines()]
    assert [r["completion"] for r in recs] == want and [r["prompt"] for r in recs] == [r["prompt"] for r in rows]


@pytest.mark.parametrize("script", ["evaluate", "sample_bon"])
@pytest.mark.parametrize("flags, message", [
    (["--retrieve", "-1"], "error: --retrieve must be >= 0 (0: no retrieval)"),
    (["--retrieve", "2", "--retrieve-from", "EMPTY"], "error: --retrieve-from {EMPTY}: empty dataset (no rows)"),
])
def test_bad_retrieval_flags_exit_2(ckpt, tmp_path, script, flags, message):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    flags = [str(empty) if f == "EMPTY" else f for f in flags]
    argv = (["-m", "minipost.evaluate", "--task", "arith"] if script == "evaluate" else ["sample_bon.py"])
    r = run(*argv, "--init", str(ckpt), "--device", "cpu", *flags)
    assert r.returncode == 2
    assert r.stderr.splitlines() == [message.format(EMPTY=empty)], r.stderr


def test_retrieve_pool_must_be_positive(ckpt):
    with pytest.raises(UserError, match=r"^--retrieve-pool must be >= 1$"):
        evaluate.main(["--init", str(ckpt), "--task", "arith", "--retrieve", "2", "--retrieve-pool", "0"])
    with pytest.raises(UserError, match=r"^--retrieve-pool must be >= 1$"):
        sample_bon.parse_args(["--init", str(ckpt), "--retrieve", "2", "--retrieve-pool", "0"])
