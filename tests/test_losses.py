"""Each objective against numbers computed by hand (or by a plain loop written here)."""
import math

import torch
from torch.testing import assert_close

from minipost import losses as L


def t(x, **kw):
    return torch.tensor(x, dtype=torch.float64, **kw)


def test_sft_hand_computed_and_global_denominator():
    logp = t([[-1.0, -2.0, -3.0], [-0.5, -4.0, -9.0]])
    mask = t([[0, 1, 1], [1, 1, 0]])
    assert_close(L.sft_loss(logp, mask), t((2 + 3 + 0.5 + 4) / 4))
    # gradient accumulation: two micro-batches with the global token count sum to the full-batch loss
    parts = [L.sft_loss(logp[i:i + 1], mask[i:i + 1], n_tokens=mask.sum()) for i in range(2)]
    assert_close(parts[0] + parts[1], L.sft_loss(logp, mask))
    # ... which the mean of per-micro-batch means would not (2.5 vs 2.25 here)
    assert abs(0.5 * (L.sft_loss(logp[:1], mask[:1]) + L.sft_loss(logp[1:], mask[1:])) - 2.375) < 1e-12


def test_dft_value_and_detached_weight_gradient():
    logp = t([[-0.5, -2.0]], requires_grad=True)
    mask = t([[1, 1]])
    loss = L.dft_loss(logp, mask)
    assert_close(loss, t(-(math.exp(-0.5) * -0.5 + math.exp(-2.0) * -2.0) / 2))
    loss.backward()
    # d/dlogp of -sg(p) logp / N = -p / N  (grad of p log p would be -(p logp + p) / N)
    assert_close(logp.grad, -logp.detach().exp() / 2)


def test_sft_dft_empty_mask_is_zero_not_nan():
    """No trained token: the denominator is clamped to 1, so the loss is 0 * anything / 1 = 0 and the gradient
    -m / 1 (SFT) or -sg(p) m / 1 (DFT) is 0 everywhere -- not 0/0 = NaN. Same when the caller passes a global
    token count n_tokens = 0 (a step whose every micro-batch is empty)."""
    for loss_fn in (L.sft_loss, L.dft_loss):
        for n_tokens in (None, t(0.0), torch.tensor(0)):
            logp = t([[-1.0, -2.0], [-0.5, -3.0]], requires_grad=True)
            loss = loss_fn(logp, torch.zeros(2, 2, dtype=torch.float64), n_tokens=n_tokens)
            assert torch.isfinite(loss) and loss.item() == 0
            loss.backward()
            assert torch.isfinite(logp.grad).all() and (logp.grad == 0).all()


def test_bradley_terry():
    rc, rr = t([2.0, 0.0]), t([1.0, 1.0])
    want = (-math.log(1 / (1 + math.exp(-1))) - math.log(1 / (1 + math.exp(1)))) / 2
    assert_close(L.bradley_terry_loss(rc, rr), t(want))
    assert_close(L.bradley_terry_loss(rc, rr, center_coef=0.01), t(want + 0.01 * (9 + 1) / 2))


def test_dpo_equal_policy_and_reference_is_log2():
    x = t([-3.0, -7.0, -1.5])
    y = t([-2.0, -9.0, -4.0])
    loss, (rw_c, rw_r) = L.dpo_loss(x, y, x, y, beta=0.1)
    assert_close(loss, t(math.log(2)))
    assert (rw_c == 0).all() and (rw_r == 0).all()


def test_dpo_hand_computed_with_label_smoothing():
    # h = (-1 - -3) - (-2 - -2) = 2; beta h = 0.2
    loss, (rc, rr) = L.dpo_loss(t([-1.0]), t([-3.0]), t([-2.0]), t([-2.0]), beta=0.1, label_smoothing=0.1)
    sig = lambda z: 1 / (1 + math.exp(-z))
    assert_close(loss, t(-0.9 * math.log(sig(0.2)) - 0.1 * math.log(sig(-0.2))))
    assert_close(rc, t([0.1])) and assert_close(rr, t([-0.1]))


def test_ipo_hand_computed():
    loss, _ = L.ipo_loss(t([-2.0]), t([-1.0]), t([-1.0]), t([-1.0]), beta=0.5)  # h = -1, 1/(2 beta) = 1
    assert_close(loss, t(4.0))


def test_kl_estimators():
    logp, ref = t([-1.0, -2.0]), t([-1.5, -1.0])
    assert_close(L.kl_k1(logp, ref), t([0.5, -1.0]))
    assert_close(L.kl_k3(logp, ref), t([math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1 - 1]))
    assert (L.kl_k3(logp, ref) >= 0).all()


def test_ppo_token_rewards_hand_computed():
    """r_t = -kl_coef (logp_t - ref_t) m_t, plus the score on the row's last response token; the unfinished
    row (no EOS within the budget) scores -1 instead of its reward-model score."""
    m = t([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])  # lengths 3, 4 (ran to the budget), 1
    logp = t([[-1.0, -0.5, -2.0, -3.0], [-0.2, -1.0, -0.4, -0.6], [-0.3, -5.0, -5.0, -5.0]])
    ref = t([[-1.5, -0.5, -1.0, -1.0], [-0.2, -2.0, -0.4, -0.1], [-0.8, 0.0, 0.0, 0.0]])
    score, finished, last = t([2.0, 3.0, -0.5]), torch.tensor([True, False, True]), torch.tensor([2, 3, 0])
    rewards, score_out, kl = L.ppo_token_rewards(score, finished, logp, ref, m, last, kl_coef=0.1)
    # k1 = logp - ref on response tokens; padding (e.g. row 0's -3 - -1 = -2) is masked to 0
    assert_close(kl, t([[0.5, 0.0, -1.0, 0.0], [0.0, 1.0, 0.0, -0.5], [0.5, 0.0, 0.0, 0.0]]))
    assert_close(score_out, t([2.0, -1.0, -0.5]))
    # last tokens: row 0: 0.1 + 2 = 2.1; row 1: 0.05 + (-1) = -0.95; row 2: -0.05 + (-0.5) = -0.55
    assert_close(rewards, t([[-0.05, 0.0, 2.1, 0.0], [0.0, -0.1, 0.0, -0.95], [-0.55, 0.0, 0.0, 0.0]]))
    assert_close(score, t([2.0, 3.0, -0.5]))  # the caller's scores are not overwritten


def test_gae_against_plain_loop():
    torch.manual_seed(0)
    B, T = 3, 6
    rewards, values = torch.randn(B, T, dtype=torch.float64), torch.randn(B, T, dtype=torch.float64)
    lengths = [6, 4, 1]
    mask = torch.zeros(B, T, dtype=torch.float64)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    adv, ret = L.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    for b, n in enumerate(lengths):
        for t0 in range(n):  # A_t = sum_l (gamma lam)^l delta_{t+l}, V after the last token = 0
            want = 0.0
            for l in range(n - t0):
                v_next = values[b, t0 + l + 1] if t0 + l + 1 < n else 0.0
                delta = rewards[b, t0 + l] + 0.9 * v_next - values[b, t0 + l]
                want += (0.9 * 0.8) ** l * delta
            assert abs(adv[b, t0] - want) < 1e-12
            assert abs(ret[b, t0] - (want + values[b, t0])) < 1e-12
        assert (adv[b, n:] == 0).all()


def test_whiten_masked():
    x = t([[1.0, 2.0, 3.0], [5.0, 100.0, 100.0]])
    mask = t([[1, 1, 1], [1, 0, 0]])
    w = L.whiten(x, mask)
    vals = torch.tensor([1.0, 2.0, 3.0, 5.0], dtype=torch.float64)
    want = (vals - vals.mean()) / vals.var(unbiased=False).sqrt()
    assert_close(w[mask.bool()], want, atol=1e-6, rtol=0)
    assert (w[~mask.bool()] == 0).all()


def test_ppo_ratio_one_gives_minus_mean_advantage():
    logp = t([[-1.0, -2.0], [-0.3, -0.7]], requires_grad=True)
    adv = t([[1.0, -2.0], [0.5, 3.0]])
    mask = t([[1, 1], [1, 0]])
    loss, clipfrac, approx_kl = L.ppo_policy_loss(logp, logp.detach(), adv, mask)
    assert_close(loss, t(-(1 - 2 + 0.5) / 3))
    assert clipfrac == 0 and approx_kl == 0


def test_ppo_clipping_hand_computed():
    # ratio e^0.5 = 1.6487 > 1.2: with A > 0 the clipped branch (-1.2 A) is the max, no gradient flows
    logp = t([[0.5]], requires_grad=True)
    loss, clipfrac, _ = L.ppo_policy_loss(logp, t([[0.0]]), t([[2.0]]), t([[1.0]]))
    assert_close(loss, t(-2.4))
    loss.backward()
    assert logp.grad.item() == 0 and clipfrac == 1
    # with A < 0 the unclipped branch is the max: -A r = 1.6487
    loss, clipfrac, _ = L.ppo_policy_loss(t([[0.5]]), t([[0.0]]), t([[-1.0]]), t([[1.0]]))
    assert_close(loss, t(math.exp(0.5))) and clipfrac == 0


def test_ppo_value_loss_hand_computed():
    v, v_old, ret, mask = t([[1.0, 0.0]]), t([[0.5, 0.0]]), t([[0.0, 2.0]]), t([[1, 1]])
    # token 1: max((1-0)^2, (0.7-0)^2) = 1; token 2: max(4, 4) = 4 -> 0.5 * (1 + 4) / 2
    assert_close(L.ppo_value_loss(v, v_old, ret, mask), t(1.25))


def test_group_advantages():
    r = t([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0]])
    std0 = math.sqrt(((0.5 ** 2) * 4) / 3)
    assert_close(L.group_advantages(r)[0], t([0.5, -0.5, -0.5, 0.5]) / (std0 + 1e-4))
    assert_close(L.group_advantages(r, scale=False)[1], t([0.25, 0.25, 0.25, -0.75]))


def test_grpo_and_drgrpo_normalisation():
    logp = t([[-1.0, -1.0, -1.0], [-2.0, 0.0, 0.0]])
    mask = t([[1, 1, 1], [1, 0, 0]])
    adv = t([1.0, -1.0])
    # ratio 1: per-token -A; GRPO averages per sequence: (-1 + 1) / 2 = 0
    assert_close(L.grpo_loss(logp, logp, None, adv, mask), t(0.0))
    # Dr.GRPO: token sum (-3 + 1) / constant normaliser (minibatch size x max new tokens = 2 * 4)
    assert_close(L.dr_grpo_loss(logp, logp, None, adv, mask, normaliser=8), t(-2 / 8))
    # k3 term: ref = logp - 1 on every token -> k3 = e^-1 + 1 - 1 per token
    k3 = math.exp(-1)
    assert_close(L.grpo_loss(logp, logp, logp - 1, adv, mask, kl_coef=0.5), t(0.5 * k3))


def test_nft_positive_and_negative_values():
    logp, old = t([[-1.0, -1.0]]), t([[-1.2, -0.9]])  # log R = 0.2, -0.1
    mask = t([[1, 1]])
    r_q = t([0.25])
    pos = L.nft_loss(logp, old, mask, torch.tensor([True]), r_q, normaliser=4.0)
    assert_close(pos, t(0.75 * (-0.2 + 0.1) / 4))
    # negative: x = (1 - 0.25 R) / 0.75 -> R = e^0.2: 0.9262 < eps = 1 -> value 1 (log 0); R = e^-0.1: 1.0349
    neg = L.nft_loss(logp, old, mask, torch.tensor([False]), r_q, normaliser=4.0, eps=1.0)
    x2 = (1 - 0.25 * math.exp(-0.1)) / 0.75
    assert_close(neg, t(0.75 * (0.0 - math.log(x2)) / 4))


def test_nft_gradient_after_the_first_step():
    """R != 1 (a later minibatch step): hand-derived gradients. Positive: d(-log R)/dlogp = -1. Negative:
    l = -log max_v(x, eps), x = (1 - r R) / (1 - r), so dl/dlogp = (r R / (1 - r)) / max(x, eps) -- the clipped
    token keeps a gradient, divided by eps instead of x. Each times w = 1 - r over the normaliser."""
    logp, old = t([[-1.0, -1.0]], requires_grad=True), t([[-1.2, -0.9]])  # R = e^0.2 (x < eps), e^-0.1
    r, mask = 0.25, t([[1, 1]])
    L.nft_loss(logp, old, mask, torch.tensor([True]), t([r]), normaliser=4.0).backward()
    assert_close(logp.grad, t([[-0.75 / 4, -0.75 / 4]]))
    logp.grad = None
    L.nft_loss(logp, old, mask, torch.tensor([False]), t([r]), normaliser=4.0, eps=1.0).backward()
    expected = []
    for log_r in (0.2, -0.1):
        R = math.exp(log_r)
        x = (1 - r * R) / (1 - r)
        expected.append(0.75 / 4 * (r * R / (1 - r)) / max(x, 1.0))
    assert_close(logp.grad, t([expected]))


def test_nft_log_ratio_clamp_and_negative_clip():
    """log R = 12, 0.3, -0.5 with r_q = 0.25 (w_q = 0.75), C = 4. The clamp at 10 makes the first token's
    value use log R = 10 and its gradient exactly 0, on both sides. Positive: l = -log R -> values -10, -0.3,
    0.5, gradient -w/C. Negative: x = (1 - r R) / (1 - r); R = e^0.3 gives x = 0.883 < eps = 1, so the value
    is clipped to -log 1 = 0 but the gradient is that of x: w (r R / (1 - r)) / eps / C = r R / C; R = e^-0.5
    gives x = 1.131 > eps, unclipped: value -log x, gradient r R / (x C)."""
    old = t([[-12.5, -1.3, -1.5], [-12.5, -1.3, -1.5]])
    logp = t([[-0.5, -1.0, -2.0], [-0.5, -1.0, -2.0]], requires_grad=True)  # log R = 12, 0.3, -0.5
    mask, correct, r, w, C = t([[1, 1, 1], [1, 1, 1]]), torch.tensor([True, False]), 0.25, 0.75, 4.0
    x3 = (1 - r * math.exp(-0.5)) / (1 - r)
    assert (1 - r * math.exp(0.3)) / (1 - r) < 1.0 < x3  # the second token is clipped, the third is not
    loss = L.nft_loss(logp, old, mask, correct, t([r, r]), normaliser=C, eps=1.0)
    assert_close(loss, t(w * (-10 - 0.3 + 0.5) / C + w * (0 + 0 - math.log(x3)) / C))
    loss.backward()
    assert_close(logp.grad, t([[0.0, -w / C, -w / C],
                               [0.0, r * math.exp(0.3) / C, r * math.exp(-0.5) / (x3 * C)]]))


def test_nft_at_ratio_one_matches_drgrpo_gradient():
    """At R = 1, NFT's gradient equals Dr.GRPO's with binary reward and the same constant normaliser."""
    torch.manual_seed(1)
    logp = torch.randn(4, 5, dtype=torch.float64).clamp(max=-0.01).requires_grad_()
    mask = torch.ones(4, 5, dtype=torch.float64)
    mask[2, 3:] = 0
    correct = torch.tensor([True, False, False, True])  # one group of 4, r_q = 0.5
    r_q = torch.full((4,), 0.5, dtype=torch.float64)
    L.nft_loss(logp, logp.detach(), mask, correct, r_q, normaliser=20.0).backward()
    g_nft = logp.grad.clone()
    logp.grad = None
    adv = L.group_advantages(correct.double()[None], scale=False)[0]  # r - mean: +0.5 / -0.5
    L.dr_grpo_loss(logp, logp.detach(), None, adv, mask, normaliser=20.0).backward()
    assert_close(g_nft, logp.grad)


def test_nft_matches_drgrpo_on_a_partial_minibatch():
    """A last minibatch holding 3 of a group's K = 4 samples (minibatch size 4, max new tokens 5, C = 20).
    At R = 1 with r_q = 0.25: NFT's gradient is -w/C = -0.75/C on the correct sample's tokens and
    w (r / (1 - r)) / 1 / C = 0.25/C on the wrong ones; Dr.GRPO's is -A/C with A = reward - mean over the whole
    group of 4 = +0.75 / -0.25. They agree only when both divide by the same constant C; the old
    rows-present denominator (3 x 5 = 15) would scale Dr.GRPO's gradient by 20/15."""
    torch.manual_seed(2)
    correct = torch.tensor([True, False, False, False])  # the full group: r_q = 0.25
    adv = L.group_advantages(correct.double()[None], scale=False)[0]  # 0.75, -0.25, -0.25, -0.25
    rows = [0, 1, 2]  # the partial minibatch: 3 rows present
    logp = torch.randn(3, 5, dtype=torch.float64).clamp(max=-0.01).requires_grad_()
    mask = torch.ones(3, 5, dtype=torch.float64)
    mask[0, 4:] = 0
    mask[2, 2:] = 0
    r_q = torch.full((3,), 0.25, dtype=torch.float64)
    L.nft_loss(logp, logp.detach(), mask, correct[rows], r_q, normaliser=20.0).backward()
    g_nft = logp.grad.clone()
    assert_close(g_nft, mask * t([[-0.75], [0.25], [0.25]]) / 20)
    logp.grad = None
    L.dr_grpo_loss(logp, logp.detach(), None, adv[rows], mask, normaliser=20.0).backward()
    assert_close(g_nft, logp.grad)
    logp.grad = None
    L.dr_grpo_loss(logp, logp.detach(), None, adv[rows], mask, normaliser=3 * 5).backward()
    assert not torch.allclose(g_nft, logp.grad)


def test_max_v_clips_value_keeps_gradient():
    x = t([0.5, 2.0], requires_grad=True)
    y = L.max_v(x, 1.0)
    assert_close(y, t([1.0, 2.0]))
    (y * t([3.0, 5.0])).sum().backward()
    assert_close(x.grad, t([3.0, 5.0]))  # clamp would give 0 for the clipped element
