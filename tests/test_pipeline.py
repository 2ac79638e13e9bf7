"""pipeline.py --quick end to end: every stage runs, a rerun skips them, the report's numbers are the files'."""
import json

import pytest

import pipeline
from minipost.report import ARITH_COLUMNS, SENTIMENT_COLUMNS, fmt, read_jsonl


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
    evals = pipeline.collect_evals(pipeline.plan(pipeline.SCALES["quick"], study, "cpu"), study)
    report = (study / "report.md").read_text()
    sections = {"arith": report.split("## arith")[1].split("## sentiment")[0],
                "sentiment": report.split("## sentiment")[1].split("## Plots")[0]}
    for task, columns in (("arith", ARITH_COLUMNS), ("sentiment", SENTIMENT_COLUMNS)):
        rows = evals[task]
        methods = {r["method"] for r in rows}
        assert {"sft", "dft", "grpo", "nft", "rft", "ppo"} <= methods if task == "arith" else {"sft"} <= methods
        for method in methods:
            group = [r for r in rows if r["method"] == method]
            line = next(ln for ln in sections[task].splitlines() if ln.startswith(f"| {method} |"))
            cells = [c.strip() for c in line.strip("|").split("|")]
            assert len(cells) == len(columns) + 1
            for cell, (_, key, digits) in zip(cells[1:], columns):
                assert cell == fmt([r[key] for r in group], digits)
            assert any(r[columns[0][1]] is not None for r in group)


def test_report_sweep_tables_match_sweep_files(study):
    report = (study / "report.md").read_text()
    for name in ("arith/bon-test", "arith/bon-ood", "sentiment/bon-test"):
        for r in read_jsonl(study / name / "sweep.jsonl"):
            assert f"| {r['n']} | {r['reward']:.3f} ± {r['reward_se']:.3f} | {r['format']:.3f} | {r['kl_est']:.3f} |" \
                in report
    assert (study / "frontier.png").stat().st_size > 0 and "![frontier.png](frontier.png)" in report


def test_eval_rows_are_sane(study):
    evals = pipeline.collect_evals(pipeline.plan(pipeline.SCALES["quick"], study, "cpu"), study)
    for task in ("arith", "sentiment"):
        for r in evals[task]:
            assert 0.0 <= r["test_format"] <= 1.0
            if task == "arith":
                assert 0.0 <= r["test_reward"] <= 1.0
            if r["name"].endswith("sft-seed0"):
                # the SFT policy against itself: the KL estimate is a sum of exact zeros
                assert abs(r["kl_to_sft"]) < 1e-5


def test_plan_dependencies_follow_the_flags(tmp_path):
    stages = {st.name: st for st in pipeline.plan(pipeline.SCALES["cpu"], tmp_path, "cpu")}
    assert stages["arith/base"].deps == []
    assert stages["arith/imitation"].deps == ["arith/base", "arith/teacher-samples"]
    assert set(stages["arith/eval/grpo"].deps) == {"arith/sft-seed0", "arith/grpo"}
    assert stages["arith/eval/grpo"].init == str(tmp_path / "arith/grpo")
    assert set(stages["sentiment/ppo-beta0.2"].deps) == {"sentiment/sft-seed0", "sentiment/rm"}
    order = list(stages)
    assert all(order.index(d) < order.index(name) for name, st in stages.items() for d in st.deps)


def test_a_failed_stage_stops_the_run_with_its_log(tmp_path):
    bad = pipeline.Stage("arith/eval/bad", "eval", ["--init", str(tmp_path / "missing"), "--task", "arith",
                         "--out", str(tmp_path / "arith/eval/bad/eval.json")], None, "eval.json")
    with pytest.raises(pipeline.StageFailed, match=r"(?s)arith/eval/bad failed \(exit 2\).*error: --init"):
        pipeline.run_stages([bad], tmp_path, jobs=1)
    assert (tmp_path / "arith/eval/bad/log.txt").is_file()


def test_report_time_and_samples_come_from_the_runs_metrics(study):
    """train time = the run's last metrics.jsonl time_s; samples = the sum of its logged samples_used (RL), or
    batch size x steps (SFT, DFT, DPO)."""
    evals = pipeline.collect_evals(pipeline.plan(pipeline.SCALES["quick"], study, "cpu"), study)
    for rows in evals.values():
        for r in rows:
            metrics = read_jsonl(study / r["name"] / "metrics.jsonl")
            assert r["train_time_s"] == metrics[-1]["time_s"]
            logged = [m["samples_used"] for m in metrics if "samples_used" in m]
            if logged:
                assert r["samples"] == sum(logged) and r["method"] in ("grpo", "nft", "rft", "ppo", "ppo-beta0.05")
            else:
                meta = json.loads((study / r["name"] / "ckpt" / "meta.json").read_text())
                assert r["samples"] == meta["args"]["batch_size"] * meta["step"]
