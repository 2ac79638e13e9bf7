"""The scripts under torchrun (minipost/distributed.py): 2 CPU processes on gloo against one process.

--batch-size is the global batch, so a 2-process run with the same flags must compute what one process
computes: the same losses step for step (float summation order aside: 1e-5), the same samples, the same final
weights, the same best-of-N file. A 2-process run killed after a checkpoint resumes with 2 processes and with 1.
Each 2-process run is a `python -m torch.distributed.run` subprocess (a few seconds of start-up each); the
one-process reference runs in this process.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import sample_bon
import train_base
import train_rlhf
import train_sft
from minipost import distributed
from minipost.checkpoint import find_checkpoint
from minipost.cli import UserError, read_metrics, run_main
from minipost.tasks import get_task

ROOT = Path(__file__).resolve().parent.parent
LOGGING_REWARD = '''
import json, os

def odd_length(prompts, completions, **kwargs):
    """0/1 and varied (groups carry signal); logs every call's completions to LOGDIR/rankR.jsonl."""
    with open(os.path.join(os.environ["LOGDIR"], "rank" + os.environ.get("RANK", "0") + ".jsonl"), "a") as f:
        f.write(json.dumps(completions) + "\\n")
    return [float(len(c) % 2) for c in completions]
'''
EVAL = ["--n-eval", "3", "--max-new-tokens", "8"]  # 3 prompts: shares of 1 and 2
RL = ["--n-kl", "3", "--warmup", "1", "--lr", "1e-3", "--eval-every", "3"]  # train_rlhf.py: evaluations at 0, 3, 6


def torchrun(script, *args, env=None, check=True, **popen):
    """`python -m torch.distributed.run` with 2 processes; `--` keeps torchrun from reading the script's flags
    as abbreviations of its own (sample_bon.py's --n)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--", script,
           *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    if popen:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **popen)
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert not check or r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny arith base and SFT model, a pairs file and the logging reward module (on PYTHONPATH)."""
    root = tmp_path_factory.mktemp("dist")
    train_base.main(["--task", "arith", "--preset", "micro", "--corpus-docs", "300", "--vocab-size", "300",
                     "--block-size", "96", "--batch-size", "16", "--eval-batches", "1", "--max-steps", "40",
                     "--lr", "3e-3", "--warmup", "5", "--out", str(root / "base")])
    train_sft.main(["--init", str(root / "base"), "--n-train", "64", "--n-eval", "1", "--max-new-tokens", "4",
                    "--max-steps", "40", "--batch-size", "16", "--lr", "3e-3", "--warmup", "2", "--eval-every",
                    "40", "--out", str(root / "sft")])
    with open(root / "pairs.jsonl", "w") as f:  # the worked answer beats a wrong one
        for r in get_task("arith").demos("train", 24, seed=1):
            f.write(json.dumps({"prompt": r["messages"][0]["content"], "chosen": r["messages"][1]["content"],
                                "rejected": f"The answer is {int(r['answer']) + 1}."}) + "\n")
    (root / "logging_reward.py").write_text(LOGGING_REWARD)
    sys.path.insert(0, str(root))
    yield root
    sys.path.remove(str(root))


def same_trajectory(one, two, keys):
    """Every step's logged `keys` agree within 1e-5 (relative beyond 1): same steps, same evaluations."""
    a, b = read_metrics(one / "metrics.jsonl"), read_metrics(two / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert set(ra) == set(rb)
        for k in keys:
            if k in ra:
                assert abs(ra[k] - rb[k]) <= 1e-5 * max(1.0, abs(ra[k])), (ra["step"], k, ra[k], rb[k])
    return a


def same_weights(one, two):
    """The final checkpoints hold the same weights (1e-5), except where the true gradient is 0 and Adam turns
    float noise, which differs with the summation order, into steps of up to the learning rate: the key third of
    each attention's c_attn.bias (it shifts every score of a query alike, which softmax cancels) and, in a reward
    model, ln_f.bias and score_head.bias (they shift every reward alike, which Bradley-Terry cancels); what those
    two do to the rewards, score_head.weight . ln_f.bias + score_head.bias, is set by the centring and compared."""
    wa = torch.load(one / "ckpt" / "model.pt", weights_only=True)
    wb = torch.load(two / "ckpt" / "model.pt", weights_only=True)
    assert wa.keys() == wb.keys()
    if "score_head.bias" in wa:
        for w in (wa, wb):
            w["score_head.bias"] = w["score_head.weight"] @ w.pop("transformer.ln_f.bias") + w["score_head.bias"]
    for k in wa:
        a, b = wa[k], wb[k]
        if k.endswith("attn.c_attn.bias"):
            C = a.shape[0] // 3
            a, b = torch.cat([a[:C], a[2 * C:]]), torch.cat([b[:C], b[2 * C:]])  # query and value parts
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5, msg=lambda m: f"{k}: {m}")


def test_sft_two_ranks_equal_one_process(models, tmp_path):
    """Each rank takes half of the 8 sequences, in 2 micro-batches; the trained-token denominator is global."""
    args = ["--init", models / "sft", "--n-train", "48", "--batch-size", "8", "--grad-accum", "2", "--max-steps",
            "6", "--eval-every", "3", "--lr", "3e-3", "--warmup", "2", *EVAL]
    train_sft.main([str(a) for a in args] + ["--out", str(tmp_path / "one")])
    torchrun("train_sft.py", *args, "--out", tmp_path / "two")
    records = same_trajectory(tmp_path / "one", tmp_path / "two",
                              ["loss", "ce", "p_mean", "grad_norm", "val_loss", "test_reward", "ood_format"])
    assert records[-1]["loss"] < records[1]["loss"]  # it trained
    same_weights(tmp_path / "one", tmp_path / "two")


def test_dpo_two_ranks_equal_one_process(models, tmp_path):
    """Each rank takes 2 of the 4 pairs; the reference log-probs and the held-out pairs are scored in shares."""
    args = ["--algo", "dpo", "--init", models / "sft", "--data", models / "pairs.jsonl", "--batch-size", "4",
            "--max-steps", "6", *RL, *EVAL]
    train_rlhf.main([str(a) for a in args] + ["--out", str(tmp_path / "one")])
    torchrun("train_rlhf.py", *args, "--out", tmp_path / "two")
    records = same_trajectory(tmp_path / "one", tmp_path / "two",
                              ["loss", "accuracy", "margin", "chosen_reward", "rejected_reward", "entropy",
                               "grad_norm", "val_accuracy", "test_kl", "test_entropy", "test_reward"])
    assert records[-1]["loss"] < records[1]["loss"]
    same_weights(tmp_path / "one", tmp_path / "two")


def kill_job(proc):
    """SIGKILL torchrun and its workers, and wait until no worker runs. torchrun starts each worker in a session
    of its own, so killing torchrun's process group alone leaves them training to the end (they did: the test
    then copied a run that was still writing its checkpoints)."""
    def children(pid):
        return [int(p) for p in os.listdir("/proc") if p.isdigit() and proc_stat(p)[1] == str(pid)]

    def proc_stat(pid):  # (state, parent pid), or ("gone", "") once the process is reaped
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            return "gone", ""
        return fields[0], fields[1]
    workers, todo = [], [proc.pid]
    while todo:
        kids = children(todo.pop())
        workers += kids
        todo += kids
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun first, so it cannot restart a worker
    for pid in workers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    deadline = time.time() + 30
    while any(proc_stat(pid)[0] not in ("Z", "gone") for pid in workers):
        assert time.time() < deadline, "a worker outlived SIGKILL by 30 s"
        time.sleep(0.01)
    assert workers, "torchrun had no workers to kill"


def test_killed_base_run_resumes_with_two_ranks_and_with_one(tmp_path):
    """train_base.py under torchrun, SIGKILLed (torchrun and both workers) once it has checkpointed; a copy resumes
    with 2 processes and another with 1: both end as the uninterrupted one-process run does (cosine LR, so the
    same --max-steps throughout)."""
    args = ["--task", "arith", "--preset", "micro", "--corpus-docs", "300", "--vocab-size", "300", "--block-size",
            "48", "--batch-size", "8", "--eval-batches", "2", "--max-steps", "40", "--eval-every", "20",
            "--ckpt-every", "2", "--lr", "3e-3", "--warmup", "5"]
    train_base.main(args + ["--out", str(tmp_path / "reference")])
    killed = tmp_path / "killed"
    proc = torchrun("train_base.py", *args, "--out", killed, start_new_session=True)
    deadline = time.time() + 120
    while find_checkpoint(killed) is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    kill_job(proc)
    step = json.loads((find_checkpoint(killed) / "meta.json").read_text())["step"]
    assert step < 40, "the run finished before it could be killed"
    shutil.copytree(killed, tmp_path / "one")
    torchrun("train_base.py", *args, "--resume", "--out", killed)
    train_base.main(args + ["--resume", "--out", str(tmp_path / "one")])
    for resumed in (killed, tmp_path / "one"):
        records = same_trajectory(tmp_path / "reference", resumed, ["loss", "grad_norm", "val_loss", "tokens"])
        assert records[-1]["loss"] < records[0]["loss"] - 0.5  # it trained
        same_weights(tmp_path / "reference", resumed)


def test_grpo_two_ranks_sample_and_train_as_one_process(models, tmp_path, monkeypatch):
    """Each rank samples 2 of the 4 prompts' groups with the seeds one process uses for them: the completions
    (logged by the reward function, rank by rank), rewards, losses and weights are one process's. Minibatches
    of 3 of the global 16 rows straddle the ranks, and some leave a rank none of their rows."""
    args = ["--algo", "grpo", "--init", models / "sft", "--reward", "logging_reward:odd_length", "--batch-size",
            "4", "--k", "4", "--minibatch-size", "3", "--epochs", "2", "--max-steps", "3", *RL, *EVAL]
    for run in ("one", "two"):
        (tmp_path / f"log-{run}").mkdir()
    monkeypatch.setenv("LOGDIR", str(tmp_path / "log-one"))
    train_rlhf.main([str(a) for a in args] + ["--out", str(tmp_path / "one")])
    torchrun("train_rlhf.py", *args, "--out", tmp_path / "two",
             env={"LOGDIR": str(tmp_path / "log-two"), "PYTHONPATH": f"{models}{os.pathsep}{ROOT}"})

    def calls(path):
        return [json.loads(line) for line in path.read_text().splitlines()]
    one = calls(tmp_path / "log-one" / "rank0.jsonl")
    rank0, rank1 = calls(tmp_path / "log-two" / "rank0.jsonl"), calls(tmp_path / "log-two" / "rank1.jsonl")
    assert len(one) == len(rank0) == len(rank1) == 3  # one reward call per step
    assert [a + b for a, b in zip(rank0, rank1)] == one
    assert all(len(c) == 16 and len(a) == 8 for c, a in zip(one, rank0))
    records = same_trajectory(tmp_path / "one", tmp_path / "two",
                              ["reward", "accuracy", "kl", "entropy", "loss", "groups_filtered", "samples_used",
                               "finished", "test_kl", "test_entropy", "test_reward"])
    assert any(r.get("samples_used") for r in records)  # some group carried signal: the loss path ran
    same_weights(tmp_path / "one", tmp_path / "two")


@pytest.mark.parametrize("algo,extra,keys", [
    ("ppo", ["--reward", "logging_reward:odd_length", "--batch-size", "6", "--minibatch-size", "4", "--epochs", "2",
             "--target-kl", "1"],
     ["reward", "score", "kl", "entropy", "pg_loss", "value_loss", "clipfrac", "approx_kl", "kl_coef", "finished"]),
    ("rm", ["--data", "{models}/pairs.jsonl", "--batch-size", "4", "--val-frac", "0.25"],
     ["loss", "accuracy", "margin", "grad_norm", "val_accuracy", "val_loss"]),
])
def test_ppo_and_reward_model_two_ranks_equal_one_process(models, tmp_path, monkeypatch, algo, extra, keys):
    """PPO: advantages whitened over the global batch, token means over each global minibatch, a policy and a
    critic under DDP. rm: the bias centring (a change to every replica) agrees too."""
    args = ["--algo", algo, "--init", models / "sft", *[e.format(models=models) for e in extra], "--max-steps", "3",
            *RL, *EVAL]
    if algo == "rm":  # room for the SFT samples the bias is centred on to finish
        args += ["--max-new-tokens", "40"]
    monkeypatch.setenv("LOGDIR", str(tmp_path))
    train_rlhf.main([str(a) for a in args] + ["--out", str(tmp_path / "one")])
    torchrun("train_rlhf.py", *args, "--out", tmp_path / "two",
             env={"LOGDIR": str(tmp_path), "PYTHONPATH": f"{models}{os.pathsep}{ROOT}"})
    same_trajectory(tmp_path / "one", tmp_path / "two", keys + ["loss"])
    same_weights(tmp_path / "one", tmp_path / "two")


def test_bon_two_ranks_write_the_same_file(models, tmp_path):
    """5 prompts over 2 ranks (shares of 2 and 3): rank 0 writes what one process writes, byte for byte."""
    args = ["--init", models / "sft", "--n", "3", "--n-prompts", "5", "--max-new-tokens", "20", "--keep-all"]
    sample_bon.main([str(a) for a in args] + ["--out", str(tmp_path / "one")])
    torchrun("sample_bon.py", *args, "--out", tmp_path / "two")
    one = (tmp_path / "one" / "bon.jsonl").read_bytes()
    assert len(one.splitlines()) == 5
    assert (tmp_path / "two" / "bon.jsonl").read_bytes() == one


def test_batch_that_does_not_split_over_the_ranks_is_a_user_error(models, tmp_path):
    r = torchrun("train_rlhf.py", "--algo", "grpo", "--init", models / "sft", "--batch-size", "3", "--out",
                 tmp_path / "never", check=False)
    assert r.returncode != 0
    assert "error: --batch-size 3 (prompts) does not split evenly over 2 ranks (make it a multiple of 2)" in r.stderr
    assert "Traceback" not in r.stderr.split("error: --batch-size")[0]  # the scripts' own one line, no trace


def test_ranks_wait_for_each_other_after_a_clean_return_only(monkeypatch):
    """run_main's closing barrier: after main() returns under torchrun, and not after a user error (a failed
    rank must not wait for ranks that may be blocked in another collective)."""
    calls = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "barrier", lambda: calls.append("barrier"))
    run_main(lambda: calls.append("main"))
    assert calls == ["main", "barrier"]

    def failing():
        calls.append("failing main")
        raise UserError("a bad flag")
    with pytest.raises(SystemExit) as e:
        run_main(failing)
    assert e.value.code == 2 and calls == ["main", "barrier", "failing main"]


FAILING_RANK = """
import sys
import torch
sys.path.insert(0, sys.argv[1])
from minipost import distributed
from minipost.cli import UserError, run_main

def main():
    distributed.init(torch.device("cpu"))
    if distributed.rank() == 1:
        raise UserError("rank 1 found bad input")
    distributed.all_sum(1.0)  # rank 0 waits here for a rank that has left

run_main(main)
"""


def test_a_rank_that_fails_ends_the_run_instead_of_hanging_it(tmp_path):
    """Rank 1 exits with a user error while rank 0 is in a collective: the run ends (no rank waits on the
    closing barrier for it), torchrun fails, and rank 1's one-line error is there."""
    (tmp_path / "failing_rank.py").write_text(FAILING_RANK)
    r = torchrun(tmp_path / "failing_rank.py", ROOT, check=False)
    assert r.returncode != 0
    assert "error: rank 1 found bad input" in r.stderr


def test_helpers_in_one_process_hand_their_input_back(monkeypatch):
    """Without torchrun nothing is initialised: world 1, rank 0, every helper the identity (same objects)."""
    assert (distributed.world(), distributed.rank(), distributed.is_main()) == (1, 0, True)
    assert distributed.share(5) == (0, 5)
    t, items = torch.arange(6.0).view(2, 3), [1, 2]
    assert distributed.cat(t) is t and distributed.gather(items) is items and distributed.all_sum(t) is t
    model = torch.nn.Linear(2, 2)
    assert distributed.wrap(model) is model
    monkeypatch.setenv("WORLD_SIZE", "4")  # what torchrun would set: checked before any process group exists
    with pytest.raises(UserError, match="--grad-accum|micro-batches"):
        distributed.check_divisible(8, "--batch-size", per=4)
    distributed.check_divisible(16, "--batch-size", per=4)


def test_own_rows_of_a_global_minibatch():
    """A rank holding rows 4..7 of the batch: its rows of a minibatch, as local rows, in minibatch order; a stand-in
    row 0 (counted as none) when the minibatch holds none of them."""
    rows, n = distributed.own_rows(torch.tensor([6, 1, 4, 9]), 4, 8)
    assert rows.tolist() == [2, 0] and n == 2
    rows, n = distributed.own_rows(torch.tensor([1, 9]), 4, 8)
    assert rows.tolist() == [0] and n == 0


def test_minibatches_shuffle_each_epoch_and_weigh_two_ranks_as_one(monkeypatch):
    """Two epochs over 5 usable rows of a 10-row batch, minibatches of 2: each epoch a permutation of the rows
    drawn from seed + epoch. Split over two ranks (rows 0..4 and 5..9), each gets its own rows as local rows,
    and the two ranks' weights (all_sum stubbed as their sum) add up to one process's: 1 for every minibatch."""
    rows = torch.tensor([0, 3, 5, 6, 9])
    seen = [(mb.size, mb.rows.tolist(), mb.n) for mb in distributed.minibatches(rows, 0, 10, 2, 2, seed=7)]
    for epoch, part in enumerate((seen[:3], seen[3:])):
        perm = torch.randperm(5, generator=torch.Generator().manual_seed(7 + epoch))
        assert [r for _, rs, _ in part for r in rs] == rows[perm].tolist()
        assert [size for size, _, _ in part] == [2, 2, 1]
    assert list(distributed.minibatches(rows[:0], 0, 10, 2, 3, seed=7)) == []
    mask = torch.tensor([[1, 1, 0]] * 5 + [[1, 0, 0]] * 5)  # rows 0..4: 2 tokens each, 5..9: 1 token
    one = list(distributed.minibatches(rows, 0, 10, 2, 1, seed=7))
    low = list(distributed.minibatches(rows, 0, 5, 2, 1, seed=7))
    high = list(distributed.minibatches(rows, 5, 10, 2, 1, seed=7))
    for a, b, whole in zip(low, high, one):
        assert sorted(a.rows.tolist()[:a.n] + [r + 5 for r in b.rows.tolist()[:b.n]]) == sorted(whole.rows.tolist())
        assert a.n + b.n == whole.n == whole.size == a.size == b.size
        assert a.sequence_mean_weight() + b.sequence_mean_weight() == 1.0 == whole.sequence_mean_weight()
        assert (a.sum_weight(), b.sum_weight()) == (float(a.n > 0), float(b.n > 0)) and whole.sum_weight() == 1.0
        tokens = [mb.n and int(m[mb.rows].sum()) for mb, m in ((a, mask[:5]), (b, mask[5:]))]
        monkeypatch.setattr(distributed, "all_sum", lambda x: torch.tensor(float(sum(tokens))))
        weights = a.token_mean_weight(mask[:5]), b.token_mean_weight(mask[5:])
        assert [float(w) for w in weights] == [t / sum(tokens) for t in tokens]
        monkeypatch.undo()
        assert whole.token_mean_weight(mask) == 1.0
