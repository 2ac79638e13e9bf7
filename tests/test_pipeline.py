"""pipeline.py --quick end to end: every stage runs, a rerun skips them, the report's numbers are the files'."""
import json
import re

import pytest

import pipeline
from minipost.report import fmt, read_jsonl


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    pipeline.main(["--quick", "--out", str(out), "--device", "cpu"])
    return out


def test_every_stage_completes_and_rerun_skips(study, capsys):
    stages = pipeline.plan(pipeline.SCALES["quick"], study, "cpu")
    assert all(pipeline.stage_done(st, study) for st in stages)
    pipeline.main(["--quick", "--out", str(study), "--device", "cpu"])
    printed = capsys.readouterr().out
    assert printed.count("complete, skipped") == len(stages)


def test_report_tables_match_eval_files(study):
    report = (study / "report.md").read_text()
    sections = {"arith": report.split("## arith")[1].split("## sentiment")[0],
                "sentiment": report.split("## sentiment")[1].split("## Plots")[0]}
    for task, splits in (("arith", ("test", "ood")), ("sentiment", ("test",))):
        rows = read_jsonl(study / task / "eval.jsonl")
        methods = {r["method"] for r in rows}
        assert {"sft", "dft", "grpo", "nft", "rft", "ppo"} <= methods if task == "arith" else {"sft"} <= methods
        for method in methods:
            group = [r for r in rows if r["method"] == method]
            line = next(ln for ln in sections[task].splitlines() if ln.startswith(f"| {method} |"))
            cells = [c.strip() for c in line.strip("|").split("|")]
            for i, split in enumerate(splits, 1):
                assert cells[i] == fmt([r[f"{split}_reward"] for r in group])
            assert cells[len(splits) + 2] == fmt([r["kl_to_sft"] for r in group], 2)


def test_report_sweep_tables_match_sweep_files(study):
    report = (study / "report.md").read_text()
    for name in ("arith/bon-test", "arith/bon-ood", "sentiment/bon-test"):
        for r in read_jsonl(study / name / "sweep.jsonl"):
            assert f"| {r['n']} | {r['reward']:.3f} ± {r['reward_se']:.3f} | {r['format']:.3f} | {r['kl_est']:.3f} |" \
                in report
    assert (study / "frontier.png").stat().st_size > 0 and "![frontier.png](frontier.png)" in report


def test_eval_rows_are_sane(study):
    for task in ("arith", "sentiment"):
        for r in read_jsonl(study / task / "eval.jsonl"):
            assert 0.0 <= r["test_format"] <= 1.0
            if task == "arith":
                assert 0.0 <= r["test_reward"] <= 1.0
            if r["name"].endswith("sft-seed0"):
                # the SFT policy against itself: the KL estimate is a sum of exact zeros
                assert abs(r["kl_to_sft"]) < 1e-5
