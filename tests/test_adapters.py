"""LoRA and prompt tuning (minipost/adapters.py): exactness at initialisation, merging, what trains, adapter
checkpoints (small, resumable, tied to their base), the reference without a second copy, bad input."""
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

import train_base
import train_rlhf
import train_sft
from minipost import adapters
from minipost.checkpoint import load_checkpoint, save_checkpoint
from minipost.cli import read_metrics
from minipost.engine import generate
from minipost.gpt2 import export_gpt2, load_gpt2_folder
from minipost.model import GPT, GPTConfig
from minipost.rewards import load_reward_model

ROOT = Path(__file__).resolve().parent.parent
SFT = ["--n-train", "64", "--n-eval", "4", "--max-new-tokens", "8", "--batch-size", "8", "--warmup", "1", "--lr", "3e-3"]
RL = ["--n-eval", "4", "--n-kl", "4", "--max-new-tokens", "12", "--warmup", "1"]


def flags(lora_r=None, prompt_tuning=None, targets="c_attn,c_proj,c_fc"):
    return types.SimpleNamespace(lora_r=lora_r, lora_alpha=None, lora_dropout=0.0, lora_targets=targets,
                                 prompt_tuning=prompt_tuning)


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**dict(block_size=32, vocab_size=50, n_layer=2, n_head=2, n_embd=32), **kw})).eval()


def base_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if k not in adapters.adapter_keys(model)}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny arith base and a full SFT model of it (seconds)."""
    root = tmp_path_factory.mktemp("adapters")
    train_base.main(["--task", "arith", "--corpus-docs", "400", "--vocab-size", "320", "--block-size", "96",
                     "--batch-size", "8", "--eval-batches", "1", "--max-steps", "30", "--lr", "3e-3",
                     "--warmup", "5", "--out", str(root / "base")])
    train_sft.main(["--init", str(root / "base"), "--max-steps", "30", "--eval-every", "30", "--out",
                    str(root / "sft"), *SFT])
    return root


# ------------------------------------------------------------------------------------------------ LoRA units

def test_lora_starts_exactly_at_the_base_and_merges():
    model, x = tiny(), torch.randint(0, 50, (3, 12))
    with torch.no_grad():
        before = model(x)
        adapters.adapt(model, flags(lora_r=4), "base")
        assert torch.equal(model(x), before)  # B = 0: bit for bit the base
        layers = [m for m in model.modules() if isinstance(m, adapters.LoRALinear)]
        assert len(layers) == 2 * 4  # per block: attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj
        for m in layers:
            m.lora_B.normal_(std=0.02)
        adapted = model(x)
        assert (adapted - before).abs().max() > 1e-3  # the adapters now change the output
        merged = adapters.merge_adapters(model)
        assert not any(isinstance(m, adapters.LoRALinear) for m in merged.modules())
        assert_close(merged(x), adapted, rtol=0, atol=1e-6)  # float32 W + (alpha/r) B A: a rounding apart
        assert torch.equal(adapters.BaseView(model)(x), before)  # adapters off: the base again
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all("lora_" in n for n in names)


def test_lora_targets_pick_modules():
    model = tiny()
    adapters.adapt(model, flags(lora_r=2, targets="c_attn"), "base")
    adapted = {n for n, m in model.named_modules() if isinstance(m, adapters.LoRALinear)}
    assert adapted == {f"transformer.h.{i}.attn.c_attn" for i in range(2)}


@pytest.mark.parametrize("layout", [{}, dict(norm="rmsnorm", pos="rope", mlp="swiglu", n_kv_head=1, bias=False,
                                             tie_embeddings=False)], ids=["gpt2", "llama"])
def test_prompt_tuning_engine_logprobs_equal_teacher_forced(layout):
    """Virtual tokens enter the KV cache at the prefill; each sampled token's log-prob equals the one a
    teacher-forced forward (which prepends the same virtual tokens) gives it, padded rows included. With
    rotary positions the virtual tokens take positions 0..N-1 in attention."""
    model = tiny(block_size=48, **layout)
    adapters.adapt(model, flags(prompt_tuning=5), "base")
    assert model.n_prefix == 5 and model.prompt_embeddings.requires_grad
    prompts = [[1, 2, 3, 4, 5, 6], [7, 8], [9, 10, 11]]  # unequal: left padding in the batch
    g = generate(model, prompts, 10, eos_id=49, pad_id=48, temperature=0.8, num_samples=2, seed=3)
    for r, comp in enumerate(g.completions()):
        ids = torch.tensor([prompts[r // 2] + comp])
        with torch.no_grad():
            lp = model.teacher_forced_logprobs(ids[:, :-1], ids[:, 1:], temperature=0.8)[0, len(prompts[r // 2]) - 1:]
        assert_close(lp, g.logprobs[r, :len(comp)], rtol=0, atol=1e-5)
    with torch.no_grad():  # and the virtual tokens matter: switched off, the log-probs change
        off = adapters.BaseView(model).teacher_forced_logprobs(ids[:, :-1], ids[:, 1:], temperature=0.8)
        assert (off[0, len(prompts[-1]) - 1:] - lp).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------ end to end

def test_lora_sft_trains_only_adapters_and_saves_a_small_checkpoint(models):
    out = models / "sft-lora"
    train_sft.main(["--init", str(models / "base"), "--lora-r", "4", "--max-steps", "6", "--eval-every", "6",
                    "--out", str(out), *SFT])
    records = read_metrics(out / "metrics.jsonl")
    assert records[-1]["ce"] < records[1]["ce"]  # it learns
    ck = load_checkpoint(out)
    base = load_checkpoint(models / "base").model
    assert ck.meta["adapter"]["lora"]["r"] == 4 and adapters.has_adapters(ck.model)
    for k, v in base.state_dict().items():  # the base never moved
        assert torch.equal(ck.model.state_dict()[k], v), k
    assert all(m.lora_B.abs().max() > 0 for m in ck.model.modules() if isinstance(m, adapters.LoRALinear))
    saved = torch.load(out / "ckpt" / "model.pt", weights_only=True)
    assert set(saved) == set(adapters.adapter_keys(ck.model))  # adapters only, not a second copy of the base
    assert records[-1]["trainable_params"] == sum(v.numel() for v in saved.values()) < base.num_params() / 10


def test_lora_resume_is_exact(models):
    common = ["--init", str(models / "base"), "--lora-r", "2", "--eval-every", "2", "--ckpt-every", "2", *SFT]
    train_sft.main(common + ["--max-steps", "4", "--out", str(models / "lora-ref")])
    train_sft.main(common + ["--max-steps", "2", "--out", str(models / "lora-res")])
    train_sft.main(common + ["--max-steps", "4", "--out", str(models / "lora-res"), "--resume"])
    ref, res = (read_metrics(models / d / "metrics.jsonl") for d in ("lora-ref", "lora-res"))
    assert [r["step"] for r in res] == [r["step"] for r in ref]
    for a, b in zip(ref, res):
        for k in a:
            if k not in ("time_s", "step_time_s", "peak_memory_mb"):
                assert a[k] == pytest.approx(b[k], abs=1e-6), (a["step"], k)


def test_prompt_tuning_sft_trains_only_the_virtual_tokens(models):
    out = models / "sft-pt"
    train_sft.main(["--init", str(models / "base"), "--prompt-tuning", "4", "--max-steps", "3", "--eval-every", "3",
                    "--out", str(out), *SFT])
    ck, base = load_checkpoint(out), load_checkpoint(models / "base").model
    assert ck.model.n_prefix == 4
    for k, v in base.state_dict().items():
        assert torch.equal(ck.model.state_dict()[k], v), k
    wte = base.transformer.wte.weight
    # initialised from token embeddings (Lester et al.); after 3 steps no virtual token is one of them any more
    assert not any(torch.equal(e, w) for e in ck.model.prompt_embeddings for w in wte)


def test_adapter_checkpoint_on_the_wrong_base_is_refused(models, tmp_path):
    import shutil
    base = tmp_path / "base"
    shutil.copytree(models / "base", base)
    train_sft.main(["--init", str(base), "--lora-r", "2", "--max-steps", "1", "--eval-every", "1",
                    "--out", str(tmp_path / "lora"), *SFT])
    ck = load_checkpoint(base)
    with torch.no_grad():
        ck.model.transformer.wte.weight[0] += 1.0  # the base is retrained in place
    save_checkpoint(base, ck.model, ck.tokenizer, ck.meta)
    r = subprocess.run([sys.executable, "-m", "minipost.evaluate", "--init", str(tmp_path / "lora"), "--task", "arith",
                        "--n-eval", "2"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "its adapters belong to a base with fingerprint" in r.stderr and "Traceback" not in r.stderr


def test_dpo_with_lora_keeps_no_second_copy(models, monkeypatch):
    """The reference is the policy's own base with the adapters off: every tensor it reads is one of the
    policy's. The run's tensor memory is far below full DPO's (which holds a frozen copy of the model)."""
    seen = {}
    real = train_rlhf.policy_evaluation

    def spy(args, policy, ref, tokenizer, task):
        seen["policy"], seen["ref"] = policy, ref
        return real(args, policy, ref, tokenizer, task)
    monkeypatch.setattr(train_rlhf, "policy_evaluation", spy)
    pairs = models / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"What is {i} + 1?", "chosen": f"{i} + 1 = {i + 1}.",
                                         "rejected": f"{i} + 1 = {i + 2}."}) + "\n" for i in range(12)))
    memory = {}
    for name, extra in (("dpo-lora", ["--lora-r", "2"]), ("dpo-full", [])):
        train_rlhf.main(["--algo", "dpo", "--init", str(models / "sft"), "--data", str(pairs), "--max-steps", "2",
                         "--batch-size", "4", "--out", str(models / name), *RL, *extra])
        memory[name] = read_metrics(models / name / "metrics.jsonl")[-1]["tensor_memory_mb"]
        if extra:
            policy_ptrs = {p.data_ptr() for p in seen["policy"].parameters()}
            assert isinstance(seen["ref"], adapters.BaseView)
            assert {p.data_ptr() for p in seen["ref"].parameters()} <= policy_ptrs
            records = read_metrics(models / name / "metrics.jsonl")
            assert records[1]["loss"] == pytest.approx(0.6931472, abs=1e-5)  # starts at the reference
    # full: weights + grads + 2 Adam moments + a reference copy = 5x the model; LoRA: ~1x
    assert memory["dpo-lora"] < 0.4 * memory["dpo-full"], memory
    ck = load_checkpoint(models / "dpo-lora")  # its base is the SFT model
    assert ck.meta["adapter"]["base"]["path"] == str((models / "sft").resolve())


def test_reward_model_with_lora_trains_head_and_adapters(models):
    out = models / "rm-lora"
    train_rlhf.main(["--algo", "rm", "--init", str(models / "sft"), "--data", str(models / "pairs.jsonl"),
                     "--max-steps", "2", "--batch-size", "4", "--lora-r", "2", "--out", str(out), *RL])
    ck = load_checkpoint(models / "sft")
    rm = load_reward_model(out, ck.tokenizer)
    assert rm.config.scalar_head and adapters.has_adapters(rm)
    for k, v in ck.model.state_dict().items():
        assert torch.equal(rm.state_dict()[k], v), k  # the trunk is the SFT model's
    saved = torch.load(out / "ckpt" / "model.pt", weights_only=True)
    assert "score_head.weight" in saved and all("lora_" in k or k.startswith("score_head.") for k in saved)


def test_init_from_an_adapter_checkpoint_and_export(models, tmp_path):
    """--init takes an adapter checkpoint (its base is loaded and the adapters merged); GPT-2 export merges."""
    out = tmp_path / "grpo"
    train_rlhf.main(["--algo", "grpo", "--init", str(models / "sft-lora"), "--max-steps", "1", "--batch-size", "2",
                     "--k", "2", "--out", str(out), *RL])
    assert load_checkpoint(out).meta["step"] == 1
    ck = load_checkpoint(models / "sft-lora")
    folder = export_gpt2(ck.model, ck.tokenizer, tmp_path / "gpt2")
    plain, _ = load_gpt2_folder(folder)
    x = torch.randint(0, 300, (2, 10))
    with torch.no_grad():
        assert_close(plain(x), ck.model(x), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="cannot be merged"):
        export_gpt2(load_checkpoint(models / "sft-pt").model, ck.tokenizer, tmp_path / "pt")


@pytest.mark.parametrize("extra,message", [
    (["--lora-r", "0"], "--lora-r must be >= 1"),
    (["--lora-r", "2", "--lora-targets", "c_attn,wq"], "--lora-targets: unknown module wq"),
    (["--prompt-tuning", "200"], "--prompt-tuning 200: the model's context is 96 tokens"),
    (["--lora-r", "2", "--prompt-tuning", "2"], "choose one of --lora-r and --prompt-tuning"),
])
def test_bad_adapter_flags_exit_2(models, extra, message):
    r = subprocess.run([sys.executable, "train_sft.py", "--init", str(models / "base"), "--max-steps", "1",
                        "--out", str(models / "never"), *extra], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
