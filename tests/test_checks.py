"""The checks every script shares, called directly: divergence (numbers and weights), checkpoint kinds, the
samples a run used. The scripts' end-to-end bad-input rows are in test_bad_input.py."""
import math

import pytest
import torch


def test_divergence_checks_name_the_quantity_and_the_step():
    """The one check every script calls: numbers and weights. Non-numbers pass; a finite weight of 1e21 does not
    (its float32 norm overflows), 1e18 does; the name and step are in the message."""
    from minipost.cli import Diverged, finite_or_stop, weights_finite_or_stop
    assert finite_or_stop(3, {"loss": torch.tensor(0.5), "kl": 2, "name": "x", "rewards": [1.0], "done": True}) == \
        {"loss": 0.5, "kl": 2.0}
    for bad in (float("nan"), float("-inf"), torch.tensor(float("inf"))):
        with pytest.raises(Diverged, match=r"^step 7: entropy is (nan|-?inf); training diverged"):
            finite_or_stop(7, {"loss": 1.0, "entropy": bad})
    model = torch.nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.fill_(1e18)
    norm = weights_finite_or_stop(1, {"parameter norm": model})["parameter norm"]
    assert norm == pytest.approx(math.sqrt(12) * 1e18, rel=1e-5)  # 12 weights of 1e18; the bias is small
    model.bias.requires_grad_(False)
    with torch.no_grad():
        model.bias.fill_(float("nan"))  # frozen (a LoRA base): not what the run trains, not checked here
    weights_finite_or_stop(1, {"parameter norm": model})
    with torch.no_grad():
        model.weight[0, 0] = 1e21
    with pytest.raises(Diverged, match=r"^step 2: critic parameter norm is inf"):
        weights_finite_or_stop(2, {"parameter norm": torch.nn.Linear(2, 2), "critic parameter norm": model})


def test_every_kind_of_run_is_a_kind_meta_json_accepts():
    from minipost.meta import KINDS
    from train_rlhf import ALGOS
    from train_sft import LOSSES
    assert set(KINDS) == {"base", *LOSSES, *ALGOS}


def test_samples_used_of_a_hand_made_meta(tmp_path):
    """A checkpoint saved without "args" or "step" (a test's, a converted one) evaluates; samples are then unknown."""
    from minipost.evaluate import samples_used
    assert samples_used(tmp_path, {"kind": "sft", "script": "test"}) is None
    assert samples_used(tmp_path, {"kind": "dpo", "args": {"batch_size": 4}, "step": 3}) == 12
    # SFT on chats of 1..3 demonstrations (train_sft.py --turns 3): (3 + 1) / 2 demonstrations a chat
    assert samples_used(tmp_path, {"kind": "sft", "args": {"batch_size": 16, "turns": 3}, "step": 5}) == 160
