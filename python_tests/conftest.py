"""Shared pytest setup for python_tests/."""

import os

import torch

# Triton kernels run on CPU tensors only through its interpreter, which is
# chosen when a kernel is decorated (import time), so the variable must be set
# before anything imports triton. On a CUDA machine the same tests run the
# compiled kernels natively.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
