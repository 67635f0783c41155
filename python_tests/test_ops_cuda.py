"""The compiled CUDA steering kernels (csrc/cuda/steer_cuda.cu) against the reference oracle.

Every test needs a CUDA GPU and is skipped without one. With a GPU but an
extension built without CUDA kernels the tests skip too, unless
``SAE_FAST_REQUIRE_CUDA_EXT=1`` (benchmarks/gpu_check.sh sets it), which turns
that into a failure.

The kernel picks a launch plan per call (rows per block, thread-block
clusters on sm_90); ``SAE_FAST_CUDA_ROWS_PER_BLOCK`` and
``SAE_FAST_CUDA_CLUSTER`` force one, so every plan is checked here.
"""

from __future__ import annotations

import itertools
import os
import zlib

import pytest
import torch

import sae_fast.ops as ops
from sae_fast.ops import codes, reference
from sae_fast.ops.testing import DELTA_RTOL, assert_steer_close, clone_case, random_steer_case

HAS_GPU = torch.cuda.is_available()
HAS_CUDA_EXT = "cuda" in ops.backend_info()["extension_devices"]
REQUIRE_EXT = os.environ.get("SAE_FAST_REQUIRE_CUDA_EXT") == "1"

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU"),
    pytest.mark.skipif(HAS_GPU and not HAS_CUDA_EXT and not REQUIRE_EXT,
                       reason="sae_fast._C was built without CUDA kernels "
                              f"({ops.backend_info()['extension_error'] or 'SAE_FAST_CUDA=OFF'})"),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ACTIVATIONS = [codes.ACT_THRESHOLD_RELU, codes.ACT_IDENTITY, codes.ACT_TOPK]
# (rows per block, cluster size); "" = the kernel's own choice.
PLANS = [("", ""), ("1", "0"), ("4", "0"), ("8", "0"), ("1", "2"), ("1", "8"), ("4", "2"), ("8", "4")]


def test_extension_has_cuda_kernels():
    assert HAS_CUDA_EXT, f"sae_fast._C has no CUDA kernels: {ops.backend_info()}"
    assert torch.ops.sae_fast.build_info() == "cpu,cuda"
    for op in ("steer_", "clamp_direction_", "add_vectors_"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"sae_fast::{op}", "CUDA"), op


MODE_NAMES = {codes.MODE_ADD: "add", codes.MODE_SET: "set", codes.MODE_SCALE: "scale",
              codes.MODE_ABLATE: "ablate"}


def _case(T, d, k, dtype, **kw):
    """Fresh random inputs on cuda; the seed is derived from the arguments
    (crc32, not hash(): reproducible across processes)."""
    seed = kw.pop("seed", zlib.crc32(repr((T, d, k, dtype, sorted(kw.items()))).encode()))
    return random_steer_case(T, d, k, R=kw.pop("R", 5), dtype=dtype, device="cuda", seed=seed, **kw)


def _run_cuda(case: dict) -> torch.Tensor:
    """The compiled op on a copy of ``case``; returns the steered hidden."""
    out = clone_case(case)
    torch.ops.sae_fast.steer_(**out)
    return out["hidden"]


@pytest.fixture(autouse=True)
def _exact_fp32_reference():
    """The oracle's fp32 matmuls must not use TF32 (its error would swamp the
    fp32 tolerance and flip threshold comparisons)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    yield
    torch.backends.cuda.matmul.allow_tf32 = old[0]
    torch.set_float32_matmul_precision(old[1])


@pytest.fixture
def plan(request, monkeypatch):
    rb, cs = request.param
    for name, value in (("SAE_FAST_CUDA_ROWS_PER_BLOCK", rb), ("SAE_FAST_CUDA_CLUSTER", cs)):
        if value:
            monkeypatch.setenv(name, value)
        else:
            monkeypatch.delenv(name, raising=False)
    return request.param


# ------------------------------------------------------------------ steer_ parity
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,d,k", [(1, 64, 1), (3, 123, 7), (64, 576, 64), (1000, 123, 7),
                                   (1000, 4096, 64), (1, 4096, 64), (17, 4096, 7), (5, 576, 600)])
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=codes.ACT_NAMES.get)
def test_steer_matches_reference(dtype, T, d, k, activation):
    for residual, idx in itertools.product([True, False], [torch.int32, torch.int64]):
        case = _case(T, d, k, dtype, residual=residual, idx_dtype=idx, activation=activation)
        out = _run_cuda(case)
        assert_steer_close(out, case, what=f"cuda {dtype} T={T} d={d} k={k} res={residual} {idx}")


@pytest.mark.parametrize("plan", PLANS, indirect=True, ids=lambda p: f"rb{p[0] or 'auto'}-cs{p[1] or 'auto'}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,d,k", [(1, 4096, 64), (3, 123, 7), (16, 576, 33), (300, 4096, 8),
                                   (257, 64, 5)])
def test_steer_every_launch_plan(plan, dtype, T, d, k):
    for activation in ACTIVATIONS:
        case = _case(T, d, k, dtype, activation=activation)
        assert_steer_close(_run_cuda(case), case, what=f"plan={plan} {dtype} T={T} d={d} k={k}")


@pytest.mark.parametrize("activation", ACTIVATIONS, ids=codes.ACT_NAMES.get)
@pytest.mark.parametrize("mode", list(MODE_NAMES), ids=MODE_NAMES.get)
def test_steer_each_mode_alone(activation, mode):
    case = _case(40, 576, 16, torch.float32, activation=activation, modes=[mode])
    assert_steer_close(_run_cuda(case), case, what=f"mode={mode} act={activation}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_steer_via_dispatch_layer(dtype, monkeypatch):
    monkeypatch.delenv("SAE_FAST_BACKEND", raising=False)
    ops.reset_backend_selection()
    assert ops.backend_for("cuda") == "ext"
    case = _case(33, 576, 7, dtype)
    out = clone_case(case)
    before = ops.fallback_count()
    ops.steer_(**out)
    assert ops.fallback_count() == before
    assert_steer_close(out["hidden"], case, what=f"sae_fast.ops.steer_ {dtype}")


def test_duplicate_rows_and_negative_strengths():
    case = _case(64, 123, 7, torch.float32, R=3)
    case["row_index"].copy_(torch.tensor([1, 2, 1, 1, 2, 0, 2, 1] * 8, device="cuda",
                                         dtype=case["row_index"].dtype))
    case["strengths"][1:] = -case["strengths"][1:].abs()
    assert_steer_close(_run_cuda(case), case, what="duplicates/negative strengths")


# ------------------------------------------------------------------ exact no-op rows
@pytest.mark.parametrize("plan", [("", ""), ("4", "0"), ("8", "0"), ("1", "8")], indirect=True,
                         ids=lambda p: f"rb{p[0] or 'auto'}-cs{p[1] or 'auto'}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_row0_is_bitwise_noop(plan, dtype):
    """Rows mapped to row 0 (all modes off) are never rewritten: -0.0 and NaN
    payloads survive, also when they share a block with steered rows."""
    case = _case(64, 576, 16, dtype, R=4)
    ri = case["row_index"]
    ri.copy_(torch.arange(64, device="cuda") % 4)  # rows 0,4,8,.. are row 0; neighbours steered
    h = case["hidden"]
    h[::4, :8] = -0.0
    bits = h.view(torch.int16 if dtype != torch.float32 else torch.int32)
    bits[::4, 8:16] = torch.tensor(0x7FC1 if dtype == torch.bfloat16 else
                                   (0x7E01 if dtype == torch.float16 else 0x7FC00001),
                                   dtype=bits.dtype)  # quiet NaN with a payload
    before = h.clone()
    out = clone_case(case)
    torch.ops.sae_fast.steer_(**out)
    view = (lambda t: t.view(torch.int16 if dtype != torch.float32 else torch.int32))
    assert torch.equal(view(out["hidden"][::4]), view(before[::4]))
    assert not torch.equal(out["hidden"][1::4], before[1::4])


def test_all_rows_off_leaves_hidden_untouched():
    case = _case(1000, 4096, 64, torch.bfloat16)
    case["row_index"].zero_()
    out = clone_case(case)
    torch.ops.sae_fast.steer_(**out)
    assert torch.equal(out["hidden"].view(torch.int16), case["hidden"].view(torch.int16))


def test_empty_batch_and_zero_features():
    case = _case(0, 64, 3, torch.float32)
    torch.ops.sae_fast.steer_(**case)  # T = 0: nothing to do, no launch error
    torch.cuda.synchronize()


# ------------------------------------------------------------------ layouts
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["row_stride", "odd_stride", "misaligned"])
def test_strided_and_misaligned_hidden(dtype, layout):
    """Row strides other than d (vector path) and strides or base pointers that
    rule out 16-byte loads (scalar path); nothing outside the rows is written."""
    T, d, k = 37, 576, 9
    case = _case(T, d, k, dtype)
    pad = {"row_stride": 64, "odd_stride": 3, "misaligned": 1}[layout]
    off = 1 if layout == "misaligned" else 0
    wide, views = {}, {}
    for name in ("hidden", "residual"):
        wide[name] = torch.full((T, d + pad), float("nan"), device="cuda", dtype=dtype)
        views[name] = wide[name][:, off:off + d]
        views[name].copy_(case[name])
    torch.ops.sae_fast.steer_(**{**case, **views})  # in place on the strided view
    assert_steer_close(views["hidden"], case, what=f"{layout} {dtype}")
    outside = torch.cat([wide["hidden"][:, :off], wide["hidden"][:, off + d:]], dim=1)
    assert outside.isnan().all(), "wrote outside the rows of a strided hidden"


def test_large_d_without_shared_memory_staging():
    """d so large that x cannot be staged in shared memory (read from global)."""
    case = _case(3, 65536, 4, torch.bfloat16)
    assert_steer_close(_run_cuda(case), case, what="d=65536")


def test_max_features():
    case = _case(4, 64, 4096, torch.float16)
    assert_steer_close(_run_cuda(case), case, what="k=4096")


# ------------------------------------------------------------------ other ops
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,d,k", [(1, 64, 1), (9, 123, 3), (100, 4096, 16)])
def test_clamp_direction_matches_reference(dtype, T, d, k):
    g = torch.Generator().manual_seed(T + d + k)
    R = 3
    u = torch.linalg.qr(torch.randn(d, k, generator=g)).Q.t().contiguous()
    h, r = torch.randn(T, d, generator=g), torch.randn(T, d, generator=g)
    ma, s = torch.rand(k, generator=g) * 5, torch.randn(R, k, generator=g)
    modes = torch.full((R, k), codes.MODE_SET, dtype=torch.int8)
    modes[0] = codes.MODE_OFF
    rows = torch.randint(0, R, (T,), generator=g)
    dev = lambda t: t.to("cuda")  # noqa: E731
    args = (dev(u).to(dtype), dev(ma), dev(s), dev(modes), dev(rows), 1.5, -2.0, 2.0)
    hc, rc = dev(h).to(dtype), dev(r).to(dtype)
    out, ref = hc.clone(), hc.clone()
    torch.ops.sae_fast.clamp_direction_(out, rc, *args)
    reference.clamp_direction_(ref, rc, *args)
    delta = (ref.float() - hc.float()).abs().max().clamp(min=1.0)
    err = (out.float() - ref.float()).abs().max()
    assert err <= DELTA_RTOL[dtype] * delta + (0 if dtype == torch.float32 else 2 * _ulp(ref)), \
        f"clamp_direction {dtype}: {err}"
    off = modes[rows.long()].eq(0).all(-1).to("cuda")
    assert torch.equal(out[off], hc[off])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,d,k", [(1, 64, 1), (33, 123, 7), (200, 576, 64), (16, 4096, 8)])
def test_add_vectors_matches_reference(dtype, T, d, k):
    g = torch.Generator().manual_seed(T * d + k)
    h = torch.randn(T, d, generator=g).to("cuda", dtype)
    v = torch.randn(k, d, generator=g).to("cuda", dtype)
    w = torch.randn(5, k, generator=g)
    w[0] = 0
    w[2, ::2] = 0  # some zero weights inside steered rows
    w = w.to("cuda")
    for idx in (torch.int32, torch.int64):
        rows = torch.randint(0, 5, (T,), generator=g).to("cuda", idx)
        out, ref = h.clone(), h.clone()
        torch.ops.sae_fast.add_vectors_(out, v, w, rows)
        reference.add_vectors_(ref, v, w, rows)
        delta = (ref.float() - h.float()).abs().max().clamp(min=1.0)
        err = (out.float() - ref.float()).abs().max()
        assert err <= DELTA_RTOL[dtype] * delta + (0 if dtype == torch.float32 else 2 * _ulp(ref)), \
            f"add_vectors {dtype} T={T} d={d} k={k}: {err}"
        off = rows.long() == 0
        assert torch.equal(out[off], h[off])


def _ulp(t: torch.Tensor) -> float:
    return float((t.float().abs() * torch.finfo(t.dtype).eps).max().clamp(min=torch.finfo(t.dtype).eps))


# ------------------------------------------------------------------ argument errors
def test_errors_name_the_bad_argument():
    case = _case(4, 64, 3, torch.float32)
    bad = clone_case(case)
    bad["strengths"] = bad["strengths"].cpu()
    with pytest.raises(RuntimeError, match="strengths is on cpu"):
        torch.ops.sae_fast.steer_(**bad)
    bad = clone_case(case)
    bad["enc_w"] = bad["enc_w"].half()
    with pytest.raises(RuntimeError, match="enc_w dtype"):
        torch.ops.sae_fast.steer_(**bad)
    big = _case(2, 16, 4097, torch.float32, R=2)
    with pytest.raises(RuntimeError, match="at most 4096"):
        torch.ops.sae_fast.steer_(**big)


# ------------------------------------------------------------------ CUDA graphs
@pytest.mark.parametrize("plan", [("", ""), ("1", "0"), ("8", "0"), ("1", "4")], indirect=True,
                         ids=lambda p: f"rb{p[0] or 'auto'}-cs{p[1] or 'auto'}")
@pytest.mark.parametrize("T", [4, 64, 1000])
def test_cuda_graph_capture_and_replay(plan, T):
    """Capture one steer_ call; edit strengths, modes and row_index in place;
    replay: the result follows the new tables (nothing was baked in)."""
    dtype, d, k, R = torch.bfloat16, 576, 16, 6
    case = _case(T, d, k, dtype, R=R, seed=11)
    base = case["hidden"].clone()
    static = clone_case(case)
    # Warm up on a side stream (one-time kernel setup happens outside the capture).
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        torch.ops.sae_fast.steer_(**static)
    torch.cuda.current_stream().wait_stream(s)
    static["hidden"].copy_(base)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.ops.sae_fast.steer_(**static)
    g = torch.Generator().manual_seed(5)
    for trial in range(3):
        static["strengths"].copy_(3 * torch.randn(R, k, generator=g))
        new_modes = torch.randint(0, 5, (R, k), generator=g).to(torch.int8)
        new_modes[0] = codes.MODE_OFF
        static["modes"].copy_(new_modes)
        static["row_index"].copy_(torch.randint(0, R, (T,), generator=g))
        static["hidden"].copy_(base)
        graph.replay()
        torch.cuda.synchronize()
        want = {**static, "hidden": base}
        assert_steer_close(static["hidden"].clone(), want, what=f"graph replay {trial} T={T}")


def test_no_host_sync(monkeypatch):
    case = _case(64, 576, 16, torch.bfloat16)
    out = clone_case(case)
    torch.ops.sae_fast.steer_(**out)  # one-time setup
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        torch.ops.sae_fast.steer_(**out)
        torch.ops.sae_fast.add_vectors_(out["hidden"], out["dec_w"], out["strengths"], out["row_index"])
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ------------------------------------------------------------------ opcheck
_OPCHECK_UTILS = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_steer(dtype):
    for residual in (True, False):
        case = _case(7, 123, 5, dtype, residual=residual, activation=codes.ACT_TOPK)
        torch.library.opcheck(torch.ops.sae_fast.steer_.default, (), case, test_utils=_OPCHECK_UTILS)


def test_opcheck_clamp_direction_and_add_vectors():
    case = _case(7, 64, 5, torch.float16)
    args = (case["hidden"], case["residual"], case["dec_w"], case["max_act"], case["strengths"],
            case["modes"], case["row_index"], 1.0, -3.0, 3.0)
    torch.library.opcheck(torch.ops.sae_fast.clamp_direction_.default, args, test_utils=_OPCHECK_UTILS)
    args = (case["hidden"], case["dec_w"], case["strengths"], case["row_index"])
    torch.library.opcheck(torch.ops.sae_fast.add_vectors_.default, args, test_utils=_OPCHECK_UTILS)
