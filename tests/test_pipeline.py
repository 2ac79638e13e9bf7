"""pipeline.py --quick end to end: every stage runs, a rerun skips them, the report's numbers are the files'."""
import json
import math
import re
from pathlib import Path

import pytest

import pipeline
from minipost.report import ADAPT_COLUMNS, ARITH_COLUMNS, SENTIMENT_COLUMNS, fmt, read_jsonl


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


def test_adaptation_table_matches_eval_files(study):
    """Question 6's table: full SFT, LoRA, prompt tuning and retrieval rows with what each cost, from eval.json."""
    evals = pipeline.collect_evals(pipeline.plan(pipeline.SCALES["quick"], study, "cpu"), study)["arith"]
    report = (study / "report.md").read_text()
    section = report.split("Full SFT vs cheap adaptation (question 6)")[1].split("## sentiment")[0]
    rows = [r for r in evals if r["method"] == "sft" or r["method"].startswith(("lora-", "prompt", "rag-"))]
    methods = {r["method"] for r in rows}
    assert {"sft", "lora-r4", "prompt-tuning", "rag-base-k0", "rag-base-k2", "rag-sft-k2"} <= methods
    for method in methods:
        group = [r for r in rows if r["method"] == method]
        line = next(ln for ln in section.splitlines() if ln.startswith(f"| {method} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1:] == [fmt([r.get(key) for r in group], digits) for _, key, digits in ADAPT_COLUMNS]
    lora = next(r for r in rows if r["method"] == "lora-r4")
    full = next(r for r in rows if r["method"] == "sft")
    assert 0 < lora["trainable_params"] < full["trainable_params"] / 5
    assert next(r for r in rows if r["method"] == "rag-sft-k2")["retrieve"] == 2
    assert "**(6) Full SFT vs cheap adaptation" in report


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
    assert stages["arith/imitation"].deps == ["arith/student-base", "arith/teacher-samples"]
    assert stages["arith/teacher-samples"].deps == ["arith/sft-seed0"]  # the SFT policy is the teacher
    # every DPO run trains on the reward model's pairs
    assert set(stages["sentiment/dpo-beta0.1"].deps) == {"sentiment/sft-seed0", "sentiment/rm"}
    assert set(stages["arith/eval/grpo"].deps) == {"arith/sft-seed0", "arith/grpo"}
    assert stages["arith/eval/grpo"].init == str(tmp_path / "arith/grpo")
    assert set(stages["sentiment/ppo-beta0.2"].deps) == {"sentiment/sft-seed0", "sentiment/rm"}
    assert stages["arith/lora-r16-seed1"].deps == ["arith/warmup"]  # cheap adaptation continues the warm-up, as SFT
    assert set(stages["arith/eval/rag-sft-k4"].deps) == {"arith/sft-seed0"}
    assert "--retrieve" in stages["arith/eval/rag-base-k2"].argv and stages["arith/eval/rag-base-k2"].deps == \
        ["arith/base", "arith/sft-seed0"]  # the base is scored; the SFT model is the KL's reference
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
            if r["method"].startswith("rag-"):  # a frozen model prompted with retrieved examples trains nothing
                assert r["train_time_s"] == 0 and r["samples"] == 0 and r["trainable_params"] == 0
                continue
            metrics = read_jsonl(study / r["name"] / "metrics.jsonl")
            assert r["train_time_s"] == metrics[-1]["time_s"]
            logged = [m["samples_used"] for m in metrics if "samples_used" in m]
            if logged:
                assert r["samples"] == sum(logged) and r["method"] in ("grpo", "nft", "rft", "ppo", "ppo-beta0.05")
            else:
                meta = json.loads((study / r["name"] / "ckpt" / "meta.json").read_text())
                assert r["samples"] == meta["args"]["batch_size"] * meta["step"]


def test_noise_is_paired_over_prompts_and_uses_seed_spread():
    from minipost.report import noise, verdict
    a = [{"test_rewards": [1.0, 0.0, 1.0, 1.0], "test_reward": 0.75}]
    b = [{"test_rewards": [0.0, 0.0, 1.0, 0.0], "test_reward": 0.25}]
    # differences 1, 0, 0, 1: sd = sqrt(4 * 0.25 / 3), two standard errors = 2 sd / sqrt(4)
    assert abs(noise(a, b, "test_rewards") - math.sqrt(1 / 3)) < 1e-12
    # two seeds a side: per-prompt differences are all 0.5 (paired noise 0), the seeds' spread is not:
    # sample variance 0.125 on each side over 2 seeds -> 2 sqrt(0.125 / 2 + 0.125 / 2)
    a2 = [{"test_rewards": [1.0, 1.0], "test_reward": 1.0}, {"test_rewards": [0.5, 0.5], "test_reward": 0.5}]
    b2 = [{"test_rewards": [0.0, 0.0], "test_reward": 0.0}, {"test_rewards": [0.5, 0.5], "test_reward": 0.5}]
    assert abs(noise(a2, b2, "test_rewards") - 2 * math.sqrt(0.0625 + 0.0625)) < 1e-12
    assert verdict(0.5, 0.6).startswith("is inconclusive (difference +0.500, interval [-0.100, +1.100]; the "
                                        "smallest effect this n could detect is 0.840)")
    assert verdict(-0.7, 0.6).startswith("was refuted (difference -0.700, interval [-1.300, -0.100])")
    assert verdict(0.7, 0.6) == "held (difference +0.700, interval [+0.100, +1.300])"


def test_best_of_n_overtakes_only_beyond_two_standard_errors():
    """SFT greedy 0.2 on 100 prompts (binomial variance 0.0016). N=1 at 0.21 (se 0.01) is within
    2 sqrt(0.0001 + 0.0016) = 0.082; N=2 at 0.30 (se 0.02) is 0.1 ahead, beyond 2 sqrt(0.0004 + 0.0016) = 0.089."""
    from minipost.report import questions
    sft = {"method": "sft", "seed": 0, "test_reward": 0.2, "n_eval": 100}
    sweep = [{"n": 1, "reward": 0.21, "reward_se": 0.01}, {"n": 2, "reward": 0.30, "reward_se": 0.02}]
    (q1,) = questions({"arith": [sft]}, {"arith/bon-test": sweep})
    assert "by more than two standard errors at N=2." in q1
    (q1,) = questions({"arith": [sft]}, {"arith/bon-test": sweep[:1]})
    assert "never clearly overtakes" in q1


def fake_checkpoint(run_dir, step):
    ckpt = run_dir / "ckpt"
    ckpt.mkdir(parents=True)
    for name in ("model.pt", "config.json", "tokenizer.json"):
        (ckpt / name).write_text("{}")
    (ckpt / "meta.json").write_text(json.dumps({"step": step}))


def test_an_evaluation_reruns_when_its_policy_will_train_further(tmp_path):
    stages = [st for st in pipeline.plan(pipeline.SCALES["cpu"], tmp_path, "cpu")
              if st.name in ("arith/sft-seed0", "arith/grpo", "arith/eval/grpo")]
    fake_checkpoint(tmp_path / "arith/sft-seed0", pipeline.SCALES["cpu"].sft_steps)
    fake_checkpoint(tmp_path / "arith/grpo", 2)  # an older, shorter run (e.g. --quick into the same OUT)
    (tmp_path / "arith/eval/grpo").mkdir(parents=True)
    (tmp_path / "arith/eval/grpo/eval.json").write_text(json.dumps(
        {"step": 2, "n_eval": pipeline.SCALES["cpu"].n_eval, "test_rewards": []}))
    assert pipeline.stage_done(stages[2], tmp_path)  # it does score the checkpoint that is there today ...
    todo, done, _ = pipeline.pending(stages, tmp_path)
    assert [s.name for s in todo] == ["arith/grpo", "arith/eval/grpo"] and done == {"arith/sft-seed0"}  # ... rerun


def test_only_with_no_matching_stage_is_a_user_error(tmp_path):
    with pytest.raises(pipeline.UserError, match="--only arith/bse"):
        pipeline.pending(pipeline.plan(pipeline.SCALES["quick"], tmp_path, "cpu"), tmp_path, ["arith/bse"])


def test_report_only_without_results_is_a_user_error(tmp_path):
    with pytest.raises(pipeline.UserError, match="--report-only"):
        pipeline.main(["--report-only", "--out", str(tmp_path / "none"), "--device", "cpu"])


TIMING = re.compile(r"time|gen.s|RSS|memory")  # columns and keys that measure the machine, not the method


def comparable_report(path, out):
    """report.md with the run's folder named OUT and the wall-time and memory columns of its tables dropped."""
    lines, header = [], None
    for line in Path(path).read_text().replace(str(out), "OUT").splitlines():
        if not line.startswith("|"):
            header = None
            lines.append(line)
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if header is None:
            header = cells
        lines.append([c for c, h in zip(cells, header) if not TIMING.search(h)])
    return lines


def test_same_command_same_numbers_whatever_jobs(study, tmp_path):
    """The quick study again, one stage at a time instead of two: every eval.json, sweep and metrics file and
    the report are identical, wall times and memory aside (each stage runs on one thread, seeded from --seed)."""
    again = tmp_path / "again"
    pipeline.main(["--quick", "--out", str(again), "--device", "cpu", "--jobs", "1"])
    files = sorted(p.relative_to(study) for p in study.rglob("*") if p.suffix in (".json", ".jsonl")
                   and "ckpt" not in p.parts)
    assert len(files) >= 30 and all((again / f).is_file() for f in files)  # every stage's outputs

    def rows(out, f):  # the records of one file, the run's folder named OUT, machine-measured keys dropped
        text = (out / f).read_text().replace(str(out), "OUT")
        return [{k: v for k, v in json.loads(line).items() if not TIMING.search(k)}
                for line in text.splitlines() if line.strip()]
    for f in files:
        assert rows(study, f) == rows(again, f), f
    assert comparable_report(study / "report.md", study) == comparable_report(again / "report.md", again)
