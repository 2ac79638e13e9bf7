"""Post-training from an SFT checkpoint: reward model, DPO, PPO, NFT, RFT and GRPO on one log-prob core.

Every log-prob goes through model.token_logprobs (kernels.token_logprobs); every sample through the engine
(minipost.engine.generate); every objective is one function of minipost/losses.py (formulas in
ALGORITHMS.md). Dropout is off everywhere (all models stay in eval mode); reference models are frozen.

  --algo rm    Bradley-Terry reward model: scalar head on the EOS hidden state, trunk from --init
  --algo dpo   DPO / conservative DPO (--label-smoothing) / IPO (--ipo) against the frozen --init model
  --algo ppo   PPO-RLHF: k1 KL penalty in the reward, score at EOS, GAE, clipped policy and value losses
  --algo nft   Negative-aware Fine-Tuning: K samples per prompt, 0/1 reward, learns from the wrong ones too
  --algo rft   NFT without negatives: learns only from correct samples (rejection-sampling fine-tuning)
  --algo grpo  GRPO (--dr-grpo: Dr.GRPO) with group-normalised advantages and optional k3 KL loss

rm and dpo train on preference pairs: built from the SFT model's own samples (K per train prompt, best vs
worst by the task's reward) or --data pairs.jsonl (prompt/chosen/rejected). The RL algorithms sample the
task's train prompts (or --data prompts.jsonl) and score them with the task's reward, --reward
module:function or --reward-model (an --algo rm checkpoint).

Logged to OUT/metrics.jsonl every step (evaluation keys at step 0, every --eval-every steps and at the end):
  all        loss, lr, step_time_s (wall time of the step), time_s
  rm         accuracy, margin (batch pairs); val_accuracy, val_loss (held-out pairs)
  dpo        accuracy, margin, chosen_reward, rejected_reward (implicit rewards beta (logp - ref)), entropy
  ppo        reward (mean reward of the rollouts), score (after the missing-EOS penalty), kl (sequence KL of
             the rollouts to the reference: per-sequence sum of logp - ref, mean over sequences), entropy,
             pg_loss, value_loss, clipfrac, approx_kl, approx_kl_first (first minibatch: ratio 1, so ~0), kl_coef,
             samples_used (rollouts trained on)
  nft/rft/grpo  reward, accuracy (reward > 0.5), kl, entropy, groups_filtered, samples_used
  policies   SPLIT_reward, SPLIT_format (task reward of greedy / T=1 samples, as the task evaluates); test_kl,
             test_entropy, test_sample_reward (the policy's own test samples at --temperature); dpo: val_accuracy
Tip: on a small shared CPU, OMP_NUM_THREADS=1 is often several times faster (the ops are tiny).

CPU (a few minutes each on 2 cores; after train_base.py and train_sft.py):
    python train_rlhf.py --algo rm   --init out/sft-sentiment --task sentiment --out out/rm-sentiment
    python train_rlhf.py --algo ppo  --init out/sft-sentiment --task sentiment --reward-model out/rm-sentiment --out out/ppo-sentiment
    python train_rlhf.py --algo dpo  --init out/sft-sentiment --task sentiment --out out/dpo-sentiment
    python train_rlhf.py --algo nft  --init out/sft-arith --task arith --out out/nft-arith
    python train_rlhf.py --algo grpo --init out/sft-arith --task arith --dr-grpo --out out/drgrpo-arith
GPU: the same with --device cuda and larger --batch-size / --max-new-tokens.
"""
import argparse
import copy
import time
from pathlib import Path

import torch
from tqdm import tqdm

from minipost import losses
from minipost.checkpoint import (find_checkpoint, load_checkpoint, load_train_state, rng_state, save_checkpoint,
                                 set_rng_state)
from minipost.cli import MetricsLog, UserError, pick_device, run_main, task_from_flag
from minipost.data import epoch_indices, read_jsonl
from minipost.evaluate import evaluate_policy, prompt_ids
from minipost.model import GPT, GPTConfig
from minipost.preferences import build_pairs, load_pairs, pair_sequences, reference_samples, split_pairs, write_pairs
from minipost.rollout import (Reward, eos_scores, make_reward,
                              sample_kl, sample_rollout, sequence_logprobs, step_seed, token_values)
from minipost.rewards import load_reward_fn
from minipost.tasks import TASKS

ALGOS = ("rm", "dpo", "ppo", "nft", "rft", "grpo")
# Per-algorithm defaults for flags left unset, tuned so each run learns within a few CPU minutes
# (tiny model, 2 cores). batch_size counts pairs (rm, dpo) or prompts (ppo: 1 sample each; nft/rft/grpo: K).
# nft/rft/grpo on arith: 32 prompts x 8 samples, two gradient steps per rollout batch. With 16 prompts a step,
# or lr 3e-4, greedy test accuracy fell below the SFT model's (noisy updates that fit the batch's problems).
DEFAULTS = {
    "rm": dict(lr=3e-4, max_steps=150, batch_size=32, k=4, n_prompts=1000),
    "dpo": dict(lr=5e-5, max_steps=150, batch_size=32, k=4, n_prompts=1000, beta=0.1),
    "ppo": dict(lr=3e-5, max_steps=60, batch_size=64, epochs=4, minibatch_size=16, beta=0.05, n_prompts=4000),
    "nft": dict(lr=1e-4, max_steps=25, batch_size=32, k=8, epochs=1, minibatch_size=128, n_prompts=4000),
    "rft": dict(lr=1e-4, max_steps=25, batch_size=32, k=8, epochs=1, minibatch_size=128, n_prompts=4000),
    "grpo": dict(lr=1e-4, max_steps=25, batch_size=32, k=8, epochs=1, minibatch_size=128, n_prompts=4000),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Model
    p.add_argument("--algo", required=True, choices=ALGOS, help="what to train (see above)")
    p.add_argument("--init", required=True, help="SFT checkpoint to start from (and the frozen reference)")
    p.add_argument("--reward-model", default=None, help="ppo/nft/rft/grpo: reward from this --algo rm checkpoint "
                   "(ppo: its critic starts from it too; without it the critic is a zero-initialised value "
                   "head on a copy of the policy trunk)")
    p.add_argument("--reward", default=None, help="module:function reward f(prompts, completions, **columns) -> "
                   "list of floats, instead of the task's (also ranks the built-in pairs of rm/dpo)")
    # Data
    p.add_argument("--task", default="arith", help=f"built-in task: {', '.join(TASKS)} (prompts, reward, evaluation)")
    p.add_argument("--data", default=None, help="rm/dpo: JSONL pairs (prompt/chosen/rejected); ppo/nft/rft/grpo: "
                   "JSONL prompts (prompt + columns for the reward). The task still provides evaluation")
    p.add_argument("--n-prompts", type=int, default=None, help="task train prompts to build pairs from (rm, "
                   "dpo) or to sample rollouts from (default per algo)")
    p.add_argument("--k", type=int, default=None, help="samples per prompt: for the built-in pairs (default 4) "
                   "or per rollout group (nft/rft/grpo, default 8)")
    p.add_argument("--val-frac", type=float, default=0.1, help="--data pairs held out for accuracy")
    p.add_argument("--val-data", default=None, help="rm/dpo: held-out pairs from this JSONL instead (all of --data "
                   "then trains), e.g. another run's OUT/pairs-val.jsonl beside its OUT/pairs-train.jsonl")
    p.add_argument("--n-eval", type=int, default=200, help="prompts per evaluation split")
    p.add_argument("--n-kl", type=int, default=200, help="test prompts sampled at --temperature for the "
                   "evaluation's KL, entropy and sample reward")
    p.add_argument("--max-new-tokens", type=int, default=64, help="response budget when sampling")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of rollouts and pairs; "
                   "old, new and reference log-probs use the same one")
    # Optimisation
    p.add_argument("--max-steps", type=int, default=None, help="training steps (rollout batches for RL)")
    p.add_argument("--batch-size", type=int, default=None, help="pairs (rm, dpo) or prompts (RL) per step")
    p.add_argument("--lr", type=float, default=None, help="learning rate (AdamW, constant after warm-up)")
    p.add_argument("--warmup", type=int, default=5, help="linear warm-up steps")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip each model's gradient norm (0: off)")
    p.add_argument("--beta", type=float, default=None, help="dpo: beta (0.1); ppo: initial KL coefficient (0.05)")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="dpo: conservative DPO epsilon")
    p.add_argument("--ipo", action="store_true", help="dpo: IPO loss on length-averaged log-probs")
    p.add_argument("--center-coef", type=float, default=0.0, help="rm: weight of the centring term mean((rc+rr)^2)")
    p.add_argument("--epochs", type=int, default=None, help="RL: passes over each rollout batch (ppo 4, else 1)")
    p.add_argument("--minibatch-size", type=int, default=None, help="RL: sequences per gradient step")
    p.add_argument("--clip", type=float, default=0.2, help="RL: ratio clip (and ppo value clip)")
    p.add_argument("--vf-coef", type=float, default=0.1, help="ppo: value loss coefficient")
    p.add_argument("--gae-lambda", type=float, default=0.95, help="ppo: GAE lambda (gamma is 1)")
    p.add_argument("--target-kl", type=float, default=None, help="ppo: adaptive KL target in nats per sequence "
                   "(default: fixed --beta)")
    p.add_argument("--kl-horizon", type=int, default=10000, help="ppo: adaptive KL horizon")
    p.add_argument("--kl-coef", type=float, default=0.04, help="grpo: k3 KL loss coefficient (0: no KL "
                   "term; the reference then only serves the logged KL)")
    p.add_argument("--dr-grpo", action="store_true", help="grpo: Dr.GRPO (no std division, constant normaliser)")
    p.add_argument("--seed", type=int, default=0, help="seeds data order, rollouts and the new heads")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    # Logging
    p.add_argument("--out", default=None, help="checkpoint directory (OUT/ckpt) and OUT/metrics.jsonl "
                   "(default out/ALGO)")
    p.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (default max-steps/4)")
    p.add_argument("--ckpt-every", type=int, default=None, help="steps between checkpoints (default eval-every)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt if it exists")
    args = p.parse_args(argv)
    for key, value in {"epochs": 4 if args.algo == "ppo" else 1, "k": 8, "minibatch_size": 32, "beta": 0.1,
                       **DEFAULTS[args.algo]}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.out = args.out or f"out/{args.algo}"
    args.eval_every = args.eval_every or -(-args.max_steps // 4)  # ceil: the 4th lands on the last step
    args.ckpt_every = args.ckpt_every or args.eval_every
    for flag in ("max_steps", "batch_size", "k", "n_prompts", "n_eval", "n_kl", "max_new_tokens", "epochs",
                 "minibatch_size", "eval_every", "ckpt_every", "warmup"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1")
    if args.temperature <= 0:
        raise UserError("--temperature must be > 0 (log-probs are taken at the sampling temperature)")
    if args.val_data and not (args.data and args.algo in ("rm", "dpo")):
        raise UserError("--val-data needs --data and --algo rm or dpo (it holds out preference pairs)")
    if args.reward_model and args.algo in ("rm", "dpo"):
        raise UserError(f"--reward-model is for ppo, nft, rft and grpo, not --algo {args.algo}")
    return args


def load_init(args, device):
    """--init must be a policy: SFT (or DFT, or another post-trained policy), not a base or a reward model."""
    ck = load_checkpoint(args.init, device, flag="--init")
    kind = ck.meta.get("kind")
    if kind == "base":
        raise UserError(f"--init {args.init} is a base model (kind 'base'): fine-tune it first with "
                        f"python train_sft.py --init {args.init} --out out/sft")
    if kind == "rm" or ck.model.config.scalar_head:
        raise UserError(f"--init {args.init} is a reward model; pass the SFT checkpoint (use it as --reward-model)")
    return ck


def frozen_copy(model):
    return copy.deepcopy(model).eval().requires_grad_(False)


def clip_and_step(opt, loss, models, grad_clip):
    """One optimizer step on loss; each model's gradient norm clipped on its own. -> the policy's norm."""
    loss.backward()
    norms = [torch.nn.utils.clip_grad_norm_(m.parameters(), grad_clip or float("inf")) for m in models]
    opt.step()
    opt.zero_grad(set_to_none=True)
    return norms[0].item()


# ------------------------------------------------------------------------------------ preference pairs

def preference_pairs(args, sft, tokenizer, task, out):
    """(train, held-out) pairs: --data, or the built-in pairs from the SFT model's samples (also written
    to OUT/pairs-train.jsonl and OUT/pairs-val.jsonl for inspection and reuse with --data)."""
    if args.data:
        pairs, dropped = load_pairs(args.data, tokenizer, sft.config.block_size)
        if args.val_data:  # e.g. a built-in run's pairs-train.jsonl / pairs-val.jsonl, reused as they were
            train, (val, dropped_val) = pairs, load_pairs(args.val_data, tokenizer, sft.config.block_size, "--val-data")
            dropped += dropped_val
        else:
            train, val = split_pairs(pairs, args.val_frac, args.seed)
        print(f"pairs: {len(train)} train, {len(val)} held out from {args.val_data or args.data} "
              f"({dropped} too long, dropped)")
        return train, val
    reward = Reward(load_reward_fn(args.reward), f"--reward {args.reward}") if args.reward else \
        Reward(task.reward, f"the {task.name} task's reward")
    built = {}
    for i, (split, n) in enumerate((("train", args.n_prompts), ("test", args.n_eval))):
        t0 = time.time()
        pairs, records = build_pairs(sft, tokenizer, reward, task.prompts(split, n, seed=0), args.k,
                                     args.max_new_tokens, args.temperature, seed=step_seed(args.seed, i))
        out.mkdir(parents=True, exist_ok=True)
        write_pairs(out / f"pairs-{'train' if split == 'train' else 'val'}.jsonl", records)
        print(f"pairs: {len(pairs)} from {n} {split} prompts x {args.k} samples ({time.time() - t0:.0f}s)")
        built[split] = pairs
    if len(built["train"]) < 1 or len(built["test"]) < 1:
        raise UserError("the SFT samples gave no preference pairs (all ties): raise --k or --n-prompts")
    return built["train"], built["test"]


def pair_accuracy(r_chosen, r_rejected):
    """Fraction of pairs ranked right, a tie counting half (at step 0 DPO's implicit rewards all tie at 0)."""
    return ((r_chosen > r_rejected).float() + 0.5 * (r_chosen == r_rejected).float()).mean().item()


def pair_logprob_sums(model, pairs, pad_id, device, average=False, chunk=64):
    """Summed (or, for IPO, length-averaged) response log-probs -> (chosen (P,), rejected (P,))."""
    out = []
    for s in range(0, len(pairs), chunk):
        seqs = pair_sequences(pairs[s:s + chunk], pad_id, device)
        total = sequence_logprobs(model, seqs).sum(1)  # (2P,) off-mask entries are 0
        out.append((total / seqs.mask.sum(1) if average else total).view(2, -1))
    both = torch.cat(out, dim=1)  # (2, P)
    return both[0], both[1]


# ------------------------------------------------------------------------------------ the algorithms

class Trainer:
    """One algorithm: .models (the first is checkpointed), .step(step, opt) -> metrics, .evaluate(step) ->
    metrics; state() / load_state() carry extra resume state, before_save() adds checkpoint metadata."""
    models: list

    def state(self):
        return {}

    def load_state(self, state):
        pass

    def before_save(self):
        return {}


class RewardModel(Trainer):
    """Bradley-Terry on pairs; r(x, y) = score_head(hidden state at y's EOS). The head starts at std
    1/sqrt(C+1), bias 0 (GPTConfig.scalar_head); every checkpoint first centres the bias so that the SFT
    model's own samples score 0 on average."""

    def __init__(self, args, init, resumed, task, device, out):
        self.args, self.tok = args, init.tokenizer
        self.train, self.val = preference_pairs(args, init.model, self.tok, task, out)
        prompts = list(dict.fromkeys(tuple(p) for p, _, _ in self.train))[:256]  # distinct prompts
        self.reference = reference_samples(init.model, self.tok, [list(p) for p in prompts], args.max_new_tokens,
                                           seed=step_seed(args.seed, 2))
        if resumed is not None:
            self.model = resumed.model
        else:
            torch.manual_seed(args.seed)
            self.model = GPT(GPTConfig(**{**init.model.config.to_dict(), "scalar_head": True, "dropout": 0.0}))
            missing, _ = self.model.load_state_dict(init.model.state_dict(), strict=False)
            assert sorted(missing) == ["score_head.bias", "score_head.weight"], missing
        self.model.to(device).eval()
        self.models = [self.model]

    def scores(self, pairs):
        seqs = pair_sequences(pairs, self.tok.pad_id, self.model.transformer.wte.weight.device)
        r = eos_scores(self.model, seqs)  # (2P,)
        return r[:len(pairs)], r[len(pairs):]

    def step(self, step, opt):
        a = self.args
        rc, rr = self.scores([self.train[i] for i in epoch_indices(step, a.batch_size, len(self.train), a.seed)])
        loss = losses.bradley_terry_loss(rc, rr, a.center_coef)
        grad_norm = clip_and_step(opt, loss, self.models, a.grad_clip)
        return {"loss": loss.item(), "accuracy": pair_accuracy(rc, rr), "margin": (rc - rr).mean().item(),
                "grad_norm": grad_norm}

    @torch.no_grad()
    def evaluate(self, step):
        rc, rr = zip(*(self.scores(self.val[s:s + 64]) for s in range(0, len(self.val), 64)))
        rc, rr = torch.cat(rc), torch.cat(rr)
        result = {"val_accuracy": pair_accuracy(rc, rr),
                  "val_loss": losses.bradley_terry_loss(rc, rr).item()}
        tqdm.write(f"step {step}: held-out pair accuracy {result['val_accuracy']:.3f}")
        return result

    @torch.no_grad()
    def before_save(self):
        """Shift the bias so the SFT samples' mean reward is 0; the differences the loss sees are unchanged."""
        mean = torch.cat([eos_scores(self.model, self.reference[s:s + 64])
                          for s in range(0, len(self.reference), 64)]).mean()
        self.model.score_head.bias -= mean
        return {"reward_bias": self.model.score_head.bias.item(), "centred_on": len(self.reference)}


class Policy(Trainer):
    """What every policy algorithm shares: the policy, its frozen reference (the --init model) and the
    evaluation (task reward on each split at the task's temperature; KL and entropy on test samples)."""

    def __init__(self, args, init, resumed, task, device):
        self.args, self.task, self.tok = args, task, init.tokenizer
        self.ref = frozen_copy(init.model).to(device)
        self.policy = (resumed.model if resumed is not None else init.model).to(device).eval()
        self.models = [self.policy]
        self.splits = {s: task.prompts(s, args.n_eval, seed=0) for s in task.splits if s != "train"}

    def prompt_pool(self):
        """RL prompts: --data rows (those that leave room for a response) or the task's train prompts."""
        a, block = self.args, self.policy.config.block_size
        if not a.data:
            return self.task.prompts("train", a.n_prompts, seed=0)
        rows, _, _ = read_jsonl(a.data, expect=("prompt",))
        rows = [r for r, ids in zip(rows, prompt_ids(self.tok, rows)) if len(ids) < block - 1]
        if not rows:
            raise UserError(f"--data {a.data}: every prompt fills the model's context ({block} tokens)")
        return rows

    def evaluate(self, step):
        a, result = self.args, {}
        for split, rows in self.splits.items():
            r = evaluate_policy(self.policy, self.tok, self.task, rows, a.max_new_tokens, self.task.eval_temperature)
            result[f"{split}_reward"], result[f"{split}_format"] = r["reward"], r["format"]
        kl = sample_kl(self.policy, self.ref, self.tok, self.splits["test"][:a.n_kl], a.max_new_tokens,
                       a.temperature, seed=step_seed(a.seed, 10**6), reward_fn=self.task.reward)
        result["test_kl"], result["test_entropy"] = kl["kl"], kl["entropy"]
        result["test_sample_reward"] = kl["reward"]  # the task's (ground-truth) reward of those same samples
        tqdm.write(f"step {step}: " + "  ".join(f"{k} {v:.3f}" for k, v in result.items()))
        return result


class DPO(Policy):
    """h = [logp(y_w) - logp(y_l)] - [ref(y_w) - ref(y_l)] with SUMMED response log-probs (IPO: averaged);
    reference log-probs precomputed once (the reference is frozen). Chosen and rejected share one forward."""

    def __init__(self, args, init, resumed, task, device, out):
        super().__init__(args, init, resumed, task, device)
        self.train, self.val = preference_pairs(args, self.ref, self.tok, task, out)
        with torch.no_grad():
            self.ref_train = pair_logprob_sums(self.ref, self.train, self.tok.pad_id, device, args.ipo)
            self.ref_val = pair_logprob_sums(self.ref, self.val, self.tok.pad_id, device, args.ipo)

    def loss(self, pi_c, pi_r, ref_c, ref_r):
        if self.args.ipo:
            return losses.ipo_loss(pi_c, pi_r, ref_c, ref_r, self.args.beta)
        return losses.dpo_loss(pi_c, pi_r, ref_c, ref_r, self.args.beta, self.args.label_smoothing)

    def step(self, step, opt):
        a = self.args
        idx = epoch_indices(step, a.batch_size, len(self.train), a.seed)
        seqs = pair_sequences([self.train[i] for i in idx], self.tok.pad_id, self.ref_train[0].device)
        logp, ent = sequence_logprobs(self.policy, seqs, entropy=True)  # (2P, T-1)
        total = logp.sum(1) / (seqs.mask.sum(1) if a.ipo else 1)
        pi_c, pi_r = total.view(2, -1)
        loss, (rc, rr) = self.loss(pi_c, pi_r, self.ref_train[0][idx], self.ref_train[1][idx])
        grad_norm = clip_and_step(opt, loss, self.models, a.grad_clip)
        return {"loss": loss.item(), "accuracy": pair_accuracy(rc, rr), "margin": (rc - rr).mean().item(),
                "chosen_reward": rc.mean().item(), "rejected_reward": rr.mean().item(),
                "entropy": ((ent * seqs.mask).sum() / seqs.mask.sum()).item(), "grad_norm": grad_norm}

    @torch.no_grad()
    def evaluate(self, step):
        pi_c, pi_r = pair_logprob_sums(self.policy, self.val, self.tok.pad_id, self.ref_val[0].device, self.args.ipo)
        _, (rc, rr) = self.loss(pi_c, pi_r, *self.ref_val)
        return {"val_accuracy": pair_accuracy(rc, rr), **super().evaluate(step)}


class PPO(Policy):
    """PPO-RLHF (lm-human-preferences; Huang et al. 2024). Critic: a separate GPT with a scalar head, a copy
    of the reward model when --reward-model is given, else a copy of the policy trunk with a zero head."""

    def __init__(self, args, init, resumed, task, device, out):
        super().__init__(args, init, resumed, task, device)
        self.reward = make_reward(args, task, self.tok, device)
        self.pool = self.prompt_pool()
        if self.reward.model is not None:
            self.critic = copy.deepcopy(self.reward.model).requires_grad_(True)
        else:
            self.critic = GPT(GPTConfig(**{**init.model.config.to_dict(), "scalar_head": True, "dropout": 0.0}))
            self.critic.load_state_dict(init.model.state_dict(), strict=False)
            torch.nn.init.zeros_(self.critic.score_head.weight)
        self.critic.to(device).eval()
        self.models = [self.policy, self.critic]
        self.kl_coef = args.beta  # adapted in place with --target-kl; saved with the resume state

    def state(self):
        return {"critic": self.critic.state_dict(), "kl_coef": self.kl_coef}

    def load_state(self, state):
        self.critic.load_state_dict(state["critic"])
        self.kl_coef = state["kl_coef"]

    def step(self, step, opt):
        a, T = self.args, self.args.temperature
        rows = [self.pool[i] for i in epoch_indices(step, a.batch_size, len(self.pool), a.seed)]
        r = sample_rollout(self.policy, self.tok, rows, 1, a.max_new_tokens, T, step_seed(a.seed, step))
        seqs, mask, N = r.seqs, r.seqs.mask, len(rows)
        with torch.no_grad():
            # old log-probs recomputed by the training model at the sampling temperature: ratio 1 at first
            old_logp, ent = sequence_logprobs(self.policy, seqs, T, entropy=True)  # (N, T-1)
            ref_logp = sequence_logprobs(self.ref, seqs, T)
            old_values = token_values(self.critic, seqs)
            raw = self.reward(r)
            score = torch.where(r.finished, raw, torch.full_like(raw, -1.0))  # no EOS: score := -1
            kl = losses.kl_k1(old_logp, ref_logp) * mask  # (N, T-1)
            rewards = -self.kl_coef * kl
            rewards[torch.arange(N, device=mask.device), seqs.last] += score  # the score arrives with the EOS token
            adv, returns = losses.gae(rewards, old_values, mask, 1.0, a.gae_lambda)
            adv = losses.whiten(adv, mask)
        logs = []
        for epoch in range(a.epochs):
            perm = torch.randperm(N, generator=torch.Generator().manual_seed(step_seed(a.seed, step) + epoch))
            for mb in perm.to(mask.device).split(a.minibatch_size):
                logp = sequence_logprobs(self.policy, seqs[mb], T)
                pg, clipfrac, approx_kl = losses.ppo_policy_loss(logp, old_logp[mb], adv[mb], mask[mb], a.clip)
                vf = losses.ppo_value_loss(token_values(self.critic, seqs[mb]), old_values[mb], returns[mb],
                                           mask[mb], a.clip)
                clip_and_step(opt, pg + a.vf_coef * vf, self.models, a.grad_clip)
                logs.append([pg.item(), vf.item(), clipfrac.item(), approx_kl.item()])
        seq_kl = kl.sum(1).mean().item()
        kl_coef = self.kl_coef
        if a.target_kl:  # adaptive controller (Ziegler et al. 2019)
            e = min(max(seq_kl / a.target_kl - 1, -0.2), 0.2)
            self.kl_coef *= 1 + e * N / a.kl_horizon
        pg, vf, clipfrac, approx_kl = torch.tensor(logs).mean(0).tolist()
        return {"loss": pg + a.vf_coef * vf, "reward": raw.mean().item(), "score": score.mean().item(),
                "kl": seq_kl, "entropy": ((ent * mask).sum() / mask.sum()).item(), "pg_loss": pg, "value_loss": vf,
                "clipfrac": clipfrac, "approx_kl": approx_kl, "approx_kl_first": logs[0][3], "kl_coef": kl_coef,
                "finished": r.finished.float().mean().item(), "samples_used": N}


class GroupRL(Policy):
    """K samples per prompt, then NFT, RFT or GRPO on the groups that carry signal.

    NFT / RFT: reward > 0.5 counts as correct; r_q = group accuracy clamped to [0.02, 0.98]; groups all
    right or all wrong are dropped; RFT also drops the wrong samples. Normaliser C = minibatch-size *
    max-new-tokens, a constant. GRPO: groups with all-equal rewards are dropped; grpo_loss averages each
    sequence's tokens, then the sequences (DeepSeekMath); --dr-grpo uses dr_grpo_loss (token sum /
    (sequences * max-new-tokens)) and no std division. Several gradient steps per rollout batch
    (epochs x minibatches): after the first, R = pi / pi_old != 1.
    """

    def __init__(self, args, init, resumed, task, device, out):
        super().__init__(args, init, resumed, task, device)
        self.reward = make_reward(args, task, self.tok, device)
        self.pool = self.prompt_pool()

    def step(self, step, opt):
        a, T, K = self.args, self.args.temperature, self.args.k
        rows = [self.pool[i] for i in epoch_indices(step, a.batch_size, len(self.pool), a.seed)]
        r = sample_rollout(self.policy, self.tok, rows, K, a.max_new_tokens, T, step_seed(a.seed, step))
        seqs, mask = r.seqs, r.seqs.mask
        rewards = self.reward(r).view(-1, K)  # (G, K)
        correct = rewards > 0.5
        if a.algo == "grpo":
            keep_group = rewards.max(1).values > rewards.min(1).values
            adv = losses.group_advantages(rewards, scale=not a.dr_grpo).view(-1)  # (N,)
        else:
            r_q = correct.float().mean(1)  # (G,)
            keep_group = (r_q > 0) & (r_q < 1)
            r_q = r_q.clamp(0.02, 0.98).repeat_interleave(K)  # (N,)
        keep = keep_group.repeat_interleave(K)
        if a.algo == "rft":
            keep &= correct.view(-1)  # learn only from the correct samples
        with torch.no_grad():
            old_logp, ent = sequence_logprobs(self.policy, seqs, T, entropy=True)  # (N, T-1)
            ref_logp = sequence_logprobs(self.ref, seqs, T)  # for the KL term and the logged KL
        idx = keep.nonzero()[:, 0]
        used = []
        for epoch in range(a.epochs if len(idx) else 0):
            perm = torch.randperm(len(idx), generator=torch.Generator().manual_seed(step_seed(a.seed, step) + epoch))
            for mb in idx[perm.to(idx.device)].split(a.minibatch_size):
                logp = sequence_logprobs(self.policy, seqs[mb], T)
                if a.algo != "grpo":
                    loss = losses.nft_loss(logp, old_logp[mb], mask[mb], correct.view(-1)[mb], r_q[mb],
                                           normaliser=a.minibatch_size * a.max_new_tokens)
                elif a.dr_grpo:
                    loss = losses.dr_grpo_loss(logp, old_logp[mb], ref_logp[mb], adv[mb], mask[mb],
                                               a.max_new_tokens, a.clip, a.kl_coef)
                else:
                    loss = losses.grpo_loss(logp, old_logp[mb], ref_logp[mb], adv[mb], mask[mb], a.clip, a.kl_coef)
                clip_and_step(opt, loss, self.models, a.grad_clip)
                used.append(loss.item())
        return {"reward": rewards.mean().item(), "accuracy": correct.float().mean().item(),
                "kl": ((old_logp - ref_logp) * mask).sum(1).mean().item(),
                "entropy": ((ent * mask).sum() / mask.sum()).item(),
                "loss": sum(used) / len(used) if used else 0.0, "groups_filtered": int((~keep_group).sum()),
                "samples_used": int(len(idx)), "finished": r.finished.float().mean().item()}


TRAINERS = {"rm": RewardModel, "dpo": DPO, "ppo": PPO, "nft": GroupRL, "rft": GroupRL, "grpo": GroupRL}


# ------------------------------------------------------------------------------------ the loop

def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    out = Path(args.out)
    task = task_from_flag(args.task)
    init = load_init(args, device)
    resuming = args.resume and find_checkpoint(out) is not None
    resumed = None
    if resuming:
        resumed = load_checkpoint(out, device, flag="--resume from")
        if resumed.meta.get("kind") != args.algo:
            raise UserError(f"--resume: {resumed.path} holds a {resumed.meta.get('kind')!r} run, "
                            f"not --algo {args.algo}")
    torch.manual_seed(args.seed)
    trainer = TRAINERS[args.algo](args, init, resumed, task, device, out)

    opt = torch.optim.AdamW([{"params": m.parameters()} for m in trainer.models], lr=args.lr,
                            betas=(0.9, 0.95), weight_decay=0.0)
    start_step, elapsed = 0, 0.0
    if resuming:
        state = load_train_state(resumed.path)
        opt.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        trainer.load_state(state["trainer"])
        start_step, elapsed = state["step"], state["elapsed"]
    metrics = MetricsLog(out / "metrics.jsonl", resume_step=start_step if resuming else None)
    if start_step == 0:
        metrics.log(step=0, **trainer.evaluate(0))  # the starting point: the SFT model (an untrained head for rm)

    t_start = time.time()
    bar = tqdm(range(start_step, args.max_steps), initial=start_step, total=args.max_steps, desc=args.algo)
    for step in bar:
        lr = args.lr * min(1.0, (step + 1) / args.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        t0 = time.time()
        last = {"step": step + 1, **trainer.step(step, opt), "lr": lr, "step_time_s": time.time() - t0}
        done = step + 1 == args.max_steps
        if (step + 1) % args.eval_every == 0 or done:
            last.update(trainer.evaluate(step + 1))
        last["time_s"] = elapsed + time.time() - t_start
        metrics.log(**last)
        bar.set_postfix({k: f"{last[k]:.3f}" for k in ("loss", "reward", "accuracy", "kl") if k in last})
        if (step + 1) % args.ckpt_every == 0 or done:
            meta = {"script": "train_rlhf.py", "kind": args.algo, "args": vars(args), "step": step + 1,
                    "init": str(args.init), "elapsed_s": last["time_s"], **trainer.before_save()}
            meta["metrics"] = last
            save_checkpoint(out, trainer.models[0], init.tokenizer, meta,
                            {"optimizer": opt.state_dict(), "rng": rng_state(), "step": step + 1,
                             "elapsed": last["time_s"], "trainer": trainer.state()})
    print(f"done: checkpoint in {out / 'ckpt'}")


if __name__ == "__main__":
    run_main(main)
