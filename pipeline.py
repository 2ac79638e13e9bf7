"""The whole study on the built-in tasks: every method, one report (OUT/report.md + PNG plots).

    arith:      base -> SFT, DFT (several seeds) -> GRPO, NFT, RFT, PPO (verifier reward) -> best-of-N sweeps;
                imitation: a smaller model fine-tuned on the SFT policy's answers, and on the true demonstrations
    sentiment:  base -> SFT -> reward model -> DPO and PPO at several KL strengths -> best-of-N with the reward
                model (scored by the hidden ground truth)

Each stage is one script run as its own process with explicit flags (train_base, train_sft, train_rlhf,
sample_bon, then `python -m minipost.evaluate` for every final policy), so the commands in OUT/report.md
reproduce any single number. Stages run side by side (--jobs; on CPU two at a time, sharing the cores) as soon
as the stages they read are complete; each writes OUT/<stage>/log.txt. A rerun skips the stages whose
checkpoints (or outputs) are complete and resumes a stage that was killed half way. Every final policy gets
the same evaluation (OUT/<task>/eval/<policy>/eval.json); the report is written from those files, the
best-of-N sweeps and the runs' metrics JSONL.

CPU:   python pipeline.py                       # the default study (see README for the time it takes)
       python pipeline.py --quick               # one to two minutes: tiny sizes, the tests run this
GPU:   python pipeline.py --device cuda --scale gpu --out out/study-gpu
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from minipost.checkpoint import find_checkpoint
from minipost.cli import UserError, pick_device, run_main
from minipost.report import write_report

HERE = Path(__file__).resolve().parent
# cheap adaptation's own learning rates (peak; cosine to a tenth): LoRA at 1e-2 beat 2e-3, prompt tuning learnt
# nothing at 3e-2 or 1e-1 from the raw base (300 steps, arith; the SFT default 2e-3 is full fine-tuning's)
LORA_LR, PROMPT_LR, PROMPT_TOKENS = 1e-2, 3e-2, 16
# stage kind -> the command that runs it (each stage is its own process, so stages run side by side)
SCRIPTS = {"base": ["train_base.py"], "sft": ["train_sft.py"], "rlhf": ["train_rlhf.py"], "bon": ["sample_bon.py"],
           "eval": ["-m", "minipost.evaluate"]}


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
    n_eval: int  # prompts per split in the final evaluation of every policy (minipost.evaluate)
    sweep: str  # best-of-N values
    sweep_prompts: int
    seeds: int  # SFT / DFT seeds (the RL methods start from seed 0's SFT model)
    adapt_seeds: int = 1  # seeds of each cheap adaptation (LoRA ranks, prompt tuning)
    curve_eval: int = 50  # prompts per split in the training scripts' own evaluations (their logs only)
    preset: str = "tiny"  # model.PRESETS shape of every policy
    student_preset: str = "micro"  # the smaller model of the imitation study (the SFT policy is its teacher)
    arith_block: int = 256  # arith's context: room for 2-3 retrieved solved examples (~60 tokens each) first
    lora_ranks: tuple = (4, 16)
    retrieve_k: tuple = (0, 2, 4)
    dpo_betas: tuple = (0.05, 0.1, 0.5)
    ppo_betas: tuple = (0.02, 0.05, 0.2)
    extra: dict = field(default_factory=dict)  # flags added to every call of a script, e.g. sizes


SCALES = {
    "quick": Scale(base_steps=40, warmup_steps=10, sft_steps=40, rl_steps=2, pref_steps=6, n_train=200, n_prompts=32,
                   n_eval=16, curve_eval=16, sweep="1,2,4", sweep_prompts=8, seeds=1, dpo_betas=(0.1,), ppo_betas=(0.05,),
                   lora_ranks=(4,), retrieve_k=(0, 2),
                   extra={"base": ["--corpus-docs", "2000", "--batch-size", "8", "--eval-batches", "2"],
                          "sft": ["--batch-size", "8", "--max-new-tokens", "40"],
                          "rlhf": ["--batch-size", "4", "--max-new-tokens", "40", "--n-kl", "8"],
                          "bon": ["--max-new-tokens", "40", "--time-prompts", "2"]}),
    # cpu: sized so the whole study takes about 10 minutes with two stages side by side on 2 cores
    "cpu": Scale(base_steps=200, warmup_steps=100, sft_steps=200, rl_steps=18, pref_steps=60, n_train=4000,
                 n_prompts=600, n_eval=200, curve_eval=16, sweep="1,2,4,8,16", sweep_prompts=100, seeds=3,
                 adapt_seeds=2, ppo_betas=(0.05, 0.2)),
    "gpu": Scale(base_steps=5000, warmup_steps=200, sft_steps=1000, rl_steps=200, pref_steps=500, n_train=20000, n_prompts=4000,
                 n_eval=500, sweep="1,2,4,8,16,32,64", sweep_prompts=200, seeds=3, adapt_seeds=3, preset="small",
                 student_preset="tiny",
                 extra={"base": ["--batch-size", "64"], "sft": ["--batch-size", "64"]}),
}


@dataclass
class Stage:
    name: str  # e.g. "arith/sft-seed0": also its directory under OUT
    script: str  # key of SCRIPTS
    argv: list
    steps: int | None  # expected final checkpoint step; None: done when done_file exists
    done_file: str = ""  # sample_bon: its output; evaluations: eval.json
    deps: list = field(default_factory=list)  # names of the stages whose output this one reads

    @property
    def init(self) -> str:
        """The checkpoint directory a stage starts from (--init); for an evaluation, the policy it scores."""
        return self.argv[self.argv.index("--init") + 1]

    @property
    def command(self) -> str:
        return "python " + " ".join(SCRIPTS[self.script] + self.argv)


def plan(scale: Scale, out: Path, device: str) -> list[Stage]:
    """Every stage of the study, in dependency order."""
    s, stages = scale, []
    d = lambda name: str(out / name)  # noqa: E731

    def add(name, script, argv, steps=None, done_file=""):
        argv = [str(a) for a in list(argv) + ["--device", device] + s.extra.get(script, [])]
        if script not in ("bon", "eval"):
            argv += ["--out", d(name)]
        # a stage depends on every earlier stage whose directory appears in its flags (--init, --data, ...)
        deps = [st.name for st in stages if any(a == d(st.name) or a.startswith(d(st.name) + "/") for a in argv)]
        stages.append(Stage(name, script, argv, steps, done_file, deps))

    # arith: base; a short SFT warm-up teaches the chat format (DFT's p-weighted gradient cannot: from the
    # base, the format's tokens have p ~ 0); then SFT and DFT over seeds; RL from seed 0's SFT model
    tuned = s.warmup_steps + s.sft_steps
    # arith's base reads longer windows, as many tokens a step: retrieval's few-shot prompts must fit its context
    add("arith/base", "base", ["--task", "arith", "--preset", s.preset, "--max-steps", s.base_steps, "--block-size",
        s.arith_block, "--batch-size", 16 * 128 // s.arith_block], s.base_steps)
    add("arith/warmup", "sft", ["--init", d("arith/base"), "--task", "arith", "--max-steps", s.warmup_steps,
        "--n-train", s.n_train, "--n-eval", s.curve_eval, "--eval-every", s.warmup_steps], s.warmup_steps)
    for seed in range(s.seeds):
        for loss in ("sft", "dft"):
            add(f"arith/{loss}-seed{seed}", "sft", ["--init", d("arith/warmup"), "--task", "arith", "--loss", loss,
                "--seed", seed, "--max-steps", s.sft_steps, "--n-train", s.n_train, "--n-eval", s.curve_eval,
                "--eval-every", s.sft_steps], s.sft_steps)
    # full SFT vs cheap adaptation (Hu et al.; Lester et al.): from the same warm-up as SFT and DFT, as many
    # steps and demonstrations as SFT; only the adapters train, at their own learning rates. (From the raw base
    # they cannot learn the chat format: its special tokens' embeddings stay frozen at their random init.)
    cheap = [(f"lora-r{r}", ["--lora-r", r, "--lr", LORA_LR, "--min-lr", LORA_LR / 10]) for r in s.lora_ranks]
    cheap += [("prompt-tuning", ["--prompt-tuning", PROMPT_TOKENS, "--lr", PROMPT_LR, "--min-lr", PROMPT_LR / 10])]
    for seed in range(s.adapt_seeds):
        for name, flags in cheap:
            add(f"arith/{name}-seed{seed}", "sft", ["--init", d("arith/warmup"), "--task", "arith", *flags, "--seed",
                seed, "--max-steps", s.sft_steps, "--n-train", s.n_train, "--n-eval", s.curve_eval, "--eval-every",
                s.sft_steps], s.sft_steps)
    sft = d("arith/sft-seed0")
    for algo in ("grpo", "nft", "rft", "ppo"):
        add(f"arith/{algo}", "rlhf", ["--algo", algo, "--init", sft, "--task", "arith", "--max-steps", s.rl_steps,
            "--n-prompts", s.n_prompts, "--n-eval", s.curve_eval, "--n-kl", s.curve_eval, "--eval-every",
            s.rl_steps], s.rl_steps)
    for split in ("test", "ood"):
        add(f"arith/bon-{split}", "bon", ["--init", sft, "--task", "arith", "--split", split, "--sweep", s.sweep,
            "--n-prompts", s.sweep_prompts, "--out", d(f"arith/bon-{split}")], done_file="sweep.jsonl")
    # imitation (Gudibande et al.): the SFT policy (seed 0) is the teacher; a smaller model is fine-tuned on its
    # greedy answers to the SFT prompts, and the same smaller model on the true demonstrations, as many steps as
    # the teacher had (warm-up + SFT)
    add("arith/student-base", "base", ["--task", "arith", "--preset", s.student_preset, "--max-steps",
        s.base_steps], s.base_steps)
    add("arith/student-sft", "sft", ["--init", d("arith/student-base"), "--task", "arith", "--max-steps", tuned,
        "--n-train", s.n_train, "--n-eval", s.curve_eval, "--eval-every", tuned], tuned)
    add("arith/teacher-samples", "bon", ["--init", sft, "--task", "arith", "--split", "train", "--n", 1,
        "--temperature", 0, "--n-prompts", s.n_train, "--finished-only", "--out", d("arith/teacher-samples")],
        done_file="bon.jsonl")
    add("arith/imitation", "sft", ["--init", d("arith/student-base"), "--task", "arith", "--data",
        d("arith/teacher-samples") + "/bon.jsonl", "--max-steps", tuned, "--n-eval", s.curve_eval, "--eval-every",
        tuned], tuned)

    # sentiment: base, SFT, reward model, DPO and PPO at several strengths, best-of-N with the reward model
    add("sentiment/base", "base", ["--task", "sentiment", "--preset", s.preset, "--max-steps", s.base_steps],
        s.base_steps)
    add("sentiment/sft-seed0", "sft", ["--init", d("sentiment/base"), "--task", "sentiment", "--max-steps",
        s.sft_steps, "--n-train", s.n_train, "--n-eval", s.curve_eval, "--eval-every", s.sft_steps], s.sft_steps)
    sft = d("sentiment/sft-seed0")
    common = ["--init", sft, "--task", "sentiment", "--n-prompts", s.n_prompts, "--n-eval", s.curve_eval,
              "--n-kl", s.curve_eval]
    add("sentiment/rm", "rlhf", ["--algo", "rm", *common, "--max-steps", s.pref_steps, "--eval-every",
        s.pref_steps], s.pref_steps)
    rm_pairs = d("sentiment/rm")  # the pairs the reward model was built from: every DPO run trains on the same
    for beta in s.dpo_betas:
        add(f"sentiment/dpo-beta{beta}", "rlhf", ["--algo", "dpo", *common, "--data", rm_pairs + "/pairs-train.jsonl",
            "--val-data", rm_pairs + "/pairs-val.jsonl", "--beta", beta, "--max-steps", s.pref_steps,
            "--eval-every", s.pref_steps], s.pref_steps)
    for beta in s.ppo_betas:
        add(f"sentiment/ppo-beta{beta}", "rlhf", ["--algo", "ppo", *common, "--reward-model", d("sentiment/rm"),
            "--beta", beta, "--max-steps", s.rl_steps, "--eval-every", s.rl_steps], s.rl_steps)
    add("sentiment/bon-test", "bon", ["--init", sft, "--task", "sentiment", "--split", "test", "--reward-model",
        d("sentiment/rm"), "--sweep", s.sweep, "--n-prompts", s.sweep_prompts, "--out", d("sentiment/bon-test")],
        done_file="sweep.jsonl")

    # one identical evaluation of every final policy: reward on each split, KL to the task's seed-0 SFT model
    for st in list(stages):
        task, method = st.name.split("/")
        if st.script in ("sft", "rlhf") and method not in ("rm", "warmup"):
            add(f"{task}/eval/{method}", "eval", ["--init", d(st.name), "--task", task, "--reference",
                d(f"{task}/sft-seed0"), "--n-eval", s.n_eval, "--seed", method.partition("-seed")[2] or 0,
                "--out", d(f"{task}/eval/{method}") + "/eval.json"], done_file="eval.json")
    # retrieval-augmented prompting of the frozen base and SFT models (k solved train examples first)
    for k in s.retrieve_k:
        for name, policy in (("base", "arith/base"), ("sft", "arith/sft-seed0")):
            if k or name == "base":  # the SFT model without retrieval is its own row already
                add(f"arith/eval/rag-{name}-k{k}", "eval", ["--init", d(policy), "--task", "arith", "--reference",
                    d("arith/sft-seed0"), "--n-eval", s.n_eval, "--retrieve", k, "--out", d(f"arith/eval/rag-{name}-k{k}") + "/eval.json"],
                    done_file="eval.json")
    return stages


def stage_done(stage: Stage, out: Path) -> bool:
    """Training: its checkpoint reached the planned step. Evaluation: eval.json is of the policy's current
    checkpoint. sample_bon: its output file exists."""
    if stage.steps is not None:
        ckpt = find_checkpoint(out / stage.name)
        return ckpt is not None and json.loads((ckpt / "meta.json").read_text()).get("step") == stage.steps
    path = out / stage.name / stage.done_file
    if not path.is_file():
        return False
    if stage.script != "eval":
        return True
    ckpt, row = find_checkpoint(stage.init), json.loads(path.read_text())
    flag = lambda name, default: type(default)(stage.argv[stage.argv.index(name) + 1]) if name in stage.argv else default  # noqa: E731
    return ckpt is not None and row["step"] == json.loads((ckpt / "meta.json").read_text())["step"] and \
        row.get("n_eval") == flag("--n-eval", 0) and row.get("retrieve", 0) == flag("--retrieve", 0) and \
        "test_rewards" in row  # (an older eval.json has no per-prompt values)


class StageFailed(Exception):
    pass


def available_cores() -> int:
    """Cores this process may run on (a container's CPU affinity, not the host's core count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def start(stage: Stage, out: Path):
    """Launch one stage as a process; its output (progress bars included) goes to OUT/<stage>/log.txt."""
    log_path = out / stage.name / "log.txt"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    argv = stage.argv + (["--resume"] if stage.steps is not None else [])
    paths = [str(HERE)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "TQDM_MININTERVAL": "10"}
    # one thread per stage, whatever --jobs is: a thread count changes float sums in their last bits, and the
    # same command must give the same numbers (the tiny models gain nothing from a second thread anyway)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    script = SCRIPTS[stage.script]
    cmd = [sys.executable] + ([str(HERE / script[0])] if script[0].endswith(".py") else script) + argv
    with open(log_path, "a") as log:
        log.write("$ " + stage.command + "\n")
        log.flush()
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log_path


def pending(stages, out: Path, only=None):
    """-> (stages to run, names of complete stages, the complete stages --only selects). A stage also reruns
    when a stage it reads reruns (an evaluation of a policy about to train further is stale even if its step
    matches today)."""
    todo, done, skipped = [], set(), []
    selected = [s for s in stages if not only or any(s.name.startswith(o) for o in only)]
    if only and not selected:
        raise UserError(f"--only {','.join(only)}: no stage name starts with that (see the report's stage list)")
    for stage in stages:
        rerun_dep = any(d in {s.name for s in todo} for d in stage.deps)
        if stage_done(stage, out) and not rerun_dep:
            done.add(stage.name)
            if stage in selected:
                skipped.append(stage)
        elif stage in selected:
            todo.append(stage)
    for stage in todo:
        missing = [d for d in stage.deps if d not in done and d not in {s.name for s in todo}]
        if missing:
            raise UserError(f"--only: stage {stage.name} needs {', '.join(missing)} first (add it to --only)")
    return todo, done, skipped


def run_stages(stages, out: Path, jobs: int, only=None):
    """Run every incomplete stage, up to `jobs` at a time, each as soon as the stages it reads are complete.
    A progress line per stage with the elapsed time; a failed stage stops the run and shows its log's end."""
    t0 = time.time()
    todo, done, skipped = pending(stages, out, only)
    for stage in skipped:
        print(f"[{0:5.0f}s] {stage.name}: complete, skipped", flush=True)
    running = {}  # name -> (process, log path, start time)
    bar = tqdm(total=len(todo), desc="pipeline", unit="stage", disable=not todo)
    try:
        while todo or running:
            for stage in [s for s in todo if all(d in done for d in s.deps)][:jobs - len(running)]:
                proc, log_path = start(stage, out)
                running[stage.name] = (proc, log_path, time.time())
                todo.remove(stage)
                bar.write(f"[{time.time() - t0:5.0f}s] {stage.name}: started (log: {log_path})")
            time.sleep(0.2)
            for name, (proc, log_path, started) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[name]
                if proc.returncode != 0:
                    tail = log_path.read_text(errors="replace").replace("\r", "\n").splitlines()[-15:]
                    raise StageFailed(f"stage {name} failed (exit {proc.returncode}); the end of {log_path}:\n"
                                      + "\n".join(tail))
                stage = next(s for s in stages if s.name == name)
                if not stage_done(stage, out):  # e.g. a checkpoint already past the planned step
                    raise StageFailed(f"stage {name} exited 0 but is not complete (expected checkpoint step "
                                      f"{stage.steps} or {stage.done_file}); see {log_path}")
                done.add(name)
                bar.update(1)
                bar.write(f"[{time.time() - t0:5.0f}s] {name}: done in {time.time() - started:.0f}s")
    finally:
        for proc, _, _ in running.values():  # an error, Ctrl-C or SIGTERM: leave no stage running unattended
            proc.terminate()
        for proc, _, _ in running.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        bar.close()
    print(f"all stages done in {time.time() - t0:.0f}s", flush=True)


def interrupt(signum, frame):
    raise KeyboardInterrupt


def collect_evals(stages, out: Path) -> dict:
    """task -> one row per evaluated policy: its eval.json plus name, method and seed for the report."""
    evals = {}
    for st in stages:
        path = out / st.name / st.done_file
        if st.script != "eval" or not path.is_file():
            continue
        task, _, policy = st.name.split("/")
        row = json.loads(path.read_text())
        method, _, seed = policy.partition("-seed")
        row.update(name=str(Path(st.init).relative_to(out)), method=method, seed=int(seed or 0),
                   kl_to_sft=row["kl_to_ref"], samples=row["samples_used"])
        if method.startswith("rag-"):  # retrieval prompts a frozen model: it trains nothing of its own
            row.update(train_time_s=0.0, samples=0, trainable_params=0, tensor_memory_mb=None, peak_memory_mb=None)
        evals.setdefault(task, []).append(row)
    return evals


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="directory of every stage and of report.md (default out/study, "
                   "out/quick with --quick: the two never share checkpoints)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one to two minutes (same as --scale quick)")
    p.add_argument("--scale", default="cpu", choices=sorted(SCALES), help="stage sizes (see SCALES)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--jobs", type=int, default=None, help="stages run side by side (default: 2 on CPU, "
                   "sharing the cores; 1 on CUDA)")
    p.add_argument("--only", default=None, help="comma-separated stage-name prefixes to run, e.g. arith/base")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from existing results")
    args = p.parse_args(argv)
    scale = SCALES["quick" if args.quick else args.scale]
    device = pick_device(args.device)
    out = Path(args.out or ("out/quick" if args.quick or args.scale == "quick" else "out/study"))
    jobs = args.jobs or (1 if device.type == "cuda" else min(2, available_cores()))
    if jobs < 1:
        raise UserError("--jobs must be >= 1")
    if args.report_only and not out.is_dir():
        raise UserError(f"--report-only: {out} does not exist (run the pipeline into it first, or pass --out)")
    stages = plan(scale, out, device.type)
    signal.signal(signal.SIGTERM, interrupt)  # `kill` stops the stages too, as Ctrl-C does
    if not args.report_only:
        try:
            run_stages(stages, out, jobs, args.only.split(",") if args.only else None)
        except StageFailed as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
        except KeyboardInterrupt:
            print("interrupted: the running stages were stopped; rerun the same command to resume", file=sys.stderr)
            sys.exit(130)
        if args.only:
            return
    report = write_report(out, stages, scale, collect_evals(stages, out))
    print(f"report: {report}")


if __name__ == "__main__":
    run_main(main)
