"""Best-of-N sampling: draw N completions per prompt, score them, keep the best.

The score comes from a reward model (--reward-model CKPT, a train_rlhf.py --algo rm checkpoint), a Python
reward function (--reward module:function, TRL's f(prompts, completions, **columns) -> list[float]) or, by
default, the task's own verifier / ground-truth reward. The chosen completion is the argmax of the scores,
the first on ties. Each prompt is prefilled once and its KV cache fanned out to its N samples; sample j of
prompt i is drawn with seed + i*N + j, so it equals a lone generation with that seed. --n 1 is the plain
sampler.

    python sample_bon.py --init out/sft-arith --n 8 --out out/bon-arith              # task split -> OUT/bon.jsonl
    python sample_bon.py --init out/sft-arith --n 1 --prompt "Mia has 12 apples. ..."  # JSONL on stdout
    python sample_bon.py --init out/sft-sentiment --task sentiment --reward-model out/rm-sentiment --n 16 --out out/bon
    python sample_bon.py --init out/sft-arith --data prompts.jsonl --reward my_rewards:score --n 4 --out out/bon
GPU:
    python sample_bon.py --init out/sft-gpt2 --device cuda --batch-size 512 --sweep 1,4,16,64,256 --out out/bon-gpt2
Several GPUs (or CPU processes): each samples and scores its share of the prompts, rank 0 writes the very file
one process writes (sample j of prompt i keeps its seed):
    torchrun --standalone --nproc_per_node 4 -- sample_bon.py --init out/sft-gpt2 --device cuda --n 16 --out out/bon-gpt2

--retrieve K puts before each prompt the K solved examples whose questions are most similar to it (BM25,
minipost/retrieval.py), as earlier chat turns, the most similar last: from --retrieve-from (a split of --task,
default train, or a JSONL file of demonstrations), as many as the context holds beside --max-new-tokens.

--sweep 1,2,4,8,16 measures reward versus N on a split (CPU: about a minute per 100 prompts at the defaults).
It samples one pool of M = max(N) * --pool-factor completions per prompt, scores it once, and evaluates every
N on that pool:
  reward   E[gold reward of the best of N by the selection score], by the exact order-statistics average
           over all N-subsets of the pool (drawn without replacement, in random order): sort the pool by
           score into levels v_1 < ... < v_L holding c_1..c_L samples, C_l = c_1 + ... + c_l; the best of a
           random N-subset lies on level l with probability (binom(C_l, N) - binom(C_(l-1), N)) / binom(M, N),
           and is then a uniform pick among that level's samples in the subset (the first of exchangeable
           draws), so its expected gold reward is the level's mean. This U-statistic is unbiased for the
           expected best-of-N reward of the policy. The gold reward is always the task's ground truth, also
           when a learned reward model selects, so over-optimisation of the proxy shows.
  KL bound log N - (N-1)/N, an upper bound on KL(pi_BoN || pi) (Beirami et al. 2024), tight only when no
           completion has noticeable probability.
  KL est.  When the score is a function of the completion, pi_BoN(y) = pi(y) * (F(s)^N - F(s-)^N) / pi(s)
           with s = score(y), F the score's CDF under pi and pi(s) the mass of its level, so
               KL(pi_BoN || pi) = sum_l P_l log(P_l / p_l),   P_l = F_l^N - F_(l-1)^N,  p_l = pi(level l).
           The estimate plugs in the pool's empirical level frequencies (p_l = c_l / M): it is the exact KL
           between best-of-N from the pool's empirical distribution and that distribution (no subset
           simulation needed). Its bias: a pool of M distinct samples gives slightly less than the bound
           (1.825 vs 1.835 nats at M = 32, N = 16), which is the truth for a continuous score; completions of
           large mass, which are what pull the true KL below the bound, repeat in the pool and are seen.
           A level the pool missed (mass q is missed with probability (1-q)^M) biases it down: a prompt
           whose pool holds one level gives 0 (e.g. all wrong under a 0/1 verifier) though the truth is
           positive if a rare correct answer exists. In between the plug-in is a nonlinear function of the
           frequencies, biased either way by O(1/M).
  gen s    wall time of sampling N completions for a prompt (one generate call with num_samples=N, batched
           like the pool), averaged over the first --time-prompts prompts.
  oracle   with --reward-model or --reward, also the reward had the ground truth itself selected from the
           same pool (oracle_reward): the ceiling a perfect selector would reach at this N.
  AUC      with an oracle, how well the selector ranks the pool it selects from: per prompt, of the candidate
           pairs whose ground truth differs, the fraction its scores order the same way (ties half; correct
           vs wrong under a 0/1 verifier); selector_auc averages the prompts whose pool holds two values.
           At 0.5 the selector is a coin, and best-of-N with it is flat in N whatever its reward model's
           accuracy on other pairs.
Results: OUT/sweep.jsonl (one row per N; "rewards" and "oracle_rewards" per prompt, in prompt order, to pair
with another policy's per-prompt rewards) and a markdown table printed last.
"""
import argparse
import bisect
import json
import math
import sys
import time
from pathlib import Path

from minipost import distributed
from minipost.checkpoint import load_checkpoint
from minipost.cli import UserError, autocast, pick_device, require_positive, run_main, task_from_flag, writable_dir
from minipost.data import read_jsonl
from minipost.retrieval import add_retrieval_flags, check_retrieval_flags, retrieval_prompts
from minipost.rewards import call_reward, make_reward
from minipost.rollout import completion_text, prompt_ids, sample_candidates
from minipost.tasks import TASKS


MAX_SAMPLES = 2**16  # per prompt: the candidates (or a sweep's pool) of one prompt are drawn in one batch


def log(*args):
    """Progress and summaries go to stderr, so that --prompt's JSONL on stdout stays clean; rank 0's only."""
    if distributed.is_main():
        print(*args, file=sys.stderr)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Model
    p.add_argument("--init", required=True, help="policy checkpoint to sample from")
    p.add_argument("--reward-model", default=None, help="select by this reward model checkpoint (kind 'rm')")
    p.add_argument("--reward", default=None, help="select by a reward function MODULE:FUNCTION, called as "
                   "f(prompts, completions, **columns) -> list[float] (default: the task's reward)")
    # Data
    p.add_argument("--task", default="arith", help=f"built-in task: {', '.join(TASKS)} (prompts, and the "
                   "default and ground-truth reward)")
    p.add_argument("--allow-other-task", action="store_true", help="accept an --init or --reward-model trained "
                   "on another task than --task (refused by default)")
    p.add_argument("--split", default="test", help="task split to take prompts from")
    p.add_argument("--prompt-seed", type=int, default=0, help="which prompts of the task split: the first "
                   "--n-prompts of this seed's (minipost.evaluate scores seed 1's: pass 1 to pair a sweep with "
                   "an evaluation on the same prompts, the first n of them)")
    p.add_argument("--n-prompts", type=int, default=None, help="prompts to use (default: 100 from the task "
                   "split, every row of --data)")
    p.add_argument("--data", default=None, help="JSONL prompts instead of the task split: a `prompt` column "
                   "(string or messages), or `messages` (the conversation up to its last user turn); other "
                   "columns are passed to the reward function")
    p.add_argument("--prompt", default=None, help="one prompt (a user message); writes JSONL to stdout")
    add_retrieval_flags(p)
    # Sampling
    p.add_argument("--n", type=int, default=4, help="candidates per prompt (1: plain sampling)")
    p.add_argument("--sweep", default=None, help="comma-separated N values, e.g. 1,2,4,8,16: reward and KL "
                   "versus N from one pool per prompt (replaces --n)")
    p.add_argument("--pool-factor", type=int, default=2, help="--sweep pool per prompt = max(N) * this")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0: greedy, N=1 only)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1]")
    p.add_argument("--max-new-tokens", type=int, default=64, help="completion budget")
    p.add_argument("--batch-size", type=int, default=64, help="sequences per generate call (at least N: one "
                   "prompt's candidates are never split) and per reward-model batch")
    p.add_argument("--seed", type=int, default=0, help="sample j of prompt i uses seed + i*N + j")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    # Logging
    p.add_argument("--out", default=None, help="output directory: OUT/bon.jsonl, or OUT/sweep.jsonl with "
                   "--sweep (default out/bon; --prompt prints to stdout unless --out is given)")
    p.add_argument("--finished-only", action="store_true", help="leave out prompts whose chosen completion did "
                   "not end with EOS or is blank (bon.jsonl as SFT data: python train_sft.py --data OUT/bon.jsonl)")
    p.add_argument("--keep-all", action="store_true", help="also write every candidate with its score "
                   "(with --sweep: the pool, to OUT/pool.jsonl)")
    p.add_argument("--time-prompts", type=int, default=8, help="--sweep: prompts timed per N")
    args = p.parse_args(argv)

    args.sweep = parse_sweep(args.sweep) if args.sweep is not None else None
    require_positive(args, "n", "pool_factor", "max_new_tokens", "batch_size", "time_prompts", "n_prompts", "top_k")
    check_retrieval_flags(args)
    # below 0.01, logits / T overflow float32 long before the samples differ from greedy ones
    if not (args.temperature == 0 or math.isfinite(args.temperature) and args.temperature >= 0.01):
        raise UserError(f"--temperature must be 0 (greedy) or >= 0.01 (got {args.temperature})")
    largest = max(args.sweep) if args.sweep else args.n
    pool = largest * (args.pool_factor if args.sweep else 1)
    if pool > MAX_SAMPLES:  # one prompt's samples are one generate call: its batch would not fit in memory
        raise UserError(f"--{'sweep' if args.sweep else 'n'}: {pool} samples per prompt"
                        f"{' (max N x --pool-factor)' if args.sweep else ''}; at most {MAX_SAMPLES}")
    if args.temperature == 0 and largest > 1:
        raise UserError("--temperature 0 is greedy: all N candidates would be the same completion")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UserError("--top-p must be in (0, 1]")
    if args.reward and args.reward_model:
        raise UserError("choose one of --reward and --reward-model")
    if args.data and args.prompt is not None:
        raise UserError("choose one of --data and --prompt")
    if args.sweep and args.prompt is not None:
        raise UserError("--sweep measures a split or a --data file, not one --prompt")
    return args


def parse_sweep(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--sweep {text!r}: expected comma-separated integers, e.g. 1,2,4,8")
    if not sizes or min(sizes) < 1:
        raise UserError(f"--sweep {text!r}: every N must be >= 1")
    return sorted(set(sizes))


# -----------------------------------------------------------------------------------------------------------
# Prompts and scores


def until_last_user(row: dict, where: str) -> dict:
    """A `messages` row -> a prompt row: the conversation up to and including its last user turn."""
    msgs = row["messages"]
    last = max((i for i, m in enumerate(msgs) if m["role"] == "user"), default=None)
    if last is None:
        raise UserError(f"{where}: 'messages' has no user turn to answer")
    return {"prompt": msgs[:last + 1], **{k: v for k, v in row.items() if k != "messages"}}


def load_prompts(args, task) -> list[dict]:
    """Prompt rows {"prompt": str | messages, **extra columns} from --prompt, --data or the task split."""
    if args.prompt is not None:
        if not args.prompt.strip():
            raise UserError("--prompt is empty")
        return [{"prompt": args.prompt}]
    if args.data:
        rows, fmt, where = read_jsonl(args.data, expect=("prompt", "prompt_completion", "preference", "messages"))
        if fmt == "messages":
            rows = [until_last_user(row, w) for row, w in zip(rows, where)]
        return rows[:args.n_prompts]
    try:
        return task.prompts(args.split, args.n_prompts or 100, seed=args.prompt_seed)
    except ValueError as e:
        raise UserError(f"--split: {e}")


def sample_scored(args, model, tokenizer, rows, prompts, n, reward):
    """n candidates per prompt -> (completions [ids], finished, texts, scores by `reward` or None), prompt-major.
    Under torchrun each rank samples and scores its share of the prompts, sample j of prompt i still drawn with
    seed + i*n + j, and every rank gets the whole lists back in prompt order."""
    lo, hi = distributed.share(len(prompts))
    comps, finished, scores = [], [], []
    if hi > lo:
        comps, finished = sample_candidates(model, tokenizer, prompts[lo:hi], n, args.max_new_tokens, args.temperature,
                                            args.top_k, args.top_p, args.batch_size, args.seed + lo * n)
    texts = [completion_text(tokenizer, c) for c in comps]
    if reward is not None and comps:
        scores = reward([r for r in rows[lo:hi] for _ in range(n)], [p for p in prompts[lo:hi] for _ in range(n)],
                        comps, texts).tolist()
    comps, finished, texts, scores = (distributed.gather(x) for x in (comps, finished, texts, scores))
    return comps, finished, texts, scores if reward is not None else None


def select_best(scores: list[float], n: int) -> list[int]:
    """For each consecutive group of n scores, the index of the largest within its group (the first on ties)."""
    return [max(range(n), key=lambda j: scores[i * n + j]) for i in range(len(scores) // n)]


# -----------------------------------------------------------------------------------------------------------
# Sweep estimators (formulas in the module docstring)


def levels(scores: list[float]) -> list[list[int]]:
    """Pool indices grouped by equal score, lowest score first."""
    groups = {}
    for i, s in enumerate(scores):
        groups.setdefault(s, []).append(i)
    return [groups[s] for s in sorted(groups)]


def expected_best_of_n(scores: list[float], values: list[float], n: int) -> float:
    """Average over every N-subset of the pool (random order) of the value of its best-scored member."""
    M = len(scores)
    if not 1 <= n <= M:
        raise ValueError(f"best-of-{n} needs 1 <= N <= pool size {M}")
    total, below, estimate = math.comb(M, n), 0, 0.0
    for members in levels(scores):
        upto = below + len(members)
        p_level = (math.comb(upto, n) - math.comb(below, n)) / total  # exact integers, then one rounding
        estimate += p_level * sum(values[i] for i in members) / len(members)
        below = upto
    return estimate


def kl_best_of_n(scores: list[float], n: int) -> float:
    """KL(best-of-N from the pool's empirical distribution || that distribution), in nats."""
    M, cdf_below, kl = len(scores), 0.0, 0.0
    count = 0
    for members in levels(scores):
        count += len(members)
        cdf = count / M
        P = cdf ** n - cdf_below ** n  # chance that the best of N lands on this level
        if P > 0:
            kl += P * math.log(P / (len(members) / M))
        cdf_below = cdf
    return kl


def ranking_auc(scores: list[float], values: list[float]) -> tuple[float | None, int]:
    """How well the selector's scores order one prompt's pool: of the candidate pairs whose ground-truth values
    differ, the fraction the scores put the same way round, a tie in score counting half (the AUC of correct
    vs wrong candidates under a 0/1 verifier; Kendall-style pair accuracy for a graded reward). 0.5 is a
    random selector, 1 a perfect one. -> (auc, pairs), or (None, 0) when every candidate has the same value
    (nothing to rank: best-of-N then gains nothing whoever selects)."""
    lower, right, pairs = [], 0.0, 0  # lower: the scores of candidates of smaller value, sorted
    for members in levels(values):
        level_scores = [scores[i] for i in members]
        for sc in level_scores:
            below = bisect.bisect_left(lower, sc)
            ties = bisect.bisect_right(lower, sc) - below
            right += below + 0.5 * ties
            pairs += len(lower)
        for sc in level_scores:
            bisect.insort(lower, sc)
    return (right / pairs if pairs else None), pairs


def kl_bound(n: int) -> float:
    """log N - (N-1)/N: the usual analytic best-of-N KL, an upper bound (Beirami et al. 2024)."""
    return math.log(n) - (n - 1) / n


def run_sweep(args, model, tokenizer, task, rows, prompts, reward, out: Path):
    P, M = len(rows), max(args.sweep) * args.pool_factor
    log(f"sweep: {P} prompts, pool of {M} samples per prompt (T={args.temperature}), selected by {reward.name}")
    t0 = time.time()
    comps, finished, texts, proxy = sample_scored(args, model, tokenizer, rows, prompts, M, reward)
    pool_s = time.time() - t0
    expanded = [r for r in rows for _ in range(M)]
    # the ground truth is the task's reward, whatever selects
    gold = proxy if args.reward is None and args.reward_model is None else call_reward(task.reward, expanded, texts)
    oracle = gold is not proxy  # best-of-N selected by the ground truth itself: the ceiling of this pool
    fmt = [float(f) for f in task.format_ok(texts)]
    # the selector's competence where it is used: ranking this pool against the ground truth, prompt by prompt
    aucs = [ranking_auc(proxy[i * M:(i + 1) * M], gold[i * M:(i + 1) * M])[0] for i in range(P)] if oracle else []
    ranked = [a for a in aucs if a is not None]
    log(f"pool sampled and scored in {pool_s:.1f}s ({pool_s / P:.2f}s per prompt)")
    if args.keep_all and distributed.is_main():
        with open(out / "pool.jsonl", "w") as f:
            for i, row in enumerate(rows):
                cut = slice(i * M, (i + 1) * M)
                f.write(json.dumps({"prompt": row["prompt"], "completions": texts[cut], "scores": proxy[cut],
                                    "rewards": gold[cut], "finished": finished[cut]}) + "\n")

    timed = prompts[:args.time_prompts]
    results = []
    for n in args.sweep:
        t = time.time()
        sample_candidates(model, tokenizer, timed, n, args.max_new_tokens, args.temperature, args.top_k,
                          args.top_p, args.batch_size, args.seed)
        gen_s = (time.time() - t) / len(timed)
        per_prompt = {"reward": [], "format": [], "proxy": [], "kl_est": []} | ({"oracle": []} if oracle else {})
        for i in range(P):
            cut = slice(i * M, (i + 1) * M)
            per_prompt["reward"].append(expected_best_of_n(proxy[cut], gold[cut], n))
            per_prompt["format"].append(expected_best_of_n(proxy[cut], fmt[cut], n))
            per_prompt["proxy"].append(expected_best_of_n(proxy[cut], proxy[cut], n))
            per_prompt["kl_est"].append(kl_best_of_n(proxy[cut], n))
            if oracle:
                per_prompt["oracle"].append(expected_best_of_n(gold[cut], gold[cut], n))
        mean = finite_means({k: sum(v) / P for k, v in per_prompt.items()}, reward)
        var = sum((r - mean["reward"]) ** 2 for r in per_prompt["reward"]) / max(1, P - 1)
        # "rewards": per prompt, in prompt order, to pair with another policy's per-prompt rewards
        results.append({"n": n, "reward": mean["reward"], "reward_se": math.sqrt(var / P), "format": mean["format"],
                        "proxy": mean["proxy"], "kl_bound": kl_bound(n), "kl_est": mean["kl_est"],
                        "gen_s_per_prompt": gen_s, "n_prompts": P, "pool": M, "task": task.name,
                        "split": args.data or args.split, "selector": reward.name, "temperature": args.temperature,
                        "rewards": per_prompt["reward"]})
        if not args.data:
            results[-1]["prompt_seed"] = args.prompt_seed
        if oracle:
            results[-1]["oracle_reward"], results[-1]["oracle_rewards"] = mean["oracle"], per_prompt["oracle"]
            # per prompt (None: its pool holds one ground-truth value) and their mean over the prompts that rank
            results[-1].update({"selector_auc": sum(ranked) / len(ranked) if ranked else None,
                                "selector_auc_prompts": len(ranked), "selector_aucs": aucs})
        if args.retrieve:
            results[-1]["retrieve"] = args.retrieve
    if distributed.is_main():
        with open(out / "sweep.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in results)
        log(f"wrote {out / 'sweep.jsonl'}")
        print(sweep_table(results, show_proxy=gold is not proxy))
    return results


def number(x: float, decimals: int) -> str:
    """x with a fixed number of decimals, as every table and summary prints it, or in general notation once
    it is large (a reward function's own scale: 1e300 is not printed as 300 digits)."""
    return f"{x:.{decimals}f}" if abs(x) < 1e6 else f"{x:.4g}"


def finite_means(means: dict, reward) -> dict:
    """{name: mean} -> means, or a UserError: finite rewards (checked per value) can still add up beyond
    float64's range (|r| near 1.8e308), which no summary can print."""
    for name, value in means.items():
        if not math.isfinite(value):
            raise UserError(f"{reward.name}: the mean {name} is {value} (its rewards add up beyond float64's "
                            "range); rescale them")
    return means


def sweep_table(results, show_proxy: bool) -> str:
    r0 = results[0]
    head = (f"best-of-N on {r0['task']}/{r0['split']}: {r0['n_prompts']} prompts, pool {r0['pool']} per prompt, "
            f"T={r0['temperature']}, selected by {r0['selector']}; reward = {r0['task']} ground truth\n")
    if r0.get("selector_auc") is not None:
        head += (f"selector AUC {r0['selector_auc']:.3f} (ranking the pool against the ground truth, mean over the "
                 f"{r0['selector_auc_prompts']} prompts whose pool holds more than one value; 0.5 = chance)\n")
    head += "\n"
    cols = ["N", "reward", "± se", "format"] + (["proxy score"] if show_proxy else []) + \
           ["KL bound", "KL est.", "gen s/prompt"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---:|" * len(cols)]
    for r in results:
        cells = [str(r["n"]), f"{r['reward']:.3f}", f"{r['reward_se']:.3f}", f"{r['format']:.3f}"]
        cells += [number(r["proxy"], 3)] if show_proxy else []
        cells += [f"{r['kl_bound']:.3f}", f"{r['kl_est']:.3f}", f"{r['gen_s_per_prompt']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return head + "\n".join(lines)


# -----------------------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    device = distributed.init(pick_device(args.device))
    with autocast(device):  # sampling and reward-model scoring (bf16 on CUDA, off on CPU)
        return best_of_n(args, device)


def best_of_n(args, device):
    """Sample --n candidates per prompt, score them, write the best (or a --sweep's table)."""
    task = task_from_flag(args.task)
    task_check = None if args.allow_other_task else task.name
    ckpt = load_checkpoint(args.init, device, task=task_check)
    if ckpt.is_reward_model:
        raise UserError(f"--init {args.init} is a reward model; give a policy (base, SFT, ...) checkpoint")
    model, tokenizer = ckpt.model.eval(), ckpt.tokenizer

    rows = load_prompts(args, task)
    block = model.config.block_size
    if args.retrieve:
        rows = retrieval_prompts(args, task, tokenizer, block - model.n_prefix, {"prompts": rows})[0]["prompts"]
    prompts = prompt_ids(tokenizer, rows)
    for i, p in enumerate(prompts):
        if len(p) >= block:
            raise UserError(f"prompt {i + 1} is {len(p)} tokens: no room to generate in a context of {block}")
    # --n 1 on a bare --prompt is plain sampling: nothing to select, so no default score is needed
    explicit = args.reward or args.reward_model
    reward = None
    if explicit or args.prompt is None or args.n > 1:
        reward = make_reward(task, tokenizer, device, args.reward, args.reward_model, args.batch_size,
                             other_task_ok=args.allow_other_task)
    to_stdout = args.prompt is not None and args.out is None
    out = Path(args.out or "out/bon")
    if not to_stdout:
        writable_dir(out)  # before the sampling
    if args.sweep:
        return run_sweep(args, model, tokenizer, task, rows, prompts, reward, out)

    n = args.n
    comps, finished, texts, scores = sample_scored(args, model, tokenizer, rows, prompts, n, reward)
    best = [0] * len(rows)
    if reward is not None:
        best = select_best(scores, n)
    else:
        scores = [None] * len(comps)

    records, skipped = [], 0
    for i, row in enumerate(rows):
        k = i * n + best[i]
        if args.finished_only and not (finished[k] and texts[k].strip()):
            skipped += 1  # cut off by the budget, or blank: not a demonstration to train on
            continue
        rec = {"prompt": row["prompt"], "completion": texts[k], "score": scores[k], "index": best[i],
               "finished": finished[k]}
        if args.keep_all:
            rec["candidates"] = [{"completion": texts[j], "score": scores[j], "finished": finished[j]}
                                 for j in range(i * n, (i + 1) * n)]
        rec.update({c: v for c, v in row.items() if c not in rec})  # e.g. arith's answer, kept for later use
        records.append(rec)
    if not records:
        raise UserError(f"--finished-only: none of the {len(rows)} chosen completions ended with EOS (raise "
                        "--max-new-tokens, or is --init an SFT model?)")
    if reward is not None:  # before anything is written
        means = finite_means({"score": sum(r["score"] for r in records) / len(records),
                              "score of all candidates": sum(scores) / len(scores)}, reward)
    lines = "".join(json.dumps(r) + "\n" for r in records)
    if not distributed.is_main():
        return records
    if to_stdout:
        sys.stdout.write(lines)
    else:
        (out / "bon.jsonl").write_text(lines)
        log(f"wrote {len(records)} chosen completions to {out / 'bon.jsonl'}"
            + (f" ({skipped} unfinished or blank, left out)" if args.finished_only else ""))
    if reward is not None:
        log(f"best-of-{n} by {reward.name}: mean score {number(means['score'], 4)} "
            f"(all candidates: {number(means['score of all candidates'], 4)})")
    return records


if __name__ == "__main__":
    run_main(main)
