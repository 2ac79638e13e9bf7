"""sample_bon.py and minipost/rewards.py: selection, one prefill per prompt, the sweep's estimators against
brute-force enumeration, reward-model scoring at the last real token, and bad input.

Models are random tiny GPTs with a BPE tokenizer trained in the test (samples are gibberish, which is all the
plumbing needs); the reward functions live in a module written to a temporary folder.
"""
import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sample_bon
from minipost.checkpoint import save_checkpoint
from minipost.cli import UserError
from minipost.engine import generate
from minipost.evaluate import prompt_ids, sample_completions
from minipost.model import GPT, GPTConfig
from minipost.rewards import checked_rewards, load_reward_fn, score_with_reward_model
from minipost.tasks import ArithTask, arith_reward, get_task
from minipost.tokenizer import train_bpe

ROOT = Path(__file__).resolve().parent.parent
REWARDS_MODULE = '''
def length_reward(prompts, completions, **kwargs):
    return [float(len(c)) for c in completions]

def wrong_length(prompts, completions, **kwargs):
    return [0.0] * (len(completions) + 1)

def not_a_number(prompts, completions, **kwargs):
    return ["high"] * len(completions)

NOT_CALLABLE = 3
'''
QUESTION = "Mia has 12 apples. She buys 7 more. How many apples does Mia have now?"


@pytest.fixture(scope="module")
def tok():
    return train_bpe(get_task("arith").corpus(200, seed=0), vocab_size=320)


def tiny_gpt(tok, seed, scalar_head=False):
    torch.manual_seed(seed)
    config = GPTConfig(block_size=128, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32,
                       scalar_head=scalar_head)
    return GPT(config).eval()


@pytest.fixture(scope="module")
def work(tmp_path_factory, tok):
    """A folder with a policy checkpoint, a reward-model checkpoint and a reward-function module."""
    d = tmp_path_factory.mktemp("bon")
    save_checkpoint(d / "policy", tiny_gpt(tok, 0), tok, {"kind": "sft", "script": "test"})
    save_checkpoint(d / "rm", tiny_gpt(tok, 1, scalar_head=True), tok, {"kind": "rm", "script": "test"})
    (d / "bon_test_rewards.py").write_text(REWARDS_MODULE)
    return d


@pytest.fixture
def rewards_importable(work, monkeypatch):
    monkeypatch.syspath_prepend(str(work))


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# -----------------------------------------------------------------------------------------------------------
# selection and sampling


def test_select_best_is_argmax_first_on_ties():
    scores = [0.1, 0.5, 0.5, 0.2,  -3.0, -1.0, -2.0, -1.0,  7.0, 7.0, 7.0, 7.0,  0.0, 0.0, 0.0, 9.0]
    assert sample_bon.select_best(scores, 4) == [1, 1, 0, 3]
    assert sample_bon.select_best([2.0, 1.0, 5.0], 1) == [0, 0, 0]


def test_candidates_share_one_prefill_and_equal_lone_samples(tok):
    model = tiny_gpt(tok, 0)
    prompts = prompt_ids(tok, get_task("arith").prompts("test", 2, seed=0))
    assert len(prompts[0]) != len(prompts[1])  # so the batch is left-padded
    calls = []
    forward = model.forward
    model.forward = lambda idx, pos=None, cache=None: (calls.append(tuple(idx.shape)), forward(idx, pos, cache))[1]
    comps, finished = sample_bon.sample_candidates(model, tok, prompts, 5, 6, batch_size=10, seed=100)
    del model.forward
    # one generate call for both prompts: a single forward over the prompt length, with one row per prompt
    # (not per sample), then one-token steps over the 10 fanned-out rows
    P = max(len(p) for p in prompts)
    assert calls[0] == (2, P) and all(c == (10, 1) for c in calls[1:]) and len(calls) >= 2
    for i, prompt in enumerate(prompts):
        for j in range(5):
            lone = generate(model, [prompt], 6, tok.eos_id, tok.pad_id, 1.0, num_samples=1, seed=100 + i * 5 + j)
            assert comps[i * 5 + j] == lone.completions()[0]
            assert finished[i * 5 + j] == bool(lone.finished[0])
    assert len({tuple(c) for c in comps[:5]}) > 1  # different seeds, different samples
    # one prompt per generate call: the same candidates
    assert sample_bon.sample_candidates(model, tok, prompts, 5, 6, batch_size=1, seed=100)[0] == comps


def test_n1_is_plain_sampling(work, tok, capsys):
    policy = tiny_gpt(tok, 0)
    sample_bon.main(["--init", str(work / "policy"), "--prompt", QUESTION, "--n", "1", "--max-new-tokens", "8",
                     "--seed", "3", "--device", "cpu"])
    (rec,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    want = sample_completions(policy, tok, [{"prompt": QUESTION}], 8, temperature=1.0, seed=3)
    assert rec["completion"] == want[0] and rec["prompt"] == QUESTION and rec["score"] is None

    # on a task split, with the task's reward as score: the same completions as the evaluation sampler
    out = work / "n1"
    sample_bon.main(["--init", str(work / "policy"), "--n", "1", "--n-prompts", "4", "--max-new-tokens", "8",
                     "--seed", "5", "--device", "cpu", "--out", str(out)])
    rows = get_task("arith").prompts("test", 4, seed=0)
    want = sample_completions(policy, tok, rows, 8, temperature=1.0, seed=5)
    recs = read_jsonl(out / "bon.jsonl")
    assert [r["completion"] for r in recs] == want
    assert [r["score"] for r in recs] == arith_reward(None, want, answer=[r["answer"] for r in rows])
    assert [r["answer"] for r in recs] == [r["answer"] for r in rows]  # extra columns are kept


def test_finished_only_leaves_out_unfinished_and_blank_answers(work, tok):
    """--finished-only (bon.jsonl as SFT data): exactly the records of the plain run whose completion ended
    with EOS and is not blank, in order."""
    policy = tiny_gpt(tok, 0)
    with torch.no_grad():  # a long EOS embedding: EOS logits swing far either way, so some rows end early
        policy.transformer.wte.weight[tok.eos_id] *= 40
    save_checkpoint(work / "eos-policy", policy, tok, {"kind": "sft", "script": "test"})
    common = ["--init", str(work / "eos-policy"), "--n", "1", "--n-prompts", "12", "--max-new-tokens", "6",
              "--seed", "1", "--device", "cpu"]
    sample_bon.main(common + ["--out", str(work / "all")])
    sample_bon.main(common + ["--finished-only", "--out", str(work / "finished")])
    everything = read_jsonl(work / "all" / "bon.jsonl")
    kept = read_jsonl(work / "finished" / "bon.jsonl")
    assert kept == [r for r in everything if r["finished"] and r["completion"].strip()]
    assert 0 < len(kept) < len(everything)  # this setup has both kinds


def test_reward_function_selection_end_to_end(work, rewards_importable):
    out = work / "fn"
    sample_bon.main(["--init", str(work / "policy"), "--n", "4", "--n-prompts", "3", "--max-new-tokens", "10",
                     "--reward", "bon_test_rewards:length_reward", "--keep-all", "--device", "cpu",
                     "--out", str(out)])
    for rec in read_jsonl(out / "bon.jsonl"):
        cands = rec["candidates"]
        assert [c["score"] for c in cands] == [float(len(c["completion"])) for c in cands]
        best = max(range(4), key=lambda j: cands[j]["score"])
        assert rec["index"] == best and rec["completion"] == cands[best]["completion"]
        assert rec["score"] == cands[best]["score"]


def test_reward_model_selection_end_to_end(work, tok):
    out = work / "rm-select"
    sample_bon.main(["--init", str(work / "policy"), "--n", "3", "--n-prompts", "2", "--max-new-tokens", "6",
                     "--reward-model", str(work / "rm"), "--keep-all", "--device", "cpu", "--out", str(out)])
    rows = get_task("arith").prompts("test", 2, seed=0)
    prompts = prompt_ids(tok, rows)
    comps, _ = sample_bon.sample_candidates(tiny_gpt(tok, 0), tok, prompts, 3, 6, seed=0)
    want = score_with_reward_model(tiny_gpt(tok, 1, scalar_head=True), tok, [p for p in prompts for _ in range(3)],
                                   comps)
    recs = read_jsonl(out / "bon.jsonl")
    got = torch.tensor([c["score"] for r in recs for c in r["candidates"]])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)  # float32 -> JSON -> float: exact up to rounding
    assert [r["index"] for r in recs] == sample_bon.select_best(want.tolist(), 3)


def test_messages_data_prompts_end_at_last_user_turn(work, rewards_importable):
    conv = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": QUESTION}, {"role": "assistant", "content": "12 + 7 = 19."}]
    data = work / "messages.jsonl"
    data.write_text(json.dumps({"messages": conv, "answer": "19"}) + "\n"
                    + json.dumps({"messages": conv[:2], "answer": "0"}) + "\n")
    out = work / "msgs"
    sample_bon.main(["--init", str(work / "policy"), "--data", str(data), "--n", "2", "--max-new-tokens", "4",
                     "--reward", "bon_test_rewards:length_reward", "--device", "cpu", "--out", str(out)])
    recs = read_jsonl(out / "bon.jsonl")
    assert [r["prompt"] for r in recs] == [conv[:3], conv[:1]]
    assert [r["answer"] for r in recs] == ["19", "0"]


# -----------------------------------------------------------------------------------------------------------
# sweep estimators


def brute_force_best_of_n(scores, values, n):
    """Mean over every ordered n-tuple of distinct pool members of the value of its first best-scored one."""
    picks = [values[t[sample_bon.select_best([scores[i] for i in t], n)[0]]]
             for t in itertools.permutations(range(len(scores)), n)]
    return sum(picks) / len(picks)


def test_expected_best_of_n_equals_brute_force():
    assert sample_bon.expected_best_of_n([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], 2) == pytest.approx(8 / 3, abs=1e-15)
    # ties in the selection score, and a value (gold reward) that disagrees with it
    scores = [0.3, 1.0, 0.3, 2.0, 1.0, 0.3, -1.0]
    values = [1.0, 0.0, 5.0, 2.0, 3.0, 0.0, 7.0]
    for n in range(1, len(scores) + 1):
        assert sample_bon.expected_best_of_n(scores, values, n) == pytest.approx(
            brute_force_best_of_n(scores, values, n), abs=1e-12)
    assert sample_bon.expected_best_of_n(scores, values, 1) == pytest.approx(sum(values) / 7, abs=1e-15)
    assert sample_bon.expected_best_of_n(scores, values, 7) == 2.0  # the whole pool: its unique best
    with pytest.raises(ValueError):
        sample_bon.expected_best_of_n(scores, values, 8)


def brute_force_kl(completions, score, n):
    """KL(best-of-n || pool) over distinct completions, enumerating every n-tuple drawn with replacement."""
    M = len(completions)
    pool = {c: completions.count(c) / M for c in set(completions)}
    chosen = {}
    for t in itertools.product(range(M), repeat=n):
        c = completions[t[sample_bon.select_best([score[completions[i]] for i in t], n)[0]]]
        chosen[c] = chosen.get(c, 0) + 1 / M ** n
    return sum(q * math.log(q / pool[c]) for c, q in chosen.items())


def test_kl_estimate_against_enumeration_and_hand_values():
    # a verifier pool with one correct answer in four: P(best of 2 is correct) = 1 - (3/4)^2 = 7/16, so
    # KL = 7/16 log(7/16 / 1/4) + 9/16 log(9/16 / 3/4) = 0.244831907 - 0.161821166
    assert sample_bon.kl_best_of_n([0.0, 0.0, 0.0, 1.0], 2) == pytest.approx(0.083010741, abs=1e-8)
    # repeated completions and two distinct completions on one score level
    completions = ["a", "b", "a", "c", "d", "b", "e"]
    score = {"a": 1.0, "b": 2.0, "c": 2.0, "d": 0.0, "e": 3.0}
    for n in (1, 2, 3, 4):
        est = sample_bon.kl_best_of_n([score[c] for c in completions], n)
        assert est == pytest.approx(brute_force_kl(completions, score, n), abs=1e-12)
        assert est <= sample_bon.kl_bound(n) + 1e-12  # float rounding at N = 1, where both are 0
    assert sample_bon.kl_best_of_n([1.0] * 5, 4) == 0.0  # one level: best-of-N is the policy itself


def test_kl_bound_values():
    assert sample_bon.kl_bound(1) == 0.0
    assert sample_bon.kl_bound(2) == pytest.approx(0.1931471806, abs=1e-10)  # log 2 - 1/2
    assert sample_bon.kl_bound(4) == pytest.approx(0.6362943611, abs=1e-10)  # log 4 - 3/4
    assert sample_bon.kl_bound(16) == pytest.approx(1.8350887222, abs=1e-10)  # log 16 - 15/16
    # all-distinct scores approach the bound from below as the pool grows (the continuous case)
    gaps = [sample_bon.kl_bound(4) - sample_bon.kl_best_of_n(list(range(M)), 4) for M in (8, 64, 2000)]
    assert 0 < gaps[2] < gaps[1] < gaps[0] < 0.02 and gaps[2] < 1e-6


def test_sweep_end_to_end(work, rewards_importable, capsys):
    out = work / "sweep"
    results = sample_bon.main(["--init", str(work / "policy"), "--n-prompts", "3", "--sweep", "4,1,2",
                               "--pool-factor", "2", "--max-new-tokens", "6", "--time-prompts", "1",
                               "--reward", "bon_test_rewards:length_reward", "--keep-all", "--device", "cpu",
                               "--out", str(out)])
    table = capsys.readouterr().out
    assert table.splitlines()[-1].startswith("| 4 |") and "KL bound" in table and "proxy score" in table
    assert read_jsonl(out / "sweep.jsonl") == results
    assert [r["n"] for r in results] == [1, 2, 4] and all(r["pool"] == 8 for r in results)
    pool = read_jsonl(out / "pool.jsonl")
    assert len(pool) == 3 and all(len(p["completions"]) == 8 for p in pool)
    rows = get_task("arith").prompts("test", 3, seed=0)
    for p, row in zip(pool, rows):
        assert p["scores"] == [float(len(c)) for c in p["completions"]]  # selection: the reward function
        assert p["rewards"] == arith_reward(None, p["completions"], answer=[row["answer"]] * 8)  # gold: verifier
    for r in results:
        n = r["n"]
        assert r["reward"] == pytest.approx(sum(brute_force_best_of_n(p["scores"], p["rewards"], n)
                                                for p in pool) / 3, abs=1e-12)
        assert r["proxy"] == pytest.approx(sum(brute_force_best_of_n(p["scores"], p["scores"], n)
                                               for p in pool) / 3, abs=1e-12)
        assert r["kl_bound"] == sample_bon.kl_bound(n) and -1e-12 <= r["kl_est"] <= r["kl_bound"] + 1e-12
        assert r["gen_s_per_prompt"] > 0
    assert results[0]["proxy"] == pytest.approx(sum(sum(p["scores"]) for p in pool) / 24)
    assert results[0]["kl_est"] == pytest.approx(0.0, abs=1e-12)  # best-of-1 is the policy
    for r in results:  # per prompt, in prompt order
        assert r["rewards"] == pytest.approx([brute_force_best_of_n(p["scores"], p["rewards"], r["n"]) for p in pool],
                                             abs=1e-12)
        assert sum(r["rewards"]) / 3 == pytest.approx(r["reward"], abs=1e-15) and r["prompt_seed"] == 0


def test_sweep_oracle_is_the_ground_truth_selecting_from_the_same_pool(work, rewards_importable, monkeypatch):
    """oracle_reward(s): best-of-N of the pool selected by the gold reward itself. A tiny random policy never
    solves arith, so the task's reward is swapped for a gold that varies (distinct characters mod 3)."""
    def gold(prompts, completions, **kwargs):
        return [float(len(set(c)) % 3) for c in completions]
    monkeypatch.setattr(ArithTask, "reward", lambda self, prompts, completions, **kw: gold(prompts, completions))
    out = work / "sweep-oracle"
    results = sample_bon.main(["--init", str(work / "policy"), "--n-prompts", "3", "--sweep", "1,2,4",
                               "--pool-factor", "2", "--max-new-tokens", "6", "--time-prompts", "1",
                               "--reward", "bon_test_rewards:length_reward", "--keep-all", "--device", "cpu",
                               "--out", str(out)])
    pool = read_jsonl(out / "pool.jsonl")
    for p in pool:
        assert p["rewards"] == gold(None, p["completions"]) and p["scores"] == [float(len(c)) for c in p["completions"]]
    assert len({v for p in pool for v in p["rewards"]}) > 1  # the gold varies, so selection matters
    for r in results:
        n = r["n"]
        assert r["oracle_rewards"] == pytest.approx(
            [brute_force_best_of_n(p["rewards"], p["rewards"], n) for p in pool], abs=1e-12)
        assert sum(r["oracle_rewards"]) / 3 == pytest.approx(r["oracle_reward"], abs=1e-15)
        assert all(o >= g - 1e-12 for o, g in zip(r["oracle_rewards"], r["rewards"]))
        assert sum(r["rewards"]) / 3 == pytest.approx(r["reward"], abs=1e-15)
    assert results[0]["oracle_rewards"] == pytest.approx(results[0]["rewards"], abs=1e-12)  # N = 1: no choice
    assert results[-1]["oracle_reward"] > results[-1]["reward"]  # length is not the gold: the oracle does better
    # the selector's AUC on this very pool, prompt by prompt, against a naive count over all candidate pairs
    aucs = [naive_auc(p["scores"], p["rewards"]) for p in pool]
    assert results[0]["selector_aucs"] == pytest.approx(aucs, abs=1e-12)
    ranked = [a for a in aucs if a is not None]
    assert results[0]["selector_auc_prompts"] == len(ranked) > 0
    assert results[0]["selector_auc"] == pytest.approx(sum(ranked) / len(ranked), abs=1e-12)


def naive_auc(scores, values):
    """Every ordered pair (i, j) with values[i] > values[j]: 1 if scores[i] > scores[j], 0.5 if equal."""
    right = pairs = 0
    for i, j in itertools.permutations(range(len(scores)), 2):
        if values[i] > values[j]:
            pairs += 1
            right += 1.0 if scores[i] > scores[j] else 0.5 if scores[i] == scores[j] else 0.0
    return right / pairs if pairs else None


def test_ranking_auc_hand_values_and_naive_count():
    # correct = 1, wrong = 0: (0.9 vs 0.1) right, (0.9 vs 0.5) right, (0.2 vs 0.1) right, (0.2 vs 0.5) wrong
    assert sample_bon.ranking_auc([0.9, 0.1, 0.2, 0.5], [1, 0, 1, 0]) == (0.75, 4)
    assert sample_bon.ranking_auc([3, 3, 3], [1, 0, 0]) == (0.5, 2)  # a constant selector: chance
    assert sample_bon.ranking_auc([1, 2, 3], [0, 1, 2]) == (1.0, 3) and sample_bon.ranking_auc([3, 2, 1], [0, 1, 2])[0] == 0.0
    assert sample_bon.ranking_auc([0.4, 0.7], [1, 1]) == (None, 0)  # one value: nothing to rank
    gen = torch.Generator().manual_seed(0)
    for M in (2, 5, 17, 40):  # graded values with ties in both, as a reward model scores a sentiment pool
        scores = torch.randint(0, 6, (M,), generator=gen).tolist()
        values = torch.randint(0, 4, (M,), generator=gen).tolist()
        assert sample_bon.ranking_auc(scores, values)[0] == pytest.approx(naive_auc(scores, values), abs=1e-12)


def test_sweep_prompt_seed_and_no_oracle_for_the_ground_truth(work):
    """--prompt-seed 1 takes the first n of seed 1's prompts (what minipost.evaluate scores); selecting by the
    task's own reward writes no oracle columns (it is the oracle)."""
    out = work / "sweep-seed1"
    results = sample_bon.main(["--init", str(work / "policy"), "--n-prompts", "3", "--sweep", "1,2",
                               "--max-new-tokens", "4", "--time-prompts", "1", "--prompt-seed", "1", "--keep-all",
                               "--device", "cpu", "--out", str(out)])
    task = get_task("arith")
    want = task.prompts("test", 3, seed=1)
    assert [p["prompt"] for p in read_jsonl(out / "pool.jsonl")] == [r["prompt"] for r in want]
    assert [r["prompt"] for r in want] != [r["prompt"] for r in task.prompts("test", 3, seed=0)]
    assert want == task.prompts("test", 50, seed=1)[:3]  # the first 3 of an evaluation's 50
    for r in results:
        assert "oracle_reward" not in r and "oracle_rewards" not in r and r["prompt_seed"] == 1
        assert len(r["rewards"]) == 3 and sum(r["rewards"]) / 3 == pytest.approx(r["reward"], abs=1e-15)


# -----------------------------------------------------------------------------------------------------------
# reward model


def test_reward_model_reads_the_last_real_token(tok):
    rm = tiny_gpt(tok, 1, scalar_head=True)
    with torch.no_grad():
        rm.score_head.bias.fill_(0.25)
    prompts = [tok.render_prompt([{"role": "user", "content": t}]) for t in ("2 + 3?", "Mia has 12 apples.", "7")]
    completions = [tok.encode("2 + 3 = 5.") + [tok.eos_id], tok.encode("The answer is 19.") + [tok.eos_id],
                   tok.encode("12 + 7 = 19. 19 - 5")]  # the last one was cut off: no EOS
    with torch.no_grad():  # reference: each sequence alone, no padding, the score at its final position
        alone = [rm.scores(rm(torch.tensor([p + c])))[0] for p, c in zip(prompts, completions)]
    want = torch.stack([s[-1] for s in alone])
    for batch_size in (1, 2, 64):  # 2 and 64: right-padded batches
        got = score_with_reward_model(rm, tok, prompts, completions, batch_size=batch_size)
        assert got.dtype == torch.float32 and got.shape == (3,)
        # same sequence, same float32 arithmetic up to the padded width of the matmuls: 1e-5 is ~100 ulp
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # the position matters: one token earlier gives a clearly different score
    assert (want - torch.stack([s[-2] for s in alone])).abs().min() > 1e-3
    rm.train()
    score_with_reward_model(rm, tok, prompts, completions)
    assert rm.training  # the caller's mode is restored
    with pytest.raises(UserError, match="context"):
        score_with_reward_model(rm, tok, [prompts[0]], [[5] * 200])


# -----------------------------------------------------------------------------------------------------------
# bad input


def test_load_reward_fn_errors(rewards_importable):
    assert load_reward_fn("bon_test_rewards:length_reward")(["p"], ["abc"]) == [3.0]
    assert load_reward_fn("minipost.tasks:arith_reward") is arith_reward
    for spec, message in [("nocolon", "expected MODULE:FUNCTION"), ("no_such_module_xyz:f", "cannot import"),
                          ("bon_test_rewards:missing", "no attribute 'missing'"),
                          ("bon_test_rewards:NOT_CALLABLE", "not a function")]:
        with pytest.raises(UserError, match=message):
            load_reward_fn(spec)


def test_checked_rewards_errors(rewards_importable):
    comps = ["a", "bb"]
    assert checked_rewards(lambda p, c: torch.tensor([1.0, 2.0]), ["x", "y"], comps) == [1.0, 2.0]
    fn = load_reward_fn("bon_test_rewards:wrong_length")
    with pytest.raises(UserError, match=r"bon_test_rewards:wrong_length returned 3 rewards for 2 completions"):
        checked_rewards(fn, ["x", "y"], comps)
    with pytest.raises(UserError, match=r"not_a_number returned 'high' \(str\) for completion 0"):
        checked_rewards(load_reward_fn("bon_test_rewards:not_a_number"), ["x", "y"], comps)
    for bad in ([1.0, None], [1.0, float("nan")]):
        with pytest.raises(UserError, match="completion 1"):
            checked_rewards(lambda p, c: bad, ["x", "y"], comps)
    with pytest.raises(UserError, match="arith_reward failed: ValueError: arith_reward needs the 'answer'"):
        checked_rewards(arith_reward, ["x", "y"], comps)


@pytest.mark.parametrize("argv,message", [
    (["--n", "0"], "--n must be >= 1"),
    (["--sweep", "0,2"], "every N must be >= 1"),
    (["--sweep", "1,two"], "comma-separated integers"),
    (["--temperature", "0", "--n", "4"], "greedy"),
    (["--reward", "m:f", "--reward-model", "x"], "choose one"),
])
def test_bad_flags(argv, message):
    with pytest.raises(UserError, match=message):
        sample_bon.parse_args(["--init", "x"] + argv)


def test_bad_files(work, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(UserError, match="empty dataset"):
        sample_bon.main(["--init", str(work / "policy"), "--data", str(empty), "--device", "cpu"])
    with pytest.raises(UserError, match="not a reward model"):
        sample_bon.main(["--init", str(work / "policy"), "--reward-model", str(work / "policy"), "--device", "cpu"])
    with pytest.raises(UserError, match="is a reward model"):
        sample_bon.main(["--init", str(work / "rm"), "--device", "cpu"])


@pytest.mark.parametrize("extra,message", [
    (["--n", "0"], "error: --n must be >= 1"),
    (["--reward", "no_such_module_xyz:f", "--n-prompts", "1"], "error: --reward no_such_module_xyz:f: cannot import"),
    (["--reward", "bon_test_rewards:wrong_length", "--n-prompts", "2", "--n", "2", "--max-new-tokens", "3"],
     "error: reward function bon_test_rewards:wrong_length returned 5 rewards for 4 completions"),
])
def test_cli_errors_are_one_line_exit_2(work, extra, message):
    # run from the folder holding bon_test_rewards.py: --reward imports from the working directory
    proc = subprocess.run([sys.executable, str(ROOT / "sample_bon.py"), "--init", str(work / "policy"),
                           "--device", "cpu", "--out", str(work / "cli"), *extra],
                          cwd=work, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and proc.stderr.startswith(message)
