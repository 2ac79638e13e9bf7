"""train_sft.py end to end on a tiny base: SFT and DFT learn, accumulation is exact, bad input exits 2."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_base
import train_sft
from minipost.checkpoint import load_checkpoint
from minipost.cli import UserError, read_metrics

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--n-train", "64", "--n-eval", "4", "--max-new-tokens", "12", "--batch-size", "8", "--warmup", "2"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    train_base.main(["--task", "arith", "--corpus-docs", "400", "--vocab-size", "320", "--block-size", "128",
                     "--batch-size", "8", "--eval-batches", "1", "--max-steps", "40", "--eval-every", "40",
                     "--out", str(out)])
    return out


@pytest.mark.parametrize("loss", ["sft", "dft"])
def test_sft_and_dft_train_and_checkpoint(base, tmp_path, loss):
    out = tmp_path / loss
    train_sft.main(["--init", str(base), "--loss", loss, "--max-steps", "12", "--eval-every", "12",
                    "--lr", "3e-3", "--out", str(out), *SMALL])
    records = read_metrics(out / "metrics.jsonl")
    assert records[0]["step"] == 0 and "test_reward" in records[0] and "ood_reward" in records[0]
    steps = [r for r in records if r["step"] > 0]
    assert [r["step"] for r in steps] == list(range(1, 13))
    # both raise the mean probability of the demonstrated tokens (DFT's objective is exactly that sum)
    assert steps[-1]["p_mean"] > steps[0]["p_mean"] + 0.1
    if loss == "dft":  # DFT's loss is the p-weighted CE: never above the plain CE it is logged beside
        assert all(r["loss"] <= r["ce"] + 1e-6 for r in steps)
    else:  # plain CE falls fast: the chat format is new to the base (DFT, from so weak a base, may raise CE)
        assert all(abs(r["loss"] - r["ce"]) < 1e-6 for r in steps)
        assert steps[-1]["ce"] < steps[0]["ce"] - 0.5 and records[-1]["val_loss"] < records[0]["val_loss"]
    ck = load_checkpoint(out)
    assert ck.meta["kind"] == loss and ck.meta["step"] == 12


def test_gradient_accumulation_matches_full_batch(base):
    """Gradients of 8 sequences in one batch equal the sum over 4 micro-batches of 2: every micro-batch loss
    divides by the global trained-token count, not by its own."""
    from minipost import losses
    from minipost.data import encode_conversations
    from minipost.tasks import get_task

    ck = load_checkpoint(base)
    model, tok = ck.model, ck.tokenizer
    rows = get_task("arith").demos("train", 8)
    examples, _ = encode_conversations(tok, rows, model.config.block_size)
    assert len({len(ids) for ids, _ in examples}) > 1  # unequal lengths: per-micro-batch means would differ
    grads = []
    for accum in (1, 4):
        model.zero_grad()
        batches = train_sft.micro_batches(examples, list(range(8)), accum, tok.pad_id, "cpu")
        n_tokens = sum(m.sum() for _, _, m in batches)
        for inputs, targets, mask in batches:
            losses.sft_loss(train_sft.masked_logprobs(model, inputs, targets, mask), mask, n_tokens).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-7)


def test_n_train_limits_task_demos_and_data_rows(tmp_path, capsys):
    """--n-train: the task's first N demos (4000 by default); with --data the file's first N rows (every row
    by default, all of them when N is larger)."""
    from minipost.tasks import get_task

    task = get_task("arith")
    data = tmp_path / "demos.jsonl"
    demos = task.demos("train", 5, seed=3)
    data.write_text("".join(json.dumps(d) + "\n" for d in demos))

    def rows(*flags):
        return train_sft.training_rows(train_sft.parse_args(["--init", "x", *flags]), task)

    assert train_sft.parse_args(["--init", "x"]).n_train is None
    assert rows("--data", str(data)) == (demos, [f"{data}:{i}" for i in range(1, 6)])
    assert rows("--data", str(data), "--n-train", "3") == (demos[:3], [f"{data}:{i}" for i in range(1, 4)])
    assert "the first 3 of 5 rows" in capsys.readouterr().out
    assert rows("--data", str(data), "--n-train", "9")[0] == demos
    assert "the first 5 of 5 rows" in capsys.readouterr().out
    assert rows("--n-train", "7") == (task.demos("train", 7, seed=0), None)
    default, where = rows()
    assert len(default) == 4000 and where is None and default[:7] == task.demos("train", 7, seed=0)
    for bad in ("0", "-2"):
        with pytest.raises(UserError, match="^--n-train must be >= 1$"):
            train_sft.parse_args(["--init", "x", "--data", str(data), "--n-train", bad])


def run(*argv):
    r = subprocess.run([sys.executable, "train_sft.py", *argv], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    return r.returncode, r.stderr.strip()


def test_bad_input(base, tmp_path):
    code, err = run("--init", str(tmp_path), "--out", str(tmp_path / "o"))
    assert code == 2 and "--init" in err and "not a minipost checkpoint" in err and len(err.splitlines()) == 1

    no_assistant = tmp_path / "a.jsonl"
    no_assistant.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    code, err = run("--init", str(base), "--data", str(no_assistant), "--out", str(tmp_path / "o"))
    assert code == 2 and err == f"error: {no_assistant}:1: 'messages' has no assistant turn to learn from"

    long_prompt = tmp_path / "b.jsonl"
    long_prompt.write_text(json.dumps({"prompt": "x" * 20, "completion": "ok"}) + "\n"
                           + json.dumps({"prompt": "7 " * 400, "completion": "ok"}) + "\n")
    code, err = run("--init", str(base), "--data", str(long_prompt), "--out", str(tmp_path / "o"))
    assert code == 2 and f"{long_prompt}:2: the prompt alone is" in err and "context of 128" in err

    code, err = run("--init", str(base), "--task", "chess", "--out", str(tmp_path / "o"))
    assert code == 2 and "unknown task 'chess'" in err and "Traceback" not in err


def test_precision_policy(monkeypatch, base, tmp_path):
    """Every script's autocast: off on CPU (the study's float32 numbers); a bad MINIPOST_PRECISION is one line."""
    from minipost.cli import autocast

    with autocast(torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu")
    monkeypatch.setenv("MINIPOST_PRECISION", "fp16")
    with pytest.raises(UserError, match="MINIPOST_PRECISION='fp16': expected bf16"):
        autocast(torch.device("cpu"))
    code, err = run("--init", str(base), "--max-steps", "1", "--out", str(tmp_path / "o"))
    assert code == 2 and err.splitlines()[-1] == "error: MINIPOST_PRECISION='fp16': expected bf16 (the default) or fp32"
    monkeypatch.delenv("MINIPOST_PRECISION")
    monkeypatch.setenv("MINIPOST_KERNELS", "cuda")  # the kernels' switch too (MINIPOST_AUTOTUNE alike, on CUDA)
    code, err = run("--init", str(base), "--max-steps", "1", "--out", str(tmp_path / "o"))
    assert code == 2 and err.splitlines()[-1] == "error: MINIPOST_KERNELS='cuda': expected one of auto, triton, torch"
