"""The whole study on the built-in tasks: every method, one report (OUT/report.md + PNG plots).

Per seed, every chain runs on its own (SFT -> RL; SFT -> reward model -> PPO, DPO, best-of-N; students):
    arith:      base -> warm-up SFT -> SFT and DFT at each learning rate (picked on validation); SFT trained
                longer -> GRPO, NFT, RFT; reward model learnt from the warm-up's own samples (labelled by the
                verifier; a second one from the demonstrations) -> best-of-N vs SFT, by answer length; LoRA,
                prompt tuning, retrieval; the longer SFT as teacher -> students of 2 sizes on its answers or on
                true demonstrations, at 2 data amounts. The warm-up trains on chats of 1-3 problems
                (train_sft.py --turns), so retrieval's few-shot prompts are a shape it knows
    sentiment:  base -> SFT -> reward model -> PPO and DPO at 3 KL strengths -> best-of-N with the reward
                model; ground truth and reward-model score of every policy (over-optimisation)

Each stage is one script run as its own process with explicit flags (train_base, train_sft, train_rlhf,
sample_bon, then `python -m minipost.evaluate` for every final policy), so the commands in OUT/report.md
reproduce any single number. Stages run side by side (--jobs; on CPU two at a time, one thread each) as soon
as the stages they read are complete; each writes OUT/<stage>/log.txt. A rerun skips the stages whose
checkpoints (or outputs) are complete and resumes a stage that was killed half way. Every final policy gets
the same evaluation (OUT/<task>/eval/<policy>/eval.json); the report is written from those files, the
best-of-N sweeps and the runs' metrics JSONL.

CPU:   python pipeline.py                       # the demonstration: one seed, about 10 minutes on 2 cores
       python pipeline.py --scale full          # the study that answers: 3 seeds, about an hour (resumable)
       python pipeline.py --quick               # a few minutes: tiny sizes, the tests run this
GPU:   python pipeline.py --device cuda --scale gpu
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
from minipost.cli import UserError, pick_device, require_positive, run_main, writable_dir
from minipost.plots import plots
from minipost.report import read_sweeps, write_report
from minipost.stages import (DEMOS, IMITATOR, LORA, PROMPT_TUNING, RETRIEVAL, REWARD_MODEL, SFT_LIKE, STUDENT,
                             TEACHER, WARMUP, split_name)

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
    n_train: int  # SFT demonstrations (also: the validation prompts start after them)
    n_prompts: int  # RL prompts / sentiment preference prompts
    n_eval: int  # prompts per split in the final evaluation of every policy (minipost.evaluate)
    sweep: str  # best-of-N values
    sweep_prompts: int  # the first of the evaluation's prompts, so best-of-N pairs with the policies on them
    seeds: int  # every chain (SFT -> RL; SFT -> reward model -> PPO, DPO, best-of-N; students) runs once per seed
    lrs: dict = field(default_factory=lambda: {"sft": (2e-3,), "dft": (2e-3,)})  # swept; picked on validation
    curve_eval: int = 50  # prompts per split in the training scripts' own evaluations (the RL curves)
    curve_points: int = 4  # evaluations along each RL run
    preset: str = "tiny"  # model.PRESETS shape of every policy
    teacher_steps: int = 600  # sft-long: SFT this long after the warm-up; RL starts from it, it is also the teacher
    student_presets: tuple = ("micro",)  # smaller bases fine-tuned on the teacher's answers / true demonstrations
    imitation_sizes: tuple = (1000,)  # demonstrations (imitation or true) each student trains on
    arith_block: int = 256  # arith's context: room for 2-3 retrieved solved examples (~60 tokens each) first
    lora_ranks: tuple = (4, 16)
    retrieve_k: tuple = (2,)  # (4 solved examples never fit arith's 256-token context beside the answer)
    dpo_betas: tuple = (0.05, 0.1, 0.5)
    ppo_betas: tuple = (0.05, 0.2)
    sft_batch: int = 32  # demonstrations per SFT step
    # arith's warm-up (the start of SFT, DFT, best-of-N and every adaptation) teaches the chat format on chats of
    # 1, 2, 3 problems (train_sft.py --turns), half as many chats a step (as many demonstrations): a model tuned on
    # one-turn chats has never answered late in the context or after solved turns, which retrieval's few-shot
    # prompts ask (format 0.00-0.01 with 1-2 examples). The later SFT runs train on one-turn chats: at this size, chats
    # there cost the policies' greedy accuracy (0.05 against 0.11 on 100 test prompts, CPU scale)
    chat_turns: int = 3
    rm_k: int = 8  # best-of-N's reward model: samples per prompt of the warm-up, the verifier picks the pairs
    rm_prompts: int = 0  # ... from this many train prompts (0: n_train)
    demo_rm: bool = True  # also the reward model learnt from demonstrations, as a second selector (test split)
    rm_own_samples: bool = True  # False: the one reward model learns from demonstrations (a warm-up that has
    # never answered right, as --quick's, gives no verifier-labelled pairs)
    extra: dict = field(default_factory=dict)  # flags added to every call of a script, e.g. sizes


SFT_LR = 2e-3  # train_sft.py's default: the learning rate of the SFT policy every later stage starts from
SCALES = {
    "quick": Scale(base_steps=40, warmup_steps=10, sft_steps=40, rl_steps=2, pref_steps=6, n_train=200, n_prompts=32,
                   n_eval=16, curve_eval=16, curve_points=1, sweep="1,2,4", sweep_prompts=8, seeds=1, teacher_steps=60,
                   imitation_sizes=(100,), dpo_betas=(0.1,), ppo_betas=(0.05,), lora_ranks=(4,), retrieve_k=(2,),
                   sft_batch=8, rm_own_samples=False, demo_rm=False,
                   extra={"base": ["--corpus-docs", "2000", "--batch-size", "8", "--eval-batches", "2"],
                          "sft": ["--max-new-tokens", "40"],
                          "rlhf": ["--batch-size", "4", "--max-new-tokens", "40", "--n-kl", "8"],
                          "bon": ["--max-new-tokens", "40", "--time-prompts", "2"]}),
    # the README's main job: every question once (one seed), sized for about 10 minutes on 2 cores
    "cpu": Scale(base_steps=150, warmup_steps=60, sft_steps=120, rl_steps=12, pref_steps=40, n_train=2000,
                 n_prompts=400, n_eval=100, curve_eval=32, curve_points=2, sweep="1,2,4,8,16", sweep_prompts=100,
                 seeds=1, teacher_steps=300, imitation_sizes=(2000,), lora_ranks=(16,), retrieve_k=(2,),
                 dpo_betas=(0.05, 0.2), ppo_betas=(0.05, 0.2), rm_prompts=1000, demo_rm=False),
    # the study that answers: three seeds of every chain, learning rates picked on validation, 2 x 2 students
    "full": Scale(base_steps=200, warmup_steps=100, sft_steps=200, rl_steps=24, pref_steps=60, n_train=4000,
                  n_prompts=600, n_eval=200, curve_eval=64, sweep="1,2,4,8,16", sweep_prompts=200, seeds=3,
                  lrs={"sft": (1e-3, 2e-3, 4e-3), "dft": (2e-3, 5e-3, 1.2e-2)}, teacher_steps=600, retrieve_k=(1, 2),
                  student_presets=("micro", "mini"), imitation_sizes=(1000, 4000), dpo_betas=(0.01, 0.05, 0.2),
                  ppo_betas=(0.05, 0.2, 0.8)),
    "gpu": Scale(base_steps=5000, warmup_steps=200, sft_steps=1000, rl_steps=200, pref_steps=500, n_train=20000,
                 n_prompts=4000, n_eval=500, sweep="1,2,4,8,16,32,64", sweep_prompts=500, seeds=3, preset="small",
                 lrs={"sft": (3e-4, 6e-4, 1.2e-3), "dft": (6e-4, 1.2e-3, 2.4e-3)}, teacher_steps=3000,
                 student_presets=("micro", "tiny"), imitation_sizes=(5000, 20000), dpo_betas=(0.01, 0.05, 0.2),
                 ppo_betas=(0.05, 0.2, 0.8), sft_batch=64, extra={"base": ["--batch-size", "64"]}),
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


def lr_name(loss: str, lr: float) -> str:
    """The method name of an SFT/DFT run: plain at the default learning rate, else with it (sft-lr0.004)."""
    return loss if lr == SFT_LR else f"{loss}-lr{lr:g}"


class Plan:
    """The stages planned so far; add() appends one with its dependencies read from its flags."""

    def __init__(self, scale: Scale, out: Path, device: str):
        self.s, self.out, self.device, self.stages = scale, out, device, []

    def d(self, name) -> str:
        """A stage's directory, as its flags name it."""
        return str(self.out / name)

    def add(self, name, script, argv, steps=None, done_file=""):
        argv = [str(a) for a in list(argv) + ["--device", self.device] + self.s.extra.get(script, [])]
        if script not in ("bon", "eval"):
            argv += ["--out", self.d(name)]
        # a stage depends on every earlier stage whose directory appears in its flags (--init, --data, ...)
        deps = [st.name for st in self.stages
                if any(a == self.d(st.name) or a.startswith(self.d(st.name) + "/") for a in argv)]
        self.stages.append(Stage(name, script, argv, steps, done_file, deps))

    def sft(self, name, init, task, steps, *flags, seed=0, n_train=None):
        s = self.s
        batch = ["--batch-size", s.sft_batch]
        if name == "arith/warmup":  # chats of (turns + 1) / 2 problems on average
            batch = ["--turns", s.chat_turns, "--batch-size", s.sft_batch * 2 // (s.chat_turns + 1)]
        self.add(name, "sft", ["--init", self.d(init), "--task", task, *flags, *batch, "--seed", seed, "--max-steps",
                               steps, "--n-train", n_train or s.n_train, "--n-eval", s.curve_eval, "--eval-every",
                               steps], steps)


def plan(scale: Scale, out: Path, device: str) -> list[Stage]:
    """Every stage of the study, dependencies first; the long chains (RL, PPO) come early in the list, so
    they start as soon as they can."""
    p = Plan(scale, out, device)
    for part in (bases_and_sft, rl_arith, sentiment_chains, sft_vs_dft, best_of_n, cheap_adaptation, imitation,
                 evaluations, retrieval):
        part(p)
    return p.stages


def bases_and_sft(p: Plan):
    """Bases; arith's reads longer windows (as many tokens a step): retrieval's few-shot prompts must fit.
    arith: a short SFT warm-up teaches the chat format (DFT's p-weighted gradient cannot: from the base, the
    format's tokens have p ~ 0); SFT, DFT, the cheap adaptations and best-of-N all start from it."""
    s = p.s
    p.add("arith/base", "base", ["--task", "arith", "--preset", s.preset, "--max-steps", s.base_steps, "--block-size",
          s.arith_block, "--batch-size", 16 * 128 // s.arith_block], s.base_steps)
    p.add("sentiment/base", "base", ["--task", "sentiment", "--preset", s.preset, "--max-steps", s.base_steps],
          s.base_steps)
    p.sft("arith/warmup", "arith/base", "arith", s.warmup_steps)
    for seed in range(s.seeds):
        p.sft(f"sentiment/sft-seed{seed}", "sentiment/base", "sentiment", s.sft_steps, seed=seed)
        p.sft(f"arith/sft-seed{seed}", "arith/warmup", "arith", s.sft_steps, "--loss", "sft", seed=seed)


def rl_arith(p: Plan):
    """RL on arith (Chen et al.): each seed's chain starts from its own SFT policy trained longer (teacher_steps:
    from the plain SFT policy, ~0.13 T = 1 accuracy, a few dozen RL steps move nothing beyond noise); equal
    budgets (same steps, prompts per step and samples per prompt), evaluated curve_points times on the way.
    sft-long-seed0 is also the imitation study's teacher."""
    s, d = p.s, p.d
    for seed in range(s.seeds):
        p.sft(f"arith/{TEACHER}-seed{seed}", "arith/warmup", "arith", s.teacher_steps, "--loss", "sft", seed=seed)
    for seed in range(s.seeds):
        for algo in ("grpo", "nft", "rft"):
            p.add(f"arith/{algo}-seed{seed}", "rlhf", ["--algo", algo, "--init", d(f"arith/{TEACHER}-seed{seed}"),
                  "--task", "arith", "--seed", seed, "--max-steps", s.rl_steps, "--n-prompts", s.n_prompts,
                  "--n-eval", s.curve_eval, "--n-kl", s.curve_eval, "--eval-every", s.rl_steps // s.curve_points],
                  s.rl_steps)


def sentiment_chains(p: Plan):
    """sentiment (Rafailov et al.; Gao et al.): per seed, SFT -> reward model on pairs of the SFT policy's
    samples -> PPO with that reward model and DPO on those same pairs, each at several KL strengths."""
    s, d = p.s, p.d
    for seed in range(s.seeds):
        sft_s, rm = f"sentiment/sft-seed{seed}", f"sentiment/{REWARD_MODEL}seed{seed}"
        common = ["--init", d(sft_s), "--task", "sentiment", "--seed", seed, "--n-prompts", s.n_prompts, "--n-eval",
                  s.curve_eval, "--n-kl", s.curve_eval]
        p.add(rm, "rlhf", ["--algo", "rm", *common, "--max-steps", s.pref_steps, "--eval-every", s.pref_steps],
              s.pref_steps)
        for beta in s.ppo_betas:
            p.add(f"sentiment/ppo-beta{beta}-seed{seed}", "rlhf", ["--algo", "ppo", *common, "--reward-model", d(rm),
                  "--beta", beta, "--max-steps", s.rl_steps, "--eval-every", s.rl_steps], s.rl_steps)
        for beta in s.dpo_betas:
            p.add(f"sentiment/dpo-beta{beta}-seed{seed}", "rlhf", ["--algo", "dpo", *common, "--data",
                  d(rm) + "/pairs-train.jsonl", "--val-data", d(rm) + "/pairs-val.jsonl", "--beta", beta,
                  "--max-steps", s.pref_steps, "--eval-every", s.pref_steps], s.pref_steps)
        p.add(f"sentiment/bon-test-seed{seed}", "bon", ["--init", d(sft_s), "--task", "sentiment", "--split", "test",
              "--reward-model", d(rm), "--seed", seed, "--prompt-seed", 1, "--sweep", s.sweep, "--n-prompts",
              s.sweep_prompts, "--out", d(f"sentiment/bon-test-seed{seed}")], done_file="sweep.jsonl")


def sft_vs_dft(p: Plan):
    """SFT vs DFT (Wu et al.): each at each of its learning rates; the report picks each method's on validation."""
    s = p.s
    for seed in range(s.seeds):
        for loss in SFT_LIKE:
            for lr in s.lrs[loss]:
                if (loss, lr) != ("sft", SFT_LR):  # that one is the chain's SFT policy (bases_and_sft)
                    p.sft(f"arith/{lr_name(loss, lr)}-seed{seed}", "arith/warmup", "arith", s.sft_steps, "--loss",
                          loss, "--lr", lr, "--min-lr", lr / 10, seed=seed)


def best_of_n(p: Plan):
    """SFT vs best-of-N (Somerstep et al.): from the warm-up SFT also starts from, a reward model learns to rank
    what it will select among, the warm-up's own samples (rm_k per prompt, a correct one preferred to a wrong
    one by the verifier), and picks the best of N warm-up samples; the verifier itself selecting is the oracle
    beside it. With demo_rm a second reward model learns from SFT's demonstrations (each preferred to a wrong
    warm-up sample of its prompt), the data SFT has: its own best-of-N row on test shows what that selector can
    rank. sample_bon reports each selector's AUC on the pool it selects from."""
    s, d = p.s, p.d
    for seed in range(s.seeds):
        rm, demo_rm = f"arith/{REWARD_MODEL}seed{seed}", f"arith/{REWARD_MODEL}{DEMOS}seed{seed}"
        common = ["--init", d("arith/warmup"), "--task", "arith", "--seed", seed, "--n-eval", s.curve_eval,
                  "--max-steps", s.pref_steps, "--eval-every", s.pref_steps]
        own = ["--n-prompts", s.rm_prompts or s.n_train, "--k", s.rm_k]
        demos = ["--pairs-from-demos", "--n-prompts", s.n_train, "--k", 2]
        p.add(rm, "rlhf", ["--algo", "rm", *common, *(own if s.rm_own_samples else demos)], s.pref_steps)
        selectors = [("", rm, ("test", "ood"))]
        if s.demo_rm:
            p.add(demo_rm, "rlhf", ["--algo", "rm", *common, *demos], s.pref_steps)
            selectors.append((DEMOS, demo_rm, ("test",)))
        for tag, model, splits in selectors:
            for split in splits:
                name = f"arith/bon-{tag}{split}-seed{seed}"
                p.add(name, "bon", ["--init", d("arith/warmup"), "--task", "arith", "--split", split, "--reward-model",
                      d(model), "--seed", seed, "--prompt-seed", 1, "--sweep", s.sweep, "--n-prompts",
                      s.sweep_prompts, "--out", d(name)], done_file="sweep.jsonl")


def cheap_adaptation(p: Plan):
    """Full SFT vs cheap adaptation (Hu et al.; Lester et al.): from the same warm-up, as many steps and
    demonstrations as SFT; only the adapters train, at their own learning rates."""
    s = p.s
    cheap = [(f"{LORA}{r}", ["--lora-r", r, "--lr", LORA_LR, "--min-lr", LORA_LR / 10]) for r in s.lora_ranks]
    cheap += [(PROMPT_TUNING, ["--prompt-tuning", PROMPT_TOKENS, "--lr", PROMPT_LR, "--min-lr", PROMPT_LR / 10])]
    for seed in range(s.seeds):
        for name, flags in cheap:
            p.sft(f"arith/{name}-seed{seed}", "arith/warmup", "arith", s.sft_steps, *flags, seed=seed)


def imitation(p: Plan):
    """Imitation (Gudibande et al.): the teacher is the policy's size trained longer (sft-long-seed0); smaller
    students fine-tuned on its greedy answers, or on as many true demonstrations, as many steps as SFT had."""
    s, d = p.s, p.d
    tuned = s.warmup_steps + s.sft_steps
    p.add("arith/teacher-samples", "bon", ["--init", d(f"arith/{TEACHER}-seed0"), "--task", "arith", "--split",
          "train", "--n", 1, "--temperature", 0, "--n-prompts", max(s.imitation_sizes), "--finished-only", "--out",
          d("arith/teacher-samples")], done_file="bon.jsonl")
    for preset in s.student_presets:
        base = f"arith/{STUDENT}{preset}-base"
        p.add(base, "base", ["--task", "arith", "--preset", preset, "--max-steps", s.base_steps], s.base_steps)
        for n in s.imitation_sizes:
            for seed in range(s.seeds):
                p.sft(f"arith/{STUDENT}{preset}-n{n}-seed{seed}", base, "arith", tuned, seed=seed, n_train=n)
                p.sft(f"arith/{IMITATOR}{preset}-n{n}-seed{seed}", base, "arith", tuned, "--data",
                      d("arith/teacher-samples") + "/bon.jsonl", seed=seed, n_train=n)


def evaluations(p: Plan):
    """One identical evaluation of every final policy: reward on each split, KL to its chain's SFT policy (the
    same seed's; an RL run's is the policy it started from); SFT-like arith runs also on validation (held-out
    train-distribution prompts); sentiment policies also get their reward model's (proxy) score, for the
    over-optimisation plot."""
    s, d = p.s, p.d
    for st in list(p.stages):
        task, method = st.name.split("/")
        if st.script not in ("sft", "rlhf") or method.startswith(REWARD_MODEL):
            continue  # (the warm-up is evaluated: it is where SFT, DFT, best-of-N and the adaptations start)
        seed = method.partition("-seed")[2] or "0"
        flags = ["--validation-from", s.n_train] if task == "arith" and method.startswith(SFT_LIKE) else []
        if task == "sentiment":
            flags = ["--reward-model", d(f"sentiment/{REWARD_MODEL}seed{seed}")]
        reference = st.init if st.script == "rlhf" else d(f"{task}/sft-seed{seed}")  # the chain's SFT policy
        p.add(f"{task}/eval/{method}", "eval", ["--init", d(st.name), "--task", task, "--reference",
              reference, "--n-eval", s.n_eval, "--seed", seed, *flags, "--out",
              d(f"{task}/eval/{method}") + "/eval.json"], done_file="eval.json")


def retrieval(p: Plan):
    """Retrieval-augmented prompting: k solved train examples before the question, to the frozen warm-up (the
    start every adaptation shares; nothing trained, no seed) and to each seed's SFT policy."""
    s, d = p.s, p.d
    for k in s.retrieve_k:
        for name, policy, seed in [("warmup", "arith/warmup", 0)] + [("sft", f"arith/sft-seed{i}", i)
                                                                     for i in range(s.seeds)]:
            tag = f"{RETRIEVAL}{name}-k{k}" + (f"-seed{seed}" if name == "sft" else "")
            p.add(f"arith/eval/{tag}", "eval", ["--init", d(policy), "--task", "arith", "--reference",
                  d(f"arith/sft-seed{seed}"), "--n-eval", s.n_eval, "--retrieve", k, "--out",
                  d(f"arith/eval/{tag}") + "/eval.json"], done_file="eval.json")


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
    flag = lambda name, default: (int(stage.argv[stage.argv.index(name) + 1]) if name in ("--n-eval", "--retrieve",  # noqa: E731
                                  "--validation-from") else stage.argv[stage.argv.index(name) + 1]) if name in stage.argv else default
    return ckpt is not None and row["step"] == json.loads((ckpt / "meta.json").read_text())["step"] and \
        row.get("n_eval") == flag("--n-eval", 0) and row.get("retrieve", 0) == flag("--retrieve", 0) and \
        row.get("validation_from") == flag("--validation-from", None) and \
        row.get("reward_model") == flag("--reward-model", None) and \
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
        task, method, seed = split_name(st.name)
        row = json.loads(path.read_text())
        row.update(name=str(Path(st.init).relative_to(out)), method=method, seed=seed,
                   kl_to_sft=row["kl_to_ref"], samples=row["samples_used"])
        if method.startswith(RETRIEVAL):  # retrieval prompts a frozen model: it trains nothing of its own
            row.update(train_time_s=0.0, samples=0, trainable_params=0, tensor_memory_mb=None, peak_memory_mb=None)
        evals.setdefault(task, []).append(row)
    return evals


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="directory of every stage and of report.md (default out/study, "
                   "out/quick with --quick: the two never share checkpoints)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, a few minutes (same as --scale quick)")
    p.add_argument("--scale", default="cpu", choices=sorted(SCALES), help="stage sizes (see SCALES): cpu, the "
                   "default, is a ~10-minute demonstration with one seed; full is the study that answers (3 seeds "
                   "of every chain, about an hour on 2 cores); gpu is full at GPU sizes")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--jobs", type=int, default=None, help="stages run side by side (default: 2 on CPU, "
                   "sharing the cores; 1 on CUDA)")
    p.add_argument("--only", default=None, help="comma-separated stage-name prefixes to run, e.g. arith/base")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from existing results")
    args = p.parse_args(argv)
    name = "quick" if args.quick else args.scale
    scale, device = SCALES[name], pick_device(args.device)
    out = Path(args.out or {"quick": "out/quick", "cpu": "out/study"}.get(name, f"out/study-{name}"))
    require_positive(args, "jobs")
    jobs = args.jobs or (1 if device.type == "cuda" else min(2, available_cores()))
    if args.report_only and not out.is_dir():
        raise UserError(f"--report-only: {out} does not exist (run the pipeline into it first, or pass --out)")
    writable_dir(out)
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
    evals = collect_evals(stages, out)
    made = plots(out, stages, evals, read_sweeps(out, stages))
    report = write_report(out, stages, scale, evals, made)
    print(f"report: {report}")


if __name__ == "__main__":
    run_main(main)
