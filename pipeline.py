"""The whole study on the built-in tasks: every method, one report (OUT/report.md + PNG plots).

    arith:      base -> SFT, DFT (several seeds) -> GRPO, NFT, RFT, PPO (verifier reward) -> best-of-N sweeps;
                imitation: a wider teacher's answers -> SFT of the small base on them
    sentiment:  base -> SFT -> reward model -> DPO and PPO at several KL strengths -> best-of-N with the reward
                model (scored by the hidden ground truth)

Each stage calls a script's main() (train_base, train_sft, train_rlhf, sample_bon) with explicit flags, so the
commands in OUT/report.md reproduce any single number. A rerun skips the stages whose checkpoints are
complete and resumes a stage that was killed half way. Then every final policy is evaluated the same way
(OUT/<task>/eval.jsonl) and the report is written from those files and the runs' metrics JSONL.

CPU:   python pipeline.py                       # the default study (see README for the time it takes)
       python pipeline.py --quick               # one to two minutes: tiny sizes, the tests run this
GPU:   python pipeline.py --device cuda --scale gpu --out out/study-gpu
"""
import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path


import sample_bon
import train_base
import train_rlhf
import train_sft
from minipost.checkpoint import find_checkpoint, load_checkpoint
from minipost.cli import pick_device, read_metrics, run_main
from minipost.evaluate import evaluate_policy
from minipost.report import write_report
from minipost.rollout import sample_kl
from minipost.tasks import get_task

SCRIPTS = {"base": train_base, "sft": train_sft, "rlhf": train_rlhf, "bon": sample_bon}


@dataclass
class Scale:
    """How big each stage is. Steps are passed explicitly, so completeness is `checkpoint step == steps`."""
    base_steps: int
    warmup_steps: int  # SFT steps before SFT and DFT part ways
    sft_steps: int
    rl_steps: int
    pref_steps: int  # rm and dpo
    n_train: int  # SFT demonstrations
    n_prompts: int  # RL prompts / preference prompts
    n_eval: int  # prompts per evaluation split
    sweep: str  # best-of-N values
    sweep_prompts: int
    seeds: int  # SFT / DFT seeds (the RL methods start from seed 0's SFT model)
    dpo_betas: tuple = (0.05, 0.1, 0.5)
    ppo_betas: tuple = (0.02, 0.05, 0.2)
    extra: dict = field(default_factory=dict)  # flags added to every call of a script, e.g. sizes


SCALES = {
    "quick": Scale(base_steps=40, warmup_steps=10, sft_steps=20, rl_steps=2, pref_steps=6, n_train=200, n_prompts=32, n_eval=16,
                   sweep="1,2,4", sweep_prompts=8, seeds=1, dpo_betas=(0.1,), ppo_betas=(0.05,),
                   extra={"base": ["--corpus-docs", "2000", "--batch-size", "8", "--eval-batches", "2"],
                          "sft": ["--batch-size", "8", "--max-new-tokens", "40"],
                          "rlhf": ["--batch-size", "4", "--max-new-tokens", "40", "--n-kl", "8"],
                          "bon": ["--max-new-tokens", "40", "--time-prompts", "2"]}),
    "cpu": Scale(base_steps=400, warmup_steps=100, sft_steps=300, rl_steps=40, pref_steps=150, n_train=4000, n_prompts=1000,
                 n_eval=200, sweep="1,2,4,8,16", sweep_prompts=100, seeds=3),
    "gpu": Scale(base_steps=5000, warmup_steps=200, sft_steps=1000, rl_steps=200, pref_steps=500, n_train=20000, n_prompts=4000,
                 n_eval=500, sweep="1,2,4,8,16,32,64", sweep_prompts=200, seeds=3,
                 extra={"base": ["--preset", "small", "--batch-size", "64"], "sft": ["--batch-size", "64"]}),
}


@dataclass
class Stage:
    name: str  # e.g. "arith/sft-seed0": also its directory under OUT
    script: str  # key of SCRIPTS
    argv: list
    steps: int | None  # expected final checkpoint step; None for sample_bon (done when its output exists)
    done_file: str = ""  # for sample_bon: the file that marks completion

    @property
    def script_file(self):
        return SCRIPTS[self.script].__name__ + ".py"


def plan(scale: Scale, out: Path, device: str) -> list[Stage]:
    """Every stage of the study, in dependency order."""
    s, stages = scale, []
    d = lambda name: str(out / name)  # noqa: E731

    def add(name, script, argv, steps=None, done_file=""):
        argv = list(argv) + ["--device", device] + s.extra.get(script, [])
        if script != "bon":
            argv += ["--out", d(name)]
        stages.append(Stage(name, script, argv, steps, done_file))

    # arith: base; a short SFT warm-up teaches the chat format (DFT's p-weighted gradient cannot: from the
    # base, the format's tokens have p ~ 0); then SFT and DFT over seeds; RL from seed 0's SFT model
    add("arith/base", "base", ["--task", "arith", "--max-steps", s.base_steps], s.base_steps)
    add("arith/warmup", "sft", ["--init", d("arith/base"), "--task", "arith", "--max-steps", s.warmup_steps,
        "--n-train", s.n_train, "--n-eval", s.n_eval, "--eval-every", s.warmup_steps], s.warmup_steps)
    for seed in range(s.seeds):
        for loss in ("sft", "dft"):
            add(f"arith/{loss}-seed{seed}", "sft", ["--init", d("arith/warmup"), "--task", "arith", "--loss", loss,
                "--seed", seed, "--max-steps", s.sft_steps, "--n-train", s.n_train, "--n-eval", s.n_eval,
                "--eval-every", s.sft_steps], s.sft_steps)
    sft = d("arith/sft-seed0")
    for algo in ("grpo", "nft", "rft", "ppo"):
        add(f"arith/{algo}", "rlhf", ["--algo", algo, "--init", sft, "--task", "arith", "--max-steps", s.rl_steps,
            "--n-prompts", s.n_prompts, "--n-eval", s.n_eval, "--eval-every", s.rl_steps], s.rl_steps)
    for split in ("test", "ood"):
        add(f"arith/bon-{split}", "bon", ["--init", sft, "--task", "arith", "--split", split, "--sweep", s.sweep,
            "--n-prompts", s.sweep_prompts, "--out", d(f"arith/bon-{split}")], done_file="sweep.jsonl")
    # imitation: a wider teacher on the same data; the small base learns from the teacher's answers
    add("arith/teacher-base", "base", ["--task", "arith", "--preset", "wide", "--max-steps", s.base_steps],
        s.base_steps)
    add("arith/teacher-sft", "sft", ["--init", d("arith/teacher-base"), "--task", "arith", "--max-steps",
        s.sft_steps, "--n-train", s.n_train, "--n-eval", s.n_eval, "--eval-every", s.sft_steps], s.sft_steps)
    add("arith/teacher-samples", "bon", ["--init", d("arith/teacher-sft"), "--task", "arith", "--split", "train",
        "--n", 1, "--temperature", 0, "--n-prompts", s.n_train, "--out", d("arith/teacher-samples")],
        done_file="bon.jsonl")
    add("arith/imitation", "sft", ["--init", d("arith/base"), "--task", "arith", "--data",
        d("arith/teacher-samples") + "/bon.jsonl", "--max-steps", s.sft_steps, "--n-eval", s.n_eval,
        "--eval-every", s.sft_steps], s.sft_steps)

    # sentiment: base, SFT, reward model, DPO and PPO at several strengths, best-of-N with the reward model
    add("sentiment/base", "base", ["--task", "sentiment", "--max-steps", s.base_steps], s.base_steps)
    add("sentiment/sft-seed0", "sft", ["--init", d("sentiment/base"), "--task", "sentiment", "--max-steps",
        s.sft_steps, "--n-train", s.n_train, "--n-eval", s.n_eval, "--eval-every", s.sft_steps], s.sft_steps)
    sft = d("sentiment/sft-seed0")
    common = ["--init", sft, "--task", "sentiment", "--n-prompts", s.n_prompts, "--n-eval", s.n_eval]
    add("sentiment/rm", "rlhf", ["--algo", "rm", *common, "--max-steps", s.pref_steps, "--eval-every",
        s.pref_steps], s.pref_steps)
    for beta in s.dpo_betas:
        add(f"sentiment/dpo-beta{beta}", "rlhf", ["--algo", "dpo", *common, "--beta", beta, "--max-steps",
            s.pref_steps, "--eval-every", s.pref_steps], s.pref_steps)
    for beta in s.ppo_betas:
        add(f"sentiment/ppo-beta{beta}", "rlhf", ["--algo", "ppo", *common, "--reward-model", d("sentiment/rm"),
            "--beta", beta, "--max-steps", s.rl_steps, "--eval-every", s.rl_steps], s.rl_steps)
    add("sentiment/bon-test", "bon", ["--init", sft, "--task", "sentiment", "--split", "test", "--reward-model",
        d("sentiment/rm"), "--sweep", s.sweep, "--n-prompts", s.sweep_prompts, "--out", d("sentiment/bon-test")],
        done_file="sweep.jsonl")
    for st in stages:
        st.argv = [str(a) for a in st.argv]
    return stages


def stage_done(stage: Stage, out: Path) -> bool:
    if stage.steps is None:
        return (out / stage.name / stage.done_file).is_file()
    ckpt = find_checkpoint(out / stage.name)
    return ckpt is not None and json.loads((ckpt / "meta.json").read_text()).get("step") == stage.steps


def run_stages(stages, out: Path, only=None):
    t0 = time.time()
    for i, stage in enumerate(stages, 1):
        if only and not any(stage.name.startswith(o) for o in only):
            continue
        prefix = f"[{i}/{len(stages)} {time.time() - t0:6.0f}s] {stage.name}"
        if stage_done(stage, out):
            print(f"{prefix}: complete, skipped", flush=True)
            continue
        print(f"{prefix}: python {stage.script_file} {' '.join(stage.argv)}", flush=True)
        started = time.time()
        argv = stage.argv + (["--resume"] if stage.steps is not None else [])
        SCRIPTS[stage.script].main(argv)
        print(f"{prefix}: done in {time.time() - started:.0f}s", flush=True)
    print(f"all stages done in {time.time() - t0:.0f}s", flush=True)


# ----------------------------------------------------------------------------------------------- evaluation

def policies(stages, task_name):
    """(method, seed, directory) of every trained policy of a task (not bases, reward models or teachers)."""
    out = []
    for st in stages:
        task, name = st.name.split("/")
        if task != task_name or st.script not in ("sft", "rlhf") or name in ("rm", "teacher-sft", "warmup"):
            continue
        method, _, seed = name.partition("-seed")
        out.append((method, int(seed or 0), st.name))
    return out


def evaluate_all(stages, out: Path, scale: Scale, device):
    """One evaluation for every final policy of a task: reward on each split and KL to the SFT policy,
    identical for all methods (OUT/<task>/eval.jsonl). Cached by (name, checkpoint step)."""
    for task_name in ("arith", "sentiment"):
        task = get_task(task_name)
        path = out / task_name / "eval.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
        cached = {(r["name"], r["step"]) for r in rows}
        reference = load_checkpoint(out / task_name / "sft-seed0", device).model.eval()
        splits = {s: task.prompts(s, scale.n_eval, seed=1) for s in task.splits if s != "train"}
        for method, seed, name in policies(stages, task_name) + [("teacher", 0, f"{task_name}/teacher-sft")]:
            if find_checkpoint(out / name) is None:
                continue
            ck = load_checkpoint(out / name, device)
            if (name, ck.meta["step"]) in cached:
                continue
            model = ck.model.eval()
            row = {"name": name, "method": method, "seed": seed, "step": ck.meta["step"],
                   "train_time_s": ck.meta.get("elapsed_s"), "samples": samples_used(out / name, ck.meta)}
            for split, prompts in splits.items():
                r = evaluate_policy(model, ck.tokenizer, task, prompts, 64, task.eval_temperature, seed=seed)
                row[f"{split}_reward"], row[f"{split}_format"] = r["reward"], r["format"]
            kl = sample_kl(model, reference, ck.tokenizer, splits["test"], 64, 1.0, seed=7)
            row["kl_to_sft"], row["entropy"] = kl["kl"], kl["entropy"]
            rows.append(row)
            with open(path, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"evaluated {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()
                                                     if isinstance(v, float)), flush=True)


def samples_used(run_dir: Path, meta) -> int | None:
    """Training samples a method consumed: demonstrations seen (SFT, DFT) or sequences it trained on as
    logged per step by train_rlhf.py ("samples_used")."""
    if meta.get("kind") in ("sft", "dft"):
        return int(meta["args"]["batch_size"]) * int(meta["step"])
    logged = [r["samples_used"] for r in read_metrics(run_dir / "metrics.jsonl") if "samples_used" in r]
    return sum(logged) if logged else None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/study", help="directory of every stage and of report.md")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one to two minutes (same as --scale quick)")
    p.add_argument("--scale", default="cpu", choices=sorted(SCALES), help="stage sizes (see SCALES)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--only", default=None, help="comma-separated stage-name prefixes to run, e.g. arith/base")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from existing results")
    args = p.parse_args(argv)
    scale = SCALES["quick" if args.quick else args.scale]
    device = pick_device(args.device)
    out = Path(args.out)
    stages = plan(scale, out, device.type)
    if not args.report_only:
        run_stages(stages, out, args.only.split(",") if args.only else None)
        if args.only:
            return
        evaluate_all(stages, out, scale, device)
    report = write_report(out, stages, scale)
    print(f"report: {report}")


if __name__ == "__main__":
    run_main(main)
