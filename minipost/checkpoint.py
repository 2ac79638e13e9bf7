"""Checkpoints: one directory a model, written atomically, loaded without executing code.

    OUT/ckpt/model.pt        state dict (float32 tensors only; read back with torch.load(weights_only=True))
    OUT/ckpt/config.json     GPTConfig
    OUT/ckpt/tokenizer.json  the tokenizer, as text
    OUT/ckpt/meta.json       {"script", "kind", "task", "args", "step", "metrics", ...}
    OUT/ckpt/state.pt        resume state: optimizer, RNG, step (training scripts only)
    OUT/metrics.jsonl        the run's metrics, beside the checkpoint (cli.MetricsLog)

An adapted model (LoRA or prompt tuning, minipost/adapters.py) saves only what its base lacks: model.pt holds
the adapters (and a reward model's scalar head), meta.json's "adapter" names the base checkpoint and its
fingerprint. Loading reads the base first (recursively: a base may itself be adapted, then it is merged),
checks the fingerprint, and attaches the adapters.

Atomic: everything is written to OUT/ckpt.tmp, then OUT/ckpt is renamed to OUT/ckpt.old, ckpt.tmp to ckpt,
and ckpt.old removed. A run killed at any point leaves either ckpt or ckpt.old complete, and the loader
takes whichever is there. `--init OUT` and `--init OUT/ckpt` both work, and so does a Hugging Face folder:
GPT-2 (minipost/gpt2.py), e.g. `--init path/to/gpt2`, or Llama / Qwen2 / Mistral (minipost/hf.py), e.g.
`--init path/to/SmolLM2-135M-Instruct`, and so does a llama GGUF file (minipost/gguf.py), e.g.
`--init SmolLM2-135M-Instruct.Q4_1.gguf`.

Loading refuses, with one line naming the flag and the file: a pickle that needs more than tensors (never run),
a config whose sizes no model could have, a meta.json or state.pt field of the wrong type or range
(minipost/meta.py), weights that do not fit the config or hold NaN (or overflow float32's norm), and a checkpoint
of another task than the script's (meta "task": the built-in task it was trained on; none for a base trained on
--data).
Which kinds a script accepts (a policy, a reward model, a run of its own kind for --resume) is the script's call.
"""
import json
import pickle
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .adapters import adapter_keys, attach, fingerprint, has_adapters, merge_adapters
from .cli import UserError
from .gguf import is_gguf_file, load_gguf
from .gpt2 import is_gpt2_folder, load_gpt2_folder
from .hf import is_hf_folder, load_hf_folder
from .meta import check_meta, check_train_state
from .model import GPT, GPTConfig
from .tokenizer import Tokenizer

FILES = ("model.pt", "config.json", "tokenizer.json", "meta.json")


@dataclass
class Checkpoint:
    model: GPT
    tokenizer: Tokenizer
    meta: dict
    path: Path

    @property
    def is_reward_model(self) -> bool:
        return self.meta.get("kind") == "rm" or self.model.config.scalar_head


def save_checkpoint(out_dir, model: GPT, tokenizer: Tokenizer, meta: dict, train_state: dict | None = None):
    """Write OUT/ckpt atomically. meta must be JSON-serialisable; train_state holds tensors and numbers."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp, final, old = out_dir / "ckpt.tmp", out_dir / "ckpt", out_dir / "ckpt.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    keep = set(adapter_keys(model)) if has_adapters(model) else None  # an adapted model: only what the base lacks
    if keep is not None:
        meta = {**meta, "adapter": model.adapter}
    state = {k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu()
             for k, v in model.state_dict().items() if keep is None or k in keep}
    torch.save(state, tmp / "model.pt")
    (tmp / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2))
    tokenizer.save(tmp / "tokenizer.json")
    if train_state is not None:
        torch.save(train_state, tmp / "state.pt")
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))  # written last: its presence marks completeness
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(path) -> Path | None:
    """The complete checkpoint directory at `path` (OUT or OUT/ckpt), or None."""
    path = Path(path)
    for cand in (path / "ckpt", path / "ckpt.old", path):  # ckpt.old only survives a kill between two renames
        if all((cand / f).is_file() for f in FILES):
            return cand
    return None


def load_checkpoint(path, device="cpu", flag="--init", task=None) -> Checkpoint:
    """Rebuild model and tokenizer from a checkpoint directory. Raises UserError naming the path if unusable,
    or if `task` is given and the checkpoint records another (meta["task"]; a checkpoint that records none,
    a GPT-2 import or a base trained on --data, passes)."""
    where = f"{flag} {path}"
    ckpt = find_checkpoint(path)
    gguf = ckpt is None and is_gguf_file(path)
    if ckpt is None and (gguf or is_gpt2_folder(path) or is_hf_folder(path)):  # a GGUF file, a Hugging Face folder
        kind = "gguf" if gguf else "gpt2" if is_gpt2_folder(path) else "hf"
        try:
            model, tokenizer = {"gguf": load_gguf, "gpt2": load_gpt2_folder, "hf": load_hf_folder}[kind](path)
        except ValueError as e:
            raise UserError(f"{where}: {e}")
        return Checkpoint(model.to(device), tokenizer, {"kind": kind, "script": f"{kind} import", "step": 0},
                          Path(path))
    if ckpt is None:
        raise UserError(f"{where}: not a minipost checkpoint (expected {Path(path) / 'ckpt'} with "
                        f"{', '.join(FILES)})")
    def read(name, parse):
        try:
            return parse(ckpt / name)
        except (ValueError, TypeError, OSError) as e:
            raise UserError(f"{where}: {name} is unusable ({type(e).__name__}: {str(e).splitlines()[0]})")

    meta = check_meta(read("meta.json", json_object), f"{where}: meta.json")  # every field typed
    config = read("config.json", lambda f: GPTConfig.from_dict(json_object(f)))  # sizes checked before allocating
    tokenizer = read("tokenizer.json", Tokenizer.load)
    state = load_tensors(ckpt / "model.pt", where)
    # a diverged run's weights (cli.weights_finite_or_stop): NaN, infinite, or beyond a finite float32 norm
    bad = next((k for k, v in state.items() if v.is_floating_point() and
                not torch.linalg.vector_norm(v.float()).isfinite()), None)
    if bad is not None:
        raise UserError(f"{where}: weight {bad} holds NaN or infinite values, or values so large that its norm "
                        "overflows float32")
    have = meta.get("task")
    if task is not None and have is not None and have != task:
        raise UserError(f"{where}: trained on task '{have}', not --task {task} (pass --allow-other-task to use "
                        "it anyway)")
    model = GPT(config)
    try:
        if "adapter" in meta:
            model = load_adapted(model, meta["adapter"], state, device, where)
        else:
            model.load_state_dict(state)
    except RuntimeError as e:
        first = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln or "Missing" in ln
                      or "Unexpected" in ln), str(e).splitlines()[0])
        raise UserError(f"{where}: weights do not fit the saved config ({first})")
    if tokenizer.vocab_size > config.vocab_size:
        raise UserError(f"{where}: tokenizer has {tokenizer.vocab_size} tokens but the model only "
                        f"{config.vocab_size}")
    return Checkpoint(model.to(device), tokenizer, meta, ckpt)


def json_object(file: Path) -> dict:
    value = json.loads(file.read_text())
    if not isinstance(value, dict):
        raise ValueError(f"holds a {type(value).__name__}, not an object")
    return value


def load_tensors(file: Path, where: str) -> dict:
    """A dict of tensors saved by torch.save, read with weights_only=True: a pickle that needs anything but
    tensors and plain containers (code, custom classes) is refused, never run."""
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on its way to refusing a file
            warnings.simplefilter("ignore")
            state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's own message suggests weights_only=False: never repeat that
        raise UserError(f"{where}: {file.name} refused as unsafe: not a plain tensor file (the weights-only load "
                        "failed); minipost never executes code from a checkpoint")
    except Exception as e:  # truncated or garbage bytes surface as EOFError, KeyError, RuntimeError, ...
        raise UserError(f"{where}: {file.name} is unreadable ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise UserError(f"{where}: {file.name} holds a {type(state).__name__}, not a dict of named tensors")
    if file.name == "model.pt" and not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"{where}: {file.name} holds values that are not tensors")
    return state


def load_adapted(model: GPT, spec: dict, state: dict, device, where: str) -> GPT:
    """The base named in spec (merged, if it is adapted itself) under model's config, its fingerprint checked,
    with the adapters attached and their saved values loaded."""
    base_path = spec["base"]["path"]
    base = merge_adapters(load_checkpoint(base_path, device, flag=f"{where}: its base").model)
    if fingerprint(base) != spec["base"]["fingerprint"]:
        raise UserError(f"{where}: its adapters belong to a base with fingerprint {spec['base']['fingerprint']}, "
                        f"but {base_path} now holds {fingerprint(base)} (was the base retrained?)")
    model.load_state_dict(base.state_dict(), strict=False)  # a reward model's head is not in the base
    with torch.random.fork_rng(devices=[]):  # fresh adapter values, overwritten next: leave the caller's RNG alone
        attach(model, spec)
    missing, unexpected = model.load_state_dict(state, strict=False)
    want = set(adapter_keys(model))
    if unexpected or want - set(state):
        raise RuntimeError(f"Missing adapter tensors {sorted(want - set(state))[:3]}, unexpected {unexpected[:3]}")
    return model


def load_resumed(out, kind: str, device="cpu", task=None) -> Checkpoint | None:
    """--resume: OUT/ckpt of a run of this kind (meta["kind"]: base, sft, dft, or train_rlhf.py's --algo) and,
    if it records one, this task, or None, with a line saying so, when OUT holds no checkpoint yet (the run
    then starts at step 0)."""
    if find_checkpoint(out) is None:
        print(f"--resume: no checkpoint in {Path(out) / 'ckpt'} yet, starting from step 0")
        return None
    ck = load_checkpoint(out, device, flag="--resume from")
    if ck.meta.get("kind") != kind:
        raise UserError(f"--resume: {ck.path} holds a {ck.meta.get('kind')!r} run, not a {kind!r} one")
    if ck.meta.get("task") not in (None, task):  # a run continues on its own task, whatever --allow-other-task says
        asked = f"--task {task}" if task else "--data"  # task None: train_base.py on a text file
        raise UserError(f"--resume: {ck.path} holds a run on task '{ck.meta['task']}', not on {asked}")
    return ck


def load_train_state(ckpt_dir: Path) -> dict:
    """The resume state saved beside the weights (optimizer, RNG, step, elapsed, the trainer's own)."""
    f, where = Path(ckpt_dir) / "state.pt", f"--resume from {ckpt_dir}"
    if not f.is_file():
        raise UserError(f"{where}: no state.pt (the optimizer and RNG state a resume needs)")
    return check_train_state(load_tensors(f, where), f"{where}: state.pt")


def rng_state() -> dict:
    """Every RNG a training step touches (dropout, sampling); data order is derived from (seed, step) instead."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
