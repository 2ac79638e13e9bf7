"""A minimal GPT in GPT-2's layout and parameter names, so GPT-2 checkpoints load key for key.

forward(idx) returns the final hidden states (B, T, C) after ln_f, not logits: every objective turns hidden
states into per-token log-probs through kernels.token_logprobs, which never builds the (B*T, V) logits.
The LM head is tied to wte. An optional scalar head (config.scalar_head) reads hidden states for reward
and value models.
"""
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels


@dataclass
class GPTConfig:
    block_size: int = 256  # longest sequence (learned position embeddings)
    vocab_size: int = 2048
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0  # residual and embedding dropout; always 0 in RL, DPO and reward models
    bias: bool = True  # GPT-2 uses biases in Linear layers and LayerNorms
    scalar_head: bool = False  # add score_head: hidden (C) -> one number, for reward / value models

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        config = cls(**d)
        config.check()
        return config

    def check(self):
        """ValueError unless a model can be built from these sizes: integers within SIZE_LIMITS (so that a
        malformed config fails here, not in an allocation of terabytes), whole heads, booleans as booleans."""
        for name, limit in SIZE_LIMITS.items():
            value = getattr(self, name)
            if type(value) is not int or not 1 <= value <= limit:
                raise ValueError(f"{name} must be an integer in 1..{limit}, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if type(self.dropout) not in (int, float) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        if type(self.bias) is not bool or type(self.scalar_head) is not bool:
            raise ValueError("bias and scalar_head must be true or false")


# far above GPT-2 XL (1024 positions, 50257 tokens, 48 layers, 25 heads, 1600 wide), far below what fails to allocate
SIZE_LIMITS = {"block_size": 2**17, "vocab_size": 2**20, "n_layer": 1024, "n_head": 1024, "n_embd": 2**15}


# vocab_size is set from the tokenizer; block_size may be overridden per run
PRESETS = {
    "micro": dict(n_layer=2, n_head=2, n_embd=64, block_size=128),  # ~0.2M: the CPU imitation study's student
    "mini": dict(n_layer=3, n_head=3, n_embd=96, block_size=128),  # ~0.4M: the imitation study's larger student
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, block_size=128),  # ~0.9M with a small vocab: the CPU default
    "small": dict(n_layer=6, n_head=6, n_embd=384, block_size=256),  # ~11M: a quick GPU run
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280, block_size=1024),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, block_size=1024),  # 1558M
}


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cache=None, layer=0):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        mask = None
        if cache is not None:
            # k, v become everything cached so far, this step included: (B, H, Tk, D) with Tk >= T
            k, v = cache.update(layer, k, v)
            mask = cache.attn_mask(T)  # None, or (B, 1, T, Tk) bool when rows hold padding
        if mask is None:
            y = kernels.attention(q, k, v, causal=True)  # (B, H, T, D)
        else:
            # padded generation batches need a key mask, which the fused kernel does not take
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))  # GPT-2's tanh GELU


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        if config.scalar_head:
            self.score_head = nn.Linear(config.n_embd, 1)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2: scale residual projections by depth
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if config.scalar_head:  # reward-model head init: std 1/sqrt(C+1), bias 0 (docs/algorithms.md)
            nn.init.normal_(self.score_head.weight, std=1 / math.sqrt(config.n_embd + 1))
            nn.init.zeros_(self.score_head.bias)
        # prompt tuning (minipost/adapters.py) sets these: N virtual token embeddings read before every input
        self.prompt_embeddings = None  # nn.Parameter (N, C) once attached
        self.prompt_on = True  # adapters.adapters_off switches the virtual tokens off
        self.adapter = None  # the adapter spec of an adapted model (adapters.attach)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self):
        """Parameter count, the tied head counted once, position embeddings included."""
        return sum(p.numel() for p in self.parameters())

    @property
    def n_prefix(self) -> int:
        """Virtual tokens read before every input (prompt tuning): they take positions 0..n-1."""
        return 0 if self.prompt_embeddings is None or not self.prompt_on else self.prompt_embeddings.shape[0]

    def forward(self, idx, pos=None, cache=None):
        """idx (B, T) token ids; pos (B, T) or (T,) positions, default 0..T-1 -> hidden states (B, T, C).

        With prompt tuning the n virtual tokens come first (at the prefill only, when a cache is used: they
        then stay in it) and the ids' positions are shifted by n; their hidden states are not returned."""
        B, T = idx.shape
        n = self.n_prefix
        if pos is None:
            pos = torch.arange(T, device=idx.device)
        pos = pos + n
        if int(pos.max()) >= self.config.block_size:
            raise ValueError(f"position {int(pos.max())} is past block_size={self.config.block_size}")
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)
        prefix = n > 0 and (cache is None or cache.length == 0)
        if prefix:
            virtual = self.prompt_embeddings + self.transformer.wpe.weight[:n]  # (n, C)
            x = torch.cat([virtual.to(x.dtype).expand(B, n, -1), x], dim=1)  # (B, n + T, C)
        x = self.transformer.drop(x)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, cache, layer)
        x = self.transformer.ln_f(x)
        return x[:, n:] if prefix else x

    def logits(self, hidden):
        """Full logits (..., V) in float32, for sampling one position at a time; training never calls this."""
        return hidden.float() @ self.lm_head.weight.float().T

    def scores(self, hidden):
        """Scalar head on every position: hidden (B, T, C) -> (B, T) float32."""
        return self.score_head(hidden).squeeze(-1).float()

    def teacher_forced_logprobs(self, inputs, targets, temperature=1.0, return_entropy=False):
        """Teacher-forced log-probs: inputs, targets (B, T) -> logp (B, T) float32 [, entropy (B, T)].

        logp[:, t] = log softmax(h_t W^T / temperature)[targets[:, t]] where h_t is the hidden state after
        inputs[:, :t+1]; usually targets = the inputs shifted left by one. Negative targets are ignored (0).
        """
        return self.head_logprobs(self(inputs), targets, temperature, return_entropy)

    def head_logprobs(self, hidden, targets, temperature=1.0, return_entropy=False):
        """The LM head's side of teacher_forced_logprobs: hidden (B, T, C) -> logp (B, T) [, entropy (B, T)].
        Separate so that a data-parallel wrapper (minipost/distributed.py) can supply the hidden states."""
        B, T, C = hidden.shape
        out = kernels.token_logprobs(hidden.reshape(B * T, C), self.lm_head.weight, targets.reshape(B * T),
                                     temperature, return_entropy)
        if return_entropy:
            return out[0].view(B, T), out[1].view(B, T)
        return out.view(B, T)
