"""SteeringTables: the per-request rows every backend writes. Bounds, scale,
per-request max_activation and feature subsets against a hand computation;
every bad value refused with a message naming it."""

import math

import pytest
import torch

from sae_fast.backends.tables import SteeringTables
from sae_fast.ops import codes
from sae_fast.plan import SteeringSpec, SteeringSpecError, build_plan
from sae_fast.sae import random_sae


@pytest.fixture(scope="module")
def tables():
    sae = random_sae(16, 32, seed=3)
    spec = SteeringSpec(features=[4, 9, 20], mode="set", max_activations=[2.0, 4.0, 8.0],
                        min_strength=-2.0, max_strength=3.0, strength_scale=0.5)
    return SteeringTables(build_plan(sae, spec), max_rows=4, max_tokens=8)


def test_out_of_bounds_strengths_are_bounded_then_scaled(tables):
    s, m = tables.row_values([9.0, -9.0, 1.0])
    assert s.tolist() == [3.0 * 0.5, -2.0 * 0.5, 1.0 * 0.5]
    assert m.tolist() == [codes.MODE_SET] * 3
    s, _ = tables.row_values(7.0, scale=2.0)  # one value for all; scale overrides the spec's
    assert s.tolist() == [6.0, 6.0, 6.0]


def test_feature_subset_and_per_request_max_activation(tables):
    s, m = tables.row_values([1.0], features=[9], mode="add", max_activation=[6.0])
    assert m.tolist() == [codes.MODE_OFF, codes.MODE_ADD, codes.MODE_OFF]
    assert s.tolist() == [0.0, pytest.approx(1.0 * 0.5 * 6.0 / 4.0), 0.0]


@pytest.mark.parametrize("kwargs,match", [
    (dict(strengths=[math.inf, 1, 1]), r"strengths\[0\] = inf is not finite"),
    (dict(strengths=[1.0, math.nan, 1.0]), r"strengths\[1\] = nan is not finite"),
    (dict(strengths=[1.0, 2.0]), r"strengths has 2 values for 3 selected features"),
    (dict(strengths=["x", 1, 2]), r"strengths\[0\] = 'x' is not a number"),
    (dict(features=[7]), r"feature 7 is not among"),
    (dict(features=[3.7]), r"3\.7"),
    (dict(strengths=1.0, scale=math.inf), r"strength_scale = inf is not finite"),
    (dict(features=[9], max_activation=[math.nan]), r"max_activation\[0\] = nan is not finite"),
    (dict(mode="push"), r"push"),
])
def test_bad_row_values_are_refused_naming_the_value(tables, kwargs, match):
    with pytest.raises(SteeringSpecError, match=match):
        tables.row_values(**kwargs)


def test_rows_outside_the_table_are_refused_and_row_zero_stays_the_no_op(tables):
    with pytest.raises(IndexError, match=r"row 0 is outside 1\.\.4 \(row 0 is the no-op row\)"):
        tables.write_row(0, 1.0)
    with pytest.raises(IndexError, match=r"row 5 is outside 1\.\.4"):
        tables.write_row(5, 1.0)
    eff = tables.write_row(2, [9.0, 0.0, -1.0])
    assert eff.tolist() == [1.5, 0.0, -0.5]
    assert torch.count_nonzero(tables.modes[0]) == 0 and torch.count_nonzero(tables.strengths[0]) == 0
    tables.clear_row(2)
    assert torch.count_nonzero(tables.modes) == 0


# ---------------------------------------------------------------- every public method
# Fresh tables per test (the module fixture above is shared); same SAE and spec
# unless overridden.
def _make(sae=None, max_rows=4, max_tokens=8, **spec):
    base = dict(features=[4, 9, 20], mode="set", max_activations=[2.0, 4.0, 8.0],
                min_strength=-2.0, max_strength=3.0, strength_scale=0.5)
    base.update(spec)
    sae = random_sae(16, 32, seed=3) if sae is None else sae
    return SteeringTables(build_plan(sae, SteeringSpec(**base)), max_rows=max_rows,
                          max_tokens=max_tokens)


def test_table_shapes_dtypes_and_size_checks():
    t = _make(max_rows=5, max_tokens=7)
    assert t.k == 3
    assert (t.strengths.shape, t.strengths.dtype) == ((6, 3), torch.float32)
    assert (t.modes.shape, t.modes.dtype) == ((6, 3), torch.int8)
    assert (t.row_index.shape, t.row_index.dtype) == ((7,), torch.int32)
    assert not t.strengths.any() and not t.modes.any() and not t.row_index.any()
    for rows, tokens in ((0, 8), (4, 0)):
        with pytest.raises(ValueError, match="must be >= 1"):
            _make(max_rows=rows, max_tokens=tokens)


def test_columns_all_subset_order_and_unknown():
    t = _make()
    assert t.columns(None) == [0, 1, 2]
    assert t.columns([20, 4]) == [2, 0]  # the caller's order, not the plan's
    assert t.columns([9]) == [1] and t.columns([]) == []
    with pytest.raises(SteeringSpecError, match=r"feature 5 is not among .* \[4, 9, 20\]"):
        t.columns([4, 5])


def test_row_values_default_strengths_are_the_specs_bounded_then_scaled():
    t = _make(mode="add", strengths=[2.0, -4.0, 10.0], max_activations=None)
    s, m = t.row_values()
    assert s.tolist() == [2.0 * 0.5, -2.0 * 0.5, 3.0 * 0.5]
    assert m.tolist() == [codes.MODE_ADD] * 3
    s, m = t.row_values(features=[20])  # the default of the selected feature only
    assert s.tolist() == [0.0, 0.0, 1.5]
    assert m.tolist() == [codes.MODE_OFF, codes.MODE_OFF, codes.MODE_ADD]
    assert _make().row_values()[0].tolist() == [0.5, 0.5, 0.5]  # no spec strengths: 1 each


def test_row_values_scale_and_max_activation_by_hand():
    t = _make()
    assert t.row_values(2.0, scale=0.0)[0].tolist() == [0.0, 0.0, 0.0]
    assert t.row_values(2.0, scale=-1.0)[0].tolist() == [-2.0, -2.0, -2.0]
    # one max_activation for all: strength x 0.5 x m / plan's [2, 4, 8]
    assert t.row_values(2.0, max_activation=4.0)[0].tolist() == [2.0, 1.0, 0.5]
    # a subset in the caller's order: each value lands in its feature's column
    s, m = t.row_values([1.0, -1.0], features=[20, 4], max_activation=[16.0, 1.0])
    assert s.tolist() == [-1.0 * 0.5 * 1.0 / 2.0, 0.0, 1.0 * 0.5 * 16.0 / 8.0]
    assert m.tolist() == [codes.MODE_SET, codes.MODE_OFF, codes.MODE_SET]
    # bounds apply to the requested strength, not to the scaled result
    assert t.row_values([9.0], features=[4], max_activation=[8.0])[0].tolist() == \
        [3.0 * 0.5 * 8.0 / 2.0, 0.0, 0.0]
    assert t.row_values(torch.tensor([9.0, -9.0, 0.25]))[0].tolist() == [1.5, -1.0, 0.125]


def test_per_request_max_activation_needs_a_nonzero_one_at_attach_for_those_features():
    t = _make(max_activations=[2.0, 0.0, 8.0])
    with pytest.raises(SteeringSpecError, match="needs a nonzero max_activation at attach"):
        t.row_values(1.0, max_activation=4.0)
    with pytest.raises(SteeringSpecError, match="needs a nonzero max_activation at attach"):
        t.row_values([1.0], features=[9], max_activation=[4.0])
    # feature 9's zero does not matter to a row that leaves it off
    assert t.row_values([1.0], features=[4], max_activation=[4.0])[0].tolist() == [1.0, 0.0, 0.0]


def test_write_row_writes_that_row_only_and_returns_the_active_strengths():
    t = _make()
    eff = t.write_row(3, [1.0], features=[20], mode="add")
    assert eff.tolist() == [0.5]  # the active feature only
    assert t.strengths[3].tolist() == [0.0, 0.0, 0.5]
    assert t.modes[3].tolist() == [codes.MODE_OFF, codes.MODE_OFF, codes.MODE_ADD]
    eff = t.write_row(1, [4.0, -1.0], features=[9, 4], max_activation=[8.0, 2.0])
    assert eff.tolist() == [-0.5, 3.0 * 0.5 * 8.0 / 4.0]  # in column order (features 4, 9)
    assert t.strengths[1].tolist() == [-0.5, 3.0, 0.0]
    assert t.modes[1].tolist() == [codes.MODE_SET, codes.MODE_SET, codes.MODE_OFF]
    assert t.strengths[3].tolist() == [0.0, 0.0, 0.5]  # row 3 untouched
    for r in (0, 2, 4):
        assert not t.strengths[r].any() and not t.modes[r].any(), r
    # a rewrite replaces the whole row: features not in the new subset turn off
    t.write_row(1, 2.0, features=[20])
    assert t.strengths[1].tolist() == [0.0, 0.0, 1.0]
    assert t.modes[1].tolist() == [codes.MODE_OFF, codes.MODE_OFF, codes.MODE_SET]
    assert t.write_row(2, 0.0).tolist() == [0.0, 0.0, 0.0]  # strength 0 is still active


def test_clear_row_and_clear_are_in_place():
    t = _make()
    ptrs = [x.data_ptr() for x in (t.strengths, t.modes, t.row_index)]
    t.write_row(1, [1.0, 2.0, -1.0])
    t.write_row(4, 1.0, mode="add")
    t.row_index.copy_(torch.tensor([0, 1, 1, 4, 4, 4, 0, 1], dtype=torch.int32))
    t.clear_row(1)
    assert not t.strengths[1].any() and not t.modes[1].any()
    assert t.strengths[4].tolist() == [0.5] * 3 and t.modes[4].tolist() == [codes.MODE_ADD] * 3
    assert t.row_index.tolist() == [0, 1, 1, 4, 4, 4, 0, 1]  # clear_row leaves the map alone
    with pytest.raises(IndexError, match="row 0 is outside"):
        t.clear_row(0)
    t.clear()
    assert not t.strengths.any() and not t.modes.any() and not t.row_index.any()
    assert [x.data_ptr() for x in (t.strengths, t.modes, t.row_index)] == ptrs


@pytest.mark.parametrize("arch", ["standard", "jumprelu"])
def test_selected_activations_match_the_sae_encode(arch):
    sae = random_sae(16, 32, architecture=arch, seed=5)
    t = _make(sae=sae)
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))
    ref = sae.encode(x)[:, [4, 9, 20]]
    assert torch.allclose(t.selected_activations(x), ref, atol=1e-5)


def test_apply_refuses_more_tokens_than_the_map_and_row_zero_is_a_no_op():
    t = _make(max_tokens=4)
    t.write_row(1, 3.0)  # written but not mapped: every token points at row 0
    h = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    out = h.clone()
    t.apply_(out, None)
    assert torch.equal(out, h)
    with pytest.raises(ValueError, match="5 token rows exceed max_tokens=4"):
        t.apply_(torch.zeros(5, 16), None)
