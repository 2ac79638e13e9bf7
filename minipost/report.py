"""The study's report: markdown tables, one verdict per question and PNG plots, built only from the files the
stages wrote.

Inputs (under the pipeline's OUT): <task>/eval/<policy>/eval.json (one uniform evaluation per final policy),
<task>/bon-*-seed<s>/sweep.jsonl (best-of-N sweeps), <stage>/metrics.jsonl (training curves). Every number in
report.md is read from those files; tests/test_pipeline.py checks that they match.

A method's row is the mean over its seeds (each seed its own chain: SFT -> RL, SFT -> reward model -> PPO / DPO /
best-of-N, ...); how two rows are compared, and the preconditions each question checks first: minipost/verdicts.py.
"""
import json
import math
from pathlib import Path

from .model import PRESETS
# the method names pipeline.py gives its stages: ORDER (table rows), CHEAP (question 6), IMITATION (question 5)
from .stages import CHEAP, DEMOS, IMITATION, IMITATOR, ORDER, RETRIEVAL, SFT_LIKE, STUDENT, TEACHER, WARMUP
from .tasks import get_task
from .verdicts import (FORMAT_GAP, claim, compare, difference, in_range, mean, mean_sd, noise, not_testable, per_prompt,
                       preconditions, ranks, selector_auc, verdict)


def read_jsonl(path):
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def fmt(values, digits=3):
    m, sd, n = mean_sd(values)
    if m is None:
        return "–"
    return f"{m:.{digits}f}" if sd is None else f"{m:.{digits}f} ± {sd:.{digits}f} (n={n})"


def order_key(method):
    first = next((i for i, p in enumerate(ORDER) if method.startswith(p)), len(ORDER))
    return first, method


def by_method(rows):
    groups = {}
    for r in rows:
        groups.setdefault(r["method"], []).append(r)
    return dict(sorted(groups.items(), key=lambda kv: order_key(kv[0])))


def method_table(rows, columns):
    """columns: (header, eval key, digits). One row per method: mean ± sd over its seeds."""
    lines = ["| method | " + " | ".join(c[0] for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for method, group in by_method(rows).items():
        cells = [fmt([r.get(key) for r in group], digits) for _, key, digits in columns]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


COST_COLUMNS = [("KL to SFT (nats/seq)", "kl_to_sft", 2), ("train time (s)", "train_time_s", 0),
                ("samples used", "samples", 0)]
ARITH_COLUMNS = [("test accuracy (greedy)", "test_reward", 3), ("test accuracy (T = 1 samples)", "test_sample_reward", 3),
                 ("ood accuracy (greedy)", "ood_reward", 3), ("format (test)", "test_format", 3)] + COST_COLUMNS
LR_COLUMNS = [("validation accuracy (greedy)", "val_reward", 3), ("test accuracy (greedy)", "test_reward", 3),
              ("ood accuracy (greedy)", "ood_reward", 3), ("format (test)", "test_format", 3)]
IMITATION_COLUMNS = [("test accuracy (greedy)", "test_reward", 3), ("ood accuracy (greedy)", "ood_reward", 3),
                     ("format (test)", "test_format", 3), ("format (ood)", "ood_format", 3),
                     ("train time (s)", "train_time_s", 0), ("samples used", "samples", 0)]
SENTIMENT_COLUMNS = [("test reward (T = 1 samples)", "test_sample_reward", 3),
                     ("reward-model score (proxy)", "test_proxy_reward", 3), ("format (test)", "test_format", 3)] \
    + COST_COLUMNS
ADAPT_COLUMNS = [("test accuracy (greedy)", "test_reward", 3), ("ood accuracy (greedy)", "ood_reward", 3),
                 ("format (test)", "test_format", 3), ("trainable params", "trainable_params", 0),
                 ("train time (s)", "train_time_s", 0), ("tensor memory (MB)", "tensor_memory_mb", 1),
                 ("peak RSS (MB)", "peak_memory_mb", 0)]


def seeds_note(rows):
    n = len({r.get("seed", 0) for r in rows})
    return f"n={n} seed{'s' if n > 1 else ''}" + ("" if n >= 3 else ", underpowered: run --scale full")


# -------------------------------------------------------------------------------------- best-of-N rows

def sweep_rows(sweeps, prefix):
    """{seed: sweep rows} of the sweeps named <prefix>-seed<s> (e.g. "arith/bon-test")."""
    return {int(name.rpartition("-seed")[2]): rows for name, rows in sweeps.items()
            if name.rpartition("-seed")[0] == prefix and rows}


def bon_as_rows(by_seed, n, key="rewards"):
    """Best-of-n of each seed's sweep as evaluation-like rows ({"seed", "x": per-prompt values})."""
    return [{"seed": s, "x": next(r[key] for r in rows if r["n"] == n)} for s, rows in sorted(by_seed.items())]


def truncated(rows, key, n):
    """Evaluation rows' per-prompt `key` cut to the first n prompts (a sweep scores the first n of them)."""
    return [{"seed": r["seed"], "x": r[key][:n]} for r in rows]


def mean_sweep(by_seed):
    """One sweep row per N: every numeric field averaged over seeds; reward_se = the seeds' standard error
    (or the single sweep's own)."""
    out = []
    for i, first in enumerate(next(iter(by_seed.values()))):
        rows = [rows[i] for rows in by_seed.values()]
        row = {k: mean([r[k] for r in rows]) for k, v in first.items() if isinstance(v, (int, float))}
        if len(rows) > 1:
            row["reward_se"] = mean_sd([r["reward"] for r in rows])[1] / math.sqrt(len(rows))
        row["seeds"] = len(rows)
        out.append(row)
    return out


def sweep_table(sweep):
    oracle = "oracle_reward" in sweep[0]
    head = "| N | reward | " + ("oracle (ground truth selects) | " if oracle else "") + \
        "format | KL estimate | KL bound log N - (N-1)/N | gen s/prompt |"
    lines = [head, "|---" * (7 if oracle else 6) + "|"]
    for r in sweep:
        lines.append(f"| {r['n']:.0f} | {r['reward']:.3f} ± {r['reward_se']:.3f} | "
                     + (f"{r['oracle_reward']:.3f} | " if oracle else "")
                     + f"{r['format']:.3f} | {r['kl_est']:.3f} | {r['kl_bound']:.3f} | {r['gen_s_per_prompt']:.3f} |")
    return "\n".join(lines)


def prompt_steps(split, n):
    """Arithmetic steps of each of the first n evaluation prompts of an arith split (minipost.evaluate's seed 1)."""
    return [row["steps"] for row in get_task("arith").prompts(split, n, seed=1)]


def length_gaps(evals, sweeps, n):
    """SFT (greedy) minus best-of-n (reward model selects), by the problem's arithmetic steps: {steps: (gap,
    two standard errors, prompts)}, from the test split (1 and 2 steps) and the ood split (3 steps)."""
    sft = [r for r in evals.get("arith", []) if r["method"] == "sft"]
    out = {}
    for split in ("test", "ood"):
        by_seed = sweep_rows(sweeps, f"arith/bon-{split}")
        if not sft or not by_seed:
            continue
        bon = bon_as_rows(by_seed, n)
        P = len(bon[0]["x"])
        steps = prompt_steps(split, P)
        for L in sorted(set(steps)):
            keep = [i for i, v in enumerate(steps) if v == L]
            cut = lambda rows: [{"seed": r["seed"], "x": [r["x"][i] for i in keep]} for r in rows]  # noqa: E731
            a, b = cut(truncated(sft, f"{split}_rewards", P)), cut(bon)
            out[L] = (mean(per_prompt(a, "x")) - mean(per_prompt(b, "x")), noise(a, b, "x"), len(keep))
    return out


# -------------------------------------------------------------------------------------------- questions

def of(rows, method):
    return [r for r in rows if r["method"] == method]


def sft_vs_bon(evals, sweeps, rm_from_demos=False):
    """(1) Somerstep et al.: SFT beats best-of-N with a learned selector, by more as answers get longer. Only
    read where the selector ranks its own pool better than chance: at chance best-of-N is flat in N, and the
    comparison is SFT against a coin."""
    sft = of(evals.get("arith", []), "sft")
    test, demos = sweep_rows(sweeps, "arith/bon-test"), sweep_rows(sweeps, f"arith/bon-{DEMOS}test")
    if not sft or not test:
        return []
    sweep = mean_sweep(test)
    P, top = int(sweep[0]["n_prompts"]), int(sweep[-1]["n"])
    a = truncated(sft, "test_rewards", P)
    curve = lambda rows, key: ", ".join(f"N={r['n']:.0f}: {r[key]:.3f}" for r in rows if key in r)  # noqa: E731
    text = ("**(1) SFT vs best-of-N (Somerstep et al. 2025).** Both start from the same warm-up policy: SFT trains on "
            "demonstrations; a reward model learns "
            + ("from those demonstrations (each preferred to a wrong warm-up sample of its prompt)" if rm_from_demos
               else "to rank what it will select among, the warm-up's own samples (several per train prompt, a "
                    "correct one preferred to a wrong one by the verifier)")
            + f" and picks the best of N warm-up samples. On the first {P} test prompts ({seeds_note(sft)}): SFT greedy "
            f"{mean(per_prompt(a, 'x')):.3f}; best-of-N with the reward model {curve(sweep, 'reward')}; with the "
            f"verifier as an oracle selector {curve(sweep, 'oracle_reward')}")
    if demos:
        text += (f"; with a second reward model learnt from the demonstrations (each preferred to a wrong warm-up "
                 f"sample) {curve(mean_sweep(demos), 'reward')}")
    checks = [ranks(selector_auc(test), "the reward model")]
    said, blocked = preconditions(checks)
    text += "." + said
    if demos:
        met, what = ranks(selector_auc(demos), "the demonstration-trained reward model")
        text += (f" The second selector: {what}" + ("." if met else "; no claim is read from its curve."))
    text += f" The claim that SFT beats best-of-{top} (reward model) " + claim(a, bon_as_rows(test, top), "x", blocked) + "."
    gaps = length_gaps(evals, sweeps, top)
    if len(gaps) > 1:
        lo, hi = min(gaps), max(gaps)
        diff, two_se = gaps[hi][0] - gaps[lo][0], math.hypot(gaps[hi][1], gaps[lo][1])  # independent prompts
        text += (" By answer length (SFT minus best-of-" + str(top) + "): " + ", ".join(
            f"{L} step{'s' if L > 1 else ''} {g:+.3f} ± {se:.3f} ({n} prompts)" for L, (g, se, n) in gaps.items())
            + f". The claim that the gap grows with length ({hi} steps vs {lo}) "
            + (not_testable(blocked) if blocked else verdict(diff, two_se)) + ".")
    return [text]


def lr_choice(rows, loss):
    """The learning rate of `loss` (sft / dft) with the best mean validation accuracy -> (method, {method: val})."""
    family = {m: g for m, g in by_method(rows).items() if m == loss or m.startswith(loss + "-lr")}
    vals = {m: mean([r.get("val_reward") for r in g]) for m, g in family.items()}
    vals = {m: v for m, v in vals.items() if v is not None}
    return (max(vals, key=vals.get) if vals else None), vals


def dft_vs_sft(evals):
    """(2) Wu et al.: DFT generalises better than SFT, each at its own learning rate picked on validation."""
    a = evals.get("arith", [])
    (sft, sft_vals), (dft, dft_vals) = lr_choice(a, "sft"), lr_choice(a, "dft")
    if not sft or not dft:
        return []
    S, D = of(a, sft), of(a, dft)
    swept = "; ".join(f"{m} {v:.3f}" for m, v in {**sft_vals, **dft_vals}.items())
    # DFT weights each token's loss by its probability: from a start that solves almost nothing it has little
    # to weight, and from one that solves almost everything neither method has room
    said, blocked = preconditions([in_range(mean([r["test_reward"] for r in of(a, WARMUP)]),
                                            "the warm-up's greedy test accuracy")])
    return [f"**(2) DFT vs SFT (Wu et al. 2025).** Learning rates picked on validation (held-out problems of the "
            f"training distribution; greedy accuracy: {swept}): SFT → {sft}, DFT → {dft}. Both continue from the "
            "same short SFT warm-up (from the raw base DFT cannot learn the chat format: its weight p is ~0 on the "
            f"format's tokens). {seeds_note(S)}. OOD (3-step problems) accuracy SFT {fmt([r['ood_reward'] for r in S])}, "
            f"DFT {fmt([r['ood_reward'] for r in D])}; in distribution SFT {fmt([r['test_reward'] for r in S])}, DFT "
            f"{fmt([r['test_reward'] for r in D])}.{said} The claim that DFT generalises better (OOD) "
            + claim(D, S, "ood_rewards", blocked) + "; that DFT beats SFT in distribution "
            + claim(D, S, "test_rewards", blocked) + "."]


def rl_methods(evals):
    """(3) Chen et al.: NFT, RFT and GRPO from the same SFT policies, at equal sample budgets."""
    a = evals.get("arith", [])
    sft, rl = of(a, TEACHER), {m: of(a, m) for m in ("nft", "rft", "grpo")}
    if not sft or not all(rl.values()):
        return []
    key = "test_sample_rewards"
    parts = [f"{m.upper()} {fmt([r['test_sample_reward'] for r in rows])}" for m, rows in rl.items()]
    # RL learns from the rewards of its own samples: a start that is never (or always) right gives no signal
    said, blocked = preconditions([in_range(mean([r["test_sample_reward"] for r in sft]),
                                            f"the start's ({TEACHER}) T = 1 test accuracy")])
    gains = [f"for {m.upper()} it " + claim(rows, sft, key, blocked) for m, rows in rl.items()]
    return ["**(3) NFT vs RFT vs GRPO (Chen et al. 2025).** Each seed's chain starts from its own SFT policy "
            f"trained longer ({TEACHER}; T = 1 test accuracy {fmt([r['test_sample_reward'] for r in sft])}); every "
            "method generates the "
            f"same samples per step for the same steps ({seeds_note(sft)}). T = 1 test accuracy after RL: "
            + ", ".join(parts) + "." + said + " The claim that RL improves on the SFT policy: " + "; ".join(gains)
            + ". The claim that NFT beats RFT " + claim(rl["nft"], rl["rft"], key, blocked) + "; that GRPO beats NFT "
            + claim(rl["grpo"], rl["nft"], key, blocked)
            + " (T = 1 accuracy; greedy in the table; accuracy against samples in rl_curves.png)."]


def frontier_points(rows, prefix):
    """{method: (mean KL, mean reward, rows)} of the methods starting with prefix (ppo-beta0.05, ...)."""
    return {m: (mean([r["kl_to_sft"] for r in g]), mean([r["test_sample_reward"] for r in g]), g)
            for m, g in by_method(rows).items() if m.startswith(prefix)}


def ppo_vs_dpo(evals, sweeps):
    """(4) Rafailov et al.: DPO reaches more reward than PPO at the same KL to the SFT policy."""
    s = evals.get("sentiment", [])
    ppo, dpo, sft = frontier_points(s, "ppo-"), frontier_points(s, "dpo-"), of(s, "sft")
    if not ppo or not dpo or not sft:
        return []
    text = ("**(4) PPO vs DPO: reward against KL (Rafailov et al. 2023).** Per seed one chain: SFT → reward "
            "model (pairs of the SFT policy's samples ranked by the hidden ground truth) → PPO with that reward "
            f"model, DPO on those same pairs ({seeds_note(sft)}). Ground-truth reward of T = 1 samples at KL to SFT "
            f"(SFT itself {mean([r['test_sample_reward'] for r in sft]):.3f}): "
            + "; ".join(f"{m} {r:.3f} at {k:.2f} nats" for m, (k, r, _) in {**ppo, **dpo}.items()))
    # compare where both reach: the best mean reward of each method among its strengths within the KL budget
    # that both methods' frontiers cover (its largest mean KL, the smaller of the two), 10% slack
    test = sweep_rows(sweeps, "sentiment/bon-test")
    blocked = None
    if test:  # PPO climbs its reward model: one that cannot rank the SFT policy's samples gives it nothing to climb
        said, blocked = preconditions([ranks(selector_auc(test), "the reward model (on the SFT policy's samples)")])
        text += "." + said.rstrip(".")
    budget = min(max(k for k, _, _ in ppo.values()), max(k for k, _, _ in dpo.values()))
    best = {}
    for name, pts in (("PPO", ppo), ("DPO", dpo)):
        inside = {m: p for m, p in pts.items() if p[0] <= 1.1 * budget}
        if inside:
            best[name] = max(inside, key=lambda m: inside[m][1])
    if len(best) == 2:
        text += (f". Within {budget:.2f} nats (the largest KL both reach): PPO's best {best['PPO']}, DPO's best "
                 f"{best['DPO']}; the claim that DPO reaches more reward there "
                 + claim(dpo[best["DPO"]][2], ppo[best["PPO"]][2], "test_sample_rewards", blocked))
    else:
        text += ". The two frontiers do not overlap in KL, so they cannot be compared at equal KL here"
    if test:
        sweep = mean_sweep(test)
        text += ("; best-of-N with the same reward models: " + ", ".join(
            f"N={r['n']:.0f} {r['reward']:.3f} at {r['kl_est']:.2f} nats" for r in sweep))
    proxy = [(k, mean([r.get("test_proxy_reward") for r in g]), rw) for k, rw, g in ppo.values()]
    if all(p is not None for _, p, _ in proxy):
        text += (". Over-optimisation (overoptimisation.png): PPO's reward-model score / ground truth, by KL: "
                 + ", ".join(f"{k:.2f} nats {p:.3f} / {rw:.3f}" for k, p, rw in sorted(proxy)))
    return [text + "."]


def imitation(evals):
    """(5) Gudibande et al.: imitation copies style, not capability; more imitation data does not close the gap,
    a bigger base does."""
    a = evals.get("arith", [])
    teacher = [r for r in of(a, TEACHER) if r["seed"] == 0]
    groups = {m: g for m, g in by_method(a).items() if m.startswith(IMITATOR)}
    if not teacher or not groups:
        return []
    t = teacher[0]
    text = (f"**(5) Imitation (Gudibande et al. 2023).** Teacher: the policy's size trained longer ({TEACHER}, seed "
            "0; format "
            f"{t['test_format']:.3f}, test accuracy {t['test_reward']:.3f}). Students fine-tuned on its greedy answers "
            "(imitation) or on as many true demonstrations, format / accuracy: ")
    parts = []
    for m, g in groups.items():
        true = of(a, m.replace(IMITATOR, STUDENT, 1))
        parts.append(f"{m} {mean([r['test_format'] for r in g]):.3f} / {mean([r['test_reward'] for r in g]):.3f}"
                     + (f" (true data {mean([r['test_format'] for r in true]):.3f} / "
                        f"{mean([r['test_reward'] for r in true]):.3f})" if true else ""))
    text += "; ".join(parts) + f" ({seeds_note(next(iter(groups.values())))})."
    sizes = sorted({m.split("-")[1] for m in groups}, key=list(PRESETS).index)  # smallest model first
    amounts = sorted({int(m.rpartition("-n")[2]) for m in groups})
    small, big, n_lo, n_hi = sizes[0], sizes[-1], amounts[0], amounts[-1]
    top = groups[f"{IMITATOR}{big}-n{n_hi}"]
    # imitation can only fail to copy a capability the teacher has and the students lack: the teacher must be
    # ahead of a student of that size trained on as many true demonstrations
    true_top = of(a, f"{STUDENT}{big}-n{n_hi}")
    what = f"the teacher ahead of the {big} student trained on {n_hi} true demonstrations: "
    if true_top:
        diff, two_se = difference(teacher, true_top, "test_rewards")
        lead = (diff > two_se, what + verdict(diff, two_se))
    else:
        lead = (False, what + "not measured")
    said, blocked = preconditions([lead])
    text += said
    fgap = mean([r["test_format"] for r in top]) - t["test_format"]
    text += (f" Style: the imitator's format is within {abs(fgap):.3f} of the teacher's ("
             + ("copied, |gap| <= 0.05" if abs(fgap) <= 0.05 else "not copied, |gap| > 0.05") + "). The claim that "
             f"capability is not copied (teacher ahead of the {big} imitator at n={n_hi}) "
             + claim(teacher, top, "test_rewards", blocked) + ".")
    if n_hi != n_lo:
        for p in sizes:
            text += (f" The claim that more imitation data ({n_lo} → {n_hi}) raises the {p} imitator's accuracy "
                     + claim(groups[f"{IMITATOR}{p}-n{n_hi}"], groups[f"{IMITATOR}{p}-n{n_lo}"], "test_rewards",
                             blocked)
                     + ".")
    if big != small:
        text += (f" The claim that a bigger base ({big} vs {small}, n={n_hi}) raises the imitator's accuracy "
                 + claim(top, groups[f"{IMITATOR}{small}-n{n_hi}"], "test_rewards", blocked) + ".")
    return [text]


def adaptation(evals):
    """(6): full SFT against the best cheap adaptation, in and out of distribution, and what each cost."""
    a = evals.get("arith", [])
    sft, groups = of(a, "sft"), {m: g for m, g in by_method(a).items() if m.startswith(CHEAP)}
    if not sft or not groups:
        return []
    text = ("**(6) Full SFT vs cheap adaptation (LoRA, prompt tuning, retrieval).** Greedy accuracy test / ood: "
            f"full SFT {mean([r['test_reward'] for r in sft]):.3f} / {mean([r['ood_reward'] for r in sft]):.3f}; "
            + "; ".join(f"{m} {mean([r['test_reward'] for r in g]):.3f} / {mean([r['ood_reward'] for r in g]):.3f}"
                        for m, g in groups.items()) + f" ({seeds_note(sft)}).")
    # the alternatives to full SFT from the same warm-up: adapters (same steps and data) and retrieval into the
    # frozen warm-up; retrieval into the SFT policy is an addition to SFT, judged on its own below. A row is
    # compared with full SFT only where their formats (on that split) are within FORMAT_GAP: a row that answers
    # in another shape, or runs on past its answer, is scored on different behaviour, not on the same skill.
    form = lambda rows, split: mean([r[f"{split}_format"] for r in rows])  # noqa: E731
    text += (" Format test / ood: " + "; ".join(f"{m} {form(g, 'test'):.3f} / {form(g, 'ood'):.3f}"
                                                for m, g in {"full SFT": sft, **groups}.items()) + ".")
    instead = {m: g for m, g in groups.items() if not m.startswith(RETRIEVAL + "sft")}
    for split, what in (("test", "in domain"), ("ood", "out of distribution")):
        if not instead:
            continue
        near = {m: g for m, g in instead.items() if abs(form(g, split) - form(sft, split)) <= FORMAT_GAP}
        far = [f"{m} {form(g, split):.3f}" for m, g in instead.items() if m not in near]
        said, blocked = preconditions([(bool(near), f"a cheap alternative whose {split} format lies within "
                                        f"{FORMAT_GAP} of full SFT's {form(sft, split):.3f}"
                                        + (f" (not {', '.join(far)})" if far else ""))])
        if not near:
            text += said + f" The claim that full SFT holds the edge {what} over the cheap alternatives " + \
                not_testable(blocked) + "."
            continue
        best = max(near, key=lambda m: mean([r[f"{split}_reward"] for r in near[m]]))
        text += (said + f" The claim that full SFT holds the edge {what} over the best cheap alternative there "
                 f"({best}) " + compare(sft, near[best], f"{split}_rewards") + ".")
    for m, g in groups.items():
        if m.startswith(RETRIEVAL + "sft"):
            gap = abs(form(g, "ood") - form(sft, "ood"))
            said, blocked = preconditions([(gap <= FORMAT_GAP, f"{m}'s ood format {form(g, 'ood'):.3f} within "
                                            f"{FORMAT_GAP} of the SFT policy's {form(sft, 'ood'):.3f}")])
            text += (said + f" The claim that retrieval added to the SFT policy ({m}) raises its ood accuracy "
                     + claim(g, sft, "ood_rewards", blocked) + ".")
    trained = {m: g for m, g in groups.items() if not m.startswith(RETRIEVAL)}
    short = {r["method"]: f"{r['method']} {r['retrieve_short']} of {2 * r['n_eval']}" for g in groups.values()
             for r in g if r.get("retrieve_short")}  # the same prompts for every seed
    short = list(short.values())
    if short:
        text += (" Retrieval keeps only the examples that fit the context beside the response budget: prompts "
                 "holding fewer than k: " + ", ".join(short) + ".")
    full = mean([r.get("trainable_params") for r in sft])
    counts = {m: mean([r.get("trainable_params") for r in g]) for m, g in trained.items()}
    if full:
        text += (f" Trainable parameters: full {full:,.0f}; " + "; ".join(
            f"{m} {v:,.0f} ({100 * v / full:.1f}%)" for m, v in counts.items() if v) + " (retrieval trains none).")
    return [text]


def questions(evals, sweeps, rm_from_demos=False):
    """One paragraph per question of the study (README, "The study"): the measured answer and its verdict."""
    return (sft_vs_bon(evals, sweeps, rm_from_demos) + dft_vs_sft(evals) + rl_methods(evals) + ppo_vs_dpo(evals, sweeps)
            + imitation(evals) + adaptation(evals))


# ------------------------------------------------------------------------------------------------ report

def read_sweeps(out: Path, stages) -> dict:
    """stage name -> the rows of its sweep.jsonl (best-of-N stages)."""
    return {st.name: read_jsonl(Path(out) / st.name / "sweep.jsonl") for st in stages if st.script == "bon"}


def eval_k(evals) -> str:
    """"k = 4": the --k of the evaluations, as each eval.json recorded it (several values: all of them)."""
    ks = sorted({r["k"] for rows in evals.values() for r in rows if r.get("k") is not None})
    return "k = " + (", ".join(map(str, ks)) if ks else "?")


def stage_devices(stages) -> str:
    """The device the stages ran on, from their --device flags: "CPU", "GPU" (cuda) or both."""
    names = {"cpu": "CPU", "cuda": "GPU"}
    used = sorted({names.get(st.argv[st.argv.index("--device") + 1], st.argv[st.argv.index("--device") + 1])
                   for st in stages if "--device" in st.argv})
    return " and ".join(used) or "CPU"


def retrieval_examples(rows):
    """What a retrieval row's model was shown and answered (its first test prompt, greedy), for the largest k
    into each frozen model (seed 0): markdown lines."""
    rag = {r["method"]: r for r in sorted(rows, key=lambda r: r["seed"], reverse=True)
           if r["method"].startswith(RETRIEVAL) and r.get("test_example")}  # seed 0's row wins
    largest = {}
    for m in sorted(rag, key=lambda m: int(m.rpartition("-k")[2])):
        largest[m.rpartition("-k")[0]] = m
    md = []
    for m in largest.values():
        ex = rag[m]["test_example"]
        md += [f"Example ({m}, seed {rag[m]['seed']}, the first test prompt): the prompt as the model reads it, then "
               "its greedy answer.", "", "```", ex["prompt"], "```", "", "```", ex["completion"], "```", ""]
    return md


def write_report(out: Path, stages, scale, evals: dict, made=()) -> Path:
    """evals: task -> rows of the policies' eval.json (plus name, method, seed), as pipeline.collect_evals;
    made: the PNG files plots.plots drew beside it."""
    out = Path(out)
    evals = {t: evals.get(t, []) for t in ("arith", "sentiment")}
    sweeps = read_sweeps(out, stages)
    a = evals["arith"]
    md = ["# minipost study report", "",
          "Every number below is read from the files the stages wrote (eval.json, sweep.jsonl, metrics.jsonl) "
          f"under `{out}`. Scale: {scale.base_steps} base steps, {scale.sft_steps} SFT steps, {scale.rl_steps} "
          f"RL rollout steps, {scale.n_eval} evaluation prompts per split, {scale.seeds} seed(s) of every chain. "
          "Each verdict states its effect, the two-standard-error interval and, when inconclusive, the smallest "
          "effect this many prompts and seeds could detect."
          + ("" if scale.seeds >= 3 else " With one seed a verdict reflects prompt noise only, not seed noise: "
             "this run is a demonstration; `python pipeline.py --scale full` is the study that answers."), "",
          "## Questions", ""]
    rm = next((st for st in stages if st.name == "arith/rm-seed0"), None)  # what best-of-N's selector learnt from
    md += [q + "\n" for q in questions(evals, sweeps, rm is not None and "--pairs-from-demos" in rm.argv)]
    main = [r for r in a if not r["method"].startswith(IMITATION + CHEAP) and "-lr" not in r["method"]]
    md += ["## arith (accuracy by the verifier)", "", method_table(main, ARITH_COLUMNS), ""]
    lr_rows = [r for r in a if r["method"] in SFT_LIKE or r["method"].startswith(tuple(f"{m}-lr" for m in SFT_LIKE))]
    md += ["Learning rates of SFT and DFT (question 2; each picked on validation accuracy):", "",
           method_table(lr_rows, LR_COLUMNS), ""]
    for tag, split, selector in (("", "test", "the reward model learnt from its own samples"),
                                 ("", "ood", "the reward model learnt from its own samples"),
                                 (DEMOS, "test", "the reward model learnt from the demonstrations")):
        by_seed = sweep_rows(sweeps, f"arith/bon-{tag}{split}")
        if by_seed:
            md += [f"Best-of-N from the warm-up policy on {split}, {selector} selecting (mean over {len(by_seed)} "
                   "seed(s); ± the standard error over seeds, or over prompts with one seed). "
                   + ranks(selector_auc(by_seed), "The selector")[1] + ":", "", sweep_table(mean_sweep(by_seed)), ""]
    adapt = [r for r in a if r["method"] == "sft" or r["method"].startswith(CHEAP)]
    if any(r["method"] != "sft" for r in adapt):
        md += ["Full SFT vs cheap adaptation (question 6). SFT, LoRA and prompt tuning all continue from the "
               "same full-SFT warm-up for the same steps; retrieval rows are frozen models (the warm-up, or each "
               "seed's SFT policy) prompted with k solved train examples (BM25) as earlier chat turns; the warm-up "
               "was tuned on chats of 1-3 problems, the SFT policies after it on one-problem chats. Tensor memory: the distinct "
               "parameter, gradient and optimizer-state tensors a run holds; peak RSS: the whole process.", "",
               method_table(adapt, ADAPT_COLUMNS), ""]
        md += retrieval_examples(adapt)
    imit = [r for r in a if r["method"].startswith(IMITATION) or (r["method"] == TEACHER and r["seed"] == 0)]
    if imit:
        md += [f"Imitation (question 5): the teacher ({TEACHER}, seed 0), and each student size x data amount on the "
               "teacher's answers (imitation-) or on true demonstrations (student-):", "",
               method_table(imit, IMITATION_COLUMNS), ""]
    md += ["## sentiment (hidden ground-truth reward of sampled continuations, T = 1)", "",
           method_table(evals["sentiment"], SENTIMENT_COLUMNS), ""]
    by_seed = sweep_rows(sweeps, "sentiment/bon-test")
    if by_seed:
        md += ["Best-of-N from each seed's SFT policy, its reward model selects, the ground truth scores. "
               + ranks(selector_auc(by_seed), "The selector")[1] + ":", "", sweep_table(mean_sweep(by_seed)), ""]
    md += ["## Plots", ""] + [f"![{m}]({m})" for m in made] + [""]
    md += ["## How each number was made", "", "Stages (each a script call; rerun one to reproduce it):", ""]
    md += [f"- `{st.name}`: `{st.command}`" for st in stages]
    md += ["", "KL to SFT: mean over test prompts of the summed per-token log-ratio log pi(y_t) - log pi_SFT(y_t) "
           f"on k T = 1 samples of the policy per prompt ({eval_k(evals)}), against the SFT policy of the same seed. Reward: "
           "the task's verifier (arith, greedy answer unless marked T = 1) or hidden lexicon score (sentiment, "
           "T = 1 samples). Best-of-N: expected over N-subsets of a pool of samples per prompt; the KL estimate is "
           "a plug-in from the pool; log N - (N-1)/N is only an upper bound (Beirami et al. 2024). Every number "
           f"here comes from one thread per stage on this machine's {stage_devices(stages)}: another thread count "
           "or device changes the training bits (~1e-7 from the first steps) and so the exact numbers, not the "
           "verdicts' intervals."]
    path = out / "report.md"
    path.write_text("\n".join(md) + "\n")
    return path
