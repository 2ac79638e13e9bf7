"""Post-training from an SFT checkpoint: reward model, DPO, PPO, NFT, RFT and GRPO on one log-prob core.

Every log-prob goes through model.teacher_forced_logprobs (kernels.token_logprobs); every sample through the
engine (minipost.engine.generate); every objective is one function of minipost/losses.py (formulas, sources
and pitfalls in docs/algorithms.md); every reward through minipost/rewards.py. Dropout is off everywhere
(all models stay in eval mode); reference models are frozen.

The file reads top to bottom: flags, the plumbing every algorithm calls (loading, the frozen reference,
evaluation; the loop's logging and checkpoints are minipost/loop.py), then one function per family -- train_reward_model,
train_dpo, train_ppo, train_group (NFT, RFT, GRPO) -- each set-up -> loop (rollout, score, loss, step, log,
checkpoint).

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
  all        loss, grad_norm (the policy's gradient norm before clipping; RL: mean over the step's
             minibatches, 0 when none ran), lr, step_time_s (wall time of the step), time_s
  rm         accuracy, margin (batch pairs); val_accuracy, val_loss (held-out pairs)
  dpo        accuracy, margin, chosen_reward, rejected_reward (implicit rewards beta (logp - ref)), entropy
  ppo        reward (mean reward of the rollouts), score (after the missing-EOS penalty), kl (sequence KL of
             the rollouts to the reference: per-sequence sum of logp - ref, mean over sequences), entropy,
             pg_loss, value_loss, clipfrac, approx_kl, approx_kl_first (first minibatch: ratio 1, so ~0), kl_coef,
             samples_used (rollouts trained on), finished (fraction of rollouts ended by EOS)
  nft/rft/grpo  reward, accuracy (reward > 0.5), kl, entropy, groups_filtered, samples_used, finished
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
Several GPUs (or CPU processes): torchrun --standalone --nproc_per_node N -- train_rlhf.py ... computes what one
process computes for the same flags: --batch-size and --minibatch-size stay global, each rank samples (or
reads) its share of the batch's prompts (or pairs), and every rank trains on the rows it holds of each global
minibatch (minipost/distributed.py).
"""
import argparse
import copy
import time
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from minipost import distributed, losses
from minipost.adapters import BaseView, adapt, add_adapter_flags, check_adapter_flags, has_adapters, merge_adapters
from minipost.checkpoint import load_checkpoint, load_resumed
from minipost.cli import (UserError, autocast, pick_device, require_numbers, require_positive, run_main, task_from_flag,
                          writable_dir)
from minipost.data import epoch_indices, read_jsonl
from minipost.evaluate import evaluate_policy
from minipost.distributed import minibatches
from minipost.loop import adamw, end_step, optimizer_step, start_run, training_steps
from minipost.model import GPT, GPTConfig
from minipost.preferences import (build_pairs, demo_pairs, load_pairs, pair_accuracy, pair_logprob_sums,
                                  pair_sequences, pair_totals, reference_samples, split_pairs, write_pairs)
from minipost.rewards import eos_scores, make_reward, same_tokenizer
from minipost.rollout import prompt_ids, sample_kl, sample_rollout, sequence_logprobs, step_seed, token_values
from minipost.tasks import TASKS

ALGOS = ("rm", "dpo", "ppo", "nft", "rft", "grpo")
# Sampling seeds of what is not a training step, as step_seed(--seed, "step") numbers no run reaches (rollout
# step s samples with step_seed(--seed, s); rm and dpo, which sample pairs, never roll out)
PAIRS_SEED_STEP = {"train": 0, "test": 1}  # the built-in preference pairs of each split
REFERENCE_SEED_STEP = 2  # rm: the SFT samples the reward model is centred on
EVAL_SEED_STEP = 10**6  # every evaluation's T = 1 test samples: the same seed at every step
# The defaults that differ between algorithms, stated here once (each flag's help lists them; parse_args applies
# them). Tuned so each run learns within a few CPU minutes (tiny model, 2 cores). batch_size counts pairs (rm,
# dpo) or prompts (ppo: 1 sample each; nft/rft/grpo: k each). nft/rft/grpo on arith: 32 prompts x 8 samples,
# one gradient step per rollout batch; with 16 prompts a step, or lr 3e-4, greedy test accuracy fell below the
# SFT model's (noisy updates that fit the batch's problems).
GROUP = dict(lr=1e-4, max_steps=25, batch_size=32, n_prompts=4000, k=8, epochs=1, minibatch_size=128)
ALGO_DEFAULTS = {
    "rm": dict(lr=3e-4, max_steps=150, batch_size=32, n_prompts=1000, k=4),
    "dpo": dict(lr=5e-5, max_steps=150, batch_size=32, n_prompts=1000, k=4, beta=0.1),
    "ppo": dict(lr=3e-5, max_steps=60, batch_size=64, n_prompts=4000, epochs=4, minibatch_size=16, beta=0.05),
    "nft": GROUP, "rft": GROUP, "grpo": GROUP,
}


def per_algo(flag: str) -> str:
    """The help text's list of a flag's per-algorithm defaults, read from ALGO_DEFAULTS."""
    algos_of = {}
    for algo, defaults in ALGO_DEFAULTS.items():
        if flag in defaults:
            algos_of.setdefault(defaults[flag], []).append(algo)
    return "default " + ", ".join(f"{'/'.join(algos)} {value:g}" for value, algos in algos_of.items())


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
    add_adapter_flags(p)  # LoRA / prompt tuning: the reference is then the base with the adapters off
    # Data
    p.add_argument("--task", default="arith", help=f"built-in task: {', '.join(TASKS)} (prompts, reward, evaluation)")
    p.add_argument("--allow-other-task", action="store_true", help="accept an --init or --reward-model trained "
                   "on another task than --task (refused by default)")
    p.add_argument("--data", default=None, help="rm/dpo: JSONL pairs (prompt/chosen/rejected); ppo/nft/rft/grpo: "
                   "JSONL prompts (prompt + columns for the reward). The task still provides evaluation")
    p.add_argument("--n-prompts", type=int, default=None, help="task train prompts to build pairs from (rm, "
                   f"dpo) or to sample rollouts from; {per_algo('n_prompts')}")
    p.add_argument("--k", type=int, default=None, help="samples per prompt: for the built-in pairs (rm, dpo) or "
                   f"per rollout group (nft/rft/grpo); {per_algo('k')}")
    p.add_argument("--val-frac", type=float, default=0.1, help="--data pairs held out for accuracy")
    p.add_argument("--val-data", default=None, help="rm/dpo: held-out pairs from this JSONL instead (all of --data "
                   "then trains), e.g. another run's OUT/pairs-val.jsonl beside its OUT/pairs-train.jsonl")
    p.add_argument("--pairs-from-demos", action="store_true", help="rm/dpo built-in pairs: the task's "
                   "demonstration (chosen) against the policy's worst of --k samples (rejected) where the task's "
                   "reward ranks the demonstration higher, instead of best against worst sample")
    p.add_argument("--n-eval", type=int, default=200, help="prompts per evaluation split")
    p.add_argument("--n-kl", type=int, default=200, help="test prompts sampled at --temperature for the "
                   "evaluation's KL, entropy and sample reward")
    p.add_argument("--max-new-tokens", type=int, default=64, help="response budget when sampling")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of rollouts and pairs; "
                   "old, new and reference log-probs use the same one")
    # Optimisation
    p.add_argument("--max-steps", type=int, default=None, help=f"training steps (rollout batches for RL); "
                   f"{per_algo('max_steps')}")
    p.add_argument("--batch-size", type=int, default=None, help=f"pairs (rm, dpo) or prompts (RL) per step; "
                   f"{per_algo('batch_size')}")
    p.add_argument("--lr", type=float, default=None, help=f"learning rate (AdamW, constant after warm-up); "
                   f"{per_algo('lr')}")
    p.add_argument("--warmup", type=int, default=5, help="linear warm-up steps")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip each model's gradient norm (0: off)")
    p.add_argument("--beta", type=float, default=None, help=f"dpo: beta; ppo: initial KL coefficient; "
                   f"{per_algo('beta')}")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="dpo: conservative DPO epsilon")
    p.add_argument("--ipo", action="store_true", help="dpo: IPO loss on length-averaged log-probs (TRL's variant)")
    p.add_argument("--center-coef", type=float, default=0.0, help="rm: weight of the centring term mean((rc+rr)^2)")
    p.add_argument("--epochs", type=int, default=None, help=f"RL: passes over each rollout batch; {per_algo('epochs')}")
    p.add_argument("--minibatch-size", type=int, default=None, help="RL: sequences per gradient step (nft/grpo: "
                   f"also the constant normaliser's row count); {per_algo('minibatch_size')}")
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
    p.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (default: a quarter "
                   "of --max-steps, rounded up, so the fourth lands on the last step)")
    p.add_argument("--ckpt-every", type=int, default=None, help="steps between checkpoints (default --eval-every)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt if it exists")
    args = p.parse_args(argv)

    for flag, value in ALGO_DEFAULTS[args.algo].items():  # the per-algorithm defaults, applied here only
        if getattr(args, flag) is None:
            setattr(args, flag, value)
    args.out = args.out or f"out/{args.algo}"
    require_positive(args, "max_steps", "batch_size", "k", "n_prompts", "n_eval", "n_kl", "max_new_tokens", "epochs",
                     "minibatch_size", "eval_every", "ckpt_every", "warmup")
    args.eval_every = args.eval_every or -(-args.max_steps // 4)
    args.ckpt_every = args.ckpt_every or args.eval_every
    # log-probs are taken at the sampling temperature: 0 is not a distribution, and below 0.01 logits / T
    # overflow float32 long before the samples differ from greedy ones
    require_numbers(args, lr="> 0", beta="> 0" if args.algo == "dpo" else ">= 0", temperature=">= 0.01",
                    val_frac="in (0, 1)", grad_clip=">= 0", label_smoothing="in [0, 0.5)", center_coef=">= 0",
                    clip="> 0", vf_coef=">= 0", gae_lambda="in [0, 1]", target_kl="> 0", kl_coef=">= 0")
    require_positive(args, "kl_horizon")
    if args.pairs_from_demos and args.algo not in ("rm", "dpo"):
        raise UserError(f"--pairs-from-demos builds preference pairs: it is for --algo rm or dpo, not {args.algo}")
    if args.pairs_from_demos and args.data:
        raise UserError("--pairs-from-demos builds pairs from the task's demonstrations: not with --data")
    if args.val_data and not (args.data and args.algo in ("rm", "dpo")):
        raise UserError("--val-data needs --data and --algo rm or dpo (it holds out preference pairs)")
    if args.reward_model and args.algo in ("rm", "dpo"):
        raise UserError(f"--reward-model is for ppo, nft, rft and grpo, not --algo {args.algo}")
    if args.reward_model and args.reward:
        raise UserError("choose one of --reward and --reward-model")
    check_adapter_flags(args)
    return args


# ------------------------------------------------------------------------------------ shared plumbing

def load_init(args, device):
    """--init must be a policy of --task: SFT (or DFT, or another post-trained policy), not a base or a reward
    model. With --resume, OUT/ckpt (or None when OUT has none yet) too -> (init, resumed)."""
    task = None if args.allow_other_task else args.task
    ck = load_checkpoint(args.init, device, flag="--init", task=task)
    if ck.meta.get("kind") == "base":
        raise UserError(f"--init {args.init} is a base model (kind 'base'): fine-tune it first with "
                        f"python train_sft.py --init {args.init} --out out/sft")
    if ck.is_reward_model:
        raise UserError(f"--init {args.init} is a reward model; pass the SFT checkpoint (use it as --reward-model)")
    resumed = load_resumed(args.out, args.algo, device, args.task) if args.resume else None
    if resumed is not None and not same_tokenizer(resumed.tokenizer, ck.tokenizer):  # its reference is --init
        raise UserError(f"--resume: {resumed.path} has another tokenizer than --init {args.init} (a run from "
                        "another --init?)")
    return ck, resumed


def start(args, out, models, tokenizer, resumed, held=()):
    """A family's run (minipost/loop.py): AdamW over the trainable parameters of the trained models (one
    parameter group each, no weight decay); when resuming, the checkpoint's optimizer, RNG and step -> (Run,
    the family's own saved state or None). held: the other models the run keeps (reference, reward model),
    for the memory it reports."""
    opt = adamw([{"params": [p for p in m.parameters() if p.requires_grad]} for m in models], args.lr)
    meta = {"script": "train_rlhf.py", "kind": args.algo, "task": args.task, "args": vars(args),
            "init": str(args.init)}
    run, state = start_run(args, out, opt, tokenizer, resumed, [*models, *held], meta, desc=args.algo)
    print(f"trainable parameters: {run.trainable:,}" + (" (adapters)" if has_adapters(models[0]) else ""))
    return run, state


def warmup_lr(args, step):
    """Linear warm-up over --warmup steps, then constant --lr."""
    return args.lr * min(1.0, (step + 1) / args.warmup)


def frozen_copy(model):
    return copy.deepcopy(model).eval().requires_grad_(False)


def policy_and_reference(args, init, resumed, device):
    """The policy to train (the --init model, or the resumed one) and its frozen reference (the --init
    model). With --lora-r / --prompt-tuning only the adapters train, and the reference is the policy's own
    base with its adapters switched off (adapters.BaseView): no second copy of the weights."""
    base = merge_adapters(init.model).to(device)  # an adapter checkpoint as --init: its base + adapters, merged
    policy = adapt(resumed.model.to(device) if resumed is not None else base, args, args.init, args.seed)
    if has_adapters(policy):
        return policy.eval(), BaseView(policy)
    return policy.eval(), frozen_copy(base)


def scalar_model(model):
    """A copy of model's trunk with a fresh scalar head (reward model, PPO critic); dropout off."""
    out = GPT(GPTConfig(**{**model.config.to_dict(), "scalar_head": True, "dropout": 0.0}))
    missing, _ = out.load_state_dict(model.state_dict(), strict=False)
    assert sorted(missing) == ["score_head.bias", "score_head.weight"], missing
    return out


def preference_pairs(args, sft, tokenizer, task, out):
    """(train, held-out) pairs: --data, or the built-in pairs from the SFT model's samples (also written
    to OUT/pairs-train.jsonl and OUT/pairs-val.jsonl for inspection and reuse with --data)."""
    block = sft.config.block_size
    if args.data:
        pairs, _ = load_pairs(args.data, tokenizer, block)
        if args.val_data:  # e.g. a built-in run's pairs-train.jsonl / pairs-val.jsonl, reused as they were
            train, (val, _) = pairs, load_pairs(args.val_data, tokenizer, block, "--val-data")
        else:
            train, val = split_pairs(pairs, args.val_frac, args.seed)
        print(f"pairs: {len(train)} train, {len(val)} held out from {args.val_data or args.data}")
        return train, val
    reward = make_reward(task, tokenizer, next(sft.parameters()).device, args.reward)
    built = {}
    for split, n in (("train", args.n_prompts), ("test", args.n_eval)):
        t0 = time.time()
        rows, seed = task.prompts(split, n, seed=0), step_seed(args.seed, PAIRS_SEED_STEP[split])
        if args.pairs_from_demos:  # a task's demos and prompts of one split and seed are the same problems
            demos = [d["messages"][-1]["content"] for d in task.demos(split, n, seed=0)]
            pairs, records = demo_pairs(sft, tokenizer, reward, rows, demos, args.k, args.max_new_tokens, block,
                                        args.temperature, seed)
        else:
            pairs, records = build_pairs(sft, tokenizer, reward, rows, args.k, args.max_new_tokens, args.temperature,
                                         seed)
        out.mkdir(parents=True, exist_ok=True)
        if distributed.is_main():
            write_pairs(out / f"pairs-{'train' if split == 'train' else 'val'}.jsonl", records)
        print(f"pairs: {len(pairs)} from {n} {split} prompts x {args.k} samples ({time.time() - t0:.0f}s)")
        built[split] = pairs
    if len(built["train"]) < 1 or len(built["test"]) < 1:
        raise UserError("the SFT samples gave no preference pairs (all ties): raise --k or --n-prompts")
    return built["train"], built["test"]


def prompt_pool(args, tokenizer, task, block):
    """RL prompts: --data rows (those that leave room for a response) or the task's train prompts."""
    if not args.data:
        return task.prompts("train", args.n_prompts, seed=0)
    rows, _, _ = read_jsonl(args.data, expect=("prompt",))
    rows = [r for r, ids in zip(rows, prompt_ids(tokenizer, rows)) if len(ids) < block - 1]
    if not rows:
        raise UserError(f"--data {args.data}: every prompt fills the model's context ({block} tokens)")
    return rows


def policy_evaluation(args, policy, ref, tokenizer, task):
    """-> evaluate(step) -> metrics of a policy: the task's reward and format rate on each split (greedy or
    T = 1, as the task evaluates), and KL to the reference, entropy and task reward of its own test samples
    at --temperature."""
    splits = {s: task.prompts(s, args.n_eval, seed=0) for s in task.splits if s != "train"}

    def evaluate(step):
        result = {}
        for split, rows in splits.items():
            r = evaluate_policy(policy, tokenizer, task, rows, args.max_new_tokens, task.eval_temperature)
            result[f"{split}_reward"], result[f"{split}_format"] = r["reward"], r["format"]
        kl = sample_kl(policy, ref, tokenizer, splits["test"][:args.n_kl], args.max_new_tokens, args.temperature,
                       seed=step_seed(args.seed, EVAL_SEED_STEP), reward_fn=task.reward)
        result["test_kl"], result["test_entropy"] = kl["kl"], kl["entropy"]
        result["test_sample_reward"] = kl["reward"]  # the task's (ground-truth) reward of those same samples
        tqdm.write(f"step {step}: " + "  ".join(f"{k} {v:.3f}" for k, v in result.items()))
        return result
    return evaluate


# ------------------------------------------------------------------------------------ reward model

def train_reward_model(args, init, resumed, task, device, out):
    """Bradley-Terry on preference pairs: r(x, y) = score_head(hidden state at y's EOS) (rewards.eos_scores),
    L = -log sigmoid(r_chosen - r_rejected). The head starts at std 1/sqrt(C+1), bias 0; before every
    checkpoint the bias is shifted so that the SFT model's own samples score 0 on average."""
    tok = init.tokenizer
    train, val = preference_pairs(args, init.model, tok, task, out)
    prompts = list(dict.fromkeys(tuple(p) for p, _, _ in train))[:256]  # distinct prompts
    reference = reference_samples(init.model, tok, [list(p) for p in prompts], args.max_new_tokens,
                                  seed=step_seed(args.seed, REFERENCE_SEED_STEP))
    if resumed is not None:
        model = resumed.model
    else:
        torch.manual_seed(args.seed)
        model = scalar_model(merge_adapters(init.model))
    model = adapt(model.to(device), args, args.init, args.seed).eval()  # with adapters: LoRA + the new head train
    run, _ = start(args, out, [model], tok, resumed)
    trained = distributed.wrap(model)

    def scores(pairs, net=model):  # -> r_chosen (P,), r_rejected (P,)
        seqs = pair_sequences(pairs, tok.pad_id, device)
        r = eos_scores(net, seqs.ids, seqs.last + 1)  # (2P,)
        return r[:len(pairs)], r[len(pairs):]

    @torch.no_grad()
    def evaluate(step):  # each rank scores its share of the held-out pairs
        lo, hi = distributed.share(len(val))
        rc = rr = torch.zeros(0, device=device)
        for s in range(lo, hi, 64):
            c, r = scores(val[s:min(s + 64, hi)])
            rc, rr = torch.cat([rc, c]), torch.cat([rr, r])
        rc, rr = distributed.cat(rc), distributed.cat(rr)
        result = {"val_accuracy": pair_accuracy(rc, rr), "val_loss": losses.bradley_terry_loss(rc, rr).item()}
        tqdm.write(f"step {step}: held-out pair accuracy {result['val_accuracy']:.3f}")
        return result

    @torch.no_grad()
    def centre_bias():
        """Shift the bias so the SFT samples' mean reward is 0; the differences the loss sees are unchanged.
        Each rank scores its share of the samples, and every rank shifts its replica by the same mean."""
        lo, hi = distributed.share(len(reference))
        chunks = [reference[s:min(s + 64, hi)] for s in range(lo, hi, 64)]
        mean = distributed.cat(torch.cat([torch.zeros(0, device=device)] +
                                         [eos_scores(model, c.ids, c.last + 1) for c in chunks])).mean()
        model.score_head.bias -= mean
        return {"reward_bias": model.score_head.bias.item(), "centred_on": len(reference)}

    for step in training_steps(run, evaluate, partial(warmup_lr, args)):
        idx = epoch_indices(step, args.batch_size, len(train), args.seed)  # the global batch
        rc, rr = scores([train[i] for i in idx[slice(*distributed.share(len(idx)))]], trained)  # this rank's pairs
        # means over equal shares: this rank's part of the batch's mean is its own mean / W
        loss, grad_norm = optimizer_step(run, step, losses.bradley_terry_loss(rc, rr, args.center_coef) /
                                         distributed.world(), [model])
        rc, rr = distributed.cat(rc.detach()), distributed.cat(rr.detach())
        logs = {"loss": loss, "accuracy": pair_accuracy(rc, rr), "margin": (rc - rr).mean().item(),
                "grad_norm": grad_norm}
        end_step(run, step, logs, evaluate, model, save_meta=centre_bias)


# ------------------------------------------------------------------------------------ DPO

def train_dpo(args, init, resumed, task, device, out):
    """DPO / conservative DPO / IPO against the frozen --init model: h = [logp(y_w) - logp(y_l)] -
    [ref(y_w) - ref(y_l)] with SUMMED response log-probs (IPO: length-averaged). The reference's log-probs
    are computed once; chosen and rejected share one forward."""
    tok = init.tokenizer
    policy, ref = policy_and_reference(args, init, resumed, device)
    evaluate_policy_run = policy_evaluation(args, policy, ref, tok, task)
    train, val = preference_pairs(args, ref, tok, task, out)
    with torch.no_grad():
        ref_train = pair_logprob_sums(ref, train, tok.pad_id, device, args.ipo)  # (chosen (P,), rejected (P,))
        ref_val = pair_logprob_sums(ref, val, tok.pad_id, device, args.ipo)
    run, _ = start(args, out, [policy], tok, resumed, held=[ref])
    trained = distributed.wrap(policy)

    def preference_loss(pi_c, pi_r, ref_c, ref_r):  # -> loss, (implicit rewards of chosen, of rejected)
        if args.ipo:
            return losses.ipo_loss(pi_c, pi_r, ref_c, ref_r, args.beta)
        return losses.dpo_loss(pi_c, pi_r, ref_c, ref_r, args.beta, args.label_smoothing)

    @torch.no_grad()
    def evaluate(step):
        _, (rc, rr) = preference_loss(*pair_logprob_sums(policy, val, tok.pad_id, device, args.ipo), *ref_val)
        return {"val_accuracy": pair_accuracy(rc, rr), **evaluate_policy_run(step)}

    for step in training_steps(run, evaluate, partial(warmup_lr, args)):
        idx = epoch_indices(step, args.batch_size, len(train), args.seed)  # the global batch
        idx = idx[slice(*distributed.share(len(idx)))]  # this rank's pairs of it
        seqs = pair_sequences([train[i] for i in idx], tok.pad_id, device)  # P chosen rows, then P rejected
        logp, ent = sequence_logprobs(trained, seqs, entropy=True)  # (2P, T-1)
        pi_c, pi_r = pair_totals(logp, seqs.mask, args.ipo)  # (P,) each
        loss, (rc, rr) = preference_loss(pi_c, pi_r, ref_train[0][idx], ref_train[1][idx])
        # a mean over equal shares: this rank's part of the batch's mean is its own mean / W
        loss, grad_norm = optimizer_step(run, step, loss / distributed.world(), [policy])
        rc, rr, ent, mask = (distributed.cat(t.detach()) for t in (rc, rr, ent, seqs.mask))
        logs = {"loss": loss, "accuracy": pair_accuracy(rc, rr), "margin": (rc - rr).mean().item(),
                "chosen_reward": rc.mean().item(), "rejected_reward": rr.mean().item(),
                "entropy": losses.token_mean(ent, mask).item(), "grad_norm": grad_norm}
        end_step(run, step, logs, evaluate, policy)


# ------------------------------------------------------------------------------------ PPO

def train_ppo(args, init, resumed, task, device, out):
    """PPO-RLHF (lm-human-preferences; Huang et al. 2024). The critic is a separate GPT with a scalar head:
    a copy of the reward model when --reward-model is given, else the policy trunk with a zero head."""
    tok, temperature = init.tokenizer, args.temperature
    policy, ref = policy_and_reference(args, init, resumed, device)
    evaluate = policy_evaluation(args, policy, ref, tok, task)
    reward = make_reward(task, tok, device, args.reward, args.reward_model, other_task_ok=args.allow_other_task)
    pool = prompt_pool(args, tok, task, policy.config.block_size - policy.n_prefix)
    if reward.model is not None:
        critic = copy.deepcopy(reward.model).requires_grad_(True)
    else:
        critic = scalar_model(merge_adapters(init.model))
        torch.nn.init.zeros_(critic.score_head.weight)
    critic.to(device).eval()
    run, state = start(args, out, [policy, critic], tok, resumed,
                           held=[ref] + ([reward.model] if reward.model is not None else []))
    kl_coef = args.beta if state is None else state["kl_coef"]  # adapted with --target-kl
    if state is not None:
        critic.load_state_dict(state["critic"])
    trained, trained_critic = distributed.wrap(policy), distributed.wrap(critic)

    for step in training_steps(run, evaluate, partial(warmup_lr, args)):
        # rollout: one response per prompt; this rank samples rows lo..hi-1 of the global batch of N
        rows = [pool[i] for i in epoch_indices(step, args.batch_size, len(pool), args.seed)]
        N, (lo, hi) = len(rows), distributed.share(len(rows))
        r = sample_rollout(policy, tok, rows[lo:hi], 1, args.max_new_tokens, temperature,
                           step_seed(args.seed, step) + lo)
        seqs, mask = r.seqs, r.seqs.mask  # mask (N_rank, T-1)
        with torch.no_grad():
            # old log-probs: the sampler's own, at the sampling temperature (no second forward; equal to the
            # training model's teacher-forced ones up to float rounding: see Rollout.logprobs)
            old_logp, ent = r.logprobs, r.entropy  # (N, T-1)
            ref_logp = sequence_logprobs(ref, seqs, temperature)
            old_values = token_values(critic, seqs)  # (N, T-1)
            raw = r.score(reward, step + 1)  # (N,)
            rewards, score, kl = losses.ppo_token_rewards(raw, r.finished, old_logp, ref_logp, mask, seqs.last,
                                                          kl_coef)  # (N, T-1): -kl_coef k1, + score at the EOS
            adv, returns = losses.gae(rewards, old_values, mask, 1.0, args.gae_lambda)
            adv = losses.whiten(adv, mask, all_sum=distributed.all_sum)  # over the global batch
        # epochs x minibatches of the clipped policy loss + the clipped value loss (token means)
        minibatch_logs, norms = [], []
        for mb in minibatches(torch.arange(N, device=mask.device), lo, hi, args.minibatch_size, args.epochs,
                              step_seed(args.seed, step)):
            i = mb.rows
            logp = sequence_logprobs(trained, seqs[i], temperature)
            pg, clipfrac, approx_kl = losses.ppo_policy_loss(logp, old_logp[i], adv[i], mask[i], args.clip)
            vf = losses.ppo_value_loss(token_values(trained_critic, seqs[i]), old_values[i], returns[i], mask[i],
                                       args.clip)
            weight = mb.token_mean_weight(mask)
            norms.append(optimizer_step(run, step, (pg + args.vf_coef * vf) * weight, [policy, critic])[1])
            minibatch_logs.append(mb.combine([pg, vf, clipfrac, approx_kl], weight))
        raw, score, ent, mask, finished = (distributed.cat(t) for t in (raw, score, ent, mask, r.finished.float()))
        kl = distributed.cat(kl.sum(1))  # (N,) sequence KL
        seq_kl, used_coef = kl.mean().item(), kl_coef
        if args.target_kl:  # adaptive controller (Ziegler et al. 2019)
            e = min(max(seq_kl / args.target_kl - 1, -0.2), 0.2)
            kl_coef *= 1 + e * N / args.kl_horizon
        pg, vf, clipfrac, approx_kl = torch.tensor(minibatch_logs).mean(0).tolist()
        logs = {"loss": pg + args.vf_coef * vf, "reward": raw.mean().item(), "score": score.mean().item(),
                "kl": seq_kl, "entropy": losses.token_mean(ent, mask).item(), "pg_loss": pg, "value_loss": vf,
                "clipfrac": clipfrac, "approx_kl": approx_kl, "approx_kl_first": minibatch_logs[0][3], "kl_coef": used_coef,
                "finished": finished.mean().item(), "samples_used": N, "grad_norm": sum(norms) / len(norms)}
        end_step(run, step, logs, evaluate, policy,
                 save_state=lambda: {"critic": critic.state_dict(), "kl_coef": kl_coef})


# ------------------------------------------------------------------------------------ NFT, RFT, GRPO

def train_group(args, init, resumed, task, device, out):
    """K samples per prompt, then NFT, RFT or GRPO on the groups that carry signal.

    NFT / RFT: reward > 0.5 counts as correct; r_q = the group's accuracy clamped to [0.02, 0.98]; groups
    all right or all wrong are dropped; RFT also drops the wrong samples. GRPO: groups whose rewards are all
    equal are dropped; grpo_loss averages each sequence's tokens, then the sequences (DeepSeekMath);
    --dr-grpo divides advantages by nothing and the token sum by a constant. NFT and Dr.GRPO share that
    constant, C = minibatch-size x max-new-tokens, so at R = 1 they have the same gradient on every
    minibatch, a partial last one included. --epochs x minibatches of gradient steps per rollout batch:
    after the first, R = pi / pi_old != 1.
    """
    tok, temperature, K = init.tokenizer, args.temperature, args.k
    policy, ref = policy_and_reference(args, init, resumed, device)
    evaluate = policy_evaluation(args, policy, ref, tok, task)
    reward = make_reward(task, tok, device, args.reward, args.reward_model, other_task_ok=args.allow_other_task)
    pool = prompt_pool(args, tok, task, policy.config.block_size - policy.n_prefix)
    run, _ = start(args, out, [policy], tok, resumed,
                       held=[ref] + ([reward.model] if reward.model is not None else []))
    C = args.minibatch_size * args.max_new_tokens  # NFT's and Dr.GRPO's constant normaliser
    trained = distributed.wrap(policy)

    for step in training_steps(run, evaluate, partial(warmup_lr, args)):
        # rollout: K responses per prompt, prompt-major (row i answers prompt i // K); this rank samples the
        # whole groups of prompts lo..hi-1, rows lo*K..hi*K-1 of the global batch, so group statistics are local
        rows = [pool[i] for i in epoch_indices(step, args.batch_size, len(pool), args.seed)]
        lo, hi = distributed.share(len(rows))
        r = sample_rollout(policy, tok, rows[lo:hi], K, args.max_new_tokens, temperature,
                           step_seed(args.seed, step) + lo * K)
        seqs, mask = r.seqs, r.seqs.mask  # mask (N, T-1), N = G * K (this rank's)
        rewards = r.score(reward, step + 1).view(-1, K)  # (G, K)
        correct = (rewards > 0.5).view(-1)  # (N,)
        # which samples carry signal, and what each objective needs of its group
        if args.algo == "grpo":
            keep_group = rewards.max(1).values > rewards.min(1).values  # (G,)
            adv = losses.group_advantages(rewards, scale=not args.dr_grpo).view(-1)  # (N,)
            keep = keep_group.repeat_interleave(K)
        else:
            r_q = correct.view(-1, K).float().mean(1)  # (G,) group accuracy
            keep_group = (r_q > 0) & (r_q < 1)
            r_q = r_q.clamp(0.02, 0.98).repeat_interleave(K)  # (N,)
            keep = keep_group.repeat_interleave(K)
            if args.algo == "rft":
                keep &= correct  # rejection sampling: learn from the correct samples only
        old_logp, ent = r.logprobs, r.entropy  # (N, T-1): the sampler's, as in train_ppo (see Rollout.logprobs)
        with torch.no_grad():
            ref_logp = sequence_logprobs(ref, seqs, temperature)  # for the KL term and the logged KL
        idx = distributed.cat(keep.nonzero()[:, 0] + lo * K)  # global row numbers of every rank's kept samples
        used, norms = [], []
        for mb in minibatches(idx, lo * K, hi * K, args.minibatch_size, args.epochs, step_seed(args.seed, step)):
            i = mb.rows
            logp = sequence_logprobs(trained, seqs[i], temperature)
            if args.algo != "grpo":  # a token sum over a constant: this rank's rows give its part
                loss = losses.nft_loss(logp, old_logp[i], mask[i], correct[i], r_q[i], normaliser=C)
                weight = mb.sum_weight()
            elif args.dr_grpo:
                loss = losses.dr_grpo_loss(logp, old_logp[i], ref_logp[i], adv[i], mask[i], C, args.clip, args.kl_coef)
                weight = mb.sum_weight()
            else:  # a mean over the minibatch's sequences
                loss = losses.grpo_loss(logp, old_logp[i], ref_logp[i], adv[i], mask[i], args.clip, args.kl_coef)
                weight = mb.sequence_mean_weight()
            loss, grad_norm = optimizer_step(run, step, loss * weight, [policy])
            used.append(loss)
            norms.append(grad_norm)
        kl = ((old_logp - ref_logp) * mask).sum(1)  # (N,) sequence KL
        rewards, correct, kl, ent, mask, finished = (distributed.cat(t) for t in (rewards, correct.float(), kl, ent,
                                                                                  mask, r.finished.float()))
        logs = {"reward": rewards.mean().item(), "accuracy": correct.mean().item(), "kl": kl.mean().item(),
                "entropy": losses.token_mean(ent, mask).item(), "loss": sum(used) / len(used) if used else 0.0,
                "groups_filtered": int(distributed.all_sum((~keep_group).sum())), "samples_used": int(len(idx)),
                "finished": finished.mean().item(), "grad_norm": sum(norms) / len(norms) if norms else 0.0}
        end_step(run, step, logs, evaluate, policy)


# ------------------------------------------------------------------------------------ main

TRAIN = {"rm": train_reward_model, "dpo": train_dpo, "ppo": train_ppo, "nft": train_group, "rft": train_group,
         "grpo": train_group}


def main(argv=None):
    args = parse_args(argv)
    device = distributed.init(pick_device(args.device))
    distributed.check_divisible(args.batch_size, "--batch-size", what=" (pairs)" if args.algo in ("rm", "dpo")
                                else " (prompts)")
    out = Path(args.out)
    task = task_from_flag(args.task)
    init, resumed = load_init(args, device)
    writable_dir(out)  # before the work: DPO and rm sample their pairs first
    torch.manual_seed(args.seed)
    with autocast(device):  # rollouts, losses, rewards and evaluations alike (bf16 on CUDA, off on CPU)
        TRAIN[args.algo](args, init, resumed, task, device, out)
    print(f"done: checkpoint in {out / 'ckpt'}")


if __name__ == "__main__":
    run_main(main)
