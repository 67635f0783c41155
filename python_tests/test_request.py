"""The one steering vocabulary (sae_fast.request): every spelling in the alias
table means the same field everywhere it is accepted (request metadata, a
spec dict, both attach functions), and bad values are named."""

import inspect
import math

import pytest
import torch

from sae_fast.backends.common import ATTACH_KEYWORDS, AttachedSAE, resolve_request, spec_from_kwargs
from sae_fast.ops import codes
from sae_fast.plan import SteeringSpec, build_plan
from sae_fast.request import (ALIASES, DEFAULT_MODE, SteeringRequest, SteeringSpecError,
                              canonical)
from sae_fast.sae import random_sae

# Spellings grouped by meaning, written out by hand (not derived from ALIASES),
# with one value each: parsing any of them must give the same field.
SPELLINGS = {
    "features": ["features", "feature_idx", "feature_idxs", "selected_features",
                 "sae_feature_idx", "sae_features"],
    "strengths": ["strengths", "strength", "sae_strengths"],
    "max_activations": ["max_activations", "max_activation", "sae_max_activation",
                        "sae_max_activations"],
    "mode": ["mode", "sae_mode"],
    "strength_scale": ["strength_scale", "sae_strength_scale"],
    "group": ["group", "sae_group"],
    "schedule": ["schedule", "strength_schedule", "sae_strength_schedule"],
}


def test_alias_table_is_exactly_the_documented_spellings():
    expected = {k: field for field, keys in SPELLINGS.items() for k in keys}
    assert ALIASES == expected


@pytest.mark.parametrize("field,key", [(f, k) for f, ks in SPELLINGS.items() for k in ks])
def test_every_spelling_sets_its_field(field, key):
    value = {"features": [3, 5], "strengths": [2.0, -1.0], "max_activations": [4.0, 6.0],
             "mode": "scale", "strength_scale": 2.5, "group": "g", "schedule": "cosine"}[field]
    req = SteeringRequest.parse({key: value, **({} if field == "features" else {"features": [3, 5]})})
    assert getattr(req, field) == value


def test_same_field_twice_under_two_spellings_is_refused():
    with pytest.raises(SteeringSpecError, match=r"gives features twice \(keys 'feature_idx' and "
                                                r"'features'\)"):
        SteeringRequest.parse({"feature_idx": 1, "features": [2]})
    with pytest.raises(SteeringSpecError, match="gives features twice"):
        SteeringSpec.from_dict({"feature_idx": 1, "feature_idxs": [2]})


@pytest.mark.parametrize("bad,match", [
    ({"features": [1], "mode": "push"}, r"mode='push' is not one of add, set"),
    ({"features": [1], "schedule": "wavy"}, r"schedule='wavy' is not one of constant"),
    ({"features": [1], "strength_scale": "big"}, r"strength_scale = 'big' is not a number"),
    ({"features": [1.5]}, r"features\[0\] = 1.5 is not an integer"),
    ({"features": [1], "group": 3}, r"group = 3 is not an SAE group name"),
    ({"featurez": [1]}, r"unknown steering request key 'featurez'"),
])
def test_bad_values_are_named(bad, match):
    with pytest.raises(SteeringSpecError, match=match):
        SteeringRequest.parse(bad)


def test_spec_from_dict_and_keywords_agree_for_every_spelling():
    """The SPEC keys of a config / request dict and the attach keywords build
    the same spec."""
    by_kw = spec_from_kwargs(features=[1, 5], max_activations=[4.0, 6.0], strengths=[1.0, -1.0],
                             strength_scale=2.0, mode="set")
    for feats in ("feature_idxs", "features", "selected_features", "sae_features"):
        for acts in ("max_activations", "max_activation", "sae_max_activations"):
            d = {feats: [1, 5], acts: [4, 6], "strengths": [1, -1], "strength_scale": 2.0}
            assert SteeringSpec.from_dict(d) == by_kw
    one = SteeringSpec.from_dict({"sae_feature_idx": 3, "sae_max_activation": 8.0,
                                  "sae_strength_scale": 2.0})
    assert (one.features, one.max_activations, one.strength_scale) == ([3], [8.0], 2.0)


def test_one_default_mode_everywhere():
    from sae_fast.backends import hf
    from sae_fast.backends.vllm_engine import driver

    assert SteeringSpec(features=[1]).mode == DEFAULT_MODE == "set"
    assert SteeringSpec.from_dict({"features": [1]}).mode == DEFAULT_MODE
    for fn in (hf.attach, driver.attach, driver.attach_async):
        assert inspect.signature(fn).parameters["mode"].default == DEFAULT_MODE


def test_both_attach_functions_share_the_attach_vocabulary():
    """Same keywords with the same defaults, in the same order, in the HF
    attach, the vLLM attach and attach_async."""
    from sae_fast.backends import hf
    from sae_fast.backends.vllm_engine import driver

    for fn in (hf.attach, driver.attach, driver.attach_async):
        params = list(inspect.signature(fn).parameters.values())[2:2 + len(ATTACH_KEYWORDS)]
        assert [(p.name, p.default) for p in params] == list(ATTACH_KEYWORDS.items()), fn


def test_spec_refuses_group_and_schedule_and_spec_plus_features():
    with pytest.raises(SteeringSpecError, match="group='a' is not part of a steering spec"):
        SteeringSpec.from_dict({"features": [1], "group": "a"})
    with pytest.raises(SteeringSpecError, match="spec=... or features"):
        spec_from_kwargs({"features": [1]}, features=[2])


def test_attached_record_rows_match_hand_computed_values():
    """A request resolved through the shared record: strengths bounded to the
    spec's range, times strength_scale and the max_activation ratio, in the
    request's columns only (the others off)."""
    sae = random_sae(16, 32, seed=3)
    spec = SteeringSpec(features=[2, 7, 9], mode="set", max_activations=[2.0, 4.0, 8.0],
                        min_strength=-3.0, max_strength=3.0)
    rec = AttachedSAE(name="g", layers=[0], plan=build_plan(sae, spec))
    s, m = resolve_request([{"sae_features": [9, 2], "sae_strengths": [5.0, -1.0],
                             "sae_strength_scale": 2.0, "sae_max_activation": [4.0, 1.0]}],
                           {"g": rec})["g"]
    # feature 9: min(5, 3) * 2 * (4 / 8); feature 2: -1 * 2 * (1 / 2); feature 7 off
    assert s.tolist() == [-1.0, 0.0, 3.0]
    assert m.tolist() == [codes.MODE_SET, codes.MODE_OFF, codes.MODE_SET]
    with pytest.raises(SteeringSpecError, match=r"SAE 'g': strengths\[0\] = nan is not finite"):
        resolve_request([{"features": [9], "strengths": [math.nan]}], {"g": rec})
    with pytest.raises(SteeringSpecError, match="schedule='linear' per request is not supported"):
        resolve_request([{"features": [9], "schedule": "linear"}], {"g": rec})


def test_canonical_names_unknown_keys_with_the_accepted_set():
    with pytest.raises(SteeringSpecError, match=r"unknown thing key 'x'; expected one of .*topk_mode"):
        canonical({"x": 1}, extra=("topk_mode",), what="thing")
    assert canonical({"sae_group": "a", "topk_mode": "exact"}, extra=("topk_mode",)) == {
        "group": "a", "topk_mode": "exact"}


def test_tensor_strengths_pass_through_parse():
    t = torch.tensor([1.0, 2.0])
    assert SteeringRequest.parse({"features": [1, 2], "strengths": t}).strengths is t
