"""A minimal GPT: GPT-2's layout by default, and today's small open models' block (RMSNorm, rotary positions,
SwiGLU, grouped-query attention, Qwen2's q/k/v biases, an untied head) as options of the same model.

forward(idx) returns the final hidden states (B, T, C) after ln_f, not logits: every objective turns hidden
states into per-token log-probs through kernels.token_logprobs, which never builds the (B*T, V) logits.
An optional scalar head (config.scalar_head) reads hidden states for reward and value models.

Parameter names are GPT-2's in every layout, so GPT-2 checkpoints load key for key and LoRA's targets
(c_attn, c_proj, c_fc) mean the same thing everywhere:
    transformer.wte               token embeddings (V, C)
    transformer.wpe               learned positions (block_size, C); absent with rotary positions
    transformer.h.N.ln_1 / ln_2   the norms before attention / the MLP (LayerNorm, or RMSNorm: weight only)
    transformer.h.N.attn.c_attn   q, k, v projections stacked by rows: [q (H*D); k (Hkv*D); v (Hkv*D)], C in
    transformer.h.N.attn.c_proj   attention output (C, H*D)
    transformer.h.N.mlp.c_fc      MLP input: (4C, C) GELU; SwiGLU: gate and up stacked by rows [gate (F); up (F)]
    transformer.h.N.mlp.c_proj    MLP output (C, F)
    transformer.ln_f              final norm
    lm_head                       (V, C), the same tensor as wte unless tie_embeddings is false
minipost/hf.py maps Hugging Face's Llama / Qwen2 / Mistral names onto these and back.
"""
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from minipost import kernels


@dataclass
class GPTConfig:
    block_size: int = 256  # longest sequence: rows of wpe; with rotary positions only a limit
    vocab_size: int = 2048
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0  # residual and embedding dropout; always 0 in RL, DPO and reward models
    bias: bool = True  # GPT-2 uses biases in Linear layers and LayerNorms
    scalar_head: bool = False  # add score_head: hidden (C) -> one number, for reward / value models
    # the Llama-style options; every default is GPT-2's
    norm: str = "layernorm"  # "layernorm" (GPT-2) or "rmsnorm" (Llama, Qwen2, Mistral: x / rms(x) * weight)
    norm_eps: float = 1e-5
    pos: str = "learned"  # "learned": wpe, one row per position (GPT-2); "rope": rotary positions on q and k
    rope_theta: float = 10000.0  # rotary base: pair i turns by pos * theta^(-2i/D)
    rope_scaling: dict | None = None  # {"type": "linear" | "llama3", "factor", ...}: see rope_frequencies
    mlp: str = "gelu"  # "gelu": c_proj(gelu_tanh(c_fc x)) (GPT-2); "swiglu": c_proj(silu(gate) * up)
    mlp_hidden: int | None = None  # MLP width F; None: 4 * n_embd
    n_kv_head: int | None = None  # key/value heads, dividing n_head (grouped-query attention); None: n_head
    qkv_bias: bool = False  # a bias on c_attn even when bias is false (Qwen2)
    tie_embeddings: bool = True  # lm_head is wte (GPT-2, SmolLM2, Qwen2.5-0.5B) or its own matrix

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def hidden(self) -> int:
        return self.mlp_hidden or 4 * self.n_embd

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
        for name in ("bias", "scalar_head", "qkv_bias", "tie_embeddings"):
            if type(getattr(self, name)) is not bool:
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name, limit in (("mlp_hidden", SIZE_LIMITS["n_embd"] * 8), ("n_kv_head", SIZE_LIMITS["n_head"])):
            value = getattr(self, name)
            if value is not None and (type(value) is not int or not 1 <= value <= limit):
                raise ValueError(f"{name} must be null or an integer in 1..{limit}, got {value!r}")
        if self.n_head % self.kv_heads:
            raise ValueError(f"n_head {self.n_head} is not a multiple of n_kv_head {self.kv_heads}")
        for name, choices in (("norm", ("layernorm", "rmsnorm")), ("pos", ("learned", "rope")),
                              ("mlp", ("gelu", "swiglu"))):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        for name in ("norm_eps", "rope_theta"):
            value = getattr(self, name)
            if type(value) not in (int, float) or not 0 < value < math.inf:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if self.pos == "rope" and self.head_dim % 2:
            raise ValueError(f"rotary positions need an even head dim, got {self.head_dim}")
        check_rope_scaling(self.rope_scaling)


# rope_scaling types and the numbers each needs (Hugging Face's names)
ROPE_SCALING = {"linear": ("factor",),
                "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def check_rope_scaling(s):
    if s is None:
        return
    if not isinstance(s, dict) or s.get("type") not in ROPE_SCALING:
        raise ValueError(f"rope_scaling must be null or {{'type': one of {', '.join(ROPE_SCALING)}, ...}}, got {s!r}")
    want = {"type", *ROPE_SCALING[s["type"]]}
    if set(s) != want or not all(type(s[k]) in (int, float) and 0 < s[k] < math.inf for k in want - {"type"}):
        raise ValueError(f"rope_scaling {s['type']} needs exactly the positive numbers {sorted(want - {'type'})}, "
                         f"got {s!r}")
    if s["type"] == "llama3" and not s["high_freq_factor"] > s["low_freq_factor"]:
        raise ValueError(f"rope_scaling llama3 needs high_freq_factor > low_freq_factor, got {s!r}")


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


def rope_frequencies(config: GPTConfig, device=None) -> torch.Tensor:
    """Rotary angular speeds (D/2,) float32: pair i of a head turns by pos * inv_freq[i].

    inv_freq[i] = theta^(-2i/D), as Hugging Face computes it in float32. rope_scaling stretches it for long
    contexts: "linear" divides every speed by factor; "llama3" (Llama 3.1 / 3.2) divides the slow pairs
    (wavelength 2 pi / inv_freq above original_max_position_embeddings / low_freq_factor) by factor, keeps
    the fast ones (below original / high_freq_factor), and blends linearly in 1 / wavelength between.
    """
    D = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, D, 2, device=device).float() / D)  # (D/2,)
    s = config.rope_scaling
    if s is None:
        return inv_freq
    if s["type"] == "linear":
        return inv_freq / s["factor"]
    # smooth = 0: slowed by factor; 1: kept; the clamp puts every pair outside the blend band at one end
    waves = s["original_max_position_embeddings"] * inv_freq / (2 * math.pi)  # how often pair i turns in the context
    smooth = ((waves - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])).clamp(0, 1)
    return (1 - smooth) * inv_freq / s["factor"] + smooth * inv_freq


def apply_rope(x, cos, sin):
    """Rotate x (B, T, H, D) by its positions; cos, sin (B, T, 1, D/2). Hugging Face's "rotate half" layout:
    feature i pairs with feature i + D/2 (not 2i with 2i+1), so HF q/k weights are used as they are."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, T, H, D/2) each
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def make_norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        qkv = (config.n_head + 2 * config.kv_heads) * config.head_dim  # 3C without grouped-query attention
        self.c_attn = nn.Linear(config.n_embd, qkv, bias=config.bias or config.qkv_bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope=None, cache=None, layer=0):
        B, T, C = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.c_attn(x).split([H * D, Hkv * D, Hkv * D], dim=2)
        q, k, v = q.view(B, T, H, D), k.view(B, T, Hkv, D), v.view(B, T, Hkv, D)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # q (B, H, T, D); k, v (B, Hkv, T, D)
        mask = None
        if cache is not None:
            # k, v become the cache's keys and values, this step's included: (B, Hkv, Tk, D) with Tk >= T
            k, v = cache.update(layer, k, v)
            mask = cache.attn_mask(T)  # None, or (B, 1, T, Tk) bool: padding, and slots not written yet
        if mask is None:
            y = kernels.attention(q, k, v, causal=True)  # (B, H, T, D); query head h reads kv head h // (H / Hkv)
        else:
            # padded generation batches need a key mask, which the fused kernel does not take
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=Hkv != H)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        width = 2 * config.hidden if self.swiglu else config.hidden  # SwiGLU: gate and up in one matmul
        self.c_fc = nn.Linear(config.n_embd, width, bias=config.bias)
        self.c_proj = nn.Linear(config.hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.c_fc(x)  # (B, T, F) or, SwiGLU, (B, T, 2F)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up  # (B, T, F)
        else:
            h = F.gelu(h, approximate="tanh")  # GPT-2's tanh GELU
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, rope=None, cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), rope, cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        modules = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if config.pos == "learned":
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        self.transformer = nn.ModuleDict(dict(
            **modules,
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=make_norm(config),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
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
        """Parameter count, a tied head counted once, position embeddings included."""
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
        learned = self.config.pos == "learned"
        if pos is None:
            pos = torch.arange(T, device=idx.device)
        pos = pos.expand(B, T) + n  # (B, T)
        # (a decode step's positions are the engine's own, kept in range; checking them would sync the GPU)
        if (cache is None or not cache.decoding) and int(pos.max()) >= self.config.block_size:
            raise ValueError(f"position {int(pos.max())} is past block_size={self.config.block_size}")
        x = self.transformer.wte(idx)  # (B, T, C)
        if learned:
            x = x + self.transformer.wpe(pos)
        prefix = n > 0 and (cache is None or cache.length == 0)
        if prefix:
            virtual = self.prompt_embeddings  # (n, C)
            if learned:
                virtual = virtual + self.transformer.wpe.weight[:n]
            x = torch.cat([virtual.to(x.dtype).expand(B, n, -1), x], dim=1)  # (B, n + T, C)
            pos = torch.cat([torch.arange(n, device=pos.device).expand(B, n), pos], dim=1)  # (B, n + T)
        rope = None
        if not learned:  # one (cos, sin) table for every layer
            angles = pos.float()[..., None] * rope_frequencies(self.config, pos.device)  # (B, T', D/2)
            rope = (angles.cos()[:, :, None], angles.sin()[:, :, None])  # (B, T', 1, D/2) each
        x = self.transformer.drop(x)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, rope, cache, layer)
        x = self.transformer.ln_f(x)
        return x[:, n:] if prefix else x

    def logits(self, hidden):
        """Full logits (..., V) in float32, for sampling one position at a time; training never calls this.
        Under autocast the operands are rounded as kernels.token_logprobs rounds them, so that sampling draws
        from the distribution whose log-probs the objectives then score."""
        hidden, weight = kernels.autocast_inputs(hidden, self.lm_head.weight)
        with kernels.autocast_off(hidden.device.type):
            return hidden.float() @ weight.float().T

    def scores(self, hidden):
        """Scalar head on every position: hidden (B, T, C) -> (B, T) float32, computed in float32 even under
        autocast (C flops a token: rewards and values keep full precision for free)."""
        head = self.score_head
        with kernels.autocast_off(hidden.device.type):
            return F.linear(hidden.float(), head.weight.float(), head.bias.float()).squeeze(-1)

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
