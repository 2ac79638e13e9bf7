"""How the study's report compares two rows and when it may: paired intervals, verdicts, preconditions.

Statistics. Two methods are compared on the same prompts: the two-standard-error half width of their difference
is the larger of the paired-over-prompts one (per-prompt values averaged over seeds) and the seeds' one (per-seed
differences when both sides ran the same seeds, else each side's spread over its seeds). A claim "difference > 0"
then held, was refuted or is inconclusive (verdict()).

Preconditions. A comparison means something only where its parts work: each question measures its own (a
selector that ranks better than chance, a start off the floor and the ceiling, a teacher ahead of its students,
formats comparable between the rows compared), prints them, and where one fails its claims read "not testable
here" with the reason (claim()), never held or refuted.
"""
import math


def mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def mean_sd(values):
    """(mean, sample sd or None with one value, n)."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None, 0
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
    return m, sd, len(values)


def per_prompt(rows, key):
    """Per-prompt values averaged over the rows (seeds) of a method: rows[*][key] are equal-length lists."""
    return [sum(vals) / len(vals) for vals in zip(*[r[key] for r in rows])]


def noise(rows_a, rows_b, key):
    """Two standard errors of mean(a) - mean(b), both scored on the same prompts (key: per-prompt lists): the
    larger of the paired-over-prompts one and the seeds' one (see the module docstring)."""
    d = [x - y for x, y in zip(per_prompt(rows_a, key), per_prompt(rows_b, key))]
    n = len(d)
    sd = math.sqrt(sum((v - sum(d) / n) ** 2 for v in d) / (n - 1)) if n > 1 else 0.0
    two_se = 2 * sd / math.sqrt(max(n, 1))
    seeds_a, seeds_b = ({r.get("seed", 0): mean(r[key]) for r in rows} for rows in (rows_a, rows_b))
    if len(rows_a) > 1 and seeds_a.keys() == seeds_b.keys() and len(seeds_a) == len(rows_a) == len(rows_b):
        diffs = [seeds_a[s] - seeds_b[s] for s in seeds_a]  # one chain per seed on both sides: paired
        two_se = max(two_se, 2 * mean_sd(diffs)[1] / math.sqrt(len(diffs)))
    else:
        var = [mean_sd(list(s.values()))[1] ** 2 / len(s) if len(s) > 1 else 0.0 for s in (seeds_a, seeds_b)]
        two_se = max(two_se, 2 * math.sqrt(sum(var)))
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


def difference(rows_a, rows_b, key):
    """mean(a) - mean(b) on per-prompt values `key` (e.g. "test_rewards") and its two standard errors."""
    return mean(per_prompt(rows_a, key)) - mean(per_prompt(rows_b, key)), noise(rows_a, rows_b, key)


def compare(rows_a, rows_b, key):
    """verdict() of "mean(a) > mean(b)"."""
    return verdict(*difference(rows_a, rows_b, key))


# ----------------------------------------------------------------------------------------- preconditions

FLOOR, CEILING = 0.05, 0.95  # a start solving under 1 in 20 leaves little to reinforce; over 19 in 20, no room
FORMAT_GAP = 0.10  # two rows whose formats differ by more score different behaviour, not the same skill


def not_testable(reason):
    return f"is not testable here ({reason})"


def claim(rows_a, rows_b, key, blocked=None):
    """compare(), or not_testable(blocked) where a precondition failed (blocked: its reason)."""
    return not_testable(blocked) if blocked else compare(rows_a, rows_b, key)


def in_range(value, what):
    """-> (met, text): a starting policy's accuracy off the floor and the ceiling."""
    met = value is not None and FLOOR <= value <= CEILING
    shown = "not measured" if value is None else f"{value:.3f}"
    return met, f"{what} {shown} {'lies' if met else 'does not lie'} within [{FLOOR}, {CEILING}]"


def selector_auc(by_seed):
    """{seed: sweep rows} -> (mean AUC over seeds, two standard errors, [per-seed AUC]) of the selector on its own
    best-of-N pools (sample_bon's selector_auc), or None where the sweeps hold none. Two standard errors: the
    larger of the prompts' (every seed's per-prompt AUCs pooled) and the seeds'."""
    seeds = [rows[0].get("selector_auc") for rows in by_seed.values()]
    if not seeds or None in seeds:
        return None
    prompts = [a for rows in by_seed.values() for a in rows[0]["selector_aucs"] if a is not None]
    se = mean_sd(prompts)[1] / math.sqrt(len(prompts)) if len(prompts) > 1 else 0.0
    if len(seeds) > 1:
        se = max(se, mean_sd(seeds)[1] / math.sqrt(len(seeds)))
    return mean(seeds), 2 * se, seeds


def ranks(auc, who):
    """-> (met, text): the selector ranks its pool better than chance (the AUC's interval lies above 0.5)."""
    if auc is None:
        return False, f"{who}'s AUC was not measured (a sweep without an oracle)"
    m, two_se, seeds = auc
    met = m - two_se > 0.5
    per_seed = f" ({', '.join(f'{a:.3f}' for a in seeds)} by seed)" if len(seeds) > 1 else ""
    return met, (f"{who} ranks the candidates of the pool it selects from with AUC {m:.3f}{per_seed} against the "
                 f"ground truth, interval [{m - two_se:.3f}, {m + two_se:.3f}]: "
                 f"{'better than' if met else 'not distinguishable from'} chance (0.5)")


def preconditions(checks):
    """[(met, text)] -> the sentence that prints them, and the reason a verdict cannot be read (None: all met)."""
    text = " Preconditions: " + "; ".join(f"{t} ({'met' if ok else 'failed'})" for ok, t in checks) + "."
    failed = [t for ok, t in checks if not ok]
    return text, ("; ".join(failed) if failed else None)


