"""CPU micro-benchmarks of one steering step (pytest-benchmark).

Each group is one shape; candidates in a group:
    ext        the compiled C++ kernel (torch.ops.sae_fast.steer_)
    reference  the pure-torch oracle (torch ops, selected features only)
    full_sae   the usual hook: full encode of all d_sae features, edit, decode
               with the error term (what public steering hooks do per step)
    noop       an unsteered batch through the ext op (row 0 everywhere)

    make bench      or   pytest benchmarks/bench_ops_cpu.py --benchmark-enable
Threads are pinned to 1 (2-core machine; intra-op threads fight otherwise).
"""

import platform

import pytest
import torch

import sae_fast.ops as ops
from sae_fast.ops import codes, reference
from sae_fast.ops.testing import random_steer_case
from sae_fast.sae import random_sae

SHAPES = [  # (T token rows, d hidden, k features, d_sae for the full-SAE baseline)
    (1, 576, 8, 4608),
    (16, 576, 8, 4608),
    (64, 576, 64, 4608),
    (16, 4096, 8, 32768),
    (256, 4096, 64, 32768),
]
DTYPES = [torch.float32, torch.bfloat16]
HAS_EXT = "cpu" in ops.backend_info()["extension_devices"]


def _info(benchmark, T, d, k, dtype, d_sae=None):
    benchmark.extra_info.update(
        machine=platform.processor() or platform.machine(), torch=torch.__version__, threads=1,
        dtype=str(dtype).replace("torch.", ""), T=T, d=d, k=k, d_sae=d_sae)


def _case(T, d, k, dtype):
    return random_steer_case(T, d, k, R=T + 1, dtype=dtype, residual=True, seed=T + d + k,
                             modes=[codes.MODE_SET])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).replace("torch.", ""))
@pytest.mark.parametrize("T,d,k,d_sae", SHAPES)
@pytest.mark.parametrize("impl", ["ext", "reference", "full_sae", "noop"])
def test_steer_step(benchmark, impl, T, d, k, d_sae, dtype):
    if impl in ("ext", "noop") and not HAS_EXT:
        pytest.skip("extension not built")
    if impl == "full_sae" and d * d_sae > 576 * 4608 and dtype == torch.bfloat16:
        pytest.skip("full-SAE bf16 at d=4096 takes seconds per step on this CPU; fp32 shows the gap")
    benchmark.group = f"steer T={T} d={d} k={k} {str(dtype).replace('torch.', '')}"
    _info(benchmark, T, d, k, dtype, d_sae)
    case = _case(T, d, k, dtype)
    # every token row steered (rows 1..T all "set"), as in a fully steered batch
    case["row_index"] = torch.arange(1, T + 1, dtype=torch.int32)
    case["modes"][1:] = codes.MODE_SET
    if impl == "noop":
        case["row_index"].zero_()
    hidden0 = case["hidden"].clone()
    args = dict(case)

    if impl in ("ext", "noop"):
        def run():
            args["hidden"].copy_(hidden0)
            torch.ops.sae_fast.steer_(**args)
    elif impl == "reference":
        def run():
            args["hidden"].copy_(hidden0)
            reference.steer_(**args)
    else:
        sae = random_sae(d, d_sae, seed=1, dtype=dtype)
        feats = torch.arange(k)
        targets = torch.full((T, k), 3.0)

        def run():
            args["hidden"].copy_(hidden0)
            x = (args["hidden"].float() + args["residual"].float()).to(dtype)
            pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
            f = torch.relu(pre)
            f_new = f.clone()
            f_new[:, feats] = targets.to(dtype)
            recon_new = f_new @ sae.W_dec + sae.b_dec
            recon = f @ sae.W_dec + sae.b_dec
            args["hidden"].add_(recon_new - recon)

    benchmark(run)


@pytest.mark.parametrize("T,d,k", [(16, 576, 8), (64, 4096, 64)])
@pytest.mark.parametrize("impl", ["ext", "reference"])
def test_add_vectors(benchmark, impl, T, d, k):
    if impl == "ext" and not HAS_EXT:
        pytest.skip("extension not built")
    benchmark.group = f"add_vectors T={T} d={d} k={k} fp32"
    _info(benchmark, T, d, k, torch.float32)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(T, d, generator=g)
    v = torch.randn(k, d, generator=g)
    w = torch.randn(T + 1, k, generator=g)
    rows = torch.arange(1, T + 1, dtype=torch.int32)
    fn = torch.ops.sae_fast.add_vectors_ if impl == "ext" else reference.add_vectors_
    benchmark(fn, h, v, w, rows)
