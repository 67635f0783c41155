"""Per-step cost of one vLLM layer slot (pytest-benchmark), CPU, 1 thread.

A steerable vLLM engine runs ``LayerSlot.apply_`` (the registered op
``sae_fast::steer_`` on the slot's persistent tables) once per slot per
forward step, steered or not. Candidates per group (one token count T, the
default 32 feature columns, SmolLM2's d=576, fp32):

    unsteered   every token on the no-op row 0 (the common case)
    one_live    one steered request's token among T
    all_live    every token steered
    floor       a one-element ``add_``: the dispatch floor of any torch op

    pytest benchmarks/bench_vllm_slot.py --benchmark-enable --benchmark-only

The candidates of a group are timed interleaved (``harness.record``); the
baseline is the floor.
"""

import pytest
import torch

from harness import record
from sae_fast.backends.vllm_engine import LayerSlot
from sae_fast.plan import SteeringSpec, build_plan
from sae_fast.sae import random_sae

D, K, D_SAE, ROWS = 576, 32, 4608, 256


def _slot(T: int, live: str):
    torch.manual_seed(0)
    row_index = torch.zeros(max(T, 1), dtype=torch.int32)
    slot = LayerSlot(15, D, K, ROWS, row_index, torch.device("cpu"), torch.float32)
    plan = build_plan(random_sae(D, D_SAE, seed=0), SteeringSpec(
        features=list(range(0, D_SAE, D_SAE // K))[:K], mode="set", max_activations=[4.0] * K))
    slot.write_columns(torch.arange(K), plan)
    slot.tables.strengths[1:] = 1.0
    slot.tables.modes[1:] = 2
    if live == "one_live":
        row_index[T // 2] = 1
    elif live == "all_live":
        row_index.copy_(torch.arange(T, dtype=torch.int32) % ROWS + 1)
    return slot, torch.randn(T, D), torch.randn(T, D)


@pytest.mark.parametrize("T", [1, 16, 64, 256])
def test_slot_step(benchmark, T):
    x = torch.zeros(1)
    cands = {"floor": lambda: x.add_(1.0)}
    for case in ("unsteered", "one_live", "all_live"):
        slot, h, r = _slot(T, case)
        cands[case] = (lambda slot=slot, h=h, r=r: slot.apply_(h, r))
    record(benchmark, f"vLLM layer slot per step, T={T} d={D} K={K} fp32", cands,
           baseline="floor", suite="ops",
           info=dict(op="LayerSlot.apply_", T=T, d=D, k=K, rows=ROWS, dtype="float32"),
           rounds=9, target_s=0.005)
