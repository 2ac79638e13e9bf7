"""The KV-cache engine against a naive generate that re-runs the whole sequence every step, and against the
engine as it was before its fixed-shape decode step (tests/engine_before.py), bit for bit."""
import pytest
import torch

import engine_before
from minipost.engine import buckets, filter_logits, generate, sample_next
from minipost.model import GPT, GPTConfig

EOS, PAD = 1, 0


# the Llama-style block: rotary positions make left padding matter (a row's positions must count only its
# real tokens), and grouped-query attention makes the cache hold fewer heads than attention reads
LAYOUTS = {"gpt2": {}, "llama": dict(norm="rmsnorm", pos="rope", mlp="swiglu", mlp_hidden=24, n_head=4, n_kv_head=2,
                                     bias=False, qkv_bias=True, tie_embeddings=False)}


def tiny_model(seed=0, layout="gpt2"):
    torch.manual_seed(seed)
    config = GPTConfig(**{**dict(vocab_size=23, block_size=40, n_layer=2, n_head=2, n_embd=16), **LAYOUTS[layout]})
    model = GPT(config).eval()
    with torch.no_grad():  # sharpen the output distribution so greedy paths are not near-ties
        model.lm_head.weight.mul_(8)
        if layout == "llama":  # random biases and norm gains: rows would not hide a mistake behind zeros / ones
            for name, p in model.named_parameters():
                if name.endswith(("c_attn.bias", "ln_1.weight", "ln_2.weight")):
                    p.copy_(torch.rand_like(p) + 0.5 if "ln_" in name else torch.randn_like(p) * 0.3)
    return model


@torch.no_grad()
def naive_generate(model, prompt, max_new, seed, temperature=1.0, top_k=None, top_p=None):
    """No cache, no padding: forward over the full sequence at every step; same per-row sampling rule."""
    gen = torch.Generator().manual_seed(seed)  # one uniform per step from the row's own stream
    seq, out, lps = list(prompt), [], []
    for _ in range(min(max_new, model.config.block_size - len(prompt))):
        hidden = model(torch.tensor([seq], device=model.lm_head.weight.device))
        logits = model.logits(hidden[:, -1])
        u = torch.rand(1, dtype=torch.float64, generator=gen) if temperature else None
        tok, lp = sample_next(logits, u, temperature, top_k, top_p)
        out.append(int(tok)), lps.append(float(lp))
        seq.append(int(tok))
        if int(tok) == EOS:
            break
    return out, lps


PROMPTS = [[5, 6, 7], [8], [9, 10, 11, 12, 13, 14], [3, 4]]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("temperature,top_k,top_p", [(0, None, None), (1.0, None, None), (0.7, 5, None),
                                                     (1.3, None, 0.8)])
def test_batched_padded_equals_naive_per_row(temperature, top_k, top_p, layout):
    model = tiny_model(layout=layout)
    g = generate(model, PROMPTS, 12, EOS, PAD, temperature, top_k, top_p, seed=100)
    for r, prompt in enumerate(PROMPTS):
        want, want_lp = naive_generate(model, prompt, 12, 100 + r, temperature, top_k, top_p)
        assert g.completions()[r] == want
        torch.testing.assert_close(g.logprobs[r, :len(want)], torch.tensor(want_lp), rtol=0, atol=1e-5)
        assert bool(g.finished[r]) == (want[-1] == EOS)
        assert (g.tokens[r, len(want):] == PAD).all() and (g.logprobs[r, len(want):] == 0).all()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_row_alone_equals_row_in_batch(layout):
    model = tiny_model(1, layout)
    batch = generate(model, PROMPTS, 10, EOS, PAD, seed=7)
    for r, prompt in enumerate(PROMPTS):
        alone = generate(model, [prompt], 10, EOS, PAD, seed=7 + r)
        assert alone.completions()[0] == batch.completions()[r]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fan_out_equals_independent_samples(layout):
    model = tiny_model(2, layout)
    g = generate(model, [[5, 6], [7, 8, 9]], 10, EOS, PAD, num_samples=3, seed=50)
    assert g.tokens.shape[0] == 6
    for r in range(6):
        prompt = [[5, 6], [7, 8, 9]][r // 3]
        want, _ = naive_generate(model, prompt, 10, 50 + r)
        assert g.completions()[r] == want
    assert len({tuple(c) for c in g.completions()[:3]}) > 1  # different seeds give different samples


@pytest.mark.parametrize("layout", LAYOUTS)
def test_logprobs_equal_teacher_forced_forward(layout):
    """The sampler's log-probs equal a teacher-forced pass over prompt + completion (within 1e-5, float32)."""
    model = tiny_model(3, layout)
    temperature = 0.8
    g = generate(model, PROMPTS, 12, EOS, PAD, temperature, seed=3)
    for r, prompt in enumerate(PROMPTS):
        comp = g.completions()[r]
        seq = torch.tensor([prompt + comp])
        logp = model.teacher_forced_logprobs(seq[:, :-1], seq[:, 1:], temperature)[0, len(prompt) - 1:]  # predicts comp tokens
        torch.testing.assert_close(g.logprobs[r, :len(comp)], logp, rtol=0, atol=1e-5)
        assert (logp <= 0).all()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("temperature,num_samples", [(0, 1), (0, 3), (1.0, 1), (1.0, 4), (0.7, 2)])
def test_same_as_the_engine_before_bit_for_bit(layout, temperature, num_samples):
    """float32 CPU: the fixed-shape decode step (static cache, tensor slot, bucketed compaction) gives the old
    engine's tokens, log-probs, masks and finished flags exactly, greedy and sampled, on padded prompts of
    several lengths and on an unpadded batch; rows stop at different steps, so the batch is compacted."""
    model = tiny_model(6, layout)
    padded = [[5, 6, 7], [8], [9, 10, 11, 12, 13, 14], [3, 4], [15, 16, 17, 18], [19, 20]]
    near_end = [[2 + i % 20 for i in range(n)] for n in (26, 31, 35, 37, 22)]  # budgets 14, 9, 5, 3, 18 of 40
    lengths = set()
    for prompts, seed, max_new in [(padded, 11, 20), (near_end, 3, 30), ([[4, 5, 6], [7, 8, 9]], 8, 12)]:
        new = generate(model, prompts, max_new, EOS, PAD, temperature, num_samples=num_samples, seed=seed)
        old = engine_before.generate(model, prompts, max_new, EOS, PAD, temperature, num_samples=num_samples,
                                     seed=seed)
        for name in ("tokens", "logprobs", "mask", "finished"):
            assert torch.equal(getattr(new, name), getattr(old, name)), name
        lengths |= {int(m.sum()) for m in new.mask}
    assert len(lengths) >= 4  # rows stopped at several steps (EOS or budget), so the batch was compacted


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_cuda_graph_step_shapes_on_cpu(layout, monkeypatch):
    """What a CUDA graph replays, run eagerly on CPU: every step reads all T_max cache slots under the mask,
    and stopped rows are compacted into power-of-two buckets (rows past the live ones stay in the batch,
    stale). Every row equals the naive per-row generation, and greedy tokens equal the old engine's."""
    from minipost.engine import DecodeStep

    def graph_step(self, b, filled):  # what a replay runs: keys stay T_max, the slot is written from its tensor
        self.cache.graphed = True
        return self.eager(b)

    monkeypatch.setattr(DecodeStep, "__call__", graph_step)
    monkeypatch.setattr(DecodeStep, "batch_size", lambda self, b, going: min(s for s in self.sizes if s >= going))
    model = tiny_model(8, layout)
    prompts = [[2 + i % 20 for i in range(n)] for n in (26, 31, 35, 37, 22, 3)]  # budgets 14, 9, 5, 3, 18, 37
    g = generate(model, prompts, 20, EOS, PAD, seed=30)
    for r, prompt in enumerate(prompts):
        want, want_lp = naive_generate(model, prompt, 20, 30 + r)
        assert g.completions()[r] == want
        torch.testing.assert_close(g.logprobs[r, :len(want)], torch.tensor(want_lp), rtol=0, atol=1e-5)
    assert len({len(c) for c in g.completions()}) >= 4  # stopped at several steps: 6 -> 4 -> 2 -> 1 rows
    greedy = generate(model, prompts, 20, EOS, PAD, temperature=0)
    assert torch.equal(greedy.tokens, engine_before.generate(model, prompts, 20, EOS, PAD, temperature=0).tokens)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (their CPU shapes: test above)")
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_graph_replays_equal_the_naive_generate(layout):
    """On a GPU, float32: the replayed graphs (one per bucket) sample what the naive generate samples."""
    model = tiny_model(9, layout).cuda()
    prompts = [[2 + i % 20 for i in range(n)] for n in (26, 31, 35, 37, 22, 3)]
    g = generate(model, prompts, 20, EOS, PAD, seed=40)
    for r, prompt in enumerate(prompts):
        want, want_lp = naive_generate(model, prompt, 20, 40 + r)
        assert g.completions()[r] == want
        torch.testing.assert_close(g.logprobs[r, :len(want)].cpu(), torch.tensor(want_lp), rtol=0, atol=1e-5)


def test_entropy_equals_teacher_forced_entropy():
    """Generation.entropy is the entropy of softmax(logits / T) at each sampled position: what a teacher-forced
    pass with return_entropy gives (within 1e-5, float32)."""
    model = tiny_model(7)
    g = generate(model, PROMPTS, 12, EOS, PAD, 0.9, seed=4)
    for r, prompt in enumerate(PROMPTS):
        comp = g.completions()[r]
        seq = torch.tensor([prompt + comp])
        _, ent = model.teacher_forced_logprobs(seq[:, :-1], seq[:, 1:], 0.9, return_entropy=True)
        torch.testing.assert_close(g.entropy[r, :len(comp)], ent[0, len(prompt) - 1:], rtol=0, atol=1e-5)
        assert (g.entropy[r, len(comp):] == 0).all()


def test_buckets():
    assert buckets(64) == [64, 32, 16, 8, 4, 2, 1]
    assert buckets(24) == [24, 16, 8, 4, 2, 1]
    assert buckets(1) == [1]


def test_cache_holds_the_kv_heads_only():
    from minipost.engine import KVCache
    config = tiny_model(layout="llama").config
    cache = KVCache(config, batch=3, max_len=11, device="cpu", dtype=torch.float32)
    assert cache.k.shape == (2, 3, 2, 11, 4)  # (L, B, n_kv_head, T_max, D): 2 kv heads for 4 query heads


def test_stops_at_block_size():
    model = tiny_model(4)
    g = generate(model, [[2 + i % 20 for i in range(34)]], 100, eos_id=999, pad_id=PAD, seed=0)  # EOS never sampled
    assert g.tokens.shape[1] == 40 - 34 and not g.finished.any()


def test_each_row_has_its_own_budget():
    """A prompt near the end of the context cuts its own row short, not its batch-mates': every row equals the
    naive per-row generation, so a row does not depend on the batch it is sampled in (what sharding prompts
    over data-parallel ranks relies on)."""
    model = tiny_model(5)
    prompts = [[2 + i % 20 for i in range(34)], [5, 6], [7, 8, 9]]  # the first leaves 6 positions of 40
    g = generate(model, prompts, 12, EOS, PAD, seed=20)
    lengths = []
    for r, prompt in enumerate(prompts):
        want, _ = naive_generate(model, prompt, 12, 20 + r)
        assert g.completions()[r] == want
        lengths.append(len(want))
    assert lengths[0] <= 6 and max(lengths[1:]) > 6  # else the check above could not tell the budgets apart


def test_filter_logits_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.1, 0.3, 0.1]]))
    inf = float("-inf")
    assert filter_logits(logits, top_k=2)[0].tolist()[1] == inf
    kept = torch.isfinite(filter_logits(logits, top_p=0.7))[0].tolist()
    assert kept == [True, False, True, False]  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7: two tokens kept
    kept = torch.isfinite(filter_logits(logits, top_p=0.5))[0].tolist()
    assert kept == [True, False, False, False]


def test_sample_next_inverse_cdf_by_hand():
    """probs (0.1, 0, 0.6, 0.3): cdf (0.1, 0.1, 0.7, 1.0); u picks the first token whose cdf exceeds u, so the
    zero-probability token 1 (a flat step of the cdf) is never picked, not even for u right at 0.1."""
    logits = torch.log(torch.tensor([[0.1, 0.0, 0.6, 0.3]])).expand(6, 4)
    u = torch.tensor([0.0, 0.0999, 0.1001, 0.6999, 0.7001, 1 - 1e-12], dtype=torch.float64)
    tokens, logp = sample_next(logits, u, temperature=1.0)
    assert tokens.tolist() == [0, 0, 2, 2, 3, 3]
    near = torch.linspace(0.0999, 0.1001, 2001, dtype=torch.float64)
    assert 1 not in sample_next(logits[:1].expand(2001, 4), near)[0].tolist()
    torch.testing.assert_close(logp, torch.log(torch.tensor([0.1, 0.1, 0.6, 0.6, 0.3, 0.3])))
    # top_k=2 keeps tokens 2 and 3 (renormalised 2/3, 1/3); the log-prob stays the unfiltered one
    tokens, logp = sample_next(logits, u, temperature=1.0, top_k=2)
    assert tokens.tolist() == [2, 2, 2, 3, 3, 3]
    torch.testing.assert_close(logp, torch.log(torch.tensor([0.6, 0.6, 0.6, 0.3, 0.3, 0.3])))


def test_sampling_frequencies_match_softmax():
    """4000 rows of one distribution, one uniform each: the token counts agree with softmax(logits / T)
    within 4 standard deviations of a binomial count."""
    torch.manual_seed(0)
    logits = torch.randn(1, 7).expand(4000, 7) * 2
    u = torch.rand(4000, dtype=torch.float64)
    tokens, _ = sample_next(logits, u, temperature=0.7)
    p = torch.softmax(logits[0] / 0.7, dim=-1).double()
    counts = torch.bincount(tokens, minlength=7).double()
    assert ((counts - 4000 * p).abs() <= 4 * (4000 * p * (1 - p)).sqrt() + 1).all()


def test_bad_prompts():
    model = tiny_model()
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[]], 5, EOS, PAD)
    with pytest.raises(ValueError, match="no room"):
        generate(model, [[2 + i % 20 for i in range(40)]], 5, EOS, PAD)
