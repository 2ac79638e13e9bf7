"""pipeline.py --quick end to end: every stage runs, a rerun skips them, the report's numbers are the files'."""
import json
import math
import re
from pathlib import Path

import pytest

import pipeline
from minipost.report import (ADAPT_COLUMNS, ARITH_COLUMNS, IMITATION_COLUMNS, LR_COLUMNS, SENTIMENT_COLUMNS, fmt,
                             mean_sweep, read_jsonl, sweep_rows)


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


def table_cells(section, method):
    line = next(ln for ln in section.splitlines() if ln.startswith(f"| {method} |"))
    return [c.strip() for c in line.strip("|").split("|")][1:]


def test_report_tables_match_eval_files(study):
    """Every method table: one line per method, each cell the mean (± sd over seeds) of its eval.json values."""
    evals = pipeline.collect_evals(pipeline.plan(pipeline.SCALES["quick"], study, "cpu"), study)
    report = (study / "report.md").read_text()
    arith = report.split("## arith")[1].split("## sentiment")[0]
    tables = {  # (section, columns, methods that must be there)
        "main": (arith.split("Learning rates")[0], ARITH_COLUMNS, {"warmup", "sft", "dft", "grpo", "nft", "rft"}),
        "lr": (arith.split("Learning rates")[1].split("Best-of-N")[0], LR_COLUMNS, {"sft", "dft"}),
        "adapt": (arith.split("question 6")[1].split("Imitation")[0], ADAPT_COLUMNS,
                  {"sft", "lora-r4", "prompt-tuning", "rag-warmup-k2", "rag-sft-k2"}),
        "imitation": (arith.split("Imitation (question 5)")[1], IMITATION_COLUMNS,
                      {"sft-long", "student-micro-n100", "imitation-micro-n100"}),
        "sentiment": (report.split("## sentiment")[1].split("## Plots")[0], SENTIMENT_COLUMNS,
                      {"sft", "dpo-beta0.1", "ppo-beta0.05"}),
    }
    for name, (section, columns, methods) in tables.items():
        rows = evals["sentiment" if name == "sentiment" else "arith"]
        for method in methods:
            group = [r for r in rows if r["method"] == method]
            assert group, (name, method)
            assert table_cells(section, method) == [fmt([r.get(key) for r in group], d) for _, key, d in columns]
    lora = next(r for r in evals["arith"] if r["method"] == "lora-r4")
    full = next(r for r in evals["arith"] if r["method"] == "sft")
    assert 0 < lora["trainable_params"] < full["trainable_params"] / 5
    assert next(r for r in evals["arith"] if r["method"] == "rag-sft-k2")["retrieve"] == 2
    for q in ("(1) SFT vs best-of-N", "(2) DFT vs SFT", "(3) NFT vs RFT vs GRPO", "(4) PPO vs DPO", "(5) Imitation",
              "(6) Full SFT vs cheap adaptation"):
        assert f"**{q}" in report, q
    assert "underpowered" in report  # one seed: the report says so
    assert report.count("Preconditions: ") >= 6  # every question measures its own and prints them
    rag = next(r for r in evals["arith"] if r["method"] == "rag-sft-k2")  # the example prompt and answer, verbatim
    assert "Example (rag-sft-k2" in report and rag["test_example"]["prompt"] in report
    assert rag["test_example"]["prompt"].count("<|assistant|>") == 3  # two solved examples, then the question


def test_report_sweep_tables_match_sweep_files(study):
    report = (study / "report.md").read_text()
    sweeps = {name: read_jsonl(study / name / "sweep.jsonl") for name in
              ("arith/bon-test-seed0", "arith/bon-ood-seed0", "sentiment/bon-test-seed0")}
    for prefix in ("arith/bon-test", "arith/bon-ood", "sentiment/bon-test"):
        for r in mean_sweep(sweep_rows(sweeps, prefix)):
            oracle = f"{r['oracle_reward']:.3f} | " if "oracle_reward" in r else ""
            assert f"| {r['n']:.0f} | {r['reward']:.3f} ± {r['reward_se']:.3f} | {oracle}{r['format']:.3f} | " \
                   f"{r['kl_est']:.3f} |" in report
    for png in ("frontier.png", "overoptimisation.png", "bon_arith.png", "bon_length.png", "rl_curves.png",
                "imitation.png"):
        assert (study / png).stat().st_size > 0 and f"![{png}]({png})" in report


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
    stages = {st.name: st for st in pipeline.plan(pipeline.SCALES["full"], tmp_path, "cpu")}
    assert stages["arith/base"].deps == []
    # every chain is its own per seed: RL from that seed's longer SFT, PPO / DPO from that seed's reward model
    assert set(stages["arith/grpo-seed2"].deps) == {"arith/sft-long-seed2"}
    assert stages["arith/sft-long-seed2"].deps == ["arith/warmup"]
    assert set(stages["sentiment/rm-seed1"].deps) == {"sentiment/sft-seed1"}
    assert set(stages["sentiment/dpo-beta0.05-seed1"].deps) == {"sentiment/sft-seed1", "sentiment/rm-seed1"}
    assert set(stages["sentiment/ppo-beta0.8-seed2"].deps) == {"sentiment/sft-seed2", "sentiment/rm-seed2"}
    assert set(stages["sentiment/eval/ppo-beta0.2-seed1"].deps) == {"sentiment/ppo-beta0.2-seed1",
                                                                      "sentiment/sft-seed1", "sentiment/rm-seed1"}
    assert set(stages["arith/eval/grpo-seed1"].deps) == {"arith/sft-long-seed1", "arith/grpo-seed1"}  # its start
    ev = stages["arith/eval/grpo-seed1"].argv
    assert ev[ev.index("--reference") + 1] == str(tmp_path / "arith/sft-long-seed1")
    assert stages["arith/eval/grpo-seed1"].init == str(tmp_path / "arith/grpo-seed1")
    # SFT vs best-of-N: both from the warm-up; the selector is that seed's reward model
    assert set(stages["arith/bon-ood-seed2"].deps) == {"arith/warmup", "arith/rm-seed2"}
    assert stages["arith/rm-seed0"].deps == ["arith/warmup"]
    rm = stages["arith/rm-seed0"].argv  # it learns from the warm-up's own samples, the verifier labelling them
    assert "--pairs-from-demos" not in rm and rm[rm.index("--k") + 1] == str(pipeline.SCALES["full"].rm_k)
    assert "--pairs-from-demos" in stages["arith/rm-demos-seed1"].argv  # the second selector, test split only
    assert set(stages["arith/bon-demos-test-seed1"].deps) == {"arith/warmup", "arith/rm-demos-seed1"}
    assert "arith/bon-demos-ood-seed1" not in stages
    # the warm-up is evaluated (the start of question 2); it alone trains on chats, as many demonstrations a step
    assert set(stages["arith/eval/warmup"].deps) == {"arith/warmup", "arith/sft-seed0"}
    argv = stages["arith/warmup"].argv
    assert argv[argv.index("--turns") + 1] == "3" and argv[argv.index("--batch-size") + 1] == "16"
    for name in ("arith/sft-seed1", "arith/dft-lr0.005-seed0", "arith/lora-r4-seed2", "arith/sft-long-seed0",
                 "arith/student-mini-n1000-seed0", "sentiment/sft-seed0"):
        argv = stages[name].argv
        assert "--turns" not in argv and argv[argv.index("--batch-size") + 1] == "32", name
    # learning rates: every one of the sweep from the warm-up, scored on validation after the SFT demonstrations
    assert {"arith/sft-lr0.001-seed0", "arith/sft-lr0.004-seed2", "arith/dft-seed1", "arith/dft-lr0.012-seed2"} <= \
        set(stages)
    assert stages["arith/dft-lr0.012-seed2"].deps == ["arith/warmup"]
    ev = stages["arith/eval/dft-lr0.005-seed1"].argv
    assert ev[ev.index("--validation-from") + 1] == str(pipeline.SCALES["full"].n_train)
    # imitation: the teacher trained longer than the SFT policy; 2 sizes x 2 amounts x 3 seeds of each data
    assert stages["arith/sft-long-seed0"].steps > stages["arith/sft-seed0"].steps
    assert stages["arith/teacher-samples"].deps == ["arith/sft-long-seed0"]
    assert set(stages["arith/imitation-mini-n1000-seed2"].deps) == {"arith/student-mini-base", "arith/teacher-samples"}
    assert len([n for n in stages if n.startswith(("arith/imitation-", "arith/student-")) and "base" not in n]) == 24
    assert stages["arith/lora-r16-seed1"].deps == ["arith/warmup"]  # cheap adaptation continues the warm-up, as SFT
    assert set(stages["arith/eval/rag-sft-k1-seed2"].deps) == {"arith/sft-seed2"}
    assert set(stages["arith/eval/rag-warmup-k2"].deps) == {"arith/warmup", "arith/sft-seed0"}
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
                assert r["samples"] == sum(logged) and r["method"] in ("grpo", "nft", "rft", "ppo-beta0.05")
            else:
                meta = json.loads((study / r["name"] / "ckpt" / "meta.json").read_text())
                turns = meta["args"].get("turns", 1)  # SFT on chats of 1..turns demonstrations: (turns + 1) / 2 each
                assert r["samples"] == round(meta["args"]["batch_size"] * meta["step"] * (turns + 1) / 2)


def test_noise_is_paired_over_prompts_and_uses_seed_spread():
    from minipost.verdicts import noise, verdict
    a = [{"test_rewards": [1.0, 0.0, 1.0, 1.0]}]
    b = [{"test_rewards": [0.0, 0.0, 1.0, 0.0]}]
    # differences 1, 0, 0, 1: sd = sqrt(4 * 0.25 / 3), two standard errors = 2 sd / sqrt(4)
    assert abs(noise(a, b, "test_rewards") - math.sqrt(1 / 3)) < 1e-12
    # seeds 0 and 1 on both sides: per-prompt differences are all 0.5 (paired noise 0), the per-seed
    # differences are 1 and 0: sd sqrt(0.5), two standard errors 2 sqrt(0.5) / sqrt(2) = 1
    a2 = [{"seed": 0, "test_rewards": [1.0, 1.0]}, {"seed": 1, "test_rewards": [0.5, 0.5]}]
    b2 = [{"seed": 0, "test_rewards": [0.0, 0.0]}, {"seed": 1, "test_rewards": [0.5, 0.5]}]
    assert abs(noise(a2, b2, "test_rewards") - 1.0) < 1e-12
    # other seeds on the other side: unpaired, each side's seed variance over its n: 2 sqrt(0.125/2 + 0.125/2)
    b3 = [dict(r, seed=r["seed"] + 5) for r in b2]
    assert abs(noise(a2, b3, "test_rewards") - 2 * math.sqrt(0.125)) < 1e-12
    # one row (a teacher) against two seeds: only the seeds' side has a seed variance
    assert abs(noise(a2[:1], b3, "test_rewards") - 2 * math.sqrt(0.0625)) < 1e-12
    assert verdict(0.5, 0.6).startswith("is inconclusive (difference +0.500, interval [-0.100, +1.100]; the "
                                        "smallest effect this n could detect is 0.840)")
    assert verdict(-0.7, 0.6).startswith("was refuted (difference -0.700, interval [-1.300, -0.100])")
    assert verdict(0.7, 0.6) == "held (difference +0.700, interval [+0.100, +1.300])"


def test_learning_rate_is_picked_on_validation_not_test():
    from minipost.report import lr_choice
    rows = [{"method": "sft", "val_reward": 0.2, "test_reward": 0.9}, {"method": "sft-lr0.004", "val_reward": 0.3,
            "test_reward": 0.1}, {"method": "sft-lr0.004", "val_reward": 0.5, "test_reward": 0.1},
            {"method": "dft", "val_reward": 0.1}, {"method": "dft-lr0.008", "val_reward": 0.05}]
    assert lr_choice(rows, "sft") == ("sft-lr0.004", {"sft": 0.2, "sft-lr0.004": 0.4})
    assert lr_choice(rows, "dft")[0] == "dft"


def test_length_gaps_by_arithmetic_steps():
    """arith's test prompts alternate 1 and 2 steps (seed 1: 1, 2, 1, 2, ...), ood has 3: SFT's greedy
    per-prompt accuracy minus best-of-4's, by steps, with two paired standard errors."""
    from minipost.report import length_gaps, prompt_steps
    assert prompt_steps("test", 4) == [1, 2, 1, 2] and prompt_steps("ood", 2) == [3, 3]
    sft = {"method": "sft", "seed": 0, "test_rewards": [1.0, 1.0, 0.0, 1.0, 0.0], "ood_rewards": [1.0, 0.0, 1.0]}
    sweeps = {"arith/bon-test-seed0": [{"n": 4, "n_prompts": 4, "rewards": [0.0, 1.0, 0.0, 0.0]}],
              "arith/bon-ood-seed0": [{"n": 4, "n_prompts": 2, "rewards": [0.5, 0.5]}]}
    gaps = length_gaps({"arith": [sft]}, sweeps, 4)
    # 1 step: prompts 0, 2: differences 1, 0 -> gap 0.5, sd sqrt(0.5), 2 se = 2 sqrt(0.5) / sqrt(2) = 1
    assert gaps[1] == (0.5, 1.0, 2)
    assert gaps[2][0] == 0.5 and abs(gaps[2][1] - 1.0) < 1e-12  # prompts 1, 3: differences 0, 1
    assert gaps[3] == (0.0, 1.0, 2)  # differences 0.5, -0.5


def test_ppo_and_dpo_are_compared_within_the_kl_both_reach():
    from minipost.report import ppo_vs_dpo
    def rows(method, kl, rewards):
        return [{"method": method, "seed": s, "kl_to_sft": kl, "test_sample_reward": sum(r) / len(r),
                 "test_sample_rewards": r, "test_proxy_reward": 1.0} for s, r in enumerate(rewards)]
    evals = {"sentiment": rows("sft", 0.0, [[0.0, 0.0]]) + rows("ppo-beta0.05", 5.0, [[0.7, 0.7]])
             + rows("ppo-beta0.8", 0.95, [[0.3, 0.3]]) + rows("dpo-beta0.05", 0.9, [[0.4, 0.4]])
             + rows("dpo-beta0.2", 0.5, [[0.35, 0.35]])}
    (text,) = ppo_vs_dpo(evals, {})
    # the budget is DPO's largest KL, 0.9; PPO's 5-nat point lies beyond it, its 0.95-nat one within 10%
    assert "Within 0.90 nats (the largest KL both reach): PPO's best ppo-beta0.8, DPO's best dpo-beta0.05" in text
    assert "DPO reaches more reward there held (difference +0.100" in text


def fake_checkpoint(run_dir, step):
    ckpt = run_dir / "ckpt"
    ckpt.mkdir(parents=True)
    for name in ("model.pt", "config.json", "tokenizer.json"):
        (ckpt / name).write_text("{}")
    (ckpt / "meta.json").write_text(json.dumps({"step": step}))


def test_an_evaluation_reruns_when_its_policy_will_train_further(tmp_path):
    stages = [st for st in pipeline.plan(pipeline.SCALES["cpu"], tmp_path, "cpu")
              if st.name in ("arith/sft-long-seed0", "arith/grpo-seed0", "arith/eval/grpo-seed0")]
    fake_checkpoint(tmp_path / "arith/sft-long-seed0", pipeline.SCALES["cpu"].teacher_steps)
    fake_checkpoint(tmp_path / "arith/grpo-seed0", 2)  # an older, shorter run (e.g. --quick into the same OUT)
    (tmp_path / "arith/eval/grpo-seed0").mkdir(parents=True)
    (tmp_path / "arith/eval/grpo-seed0/eval.json").write_text(json.dumps(
        {"step": 2, "n_eval": pipeline.SCALES["cpu"].n_eval, "test_rewards": []}))
    assert pipeline.stage_done(stages[2], tmp_path)  # it does score the checkpoint that is there today ...
    todo, done, _ = pipeline.pending(stages, tmp_path)
    assert [s.name for s in todo] == ["arith/grpo-seed0", "arith/eval/grpo-seed0"] and done == {"arith/sft-long-seed0"}  # ... rerun


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
