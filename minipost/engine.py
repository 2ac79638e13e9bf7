"""Batched generation with a KV cache: the sampler behind RL rollouts, best-of-N and evaluation.

Prompts of different lengths are left-padded to one length P, so every row writes its next token into the
same cache slot; a key mask hides the padding and per-row positions count only real tokens, which makes
each row's result the same as generating it alone. N samples of one prompt share one prefill: the prompt's
cache is computed once and fanned out (repeat_interleave) before decoding. Rows that have finished (EOS) leave
the batch (DecodeStep.batch_size says when), so one long answer does not make every row keep decoding.
Each row's budget is its own: max_new_tokens, or fewer when its prompt leaves less room in the context, so a
long prompt elsewhere in the batch does not cut a row short.

Decoding is one step at fixed shapes (DecodeStep): the cache is allocated once per call at its final size
(KVCache), each step writes one slot of it in place and reads it under a mask, and finished rows are
compacted into the front of the same buffers. That is what lets CUDA capture the step once per batch size as
a graph and replay it (gpt-fast's static cache, nano-vLLM's graph per batch size); on CPU it runs eagerly and
computes exactly what it did before it had fixed shapes (tests/test_engine.py checks it bit for bit).

Sampling is seeded per row: output row r (prompt r // N, sample r % N) draws its uniforms from its own CPU
generator seeded with seed + r (u_t for step t), so a row's tokens depend neither on the rest of the batch nor
on the device. A token is picked by inverse CDF (the first whose cumulative probability exceeds u_t), one
vectorised op for the whole batch instead of a torch.multinomial call per row.
"""
import os
from dataclasses import dataclass

import torch


class KVCache:
    """Keys and values of every layer at their final size, allocated once per generate call:
    k, v (L, B, Hkv, T_max, D) for the largest batch B and the longest row T_max. With grouped-query attention
    only the n_kv_head key/value heads are stored (query heads share them in attention).

    Prefill: the model writes the prompts' T slots after the `length` filled ones and attends over them.
    Decode (`decoding`, set by DecodeStep): the step runs on the first `rows` batch rows; each row writes its one
    new key and value in place at slot `slot` -- a (1,) tensor, the same slot for every row since prompts are
    left-padded to one length, kept in a tensor so that a captured CUDA graph reads the step's value (an eager
    step writes slot keys - 1, the same number) -- and attention reads `keys` slots under a (rows, keys)
    validity mask: not padding, and written already.
    """

    def __init__(self, config, batch, max_len, device, dtype, key_valid=None):
        H, D = config.kv_heads, config.head_dim
        self.k = torch.zeros(config.n_layer, batch, H, max_len, D, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.length = 0  # slots filled by the prefill
        self.key_valid = key_valid  # (B, T_max) bool, False on left padding; None when no row is padded
        self.decoding = False
        self.graphed = False  # set by DecodeStep: its steps are captured as CUDA graphs
        self.rows, self.keys = batch, max_len
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.step_mask = None  # (rows, 1, 1, keys) bool, one per decode step

    def update(self, layer, k, v):
        """Store this step's k, v (b, Hkv, T, D) -> the keys and values attention reads, (b, Hkv, Tk, D)."""
        b = k.shape[0]
        if self.decoding and self.graphed:  # a captured step: the slot from its tensor, which each replay reads
            self.k[layer, :b].index_copy_(2, self.slot, k)
            self.v[layer, :b].index_copy_(2, self.slot, v)
            end = self.keys
        else:  # the prefill after the `length` filled slots, or an eager decode step at slot keys - 1: a plain
            start = self.keys - 1 if self.decoding else self.length  # copy (index_copy_ took 6% of a CPU rollout)
            end = start + k.shape[2]
            self.k[layer, :b, :, start:end] = k
            self.v[layer, :b, :, start:end] = v
        return self.k[layer, :b, :, :end], self.v[layer, :b, :, :end]

    def attn_mask(self, T):
        """Decode: the step's (b, 1, 1, keys) mask. Prefill: (B, 1, T, length + T) bool, causal and not padding;
        None if nothing is padded (then the fused causal kernel, aligned bottom-right, does the same job)."""
        if self.decoding:
            return self.step_mask
        if self.key_valid is None:
            return None
        end = self.length + T
        q_slot = torch.arange(self.length, end, device=self.k.device)[:, None]  # (T, 1)
        k_slot = torch.arange(end, device=self.k.device)[None, :]  # (1, end)
        causal = k_slot <= q_slot  # (T, end)
        mask = causal & self.key_valid[:self.rows, None, :end]  # (B, T, end)
        mask = mask | (k_slot == q_slot)  # a padding query sees itself, so its softmax is never empty (NaN)
        return mask[:, None]

    def start_decoding(self, batch):
        """After the prefill: every key slot from here on is real; the first decode slot is `length`."""
        if self.key_valid is None:
            self.key_valid = torch.ones(self.k.shape[1], self.k.shape[3], dtype=torch.bool, device=self.k.device)
        self.slot.fill_(self.length)
        self.slots = torch.arange(self.k.shape[3], device=self.k.device)  # (T_max,)
        self.decoding, self.rows = True, batch

    def set_step_mask(self):
        """The step's mask from the tensor slot, so that it too can be captured: (rows, 1, 1, keys)."""
        valid = self.key_valid[:self.rows, :self.keys] & (self.slots[:self.keys] <= self.slot)
        self.step_mask = valid[:, None, None]

    def move(self, rows):
        """Batch rows `rows` (an index tensor, repeats allowed) become the first len(rows) rows: fanning the
        prefill out to n samples a prompt, or compacting the rows still going into a smaller bucket. The cache
        stays where it is, so a captured step keeps reading it; the rows after them are stale, and ignored."""
        m = len(rows)
        self.k[:, :m] = self.k[:, rows]  # the right side is a gathered copy, so overlapping rows are safe
        self.v[:, :m] = self.v[:, rows]
        if self.key_valid is not None:
            self.key_valid[:m] = self.key_valid[rows]


class DecodeStep:
    """One decode step at fixed shapes: the tokens in `tok` at the positions in `pos` (static (B,) buffers) ->
    logits (b, V) float32 of the first b batch rows, b one of the batch buckets. The step writes the cache in
    place and reads it under a mask (KVCache), so nothing in it allocates a cache, branches on data in Python
    or changes shape from one step to the next.

    On CUDA each bucket's step is captured once as a CUDA graph and then replayed: one launch instead of a
    few hundred kernel launches and their Python, which is where a small batch's decode time goes. On CPU it
    runs eagerly, reading only the `length + 1` slots written so far (a CPU pays for every key it reads; a
    graph needs the fixed size).
    """

    def __init__(self, model, cache, batch, device):
        self.model, self.cache = model, cache
        self.tok = torch.zeros(batch, dtype=torch.long, device=device)
        self.pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.max_pos = model.config.block_size - model.n_prefix - 1  # a stopped row's position stays valid
        graphs = device.type == "cuda" and os.environ.get("MINIPOST_CUDA_GRAPHS", "1") != "0"  # 0: eager, to compare
        self.graphs = {} if graphs else None  # bucket b -> (graph, its static logits)
        cache.graphed = graphs
        self.sizes = buckets(batch)

    def batch_size(self, b, going):
        """The batch size the next steps run at when `going` rows of the step's b still go. CUDA: the smallest
        bucket that holds them (a graph is captured per bucket). CPU: the going rows exactly, once a quarter
        of the batch has stopped -- a cache copy at every step would cost more than it saves; and this is the
        rule the engine had before, which keeps CPU outputs bit-identical to it (a CPU matmul can round a row
        differently at another batch size)."""
        if self.graphs is not None:
            return min(s for s in self.sizes if s >= going)
        return going if going <= 0.75 * b else b

    def eager(self, b):
        self.cache.rows = b
        self.cache.set_step_mask()
        hidden = self.model(self.tok[:b, None], self.pos[:b, None].clamp(max=self.max_pos), self.cache)  # (b, 1, C)
        return self.model.logits(hidden[:, 0])

    def __call__(self, b, filled):
        if self.graphs is None:
            self.cache.keys = filled + 1
            return self.eager(b)
        if b not in self.graphs:
            self.graphs[b] = self.capture(b)
        graph, logits = self.graphs[b]
        graph.replay()  # reads tok, pos, the slot and the cache where they are; writes logits and the cache
        return logits

    def capture(self, b):
        """Record bucket b's step as a CUDA graph. It first runs twice on a side stream, so that lazy set-up
        (cuBLAS workspaces, kernel selection) happens outside the capture; those runs write the same keys and
        values into the same slot as the replay will, so they change nothing. Autocast's cache of cast weights
        is off: a graph must not read casts made outside it."""
        autocast = torch.is_autocast_enabled("cuda")
        context = lambda: torch.autocast("cuda", torch.get_autocast_dtype("cuda"), enabled=autocast,  # noqa: E731
                                         cache_enabled=False)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), context():
            for _ in range(2):
                self.eager(b)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), context():
            logits = self.eager(b)
        return graph, logits


def buckets(batch):
    """The batch sizes a decode step runs at: the full batch, then the powers of two below it."""
    return [batch] + [2 ** i for i in reversed(range(batch.bit_length())) if 2 ** i < batch]


@dataclass
class Generation:
    """Sampled completions, right-padded. Row r belongs to prompt r // num_samples."""
    tokens: torch.Tensor  # (B, L) long, pad_id after the end
    logprobs: torch.Tensor  # (B, L) float32: log softmax(logits / T)[token] (T = 1 for greedy), 0 on padding
    mask: torch.Tensor  # (B, L) float32: 1 on generated tokens, the EOS included
    finished: torch.Tensor  # (B,) bool: the row produced EOS within the budget
    entropy: torch.Tensor | None = None  # (B, L) float32: entropy of the distribution of logprobs, 0 on padding

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


def sample_next(logits, uniforms=None, temperature=1.0, top_k=None, top_p=None, return_entropy=False):
    """Pick one token per row -> (tokens (B,), logprobs (B,)) [, entropy (B,)]. logits (B, V) float32, raw;
    uniforms (B,) in [0, 1), one per row (unused when greedy).

    The returned log-prob (and entropy) is under softmax(logits / temperature) before top-k / top-p, the
    distribution the trainers score; greedy (temperature 0) reports it at temperature 1.
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
    picked = logprobs.gather(1, tokens[:, None])[:, 0]
    if return_entropy:
        return tokens, picked, -(logprobs.exp() * logprobs).sum(dim=-1)
    return tokens, picked


def left_pad(prompts, pad_id):
    """Prompts left-padded to the longest, P -> ids (B0, P) long, valid (B0, P) bool (False on padding), and
    positions (B0, P) that count real tokens only (0 on the padding)."""
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
    valid = torch.arange(P)[None, :] >= torch.tensor([P - len(p) for p in prompts])[:, None]
    return ids, valid, (valid.long().cumsum(dim=1) - 1).clamp(min=0)


def row_uniforms(rows, steps, seed):
    """(rows, steps) float64 uniforms on the CPU: row r's stream from its own generator seeded with seed + r."""
    return torch.stack([torch.rand(steps, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + r))
                        for r in range(rows)])


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

    B0, B = len(prompts), len(prompts) * num_samples
    ids, valid, pos = left_pad(prompts, pad_id)  # (B0, P) each
    key_valid = None
    if not bool(valid.all()):  # virtual tokens and the slots after the prompt are always real
        key_valid = torch.ones(B, n + P + max_new_tokens, dtype=torch.bool, device=device)
        key_valid[:B0, n:n + P] = valid

    dtype = next(model.parameters()).dtype
    if torch.is_autocast_enabled(device.type):  # keys and values arrive in the autocast dtype: store them so
        dtype = torch.get_autocast_dtype(device.type)
    # the static cache: B rows (the largest bucket) x every slot any row will fill
    cache = KVCache(config, B, n + P + max_new_tokens, device, dtype, key_valid)
    cache.rows = B0
    hidden = model(ids.to(device), pos.to(device), cache)  # (B0, P, C): one prefill per prompt
    cache.length = n + P
    if num_samples > 1:  # one prefill, n continuations
        cache.move(torch.arange(B0, device=device).repeat_interleave(num_samples))
    cache.start_decoding(B)
    logits = model.logits(hidden[:, -1]).repeat_interleave(num_samples, dim=0)  # (B, V) float32
    step = DecodeStep(model, cache, B, device)
    step.pos.copy_((pos[:, -1] + 1).repeat_interleave(num_samples))

    uniforms = None if temperature == 0 else row_uniforms(B, max_new_tokens, seed).to(device)
    tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(B, max_new_tokens, device=device)
    entropy = torch.zeros(B, max_new_tokens, device=device)
    mask = torch.zeros(B, max_new_tokens, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    stopped = torch.zeros(B, dtype=torch.bool, device=device)  # finished, or out of budget
    live = torch.arange(B, device=device)  # (m,): the output row of each of the batch's first m rows
    b = B  # the step runs on the first b rows: m <= b, the rows past m are stale
    for t in range(max_new_tokens):
        m = len(live)
        tok, lp, ent = sample_next(logits[:m], None if uniforms is None else uniforms[live, t], temperature, top_k,
                                   top_p, return_entropy=True)
        alive = ~stopped[live]  # (m,): a row that stopped earlier may still sit in the batch; ignore it
        rows = live[alive]
        tokens[rows, t], logprobs[rows, t], entropy[rows, t], mask[rows, t] = tok[alive], lp[alive], ent[alive], 1.0
        finished[rows] = tok[alive] == eos_id
        stopped[rows] = finished[rows] | (budget[rows] <= t + 1)
        going = ~stopped[live]  # (m,)
        n_going = int(going.sum())
        if n_going == 0 or t == max_new_tokens - 1:
            break
        step.tok[:m] = tok
        if step.batch_size(b, n_going) < b:  # compact the rows still going into a smaller batch
            keep = going.nonzero()[:, 0]
            cache.move(keep)
            step.tok[:n_going], step.pos[:n_going] = step.tok[keep], step.pos[keep]
            live, b = live[keep], step.batch_size(b, n_going)
        logits = step(b, filled=n + P + t)  # (b, V): writes slot n + P + t
        cache.slot += 1
        step.pos += 1
    L = int(mask.sum(dim=1).max())
    return Generation(tokens[:, :L], logprobs[:, :L], mask[:, :L], finished, entropy[:, :L])
