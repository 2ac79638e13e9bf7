"""Cheap adaptation of a frozen GPT: LoRA (Hu et al. 2021) and prompt tuning (Lester et al. 2021).

    add_adapter_flags(parser)          --lora-r, --lora-alpha, --lora-dropout, --lora-targets, --prompt-tuning
    adapt(model, args, base_path)      freeze the base, attach the requested adapters -> trainable count
    adapters_off(model)                context manager: the base model's outputs, adapters switched off
    BaseView(model)                    the frozen reference of an adapted policy, without a second copy
    merge_adapters(model)              plain GPT with LoRA folded into the weights (for export)
    fingerprint(model)                 sha256 of the base tensors an adapter checkpoint belongs to

LoRA: each targeted nn.Linear y = x W^T + b becomes y = x W^T + b + (alpha / r) * dropout(x) A^T B^T with
A (r, in) random and B (out, r) = 0, so the adapted model starts exactly equal to the base; only A and B
train. The LoRA layer keeps the Linear's own weight and bias tensors, so parameter names (and GPT-2 export
after merging) are unchanged. Prompt tuning: N learned embeddings that the model reads before every input
(GPT.prompt_embeddings), initialised from N random token embeddings as Lester et al. do; everything else
is frozen. Dropout in a LoRA layer is active only in train mode (SFT); RL keeps models in eval mode.

A checkpoint of an adapted model (checkpoint.save_checkpoint) holds only the tensors the base lacks (the
adapters, and a reward model's scalar head) and meta["adapter"] = {"lora": {...} | None, "prompt_tuning": N,
"base": {"path", "fingerprint"}}: a small file, loaded on top of its base after the fingerprint is checked.
"""
import contextlib
import hashlib
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cli import UserError, require_numbers
from .model import GPT

LORA_TARGETS = ("c_attn", "c_proj", "c_fc")  # attention qkv, attention and MLP output, MLP input


class LoRALinear(nn.Linear):
    """An nn.Linear with the same weight and bias tensors plus a trainable low-rank update (see above)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float):
        nn.Module.__init__(self)  # not nn.Linear.__init__: the base's tensors are reused, not re-created
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=base.weight.device))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=base.weight.device))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.scale = alpha / r
        self.lora_dropout = nn.Dropout(dropout)
        self.enabled = True

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if not self.enabled:
            return y
        return y + (self.lora_dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scale  # (..., r) -> (..., out)


def add_adapter_flags(p):
    """The adapter flags every training script shares (train_sft.py, train_rlhf.py)."""
    p.add_argument("--lora-r", type=int, default=None, help="train LoRA adapters of this rank instead of the "
                   "whole model (base frozen; the checkpoint holds only the adapters)")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale numerator: updates are scaled by "
                   "alpha / r (default 2 r)")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA input (train mode only)")
    p.add_argument("--lora-targets", default=",".join(LORA_TARGETS), help="comma-separated Linear names to adapt "
                   "(every block's c_attn, c_proj, c_fc by default: the attention and MLP projections)")
    p.add_argument("--prompt-tuning", type=int, default=None, help="learn this many virtual token embeddings "
                   "read before every prompt, everything else frozen")


def check_adapter_flags(args, block_size=None):
    """One-line errors for the adapter flags (block_size: the model's context, once it is known)."""
    if args.lora_r is not None and args.lora_r < 1:
        raise UserError(f"--lora-r must be >= 1 (got {args.lora_r})")
    if args.prompt_tuning is not None and args.prompt_tuning < 1:
        raise UserError(f"--prompt-tuning must be >= 1 (got {args.prompt_tuning})")
    if args.lora_r and args.prompt_tuning:
        raise UserError("choose one of --lora-r and --prompt-tuning")
    require_numbers(args, lora_alpha="> 0", lora_dropout="in [0, 1)")
    targets = [t for t in args.lora_targets.split(",") if t.strip()]
    unknown = sorted(set(targets) - set(LORA_TARGETS))
    if unknown or not targets:
        raise UserError(f"--lora-targets: unknown module {', '.join(unknown) or '(none given)'}; choose from "
                        f"{', '.join(LORA_TARGETS)}")
    if block_size is not None and args.prompt_tuning and args.prompt_tuning >= block_size - 1:
        raise UserError(f"--prompt-tuning {args.prompt_tuning}: the model's context is {block_size} tokens; "
                        "the virtual tokens must leave room for a prompt and a response")


def has_adapters(model) -> bool:
    return getattr(model, "adapter", None) is not None


def adapt(model: GPT, args, base_path, seed: int = 0) -> GPT:
    """Freeze `model` and attach the adapters args asks for (a model loaded with adapters keeps its own).
    A scalar head, if any, stays trainable: a reward model's head is new. Returns the model."""
    if not has_adapters(model):
        if not (args.lora_r or args.prompt_tuning):
            return model  # full fine-tuning
        check_adapter_flags(args, model.config.block_size)
        spec = {"lora": None, "prompt_tuning": None,
                "base": {"path": str(Path(base_path).resolve()), "fingerprint": fingerprint(model)}}
        if args.lora_r:
            targets = [t for t in args.lora_targets.split(",") if t.strip()]
            spec["lora"] = {"r": args.lora_r, "alpha": args.lora_alpha or 2.0 * args.lora_r,
                            "dropout": args.lora_dropout, "targets": targets}
        else:
            spec["prompt_tuning"] = args.prompt_tuning
        with torch.random.fork_rng(devices=[]):  # the adapters' init is seeded; the run's own RNG is untouched
            torch.manual_seed(seed)
            attach(model, spec)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name or name == "prompt_embeddings" or name.startswith("score_head."))
    return model


def attach(model: GPT, spec: dict):
    """Add the adapters a spec describes (fresh values) to model, in place; model.adapter = spec."""
    if spec.get("lora"):
        lora = spec["lora"]
        for block in model.transformer.h:
            for parent in (block.attn, block.mlp):
                for name in lora["targets"]:
                    layer = getattr(parent, name, None)
                    if isinstance(layer, nn.Linear) and not isinstance(layer, LoRALinear):
                        setattr(parent, name, LoRALinear(layer, lora["r"], lora["alpha"], lora["dropout"]))
    if spec.get("prompt_tuning"):
        wte = model.transformer.wte.weight
        picks = torch.randint(0, wte.shape[0], (spec["prompt_tuning"],))  # Lester et al.: init from the vocabulary
        model.prompt_embeddings = nn.Parameter(wte.detach()[picks.to(wte.device)].clone())  # (N, C)
    model.adapter = spec


def adapter_keys(model) -> list[str]:
    """State-dict keys an adapter checkpoint saves: everything a plain model of the base's shape lacks."""
    return [k for k in model.state_dict() if "lora_" in k or k == "prompt_embeddings" or k.startswith("score_head.")]


def fingerprint(model) -> str:
    """sha256 over the base's tensors (name, shape and float32 bytes, adapters and scalar head excluded)."""
    h = hashlib.sha256()
    skip = set(adapter_keys(model))
    for name, t in sorted(model.state_dict().items()):
        if name in skip or (name == "lm_head.weight" and model.config.tie_embeddings):  # tied: wte counts it
            continue
        h.update(f"{name}{tuple(t.shape)}".encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@contextlib.contextmanager
def adapters_off(model):
    """Within the block, model computes its base outputs: LoRA updates and virtual tokens are skipped."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    prompt_was = getattr(model, "prompt_on", True)
    for m in layers:
        m.enabled = False
    model.prompt_on = False
    try:
        yield model
    finally:
        for m in layers:
            m.enabled = True
        model.prompt_on = prompt_was


class BaseView:
    """The base model under an adapted policy, for use as the frozen reference (DPO, PPO, GRPO, NFT, RFT):
    the policy's own tensors with its adapters switched off for every call, so no second copy of the
    weights exists. It offers what the engine and the log-prob code call on a model."""
    n_prefix = 0

    def __init__(self, model: GPT):
        self.model = model

    @property
    def config(self):
        return self.model.config

    @property
    def training(self):
        return self.model.training

    def parameters(self):
        return self.model.parameters()

    def eval(self):
        self.model.eval()
        return self

    def train(self, mode=True):
        self.model.train(mode)
        return self

    def __call__(self, *args, **kwargs):
        with adapters_off(self.model):
            return self.model(*args, **kwargs)

    def teacher_forced_logprobs(self, *args, **kwargs):
        with adapters_off(self.model):
            return self.model.teacher_forced_logprobs(*args, **kwargs)

    def logits(self, hidden):
        return self.model.logits(hidden)


def merge_adapters(model: GPT) -> GPT:
    """A plain GPT (no adapter modules) computing what `model` computes: W <- W + (alpha / r) B A for every
    LoRA layer. Prompt tuning cannot be folded into weights: a ValueError."""
    if not has_adapters(model):
        return model
    if model.adapter.get("prompt_tuning"):
        raise ValueError("a prompt-tuned model keeps its virtual tokens: it cannot be merged into plain weights")
    plain = GPT(model.config).to(model.transformer.wte.weight.device)
    state = {k: v for k, v in model.state_dict().items() if "lora_" not in k}
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, LoRALinear):
                delta = (m.lora_B.float() @ m.lora_A.float()) * m.scale  # (out, in)
                state[f"{name}.weight"] = (m.weight.float() + delta).to(m.weight.dtype)
    plain.load_state_dict(state)
    return plain
