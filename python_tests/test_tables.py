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
    (dict(strengths=["x", 1, 2]), r"strengths = \['x', 1, 2\] is not a list of numbers"),
    (dict(features=[7]), r"feature 7 is not among"),
    (dict(features=[3.7]), r"3\.7"),
    (dict(strengths=1.0, scale=math.inf), r"strength_scale\[0\] = inf is not finite"),
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
