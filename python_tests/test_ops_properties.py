"""Property tests (hypothesis): every op path against the pure-torch oracle on
random shapes, dtypes, strengths, modes and activations, including T = 0, d
not a multiple of any vector width, duplicate features and rows that all map
to one table row. ``derandomize=True``: the examples are a fixed function of
the test, the same on every run and machine (no example database is kept)."""

import os

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import sae_fast.ops as ops  # noqa: E402
from sae_fast.ops import codes, reference  # noqa: E402
from sae_fast.ops.testing import assert_steer_close, clone_case, random_steer_case  # noqa: E402

HAS_EXT = "cpu" in ops.backend_info()["extension_devices"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ACTIVATIONS = [codes.ACT_THRESHOLD_RELU, codes.ACT_IDENTITY, codes.ACT_TOPK]
PROPS = settings(derandomize=True, database=None, deadline=None, max_examples=80,
                 suppress_health_check=[HealthCheck.too_slow])


def _triton_ns():
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return None
    try:
        from sae_fast.ops import triton_steer

        return triton_steer.register_ops()
    except Exception:
        return None


PATHS = [pytest.param("ext", marks=pytest.mark.skipif(not HAS_EXT, reason="sae_fast._C not built")),
         pytest.param("triton", marks=pytest.mark.skipif(_triton_ns() is None,
                                                         reason="triton unavailable"))]


def _namespace(path):
    return torch.ops.sae_fast if path == "ext" else _triton_ns()


@st.composite
def steer_cases(draw, max_t=40):
    T = draw(st.integers(0, max_t))
    d = draw(st.integers(1, 150))
    k = draw(st.integers(1, 12))
    R = draw(st.integers(1, 5))
    dtype = draw(st.sampled_from(DTYPES))
    activation = draw(st.sampled_from(ACTIVATIONS))
    if activation == codes.ACT_TOPK and k < 2:
        k = 2
    case = random_steer_case(T, d, k, R=R, dtype=dtype, residual=draw(st.booleans()),
                             activation=activation, seed=draw(st.integers(0, 2**31 - 1)),
                             idx_dtype=draw(st.sampled_from([torch.int32, torch.int64])))
    if draw(st.booleans()) and k > 1:  # duplicate features: column j repeats column 0
        j = draw(st.integers(1, k - 1))
        for name in ("enc_w", "dec_w"):
            case[name][j] = case[name][0]
        for name in ("enc_b", "threshold", "max_act"):
            case[name][j] = case[name][0]
    if draw(st.booleans()):  # every token on one table row
        case["row_index"].fill_(draw(st.integers(0, R - 1)))
    lo = draw(st.floats(-6, 0, allow_nan=False))
    case.update(scale=draw(st.floats(0.0, 3.0, allow_nan=False)), min_strength=lo,
                max_strength=draw(st.floats(lo, 6, allow_nan=False)))
    return case


@pytest.mark.parametrize("path", PATHS)
@PROPS
@given(case=steer_cases())
def test_steer_matches_reference(path, case):
    if path == "triton" and case["activation"] == codes.ACT_TOPK:
        case["activation"] = codes.ACT_THRESHOLD_RELU  # topk_kth is only read by that mode
    out = clone_case(case)
    _namespace(path).steer_(**out)
    T, d = case["hidden"].shape
    assert_steer_close(out["hidden"], case, what=f"{path} T={T} d={d} k={case['enc_w'].shape[0]}")
    if case["residual"] is not None:
        assert torch.equal(out["residual"], case["residual"])  # never written


@pytest.mark.parametrize("path", PATHS)
@PROPS
@given(case=steer_cases(), unit=st.booleans())
def test_clamp_direction_matches_reference(path, case, unit):
    dirs = case["dec_w"].float()
    dirs = (dirs / dirs.norm(dim=-1, keepdim=True).clamp(min=1e-6)).to(case["dec_w"].dtype)
    args = dict(hidden=case["hidden"], residual=case["residual"], directions=dirs,
                max_act=case["max_act"], strengths=case["strengths"], modes=case["modes"],
                row_index=case["row_index"], scale=case["scale"],
                min_strength=case["min_strength"], max_strength=case["max_strength"])
    out = clone_case(args)
    _namespace(path).clamp_direction_(**out)
    ref = clone_case(args)
    reference.clamp_direction_(**ref)
    _close(out["hidden"], ref["hidden"], args["hidden"])


@pytest.mark.parametrize("path", PATHS)
@PROPS
@given(case=steer_cases())
def test_add_vectors_matches_reference(path, case):
    R, k = case["strengths"].shape
    w = case["strengths"].clone()
    w[0] = 0  # row 0 is the no-op row by convention
    out = case["hidden"].clone()
    _namespace(path).add_vectors_(out, case["dec_w"], w, case["row_index"])
    ref = case["hidden"].clone()
    reference.add_vectors_(ref, case["dec_w"], w, case["row_index"])
    _close(out, ref, case["hidden"])
    off = case["row_index"].long() == 0
    assert torch.equal(out[off], case["hidden"][off])


def _close(out, ref, base):
    scale = (ref.float() - base.float()).abs().max().clamp(min=1.0) if ref.numel() else 1.0
    rtol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}[out.dtype]
    eps = torch.finfo(out.dtype).eps
    tol = rtol * scale + (0 if out.dtype == torch.float32 else 2 * eps * ref.float().abs().max()
                          if ref.numel() else 0)
    if out.numel():
        err = (out.float() - ref.float()).abs().max()
        assert err <= tol, f"max |out - ref| = {err:.3g} > {tol:.3g} ({out.dtype})"
