"""Every objective in minipost, each a short pure function over per-token log-probs and masks.

Conventions (docs/algorithms.md): tensors are (B, T) over response positions; logp[b, t] = log pi(y_t | x, y_<t)
in float32; mask[b, t] = 1 on response tokens (the final EOS included), 0 on prompt and padding.
"token mean" = sum(l * m) / sum(m) over the whole batch. sg() = stop-gradient (.detach()).
The denominators are written out: they are part of each algorithm.
"""
import torch
import torch.nn.functional as F


def masked_sum(x, mask):
    return (x * mask).sum()


def token_mean(x, mask):
    """sum(x * m) / sum(m) over the whole batch (0 if the mask is empty)."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


# ----------------------------------------------------------------------------------------------- SFT / DFT

def trained_tokens(mask, n_tokens=None):
    """The SFT/DFT denominator N: sum(m) of this batch, or n_tokens = the trained-token count of the whole
    global batch when a step is split into micro-batches. At least 1, so a batch with no trained token
    gives loss 0 (and zero gradient), not 0/0 = NaN."""
    return (mask.sum() if n_tokens is None else torch.as_tensor(n_tokens)).clamp(min=1)


def sft_loss(logp, mask, n_tokens=None):
    """Cross-entropy on demonstrations: L = -sum(logp_t * m_t) / N, N = trained_tokens(mask, n_tokens).

    Under gradient accumulation N is the global batch's token count: averaging per-micro-batch means
    would weight the tokens of short micro-batches more.
    """
    return -masked_sum(logp, mask) / trained_tokens(mask, n_tokens)


def dft_loss(logp, mask, n_tokens=None):
    """Dynamic Fine-Tuning (Wu et al. 2025, arXiv 2508.05629): L = -sum(sg(p_t) * logp_t * m_t) / N, p_t = exp(logp_t).

    The weight is detached: the gradient is p * grad(log p) (= grad p), not grad(p log p).
    """
    return -masked_sum(logp.exp().detach() * logp, mask) / trained_tokens(mask, n_tokens)


# ------------------------------------------------------------------------------------------- reward model

def bradley_terry_loss(r_chosen, r_rejected, center_coef=0.0):
    """L = mean(-log sigmoid(r_c - r_r)) + center_coef * mean((r_c + r_r)^2). r_* (P,) scalar rewards.

    The optional centring term keeps the rewards' mean near 0 (its scale is otherwise unconstrained).
    """
    loss = -F.logsigmoid(r_chosen - r_rejected).mean()
    return loss + center_coef * ((r_chosen + r_rejected) ** 2).mean()


# ----------------------------------------------------------------------------------------------------- DPO

def dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta=0.1, label_smoothing=0.0):
    """DPO (Rafailov et al. 2023), conservative variant with label smoothing e. Inputs (P,) are SUMMED
    response log-probs. h = [pi_c - pi_r] - [ref_c - ref_r];
    L = mean( -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h) ).
    Returns (loss, implicit rewards of chosen and rejected: beta * (pi - ref), detached)."""
    h = (pi_chosen - pi_rejected) - (ref_chosen - ref_rejected)
    loss = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    rewards = (beta * (pi_chosen - ref_chosen).detach(), beta * (pi_rejected - ref_rejected).detach())
    return loss.mean(), rewards


def ipo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta=0.1):
    """IPO (Azar et al. 2023): L = mean( (h' - 1/(2 beta))^2 ), h' = [pi_c - pi_r] - [ref_c - ref_r].

    minipost follows TRL's variant: the caller passes LENGTH-AVERAGED log-probs (sum(logp) / len for each
    response). Azar et al. define h' on whole-sequence log-probabilities (the sums, as in DPO); averaging
    changes the scale of h' and with it which beta is sensible. Returns (loss, implicit rewards as in dpo_loss).
    """
    h = (pi_chosen - pi_rejected) - (ref_chosen - ref_rejected)
    rewards = (beta * (pi_chosen - ref_chosen).detach(), beta * (pi_rejected - ref_rejected).detach())
    return ((h - 1 / (2 * beta)) ** 2).mean(), rewards


# ----------------------------------------------------------------------------------------------------- PPO

def kl_k1(logp, ref_logp):
    """Per-token k1 estimate of KL(pi || ref): logp - ref (unbiased; can be negative per token)."""
    return logp - ref_logp


def kl_k3(logp, ref_logp):
    """Per-token k3 estimate of KL(pi || ref): exp(ref - logp) - (ref - logp) - 1 (>= 0, low variance)."""
    d = ref_logp - logp
    return d.exp() - d - 1


def ppo_token_rewards(score, finished, logp, ref_logp, mask, last, kl_coef):
    """PPO-RLHF's per-token reward (lm-human-preferences): r_t = -kl_coef * k1(logp_t, ref_t) on response
    tokens, plus the sequence's score on its last response token (the EOS it was scored at). A response
    that did not finish with EOS within the budget scores -1 instead (the missing-EOS penalty).

    score (N,) reward of each response; finished (N,) bool; logp, ref_logp, mask (N, T) at the sampling
    temperature; last (N,) index of each row's last response token.
    Returns (rewards (N, T), score after the penalty (N,), kl (N, T) = k1 * mask).
    """
    score = torch.where(finished, score, torch.full_like(score, -1.0))
    kl = kl_k1(logp, ref_logp) * mask
    rewards = -kl_coef * kl
    rewards[torch.arange(len(score), device=rewards.device), last] += score
    return rewards, score, kl


def whiten(x, mask, shift_mean=True, all_sum=lambda total: total):
    """(x - mean) / std over the masked entries of the whole batch; masked-out entries are set to 0.
    all_sum: when the batch is split over data-parallel ranks, the sum over all of them (distributed.all_sum),
    so that mean and std are the whole batch's, not this rank's."""
    count = all_sum(mask.sum()).clamp(min=1)
    mean = all_sum(masked_sum(x, mask)) / count
    var = all_sum(masked_sum((x - mean) ** 2, mask)) / count
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """Generalised advantage estimation over response tokens. rewards, values, mask (B, T).

    delta_t = r_t + gamma V_{t+1} - V_t with V = 0 after the last response token;
    A_t = delta_t + gamma lam A_{t+1}; returns R_t = A_t + V_t. Padding must be masked (mask 0) at the end.
    """
    values = values * mask
    advantages = torch.zeros_like(rewards)
    next_adv = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * mask[:, t]
        next_value = values[:, t]
        advantages[:, t] = next_adv
    return advantages, advantages + values


def clipped_surrogate(logp, old_logp, advantages, clip=0.2):
    """Per-token PPO objective max(-A r, -A clip(r, 1-clip, 1+clip)) with r = exp(logp - old_logp), and the
    per-token indicator that clipping was active (for logging)."""
    ratio = (logp - old_logp).exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    return torch.maximum(unclipped, clipped), (clipped > unclipped).float()


def ppo_policy_loss(logp, old_logp, advantages, mask, clip=0.2):
    """L_pg = token mean of max(-A r, -A clip(r)). Returns (loss, clip fraction, approx KL 0.5 mean(logratio^2))."""
    per_token, clipped = clipped_surrogate(logp, old_logp, advantages, clip)
    approx_kl = 0.5 * token_mean((logp - old_logp).detach() ** 2, mask)
    return token_mean(per_token, mask), token_mean(clipped, mask), approx_kl


def ppo_value_loss(values, old_values, returns, mask, clip=0.2):
    """L_v = 0.5 * token mean of max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)."""
    v_clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * token_mean(torch.maximum((values - returns) ** 2, (v_clipped - returns) ** 2), mask)


# ------------------------------------------------------------------------------------------ GRPO / Dr.GRPO

def group_advantages(rewards, scale=True):
    """rewards (G, K): K samples for each of G prompts -> A (G, K) = (r - mean_group) / (std_group + 1e-4).
    scale=False is Dr.GRPO (no division by std). std is the unbiased sample std, as in DeepSeekMath's code."""
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    return centred / (rewards.std(dim=1, keepdim=True) + 1e-4) if scale else centred


def grpo_token_terms(logp, old_logp, ref_logp, advantages, clip=0.2, kl_coef=0.0):
    """GRPO's and Dr.GRPO's per-token term l_t = max(-A r, -A clip(r)) + kl_coef * k3(logp, ref) -> (B, T).
    advantages (B,) one per sequence; ref_logp may be None when kl_coef = 0."""
    per_token, _ = clipped_surrogate(logp, old_logp, advantages[:, None], clip)
    if kl_coef:
        per_token = per_token + kl_coef * kl_k3(logp, ref_logp)
    return per_token


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, clip=0.2, kl_coef=0.0):
    """GRPO (DeepSeekMath): per token l_t = max(-A r, -A clip(r)) + kl_coef * k3(logp, ref);
    L = mean over sequences of (sum_t l_t m_t / sum_t m_t): each sequence averaged first.
    advantages (B,) one per sequence; ref_logp may be None when kl_coef = 0."""
    per_token = grpo_token_terms(logp, old_logp, ref_logp, advantages, clip, kl_coef)
    return ((per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).mean()


def dr_grpo_loss(logp, old_logp, ref_logp, advantages, mask, normaliser, clip=0.2, kl_coef=0.0):
    """Dr.GRPO (arXiv 2503.20783): the same per-token terms, L = sum_t l_t m_t / normaliser with a constant
    normaliser (train_rlhf.py: minibatch size x max new tokens, the same C as nft_loss), so neither a long
    response nor a short, partial last minibatch reweights the tokens."""
    per_token = grpo_token_terms(logp, old_logp, ref_logp, advantages, clip, kl_coef)
    return masked_sum(per_token, mask) / normaliser


# ----------------------------------------------------------------------------------------------- NFT / RFT

def max_v(x, eps):
    """Value max(x, eps), gradient of x: x + sg(max(x, eps) - x)."""
    return x + (x.clamp(min=eps) - x).detach()


def nft_loss(logp, old_logp, mask, correct, r_q, normaliser, eps=1.0):
    """Negative-aware Fine-Tuning (Chen et al. 2025, arXiv 2505.18116; NVlabs/NFT dp_actor.py).

    correct (B,) bool per sample; r_q (B,) its group's mean reward, clamped to [0.02, 0.98] by the caller.
    R_t = exp(min(logp_t - old_t, 10));  positive: l_t = -log R_t;
    negative: l_t = -log max_v((1 - r_q R_t) / (1 - r_q), eps);  prompt weight w_q = 1 - r_q;
    L = sum_t w_q l_t m_t / normaliser, a constant (not a per-token mean).
    """
    log_ratio = (logp - old_logp).clamp(max=10.0)
    r_q = r_q[:, None]
    positive = -log_ratio  # -log R_t
    negative = -torch.log(max_v((1 - r_q * log_ratio.exp()) / (1 - r_q), eps))
    per_token = torch.where(correct[:, None], positive, negative)
    return masked_sum((1 - r_q) * per_token, mask) / normaliser
