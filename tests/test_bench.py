"""The benchmarks' torch.compile baselines run their timed code path (issue 26: they crashed on the GPU).

torch.compile's backward "donates" the buffers of the tensors saved for it (bf16 or autocast graphs here, on
CPU as on CUDA) and refuses backward(retain_graph=True), which the benchmarks used to time the backward alone.
They now time forward and forward+backward (fwd_bwd_times) and subtract. Inductor compiles for the CPU here,
at one tiny shape per benchmark, with a timer that just calls; timing itself is the benchmarks' business.
"""
import os

import torch

from minipost.kernels import bench_attention, bench_logprob


def _calls(fn):
    """A stand-in for triton.testing.do_bench: runs fn as do_bench would (more than once), returns 1 'ms'."""
    fn()
    fn()
    return 1.0


def test_logprob_compile_baseline_times_backward_without_retained_graph():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(24, 16, generator=g).bfloat16().requires_grad_()  # (N, C)
    weight = torch.randn(40, 16, generator=g).bfloat16().requires_grad_()  # (V, C)
    targets = torch.randint(0, 40, (24,), generator=g)
    targets[:6] = bench_logprob.IGNORE
    methods = bench_logprob._methods()
    assert bench_logprob.fwd_bwd_times(methods["compile"], hidden, weight, targets, _calls) == (1.0, 0.0, 1.0)
    hidden.grad = weight.grad = None
    methods["compile"](hidden, weight, targets).backward()
    got = hidden.grad, weight.grad
    hidden.grad = weight.grad = None
    methods["torch"](hidden, weight, targets).backward()  # eager: the same bf16 computation
    for a, b in zip(got, (hidden.grad, weight.grad)):
        torch.testing.assert_close(a.float(), b.float(), rtol=2**-7, atol=2**-7 * b.float().abs().max().item())


def test_attention_compile_baseline_times_backward_without_retained_graph():
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(3, 1, 2, 8, 16, generator=g).bfloat16().requires_grad_()  # (3, B, H, T, D): q, k, v
    do = torch.randn(1, 2, 8, 16, generator=g).bfloat16()  # (B, H, T, D)
    compiled = torch.compile(bench_attention.naive_attention, dynamic=False)

    def fwd():
        return compiled(qkv[0], qkv[1], qkv[2], True)

    def fwd_bwd():
        fwd().backward(do)

    assert bench_attention.fwd_bwd_times(fwd, fwd_bwd, _calls) == (1.0, 0.0, 1.0)
    qkv.grad = None
    fwd_bwd()
    got = qkv.grad
    qkv.grad = None
    bench_attention.naive_attention(qkv[0], qkv[1], qkv[2], True).backward(do)  # eager
    want = qkv.grad.float()
    torch.testing.assert_close(got.float(), want, rtol=2**-7, atol=2**-7 * want.abs().max().item())


def test_logprob_benchmark_exits_1_when_a_method_fails(monkeypatch, capsys):
    """A method that raises or runs out of memory makes the exit status 1 (gpu_check.sh's summary counts it);
    Liger not installed does not. The cells are stand-ins: what is checked is the bookkeeping, not CUDA."""
    import minipost.kernels.logprob as logprob

    outcome = {}

    def cell(method, fn, N, C, V, args):
        return dict(method=method, N=N, C=C, V=V, kept=N, **outcome.get(method, {"fwd": 1.0, "fwd+bwd": 3.0}))

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "a GPU")
    monkeypatch.setattr(logprob, "accumulation_path", lambda dtype: "addmm")
    monkeypatch.setattr(bench_logprob, "_methods", lambda: dict(minipost=len, torch=len, compile=len, liger=None))
    monkeypatch.setattr(bench_logprob, "bench_cell", cell)
    args = bench_logprob.parse_args(["--cells", "64x16x32", "--methods", "minipost", "torch", "liger"])
    assert args.dtype == "autocast"  # the production path, as the docstring says
    assert bench_logprob.bench(args) == 0
    assert "| 64 | 16 | 32 | liger | n/a |" in capsys.readouterr().out
    for failure in ({"error": True}, {"oom": True}):
        outcome["torch"] = failure
        assert bench_logprob.bench(args) == 1
        assert "FAILED: torch" in capsys.readouterr().out


def test_train_step_flops_and_peaks():
    """minipost/bench_train.py's model FLOPs at GPT-2 small, by hand: N = 124,439,808 parameters (tied head) less
    the 1024 x 768 position embeddings; forward 2N + 4 L T C per token. And the bf16 peaks it divides by."""
    from minipost import bench_train

    with torch.device("meta"):  # shapes only: no 500 MB of weights
        model = bench_train.GPT(bench_train.model_config(bench_train.parse_args([])))
    assert model.num_params() == 124_439_808
    assert bench_train.flops_per_token(model) == 2 * (124_439_808 - 1024 * 768) + 4 * 12 * 1024 * 768
    assert bench_train.peak_tflops("NVIDIA H200") == bench_train.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert bench_train.peak_tflops("NVIDIA H100 PCIe") == 756.0 and bench_train.peak_tflops("NVIDIA A10G") is None


def test_train_steps_dry_run_torch_path(capsys):
    """Every objective's step runs (tiny model, CPU, torch path) and lands in the table."""
    from minipost import bench_train

    before = os.environ.get("MINIPOST_KERNELS")
    assert bench_train.main(["--cpu-dry-run", "--kernels", "torch"]) == 0
    assert os.environ.get("MINIPOST_KERNELS") == before  # each run's setting is undone
    table = capsys.readouterr().out.split("| step | kernels |")[1]
    assert [line.split("|")[1].strip() for line in table.splitlines()[2:] if line.startswith("|")] == \
        ["sft", "dpo", "grpo"]


def test_gpu_check_fits_six_minutes():
    """gpu_check.sh on a GPU: every section's budget plus its kill grace (SIGKILL that long after the SIGINT, for
    a section that does not stop) sums to at most 340 s, leaving 20 s of 6 minutes for the calls between them."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parents[1] / "minipost/kernels/gpu_check.sh").read_text()
    assert 'local name=$1 budget=$2 grace=$3' in text and 'timeout -s INT -k "$grace" "$budget"' in text
    sections = [(int(b), int(g)) for name, b, g in re.findall(r'section "([^"]*)" (\d+) (\d+)', text)
                if "dry run" not in name]
    assert len(sections) == 9 and sum(b + g for b, g in sections) <= 340, sections
