"""train_rlhf.py end to end on a tiny base + SFT model, and the pieces it is built from.

The fixture SFT model is far too small to solve arith; the RL runs get a reward with variance from a
reward function written here (reward 1 for a completion holding a digit), so every loss path gets
non-empty groups. What is checked: each --algo runs, logs the expected keys, writes a loadable
checkpoint of its kind; the reward model reads the EOS token and ignores right padding; PPO's first
ratio is 1; the built-in pair builder ranks by the reward; DPO resumes bit-for-bit; bad input exits 2.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

import train_base
import train_rlhf
import train_sft
from minipost import preferences
from minipost.checkpoint import load_checkpoint
from minipost.cli import UserError, read_metrics
from minipost.model import GPT, GPTConfig
from minipost.data import epoch_indices
from minipost.rewards import Reward, call_reward, eos_scores
from minipost.rollout import Rollout, pack, sequence_logprobs
from minipost.tasks import get_task

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--n-eval", "4", "--n-kl", "4", "--max-new-tokens", "12", "--warmup", "1"]

REWARD_MODULE = '''
def odd_length(prompts, completions, **kwargs):  # 0/1 and varied: most groups of samples carry signal
    return [float(len(c) % 2) for c in completions]

def digit_count(prompts, completions, **kwargs):
    return [float(sum(ch.isdigit() for ch in c)) for c in completions]

def wrong_length(prompts, completions, **kwargs):
    return [0.0]

def not_numbers(prompts, completions, **kwargs):
    return ["high"] * len(completions)

not_callable = 3
'''


def run_script(*argv, timeout=180):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "train_rlhf.py", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tests run many tiny ops: on a shared 2-core machine one thread avoids the spin-waits of two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny arith base and SFT model (seconds), a pairs file and a reward module on sys.path."""
    root = tmp_path_factory.mktemp("rlhf")
    base, sft = root / "base", root / "sft"
    train_base.main(["--task", "arith", "--corpus-docs", "400", "--vocab-size", "320", "--block-size", "96",
                     "--batch-size", "8", "--eval-batches", "1", "--max-steps", "30", "--lr", "3e-3",
                     "--warmup", "5", "--out", str(base)])
    train_sft.main(["--init", str(base), "--n-train", "64", "--n-eval", "2", "--max-new-tokens", "4",
                    "--max-steps", "60", "--batch-size", "8", "--lr", "3e-3", "--warmup", "2",
                    "--eval-every", "60", "--out", str(sft)])
    # preference pairs: the worked answer beats a wrong one
    rows = get_task("arith").demos("train", 24, seed=1)
    with open(root / "pairs.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({"prompt": r["messages"][0]["content"], "chosen": r["messages"][1]["content"],
                                "rejected": f"The answer is {int(r['answer']) + 1}."}) + "\n")
    (root / "rewards_for_test.py").write_text(REWARD_MODULE)
    sys.path.insert(0, str(root))
    yield root
    sys.path.remove(str(root))


def check_run(out, algo, steps, keys):
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(steps + 1))
    for r in records[1:]:
        need = set(keys) | {"step_time_s", "time_s", "lr"}
        assert need <= set(r), need - set(r)
        assert all(v == v for v in r.values() if isinstance(v, float)), r  # no NaN
    ck = load_checkpoint(out)
    assert ck.meta["kind"] == algo and ck.meta["step"] == steps
    return records, ck


@pytest.fixture(scope="module")
def rm_run(models):
    out = models / "rm"
    train_rlhf.main(["--algo", "rm", "--init", str(models / "sft"), "--data", str(models / "pairs.jsonl"),
                     "--val-frac", "0.25", "--max-steps", "3", "--batch-size", "6", "--out", str(out), *SMALL])
    return out


def test_reward_model_runs_centres_and_loads(rm_run):
    records, ck = check_run(rm_run, "rm", 3, ["loss", "accuracy", "margin"])
    assert "val_accuracy" in records[0] and "val_accuracy" in records[-1]
    assert ck.model.config.scalar_head
    assert ck.meta["reward_bias"] == pytest.approx(ck.model.score_head.bias.item(), abs=1e-7)


def test_builtin_pairs_end_to_end_rank_by_the_reward(models):
    """rm on pairs built from the SFT model's own samples: every pair's chosen response scores higher, and
    re-scoring the written texts with the reward function gives the logged rewards."""
    out = models / "rm-builtin"
    train_rlhf.main(["--algo", "rm", "--init", str(models / "sft"), "--reward", "rewards_for_test:digit_count",
                     "--n-prompts", "12", "--k", "4", "--max-steps", "2", "--batch-size", "4", "--out", str(out),
                     *SMALL, "--max-new-tokens", "24"])
    check_run(out, "rm", 2, ["loss", "accuracy"])
    import rewards_for_test
    for split in ("train", "val"):
        records = [json.loads(line) for line in (out / f"pairs-{split}.jsonl").read_text().splitlines()]
        assert records, split
        for rec in records:
            assert rec["chosen_reward"] > rec["rejected_reward"]
            assert rec["chosen"].strip() and rec["rejected"].strip()  # blank answers are never paired
            again = rewards_for_test.digit_count(None, [rec["chosen"], rec["rejected"]])
            assert again == [rec["chosen_reward"], rec["rejected_reward"]]
        ck = load_checkpoint(models / "sft")  # the written file reads back as --data
        assert preferences.load_pairs(out / f"pairs-{split}.jsonl", ck.tokenizer, 10_000)[0]


def test_dpo_runs_and_logs_implicit_rewards(models):
    out = models / "dpo"
    train_rlhf.main(["--algo", "dpo", "--init", str(models / "sft"), "--data", str(models / "pairs.jsonl"),
                     "--max-steps", "2", "--batch-size", "4", "--out", str(out), *SMALL])
    records, _ = check_run(out, "dpo", 2, ["loss", "accuracy", "margin", "chosen_reward", "entropy"])
    # at step 1 the policy is the reference: every implicit reward is 0 and the loss is log 2
    assert records[1]["loss"] == pytest.approx(0.6931472, abs=1e-5)
    assert records[1]["chosen_reward"] == pytest.approx(0.0, abs=1e-6)
    for key in ("test_reward", "test_kl", "test_entropy", "test_sample_reward", "val_accuracy"):
        assert key in records[0] and key in records[-1]
    assert records[0]["test_kl"] == pytest.approx(0.0, abs=1e-5)  # policy == reference at step 0


def test_val_data_holds_out_its_own_pairs(models, capsys):
    """--val-data: every --data pair trains and the held-out pairs are exactly the other file's (how the
    pipeline shares one set of built pairs between the reward model and every DPO run)."""
    lines = (models / "pairs.jsonl").read_text().splitlines()
    val = models / "val-pairs.jsonl"
    val.write_text("\n".join(lines[:3]) + "\n")
    train_rlhf.main(["--algo", "dpo", "--init", str(models / "sft"), "--data", str(models / "pairs.jsonl"),
                     "--val-data", str(val), "--max-steps", "1", "--batch-size", "4", "--out",
                     str(models / "dpo-val"), *SMALL])
    ck = load_checkpoint(models / "sft")
    # every pair that fits the tiny context: split_pairs would have held some of --data out instead
    n_train = len(preferences.load_pairs(models / "pairs.jsonl", ck.tokenizer, ck.model.config.block_size)[0])
    n_val = len(preferences.load_pairs(val, ck.tokenizer, ck.model.config.block_size)[0])
    assert n_val >= 1
    assert f"pairs: {n_train} train, {n_val} held out from {val}" in capsys.readouterr().out


def test_dpo_resume_reproduces_uninterrupted_run(models):
    common = ["--algo", "dpo", "--init", str(models / "sft"), "--data", str(models / "pairs.jsonl"),
              "--batch-size", "4", "--eval-every", "2", "--ckpt-every", "2", *SMALL]
    train_rlhf.main(common + ["--max-steps", "4", "--out", str(models / "dpo-ref")])
    train_rlhf.main(common + ["--max-steps", "2", "--out", str(models / "dpo-res")])
    train_rlhf.main(common + ["--max-steps", "4", "--out", str(models / "dpo-res"), "--resume"])
    ref = read_metrics(models / "dpo-ref" / "metrics.jsonl")
    res = read_metrics(models / "dpo-res" / "metrics.jsonl")
    assert [r["step"] for r in res] == [r["step"] for r in ref] == [0, 1, 2, 3, 4]
    for a, b in zip(ref, res):
        for k in a:
            # timings and the process's peak resident memory (all runs share this pytest process) are measurements
            if k not in ("time_s", "step_time_s", "peak_memory_mb"):
                assert abs(a[k] - b[k]) <= 1e-6, (a["step"], k, a[k], b[k])


def test_ppo_with_reward_model_first_ratio_is_one(models, rm_run):
    out = models / "ppo"
    train_rlhf.main(["--algo", "ppo", "--init", str(models / "sft"), "--reward-model", str(rm_run),
                     "--max-steps", "2", "--batch-size", "8", "--minibatch-size", "4", "--epochs", "2",
                     "--lr", "1e-3", "--target-kl", "1", "--out", str(out), *SMALL])
    records, _ = check_run(out, "ppo", 2, ["reward", "score", "kl", "entropy", "pg_loss", "value_loss",
                                           "clipfrac", "approx_kl", "approx_kl_first", "kl_coef"])
    for r in records[1:]:
        # old log-probs come from the sampler at the sampling temperature: the first minibatch's ratio is 1
        # up to float rounding (approx_kl = 0.5 mean(log ratio^2); a log ratio of 1e-5 would give 5e-11)
        assert r["approx_kl_first"] < 1e-10
        assert r["approx_kl"] > 1e-8  # later minibatches moved: the check above can fail
    assert records[1]["kl"] == pytest.approx(0.0, abs=1e-5)  # first rollout: policy == reference
    assert records[2]["kl_coef"] != records[1]["kl_coef"]  # the adaptive controller moved beta
    state = torch.load(out / "ckpt" / "state.pt", weights_only=True)
    assert "score_head.weight" in state["trainer"]["critic"]


@pytest.mark.parametrize("algo,extra", [("nft", []), ("rft", []), ("grpo", []), ("grpo", ["--dr-grpo", "--kl-coef", "0"])])
def test_group_algorithms_run(models, algo, extra):
    out = models / f"{algo}{len(extra)}"
    train_rlhf.main(["--algo", algo, "--init", str(models / "sft"), "--reward", "rewards_for_test:odd_length",
                     "--max-steps", "2", "--batch-size", "3", "--k", "4", "--minibatch-size", "4",
                     "--out", str(out), *SMALL, *extra])
    records, ck = check_run(out, algo, 2, ["reward", "accuracy", "kl", "entropy", "loss", "groups_filtered",
                                           "samples_used"])
    for r in records[1:]:
        assert 0 <= r["groups_filtered"] <= 3 and r["samples_used"] <= 12
    assert any(r["samples_used"] > 0 for r in records[1:]), "no group carried signal: the loss never ran"
    assert torch.equal(ck.model.transformer.wte.weight, ck.model.lm_head.weight)


def test_eos_score_is_read_at_last_real_token_and_padding_is_ignored():
    torch.manual_seed(0)
    rm = GPT(GPTConfig(block_size=32, vocab_size=50, n_layer=2, n_head=2, n_embd=32, scalar_head=True)).eval()
    pad, eos = 49, 48
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10]]
    responses = [[11, 12, eos], [13, eos], [14, 15, 16, 17, eos]]
    seqs = pack(prompts, responses, pad)
    assert seqs.last.tolist() == [len(p) + len(r) - 2 for p, r in zip(prompts, responses)]
    assert (seqs.ids.gather(1, (seqs.last + 1)[:, None]) == eos).all()
    with torch.no_grad():
        batch = eos_scores(rm, seqs.ids, seqs.last + 1)
        for i, (p, r) in enumerate(zip(prompts, responses)):
            alone = torch.tensor([p + r])
            naive = rm.scores(rm(alone))[0, -1]  # the score at the final token of the unpadded row
            assert_close(batch[i], naive, rtol=1e-5, atol=1e-6)
        # changing what sits in the padding changes nothing
        noisy = seqs[torch.arange(3)]
        noisy.ids = noisy.ids.masked_fill(noisy.ids == pad, 7)
        assert_close(eos_scores(rm, noisy.ids, noisy.last + 1), batch, rtol=0, atol=1e-6)
        # ... but the score does depend on the EOS position's prefix (the check can fail)
        assert not torch.allclose(batch[0], rm.scores(rm(torch.tensor([[1, 2, 3, 11, 12]])))[0, -1])


def test_sequence_logprobs_cover_exactly_the_response():
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=32, vocab_size=40, n_layer=1, n_head=2, n_embd=16))
    seqs = pack([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]], pad_id=39)
    logp = sequence_logprobs(m, seqs, temperature=0.7)
    # naive: full softmax of the logits / T at each position, read at the next token
    with torch.no_grad():
        for i, (p, r) in enumerate([([1, 2, 3], [5, 6]), ([4], [7, 8, 9])]):
            ids = torch.tensor([p + r])
            lp = torch.log_softmax(m.logits(m(ids)) / 0.7, dim=-1)[0]  # (L, V)
            want = sum(lp[len(p) - 1 + j, t].item() for j, t in enumerate(r))
            assert logp[i].sum().item() == pytest.approx(want, abs=1e-5)
            assert int(seqs.mask[i].sum()) == len(r)
    assert (logp <= 0).all()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_rollout_logprobs_are_the_teacher_forced_ones(models, temperature):
    """The old log-probs the RL updates now take from the sampler (Rollout.logprobs, .entropy) against the
    second forward they replace (sequence_logprobs of the same policy): same layout, zero off the mask, and
    equal up to float rounding (float32 CPU; the measured gap is well under 1e-5, the tolerance here)."""
    from minipost.rollout import sample_rollout
    ck = load_checkpoint(models / "sft")
    rows = get_task("arith").prompts("train", 6, seed=3)
    r = sample_rollout(ck.model, ck.tokenizer, rows, 4, 12, temperature, seed=5)
    with torch.no_grad():
        want, want_ent = sequence_logprobs(ck.model, r.seqs, temperature, entropy=True)
    assert (r.logprobs[r.seqs.mask == 0] == 0).all() and (r.entropy[r.seqs.mask == 0] == 0).all()
    assert (r.logprobs[r.seqs.mask == 1] < 0).all() and (r.entropy[r.seqs.mask == 1] > 0).all()
    assert_close(r.logprobs, want, rtol=0, atol=1e-5)
    assert_close(r.entropy, want_ent, rtol=0, atol=1e-5)


def test_builtin_pairs_rank_by_reward(monkeypatch):
    """build_pairs on a scripted rollout: best finished sample vs worst finished one, ties skipped."""
    task = get_task("arith")
    rows = task.prompts("train", 3, seed=0)
    answers = [int(r["answer"]) for r in rows]
    texts = [[f"The answer is {answers[0]}.", f"The answer is {answers[0] + 1}.", "no number", f"{answers[0]}"],
             [f"The answer is {answers[1] + 2}.", "x", f"The answer is {answers[1] + 3}.", "y"],  # all wrong
             [f"The answer is {answers[2]}.", f"The answer is {answers[2]}.", "7 + 1 = 9.",
              f"The answer is {answers[2]}."]]
    finished = [[True, True, True, False], [True, True, True, True], [True, True, True, True]]

    class Tok:
        pad_id, eos_id = 0, 1

    def fake_rollout(model, tokenizer, chunk, k, max_new_tokens, temperature, seed):
        flat = [t for g in texts[:len(chunk)] for t in g]
        prompts, responses = [[5, 6]] * len(flat), [[10 + i, 1] for i in range(len(flat))]
        return Rollout(pack(prompts, responses, 0), [chunk[i // k] for i in range(len(flat))], prompts, responses,
                       flat, torch.tensor([f for g in finished[:len(chunk)] for f in g]))

    monkeypatch.setattr(preferences, "sample_rollout", fake_rollout)
    monkeypatch.setattr(preferences, "prompt_ids", lambda tok, chunk: [[5, 6]] * len(chunk))
    pairs, records = preferences.build_pairs(None, Tok(), Reward("arith", fn=task.reward), rows, 4, 8)
    assert len(pairs) == 2  # the all-wrong group is a tie
    assert [r["chosen"] for r in records] == [texts[0][0], texts[2][0]]
    assert [r["rejected"] for r in records] == [texts[0][1], texts[2][2]]  # the unfinished "{answer}" is skipped
    assert pairs[0] == ([5, 6], [10, 1], [11, 1])
    for rec, row in zip(records, [rows[0], rows[2]]):  # re-scored independently by the verifier
        got = task.reward([row["prompt"]] * 2, [rec["chosen"], rec["rejected"]], answer=[row["answer"]] * 2)
        assert got == [1.0, 0.0] and rec["chosen_reward"] > rec["rejected_reward"]


def test_reward_function_output_is_checked(models):
    rows = [{"prompt": "q"}] * 2
    with pytest.raises(UserError, match="rewards_for_test:wrong_length returned 1 rewards for 2 completions"):
        call_reward(__import__("rewards_for_test").wrong_length, rows, ["a", "b"])
    with pytest.raises(UserError, match=r"returned 'high' \(str\) for completion 0; rewards must be numbers"):
        call_reward(__import__("rewards_for_test").not_numbers, rows, ["a", "b"])
    with pytest.raises(UserError, match="failed: ValueError: arith_reward needs the 'answer' column"):
        call_reward(get_task("arith").reward, rows, ["a", "b"])
    assert call_reward(lambda p, c: [1, True], rows, ["a", "b"]) == [1.0, 1.0]


def test_epoch_indices_are_permutations_of_the_data():
    seen = [i for s in range(5) for i in epoch_indices(s, 4, 10, seed=3)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    assert seen[:10] != seen[10:20]


def test_demo_pairs_prefer_the_demonstration_to_the_worst_sample(monkeypatch):
    """demo_pairs on a scripted rollout: the demonstration (chosen) against the worst non-blank sample of its
    prompt (rejected, finished or cut off), only where the verifier ranks the demonstration higher."""
    task = get_task("arith")
    rows = task.prompts("train", 3, seed=0)
    demos = [d["messages"][-1]["content"] for d in task.demos("train", 3, seed=0)]
    answers = [int(r["answer"]) for r in rows]
    texts = [[f"The answer is {answers[0]}.", f"The answer is {answers[0] + 1}."],  # one right, one wrong
             [f"The answer is {answers[1]}.", f"The answer is {answers[1]}."],  # both right: no pair
             [" ", f"The answer is {answers[2] + 4}"]]  # blank (never rejected) and a wrong cut-off answer

    class Tok:
        pad_id, eos_id = 0, 1

        def encode(self, text):
            return [7] * len(text.split())

        def render_prompt(self, messages):
            return [5, 6]

    def fake_rollout(model, tokenizer, chunk, k, max_new_tokens, temperature, seed):
        flat = [t for g in texts[:len(chunk)] for t in g]
        prompts, responses = [[5, 6]] * len(flat), [[10 + i, 1] for i in range(len(flat))]
        return Rollout(pack(prompts, responses, 0), [chunk[i // k] for i in range(len(flat))], prompts, responses,
                       flat, torch.tensor([True, True, True, True, True, False]))

    monkeypatch.setattr(preferences, "sample_rollout", fake_rollout)
    monkeypatch.setattr(preferences, "prompt_ids", lambda tok, chunk: [[5, 6]] * len(chunk))
    assert all(task.reward([r["prompt"]], [d], answer=[r["answer"]]) == [1.0] for r, d in zip(rows, demos))
    pairs, records = preferences.demo_pairs(None, Tok(), Reward("arith", fn=task.reward), rows, demos, 2, 8, 128)
    assert [r["chosen"] for r in records] == [demos[0], demos[2]]
    assert [r["rejected"] for r in records] == [texts[0][1], texts[2][1]]
    assert [(r["chosen_reward"], r["rejected_reward"]) for r in records] == [(1.0, 0.0), (1.0, 0.0)]
    assert pairs[0] == ([5, 6], [7] * len(demos[0].split()) + [1], [7] * len(texts[0][1].split()) + [1])


@pytest.mark.parametrize("argv,message", [
    (["--algo", "dpo", "--init", "{base}"], "is a base model (kind 'base'): fine-tune it first with python train_sft.py"),
    (["--algo", "rm", "--init", "{sft}", "--data", "{bad_pairs}"], "expected prompt+chosen+rejected"),
    (["--algo", "dpo", "--init", "{sft}", "--val-data", "{bad_pairs}"], "--val-data needs --data"),
    (["--algo", "grpo", "--init", "{sft}", "--pairs-from-demos"], "it is for --algo rm or dpo, not grpo"),
    (["--algo", "rm", "--init", "{sft}", "--pairs-from-demos", "--data", "{bad_pairs}"],
     "--pairs-from-demos builds pairs from the task's demonstrations: not with --data"),
])
def test_bad_input_one_line_exit_2(models, argv, message):
    bad = models / "bad_pairs.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "chosen": "b"}) + "\n")  # no rejected column
    argv = [a.format(base=models / "base", sft=models / "sft", bad_pairs=bad) for a in argv]
    r = run_script(*argv, "--out", str(models / "never"))
    assert r.returncode == 2, r.stderr[-2000:]
    assert len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("argv,message", [
    (["--algo", "ppo", "--reward-model", "{sft}"], "not a reward model (kind 'sft'"),
    (["--algo", "grpo", "--reward", "no_such_module:f"], "--reward no_such_module:f: cannot import module 'no_such_module'"),
    (["--algo", "grpo", "--reward", "rewards_for_test:not_callable"], "'not_callable' is a int, not a function"),
    (["--algo", "nft", "--reward", "rewards_for_test"], "expected MODULE:FUNCTION"),
    (["--algo", "rm", "--init", "{rm}"], "is a reward model; pass the SFT checkpoint"),
])
def test_bad_reward_sources_are_user_errors(models, rm_run, argv, message):
    argv = [a.format(sft=models / "sft", rm=rm_run) for a in argv]
    if "--init" not in argv:
        argv += ["--init", str(models / "sft")]
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        train_rlhf.main(argv + ["--out", str(models / "never"), *SMALL])


def test_wrong_length_reward_stops_the_run(models):
    with pytest.raises(UserError, match="rewards_for_test:wrong_length returned 1 rewards for 8 completions"):
        train_rlhf.main(["--algo", "grpo", "--init", str(models / "sft"), "--reward", "rewards_for_test:wrong_length",
                         "--max-steps", "1", "--batch-size", "2", "--k", "4", "--out", str(models / "wl"), *SMALL])


def test_ppo_first_ratio_is_one_at_another_temperature(models):
    """Old, new and reference log-probs all divide the logits by --temperature: at T = 0.7 the first
    minibatch's ratio is still 1. Without a reward model the critic is the policy trunk with a zero head."""
    out = models / "ppo-t07"
    train_rlhf.main(["--algo", "ppo", "--init", str(models / "sft"), "--reward", "rewards_for_test:digit_count",
                     "--temperature", "0.7", "--max-steps", "2", "--batch-size", "8", "--minibatch-size", "4",
                     "--epochs", "2", "--lr", "1e-3", "--out", str(out), *SMALL])
    records, _ = check_run(out, "ppo", 2, ["approx_kl_first", "approx_kl", "kl_coef"])
    for r in records[1:]:
        assert r["approx_kl_first"] < 1e-10
        assert r["approx_kl"] > 1e-8  # later minibatches moved, so the first check can fail
        assert r["kl_coef"] == 0.05  # no --target-kl: the ppo default beta, fixed


def test_ipo_and_label_smoothing_end_to_end(models, monkeypatch):
    """IPO's first loss is (0 - 1/(2 beta))^2 = 25 at beta 0.1 (policy = reference, h = 0), where DPO's is
    log 2. --label-smoothing e reaches the loss: every logged loss equals -(1 - e) log sigmoid(beta h) -
    e log sigmoid(-beta h), recomputed here in float64 from the log-probs the loss was given."""
    from minipost import losses
    common = ["--algo", "dpo", "--init", str(models / "sft"), "--data", str(models / "pairs.jsonl"),
              "--max-steps", "3", "--batch-size", "4", "--lr", "1e-3", *SMALL]
    train_rlhf.main(common + ["--ipo", "--out", str(models / "ipo")])
    records, _ = check_run(models / "ipo", "dpo", 3, ["loss", "chosen_reward"])
    assert records[1]["loss"] == pytest.approx(25.0, rel=1e-6)
    assert records[3]["loss"] < 25.0  # IPO pushes h towards 1/(2 beta) = 5

    seen, real = [], losses.dpo_loss
    monkeypatch.setattr(losses, "dpo_loss", lambda *a: seen.append(a) or real(*a))
    train_rlhf.main(common + ["--beta", "0.5", "--label-smoothing", "0.2", "--out", str(models / "cdpo")])
    records, _ = check_run(models / "cdpo", "dpo", 3, ["loss"])
    train_calls = [a for a in seen if a[0].requires_grad]  # the held-out evaluations run under no_grad
    assert len(train_calls) == 3
    for r, (pi_c, pi_r, ref_c, ref_r, beta, eps) in zip(records[1:], train_calls):
        assert (beta, eps) == (0.5, 0.2)
        h = (pi_c.double() - pi_r.double()) - (ref_c.double() - ref_r.double())
        want = -(0.8 * torch.nn.functional.logsigmoid(0.5 * h) + 0.2 * torch.nn.functional.logsigmoid(-0.5 * h))
        assert r["loss"] == pytest.approx(want.mean().item(), abs=1e-6)
    assert abs(records[3]["margin"]) > 1e-4  # the policy moved, so h != 0 was checked too


def test_pair_logprobs_summed_and_length_averaged():
    """DPO's summed and IPO's length-averaged response log-probs against a naive per-pair loop."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=32, vocab_size=40, n_layer=1, n_head=2, n_embd=16)).eval()
    pairs = [([1, 2, 3], [5, 6, 7, 8], [9]), ([4], [10, 11], [12, 13, 14])]
    with torch.no_grad():
        sums = preferences.pair_logprob_sums(m, pairs, pad_id=39, device="cpu")
        means = preferences.pair_logprob_sums(m, pairs, pad_id=39, device="cpu", average=True)
        for i, (p, chosen, rejected) in enumerate(pairs):
            for side, resp in ((0, chosen), (1, rejected)):
                lp = torch.log_softmax(m.logits(m(torch.tensor([p + resp]))), dim=-1)[0]  # (L, V)
                total = sum(lp[len(p) - 1 + j, t].item() for j, t in enumerate(resp))
                assert sums[side][i].item() == pytest.approx(total, abs=1e-5)
                assert means[side][i].item() == pytest.approx(total / len(resp), abs=1e-5)


def test_group_objectives_get_the_right_samples_and_one_normaliser(models, monkeypatch):
    """Spies on the loss functions: RFT's minibatches hold only correct samples while NFT's hold wrong ones
    too; NFT and Dr.GRPO divide by the same constant, minibatch-size x max-new-tokens."""
    from minipost import losses
    calls = []
    for name in ("nft_loss", "dr_grpo_loss"):
        real = getattr(losses, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls.append((_name, args, kwargs))
            return _real(*args, **kwargs)
        monkeypatch.setattr(losses, name, spy)
    argv = ["--init", str(models / "sft"), "--reward", "rewards_for_test:odd_length", "--max-steps", "2",
            "--batch-size", "3", "--k", "4", "--minibatch-size", "5", *SMALL]
    seen = {}
    for algo, extra in (("rft", []), ("nft", []), ("grpo", ["--dr-grpo"])):
        calls.clear()
        train_rlhf.main(["--algo", algo, *argv, *extra, "--out", str(models / f"spy-{algo}")])
        assert calls, f"{algo}: no minibatch carried signal"
        seen[algo] = calls[:]
    max_new = int(SMALL[SMALL.index("--max-new-tokens") + 1])
    for name, args, kwargs in seen["rft"]:
        assert name == "nft_loss" and bool(args[3].all())  # `correct` of every sample in the minibatch
    assert any(not bool(args[3].all()) for _, args, _ in seen["nft"])  # NFT learns from the wrong ones too
    assert {kwargs["normaliser"] for _, _, kwargs in seen["nft"]} == {5 * max_new}
    assert {args[5] for name, args, _ in seen["grpo"] if name == "dr_grpo_loss"} == {5 * max_new}
    # partial minibatches occurred (a last one with fewer than 5 rows), where the shared constant matters
    assert any(len(args[0]) < 5 for _, args, _ in seen["nft"] + seen["grpo"])


# -----------------------------------------------------------------------------------------------------------
# python -m minipost.evaluate: the validation split and the reward model's score (the SFT model trained on
# the first 64 train demonstrations)

EVAL = ["--task", "arith", "--n-eval", "3", "--k", "2", "--max-new-tokens", "6", "--device", "cpu"]


def test_evaluate_validation_split_is_held_out_train_problems(models, tmp_path, monkeypatch):
    from minipost import evaluate
    seen = []
    policy = evaluate.evaluate_policy
    monkeypatch.setattr(evaluate, "evaluate_policy", lambda m, t, task, rows, *a, **k: (
        seen.append(rows), policy(m, t, task, rows, *a, **k))[1])
    out = tmp_path / "eval.json"
    evaluate.main(["--init", str(models / "sft"), *EVAL, "--validation-from", "64", "--out", str(out)])
    row = json.loads(out.read_text())
    assert row["validation_from"] == 64 and len(row["val_rewards"]) == 3
    assert row["val_reward"] == pytest.approx(sum(row["val_rewards"]) / 3) and 0 <= row["val_format"] <= 1
    task = get_task("arith")
    val = seen[-1]  # test, ood, then val
    assert val == task.prompts("train", 67, seed=0)[64:]
    # the problems SFT trained on (train_sft.py: the task's first --n-train demos) are the 64 before them
    trained = {d["messages"][0]["content"] for d in task.demos("train", 64, seed=0)}
    questions = [r["prompt"][0]["content"] for r in val]
    assert not trained & set(questions)
    assert questions == [d["messages"][0]["content"] for d in task.demos("train", 67, seed=0)[64:]]
    # greedy, so an independent call gives the same per-prompt rewards
    ck = load_checkpoint(models / "sft")
    assert row["val_rewards"] == policy(ck.model.eval(), ck.tokenizer, task, val, 6, 0.0)["rewards"]
    with pytest.raises(UserError, match="^--validation-from must be >= 0$"):
        evaluate.main(["--init", str(models / "sft"), *EVAL, "--validation-from", "-1"])


def test_evaluate_reward_model_scores_the_kl_samples(models, rm_run, tmp_path):
    """test_proxy_reward: the reward model's mean score of exactly the k T = 1 samples per test prompt whose
    ground truth is test_sample_reward, recomputed here from a rollout with the same seed."""
    from minipost import evaluate
    from minipost.rewards import score_with_reward_model
    from minipost.rollout import sample_rollout

    out = tmp_path / "eval.json"
    evaluate.main(["--init", str(models / "sft"), *EVAL, "--reward-model", str(rm_run), "--out", str(out)])
    row = json.loads(out.read_text())
    assert row["reward_model"] == str(rm_run)
    ck, rm = load_checkpoint(models / "sft"), load_checkpoint(rm_run)
    task = get_task("arith")
    r = sample_rollout(ck.model.eval(), ck.tokenizer, task.prompts("test", 3, seed=1), 2, 6, 1.0, seed=7)
    scores = score_with_reward_model(rm.model.eval(), rm.tokenizer, r.prompts, r.completions)
    assert row["test_proxy_reward"] == pytest.approx(scores.mean().item(), abs=1e-6)
    truth = task.reward(None, r.texts, answer=[x["answer"] for x in r.rows])
    assert row["test_sample_reward"] == pytest.approx(sum(truth) / 6, abs=1e-12)
    evaluate.main(["--init", str(models / "sft"), *EVAL, "--out", str(tmp_path / "plain.json")])
    plain = json.loads((tmp_path / "plain.json").read_text())
    assert "test_proxy_reward" not in plain and "reward_model" not in plain and "val_reward" not in plain
    assert plain["test_sample_reward"] == row["test_sample_reward"]  # the reward model changes no sample
    with pytest.raises(UserError, match=r"^--reward-model .*nowhere: not a minipost checkpoint"):
        evaluate.main(["--init", str(models / "sft"), *EVAL, "--reward-model", str(tmp_path / "nowhere")])
    with pytest.raises(UserError, match=r"^--reward-model .*: not a reward model \(kind 'sft'"):
        evaluate.main(["--init", str(models / "sft"), *EVAL, "--reward-model", str(models / "sft")])

