"""Steering plans: spec validation and the maths of each mode against a full
SAE encode/decode with the error term kept."""

import pytest
import torch

from sae_fast.plan import SteeringSpec, SteeringSpecError, build_plan
from sae_fast.sae import random_sae

ARCHS = [("standard", None), ("jumprelu", None), ("topk", 12)]


def full_steer(sae, x, feats, new_values_fn):
    """x + (f' - f) @ W_dec over ALL features (fp64 oracle of SPEC section 1)."""
    xd = x.double()
    pre = ((xd - sae.b_dec.double()) if sae.apply_b_dec_to_input else xd) @ sae.W_enc.double() \
        + sae.b_enc.double()
    if sae.architecture == "standard":
        f = pre.relu()
    elif sae.architecture == "jumprelu":
        f = pre.relu() * (pre > sae.threshold.double())
    else:
        v, i = pre.topk(sae.k, dim=-1)
        f = torch.zeros_like(pre).scatter_(-1, i, v.relu())
    f_new = f.clone()
    f_new[:, feats] = new_values_fn(f[:, feats])
    return (xd + (f_new - f) @ sae.W_dec.double()), f


@pytest.mark.parametrize("arch,k", ARCHS)
@pytest.mark.parametrize("mode", ["set", "scale", "ablate", "add"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_plan_matches_full_encode_decode(arch, k, mode, dtype):
    sae = random_sae(123, 300, arch, k=k, seed=7)
    feats = [5, 17, 299, 0, 42]
    x = torch.randn(11, 123, generator=torch.Generator().manual_seed(1)) * 2
    # Put features 5 and 17 firmly "on" for some rows.
    x[:4] += 3 * sae.W_dec[5] + 2 * sae.W_dec[17]
    strengths, max_acts, g = [1.5, -0.5, 2.0, 0.7, 1.0], [4.0, 2.0, 3.0, 1.0, 5.0], 1.3
    spec = SteeringSpec(features=feats, mode=mode, strengths=strengths, max_activations=max_acts,
                        strength_scale=g, min_strength=-1.0, max_strength=1.8)
    plan = build_plan(sae, spec, dtype=dtype)
    s = torch.tensor(strengths, dtype=torch.float64).clamp(-1.0, 1.8) * g
    fn = {"set": lambda f: s * torch.tensor(max_acts, dtype=torch.float64).expand_as(f),
          "scale": lambda f: f * s, "ablate": lambda f: torch.zeros_like(f),
          "add": lambda f: f + s}[mode]
    want, _ = full_steer(sae, x, feats, fn)
    out = plan.steer_(x.clone().to(dtype))
    delta_scale = (want - x.double()).abs().max().clamp(min=1)
    tol = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}[dtype]
    # input rounding to dtype is part of the error: compare deltas scaled
    err = (out.double() - want).abs().max()
    bound = tol * delta_scale + (x.abs().max() * torch.finfo(dtype).eps * 2)
    assert err <= bound, f"{arch} {mode} {dtype}: {err} > {bound}"


@pytest.mark.parametrize("arch,k", ARCHS)
def test_setting_features_to_current_value_is_exact_noop(arch, k, monkeypatch):
    sae = random_sae(64, 128, arch, k=k, seed=2)
    x = torch.randn(1, 64)
    plan = build_plan(sae, SteeringSpec(features=[3, 9, 100], mode="scale"))
    out = plan.steer_(x.clone(), strengths=[1.0, 1.0, 1.0])
    assert torch.equal(out, x)
    # set mode with target = the feature's own activation, computed with the
    # same arithmetic as the path that applies it (the reference here; a
    # kernel's own fp32 summation order differs in the last bit)
    import sae_fast.ops as ops
    from sae_fast.ops.reference import selected_activations
    monkeypatch.setenv("SAE_FAST_BACKEND", "reference")
    monkeypatch.setattr(ops, "_selected", {})
    pre = x @ plan.enc_w.t() + plan.enc_b
    f = selected_activations(pre, plan.threshold, plan.activation, plan.topk_kth(x, None))
    plan_set = build_plan(sae, SteeringSpec(features=[3, 9, 100], mode="set",
                                            max_activations=f[0].tolist()))
    assert torch.equal(plan_set.steer_(x.clone(), strengths=[1.0, 1.0, 1.0]), x)


def test_add_mode_equals_adding_decoder_rows():
    sae = random_sae(40, 80, seed=4)
    x = torch.randn(5, 40)
    plan = build_plan(sae, SteeringSpec(features=[7, 8], mode="add", strengths=[2.0, -1.0]))
    out = plan.steer_(x.clone())
    torch.testing.assert_close(out, x + 2.0 * sae.W_dec[7] - 1.0 * sae.W_dec[8])


def test_residual_form_reads_the_sum_and_writes_hidden_only():
    sae = random_sae(64, 128, seed=5)
    h, r = torch.randn(6, 64), torch.randn(6, 64)
    plan = build_plan(sae, SteeringSpec(features=[1, 2, 3], mode="set", max_activations=[3, 3, 3]))
    r0 = r.clone()
    out = plan.steer_(h.clone(), r)
    assert torch.equal(r, r0)
    want = plan.steer_((h + r).clone())
    torch.testing.assert_close(out + r, want, rtol=1e-5, atol=1e-5)


def test_clamp_direction_sets_projection():
    sae = random_sae(32, 64, seed=6)
    x = torch.randn(4, 32)
    plan = build_plan(sae, SteeringSpec(features=[10], mode="clamp_direction", max_activations=[2.5],
                                        strength_scale=2.0))
    out = plan.steer_(x.clone())
    u = sae.W_dec[10] / sae.W_dec[10].norm()
    torch.testing.assert_close(out @ u, torch.full((4,), 5.0), rtol=1e-5, atol=1e-5)
    # the orthogonal complement is untouched
    torch.testing.assert_close(out - (out @ u)[:, None] * u, x - (x @ u)[:, None] * u,
                               rtol=1e-5, atol=1e-5)


def test_from_dict_single_multi_global():
    one = SteeringSpec.from_dict({"feature_idx": 3, "max_activation": 8.0, "strength_scale": 2.0})
    assert one.features == [3] and one.max_activations == [8.0] and one.strength_scale == 2.0
    multi = SteeringSpec.from_dict({"feature_idxs": [1, 5], "max_activations": [4, 6],
                                    "strengths": [1, -1], "mode": "scale"})
    assert multi.k == 2 and multi.strengths == [1.0, -1.0]
    glob = SteeringSpec.from_dict({"strength_scale": 0.5}, defaults={"selected_features": [4, 5, 6]})
    assert glob.features == [4, 5, 6] and glob.strength_scale == 0.5
    meta = SteeringSpec.from_dict({"sae_feature_idx": 9, "sae_max_activation": 2.0,
                                   "sae_strength_scale": 3.0})
    assert meta.features == [9] and meta.max_activations == [2.0]


def test_identical_duplicates_merge():
    spec = SteeringSpec(features=[4, 4, 2], strengths=[1.0, 1.0, 2.0])
    assert spec.features == [4, 2] and spec.strengths == [1.0, 2.0]


@pytest.mark.parametrize("kwargs,match", [
    (dict(features=[]), r"features is empty"),
    (dict(features=[4, 4], strengths=[1.0, 2.0]), r"feature 4 is listed twice with different strengths \(1.0 and 2.0\)"),
    (dict(features=[1, 2], strengths=[1.0, float("nan")]), r"strengths\[1\] = nan is not finite"),
    (dict(features=[1], strength_scale=float("inf")), r"= inf is not finite"),
    (dict(features=[1, 2], strengths=[1.0, 2.0, 3.0]), r"strengths has 3 values for 2 features"),
    (dict(features=[1], mode="boost"), r"mode='boost' is not one of"),
    (dict(features=["a"]), r"features\[0\] = 'a' is not an integer"),
    (dict(features=[1], min_strength=2.0, max_strength=1.0), r"min_strength=2.0 > max_strength=1.0"),
])
def test_bad_specs_name_the_value(kwargs, match):
    with pytest.raises(SteeringSpecError, match=match):
        SteeringSpec(**kwargs)


def test_out_of_range_feature_is_named():
    sae = random_sae(16, 32)
    with pytest.raises(SteeringSpecError, match=r"feature index 32 is out of range .* d_sae=32"):
        build_plan(sae, SteeringSpec(features=[1, 32]))
    with pytest.raises(SteeringSpecError, match=r"feature index -1 is out of range"):
        build_plan(sae, SteeringSpec(features=[-1]))


def test_nan_strength_row_rejected():
    plan = build_plan(random_sae(16, 32), SteeringSpec(features=[1, 2]))
    with pytest.raises(SteeringSpecError, match=r"strengths\[1\] = nan is not finite"):
        plan.strength_row(torch.tensor([0.5, float("nan")]))
    with pytest.raises(SteeringSpecError, match=r"strengths has 3 values, expected 2"):
        plan.strength_row([1.0, 2.0, 3.0])


def test_unknown_dict_keys_rejected():
    with pytest.raises(SteeringSpecError, match=r"unknown steering spec key 'strenght'"):
        SteeringSpec.from_dict({"feature_idx": 1, "strenght": 2})


def test_plan_is_compact():
    sae = random_sae(256, 4096, seed=1)
    plan = build_plan(sae, SteeringSpec(features=list(range(8))))
    assert plan.enc_w.shape == (8, 256) and plan.dec_w.shape == (8, 256)
    assert plan.nbytes() < 8 * 256 * 4 * 2 + 8 * 4 * 3 + 1


def test_capacity_plan_columns_steer_like_the_plan_itself():
    """A capacity plan of 6 columns with a 3-feature plan written into columns
    [4, 1, 2] steers hidden exactly as that plan does (reference op), and
    clearing the columns makes it an exact no-op again."""
    import torch

    from sae_fast.ops import reference
    from sae_fast.plan import SteeringPlan, SteeringSpec, build_plan
    from sae_fast.sae import random_sae

    sae = random_sae(40, 96, seed=5)
    plan = build_plan(sae, SteeringSpec(features=[7, 30, 61], mode="set",
                                        max_activations=[3.0, 2.0, 4.0]))
    cap = SteeringPlan.capacity(6, 40)
    assert cap.sae is None and cap.k == 6 and float(cap.enc_w.abs().sum()) == 0
    cols = torch.tensor([4, 1, 2])
    cap.write_columns(cols, plan)
    g = torch.Generator().manual_seed(9)
    h, r = torch.randn(5, 40, generator=g), torch.randn(5, 40, generator=g)
    s = torch.zeros(2, 3)
    s[1] = torch.tensor([1.5, -2.0, 0.5])
    m = torch.zeros(2, 3, dtype=torch.int8)
    m[1] = 2
    rows = torch.tensor([1, 0, 1, 1, 0], dtype=torch.int32)
    s6, m6 = torch.zeros(2, 6), torch.zeros(2, 6, dtype=torch.int8)
    s6[:, cols], m6[:, cols] = s, m

    def run(p, st, mo):
        out = h.clone()
        reference.steer_(out, r, p.enc_w, p.enc_b, p.threshold, p.dec_w, p.max_act, st, mo, rows,
                         None, p.activation, 1.0, -1e9, 1e9)
        return out

    torch.testing.assert_close(run(cap, s6, m6), run(plan, s, m), atol=1e-6, rtol=1e-6)
    cap.clear_columns(cols)
    assert torch.equal(run(cap, s6, m6), h)
