"""Test-wide setup. Runs before any test module imports Triton."""
import os

import torch

# Without a GPU the Triton kernels are checked in Triton's interpreter on CPU tensors. The variable must be
# set before triton is first imported; with a GPU the tests run the compiled kernels on CUDA tensors.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tiny models: one intra-op thread is as fast, and far faster when subprocess tests share the cores
# (two processes of two spinning OpenMP threads each on two cores run 3-10x slower). Children inherit it.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)
