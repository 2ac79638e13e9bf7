"""The study's PNG plots, drawn from the same files as report.md (eval.json rows, sweeps, metrics.jsonl).

Bands and error bars: mean over seeds ± one standard deviation of the seeds (a single seed draws no band).
"""
import json
from pathlib import Path

from .report import by_method, length_gaps, mean_sweep, read_jsonl, sweep_rows
from .verdicts import mean, mean_sd
from .stages import DEMOS, IMITATION, IMITATOR, TEACHER


def spread(values):
    m, sd, _ = mean_sd(values)
    return m, sd or 0.0


def rl_curves(ax, out: Path, stages, algo_names=("grpo", "nft", "rft")):
    """Greedy test accuracy (the scripts' own evaluations) against samples generated, mean ± sd over seeds;
    the start is each seed's SFT policy evaluated on the same prompts."""
    for i, algo in enumerate(algo_names):
        runs = [st for st in stages if st.script == "rlhf" and st.name.startswith(f"arith/{algo}-seed")]
        curves = []
        for st in runs:
            run = out / st.name
            meta = json.loads((run / "ckpt" / "meta.json").read_text()) if (run / "ckpt" / "meta.json").is_file() else None
            sft = [r for r in read_jsonl(Path(st.init) / "metrics.jsonl") if "test_reward" in r]
            points = [(r["step"], r["test_reward"]) for r in read_jsonl(run / "metrics.jsonl") if "test_reward" in r]
            if meta and sft and points:
                per_step = int(meta["args"]["batch_size"]) * int(meta["args"]["k"])  # samples generated a step
                curves.append([(0, sft[-1]["test_reward"])] + [(s * per_step, v) for s, v in points])
        if not curves or len({len(c) for c in curves}) != 1:
            continue
        xs = [x for x, _ in curves[0]]
        stats = [spread([c[j][1] for c in curves]) for j in range(len(xs))]
        ys, sds = [m for m, _ in stats], [sd for _, sd in stats]
        ax.plot(xs, ys, "o-", color=f"C{i}", label=f"{algo.upper()} (n={len(curves)})")
        ax.fill_between(xs, [y - e for y, e in zip(ys, sds)], [y + e for y, e in zip(ys, sds)], color=f"C{i}",
                        alpha=0.2)
    ax.set(xlabel="samples generated", ylabel="test accuracy (greedy)", title="arith: RL from the SFT policy")
    ax.legend(fontsize=7)


def frontier(ax, evals, sweeps, key="test_sample_reward", ylabel="ground-truth reward (test, T = 1)"):
    """Reward (or the reward model's score) against KL to SFT: one point per method and strength, error bars
    over seeds; best-of-N as a line."""
    rows = evals.get("sentiment", [])
    for i, (prefix, marker) in enumerate((("ppo-", "o"), ("dpo-", "s"), ("sft", "*"))):
        groups = {m: g for m, g in by_method(rows).items() if m.startswith(prefix)}
        pts = [(spread([r["kl_to_sft"] for r in g]), spread([r.get(key) for r in g]), m) for m, g in groups.items()
               if mean([r.get(key) for r in g]) is not None]
        if pts:
            ax.errorbar([p[0][0] for p in pts], [p[1][0] for p in pts], xerr=[p[0][1] for p in pts],
                        yerr=[p[1][1] for p in pts], fmt=marker, color=f"C{i}", label=prefix.strip("-").upper())
            for (x, _), (y, _), m in pts:
                ax.annotate(m.partition("-beta")[2] and "β=" + m.partition("-beta")[2], (x, y), fontsize=6)
    by_seed = sweep_rows(sweeps, "sentiment/bon-test")
    bon_key = {"test_sample_reward": "reward", "test_proxy_reward": "proxy"}[key]
    if by_seed:
        curves = list(by_seed.values())
        xs = [mean([c[j]["kl_est"] for c in curves]) for j in range(len(curves[0]))]
        stats = [spread([c[j][bon_key] for c in curves]) for j in range(len(curves[0]))]
        ax.errorbar(xs, [m for m, _ in stats], yerr=[sd for _, sd in stats], fmt="^-", color="k",
                    label="best-of-N (reward model)")
    ax.set(xlabel="KL to SFT policy (nats per sequence)", ylabel=ylabel)
    ax.legend(fontsize=7)


def bon_arith(axes, evals, sweeps):
    """Accuracy against N (reward model and oracle selecting), with SFT's greedy accuracy on the same prompts."""
    sft = [r for r in evals.get("arith", []) if r["method"] == "sft"]
    for ax, split in zip(axes, ("test", "ood")):
        by_seed = sweep_rows(sweeps, f"arith/bon-{split}")
        if not by_seed:
            continue
        curves = list(by_seed.values())
        demos = list(sweep_rows(sweeps, f"arith/bon-{DEMOS}{split}").values())  # the second selector, if run
        ns = [r["n"] for r in curves[0]]
        for key, style, label, runs in (
                ("reward", "o-", "best-of-N, reward model", curves),
                ("reward", "^:", "best-of-N, reward model learnt from demonstrations", demos),
                ("oracle_reward", "s--", "best-of-N, verifier (oracle)", curves)):
            if runs and key in runs[0][0]:
                stats = [spread([c[j][key] for c in runs]) for j in range(len(ns))]
                ys, sds = [m for m, _ in stats], [sd for _, sd in stats]
                ax.plot(ns, ys, style, label=label)
                ax.fill_between(ns, [y - e for y, e in zip(ys, sds)], [y + e for y, e in zip(ys, sds)], alpha=0.2)
        if sft:
            P = curves[0][0]["n_prompts"]
            m, sd = spread([mean(r[f"{split}_rewards"][:P]) for r in sft])
            ax.axhline(m, color="C3", label="SFT (greedy)")
            ax.axhspan(m - sd, m + sd, color="C3", alpha=0.15)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set(xlabel="N", title=f"arith {split}: best-of-N from the warm-up")
    axes[0].set_ylabel("accuracy")
    axes[0].legend(fontsize=7)


def bon_length(ax, evals, sweeps):
    """SFT minus best-of-N (reward model) against the problem's arithmetic steps, ± two standard errors."""
    by_seed = sweep_rows(sweeps, "arith/bon-test")
    if not by_seed:
        return False
    ns = [int(r["n"]) for r in mean_sweep(by_seed)]
    for i, n in enumerate(ns):
        gaps = length_gaps(evals, sweeps, n)
        if len(gaps) < 2:
            return False
        steps = sorted(gaps)
        ax.errorbar([L + 0.04 * (i - len(ns) / 2) for L in steps], [gaps[L][0] for L in steps],
                    yerr=[gaps[L][1] for L in steps], fmt="o-", capsize=2, label=f"N={n}")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xticks(steps)
    ax.set(xlabel="arithmetic steps in the problem (answer length)", ylabel="SFT minus best-of-N accuracy",
           title="arith: SFT vs best-of-N by answer length")
    ax.legend(fontsize=7)
    return True


def imitation_plot(axes, evals):
    """Accuracy and format against imitation data, per student size: imitation vs true data, teacher line."""
    rows = evals.get("arith", [])
    teacher = [r for r in rows if r["method"] == TEACHER and r["seed"] == 0]
    groups = by_method([r for r in rows if r["method"].startswith(IMITATION)])
    series = {}
    for m, g in groups.items():
        kind, size, n = m.split("-")[0], m.split("-")[1], int(m.rpartition("-n")[2])
        series.setdefault((kind, size), []).append((n, g))
    for ax, key, label in zip(axes, ("test_reward", "test_format"), ("test accuracy (greedy)", "format (test)")):
        for i, ((kind, size), pts) in enumerate(sorted(series.items())):
            pts.sort(key=lambda p: p[0])
            stats = [spread([r[key] for r in g]) for _, g in pts]
            ax.errorbar([n for n, _ in pts], [m for m, _ in stats], yerr=[sd for _, sd in stats],
                        fmt="o-" if kind == "imitation" else "s--", color=f"C{sorted({s for _, s in series}).index(size)}",
                        label=f"{size}, {'imitation' if kind == 'imitation' else 'true data'}")
        if teacher:
            ax.axhline(teacher[0][key], color="k", ls=":", label="teacher")
        ax.set_xscale("log")
        ax.set(xlabel="demonstrations (log scale)", ylabel=label)
    axes[0].legend(fontsize=6)


def plots(out: Path, stages, evals, sweeps):
    """PNG plots beside report.md; returns their file names (empty if matplotlib is missing)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        made.append(name)

    if sweep_rows(sweeps, "arith/bon-test"):
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), sharey=True)
        bon_arith(axes, evals, sweeps)
        save(fig, "bon_arith.png")
        fig, ax = plt.subplots(figsize=(5, 3.8))
        if bon_length(ax, evals, sweeps):
            save(fig, "bon_length.png")
        else:
            plt.close(fig)
    if any(st.name.startswith("arith/grpo-seed") for st in stages):
        fig, ax = plt.subplots(figsize=(5, 3.8))
        rl_curves(ax, out, stages)
        save(fig, "rl_curves.png")
    if evals.get("sentiment"):
        fig, ax = plt.subplots(figsize=(5.5, 4.2))
        frontier(ax, evals, sweeps)
        ax.set_title("sentiment: reward vs KL")
        save(fig, "frontier.png")
        if any(r.get("test_proxy_reward") is not None for r in evals["sentiment"]):
            fig, axes = plt.subplots(1, 2, figsize=(10, 4))
            frontier(axes[0], evals, sweeps, "test_proxy_reward", "reward-model score (proxy)")
            frontier(axes[1], evals, sweeps)
            axes[0].set_title("what the policy optimised")
            axes[1].set_title("what it was meant to optimise")
            save(fig, "overoptimisation.png")
    if any(r["method"].startswith(IMITATOR) for r in evals.get("arith", [])):
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
        imitation_plot(axes, evals)
        save(fig, "imitation.png")
    return made
