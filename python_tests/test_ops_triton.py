"""The Triton steering kernels (sae_fast/ops/triton_steer.py) against the reference oracle.

On a machine without a CUDA GPU, conftest.py sets TRITON_INTERPRET=1 and the
kernels run on CPU tensors through Triton's interpreter (slow: tiny shapes,
no bfloat16). With a GPU the same tests run the compiled kernels on cuda.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

import sae_fast.ops as ops  # noqa: E402
from sae_fast.ops import codes, reference, triton_steer  # noqa: E402
from sae_fast.ops.testing import (  # noqa: E402
    DELTA_RTOL,
    assert_steer_close,
    clone_case,
    random_steer_case,
    reference_out,
)

ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"
# bfloat16 is broken in the interpreter; it runs only with the compiled kernels.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_CUDA else [])
ACTIVATIONS = [codes.ACT_THRESHOLD_RELU, codes.ACT_IDENTITY, codes.ACT_TOPK]
ALL_MODES = [codes.MODE_ADD, codes.MODE_SET, codes.MODE_SCALE, codes.MODE_ABLATE]
MODE_NAMES = {codes.MODE_ADD: "add", codes.MODE_SET: "set", codes.MODE_SCALE: "scale",
              codes.MODE_ABLATE: "ablate"}

pytestmark = [
    pytest.mark.triton_interpreter,
    pytest.mark.skipif(not ON_CUDA and not triton_steer._INTERPRETED,
                       reason="no CUDA GPU and triton was imported without TRITON_INTERPRET=1"),
]


@pytest.fixture(scope="module")
def tops():
    return triton_steer.register_ops()


def _seed(*parts) -> int:
    """A seed derived from the test's parameters, the same in every process (crc32, not
    hash(): str hashes are salted per process, so hash() gave each run other inputs)."""
    return zlib.crc32(repr(tuple(str(p) for p in parts)).encode()) % 2**31


def _with_noop_row(case: dict) -> dict:
    """Make sure some token rows map to the all-off row 0 (padding / unsteered), and at
    least one maps to a steered row (else "steering changed something" cannot hold)."""
    rows = case["row_index"]
    if rows.numel() > 1:
        rows[-1] = 0
        if not bool((rows[:-1] != 0).any()):
            rows[0] = 1
    return case


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bits, so -0.0 vs 0.0 and NaN payloads count as differences."""
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


# ---------------------------------------------------------------- steer_
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=codes.ACT_NAMES.get)
@pytest.mark.parametrize("k", [1, 7, 33])
@pytest.mark.parametrize("d", [64, 123])
@pytest.mark.parametrize("T", [1, 3, 17])
def test_steer_matches_reference(tops, T, d, k, activation, dtype):
    # Random modes (all five, per strengths row and feature), negative
    # strengths, duplicate row indices, strengths beyond the clamp bounds.
    for residual in (True, False):
        idx = torch.int32 if residual == (d == 64) else torch.int64
        case = _with_noop_row(random_steer_case(
            T, d, k, dtype=dtype, device=DEVICE, residual=residual, idx_dtype=idx,
            activation=activation, seed=_seed(T, d, k, activation, dtype, residual)))
        out = clone_case(case)
        tops.steer_(**out)
        assert_steer_close(out["hidden"], case,
                           what=f"T={T} d={d} k={k} act={activation} res={residual} {idx}")


@pytest.mark.parametrize("activation", ACTIVATIONS, ids=codes.ACT_NAMES.get)
@pytest.mark.parametrize("mode", ALL_MODES, ids=MODE_NAMES.get)
def test_steer_each_mode_alone(tops, mode, activation):
    case = _with_noop_row(random_steer_case(
        6, 123, 7, device=DEVICE, modes=[mode], activation=activation,
        seed=_seed("alone", mode, activation)))
    out = clone_case(case)
    tops.steer_(**out)
    assert_steer_close(out["hidden"], case, what=f"mode={mode} act={activation}")
    steered = case["row_index"].long() != 0
    assert not torch.equal(out["hidden"][steered], case["hidden"][steered])


@pytest.mark.parametrize("activation", ACTIVATIONS, ids=codes.ACT_NAMES.get)
def test_steer_many_tiles(tops, activation):
    # More rows than one row tile, more features than one feature tile and
    # several hidden chunks in both kernels.
    case = random_steer_case(70, 200, 100, R=9, device=DEVICE, activation=activation,
                             seed=_seed("tiles", activation))
    out = clone_case(case)
    tops.steer_(**out)
    assert_steer_close(out["hidden"], case, what=f"tiles act={activation}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_steer_noop_rows_are_bit_identical(tops, dtype):
    case = random_steer_case(9, 123, 7, dtype=dtype, device=DEVICE, seed=_seed("noop", dtype))
    rows = torch.tensor([0, 1, 0, 2, 3, 0, 1, 0, 0], dtype=torch.int32, device=DEVICE)
    case["row_index"] = rows
    case["hidden"][rows == 0, ::5] = -0.0  # x + 0.0 would turn these into +0.0
    case["hidden"][0, 3] = float("nan")
    before = case["hidden"].clone()
    tops.steer_(**case)
    off = rows == 0
    assert torch.equal(_bits(case["hidden"][off]), _bits(before[off]))
    assert not torch.equal(case["hidden"][~off], before[~off])

    # A table whose modes are all off leaves every row untouched.
    case = random_steer_case(5, 64, 33, dtype=dtype, device=DEVICE, seed=_seed("off", dtype))
    case["modes"].zero_()
    case["hidden"][:, ::3] = -0.0
    before = case["hidden"].clone()
    tops.steer_(**case)
    assert torch.equal(_bits(case["hidden"]), _bits(before))


def test_steer_strided_hidden_and_residual(tops):
    case = random_steer_case(5, 123, 7, device=DEVICE, seed=_seed("strided"))
    buf_h = torch.randn(5, 200, device=DEVICE)
    buf_r = torch.randn(5, 160, device=DEVICE)
    hidden, residual = buf_h[:, 40:163], buf_r[:, 10:133]
    hidden.copy_(case["hidden"])
    residual.copy_(case["residual"])
    outside = buf_h[:, :40].clone(), buf_h[:, 163:].clone()
    out = clone_case(case)
    out["hidden"], out["residual"] = hidden, residual
    tops.steer_(**out)
    assert_steer_close(hidden, case, what="strided")
    assert torch.equal(buf_h[:, :40], outside[0]) and torch.equal(buf_h[:, 163:], outside[1])


def test_steer_clamps_and_scales_strengths(tops):
    case = random_steer_case(4, 64, 3, device=DEVICE, modes=[codes.MODE_ADD], seed=_seed("clamp"))
    case["strengths"][1:] = torch.tensor([[100.0, -100.0, 0.5]] * 3, device=DEVICE)
    case.update(scale=1.5, min_strength=-2.0, max_strength=2.0)
    case["row_index"] = torch.tensor([1, 2, 3, 0], dtype=torch.int64, device=DEVICE)
    out = clone_case(case)
    tops.steer_(**out)
    coef = torch.tensor([2.0, -2.0, 0.5], device=DEVICE) * 1.5
    expect = case["hidden"][:3] + coef @ case["dec_w"]
    torch.testing.assert_close(out["hidden"][:3], expect, atol=1e-5, rtol=1e-5)
    assert torch.equal(out["hidden"][3], case["hidden"][3])


def test_steer_nan_strength_is_not_hidden(tops):
    # Callers must reject NaN strengths (SPEC section 4); if one slips
    # through, the kernels propagate it exactly like the oracle (a clamp that
    # swallowed NaN would apply a silent bound instead).
    case = random_steer_case(4, 64, 3, device=DEVICE, modes=[codes.MODE_ADD, codes.MODE_SET],
                             seed=_seed("nan"))
    case["strengths"][1, 1] = float("nan")
    case["strengths"][2, 0] = float("inf")  # clamped to max_strength
    case["row_index"] = torch.tensor([1, 2, 0, 1], dtype=torch.int32, device=DEVICE)
    out = clone_case(case)
    tops.steer_(**out)
    torch.testing.assert_close(out["hidden"], reference_out(case), equal_nan=True,
                               atol=1e-5, rtol=1e-5)
    assert out["hidden"][0].isnan().any() and not out["hidden"][1:3].isnan().any()


def test_steer_empty_inputs_are_noops(tops):
    case = random_steer_case(0, 64, 7, device=DEVICE, seed=1)
    tops.steer_(**case)  # T = 0
    case = random_steer_case(3, 64, 7, device=DEVICE, seed=2)
    k0 = {name: case[name][..., :0].contiguous() if name in ("strengths", "modes") else
          case[name][:0].contiguous() for name in ("enc_w", "enc_b", "threshold", "dec_w",
                                                     "max_act", "strengths", "modes")}
    before = case["hidden"].clone()
    tops.steer_(**{**case, **k0})  # k = 0
    assert torch.equal(case["hidden"], before)


# ---------------------------------------------------------------- clamp_direction_
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,d,k", [(1, 64, 1), (3, 123, 7), (17, 64, 33), (17, 123, 7)])
def test_clamp_direction_matches_reference(tops, T, d, k, dtype):
    g = torch.Generator().manual_seed(_seed("clamp_dir", T, d, k, dtype))
    R = 4
    u = torch.randn(k, d, generator=g)
    u = u / u.norm(dim=-1, keepdim=True)
    max_act = torch.rand(k, generator=g) * 5
    strengths = 3 * torch.randn(R, k, generator=g)
    modes = torch.randint(0, 5, (R, k), generator=g).to(torch.int8)
    modes[0] = codes.MODE_OFF
    for residual, idx in itertools.product([True, False], [torch.int32, torch.int64]):
        rows = torch.randint(0, R, (T,), generator=g).to(idx)
        if T > 1:
            rows[-1] = 0
        h = torch.randn(T, d, generator=g).to(DEVICE, dtype)
        r = torch.randn(T, d, generator=g).to(DEVICE, dtype) if residual else None
        args = (u.to(DEVICE, dtype), max_act.to(DEVICE), strengths.to(DEVICE), modes.to(DEVICE),
                rows.to(DEVICE), 1.25, -4.0, 4.0)
        out, ref = h.clone(), h.clone()
        tops.clamp_direction_(out, r, *args)
        reference.clamp_direction_(ref, r, *args)
        _assert_delta_close(out, ref, h, what=f"res={residual} {idx}")
        off = rows.to(DEVICE) == 0
        assert torch.equal(_bits(out[off]), _bits(h[off]))


def test_clamp_direction_sets_projection(tops):
    # With orthonormal directions and mode "set", the stream's component
    # along each direction becomes exactly clamp(s) * scale * max_act.
    g = torch.Generator().manual_seed(3)
    T, d, k = 5, 123, 3
    u = torch.linalg.qr(torch.randn(d, k, generator=g)).Q.t().contiguous().to(DEVICE)
    h = torch.randn(T, d, generator=g).to(DEVICE)
    r = torch.randn(T, d, generator=g).to(DEVICE)
    max_act = torch.tensor([1.0, 2.0, 3.0], device=DEVICE)
    strengths = torch.tensor([[0.0, 0.0, 0.0], [0.5, -1.0, 9.0]], device=DEVICE)
    modes = torch.tensor([[0, 0, 0], [2, 2, 2]], dtype=torch.int8, device=DEVICE)
    rows = torch.ones(T, dtype=torch.int32, device=DEVICE)
    tops.clamp_direction_(h, r, u, max_act, strengths, modes, rows, 2.0, -5.0, 5.0)
    proj = (h + r) @ u.t()
    expect = torch.tensor([0.5 * 2 * 1.0, -1.0 * 2 * 2.0, 5.0 * 2 * 3.0], device=DEVICE)
    torch.testing.assert_close(proj, expect.expand(T, k), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- add_vectors_
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [1, 7, 33])
@pytest.mark.parametrize("d", [64, 123])
@pytest.mark.parametrize("T", [1, 3, 17])
def test_add_vectors_matches_reference(tops, T, d, k, dtype):
    g = torch.Generator().manual_seed(_seed("add", T, d, k, dtype))
    R = 5
    idx = torch.int32 if (T + k) % 2 else torch.int64
    vectors = (torch.randn(k, d, generator=g) / d**0.5).to(DEVICE, dtype)
    weights = 3 * torch.randn(R, k, generator=g)
    weights[0] = 0
    weights[2, : (k + 1) // 2] = 0  # partly zero row
    rows = torch.randint(0, R, (T,), generator=g).to(idx)
    if T > 1:
        rows[-1] = 0
    h = torch.randn(T, d, generator=g).to(DEVICE, dtype)
    h[:, ::7] = -0.0
    weights, rows = weights.to(DEVICE), rows.to(DEVICE)
    out, ref = h.clone(), h.clone()
    tops.add_vectors_(out, vectors, weights, rows)
    reference.add_vectors_(ref, vectors, weights, rows)
    _assert_delta_close(out, ref, h, what=f"T={T} d={d} k={k}")
    off = rows == 0
    assert torch.equal(_bits(out[off]), _bits(h[off]))


def test_add_vectors_many_tiles(tops):
    g = torch.Generator().manual_seed(4)
    T, d, k, R = 70, 300, 40, 6
    vectors = torch.randn(k, d, generator=g).to(DEVICE)
    weights = torch.randn(R, k, generator=g).to(DEVICE)
    weights[0] = 0
    rows = torch.randint(0, R, (T,), generator=g).to(DEVICE)
    h = torch.randn(T, d, generator=g).to(DEVICE)
    out, ref = h.clone(), h.clone()
    tops.add_vectors_(out, vectors, weights, rows)
    reference.add_vectors_(ref, vectors, weights, rows)
    _assert_delta_close(out, ref, h, what="tiles")


def _assert_delta_close(out, ref, base, *, what: str) -> None:
    delta_scale = (ref.float() - base.float()).abs().max().clamp(min=1.0)
    ulp = (ref.float().abs() * torch.finfo(out.dtype).eps).max()
    tol = DELTA_RTOL[out.dtype] * delta_scale + (0 if out.dtype == torch.float32 else 2 * ulp)
    err = (out.float() - ref.float()).abs().max()
    assert err <= tol, f"{what}: max |out - ref| = {err:.3g} > tol {tol:.3g} ({out.dtype})"


# ---------------------------------------------------------------- argument checks
def _bad_cases(case: dict):
    T = case["hidden"].shape[0]
    yield "hidden must be float32", dict(hidden=case["hidden"].to(torch.float64))
    yield "hidden must be 2-D", dict(hidden=case["hidden"][None])
    yield "residual shape", dict(residual=case["residual"][:, :-1])
    yield "residual dtype", dict(residual=case["residual"].half())
    yield "enc_w must have shape", dict(enc_w=case["enc_w"][:, :-1].contiguous())
    yield "dec_w dtype", dict(dec_w=case["dec_w"].half())
    yield "enc_w must be contiguous", dict(enc_w=case["enc_w"].t().contiguous().t())
    yield "dec_w has 6 rows but enc_w has 7", dict(dec_w=case["dec_w"][:6].contiguous())
    yield "enc_b must have shape", dict(enc_b=case["enc_b"][:3].contiguous())
    yield "threshold must be float32", dict(threshold=case["threshold"].double())
    yield "strengths must have shape", dict(strengths=case["strengths"][:, :3].contiguous())
    yield "strengths must be float32", dict(strengths=case["strengths"].half())
    yield "modes must be int8", dict(modes=case["modes"].to(torch.int32))
    yield "modes shape", dict(modes=case["modes"][:2].contiguous())
    yield "row_index must be int32 or int64", dict(row_index=case["row_index"].to(torch.int16))
    yield "row_index must have shape", dict(row_index=case["row_index"][:-1].contiguous())
    yield "activation must be", dict(activation=7)
    yield "needs topk_kth", dict(activation=codes.ACT_TOPK, topk_kth=None)
    yield "topk_kth must be", dict(activation=codes.ACT_TOPK,
                                   topk_kth=torch.zeros(T + 1, device=case["hidden"].device))
    yield "min_strength", dict(min_strength=3.0, max_strength=-3.0)
    if not ON_CUDA:  # the range check needs the values on the host: CPU only
        yield "is outside \\[0, 4\\)", dict(row_index=torch.tensor([0, 4, 1], dtype=torch.int32))
    else:
        yield "is on cpu but hidden is on cuda", dict(max_act=case["max_act"].cpu())


def test_steer_rejects_bad_arguments(tops):
    case = random_steer_case(3, 64, 7, device=DEVICE, seed=5)
    for message, change in _bad_cases(case):
        before = case["hidden"].clone()
        with pytest.raises(RuntimeError, match=message):
            tops.steer_(**{**case, **change})
        with pytest.raises(ValueError, match=message):
            triton_steer.steer_(**{**case, **change})
        assert torch.equal(case["hidden"], before)


def test_other_ops_reject_bad_arguments(tops):
    h = torch.randn(3, 64, device=DEVICE)
    vecs = torch.randn(2, 64, device=DEVICE)
    w = torch.randn(4, 2, device=DEVICE)
    rows = torch.zeros(3, dtype=torch.int64, device=DEVICE)
    with pytest.raises(RuntimeError, match="vectors dtype"):
        tops.add_vectors_(h, vecs.half(), w, rows)
    with pytest.raises(RuntimeError, match="weights must have shape"):
        tops.add_vectors_(h, vecs, w[:, :1].contiguous(), rows)
    with pytest.raises(RuntimeError, match="max_act must have shape"):
        modes = torch.zeros(4, 2, dtype=torch.int8, device=DEVICE)
        tops.clamp_direction_(h, None, vecs, torch.ones(3, device=DEVICE), w, modes, rows,
                              1.0, -1.0, 1.0)


def test_out_of_range_rows_are_noops_in_the_kernel():
    # On GPU the host cannot see row_index without a sync; the kernels then
    # skip such rows instead of reading out of bounds. (Called below the host
    # checks, which reject such rows for CPU tensors.)
    case = random_steer_case(4, 64, 7, device=DEVICE, seed=6)
    case["row_index"] = torch.tensor([1, 9, -3, 2], dtype=torch.int32, device=DEVICE)
    out = clone_case(case)
    coef = triton_steer._launch_coef(
        out["hidden"], out["residual"], out["enc_w"], out["enc_b"], out["threshold"],
        out["max_act"], out["strengths"], out["modes"], out["row_index"], None,
        out["activation"], out["scale"], out["min_strength"], out["max_strength"])
    assert torch.equal(coef[1:3], torch.zeros_like(coef[1:3]))
    triton_steer._launch_add_rows(out["hidden"], out["dec_w"], coef, None)
    assert torch.equal(out["hidden"][1:3], case["hidden"][1:3])
    h = case["hidden"].clone()
    triton_steer._launch_add_rows(h, case["dec_w"], case["strengths"], case["row_index"])
    assert torch.equal(h[1:3], case["hidden"][1:3])


# ---------------------------------------------------------------- registration and dispatch
def test_register_ops_is_idempotent():
    first = triton_steer.register_ops()
    second = triton_steer.register_ops()
    assert first is second is torch.ops.sae_fast_triton
    for name in ("steer_", "clamp_direction_", "add_vectors_"):
        assert hasattr(first, name)


def test_opcheck(tops):
    case = random_steer_case(3, 64, 7, device=DEVICE, seed=7)
    names = ["hidden", "residual", "enc_w", "enc_b", "threshold", "dec_w", "max_act", "strengths",
             "modes", "row_index", "topk_kth", "activation", "scale", "min_strength",
             "max_strength"]
    tests = ("test_schema", "test_faketensor")
    torch.library.opcheck(tops.steer_, tuple(case[n] for n in names), test_utils=tests)
    torch.library.opcheck(tops.add_vectors_, (case["hidden"], case["dec_w"], case["strengths"],
                                              case["row_index"]), test_utils=tests)


@pytest.fixture
def forced_triton(monkeypatch):
    monkeypatch.setenv("SAE_FAST_BACKEND", "triton")
    ops.reset_backend_selection()
    yield
    monkeypatch.delenv("SAE_FAST_BACKEND")
    ops.reset_backend_selection()


def test_dispatch_uses_triton_when_forced(forced_triton, monkeypatch):
    calls = []
    for name in ("steer_", "clamp_direction_", "add_vectors_"):
        real = getattr(triton_steer, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(triton_steer, name, spy)

    case = random_steer_case(5, 64, 7, device=DEVICE, seed=8)
    out = clone_case(case)
    ops.steer_(**out)
    assert ops.backend_info()["selected"] == {DEVICE: "triton"}
    assert_steer_close(out["hidden"], case, what="dispatch")

    h = case["hidden"].clone()
    ops.clamp_direction_(h, None, case["dec_w"], case["max_act"], case["strengths"],
                         case["modes"], case["row_index"])
    ops.add_vectors_(h, case["dec_w"], case["strengths"], case["row_index"])
    assert calls == ["steer_", "clamp_direction_", "add_vectors_"]
    assert ops.fallback_count() == 0


# ---------------------------------------------------------------- CUDA graphs (GPU only)
@pytest.mark.skipif(not ON_CUDA, reason="needs a CUDA GPU")
def test_steer_in_cuda_graph_follows_in_place_edits(tops):
    case = random_steer_case(8, 256, 16, R=5, device="cuda", dtype=torch.float16, seed=9)
    static = clone_case(case)
    base = case["hidden"].clone()
    static["hidden"].copy_(base)
    tops.steer_(**static)  # warm-up: compile before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    static["hidden"].copy_(base)
    with torch.cuda.graph(graph):
        tops.steer_(**static)
    for step in range(3):
        g = torch.Generator(device="cuda").manual_seed(step)
        static["strengths"].copy_(3 * torch.randn(static["strengths"].shape, device="cuda",
                                                  generator=g))
        static["strengths"][0] = 0
        static["row_index"].copy_(torch.randint(0, 5, (8,), device="cuda", generator=g)
                                  .to(static["row_index"].dtype))
        static["hidden"].copy_(base)
        graph.replay()
        torch.cuda.synchronize()
        expect = {**clone_case(static), "hidden": base.clone()}
        assert_steer_close(static["hidden"], expect, what=f"graph replay {step}")


# ---------------------------------------------------------------- sm_90 build without a GPU
_AOT_SCRIPT = r"""
import itertools, json, os, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from sae_fast.ops import triton_steer as ts

assert not ts._INTERPRETED
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")

def usage(kernel):
    if not os.path.exists(cuobjdump):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    fields = dict(p.split(":") for p in out[out.index("REG:"):].split()[:2])
    return int(fields["REG"]), int(fields["STACK"])

def sig(fn, types, constexprs):
    return {name: ("constexpr" if name in constexprs else types.get(name, "i32"))
            for name in fn.arg_names}

target = GPUTarget("cuda", 90, 32)
report = []
for dt, T, k in itertools.product(["fp32", "fp16", "bf16"], [1, 32, 200], [7, 512]):
    const = dict(HAS_RESIDUAL=True, HAS_BIAS=True, HAS_THRESHOLD=True, ACTIVATION=2,
                 **ts._coef_blocks(T, k))
    types = {n: "*fp32" for n in ts._steer_coef_kernel.arg_names if n.endswith("_ptr")}
    types.update(hidden_ptr=f"*{dt}", residual_ptr=f"*{dt}", enc_w_ptr=f"*{dt}", modes_ptr="*i8",
                 row_index_ptr="*i64", scale="fp32", lo="fp32", hi="fp32")
    kern = triton.compile(ASTSource(ts._steer_coef_kernel, sig(ts._steer_coef_kernel, types, const),
                                    const), target=target, options={"num_warps": ts._NUM_WARPS})
    report.append(("coef", dt, T, k, usage(kern)))
    if k == 7:
        const = dict(GATHER=T == 1, **ts._add_blocks(T))
        types = dict(hidden_ptr=f"*{dt}", table_ptr=f"*{dt}", coef_ptr="*fp32",
                     row_index_ptr="*i32")
        kern = triton.compile(ASTSource(ts._add_rows_kernel, sig(ts._add_rows_kernel, types, const),
                                        const), target=target, options={"num_warps": ts._NUM_WARPS})
        report.append(("add_rows", dt, T, None, usage(kern)))
print(json.dumps(report))
"""


def _ptxas() -> str | None:
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if bundled.exists():
        return str(bundled)
    return os.environ.get("TRITON_PTXAS_PATH") or shutil.which("ptxas")


def _cuobjdump() -> Path:
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


@pytest.mark.slow
@pytest.mark.skipif(ON_CUDA, reason="with a GPU the kernels are built and run natively above")
@pytest.mark.skipif(_ptxas() is None, reason="no ptxas to build sm_90 code with")
@pytest.mark.skipif(not _cuobjdump().exists(), reason="no cuobjdump to read register/stack use")
def test_kernels_build_for_sm90_without_spills():
    """The compiled (non-interpreted) kernels lower to sm_90 code for every dtype
    and tile configuration the launchers pick, without register spills. Runs
    on a machine with no GPU; it does not run them."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_PTXAS_PATH"] = _ptxas()
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], capture_output=True, text=True,
                          env=env, cwd=Path(__file__).parents[1], timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(report) == 27
    unread = [r[:4] for r in report if r[-1] is None]
    assert not unread, f"resource usage not read for {unread}: the spill check would be vacuous"
    spills = [r for r in report if r[-1] is not None and r[-1][1] > 0]
    assert not spills, f"register spills (kernel, dtype, T, k, (regs, stack bytes)): {spills}"
