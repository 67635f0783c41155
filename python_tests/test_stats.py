"""sae_fast.stats: SteeringStats and FeatureSummary. Strength mean/std
against ``statistics`` over the union of every recorded value (empty, single,
odd-sized, 2-D, fp16/bf16 batches), step / failure / missed counters and their
log lines, per-feature activation summaries against a hand computation,
as_dict, merge (features pooled) and reset."""

import logging
import math
import statistics
import threading

import pytest
import torch

from sae_fast.stats import FeatureSummary, SteeringStats

FRESH = {"steps": 0, "steered_rows": 0, "successes": 0, "failures": 0, "missed": 0,
         "failure_reasons": {}, "strength_mean": 0.0, "strength_std": 0.0, "strength_count": 0,
         "steer_time_s": 0.0, "features": {}}


def _batches(seed, sizes, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, generator=g) * 2.5 + 0.7).to(dtype) for n in sizes]


def _values(batches):
    """The recorded values as Python floats (exact images of the tensors' values)."""
    return [float(v) for b in batches for v in b.double().reshape(-1).tolist()]


def _pooled(batches):
    vals = _values(batches)
    if not vals:
        return 0, 0.0, 0.0
    return len(vals), statistics.fmean(vals), statistics.pstdev(vals)


# =========================================================================== strengths
def test_fresh_stats_as_dict():
    assert SteeringStats().as_dict() == FRESH


@pytest.mark.parametrize("sizes", [(1,), (2,), (7,), (3, 0, 5, 1, 11), (0, 0, 2), (64, 1, 33, 2),
                                   (1,) * 9, (1000, 17)])
def test_strength_mean_std_pool_every_batch(sizes):
    batches = _batches(sum(sizes), sizes)
    st = SteeringStats()
    for b in batches:
        st.record_strengths(b)
    n, mean, std = _pooled(batches)
    assert st.strength_n == st.as_dict()["strength_count"] == n
    assert st.strength_mean == pytest.approx(mean, rel=1e-5, abs=1e-6)
    assert st.strength_std == pytest.approx(std, rel=1e-5, abs=1e-6)
    d = st.as_dict()
    assert d["strength_mean"] == st.strength_mean and d["strength_std"] == st.strength_std


def test_strength_std_is_the_population_std():
    st = SteeringStats()
    st.record_strengths(torch.tensor([1.0, 3.0]))
    assert st.strength_mean == 2.0
    assert st.strength_std == pytest.approx(1.0)  # the sample std would be sqrt(2)
    st.record_strengths(torch.tensor([[2.0, 2.0], [8.0, 2.0]]))  # [rows, k]: every entry counts
    assert st.strength_n == 6
    assert st.strength_mean == pytest.approx(3.0)
    assert st.strength_std == pytest.approx(math.sqrt((4 + 0 + 1 + 1 + 25 + 1) / 6))


def test_strengths_of_2d_rows_match_torch():
    g = torch.Generator().manual_seed(1)
    rows = [torch.randn(r, 3, generator=g) * 4 for r in (5, 1, 8)]
    st = SteeringStats()
    for r in rows:
        st.record_strengths(r)
    allv = torch.cat([r.reshape(-1) for r in rows]).double()
    assert st.strength_n == allv.numel() == 42
    assert st.strength_mean == pytest.approx(float(allv.mean()), rel=1e-6, abs=1e-7)
    assert st.strength_std == pytest.approx(float(allv.std(correction=0)), rel=1e-5)


@pytest.mark.parametrize("empty", [torch.empty(0), torch.empty(0, 3), torch.empty(4, 0),
                                   torch.empty(0, dtype=torch.float16)])
def test_empty_batches_change_nothing(empty):
    st = SteeringStats()
    st.record_strengths(empty)
    assert st.as_dict() == FRESH
    st.record_strengths(torch.tensor([1.5, -0.5]))
    st.record_strengths(empty)
    assert (st.strength_n, st.strength_mean, st.strength_std) == (2, 0.5, 1.0)


@pytest.mark.parametrize("value", [torch.tensor([2.5]), torch.tensor(2.5), torch.tensor([[2.5]])])
def test_one_value(value):
    st = SteeringStats()
    st.record_strengths(value)
    assert (st.strength_n, st.strength_mean, st.strength_std) == (1, 2.5, 0.0)


def test_strengths_with_grad_are_recorded_detached():
    x = torch.tensor([1.0, 2.0, 6.0], requires_grad=True)
    st = SteeringStats()
    st.record_strengths(x * 2)
    assert st.strength_n == 3 and st.strength_mean == pytest.approx(6.0)
    assert isinstance(st.strength_sum, float) and isinstance(st.strength_m2, float)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    batches = _batches(5, (9, 1, 30, 4), dtype=dtype)
    st = SteeringStats()
    for b in batches:
        st.record_strengths(b)
    n, mean, std = _pooled(batches)  # of the values as stored in fp16 / bf16
    assert st.strength_n == n == 44
    assert st.strength_mean == pytest.approx(mean, rel=1e-5)
    assert st.strength_std == pytest.approx(std, rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_sums_do_not_overflow_or_round(dtype):
    """4096 x 60 sums to 245760 (> fp16's 65504) and the squares to 1.5e7;
    summed in bf16 the total would round off long before."""
    st = SteeringStats()
    st.record_strengths(torch.full((4096,), 60.0, dtype=dtype))
    st.record_strengths(torch.full((3,), 1.5, dtype=dtype))
    assert st.strength_n == 4099
    assert st.strength_mean == pytest.approx((4096 * 60.0 + 3 * 1.5) / 4099, rel=1e-6)
    assert math.isfinite(st.strength_std)
    assert st.strength_std == pytest.approx(statistics.pstdev([60.0] * 4096 + [1.5] * 3),
                                            rel=1e-4)


def test_strength_std_is_accurate_when_small_against_the_mean():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, generator=g) * 0.01 + 5.0
    st = SteeringStats()
    st.record_strengths(x)
    assert st.strength_std == pytest.approx(statistics.pstdev(_values([x])), rel=1e-3)


# =========================================================================== steps, failures
def test_steps_and_steered_rows():
    st = SteeringStats()
    for rows in (5, 0, 3, 12):
        st.record_step(rows)
    d = st.as_dict()
    assert (d["steps"], d["successes"], d["steered_rows"], d["failures"]) == (4, 4, 20, 0)


def test_failures_counted_per_reason_and_logged_once_per_reason(caplog):
    st = SteeringStats()
    st.record_step(2)
    with caplog.at_level(logging.ERROR, logger="sae_fast.stats"):
        for reason in ("a", "b", "a", "a", "c", "b"):
            st.record_failure(reason)
    assert st.failures == 6 and st.missed == 0
    assert st.failure_reasons == {"a": 3, "b": 2, "c": 1}
    assert (st.steps, st.successes) == (1, 1)  # a failure is not a step
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 3
    assert [r.getMessage().endswith("only counted)") for r in errors] == [True] * 3
    for r, reason in zip(errors, "abc"):
        assert f"unsteered for this step: {reason} " in r.getMessage()


def test_missed_steps_are_failures_and_warn_when_passing_a_power_of_two(caplog):
    st = SteeringStats()
    with caplog.at_level(logging.WARNING, logger="sae_fast.stats"):
        for _ in range(9):
            st.record_missed("hook bypassed")
    assert st.missed == 9 and st.failures == 9 and st.failure_reasons == {"hook bypassed": 9}
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [int(m.split("sae_fast: ")[1].split(" ")[0]) for m in warned] == [1, 2, 4, 8]
    assert all(m.endswith("did not run: hook bypassed") for m in warned)
    assert sum(r.levelno == logging.ERROR for r in caplog.records) == 1  # the first failure


def test_missed_with_several_steps_per_call(caplog):
    """``steps`` missed steps in one call: missed grows by ``steps``, the call
    is one failure; a warning whenever the total passes a power of two."""
    st = SteeringStats()
    with caplog.at_level(logging.WARNING, logger="sae_fast.stats"):
        for steps in (3, 3, 1, 1, 10):  # totals 3, 6, 7, 8, 18
            st.record_missed("graph without the op", steps=steps)
    assert st.missed == 18 and st.failures == 5
    assert st.failure_reasons == {"graph without the op": 5}
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [int(m.split("sae_fast: ")[1].split(" ")[0]) for m in warned] == [3, 6, 8, 18]


def test_counters_are_exact_under_concurrent_recording():
    st = SteeringStats()
    ones = torch.ones(3)

    def work():
        for _ in range(400):
            st.record_step(2)
            st.record_strengths(ones)
            st.record_failure("x")

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (st.steps, st.successes, st.steered_rows) == (2400, 2400, 4800)
    assert st.strength_n == 7200 and st.strength_sum == 7200.0
    assert st.failures == 2400 and st.failure_reasons == {"x": 2400}


# =========================================================================== features
def test_fresh_feature_summary():
    assert FeatureSummary().as_dict() == {
        "tokens": 0, "before_mean": 0.0, "after_mean": 0.0, "before_max": -math.inf,
        "after_max": -math.inf, "before_active_frac": 0.0, "after_active_frac": 0.0}


def test_feature_summaries_against_a_hand_computation():
    st = SteeringStats()
    # features 7 and 2 (columns 0 and 1); two batches of 3 and 1 rows
    st.record_features([7, 2], torch.tensor([[0.0, 1.0], [2.0, -1.0], [4.0, 0.0]]),
                       torch.tensor([[1.0, 0.0], [3.0, 0.5], [5.0, 0.0]]))
    st.record_features([7, 2], torch.tensor([[-6.0, 3.0]]), torch.tensor([[0.0, -2.0]]))
    d = st.as_dict()["features"]
    assert list(d) == [2, 7]  # sorted by feature index
    assert d[7] == {"tokens": 4, "before_mean": 0.0, "after_mean": 2.25, "before_max": 4.0,
                    "after_max": 5.0, "before_active_frac": 0.5, "after_active_frac": 0.75}
    assert d[2] == {"tokens": 4, "before_mean": 0.75, "after_mean": -0.375, "before_max": 3.0,
                    "after_max": 0.5, "before_active_frac": 0.5, "after_active_frac": 0.25}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_feature_summaries_of_half_precision_activations(dtype):
    g = torch.Generator().manual_seed(2)
    parts = [(torch.randn(n, 2, generator=g).to(dtype), torch.randn(n, 2, generator=g).to(dtype))
             for n in (5, 11, 1)]
    st = SteeringStats()
    for b, a in parts:
        st.record_features([0, 9], b, a)
    d = st.as_dict()["features"]
    for j, f in enumerate((0, 9)):
        before = [float(v) for b, _ in parts for v in b[:, j].tolist()]
        after = [float(v) for _, a in parts for v in a[:, j].tolist()]
        assert d[f]["tokens"] == 17
        assert d[f]["before_mean"] == pytest.approx(statistics.fmean(before), rel=1e-5, abs=1e-6)
        assert d[f]["after_mean"] == pytest.approx(statistics.fmean(after), rel=1e-5, abs=1e-6)
        assert d[f]["before_max"] == max(before) and d[f]["after_max"] == max(after)
        assert d[f]["before_active_frac"] == sum(v > 0 for v in before) / 17
        assert d[f]["after_active_frac"] == sum(v > 0 for v in after) / 17


def test_feature_summaries_skip_an_empty_batch():
    st = SteeringStats()
    st.record_features([3], torch.tensor([[1.0]]), torch.tensor([[2.0]]))
    st.record_features([3], torch.empty(0, 1), torch.empty(0, 1))
    assert st.as_dict()["features"][3]["tokens"] == 1


# =========================================================================== as_dict
def _filled(seed=0, reasons=("a",), features=(4,), steer_time=0.25):
    st = SteeringStats()
    for b in _batches(seed, (3, 5)):
        st.record_strengths(b)
    st.record_step(6)
    st.record_step(2)
    for r in reasons:
        st.record_failure(r)
    st.record_missed("m", steps=2)
    g = torch.Generator().manual_seed(seed)
    st.record_features(list(features), torch.randn(4, len(features), generator=g),
                       torch.randn(4, len(features), generator=g))
    st.steer_time_s = steer_time
    return st


def test_as_dict_values_and_copies():
    st = _filled()
    d = st.as_dict()
    assert set(d) == set(FRESH)
    assert (d["steps"], d["steered_rows"], d["successes"]) == (2, 8, 2)
    assert (d["failures"], d["missed"], d["failure_reasons"]) == (2, 2, {"a": 1, "m": 1})
    assert d["strength_count"] == 8 and d["steer_time_s"] == 0.25
    assert set(d["features"]) == {4} and d["features"][4]["tokens"] == 4
    d["failure_reasons"]["a"] = 99
    d["features"][4]["tokens"] = 99
    assert st.failure_reasons == {"a": 1, "m": 1} and st.features[4].count == 4


# =========================================================================== merge, reset
def test_merge_sums_counters_and_pools_strengths():
    a = _filled(0, reasons=("a", "b"), features=(4,), steer_time=0.25)
    b = _filled(1, reasons=("b",), features=(6, 8), steer_time=0.5)
    a_before, b_before = a.as_dict(), b.as_dict()
    m = a.merge(b)
    assert m is not a and m is not b
    assert a.as_dict() == a_before and b.as_dict() == b_before  # inputs untouched
    d = m.as_dict()
    assert (d["steps"], d["steered_rows"], d["successes"]) == (4, 16, 4)
    assert (d["failures"], d["missed"]) == (5, 4)
    assert d["failure_reasons"] == {"a": 1, "b": 2, "m": 2}
    assert d["steer_time_s"] == pytest.approx(0.75)
    n, mean, std = _pooled(_batches(0, (3, 5)) + _batches(1, (3, 5)))
    assert d["strength_count"] == n == 16
    assert d["strength_mean"] == pytest.approx(mean, rel=1e-6)
    assert d["strength_std"] == pytest.approx(std, rel=1e-5)
    assert d["features"] == {**a_before["features"], **b_before["features"]}
    assert a.merge(SteeringStats()).as_dict() == a_before == SteeringStats().merge(a).as_dict()


def test_merge_pools_a_feature_present_in_both():
    a, b = SteeringStats(), SteeringStats()
    a.record_features([5], torch.tensor([[1.0], [3.0]]), torch.tensor([[2.0], [0.0]]))
    b.record_features([5], torch.tensor([[8.0]]), torch.tensor([[-1.0]]))
    f = a.merge(b).as_dict()["features"][5]
    assert f["tokens"] == 3
    assert f["before_mean"] == pytest.approx(4.0) and f["before_max"] == 8.0
    assert f["after_mean"] == pytest.approx(1 / 3) and f["after_active_frac"] == pytest.approx(1 / 3)


def test_reset_returns_to_fresh_and_logs_again(caplog):
    st = _filled()
    reasons_dict, features_dict = st.failure_reasons, st.features
    st.reset()
    assert st.as_dict() == FRESH
    assert st.failure_reasons is reasons_dict and st.features is features_dict  # cleared in place
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sae_fast.stats"):
        st.record_failure("a")  # seen before the reset: logged again
        st.record_missed("m")  # the power-of-two warnings start over
    assert sum(r.levelno == logging.ERROR for r in caplog.records) == 2
    assert sum(r.levelno == logging.WARNING for r in caplog.records) == 1
    st.record_strengths(torch.tensor([4.0, 6.0]))
    assert (st.strength_n, st.strength_mean, st.strength_std) == (2, 5.0, 1.0)
