"""minipost and transformers 5 in one environment and one process, from any directory (issue 25, item 1).

transformers 5 depends on Hugging Face's `kernels` package (their kernel hub). minipost's Triton kernels are
`minipost.kernels`, so the top-level name `kernels` is theirs alone. Each check runs in a fresh interpreter,
once from the repository root (where a top-level `kernels/` folder would shadow theirs) and once from a folder
outside it (where theirs would shadow ours), and a wheel built from the checkout must carry minipost/kernels so
that a plain `pip install .` has them too.
"""
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# One process: transformers' model classes, their `kernels`, a forward of minipost's GPT (the attention goes
# through minipost.kernels) and an entry point's argument parser, then report where each package came from.
SCRIPT = r"""
import contextlib, importlib.metadata, io, json, runpy, sys
from transformers import GPT2LMHeadModel, LlamaForCausalLM
import kernels
import torch
import minipost, minipost.kernels
from minipost.model import GPT, GPTConfig

torch.manual_seed(0)
model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16)).eval()
with torch.no_grad():
    logits = model.logits(model(torch.randint(0, 50, (1, 8))))
help_text = io.StringIO()
sys.argv = ["minipost.evaluate", "--help"]
with contextlib.redirect_stdout(help_text):
    try:
        runpy.run_module("minipost.evaluate", run_name="__main__")
    except SystemExit as e:
        code = e.code
hub = importlib.metadata.distribution("kernels")  # the package index's `kernels`, as pip installed it
print(json.dumps({"kernels": kernels.__file__, "hub": str(hub.locate_file("kernels/__init__.py")),
                  "has_get_kernel": hasattr(kernels, "get_kernel"),
                  "minipost": sys.modules["minipost.model"].__file__, "minipost_kernels": minipost.kernels.__file__,
                  "logits": list(logits.shape), "finite": bool(logits.isfinite().all()), "help_exit": code,
                  "help": help_text.getvalue()[:200],
                  "classes": [GPT2LMHeadModel.__name__, LlamaForCausalLM.__name__]}))
"""


@pytest.mark.parametrize("where", ["repository-root", "outside"])
def test_transformers_and_minipost_in_one_process(where, tmp_path):
    pytest.importorskip("transformers", reason="needs transformers 5 (pip install -e '.[test]'; CI installs it)")
    cwd = REPO if where == "repository-root" else tmp_path
    # the child finds minipost as a user's interpreter does: from the installed package (README: pip install -e)
    r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    # Hugging Face's: the file pip installed for the `kernels` distribution, not a folder of the checkout
    assert Path(got["kernels"]).resolve() == Path(got["hub"]).resolve(), got
    assert Path(got["kernels"]).parent.parent.name in ("site-packages", "dist-packages"), got["kernels"]
    assert got["has_get_kernel"]  # the kernel hub's entry point
    assert Path(got["minipost"]).resolve().is_relative_to(REPO)
    assert Path(got["minipost_kernels"]).resolve() == REPO / "minipost" / "kernels" / "__init__.py"
    assert got["logits"] == [1, 8, 50] and got["finite"]
    assert got["help_exit"] == 0 and "usage:" in got["help"]
    assert got["classes"] == ["GPT2LMHeadModel", "LlamaForCausalLM"]


def test_a_plain_install_carries_the_kernels(tmp_path):
    """`pip install .` installs what the wheel holds: build one from a copy of the checkout (so the build's
    scratch folders stay out of the repository) and list it."""
    pytest.importorskip("setuptools", reason="builds the wheel with the installed setuptools (no network)")
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns(".git", ".venv", "out", "build", "*.egg-info", "__pycache__", ".pytest_cache")
    shutil.copytree(REPO, src, ignore=ignore)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                        "-q", "-w", str(tmp_path / "wheel"), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = (tmp_path / "wheel").glob("minipost-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    ours = {p.relative_to(REPO).as_posix() for p in (REPO / "minipost" / "kernels").glob("*.py")}
    assert len(ours) >= 2 and ours <= names, sorted(ours - names)
    assert "minipost/model.py" in names and "train_sft.py" in names
    assert not any(n.split("/")[0] == "kernels" for n in names)  # no top-level `kernels` to collide with theirs
