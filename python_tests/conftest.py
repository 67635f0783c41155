"""Shared pytest setup for python_tests/."""

import os

import pytest
import torch

# Triton kernels run on CPU tensors only through its interpreter, which is
# chosen when a kernel is decorated (import time), so the variable must be set
# before anything imports triton. On a CUDA machine the same tests run the
# compiled kernels natively.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_thread_module():
    """One torch intra-op thread for a test module: tiny models run fastest on
    one thread, and on a loaded 2-core machine two threads spin against each
    other (one tiny-Llama generate: 0.3 s on 1 thread, 4-18 s on 2). Through
    ``torch._C.set_num_threads``: once an in-process vLLM engine has started,
    ``torch.set_num_threads`` is vLLM's no-op that only logs a warning."""
    n = torch.get_num_threads()
    torch._C.set_num_threads(1)
    yield
    torch._C.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny():
    """(model, tokenizer) of the tiny random Llama, in fp32 (test_backends_hf
    overrides it with a Llama/Qwen2 parametrisation)."""
    from sae_fast.generate import load_hf
    from sae_fast.models import tiny_model

    return load_hf(str(tiny_model("llama")))


@pytest.fixture(scope="module")
def task(tiny, tmp_path_factory):
    """The synthetic steering task (sae_fast.train.synthetic) built on the
    ``tiny`` model: its SAE, data files and token sets (used by the
    test_train_*.py files; test_cli overrides it with its own)."""
    from sae_fast.train.synthetic import build_synthetic_task

    model, tok = tiny
    return build_synthetic_task(tmp_path_factory.mktemp("task"), model=model, tokenizer=tok)
