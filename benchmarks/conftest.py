"""Shared pytest setup for benchmarks/."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch intra-op thread per benchmark module: on the shared 2-core
    machine two spinning threads distort micro-benchmarks (STYLE.md). The C
    setter: after an in-process vLLM engine starts, ``torch.set_num_threads``
    is vLLM's no-op."""
    n = torch.get_num_threads()
    torch._C.set_num_threads(1)
    yield
    torch._C.set_num_threads(n)
