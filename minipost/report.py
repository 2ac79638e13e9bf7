"""The study's report: markdown tables and PNG plots, built only from the files the stages wrote.

Inputs (under the pipeline's OUT): <task>/eval/<policy>/eval.json (one uniform evaluation per final policy),
<task>/bon-*/sweep.jsonl (best-of-N sweeps), <stage>/metrics.jsonl (training curves). Every number in
report.md is read from those files; tests/test_pipeline.py checks that they match.
"""
import json
import math
from pathlib import Path

from .cli import read_metrics

METHOD_ORDER = ("sft", "dft", "grpo", "nft", "rft", "ppo", "student-sft", "imitation", "lora-r4", "lora-r16",
                "prompt-tuning", "rag-base-k0", "rag-base-k2", "rag-base-k4", "rag-sft-k2", "rag-sft-k4")
CHEAP = ("lora-", "prompt-tuning", "rag-")  # the cheap adaptations (question 6), by method-name prefix


def read_jsonl(path):
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def mean_sd(values):
    """(mean, sample sd or None with one value, n)."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None, 0
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
    return m, sd, len(values)


def fmt(values, digits=3):
    m, sd, n = mean_sd(values)
    if m is None:
        return "–"
    return f"{m:.{digits}f}" if sd is None else f"{m:.{digits}f} ± {sd:.{digits}f} (n={n})"


def by_method(rows):
    groups = {}
    for r in rows:
        groups.setdefault(r["method"], []).append(r)
    key = lambda m: (METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER), m)  # noqa: E731
    return dict(sorted(groups.items(), key=lambda kv: key(kv[0])))


def method_table(rows, columns):
    """columns: (header, eval key, digits). One row per method: mean ± sd over its seeds."""
    lines = ["| method | " + " | ".join(c[0] for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for method, group in by_method(rows).items():
        cells = [fmt([r.get(key) for r in group], digits) for _, key, digits in columns]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


COMMON_COLUMNS = [("format (test)", "test_format", 3), ("KL to SFT (nats/seq)", "kl_to_sft", 2),
                  ("train time (s)", "train_time_s", 0), ("samples used", "samples", 0)]
ARITH_COLUMNS = [("test accuracy (greedy)", "test_reward", 3), ("test accuracy (T = 1 samples)", "test_sample_reward", 3),
                 ("ood accuracy (greedy)", "ood_reward", 3)] + COMMON_COLUMNS
SENTIMENT_COLUMNS = [("test reward (T = 1 samples)", "test_sample_reward", 3)] + COMMON_COLUMNS
ADAPT_COLUMNS = [("test accuracy (greedy)", "test_reward", 3), ("ood accuracy (greedy)", "ood_reward", 3),
                 ("format (test)", "test_format", 3), ("trainable params", "trainable_params", 0),
                 ("train time (s)", "train_time_s", 0), ("tensor memory (MB)", "tensor_memory_mb", 1),
                 ("peak RSS (MB)", "peak_memory_mb", 0)]


def sweep_table(sweep):
    lines = ["| N | reward | format | KL estimate | KL bound log N - (N-1)/N | gen s/prompt |", "|---" * 6 + "|"]
    for r in sweep:
        lines.append(f"| {r['n']} | {r['reward']:.3f} ± {r['reward_se']:.3f} | {r['format']:.3f} | "
                     f"{r['kl_est']:.3f} | {r['kl_bound']:.3f} | {r['gen_s_per_prompt']:.3f} |")
    return "\n".join(lines)


def per_prompt(rows, key):
    """Per-prompt values averaged over the rows (seeds) of a method: rows[*][key] are equal-length lists."""
    lists = [r[key] for r in rows]
    return [sum(vals) / len(vals) for vals in zip(*lists)]


def noise(rows_a, rows_b, key):
    """Two standard errors of mean(a) - mean(b), both scored on the same prompts (key: per-prompt lists):
    paired over prompts, or from the seeds' spread when both sides have several seeds and that is larger."""
    d = [x - y for x, y in zip(per_prompt(rows_a, key), per_prompt(rows_b, key))]
    n = len(d)
    sd = math.sqrt(sum((v - sum(d) / n) ** 2 for v in d) / (n - 1)) if n > 1 else 0.0
    two_se = 2 * sd / math.sqrt(max(n, 1))
    if len(rows_a) > 1 and len(rows_b) > 1:
        scalar = key[:-1]  # "test_rewards" -> "test_reward"
        va, vb = (mean_sd([r[scalar] for r in rows])[1] ** 2 / len(rows) for rows in (rows_a, rows_b))
        two_se = max(two_se, 2 * math.sqrt(va + vb))
    return two_se


def verdict(diff, two_se):
    """A claim "diff > 0" -> held (the two-standard-error interval lies above 0), refuted (below 0) or
    inconclusive (it holds 0), with the effect, its interval and, when inconclusive, the smallest effect this
    many prompts and seeds could detect: 2.8 standard errors (80% power at the 5% level, two-sided)."""
    where = f"difference {diff:+.3f}, interval [{diff - two_se:+.3f}, {diff + two_se:+.3f}]"
    if diff > two_se:
        return f"held ({where})"
    if diff < -two_se:
        return f"was refuted ({where})"
    return f"is inconclusive ({where}; the smallest effect this n could detect is {1.4 * two_se:.3f})"


def mean_of(rows, method, key):
    return mean_sd([r[key] for r in rows if r["method"] == method])[0]


# ------------------------------------------------------------------------------------------------- plots

def plots(out: Path, stages, evals, sweeps):
    """PNG plots beside report.md; returns their file names (empty if matplotlib is missing)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made = []
    # 1. sentiment: ground-truth reward versus KL to the SFT policy (the DPO paper's frontier)
    rows = evals.get("sentiment", [])
    if rows:
        fig, ax = plt.subplots(figsize=(5, 4))
        for method, marker in (("ppo", "o"), ("dpo", "s"), ("sft", "*")):
            pts = [(r["kl_to_sft"], r["test_sample_reward"], r["name"]) for r in rows if r["method"].startswith(method)]
            if pts:
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=method)
        bon = sweeps.get("sentiment/bon-test", [])
        if bon:
            ax.plot([r["kl_est"] for r in bon], [r["reward"] for r in bon], "^-", label="best-of-N (RM)")
        ax.set(xlabel="KL to SFT policy (nats per sequence)", ylabel="ground-truth reward (test)",
               title="sentiment: reward vs KL")
        ax.legend()
        fig.tight_layout(), fig.savefig(out / "frontier.png", dpi=120), plt.close(fig)
        made.append("frontier.png")
    # 2. arith: best-of-N accuracy versus N, with the trained policies as horizontal lines
    rows = evals.get("arith", [])
    if sweeps.get("arith/bon-test"):
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), sharey=True)
        for ax, split in zip(axes, ("test", "ood")):
            sw = sweeps.get(f"arith/bon-{split}", [])
            ax.plot([r["n"] for r in sw], [r["reward"] for r in sw], "o-", color="k", label="best-of-N (verifier)")
            for i, (method, group) in enumerate(by_method(rows).items()):
                ax.axhline(mean_sd([r[f"{split}_reward"] for r in group])[0], ls="--", color=f"C{i}", label=method)
            ax.set_xscale("log", base=2)
            ax.set_xticks([r["n"] for r in sw], [str(r["n"]) for r in sw])
            ax.set(xlabel="N", title=f"arith {split}")
        axes[0].set_ylabel("accuracy")
        axes[1].legend(fontsize=7)
        fig.tight_layout(), fig.savefig(out / "bon_arith.png", dpi=120), plt.close(fig)
        made.append("bon_arith.png")
    # 3. training curves of every stage that logged a loss
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    for st in stages:
        recs = [r for r in read_metrics_safe(out / st.name / "metrics.jsonl") if "loss" in r]
        if recs and st.script in ("sft", "rlhf"):
            ax = axes[0] if st.name.startswith("arith") else axes[1]
            ax.plot([r["step"] for r in recs], [r["loss"] for r in recs], label=st.name.split("/")[1], lw=1)
    for ax, title in zip(axes, ("arith", "sentiment")):
        ax.set(xlabel="step", ylabel="training loss", title=title)
        ax.legend(fontsize=6)
    fig.tight_layout(), fig.savefig(out / "curves.png", dpi=120), plt.close(fig)
    made.append("curves.png")
    return made


def read_metrics_safe(path):
    return read_metrics(path) if Path(path).is_file() else []


# ------------------------------------------------------------------------------------------------ report

def questions(evals, sweeps):
    """One short paragraph per question of the study (README, "The study"): the measured answer and whether
    the claim held, was refuted or is inconclusive here (report.verdict: two standard errors, paired over the
    shared prompts, or from the seeds' spread when that is larger)."""
    a, s = evals.get("arith", []), evals.get("sentiment", [])
    of = lambda rows, m: [r for r in rows if r["method"] == m]  # noqa: E731
    sft_rows, dft_rows = of(a, "sft"), of(a, "dft")
    start = [r for r in sft_rows if r["seed"] == 0]  # the policy RL and best-of-N start from
    out = []

    sweep = sweeps.get("arith/bon-test", [])
    bon = {r["n"]: r["reward"] for r in sweep}
    if start and bon:
        sft0 = start[0]["test_reward"]
        # overtakes: ahead by more than two standard errors (the sweep's own, and the greedy answer's binomial one)
        sft_var = sft0 * (1 - sft0) / start[0]["n_eval"]
        beats = [r["n"] for r in sweep if r["reward"] - sft0 > 2 * (r.get("reward_se", 0) ** 2 + sft_var) ** 0.5]
        out.append("**(1) SFT vs best-of-N (Somerstep et al. 2025).** The SFT policy (seed 0), one greedy answer: "
                   f"{sft0:.3f} test accuracy. Best-of-N from it with the verifier as selector: "
                   + ", ".join(f"N={n}: {v:.3f}" for n, v in sorted(bon.items())) + ". "
                   + ("Best-of-N is ahead of the SFT policy's greedy answer by more than two standard errors at "
                      + ", ".join(f"N={n}" for n in beats) if beats else
                      "Best-of-N never clearly overtakes the SFT policy at these N")
                   + ". Caveat: the verifier is an oracle selector; the claim's setting (a learned reward) is "
                   "the sentiment sweep below.")
    if sft_rows and dft_rows:
        sft_ood, dft_ood = mean_of(a, "sft", "ood_reward"), mean_of(a, "dft", "ood_reward")
        out.append(f"**(2) DFT vs SFT out of distribution (Wu et al. 2025).** OOD accuracy (greedy) SFT "
                   f"{fmt([r['ood_reward'] for r in sft_rows])}, DFT {fmt([r['ood_reward'] for r in dft_rows])}; in "
                   f"distribution SFT {mean_of(a, 'sft', 'test_reward'):.3f}, DFT {mean_of(a, 'dft', 'test_reward'):.3f}. "
                   "Both continue from the same short SFT warm-up (from the raw base, DFT cannot learn the chat "
                   "format: its weight p is ~0 on the format's tokens). The claim (DFT generalises better) "
                   + verdict(dft_ood - sft_ood, noise(dft_rows, sft_rows, "ood_rewards")) + ".")
    rl = {m: of(a, m) for m in ("nft", "rft", "grpo", "ppo")}
    if start and all(rl.values()):
        s0 = start[0]
        gains = {m: (rows[0]["test_sample_reward"] - s0["test_sample_reward"], noise(rows, start, "test_sample_rewards"))
                 for m, rows in rl.items()}
        best = max(gains, key=lambda m: gains[m][0])
        out.append("**(3) NFT vs RFT vs GRPO (Chen et al. 2025).** From the same SFT policy (seed 0: test accuracy "
                   f"{s0['test_reward']:.3f} greedy, {s0['test_sample_reward']:.3f} with T = 1 samples), greedy / T = 1: "
                   + ", ".join(f"{m.upper()} {rows[0]['test_reward']:.3f} / {rows[0]['test_sample_reward']:.3f}"
                               for m, rows in rl.items())
                   + ". Gain in T = 1 accuracy over SFT (± two paired standard errors): "
                   + ", ".join(f"{m.upper()} {g:+.3f} ± {n:.3f}" for m, (g, n) in gains.items())
                   + f". Most: {best.upper()}. The claim NFT >= RFT "
                   + verdict(rl["nft"][0]["test_sample_reward"] - rl["rft"][0]["test_sample_reward"],
                             noise(rl["nft"], rl["rft"], "test_sample_rewards")) + " (T = 1 accuracy).")
    ppo = [r for r in s if r["method"].startswith("ppo")]
    dpo = [r for r in s if r["method"].startswith("dpo")]
    sft_s = mean_of(s, "sft", "test_sample_reward")
    if ppo and dpo and sft_s is not None:
        # gain per nat only where the KL estimate is clearly above zero (a ratio over ~0 nats means nothing)
        eff = lambda rs: max([(r["test_sample_reward"] - sft_s) / r["kl_to_sft"] for r in rs if r["kl_to_sft"] > 0.1],  # noqa: E731
                             default=None)
        e_ppo, e_dpo = eff(ppo), eff(dpo)
        text = ("**(4) PPO vs DPO reward per KL (Rafailov et al. 2023).** Ground-truth reward (T = 1 samples) and KL "
                f"to SFT (SFT itself: {sft_s:.3f}): "
                + "; ".join(f"{r['method']} {r['test_sample_reward']:.3f} at {r['kl_to_sft']:.2f} nats" for r in ppo + dpo))
        if e_ppo is not None and e_dpo is not None:
            text += (f". Best reward gain per nat: PPO {e_ppo:.3f}, DPO {e_dpo:.3f} (DPO "
                     + ("ahead" if e_dpo > e_ppo else "behind") + "). The paper's claim (DPO reaches a better "
                     "frontier) is inconclusive here: one seed per strength, so no interval (a reward model "
                     "trained with another seed can move PPO's reward by half its range; see the frontier plot)")
        out.append(text + ".")
    imit, student = of(a, "imitation"), of(a, "student-sft")
    if imit and student and start:
        t, i, st = start[0], imit[0], student[0]
        gap, format_gap = t["test_reward"] - i["test_reward"], t["test_format"] - i["test_format"]
        copied = abs(format_gap) <= 0.05
        out.append("**(5) Imitation (Gudibande et al. 2023).** Teacher: the SFT policy (seed 0): format "
                   f"{t['test_format']:.3f}, accuracy {t['test_reward']:.3f}. A smaller model fine-tuned on the "
                   f"teacher's greedy answers: format {i['test_format']:.3f}, accuracy {i['test_reward']:.3f}; the "
                   f"same smaller model on the true demonstrations: format {st['test_format']:.3f}, accuracy "
                   f"{st['test_reward']:.3f} (imitation minus true data: {i['test_reward'] - st['test_reward']:+.3f} "
                   f"± {noise(imit, student, 'test_rewards'):.3f}). The claim (the imitator copies the style, "
                   "|format gap| <= 0.05, but not the capability) "
                   + (verdict(gap, noise(start, imit, "test_rewards")) if copied else
                      f"was refuted here: the style was not copied either (format gap {format_gap:+.3f})") + ".")
    out += adaptation_question(sft_rows, [r for r in a if r["method"].startswith(CHEAP)])
    return out


def adaptation_question(sft_rows, cheap_rows):
    """(6): full SFT against the best cheap adaptation, in and out of distribution, and what each cost."""
    if not sft_rows or not cheap_rows:
        return []
    groups = by_method(cheap_rows)
    text = ("**(6) Full SFT vs cheap adaptation (LoRA, prompt tuning, retrieval).** Greedy accuracy test / ood: "
            f"full SFT {mean_of(sft_rows, 'sft', 'test_reward'):.3f} / {mean_of(sft_rows, 'sft', 'ood_reward'):.3f}; "
            + "; ".join(f"{m} {mean_of(g, m, 'test_reward'):.3f} / {mean_of(g, m, 'ood_reward'):.3f}"
                        for m, g in groups.items()) + ".")
    for split, what in (("test", "in domain"), ("ood", "out of distribution")):
        best = max(groups, key=lambda m: mean_of(groups[m], m, f"{split}_reward"))
        diff = mean_of(sft_rows, "sft", f"{split}_reward") - mean_of(groups[best], best, f"{split}_reward")
        text += (f" The claim that full SFT holds the edge {what} (against the best cheap method there, {best}) "
                 + verdict(diff, noise(sft_rows, groups[best], f"{split}_rewards")) + ".")
    short = [f"{r['method']} {r['retrieve_short']} of {2 * r['n_eval']}" for r in cheap_rows if r.get("retrieve_short")]
    if short:
        text += (" Retrieval keeps only the examples that fit the context beside the response budget: prompts "
                 "holding fewer than k: " + ", ".join(short) + ".")
    full = mean_sd([r.get("trainable_params") for r in sft_rows])[0]
    trained = {m: mean_sd([r.get("trainable_params") for r in g])[0] for m, g in groups.items()}
    if full:
        text += (" Trainable parameters: full " + f"{full:,.0f}; " + "; ".join(
            f"{m} {v:,.0f} ({100 * v / full:.1f}%)" for m, v in trained.items() if v) + " (retrieval trains none).")
    return [text]


def write_report(out: Path, stages, scale, evals: dict) -> Path:
    """evals: task -> rows of the policies' eval.json (plus name, method, seed), as pipeline.collect_evals."""
    out = Path(out)
    evals = {t: evals.get(t, []) for t in ("arith", "sentiment")}
    sweeps = {st.name: read_jsonl(out / st.name / "sweep.jsonl") for st in stages if st.script == "bon"}
    made = plots(out, stages, evals, sweeps)
    md = ["# minipost study report", "",
          "Every number below is read from the files the stages wrote (eval.json, sweep.jsonl, metrics.jsonl) "
          f"under `{out}`. Scale: {scale.base_steps} base steps, {scale.sft_steps} SFT steps, {scale.rl_steps} "
          f"RL rollout steps, {scale.n_eval} evaluation prompts per split, {scale.seeds} SFT/DFT seed(s).", "",
          "## Questions", ""]
    md += [q + "\n" for q in questions(evals, sweeps)]
    md += ["## arith (accuracy by the verifier; greedy answers)", "",
           method_table(evals["arith"], ARITH_COLUMNS), ""]
    for split in ("test", "ood"):
        if sweeps.get(f"arith/bon-{split}"):
            md += [f"Best-of-N from the SFT policy on {split}, verifier selects:", "",
                   sweep_table(sweeps[f"arith/bon-{split}"]), ""]
    adapt = [r for r in evals["arith"] if r["method"] == "sft" or r["method"].startswith(CHEAP)]
    if any(r["method"] != "sft" for r in adapt):
        md += ["Full SFT vs cheap adaptation (question 6). SFT, LoRA and prompt tuning all continue from the "
               "same full-SFT warm-up for the same steps; retrieval rows are frozen models (the base, or the SFT "
               "policy) prompted with k solved train examples (BM25), so they train nothing of their own. Tensor "
               "memory: the distinct parameter, gradient and optimizer-state tensors a run holds; peak RSS: the "
               "whole process (mostly the runtime on a CPU).", "",
               method_table(adapt, ADAPT_COLUMNS), ""]
    md += ["## sentiment (hidden ground-truth reward of sampled continuations, T = 1)", "",
           method_table(evals["sentiment"], SENTIMENT_COLUMNS), ""]
    if sweeps.get("sentiment/bon-test"):
        md += ["Best-of-N from the SFT policy, the learned reward model selects, the ground truth scores:", "",
               sweep_table(sweeps["sentiment/bon-test"]), ""]
    md += ["## Plots", ""] + [f"![{m}]({m})" for m in made] + [""]
    md += ["## How each number was made", "", "Stages (each a script call; rerun one to reproduce it):", ""]
    md += [f"- `{st.name}`: `{st.command}`" for st in stages]
    md += ["", "KL to SFT: mean over test prompts of the summed per-token log-ratio log pi(y_t) - log pi_SFT(y_t) "
           "on k T = 1 samples of the policy per prompt (k = 4 by default). Reward: the task's verifier (arith, greedy answer) or "
           "hidden lexicon score (sentiment, T = 1 samples). Best-of-N: the KL estimate is a plug-in from the "
           "sampled pool; log N - (N-1)/N is only an upper bound (Beirami et al. 2024)."]
    path = out / "report.md"
    path.write_text("\n".join(md) + "\n")
    return path
