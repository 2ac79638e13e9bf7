"""The engine as it was before the static-cache decode step (minipost/engine.py at commit e2c1613), kept as the
test oracle: the new engine must produce the same greedy tokens (tests/test_engine.py). Not used by minipost."""
import torch

from minipost.engine import Generation, sample_next


class KVCache:
    """Keys and values of every layer: k, v (L, B, Hkv, T_max, D), filled left to right. With grouped-query
    attention only the n_kv_head key/value heads are stored (query heads share them in attention).

    `length` slots are filled (the same for every row). The model calls update() and attn_mask() from each
    attention layer; the engine advances `length` after each forward.
    """

    decoding = False  # (added: the model asks the new cache whether it runs a fixed-shape decode step)

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
