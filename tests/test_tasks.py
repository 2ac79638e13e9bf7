"""Built-in tasks: determinism, splits, arithmetic correctness checked by an independent solver, the verifier,
hand-computed sentiment scores, and corpora free of chat format."""
import math
import operator
import re
import statistics

import pytest

from minipost.tasks import (INTENSIFIERS, LEXICON, MAX_VALUE, NEGATORS, TASKS, ArithTask, SentimentTask, arith_reward,
                            get_task, sentiment_reward, sentiment_score)

STEP_RE = re.compile(r"(\d+) ([-+*]) (\d+) = (\d+)\.")
OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def _user(row):
    return (row["messages"] if "messages" in row else row["prompt"])[0]["content"]


def _assistant(row):
    return row["messages"][1]["content"]


def solve(question: str) -> tuple[int, int]:
    """Naive independent solver of an arith question -> (answer, number of steps).

    The first clause sets the quantity (a product when it holds two numbers); each later clause holding a
    number adds it when the clause says "more", else subtracts it.
    """
    value, steps = None, 0
    for sentence in re.split(r"(?<=[.?])\s+", question):
        if sentence.endswith("?"):
            continue
        for clause in sentence.rstrip(".").split(" and "):
            nums = [int(x) for x in re.findall(r"\d+", clause)]
            if not nums:
                continue
            if value is None:
                assert len(nums) in (1, 2), clause
                value, steps = (nums[0] * nums[1], 1) if len(nums) == 2 else (nums[0], 0)
            else:
                assert len(nums) == 1, clause
                value = value + nums[0] if "more" in clause else value - nums[0]
                steps += 1
    return value, steps


# ---------------------------------------------------------------------------------------------------- general

def test_get_task_and_unknown_name():
    assert TASKS == ("arith", "sentiment")
    assert isinstance(get_task("arith"), ArithTask) and get_task("arith").splits == ("train", "test", "ood")
    assert isinstance(get_task("sentiment"), SentimentTask) and get_task("sentiment").splits == ("train", "test")
    with pytest.raises(ValueError) as e:
        get_task("x")
    assert str(e.value) == "unknown task 'x' (choose from arith, sentiment)"
    with pytest.raises(ValueError, match="no split 'ood'"):
        get_task("sentiment").demos("ood", 3)


@pytest.mark.parametrize("name", TASKS)
def test_deterministic_in_seed(name):
    task = get_task(name)
    for split in task.splits:
        assert task.demos(split, 50, seed=3) == task.demos(split, 50, seed=3)
        assert task.demos(split, 50, seed=3) != task.demos(split, 50, seed=4)
        assert task.prompts(split, 50, seed=3) == task.prompts(split, 50, seed=3)
        assert task.prompts(split, 50, seed=3) != task.prompts(split, 50, seed=4)
    assert task.corpus(50, seed=3) == task.corpus(50, seed=3)
    assert task.corpus(50, seed=3) != task.corpus(50, seed=4)
    # a larger request starts with the smaller one (one stream per split and seed)
    assert task.demos("train", 80, seed=3)[:50] == task.demos("train", 50, seed=3)


@pytest.mark.parametrize("name", TASKS)
def test_prompts_are_the_demos_problems(name):
    task = get_task(name)
    for split in task.splits:
        demos, prompts = task.demos(split, 200, seed=1), task.prompts(split, 200, seed=1)
        assert len(demos) == len(prompts) == 200
        for d, p in zip(demos, prompts):
            assert [m["role"] for m in d["messages"]] == ["user", "assistant"]
            assert [m["role"] for m in p["prompt"]] == ["user"]
            assert _user(d) == _user(p)
            # the same extra columns, but for arith's "steps", which only prompt rows carry
            assert {k: v for k, v in d.items() if k != "messages"} == \
                {k: v for k, v in p.items() if k not in ("prompt", "steps")}


@pytest.mark.parametrize("name", TASKS)
def test_rewards_are_float_lists(name):
    task = get_task(name)
    prompts = task.prompts("test", 7)
    completions = [_assistant(d) for d in task.demos("test", 7)]
    extra = {"answer": [p["answer"] for p in prompts]} if name == "arith" else {}
    fn = arith_reward if name == "arith" else sentiment_reward
    for r in (task.reward(prompts, completions, **extra), fn(prompts, completions, **extra)):
        assert isinstance(r, list) and len(r) == 7 and all(type(x) is float for x in r)
    assert task.reward(prompts, completions, **extra) == fn(prompts, completions, **extra)
    ok = task.format_ok(completions)
    assert isinstance(ok, list) and len(ok) == 7 and all(type(x) is bool for x in ok)


@pytest.mark.parametrize("name", TASKS)
def test_corpus_is_plain_text(name):
    docs = get_task(name).corpus(2000, seed=0)
    assert len(docs) == 2000 and all(isinstance(d, str) and d.strip() == d and d for d in docs)
    banned = ["user", "assistant", "system", "<|", "|>", "Continue the review", "The answer is", "How many", "?",
              "{", "}"]
    for d in docs:
        assert not any(b in d for b in banned), d
    assert len(set(docs)) > 1500  # varied, not a handful of repeated documents


@pytest.mark.parametrize("name", TASKS)
def test_texts_are_short(name):
    task = get_task(name)
    for split in task.splits:
        words = [len((_user(d) + " " + _assistant(d)).split()) for d in task.demos(split, 2000)]
        assert max(words) <= (70 if split == "ood" else 60), (split, max(words))
    assert max(len(d.split()) for d in task.corpus(2000)) <= 70


# ---------------------------------------------------------------------------------------------------- arith

def test_arith_train_test_disjoint():
    t = ArithTask()
    train = {_user(d) for d in t.demos("train", 20000, seed=0)}
    for seed in (0, 1):
        test = {_user(d) for d in t.demos("test", 3000, seed=seed)}
        assert len(test) == 3000  # distinct within a call
        assert not train & test
    assert not train & {_user(d) for d in t.prompts("ood", 1000)}


@pytest.mark.parametrize("split", ["train", "test", "ood"])
def test_arith_worked_answers_are_correct(split):
    for d in ArithTask().demos(split, 2000, seed=5):
        q, w = _user(d), _assistant(d)
        steps = STEP_RE.findall(w)
        assert w == " ".join(f"{a} {op} {b} = {c}." for a, op, b, c in steps) + f" The answer is {d['answer']}."
        prev = None
        for a, op, b, c in steps:
            a, b, c = int(a), int(b), int(c)
            assert OPS[op](a, b) == c, w  # each step is true arithmetic
            assert prev is None or a == prev, w  # and continues from the previous result
            assert 2 <= c <= MAX_VALUE
            prev = c
        assert int(d["answer"]) == prev
        # the worked answer uses the question's numbers in order, and the question alone gives the answer
        operands = [int(x) for x in re.findall(r"\d+", q)]
        assert operands == [int(steps[0][0])] + [int(s[2]) for s in steps], (q, w)
        assert solve(q) == (prev, len(steps)), (q, w)


@pytest.mark.parametrize("split", ["train", "test", "ood"])
def test_arith_prompt_steps_count_the_worked_steps(split):
    t = ArithTask()
    demos, prompts = t.demos(split, 300, seed=4), t.prompts(split, 300, seed=4)
    assert [_user(d) for d in demos] == [_user(p) for p in prompts]  # same problems, so same step counts
    got = [p["steps"] for p in prompts]
    assert all(type(k) is int for k in got)
    assert got == [_assistant(d).count("=") for d in demos]  # one "a op b = c." per step
    assert got == [solve(_user(p))[1] for p in prompts]  # and the independent solver agrees
    assert set(got) == ({3} if split == "ood" else {1, 2})


def test_arith_ood_is_harder():
    t = ArithTask()
    n_steps = {split: [solve(_user(d))[1] for d in t.demos(split, 2000, seed=2)] for split in t.splits}
    for split in ("train", "test"):
        assert set(n_steps[split]) == {1, 2}
        assert 0.4 < n_steps[split].count(2) / 2000 < 0.6
    assert set(n_steps["ood"]) == {3}
    # numbers stay in the same range: only the chain length changes
    for split in t.splits:
        nums = [int(x) for d in t.demos(split, 2000, seed=2) for x in re.findall(r"\d+", _user(d) + _assistant(d))]
        assert min(nums) >= 2 and max(nums) == MAX_VALUE


def test_arith_verifier():
    t = ArithTask()
    rows = t.prompts("train", 300, seed=7)
    answers = [r["answer"] for r in rows]
    worked = [_assistant(d) for d in t.demos("train", 300, seed=7)]
    assert t.reward(rows, worked, answer=answers) == [1.0] * 300
    wrong = [w.replace(f"The answer is {a}.", f"The answer is {int(a) + 1}.") for w, a in zip(worked, answers)]
    assert t.reward(rows, wrong, answer=answers) == [0.0] * 300
    # extraction: "The answer is N" wins over later numbers; otherwise the last integer; no integer -> 0
    cases = [("12 + 7 = 19. The answer is 19.", "19", 1.0),
             ("The answer is 19. Or maybe 20.", "19", 1.0),
             ("the answer is 19", "19", 1.0),
             ("12 + 7 = 19", "19", 1.0),
             ("12 + 7 = 20", "19", 0.0),
             ("She has 19 apples left, I think 18", "19", 0.0),
             ("The answer is -19.", "19", 0.0),
             ("The answer is twelve.", "12", 0.0),
             ("", "5", 0.0),
             ("The answer is", "5", 0.0)]
    got = arith_reward([None] * len(cases), [c for c, _, _ in cases], answer=[a for _, a, _ in cases])
    assert got == [r for _, _, r in cases]
    # conversational completions, and integer answers
    assert arith_reward([None], [[{"role": "assistant", "content": "The answer is 7."}]], answer=[7]) == [1.0]
    with pytest.raises(ValueError, match="answer"):
        arith_reward([None], ["The answer is 7."])


def test_arith_format_ok():
    t = ArithTask()
    demos = [_assistant(d) for d in t.demos("train", 200)] + [_assistant(d) for d in t.demos("ood", 50)]
    assert all(t.format_ok(demos))
    bad = ["The answer is 14.", "12 + 7 = 19. 19 - 5 = 14.", "12 + 7 = 19. The answer is 19. Yay.",
           "12 plus 7 is 19. The answer is 19.", "12 + 7 = 19 The answer is 19.", ""]
    assert t.format_ok(bad) == [False] * len(bad)
    assert t.format_ok(["  12 + 7 = 20. The answer is 3.\n"]) == [True]  # format only, not correctness


def test_arith_corpus_arithmetic_is_true():
    docs = ArithTask().corpus(1000, seed=1)
    checked = 0
    for d in docs:
        for a, op, b, c in re.findall(r"(\d+) ([-+*]) (\d+) = (\d+)", d):
            assert OPS[op](int(a), int(b)) == int(c), d
            checked += 1
        for a, word, b, c in re.findall(r"(\d+) (plus|minus|times) (\d+) is (\d+)", d):
            assert OPS[{"plus": "+", "minus": "-", "times": "*"}[word]](int(a), int(b)) == int(c), d
            checked += 1
    assert checked > 1000
    assert sum("so now" in d for d in docs) > 200  # stories with running totals are there too


# ---------------------------------------------------------------------------------------------------- sentiment

@pytest.mark.parametrize("text, s", [
    ("The acting was good.", 1.0),
    ("The acting was not good.", -1.0),
    ("The plot was not very good.", -1.5),  # negation and intensifier both reach "good": -1 * 1.5 * 1
    ("Not a good film, but the music was excellent.", 2.0),  # unknown "a" keeps the negation; -1 + 3
    ("The zorblax was great.", 2.0),  # unknown word contributes nothing
    ("It was a dull, boring mess.", -6.0),  # -2 - 2 - 2
    ("Extremely slow and hardly clever.", -4.0),  # 2 * -1 + (-1) * 2
    ("It is not not good.", 1.0),  # double negation
    ("Not. Good!", 1.0),  # the full stop ends the negation's reach
    ("I didn't enjoy it but I loved the ending!", 1.0),  # -2 + 3
    ("Slightly BORING.", -1.0),  # case-insensitive, 0.5 * -2
    ("The film is about a farmer.", 0.0),
    ("", 0.0),
])
def test_sentiment_score_hand_computed(text, s):
    assert sentiment_score(text) == s
    assert sentiment_reward([None], [text]) == [pytest.approx(math.tanh(s / 3), abs=1e-12)]


def test_sentiment_reward_values():
    assert sentiment_reward([None, None], ["good.", "not excellent at all."]) == pytest.approx(
        [0.32151273753163434, -0.7615941559557649], abs=1e-12)  # tanh(1/3), tanh(-1)
    r = sentiment_reward([None], ["excellent " * 40])
    assert 0.999 < r[0] <= 1.0  # bounded
    assert sentiment_reward([None], [[{"role": "assistant", "content": "good."}]]) == pytest.approx([0.3215127375])


def test_sentiment_splits_and_openings():
    t = SentimentTask()
    train = {_user(p) for p in t.prompts("train", 5000, seed=0)}
    test = {_user(p) for p in t.prompts("test", 2000, seed=1)}
    assert len(test) > 400 and not train & test
    test_openings = tuple(o.removeprefix(t.instruction) + " " for o in test)
    assert not any(d.startswith(test_openings) for d in t.corpus(2000))  # the corpus holds train openings only
    sentiment_words = set(LEXICON) | set(INTENSIFIERS) | NEGATORS
    for o in train | test:
        assert o.startswith("Continue the review: ")
        assert sentiment_score(o) == 0.0
        assert not set(re.findall(r"[a-z']+", o.lower())) & sentiment_words, o


def test_sentiment_demos_roughly_neutral_and_varied():
    t = SentimentTask()
    completions = [_assistant(d) for d in t.demos("train", 4000, seed=0)]
    r = t.reward(None, completions)
    assert abs(statistics.mean(r)) < 0.05  # SFT on these starts near neutral, leaving room for RL
    assert sum(x > 0.3 for x in r) > 1000 and sum(x < -0.3 for x in r) > 1000
    assert all(t.format_ok(completions))
    assert t.format_ok(["", "   ", ".", "it was good", "it was good. "]) == [False, False, False, False, True]
    # reviews are 2-4 sentences in the corpus
    n_sent = [d.count(".") for d in t.corpus(1000)]
    assert min(n_sent) == 2 and max(n_sent) == 4
