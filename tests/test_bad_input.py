"""Bad input and faults, one table row each, through every entry point as its own process: the exit code
(2: bad input; 1: a run that diverged) and one line `error: ...` naming the problem, last on stderr, with no
traceback. The rows that make training go non-finite also check that the checkpoint already in OUT is
untouched.

Each row runs as `python SCRIPT ARGS` would (runpy, __name__ == "__main__", its own sys.argv, exit code,
stdout and stderr), but forked from one server process that imported torch once: a fresh interpreter per
row would spend ~2 s of the file's time on imports alone, per row. test_fork_server_matches_a_fresh_python
checks a few rows both ways.
"""
import hashlib
import json
import math
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minipost.checkpoint import load_checkpoint, save_checkpoint
from minipost.cli import read_metrics
from minipost.hf import export_hf
from minipost.model import GPT, GPTConfig
from minipost.tasks import get_task
from minipost.tokenizer import train_bpe

ROOT = Path(__file__).resolve().parent.parent
ENTRY = {"base": "train_base.py", "sft": "train_sft.py", "rlhf": "train_rlhf.py", "bon": "sample_bon.py",
         "eval": "-m minipost.evaluate", "pipeline": "pipeline.py"}

# The server: reads one JSON job per line, forks, the child runs the entry point, the server answers with
# its exit code. It never runs a torch op itself, so forking it is safe (no thread pools to copy).
SERVER = r'''
import json, os, runpy, signal, sys, traceback
sys.path.insert(0, sys.argv[1])
import torch, tqdm, numpy, tiktoken  # noqa: F401  what every row would import: loaded once
import minipost.checkpoint, minipost.data, minipost.loop, minipost.preferences, minipost.rewards  # noqa: F401
assert "minipost.evaluate" not in sys.modules  # runpy runs it as __main__: it must not be imported already
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        for fd, name in ((1, "stdout"), (2, "stderr")):
            os.dup2(os.open(job[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)
        os.chdir(job["cwd"])
        signal.alarm(job["timeout"])  # a hung row dies with SIGALRM instead of hanging the test
        code = 0
        try:
            if job["argv"][0] == "-m":
                sys.argv = [job["argv"][1], *job["argv"][2:]]
                runpy.run_module(job["argv"][1], run_name="__main__", alter_sys=True)
            else:
                sys.argv = job["argv"]
                runpy.run_path(job["argv"][0], run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    print(json.dumps(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])), flush=True)
'''


def command(entry, *args) -> list[str]:
    """The command line that runs an entry point (a key of ENTRY) from anywhere."""
    script = ENTRY[entry].split()
    return [*(script if script[0] == "-m" else [str(ROOT / script[0])]), *(str(a) for a in args)]


def fresh_python(entry, *args, cwd=None, timeout=120):
    """A plain `python SCRIPT ARGS` process: what the fork server stands in for."""
    return subprocess.run([sys.executable, *command(entry, *args)], cwd=cwd or ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """run(entry, *args, cwd=...) -> CompletedProcess: one entry point (a key of ENTRY) in a forked process
    (a fresh python elsewhere)."""
    if sys.platform != "linux":  # fork after importing torch is only safe to rely on here
        yield fresh_python
        return
    logs = tmp_path_factory.mktemp("logs")
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(ROOT)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=ROOT,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})

    def call(entry, *args, cwd=None, timeout=120):
        job = {"argv": command(entry, *args), "cwd": str(cwd or ROOT), "timeout": timeout,
               "stdout": str(logs / "stdout"), "stderr": str(logs / "stderr")}
        server.stdin.write(json.dumps(job) + "\n")
        server.stdin.flush()
        code = json.loads(server.stdout.readline())
        return subprocess.CompletedProcess(job["argv"], code, (logs / "stdout").read_text(),
                                           (logs / "stderr").read_text())

    yield call
    server.stdin.close()
    server.wait(timeout=30)


def error_line(r) -> str:
    """The one `error: ...` line, last on stderr (after any progress bar), with no traceback anywhere."""
    assert "Traceback" not in r.stderr and "Warning" not in r.stderr, r.stderr[-3000:]
    assert "weights_only" not in r.stderr  # torch's advice to load a refused pickle in full is never passed on
    lines = [ln.strip() for ln in re.split(r"[\r\n]", r.stderr) if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], r.stderr[-3000:]
    return errors[0]


def digest(ckpt_dir: Path) -> dict:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(Path(ckpt_dir).iterdir())}


# ------------------------------------------------------------------------------------ shared tiny fixtures

EVIL = '''
import os
class Payload:
    def __reduce__(self):
        return (os.system, ("touch {marker}",))
'''

REWARDS = '''
def huge(prompts, completions, **kw):  # finite as a Python float, infinite in float32
    return [1e39] * len(completions)

def crash(prompts, completions, **kw):
    return [1 / 0 for c in completions]

def length(prompts, completions, **kw):  # differs within a group: every GRPO group carries a gradient
    return [float(len(c)) for c in completions]

def e300(prompts, completions, **kw):  # finite, and so is the mean of any number of them
    return [1e300] * len(completions)

def near_max(prompts, completions, **kw):  # finite, but two of them add up to infinity
    return [1.7e308] * len(completions)
'''


def copy_ckpt(src: Path, dst: Path, meta=None, config=None, weights=None) -> Path:
    """A copy of run directory src's checkpoint at dst/ckpt, its meta / config updated, or its weights
    mapped through weights(state) (raw JSON and raw torch.save: also things a loader must refuse)."""
    shutil.copytree(src / "ckpt", dst / "ckpt")
    for name, change in (("meta.json", meta), ("config.json", config)):
        if change is not None:
            path = dst / "ckpt" / name
            path.write_text(json.dumps(change(json.loads(path.read_text()))))
    if weights is not None:
        state = torch.load(dst / "ckpt" / "model.pt", weights_only=True)
        torch.save(weights(state), dst / "ckpt" / "model.pt")
    return dst


@pytest.fixture(scope="module")
def fx(run, tmp_path_factory):
    """Tiny arith base and SFT runs (2 steps each, a checkpoint at each), GRPO and PPO runs from the SFT one
    (likewise), a reward model, and the broken,
    malicious or mismatched files and checkpoints the rows use, all under one directory (also the rows'
    working directory, so `--reward rewards:huge` imports ./rewards.py)."""
    d = tmp_path_factory.mktemp("fx")
    r = run("base", "--task", "arith", "--corpus-docs", "300", "--vocab-size", "320", "--block-size", "96",
            "--batch-size", "4", "--eval-batches", "1", "--max-steps", "2", "--eval-every", "2", "--ckpt-every", "1",
            "--out", d / "base")
    assert r.returncode == 0, r.stderr[-2000:]
    r = run("sft", "--init", d / "base", "--n-train", "16", "--n-eval", "1", "--max-new-tokens", "2", "--max-steps",
            "2", "--batch-size", "4", "--eval-every", "2", "--ckpt-every", "1", "--out", d / "sft")
    assert r.returncode == 0, r.stderr[-2000:]
    sft = load_checkpoint(d / "sft")
    torch.manual_seed(0)
    rm = GPT(GPTConfig(**{**sft.model.config.to_dict(), "scalar_head": True}))
    rm.load_state_dict(sft.model.state_dict(), strict=False)
    save_checkpoint(d / "rm", rm, sft.tokenizer, {"kind": "rm", "task": "arith", "script": "test"})
    (d / "rewards.py").write_text(REWARDS)
    for algo in ("grpo", "ppo"):  # 2 healthy steps, a checkpoint at each: what a diverging --resume must keep
        r = run("rlhf", "--algo", algo, "--init", d / "sft", *RL, "--k", "2", "--epochs", "1", "--reward",
                "rewards:length", "--max-steps", "2", "--ckpt-every", "1", "--out", d / algo, cwd=d)
        assert r.returncode == 0, r.stderr[-2000:]

    (d / "evil.py").write_text(EVIL.format(marker=d / "pwned"))
    sys.path.insert(0, str(d))
    from evil import Payload
    sys.path.remove(str(d))
    for name in ("init", "rm", "reference"):  # model.pt runs a command when unpickled in full
        copy_ckpt(d / ("rm" if name == "rm" else "sft"), d / f"evil-{name}")
        with open(d / f"evil-{name}" / "ckpt" / "model.pt", "wb") as f:
            pickle.dump({"transformer.wte.weight": Payload()}, f)
    copy_ckpt(d / "sft", d / "evil-state")  # --resume reads state.pt too
    torch.save({"optimizer": Payload(), "rng": {}, "step": 2, "elapsed": 0.0}, d / "evil-state" / "ckpt" / "state.pt")
    torch.load(d / "evil-state" / "ckpt" / "state.pt", weights_only=False)  # the payload is live: a full load
    assert (d / "pwned").exists()  # runs it, so the rows' check that no row did can fail
    (d / "pwned").unlink()

    copy_ckpt(d / "sft", d / "other-task", meta=lambda m: {**m, "task": "sentiment"})
    # a DPO run in OUT whose tokenizer (same size, other merges) is not --init's: not a run from that --init
    copy_ckpt(d / "sft", d / "other-tokenizer", meta=lambda m: {**m, "kind": "dpo"})
    train_bpe(get_task("sentiment").corpus(300, seed=0), sft.tokenizer.vocab_size).save(
        d / "other-tokenizer" / "ckpt" / "tokenizer.json")
    copy_ckpt(d / "rm", d / "rm-other-task", meta=lambda m: {**m, "task": "sentiment"})
    copy_ckpt(d / "sft", d / "nan-weights", weights=lambda s: {k: v * float("nan") if k.endswith("wte.weight") else v
                                                               for k, v in s.items()})
    copy_ckpt(d / "sft", d / "x1000", weights=lambda s: {k: v * 1000 for k, v in s.items()})
    copy_ckpt(d / "sft", d / "x1e21", weights=lambda s: {k: v * 1e21 for k, v in s.items()})  # finite, norm is not
    for name, change in (("kind-object", {"kind": {"__reduce__": "os.system"}}), ("step-string", {"step": "2"}),
                         ("task-number", {"task": 7}), ("elapsed-nan", {"elapsed_s": float("nan")}),
                         ("adapter-rank", {"adapter": {"lora": {"r": -1, "alpha": 2.0, "dropout": 0.0,
                                                                "targets": ["c_attn"]}, "prompt_tuning": None,
                                                       "base": {"path": str(d / "base"), "fingerprint": "0" * 16}}})):
        copy_ckpt(d / "sft", d / f"meta-{name}", meta=lambda m: {**m, **change})
    copy_ckpt(d / "base", d / "state-step-string")
    state = torch.load(d / "state-step-string" / "ckpt" / "state.pt", weights_only=True)
    torch.save({**state, "step": "2"}, d / "state-step-string" / "ckpt" / "state.pt")
    copy_ckpt(d / "sft", d / "list-weights", weights=lambda s: list(s.values()))
    copy_ckpt(d / "sft", d / "list-meta", meta=lambda m: [m])
    copy_ckpt(d / "sft", d / "str-sizes", config=lambda c: {**c, "n_embd": str(c["n_embd"])})
    copy_ckpt(d / "sft", d / "bad-heads", config=lambda c: {**c, "n_head": 3})
    copy_ckpt(d / "sft", d / "huge-block", config=lambda c: {**c, "block_size": 10**12})
    copy_ckpt(d / "sft", d / "float-block", config=lambda c: {**c, "block_size": 1e12})

    demos = get_task("arith").demos("train", 8, seed=1)
    pairs = [{"prompt": x["messages"][0]["content"], "chosen": f"The answer is {x['answer']}.",
              "rejected": f"The answer is {int(x['answer']) + 1}."} for x in demos]
    lines = lambda rows: "".join(json.dumps(x) + "\n" for x in rows)  # noqa: E731
    (d / "pairs.jsonl").write_text(lines(pairs))
    (d / "same-pairs.jsonl").write_text(lines({**p, "rejected": p["chosen"]} for p in pairs))
    (d / "empty-chosen.jsonl").write_text(lines([{"prompt": "2+2?", "chosen": [{"role": "assistant", "content": ""}],
                                                  "rejected": "5"}]))
    (d / "latin1.jsonl").write_bytes(b'{"prompt": "caf\xe9", "completion": "ok"}\n')
    (d / "text.jsonl").write_text(lines([{"text": "plain prose"}, {"text": "no turns to join"}]))
    (d / "no-content.jsonl").write_text(lines([{"messages": [{"role": "user", "name": "x"},
                                                             {"role": "assistant", "content": "hi"}]}]))
    (d / "empty-completion.jsonl").write_text(lines([{"prompt": "hi", "completion": [{"role": "assistant",
                                                                                       "content": " "}]}]))
    (d / "a-file").write_text("not a directory\n")
    (d / "a-dir").mkdir()

    # Hugging Face folders of a tiny Llama-style model, each broken in one way
    llama = GPTConfig(vocab_size=sft.tokenizer.vocab_size, block_size=96, n_layer=1, n_head=2, n_embd=32, bias=False,
                      norm="rmsnorm", pos="rope", mlp="swiglu", n_kv_head=1)
    for name, change in (("gemma", {"model_type": "gemma"}), ("yarn", {"rope_scaling": {"rope_type": "yarn",
                                                                                           "factor": 4.0}}),
                         ("sliding", {"model_type": "mistral", "sliding_window": 4096}),
                         ("moe", {"num_local_experts": 8})):
        out = export_hf(GPT(llama), sft.tokenizer, d / f"hf-{name}")
        (out / "config.json").write_text(json.dumps({**json.loads((out / "config.json").read_text()), **change}))
    # transformers 5's schema: an unknown rope_type in rope_parameters; rope_theta in neither place
    for name, edit in (("rope-dynamic", lambda c: {**c, "rope_scaling": None, "rope_parameters": {
                            "rope_type": "dynamic", "factor": 2.0, "rope_theta": c["rope_theta"]}}),
                       ("no-theta", lambda c: {**{k: v for k, v in c.items() if k != "rope_theta"},
                                               "rope_parameters": {"rope_type": "default"}})):
        out = export_hf(GPT(llama), sft.tokenizer, d / f"hf-{name}")
        (out / "config.json").write_text(json.dumps(edit(json.loads((out / "config.json").read_text()))))
    export_hf(GPT(llama), sft.tokenizer, d / "hf-shard", max_shard_bytes=20_000)
    sorted((d / "hf-shard").glob("model-*.safetensors"))[1].unlink()
    for kind in ("WordPiece", "Unigram"):
        out = export_hf(GPT(llama), sft.tokenizer, d / f"hf-{kind}")
        tj = json.loads((out / "tokenizer.json").read_text())
        (out / "tokenizer.json").write_text(json.dumps({**tj, "model": {"type": kind, "vocab": {}}}))
    # GGUF files (minipost/gguf.py): cut short, a quantisation minipost does not read, another architecture
    x = struct.pack("<64f", *range(64))  # a (2, 32) float32 tensor
    (d / "truncated.gguf").write_bytes(tiny_gguf("llama", [("token_embd.weight", 0, (32, 2), x)])[:-40])
    # ggml type 14 is Q6_K: 210 bytes per block of 256
    (d / "q6k.gguf").write_bytes(tiny_gguf("llama", [("blk.0.attn_q.weight", 14, (256, 1), bytes(210))]))
    (d / "gemma.gguf").write_bytes(tiny_gguf("gemma", [("token_embd.weight", 0, (32, 2), x)]))
    return d


def tiny_gguf(arch: str, tensors) -> bytes:
    """GGUF v3 bytes written by hand: general.architecture and tensors [(name, ggml type, ne (fastest dimension
    first), data)], aligned to 32 bytes (tests/test_gguf.py writes through the gguf package instead)."""
    def string(s):
        return struct.pack("<Q", len(s.encode())) + s.encode()

    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), 1) + string("general.architecture") + struct.pack("<I", 8)
    head += string(arch)
    data = b""
    for name, kind, ne, raw in tensors:
        head += string(name) + struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, kind, len(data))
        data += raw + bytes(-len(raw) % 32)
    return head + bytes(-len(head) % 32) + data


# ------------------------------------------------------------------------------------ the table

SFT = ["--n-eval", "1", "--max-new-tokens", "2", "--batch-size", "4"]  # train_sft.py at its cheapest
RL = ["--n-eval", "1", "--n-kl", "1", "--max-new-tokens", "4", "--warmup", "1", "--batch-size", "2"]  # train_rlhf.py
ROWS = [  # (id, entry, argv with {fx} for the fixture directory, exit code, what the error line must say)
    # 1. training that goes non-finite: refused at parse time, or stopped before the step is logged or saved (exit 1)
    ("dpo-x1000-weights", "rlhf", "--algo dpo --init {fx}/x1000 --data {fx}/pairs.jsonl --max-steps 2 --batch-size 4",
     1, "step 1: gradient norm is nan"),
    # the case: the loss and gradient norm stay finite (a collapsed policy's GRPO loss can be 0), the
    # weights reach 1e30 (finite, their float32 norm is not); at lr 1e10 the weights stay within it and the KL of
    # the next rollout goes NaN first
    ("grpo-lr-1e30", "rlhf", "--algo grpo --init {fx}/sft --resume --k 2 --reward rewards:length --lr 1e30 "
     "--grad-clip 0 --max-steps 5", 1, "step 3: parameter norm is inf; training diverged"),
    ("grpo-lr-1e10", "rlhf", "--algo grpo --init {fx}/sft --resume --k 2 --reward rewards:length --lr 1e10 "
     "--grad-clip 0 --max-steps 5 --eval-every 100", 1, "step 4: kl is nan; training diverged"),
    ("ppo-lr-1e30", "rlhf", "--algo ppo --init {fx}/sft --resume --reward rewards:length --lr 1e30 --grad-clip 0 "
     "--max-steps 5 --epochs 1", 1, "step 3: parameter norm is inf"),
    ("grpo-reward-1e39", "rlhf", "--algo grpo --init {fx}/sft --reward rewards:huge --max-steps 2 --k 2",
     2, "step 1: rewards:huge gave a reward beyond float32's range (|r| > 3.4e38)"),
    ("base-lr-1e30", "base", "--resume --lr 1e30 --grad-clip 0 --max-steps 6 --ckpt-every 100", 1,
     "step 3: parameter norm is inf; training diverged"),
    ("sft-lr-1e30", "sft", "--resume --init {fx}/base --lr 1e30 --grad-clip 0 --max-steps 6 --ckpt-every 100",
     1, "step 3: parameter norm is inf; training diverged"),
    ("bon-reward-sum-overflow", "bon", "--init {fx}/sft --reward rewards:near_max --n 2 --n-prompts 2", 2,
     "rewards:near_max: the mean score is inf (its rewards add up beyond float64's range); rescale them"),
    ("sft-init-weights-1e21", "sft", "--init {fx}/x1e21", 2,
     "holds NaN or infinite values, or values so large that its norm overflows float32"),
    ("dpo-beta-nan", "rlhf", "--algo dpo --init {fx}/sft --beta nan", 2, "--beta must be > 0 (got nan)"),
    ("dpo-beta-0", "rlhf", "--algo dpo --init {fx}/sft --beta 0", 2, "--beta must be > 0 (got 0.0)"),
    ("grpo-temperature-nan", "rlhf", "--algo grpo --init {fx}/sft --temperature nan", 2,
     "--temperature must be >= 0.01 (got nan)"),
    ("ppo-temperature-1e-39", "rlhf", "--algo ppo --init {fx}/sft --temperature 1e-39", 2,
     "--temperature must be >= 0.01 (got 1e-39)"),
    ("bon-temperature-nan", "bon", "--init {fx}/sft --temperature nan", 2,
     "--temperature must be 0 (greedy) or >= 0.01 (got nan)"),
    ("sft-init-nan-weights", "sft", "--init {fx}/nan-weights", 2, "weight transformer.wte.weight holds NaN"),
    ("dpo-init-nan-weights", "rlhf", "--algo dpo --init {fx}/nan-weights", 2, "holds NaN or infinite values"),
    ("bon-init-nan-weights", "bon", "--init {fx}/nan-weights", 2, "holds NaN or infinite values"),
    # 2. wrong checkpoints and data
    ("sft-init-reward-model", "sft", "--init {fx}/rm", 2, "--init {fx}/rm is a reward model (kind 'rm')"),
    ("sft-init-other-task", "sft", "--init {fx}/other-task", 2,
     "trained on task 'sentiment', not --task arith (pass --allow-other-task"),
    ("grpo-init-other-task", "rlhf", "--algo grpo --init {fx}/other-task", 2, "trained on task 'sentiment'"),
    ("ppo-rm-other-task", "rlhf", "--algo ppo --init {fx}/sft --reward-model {fx}/rm-other-task", 2,
     "--reward-model {fx}/rm-other-task: trained on task 'sentiment'"),
    ("bon-init-other-task", "bon", "--init {fx}/other-task", 2, "trained on task 'sentiment'"),
    ("eval-init-other-task", "eval", "--init {fx}/other-task --task arith", 2, "trained on task 'sentiment'"),
    ("eval-reference-other-task", "eval", "--init {fx}/sft --reference {fx}/other-task --task arith", 2,
     "--reference {fx}/other-task: trained on task 'sentiment'"),
    ("dpo-identical-pairs", "rlhf", "--algo dpo --init {fx}/sft --data {fx}/same-pairs.jsonl", 2,
     "none of its 8 pairs is usable (8 with identical chosen and rejected"),
    ("dpo-empty-chosen", "rlhf", "--algo dpo --init {fx}/sft --data {fx}/empty-chosen.jsonl", 2,
     "empty-chosen.jsonl:1: chosen[0] is an assistant message with empty content"),
    ("sft-empty-completion", "sft", "--init {fx}/base --data {fx}/empty-completion.jsonl", 2,
     "empty-completion.jsonl:1: completion[0] is an assistant message with empty content"),
    ("base-resume-other-task", "base", "--task sentiment --resume --out {fx}/base", 2,
     "--resume: {fx}/base/ckpt holds a run on task 'arith', not on --task sentiment"),
    ("base-resume-sft-run", "base", "--resume --out {fx}/sft", 2, "holds a 'sft' run, not a 'base' one"),
    ("sft-resume-base-run", "sft", "--resume --init {fx}/base --out {fx}/base", 2, "holds a 'base' run, not a 'sft'"),
    ("dft-resume-sft-run", "sft", "--resume --loss dft --init {fx}/base --out {fx}/sft", 2,
     "holds a 'sft' run, not a 'dft' one"),
    ("rlhf-resume-other-tokenizer", "rlhf", "--algo dpo --init {fx}/sft --resume --out {fx}/other-tokenizer", 2,
     "--resume: {fx}/other-tokenizer/ckpt has another tokenizer than --init {fx}/sft"),
    ("eval-reference-reward-model", "eval", "--init {fx}/sft --reference {fx}/rm --task arith", 2,
     "--reference {fx}/rm is a reward model, not a policy"),
    # 3. tracebacks that must be one line: malicious pickles (refused, never run), data, reward functions
    ("sft-init-malicious", "sft", "--init {fx}/evil-init", 2, "model.pt refused as unsafe: not a plain tensor file"),
    ("ppo-reward-model-malicious", "rlhf", "--algo ppo --init {fx}/sft --reward-model {fx}/evil-rm", 2,
     "--reward-model {fx}/evil-rm: model.pt refused as unsafe"),
    ("eval-reference-malicious", "eval", "--init {fx}/sft --reference {fx}/evil-reference --task arith", 2,
     "--reference {fx}/evil-reference: model.pt refused as unsafe"),
    ("sft-resume-malicious-state", "sft", "--resume --init {fx}/base --out {fx}/evil-state", 2,
     "state.pt refused as unsafe"),
    ("base-resume-malicious-model", "base", "--resume --out {fx}/evil-init", 2, "model.pt refused as unsafe"),
    ("sft-data-not-utf8", "sft", "--init {fx}/base --data {fx}/latin1.jsonl", 2,
     "latin1.jsonl:1: not UTF-8 text (byte 15 of the line)"),
    ("sft-turns-0", "sft", "--init {fx}/base --turns 0", 2, "--turns must be >= 1"),
    ("sft-turns-text-rows", "sft", "--init {fx}/base --data {fx}/text.jsonl --turns 2", 2,
     "text.jsonl:1: --turns joins chat demonstrations (messages, or prompt + completion)"),
    ("sft-data-role-without-content", "sft", "--init {fx}/base --data {fx}/no-content.jsonl", 2,
     "no-content.jsonl:1: messages[0] must be an object with 'role' and 'content'"),
    ("grpo-reward-raises", "rlhf", "--algo grpo --init {fx}/sft --reward rewards:crash --max-steps 1 --k 2", 2,
     "reward function rewards:crash failed: ZeroDivisionError: division by zero (raised at rewards.py:6)"),
    ("bon-reward-raises", "bon", "--init {fx}/sft --reward rewards:crash --n-prompts 1 --n 2 --max-new-tokens 2", 2,
     "reward function rewards:crash failed: ZeroDivisionError"),
    ("sft-lr-nan", "sft", "--init {fx}/base --lr nan", 2, "--lr must be > 0 (got nan)"),
    ("base-lr-negative", "base", "--lr -1", 2, "--lr must be > 0 (got -1.0)"),
    ("rlhf-lr-inf", "rlhf", "--algo rft --init {fx}/sft --lr inf", 2, "--lr must be > 0 (got inf)"),
    ("base-out-unwritable", "base", "--out {fx}/a-file/run", 2,
     "--out {fx}/a-file/run: cannot write there (NotADirectoryError: Not a directory)"),
    ("sft-out-unwritable", "sft", "--init {fx}/base --out {fx}/a-file/run", 2, "cannot write there"),
    ("dpo-out-unwritable", "rlhf", "--algo dpo --init {fx}/sft --out {fx}/a-file/run", 2, "cannot write there"),
    ("bon-out-unwritable", "bon", "--init {fx}/sft --out {fx}/a-file/run", 2, "cannot write there"),
    ("eval-out-unwritable", "eval", "--init {fx}/sft --task arith --out {fx}/a-file/row.json", 2,
     "--out {fx}/a-file/row.json: cannot write there ({fx}/a-file is a file, not a directory)"),
    ("eval-out-directory", "eval", "--init {fx}/sft --task arith --out {fx}/a-dir", 2, "is a directory"),
    ("pipeline-out-unwritable", "pipeline", "--quick --out {fx}/a-file/study --only arith/base", 2,
     "cannot write there"),
    ("bon-out-existing-file", "bon", "--init {fx}/sft --out {fx}/a-file", 2,
     "--out {fx}/a-file: cannot write there ({fx}/a-file is a file, not a directory)"),
    ("config-string-sizes", "sft", "--init {fx}/str-sizes", 2,
     "config.json is unusable (ValueError: n_embd must be an integer in 1..32768, got '128')"),
    ("config-heads-do-not-divide", "rlhf", "--algo grpo --init {fx}/bad-heads", 2,
     "n_embd 128 is not divisible by n_head 3"),
    ("config-block-size-1e12", "bon", "--init {fx}/huge-block", 2, "block_size must be an integer in 1..131072"),
    ("config-block-size-float", "eval", "--init {fx}/float-block --task arith", 2,
     "block_size must be an integer in 1..131072, got 1000000000000.0"),
    ("model-pt-list", "sft", "--init {fx}/list-weights", 2, "model.pt holds a list, not a dict of named tensors"),
    ("meta-json-list", "bon", "--init {fx}/list-meta", 2,
     "--init {fx}/list-meta: meta.json is unusable (ValueError: holds a list, not an object)"),
    # every field of meta.json and state.pt typed (minipost/meta.py): none reaches a comparison or a row
    ("meta-kind-object", "sft", "--init {fx}/meta-kind-object", 2, "--init {fx}/meta-kind-object: meta.json: field "
     "'kind' must be one of base, sft, dft, rm, dpo, ppo, nft, rft, grpo, got {{'__reduce__': 'os.system'}}"),
    ("meta-step-string", "eval", "--init {fx}/meta-step-string --task arith", 2,
     "meta.json: field 'step' must be an integer >= 0, got '2'"),
    ("meta-task-number", "rlhf", "--algo grpo --init {fx}/meta-task-number", 2,
     "meta.json: field 'task' must be null or a string, got 7"),
    ("meta-elapsed-nan", "eval", "--init {fx}/meta-elapsed-nan --task arith", 2,
     "meta.json: field 'elapsed_s' must be a number >= 0, got nan"),
    ("meta-adapter-rank", "bon", "--init {fx}/meta-adapter-rank", 2,
     "meta.json: field 'adapter.lora.r' must be an integer in 1..32768, got -1"),
    ("state-step-string", "base", "--resume --out {fx}/state-step-string", 2,
     "--resume from {fx}/state-step-string/ckpt: state.pt: field 'step' must be an integer >= 0, got '2'"),
    ("base-vocab-size-10", "base", "--vocab-size 10 --corpus-docs 50", 2, "--vocab-size: vocab_size must be at least"),
    ("base-block-size-negative", "base", "--block-size -5", 2, "--block-size must be >= 2 (got -5)"),
    ("base-block-size-huge", "base", "--block-size 1000000000 --corpus-docs 50", 2,
     "block_size must be an integer in 1..131072"),
    ("bon-sweep-huge", "bon", "--init {fx}/sft --sweep 99999999999999999999", 2,
     "--sweep: 199999999999999999998 samples per prompt (max N x --pool-factor); at most 65536"),
    ("bon-n-huge", "bon", "--init {fx}/sft --n 100000", 2, "--n: 100000 samples per prompt; at most 65536"),
    ("base-data-directory", "base", "--data {fx}/a-dir", 2, "--data {fx}/a-dir: is a directory, not a file"),
    ("sft-data-directory", "sft", "--init {fx}/base --data {fx}/a-dir", 2, "{fx}/a-dir: is a directory"),
    ("rm-data-directory", "rlhf", "--algo rm --init {fx}/sft --data {fx}/a-dir", 2, "is a directory"),
    ("bon-data-directory", "bon", "--init {fx}/sft --data {fx}/a-dir", 2, "is a directory"),
    # 4. silent where the help promised otherwise
    ("pipeline-jobs-0", "pipeline", "--quick --jobs 0", 2, "--jobs must be >= 1"),
    # flag ranges beyond the list: every float flag refuses nan and its out-of-range values
    ("base-dropout-nan", "base", "--dropout nan", 2, "--dropout must be in [0, 1) (got nan)"),
    ("sft-grad-clip-negative", "sft", "--init {fx}/base --grad-clip -1", 2, "--grad-clip must be >= 0"),
    ("dpo-label-smoothing", "rlhf", "--algo dpo --init {fx}/sft --label-smoothing 0.7", 2,
     "--label-smoothing must be in [0, 0.5) (got 0.7)"),
    ("ppo-gae-lambda", "rlhf", "--algo ppo --init {fx}/sft --gae-lambda 2", 2, "--gae-lambda must be in [0, 1]"),
    ("sft-lora-alpha-nan", "sft", "--init {fx}/base --lora-r 4 --lora-alpha nan", 2, "--lora-alpha must be > 0"),
    ("bon-top-p-nan", "bon", "--init {fx}/sft --top-p nan", 2, "--top-p must be in (0, 1]"),
    # already tested elsewhere in the project, repeated here so that the table holds every entry point's errors
    ("base-unknown-task", "base", "--task nope", 2, "--task: unknown task 'nope'"),
    ("base-missing-data", "base", "--data missing.txt", 2, "--data missing.txt: no such file"),
    ("base-max-steps-0", "base", "--max-steps 0", 2, "--max-steps must be >= 1"),
    ("sft-missing-init", "sft", "--init {fx}/nowhere", 2, "not a minipost checkpoint"),
    ("sft-n-train-0", "sft", "--init {fx}/base --n-train 0", 2, "--n-train must be >= 1"),
    ("dpo-init-base", "rlhf", "--algo dpo --init {fx}/base", 2, "is a base model (kind 'base')"),
    ("rm-init-reward-model", "rlhf", "--algo rm --init {fx}/rm", 2, "is a reward model; pass the SFT checkpoint"),
    ("ppo-reward-model-sft", "rlhf", "--algo ppo --init {fx}/sft --reward-model {fx}/sft", 2,
     "not a reward model (kind 'sft'"),
    ("grpo-reward-no-module", "rlhf", "--algo grpo --init {fx}/sft --reward no_such_module:f", 2,
     "cannot import module 'no_such_module'"),
    ("grpo-pairs-from-demos", "rlhf", "--algo grpo --init {fx}/sft --pairs-from-demos", 2,
     "it is for --algo rm or dpo, not grpo"),
    ("dpo-val-data-alone", "rlhf", "--algo dpo --init {fx}/sft --val-data {fx}/pairs.jsonl", 2,
     "--val-data needs --data"),
    ("rlhf-resume-other-algo", "rlhf", "--algo dpo --init {fx}/sft --resume --out {fx}/sft", 2,
     "holds a 'sft' run, not a 'dpo' one"),
    ("sft-lora-r-0", "sft", "--init {fx}/base --lora-r 0", 2, "--lora-r must be >= 1"),
    ("bon-n-0", "bon", "--init {fx}/sft --n 0", 2, "--n must be >= 1"),
    ("bon-sweep-0", "bon", "--init {fx}/sft --sweep 0,2", 2, "every N must be >= 1"),
    ("bon-greedy-n-4", "bon", "--init {fx}/sft --temperature 0 --n 4", 2, "greedy"),
    ("bon-init-reward-model", "bon", "--init {fx}/rm", 2, "is a reward model"),
    ("bon-retrieve-negative", "bon", "--init {fx}/sft --retrieve -1", 2, "--retrieve must be >= 0"),
    ("eval-init-reward-model", "eval", "--init {fx}/rm --task arith", 2,
     "--init {fx}/rm is a reward model, not a policy"),
    ("eval-validation-from", "eval", "--init {fx}/sft --task arith --validation-from -1", 2,
     "--validation-from must be >= 0"),
    ("eval-missing-reward-model", "eval", "--init {fx}/sft --task arith --reward-model {fx}/nowhere", 2,
     "--reward-model {fx}/nowhere: not a minipost checkpoint"),
    ("pipeline-only-unknown", "pipeline", "--quick --only arith/bse", 2, "--only arith/bse: no stage name"),
    ("pipeline-report-only-missing", "pipeline", "--quick --report-only --out {fx}/nowhere", 2,
     "--report-only: {fx}/nowhere does not exist"),
    # Hugging Face folders of what minipost does not compute, or cannot read
    ("sft-init-hf-gemma", "sft", "--init {fx}/hf-gemma", 2,
     "--init {fx}/hf-gemma: {fx}/hf-gemma/config.json: model_type 'gemma' is not supported"),
    ("dpo-init-hf-yarn", "rlhf", "--algo dpo --init {fx}/hf-yarn", 2, "rope_scaling type 'yarn' is not supported"),
    ("grpo-init-hf-sliding-window", "rlhf", "--algo grpo --init {fx}/hf-sliding", 2,
     "sliding_window=4096: sliding-window attention is not supported"),
    ("bon-init-hf-moe", "bon", "--init {fx}/hf-moe", 2, "mixture-of-experts models are not supported"),
    ("sft-init-hf-rope-type-unknown", "sft", "--init {fx}/hf-rope-dynamic", 2,
     "{fx}/hf-rope-dynamic/config.json: rope_parameters type 'dynamic' is not supported"),
    ("eval-init-hf-no-rope-theta", "eval", "--init {fx}/hf-no-theta --task arith", 2,
     "{fx}/hf-no-theta/config.json: rope_theta is neither at the top level nor in rope_parameters"),
    ("eval-init-hf-missing-shard", "eval", "--init {fx}/hf-shard --task arith", 2,
     "model.safetensors.index.json: shard model-00002-of-"),
    ("sft-init-hf-wordpiece", "sft", "--init {fx}/hf-WordPiece", 2,
     "tokenizer.json: a WordPiece tokenizer; minipost reads byte-level BPE tokenizers only"),
    ("ppo-init-hf-unigram", "rlhf", "--algo ppo --init {fx}/hf-Unigram", 2, "a Unigram tokenizer"),
    # GGUF files
    ("sft-init-gguf-truncated", "sft", "--init {fx}/truncated.gguf", 2,
     "--init {fx}/truncated.gguf: {fx}/truncated.gguf: truncated: tensor token_embd.weight ends at byte"),
    ("dpo-init-gguf-q6k", "rlhf", "--algo dpo --init {fx}/q6k.gguf", 2,
     "tensor blk.0.attn_q.weight is Q6_K, which minipost does not read"),
    ("bon-init-gguf-gemma", "bon", "--init {fx}/gemma.gguf", 2,
     "general.architecture 'gemma' is not supported (minipost reads llama GGUF files)"),
]
FAST = {"base": ["--corpus-docs", "300", "--vocab-size", "320", "--block-size", "96", "--batch-size", "4",
                 "--eval-batches", "1"], "sft": SFT, "rlhf": RL, "bon": ["--max-new-tokens", "2", "--n-prompts", "1"],
        "eval": ["--n-eval", "1", "--max-new-tokens", "2", "--k", "1"], "pipeline": []}
# rows that go non-finite after training has started: OUT already holds a checkpoint, which must stay as it was
DIVERGE = {"dpo-x1000-weights": "sft", "grpo-reward-1e39": "sft", "base-lr-1e30": "base", "sft-lr-1e30": "sft",
           "grpo-lr-1e30": "grpo", "grpo-lr-1e10": "grpo", "ppo-lr-1e30": "ppo"}


def row_argv(fx, entry, argv, out):
    args = argv.format(fx=fx).split()
    if "--out" not in args and entry in ("base", "sft", "rlhf", "bon"):
        args += ["--out", str(out)]
    return [*FAST[entry], *args]  # a row's own flags come last, so they win


@pytest.mark.parametrize("name,entry,argv,code,message", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_one_line(run, fx, tmp_path, name, entry, argv, code, message):
    out = tmp_path / "out"
    if name in DIVERGE:
        shutil.copytree(fx / DIVERGE[name], out)
        before = digest(out / "ckpt")
    r = run(entry, *row_argv(fx, entry, argv, out), cwd=fx)
    assert r.returncode == code, r.stderr[-3000:]
    line = error_line(r)
    assert message.format(fx=fx) in line, line
    if name in DIVERGE:  # stopped before the step was saved: the checkpoint in OUT is the one that was there
        assert digest(out / "ckpt") == before
        assert load_checkpoint(out).meta["step"] == 2
        logged = read_metrics(out / "metrics.jsonl") if (out / "metrics.jsonl").exists() else []
        assert all(math.isfinite(v) for m in logged for v in m.values() if isinstance(v, float))  # nor logged
    assert not (fx / "pwned").exists()  # no checkpoint ran its payload


def test_fork_server_matches_a_fresh_python(fx, run, tmp_path):
    """A few rows, one per entry point, also as plain `python SCRIPT ...` processes: the same exit code and line."""
    for name in ("base-lr-negative", "sft-init-malicious", "dpo-beta-nan", "bon-out-existing-file",
                 "eval-out-unwritable", "pipeline-jobs-0"):
        _, entry, argv, code, _ = next(row for row in ROWS if row[0] == name)
        args = row_argv(fx, entry, argv, tmp_path / name)
        fresh, forked = fresh_python(entry, *args, cwd=fx), run(entry, *args, cwd=fx)
        assert fresh.returncode == forked.returncode == code, (name, fresh.stderr[-2000:])
        assert error_line(fresh) == error_line(forked), name


def test_huge_finite_rewards_print_in_general_notation(fx, run, tmp_path):
    """A reward of 1e300 is a number the summary prints as 1e+300, not as 301 digits; the file keeps it exactly."""
    r = run("bon", *FAST["bon"], "--init", fx / "sft", "--reward", "rewards:e300", "--n", "2", "--out", tmp_path,
            cwd=fx)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "mean score 1e+300 (all candidates: 1e+300)" in r.stderr
    assert max(len(word) for word in r.stderr.split()) < 100
    assert [json.loads(line)["score"] for line in (tmp_path / "bon.jsonl").read_text().splitlines()] == [1e300]


def test_allow_other_task_overrides_the_task_check(fx, run, tmp_path):
    r = run("sft", *SFT, "--init", fx / "other-task", "--allow-other-task", "--max-steps", "1", "--out",
            tmp_path / "out")
    assert r.returncode == 0, r.stderr[-2000:]
    assert load_checkpoint(tmp_path / "out").meta["task"] == "arith"


def test_resume_without_a_checkpoint_says_so(fx, run, tmp_path):
    for entry, args in (("base", FAST["base"]), ("sft", [*SFT, "--init", fx / "base"])):
        out = tmp_path / entry
        r = run(entry, *args, "--resume", "--max-steps", "1", "--out", out)
        assert r.returncode == 0, r.stderr[-2000:]
        assert f"--resume: no checkpoint in {out / 'ckpt'} yet, starting from step 0" in r.stdout
        assert [m["step"] for m in read_metrics(out / "metrics.jsonl")][-1] == 1


def test_identical_pairs_are_counted_and_dropped(fx, capsys):
    from minipost.preferences import load_pairs
    mixed = fx / "mixed-pairs.jsonl"
    mixed.write_text((fx / "pairs.jsonl").read_text() + (fx / "same-pairs.jsonl").read_text())
    pairs, dropped = load_pairs(mixed, load_checkpoint(fx / "sft").tokenizer, 96)
    assert len(pairs) == 8 and dropped["with identical chosen and rejected"] == 8
    assert "8 of 16 pairs kept; dropped: 8 with identical chosen and rejected" in capsys.readouterr().out
