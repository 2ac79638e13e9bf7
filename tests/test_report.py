"""The report's preconditions: a verdict is read only where the parts it rests on work, and says so."""
import math

from minipost.report import adaptation, rl_methods, sft_vs_bon
from minipost.verdicts import in_range, selector_auc


def bon_sweep(aucs, rewards, n=(1, 4)):
    """One seed's sweep rows as sample_bon writes them (per-prompt rewards, the selector's per-prompt AUCs)."""
    ranked = [a for a in aucs if a is not None]
    return [{"n": k, "n_prompts": len(rewards), "reward": sum(rewards) / len(rewards), "rewards": rewards,
             "oracle_reward": 1.0, "selector_auc": sum(ranked) / len(ranked), "selector_auc_prompts": len(ranked),
             "selector_aucs": aucs} for k in n]


def test_selector_auc_interval_pools_prompts_and_seeds():
    one = {0: bon_sweep([1.0, 0.5, None, 0.0, 1.0], [0.0] * 5)}
    m, two_se, seeds = selector_auc(one)
    # the prompts that rank: 1, 0.5, 0, 1 -> mean 0.625, deviations .375 -.125 -.625 .375, two se = 2 sd / sqrt(4)
    sd = math.sqrt((0.375 ** 2 * 2 + 0.125 ** 2 + 0.625 ** 2) / 3)
    assert m == 0.625 and seeds == [0.625] and abs(two_se - 2 * sd / 2) < 1e-12
    three = {s: bon_sweep([a] * 4, [0.0] * 4) for s, a in enumerate((0.6, 0.7, 0.8))}
    m, two_se, _ = selector_auc(three)  # prompts agree within a seed: the seeds' spread decides
    assert abs(m - 0.7) < 1e-12 and abs(two_se - 2 * 0.1 / math.sqrt(3)) < 1e-12
    assert selector_auc({0: [{"n": 1}]}) is None  # a sweep without an oracle measured none


def test_sft_vs_bon_is_not_read_from_a_selector_at_chance():
    sft = [{"method": "sft", "seed": 0, "test_rewards": [1.0, 1.0, 0.0, 1.0]}]
    chance = {"arith/bon-test-seed0": bon_sweep([0.5, 0.4, 0.6, 0.5], [0.0, 0.0, 0.0, 0.0])}
    (text,) = sft_vs_bon({"arith": sft}, chance)
    assert "not distinguishable from chance (0.5)" in text and "(failed)" in text
    assert "SFT beats best-of-4 (reward model) is not testable here (the reward model ranks the candidates" in text
    assert "held" not in text and "refuted" not in text
    good = {"arith/bon-test-seed0": bon_sweep([0.9, 0.95, 0.9, 1.0], [0.0, 0.0, 0.0, 0.0])}
    (text,) = sft_vs_bon({"arith": sft}, good)
    assert "better than chance (0.5) (met)" in text
    # SFT per prompt 1, 1, 0, 1 against best-of-4's 0s: differences sd 0.5, two standard errors 0.5
    assert "SFT beats best-of-4 (reward model) held (difference +0.750, interval [+0.250, +1.250])" in text


def test_rl_start_on_the_floor_is_not_testable():
    rows = lambda m, v: [{"method": m, "seed": 0, "test_sample_reward": v, "test_sample_rewards": [v] * 4}]  # noqa: E731
    floor = rows("sft-long", 0.01) + rows("nft", 0.2) + rows("rft", 0.2) + rows("grpo", 0.3)
    (text,) = rl_methods({"arith": floor})
    assert "0.010 does not lie within [0.05, 0.95] (failed)" in text and text.count("is not testable here") == 5
    assert in_range(0.5, "x") == (True, "x 0.500 lies within [0.05, 0.95]")
    assert in_range(None, "x")[0] is False


def test_cheap_alternatives_are_compared_only_at_a_comparable_format():
    def rows(method, acc, test_format, ood_format):
        return [{"method": method, "seed": 0, "test_reward": acc, "ood_reward": acc, "test_rewards": [acc] * 4,
                 "ood_rewards": [acc] * 4, "test_format": test_format, "ood_format": ood_format}]
    evals = {"arith": rows("sft", 0.5, 1.0, 1.0) + rows("prompt-tuning", 0.9, 0.5, 0.5)
             + rows("lora-r4", 0.4, 0.95, 0.95) + rows("rag-sft-k2", 0.6, 0.0, 0.0)}
    (text,) = adaptation(evals)
    # prompt tuning scores higher but answers in another shape half the time: LoRA is the alternative compared
    assert "(not prompt-tuning 0.500, rag-warmup" not in text and "(not prompt-tuning 0.500)" in text
    assert "over the best cheap alternative there (lora-r4)" in text
    assert "rag-sft-k2's ood format 0.000 within 0.1 of the SFT policy's 1.000 (failed)" in text
    assert "(rag-sft-k2) raises its ood accuracy is not testable here" in text
    evals["arith"] = [r for r in evals["arith"] if r["method"] != "lora-r4"]  # no alternative formats like SFT
    (text,) = adaptation(evals)
    assert "holds the edge in domain over the cheap alternatives is not testable here (a cheap alternative" in text
