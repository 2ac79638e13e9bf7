"""What the sampling benchmark compares and counts (minipost/bench_rollout.py), at tiny sizes: the Hugging Face
twin computes the same function as the model it copies, both engines pick the same greedy tokens, and the
floor's matmuls and cache bytes are the ones a generation does. Its timings are the benchmark's business."""
import pytest
import torch

from minipost import bench_rollout
from minipost.model import GPT, GPTConfig


def tiny():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=64, block_size=48, n_layer=2, n_head=2, n_embd=16)).eval()


def test_hf_twin_has_the_same_logits():
    model = tiny()
    twin = bench_rollout.hf_twin(model)
    ids = torch.randint(0, 64, (3, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model.logits(model(ids))  # (3, 11, V)
        theirs = twin(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


def test_both_engines_pick_the_same_greedy_tokens():
    model = tiny()
    ours, hf, speedup, same = bench_rollout.generation(model, batch=5, new_tokens=6, repeats=1)
    assert same and ours > 0 and hf > 0 and speedup > 0


def test_decode_kv_bytes_by_hand():
    config = GPTConfig(n_layer=2, n_head=4, n_embd=32, n_kv_head=2)  # a kv row: 2 heads x 8 = 16 floats
    # 3 new tokens: 2 decode steps after the prefill, reading 4 + 1 and 4 + 2 slots of K and V in each layer
    assert bench_rollout.decode_kv_bytes(config, batch=3, P=4, new_tokens=3) == 2 * 2 * 3 * 16 * 4 * (5 + 6)


def test_floor_does_a_generations_matmuls(monkeypatch):
    """Every linear layer sees the prefill's batch x P rows once, then batch rows at each of the new_tokens - 1
    decode steps; the LM head sees batch rows new_tokens times (the prefill's last position, then each step)."""
    model = tiny()
    rows = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(lambda m, args, out, name=name: rows.setdefault(name, []).append(
                args[0].shape[0]))
    monkeypatch.setattr(bench_rollout, "timed", lambda fn, repeats: (fn(), 0.5)[::-1])  # one call, 0.5 "s"
    t_mm, t_kv, gb, gbs = bench_rollout.floor(model, batch=3, P=7, new_tokens=4, repeats=1)
    assert len(rows) == 2 * 4 + 1
    for name, seen in rows.items():
        assert seen == ([3] * 4 if name == "lm_head" else [21, 3, 3, 3]), name
    assert t_mm == 0.5 and gb == bench_rollout.decode_kv_bytes(model.config, 3, 7, 4) / 1e9
    assert gbs == pytest.approx(64 * 2 ** 20 * 4 / 0.5 / 1e9) and t_kv == pytest.approx(gb / gbs)
