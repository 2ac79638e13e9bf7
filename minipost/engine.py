"""Batched generation with a KV cache: the sampler behind RL rollouts, best-of-N and evaluation.

Prompts of different lengths are left-padded to one length P, so every row writes its next token into the
same cache slot; a key mask hides the padding and per-row positions count only real tokens, which makes
each row's result the same as generating it alone. N samples of one prompt share one prefill: the prompt's
cache is computed once and fanned out (repeat_interleave) before decoding. Rows that have finished (EOS) leave
the batch whenever a quarter of it has finished, so one long answer does not make every row keep decoding.
Each row's budget is its own: max_new_tokens, or fewer when its prompt leaves less room in the context, so a
long prompt elsewhere in the batch does not cut a row short.

Sampling is seeded per row: output row r (prompt r // N, sample r % N) draws its uniforms from its own CPU
generator seeded with seed + r (u_t for step t), so a row's tokens depend neither on the rest of the batch nor
on the device. A token is picked by inverse CDF (the first whose cumulative probability exceeds u_t), one
vectorised op for the whole batch instead of a torch.multinomial call per row.
"""
from dataclasses import dataclass

import torch


class KVCache:
    """Keys and values of every layer: k, v (L, B, Hkv, T_max, D), filled left to right. With grouped-query
    attention only the n_kv_head key/value heads are stored (query heads share them in attention).

    `length` slots are filled (the same for every row). The model calls update() and attn_mask() from each
    attention layer; the engine advances `length` after each forward.
    """

    def __init__(self, config, batch, max_len, device, dtype, key_valid=None):
        H, D = config.kv_heads, config.head_dim
        self.k = torch.zeros(config.n_layer, batch, H, max_len, D, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.length = 0
        self.key_valid = key_valid  # (B, T_max) bool, False on left padding; None when no row is padded

    def update(self, layer, k, v):
        """Store this step's k, v (B, Hkv, T, D) -> all keys and values so far, (B, Hkv, length + T, D)."""
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def attn_mask(self, T):
        """(B, 1, T, length + T) bool: causal and not padding; None if nothing is padded (then the fused
        causal kernel, aligned bottom-right, does the same job)."""
        if self.key_valid is None:
            return None
        end = self.length + T
        q_slot = torch.arange(self.length, end, device=self.k.device)[:, None]  # (T, 1)
        k_slot = torch.arange(end, device=self.k.device)[None, :]  # (1, end)
        causal = k_slot <= q_slot  # (T, end)
        mask = causal & self.key_valid[:, None, :end]  # (B, T, end)
        mask = mask | (k_slot == q_slot)  # a padding query sees itself, so its softmax is never empty (NaN)
        return mask[:, None]

    def select(self, rows):
        """Keep batch rows `rows` (an index tensor, repeats allowed): fanning a prefill out to n samples, or
        dropping finished rows."""
        self.k, self.v = self.k[:, rows], self.v[:, rows]
        if self.key_valid is not None:
            self.key_valid = self.key_valid[rows]


@dataclass
class Generation:
    """Sampled completions, right-padded. Row r belongs to prompt r // num_samples."""
    tokens: torch.Tensor  # (B, L) long, pad_id after the end
    logprobs: torch.Tensor  # (B, L) float32: log softmax(logits / T)[token] (T = 1 for greedy), 0 on padding
    mask: torch.Tensor  # (B, L) float32: 1 on generated tokens, the EOS included
    finished: torch.Tensor  # (B,) bool: the row produced EOS within the budget

    def completions(self) -> list[list[int]]:
        return [row[: int(m.sum())].tolist() for row, m in zip(self.tokens, self.mask)]


def filter_logits(logits, top_k=None, top_p=None):
    """Keep the top_k largest logits and the smallest set whose probability reaches top_p; -inf elsewhere.
    logits (B, V) float32."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens strictly before it already reach top_p (the first is always kept)
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits, uniforms=None, temperature=1.0, top_k=None, top_p=None):
    """Pick one token per row -> (tokens (B,), logprobs (B,)). logits (B, V) float32, raw; uniforms (B,) in
    [0, 1), one per row (unused when greedy).

    The returned log-prob is under softmax(logits / temperature) before top-k / top-p, the distribution the
    trainers recompute; greedy (temperature 0) reports it at temperature 1.
    """
    if temperature == 0:
        tokens = logits.argmax(dim=-1)
        logprobs = torch.log_softmax(logits, dim=-1)
    else:
        scaled = logits / temperature
        logprobs = torch.log_softmax(scaled, dim=-1)  # (B, V)
        probs = torch.softmax(filter_logits(scaled, top_k, top_p), dim=-1).double()  # (B, V)
        cdf = probs.cumsum(dim=-1)  # (B, V), float64 so that u resolves even tiny probabilities
        # right=True: the first token whose cdf exceeds u * total; a zero-probability token (a flat step of
        # the cdf) can never be that token
        target = uniforms.to(cdf.device, torch.float64)[:, None] * cdf[:, -1:]  # (B, 1)
        tokens = torch.searchsorted(cdf, target, right=True)[:, 0]
        last = probs.shape[-1] - 1 - (probs.flip(-1) > 0).int().argmax(dim=-1)  # (B,) last token with p > 0
        tokens = torch.minimum(tokens, last)  # u * total rounding up to total (a 2^-53 event)
    return tokens, logprobs.gather(1, tokens[:, None])[:, 0]


@torch.no_grad()
def generate(model, prompts: list[list[int]], max_new_tokens: int, eos_id: int, pad_id: int,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             num_samples: int = 1, seed: int = 0) -> Generation:
    """Sample up to max_new_tokens after each prompt, num_samples times per prompt; rows stop at EOS."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    device = next(model.parameters()).device
    config = model.config
    n = model.n_prefix  # virtual tokens a prompt-tuned model reads first: they fill the cache's first slots
    P = max(len(p) for p in prompts)
    if min(max_new_tokens, config.block_size - n - P) < 1:
        raise ValueError(f"generate: a prompt of {P} tokens (+ {n} virtual) leaves no room in "
                         f"block_size={config.block_size}")

    # every output row's budget: max_new_tokens, within the positions its own prompt leaves (B,)
    budget = torch.tensor([min(max_new_tokens, config.block_size - n - len(p)) for p in prompts], device=device)
    budget = budget.repeat_interleave(num_samples)
    max_new_tokens = int(budget.max())

    # left-pad the prompts to P; positions count real tokens only
    B0 = len(prompts)
    ids = torch.full((B0, P), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
    valid = torch.arange(P)[None, :] >= torch.tensor([P - len(p) for p in prompts])[:, None]  # (B0, P)
    padded = not bool(valid.all())
    pos = (valid.long().cumsum(dim=1) - 1).clamp(min=0)  # (B0, P)
    key_valid = None
    if padded:  # virtual tokens and the slots after the prompt are always real
        key_valid = torch.ones(B0, n + P + max_new_tokens, dtype=torch.bool, device=device)
        key_valid[:, n:n + P] = valid

    dtype = next(model.parameters()).dtype
    if torch.is_autocast_enabled(device.type):  # keys and values arrive in the autocast dtype: store them so
        dtype = torch.get_autocast_dtype(device.type)
    cache = KVCache(config, B0, n + P + max_new_tokens, device, dtype, key_valid)
    hidden = model(ids.to(device), pos.to(device), cache)  # (B0, P, C): one prefill per prompt
    cache.length = n + P
    cache.select(torch.arange(B0, device=device).repeat_interleave(num_samples))  # one prefill, n continuations
    logits = model.logits(hidden[:, -1]).repeat_interleave(num_samples, dim=0)  # (B, V) float32
    next_pos = (pos[:, -1] + 1).repeat_interleave(num_samples).to(device)  # (B,)

    B = B0 * num_samples
    uniforms = None  # (B, max_new_tokens): row r's stream, from a CPU generator seeded with seed + r
    if temperature != 0:
        uniforms = torch.stack([torch.rand(max_new_tokens, dtype=torch.float64,
                                           generator=torch.Generator().manual_seed(seed + r)) for r in range(B)])
        uniforms = uniforms.to(device)
    tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(B, max_new_tokens, device=device)
    mask = torch.zeros(B, max_new_tokens, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    stopped = torch.zeros(B, dtype=torch.bool, device=device)  # finished, or out of budget
    live = torch.arange(B, device=device)  # (b,): the output row of each row still in the batch
    for t in range(max_new_tokens):
        tok, lp = sample_next(logits, None if uniforms is None else uniforms[live, t], temperature, top_k, top_p)
        alive = ~stopped[live]  # (b,): a row that stopped earlier may still sit in the batch; ignore it
        rows = live[alive]
        tokens[rows, t], logprobs[rows, t], mask[rows, t] = tok[alive], lp[alive], 1.0
        finished[rows] = tok[alive] == eos_id
        stopped[rows] = finished[rows] | (budget[rows] <= t + 1)
        going = ~stopped[live]  # (b,)
        n_going = int(going.sum())
        if n_going == 0 or t == max_new_tokens - 1:
            break
        if n_going <= 0.75 * len(live):  # drop the stopped rows (a cache copy, so not at every step)
            keep = going.nonzero()[:, 0]
            cache.select(keep)
            live, tok, next_pos = live[keep], tok[keep], next_pos[keep]
        # a stopped row may sit in the batch until the next drop, its output ignored: keep its position valid
        hidden = model(tok[:, None], next_pos.clamp(max=config.block_size - n - 1)[:, None], cache)  # (b, 1, C)
        cache.length += 1
        next_pos += 1
        logits = model.logits(hidden[:, -1])
    L = int(mask.sum(dim=1).max())
    return Generation(tokens[:, :L], logprobs[:, :L], mask[:, :L], finished)
