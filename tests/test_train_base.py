"""train_base.py end to end on a tiny corpus: learning, checkpoints, kill-and-resume, bad input."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train_base
from minipost import checkpoint as ckpt_mod
from minipost.checkpoint import find_checkpoint, load_checkpoint
from minipost.cli import UserError, read_metrics

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--task", "arith", "--corpus-docs", "400", "--vocab-size", "320", "--block-size", "48",
        "--batch-size", "8", "--eval-batches", "2", "--lr", "3e-3", "--warmup", "5"]


def run_script(*argv, timeout=120):
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_base_run_learns_and_checkpoints(tmp_path):
    out = tmp_path / "base"
    train_base.main(TINY + ["--max-steps", "30", "--eval-every", "30", "--ckpt-every", "15", "--out", str(out)])
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 31))
    first, last = records[0]["loss"], records[-1]["loss"]
    assert last < first - 1.0, (first, last)  # from ~log(320) = 5.8 towards the corpus entropy
    assert records[-1]["val_loss"] < first - 1.0
    ck = load_checkpoint(out)
    assert ck.meta["step"] == 30 and ck.meta["kind"] == "base"
    assert ck.model.config.vocab_size == ck.tokenizer.vocab_size
    assert not (out / "ckpt.tmp").exists() and not (out / "ckpt.old").exists()


def test_killed_run_resumes_with_identical_losses(tmp_path):
    common = TINY + ["--max-steps", "40", "--eval-every", "20", "--ckpt-every", "4"]
    # uninterrupted reference, in this process
    ref_out = tmp_path / "ref"
    train_base.main(common + ["--out", str(ref_out)])
    reference = read_metrics(ref_out / "metrics.jsonl")

    # the same run in a subprocess, SIGKILLed once it has written a checkpoint, then resumed
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "train_base.py", *common, "--out", str(out)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while find_checkpoint(out) is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = json.loads((find_checkpoint(out) / "meta.json").read_text())["step"]
    assert killed_at < 40, "the run finished before it could be killed"
    train_base.main(common + ["--out", str(out), "--resume"])
    resumed = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [r["step"] for r in reference]
    for a, b in zip(resumed, reference):
        assert abs(a["loss"] - b["loss"]) <= 1e-6, (a["step"], a["loss"], b["loss"])
        assert abs(a.get("val_loss", 0) - b.get("val_loss", 0)) <= 1e-6
    w_ref = torch.load(ref_out / "ckpt" / "model.pt", weights_only=True)
    w_res = torch.load(out / "ckpt" / "model.pt", weights_only=True)
    for k in w_ref:
        torch.testing.assert_close(w_res[k], w_ref[k], rtol=0, atol=1e-6)


def test_interrupted_checkpoint_write_leaves_previous_loadable(tmp_path, monkeypatch):
    out = tmp_path / "run"
    train_base.main(TINY + ["--max-steps", "2", "--eval-every", "2", "--ckpt-every", "2", "--out", str(out)])
    ck = load_checkpoint(out)
    real_save = torch.save

    def dying_save(obj, f, *a, **kw):  # the new weights get half written, then the process "dies"
        real_save(obj, f, *a, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_mod.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt_mod.save_checkpoint(out, ck.model, ck.tokenizer, {"step": 99})
    monkeypatch.undo()
    assert load_checkpoint(out).meta["step"] == 2
    # killed between the two renames: only ckpt.old is there
    (out / "ckpt").rename(out / "ckpt.old")
    assert load_checkpoint(out).meta["step"] == 2
    # a later save cleans up both leftovers
    ckpt_mod.save_checkpoint(out, ck.model, ck.tokenizer, {"step": 3})
    assert load_checkpoint(out).meta["step"] == 3
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("ckpt")) == ["ckpt"]


def test_load_rejects_non_checkpoints_and_mismatched_weights(tmp_path):
    with pytest.raises(UserError, match="not a minipost checkpoint"):
        load_checkpoint(tmp_path)
    out = tmp_path / "run"
    train_base.main(TINY + ["--max-steps", "1", "--eval-every", "1", "--out", str(out)])
    cfg = json.loads((out / "ckpt" / "config.json").read_text())
    cfg["n_embd"] = 64
    (out / "ckpt" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="weights do not fit the saved config"):
        load_checkpoint(out)


@pytest.mark.parametrize("argv,message", [
    (["--task", "nope"], "--task: unknown task 'nope'"),
    (["--data", "missing.txt"], "--data missing.txt: no such file"),
    (["--max-steps", "0"], "--max-steps must be >= 1"),
])
def test_bad_input_one_line_exit_2(argv, message):
    r = run_script("train_base.py", *argv, "--out", "/tmp/minipost-never-written")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and message in r.stderr
    assert "Traceback" not in r.stderr


def test_bad_text_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    r = run_script("train_base.py", "--data", str(empty), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and f"--data {empty}: empty file" in r.stderr
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"abc\xff\xfe")
    r = run_script("train_base.py", "--data", str(binary), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "not UTF-8 text (byte 3)" in r.stderr


def test_resume_with_another_shape_is_refused(tmp_path):
    out = tmp_path / "run"
    train_base.main(TINY + ["--max-steps", "1", "--eval-every", "1", "--out", str(out)])
    r = run_script("train_base.py", *TINY, "--max-steps", "2", "--block-size", "64", "--out", str(out), "--resume")
    assert r.returncode == 2
    assert "has another shape: block_size=48 (flags ask 64)" in r.stderr and "Traceback" not in r.stderr
