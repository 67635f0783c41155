"""The compiled C++ CPU ops and the dispatch layer against the reference oracle."""

import contextlib
import itertools
import os
import zlib
import re
from pathlib import Path

import pytest
import torch

import sae_fast.ops as ops
from sae_fast.ops import codes, reference
from sae_fast.ops.testing import assert_steer_close, clone_case, random_steer_case

HAS_EXT = "cpu" in ops.backend_info()["extension_devices"]
needs_ext = pytest.mark.skipif(not HAS_EXT, reason="sae_fast._C not built")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def test_extension_loads_when_it_is_required():
    """`make test` sets SAE_FAST_REQUIRE_EXT=1: the C++ op tests must then run,
    not skip because sae_fast._C failed to import."""
    import os

    if os.environ.get("SAE_FAST_REQUIRE_EXT") != "1":
        pytest.skip("SAE_FAST_REQUIRE_EXT is not 1 (the extension is optional here)")
    assert HAS_EXT, f"sae_fast._C did not load: {ops.backend_info()['extension_error']}"


def _gemm(T: int, k: int, d: int) -> bool:
    """Whether the C++ CPU op takes its GEMM path for T live rows."""
    return T * k * d >= torch.ops.sae_fast.cpu_gemm_min_work()


@needs_ext
def test_gemm_threshold_env_is_read_and_checked(tmp_path):
    """SAE_FAST_CPU_GEMM_MIN_WORK sets the CPU path threshold (read once) and
    a bad value is refused by name."""
    import subprocess
    import sys
    code = "import sae_fast.ops, torch; print(torch.ops.sae_fast.cpu_gemm_min_work())"
    env = dict(os.environ, SAE_FAST_CPU_GEMM_MIN_WORK="1234")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "1234", out.stderr[-2000:]
    env["SAE_FAST_CPU_GEMM_MIN_WORK"] = "lots"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "SAE_FAST_CPU_GEMM_MIN_WORK=lots" in out.stderr


def test_codes_match_cpp_header():
    header = (Path(__file__).parents[1] / "csrc" / "steer_codes.h").read_text()
    for name, value in [("kOff", codes.MODE_OFF), ("kAdd", codes.MODE_ADD), ("kSet", codes.MODE_SET),
                        ("kScale", codes.MODE_SCALE), ("kAblate", codes.MODE_ABLATE),
                        ("kThresholdRelu", codes.ACT_THRESHOLD_RELU),
                        ("kIdentity", codes.ACT_IDENTITY), ("kTopK", codes.ACT_TOPK)]:
        assert re.search(rf"\b{name} = {value}\b", header), name


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,k,n_live", [(16, 32, 0), (16, 8, 3), (256, 32, 1), (64, 8, 2),
                                         (64, 8, 40)])
def test_few_live_rows_at_large_t_times_k(dtype, T, k, n_live):
    """A batch over the GEMM threshold with few live rows (the vLLM decode
    step: many tokens, most unsteered) takes the row path when the live rows'
    work is under it, else the GEMM path on the gathered live rows; an
    all-unsteered batch returns at once. All match the reference, and off
    rows stay bit-identical."""
    assert _gemm(T, k, 576)
    seed = zlib.crc32(f"few-live-{dtype}-{T}-{k}-{n_live}".encode())
    g = torch.Generator().manual_seed(seed)
    case = random_steer_case(T, 576, k, R=8, dtype=dtype, seed=seed)
    rows = torch.zeros(T, dtype=torch.int32)
    live = torch.randperm(T, generator=g)[:n_live]
    rows[live] = torch.randint(1, 8, (n_live,), generator=g, dtype=torch.int32)
    case["row_index"] = rows
    case["modes"][1:][case["modes"][1:] == codes.MODE_OFF] = codes.MODE_SET
    out = clone_case(case)
    torch.ops.sae_fast.steer_(**out)
    assert_steer_close(out["hidden"], case, what=f"few live {dtype} T={T} k={k} n={n_live}")
    assert torch.equal(out["hidden"][rows == 0], case["hidden"][rows == 0])
    w = torch.randn(8, k)
    w[0] = 0
    h = case["hidden"].clone()
    torch.ops.sae_fast.add_vectors_(h, case["dec_w"], w, rows)
    ref = case["hidden"].clone()
    reference.add_vectors_(ref, case["dec_w"], w, rows)
    tol = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(h.float(), ref.float(), atol=tol * 4, rtol=tol)
    assert torch.equal(h[rows == 0], case["hidden"][rows == 0])


MATCH_SHAPES = [(1, 64, 1), (3, 123, 7), (64, 576, 64), (1000, 64, 7), (1, 4096, 3),
                (17, 4096, 7), (1, 20, 600), (5, 123, 600)]


@needs_ext
def test_reference_shapes_cover_both_cpu_paths():
    paths = {(_gemm(T, k, d), d >= 4096, k > 512) for T, d, k in MATCH_SHAPES}
    assert {(False, True, False), (True, True, False), (False, False, True),
            (True, False, True)} <= paths, paths


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,d,k", MATCH_SHAPES)
@pytest.mark.parametrize("activation", [codes.ACT_THRESHOLD_RELU, codes.ACT_IDENTITY, codes.ACT_TOPK])
def test_steer_cpu_matches_reference(dtype, T, d, k, activation):
    """Both CPU paths (the shapes fall on either side of the GEMM threshold,
    k > 512 included: the row path's heap buffer) against the oracle."""
    seed = zlib.crc32(f"{dtype}-{T}-{d}-{k}-{activation}".encode())
    for residual, idx in itertools.product([True, False], [torch.int32, torch.int64]):
        case = random_steer_case(T, d, k, dtype=dtype, residual=residual, idx_dtype=idx,
                                 activation=activation, seed=seed)
        out = clone_case(case)
        torch.ops.sae_fast.steer_(**out)
        assert_steer_close(out["hidden"], case, what=f"{dtype} T={T} d={d} k={k} res={residual}")


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,d,k", [(150, 123, 16), (256, 576, 8)])
def test_steer_cpu_gemm_path_with_every_row_live(dtype, T, d, k):
    """T*k*d over the threshold takes the GEMM path; with no off row it adds
    the delta to hidden in place instead of gathering and scattering."""
    assert _gemm(T, k, d)
    seed = zlib.crc32(f"all-live-{dtype}-{T}-{d}-{k}".encode())
    for residual in (True, False):
        case = random_steer_case(T, d, k, dtype=dtype, residual=residual, seed=seed,
                                 activation=codes.ACT_TOPK)
        case["row_index"].clamp_(min=1)  # no token on the no-op row 0
        modes = case["modes"]
        modes[1:][modes[1:] == codes.MODE_OFF] = codes.MODE_ADD  # every row steers something
        out = clone_case(case)
        torch.ops.sae_fast.steer_(**out)
        assert_steer_close(out["hidden"], case, what=f"all live {dtype} T={T} d={d} k={k}")


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_clamp_direction_cpu_matches_reference(dtype):
    g = torch.Generator().manual_seed(1)
    T, d, k, R = 9, 123, 3, 3
    u = torch.linalg.qr(torch.randn(d, k, generator=g)).Q.t().contiguous()  # orthonormal rows
    h, r = torch.randn(T, d, generator=g).to(dtype), torch.randn(T, d, generator=g).to(dtype)
    ma, s = torch.rand(k, generator=g) * 5, torch.randn(R, k, generator=g)
    modes = torch.full((R, k), codes.MODE_SET, dtype=torch.int8)
    modes[0] = 0
    rows = torch.randint(0, R, (T,), generator=g)
    args = (u.to(dtype), ma, s, modes, rows, 1.5, -2.0, 2.0)
    out, ref = h.clone(), h.clone()
    torch.ops.sae_fast.clamp_direction_(out, r, *args)
    reference.clamp_direction_(ref, r, *args)
    tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 8e-2}[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    # Along each (orthonormal) direction the stream now sits at the clamped value.
    x = out.float() + r.float()
    steered = modes[rows.long()][:, 0] != 0
    want = s[rows.long()].clamp(-2, 2) * 1.5 * ma
    proj = x @ u.t().float()
    torch.testing.assert_close(proj[steered], want[steered], atol=tol * 20, rtol=tol * 5)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,d,k", [(1, 64, 1), (33, 123, 7), (200, 576, 64)])
def test_add_vectors_cpu_matches_reference(dtype, T, d, k):
    g = torch.Generator().manual_seed(T * d + k)
    h = torch.randn(T, d, generator=g).to(dtype)
    v = torch.randn(k, d, generator=g).to(dtype)
    w = torch.randn(5, k, generator=g)
    w[0] = 0
    rows = torch.randint(0, 5, (T,), generator=g)
    out, ref = h.clone(), h.clone()
    torch.ops.sae_fast.add_vectors_(out, v, w, rows)
    reference.add_vectors_(ref, v, w, rows)
    tol = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol * 4, rtol=tol)
    assert torch.equal(out[rows == 0], h[rows == 0])


@needs_ext
def test_row_zero_is_exact_noop_and_t0_is_fine():
    case = random_steer_case(16, 123, 7, dtype=torch.bfloat16)
    case["row_index"].zero_()
    out = clone_case(case)
    torch.ops.sae_fast.steer_(**out)
    assert torch.equal(out["hidden"], case["hidden"])
    empty = random_steer_case(0, 64, 3)
    torch.ops.sae_fast.steer_(**empty)


@needs_ext
@pytest.mark.parametrize("T,k", [(5, 3), (64, 64)])  # row path and GEMM path
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_off_rows_are_bit_identical(T, k, dtype):
    case = random_steer_case(T, 123, k, dtype=dtype)
    case["row_index"][::2] = 0
    case["modes"][1:] = codes.MODE_SET
    off = case["row_index"] == 0
    case["hidden"][off, 0] = -0.0
    case["hidden"][off, 1] = float("nan")
    before = case["hidden"].clone()
    torch.ops.sae_fast.steer_(**case)
    bits = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[dtype]
    assert torch.equal(case["hidden"][off].view(bits), before[off].view(bits))
    assert not torch.equal(case["hidden"][~off], before[~off])
    w = torch.randn(4, k)
    w[0] = 0
    h = before.clone()
    torch.ops.sae_fast.add_vectors_(h, case["dec_w"], w, case["row_index"])
    assert torch.equal(h[off].view(bits), before[off].view(bits))


@needs_ext
@pytest.mark.parametrize("bad,match", [
    (dict(row_index=torch.tensor([0, 9, 1], dtype=torch.int32)), r"row_index\[1\] = 9 is outside \[0, 4\)"),
    (dict(enc_w=torch.randn(7, 65)), r"enc_w must have shape \[k, 123\]"),
    (dict(strengths=torch.randn(4, 6)), r"strengths must have shape \[R >= 1, 7\]"),
    (dict(modes=torch.zeros(4, 7, dtype=torch.int32)), r"modes must be int8"),
    (dict(activation=7), r"activation must be 0 .* got 7"),
    (dict(min_strength=3.0, max_strength=1.0), r"min_strength \(3\) must be <= max_strength \(1\)"),
    (dict(residual=torch.randn(3, 122)), r"residual shape .* must equal hidden shape"),
])
def test_steer_cpu_bad_input_names_value(bad, match):
    case = random_steer_case(3, 123, 7)
    case.update(bad)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.sae_fast.steer_(**case)


@needs_ext
def test_bad_mode_code_is_named():
    case = random_steer_case(3, 64, 2)
    case["modes"][1:] = 9
    case["row_index"].fill_(1)
    with pytest.raises(RuntimeError, match=r"modes\[1, 0\] = 9 is not a mode code"):
        torch.ops.sae_fast.steer_(**case)


@needs_ext
def test_opcheck_cpu_ops():
    case = random_steer_case(5, 64, 3, activation=codes.ACT_TOPK)
    torch.library.opcheck(torch.ops.sae_fast.steer_.default, tuple(case.values()))
    g = torch.Generator().manual_seed(0)
    torch.library.opcheck(torch.ops.sae_fast.add_vectors_.default,
                          (torch.randn(4, 32, generator=g), torch.randn(3, 32, generator=g),
                           torch.randn(2, 3, generator=g), torch.tensor([0, 1, 1, 0])))
    u = torch.nn.functional.normalize(torch.randn(2, 32, generator=g), dim=-1)
    torch.library.opcheck(torch.ops.sae_fast.clamp_direction_.default,
                          (torch.randn(4, 32, generator=g), None, u, torch.ones(2),
                           torch.ones(2, 2), torch.ones(2, 2, dtype=torch.int8),
                           torch.tensor([0, 1, 1, 0]), 1.0, -1.0, 1.0))


def test_opcheck_reference_ops():
    case = random_steer_case(5, 64, 3)
    torch.library.opcheck(torch.ops.sae_fast_ref.steer_.default, tuple(case.values()))


@pytest.mark.parametrize("backend", ["ext", "reference"])
def test_dispatch_uses_forced_backend(monkeypatch, backend):
    if backend == "ext" and not HAS_EXT:
        pytest.skip("no extension")
    monkeypatch.setenv("SAE_FAST_BACKEND", backend)
    ops.reset_backend_selection()
    try:
        case = random_steer_case(7, 123, 5)
        out = clone_case(case)
        ops.steer_(**out)
        assert ops.backend_for("cpu") == backend
        assert_steer_close(out["hidden"], case, what=backend)
    finally:
        monkeypatch.delenv("SAE_FAST_BACKEND")
        ops.reset_backend_selection()


def test_resolved_op_cache_follows_the_selection(monkeypatch):
    """Eager calls reuse the resolved op, but only while its backend is still
    selected: after a reset to SAE_FAST_BACKEND=reference the oracle runs, and
    after a reset back the compiled op runs again (counted by the oracle)."""
    if not HAS_EXT:
        pytest.skip("no extension")
    case = random_steer_case(5, 64, 3)
    calls = []
    real = reference.steer_
    # the registered oracle op calls it positionally, assert_steer_close by keyword
    monkeypatch.setattr(reference, "steer_",
                        lambda *a, **kw: (a and calls.append(1)) or real(*a, **kw))
    ops.reset_backend_selection()
    try:
        for backend, want in (("auto", 0), ("reference", 2), ("auto", 2)):
            monkeypatch.setenv("SAE_FAST_BACKEND", backend)
            ops.reset_backend_selection()
            for _ in range(2):
                out = clone_case(case)
                ops.steer_(**out)
                assert_steer_close(out["hidden"], case, what=backend)
            assert len(calls) == want, backend
    finally:
        monkeypatch.delenv("SAE_FAST_BACKEND")
        ops.reset_backend_selection()


def test_bad_backend_env_is_named(monkeypatch):
    monkeypatch.setenv("SAE_FAST_BACKEND", "fastest")
    ops.reset_backend_selection()
    with pytest.raises(ValueError, match="SAE_FAST_BACKEND='fastest'"):
        ops.backend_for("cpu")
    monkeypatch.delenv("SAE_FAST_BACKEND")
    ops.reset_backend_selection()


def test_ops_under_torch_compile_have_no_graph_break():
    case = random_steer_case(6, 64, 4)
    tensors = {k: v for k, v in case.items() if isinstance(v, torch.Tensor)}
    scalars = {k: v for k, v in case.items() if not isinstance(v, torch.Tensor)}
    residual = tensors.pop("residual")
    hidden = tensors.pop("hidden")

    def layer(h, r):
        h = h * 1.0  # a stand-in for the decoder layer's own compute
        ops.steer_(h, r, **tensors, **scalars)
        return h + 0.0

    explained = torch._dynamo.explain(layer)(hidden.clone(), residual)
    assert explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out = compiled(hidden.clone(), residual)
    assert_steer_close(out, case, what="compiled")
    # Tables edited in place between calls take effect without recompiling.
    tensors["strengths"].mul_(-1)
    out2 = compiled(hidden.clone(), residual)
    case2 = dict(case, strengths=tensors["strengths"])
    assert_steer_close(out2, case2, what="compiled after in-place edit")


@needs_ext
def test_gemm_path_bad_values_are_named():
    assert _gemm(600, 8, 64)
    case = random_steer_case(600, 64, 8)
    case["row_index"][37] = 11
    with pytest.raises(RuntimeError, match=r"row_index\[37\] = 11 is outside \[0, 4\)"):
        torch.ops.sae_fast.steer_(**case)
    case = random_steer_case(600, 64, 8)
    case["modes"][2, 5] = -3
    with pytest.raises(RuntimeError, match=r"modes\[2, 5\] = -3 is not a mode code"):
        torch.ops.sae_fast.steer_(**case)


# ---------------------------------------------------------------- count_
@contextlib.contextmanager
def _with_threads(n):
    """torch's thread count for a block, through the C setter: an in-process
    vLLM engine replaces ``torch.set_num_threads`` with a no-op."""
    before = torch.get_num_threads()
    torch._C.set_num_threads(n)
    try:
        yield
    finally:
        torch._C.set_num_threads(before)


@pytest.mark.parametrize("path", ["ext", "reference"])
def test_count_counts_once_per_call_eager_compiled_and_opchecked(monkeypatch, path):
    if path == "ext" and not ops._EXT_COUNT:
        pytest.skip("no extension")
    monkeypatch.setattr(ops, "_EXT_COUNT", path == "ext")
    c = torch.zeros(1, dtype=torch.int64)
    for _ in range(3):
        ops.count_(c)
    assert int(c) == 3
    op = torch.ops.sae_fast.count_ if path == "ext" else torch.ops.sae_fast_ref.count_
    torch.library.opcheck(op.default, (torch.zeros(1, dtype=torch.int64),))

    def f(x):
        ops.count_(c)
        return x * 2

    g = torch.compile(f, fullgraph=True, backend="aot_eager")
    for _ in range(4):
        g(torch.ones(3))
    assert int(c) == 7


def test_count_runs_once_per_graph_execution_where_an_inlined_add_runs_per_thread():
    """The vLLM slots' "the op ran" counter (worker.LayerSlot). Inductor with
    dynamic threads (vLLM's compile setting) and a graph compiled while torch
    saw one thread, run with two: a plain ``calls.add_(1)`` fused into the
    parallel CPU kernel ran once per OpenMP thread (CI counted 14 calls for 7
    steps); ``ops.count_`` is an op call and runs once. The slot under test is
    the real one, steering a real table in the same compiled graph."""
    import torch._inductor.config as inductor_config

    from sae_fast.backends.vllm_engine.worker import LayerSlot
    from sae_fast.plan import SteeringSpec, build_plan
    from sae_fast.sae import random_sae

    torch.manual_seed(0)
    row_index = torch.ones(64, dtype=torch.int32)
    slot = LayerSlot(0, 128, 4, 2, row_index, torch.device("cpu"), torch.float32)
    cols = torch.tensor(slot.take_columns(3))
    sae = random_sae(128, 256, seed=5)
    slot.write_columns(cols, build_plan(sae, SteeringSpec(features=[1, 7, 9], mode="add")))
    slot.tables.strengths[1, cols] = torch.tensor([2.0, -1.0, 3.0])
    slot.tables.modes[1, cols] = ops.MODE_ADD
    w = torch.randn(128)

    def layer(x, r):
        h = x * 2 + r  # the layer's own compute
        slot.apply_(h, r)
        return torch.nn.functional.rms_norm(h + r, (128,), w)  # the next layer's

    x, r = torch.randn(9, 128), torch.randn(9, 128)
    eager = layer(x.clone(), r)
    assert int(slot.calls) == 1
    with _with_threads(2), inductor_config.patch({"cpp.threads": 1, "cpp.dynamic_threads": True}):
        torch._dynamo.reset()
        g = torch.compile(layer, fullgraph=True, dynamic=True)
        for n in range(5):
            out = g(x.clone(), r)
        torch._dynamo.reset()
    assert int(slot.calls) == 6
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    assert (eager - torch.nn.functional.rms_norm(x * 2 + 2 * r, (128,), w)).abs().max() > 1e-2
