"""transformers backend on tiny random Llama and Qwen2 models built locally
(SmolLM2-135M versions are marked slow)."""

import pytest
import torch

from sae_fast.backends.common import UnsupportedModelError, decoder_layers, schedule_multiplier
from sae_fast.backends.hf import HFSteerer, attach
from sae_fast.models import tiny_model
from sae_fast.ops.reference import steer_ as ref_steer_
from sae_fast.plan import SteeringSpec, SteeringSpecError, build_plan
from sae_fast.sae import SAELoadError, random_sae

transformers = pytest.importorskip("transformers")
PROMPTS = ["What is the capital of France?", "Numbers: one two", "Please write a short story"]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request):
    from sae_fast.generate import load_hf

    model, tok = load_hf(str(tiny_model(request.param)))
    return model, tok


@pytest.fixture(scope="module")
def sae():
    return random_sae(128, 512, seed=11)


def _gen(model, tok, prompts=PROMPTS, steerer=None, n=12, **kw):
    enc = tok(list(prompts), return_tensors="pt", padding=True)
    g = (steerer or model).generate(**enc, max_new_tokens=n, do_sample=False,
                                    pad_token_id=tok.pad_token_id, **kw)
    return g[:, enc["input_ids"].shape[1]:]


def _spec(**kw):
    base = dict(features=[3, 50, 200], mode="set", max_activations=[6.0, 6.0, 6.0])
    base.update(kw)
    return SteeringSpec(**base)


def test_steered_differs_and_detach_restores(tiny, sae):
    model, tok = tiny
    base = _gen(model, tok)
    with attach(model, sae, spec=_spec(), layer=1) as st:
        st.set_strengths([[4.0, 4.0, 4.0]] * 3)
        steered = _gen(model, tok, steerer=st)
        assert st.stats.steps > 0 and st.stats.failures == 0
    assert not torch.equal(base, steered)
    assert torch.equal(_gen(model, tok), base)


def test_disable_restores_unsteered_exactly(tiny, sae):
    model, tok = tiny
    base = _gen(model, tok)
    with attach(model, sae, spec=_spec(), layer=-1) as st:
        st.set_strengths([[5.0, -5.0, 5.0]] * 3)
        st.disable()
        assert torch.equal(_gen(model, tok, steerer=st), base)
        st.enable()
        assert not torch.equal(_gen(model, tok, steerer=st), base)


def test_residual_after_layer_equals_reference_op(tiny, sae):
    model, tok = tiny
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        clean = model(**enc, output_hidden_states=True).hidden_states
    layer = 2
    spec = _spec(mode="scale")
    with attach(model, sae, spec=spec, layer=layer) as st:
        st.set_strengths([[2.0, 0.5, -1.0], None, [0.0, 3.0, 1.0]])
        with torch.no_grad():
            steered = model(**enc, output_hidden_states=True).hidden_states
    # hidden_states[layer + 1] is the output of decoder layer `layer`
    plan = build_plan(sae, spec)
    x = clean[layer + 1].reshape(-1, 128).clone()
    mask = enc["attention_mask"].bool()
    rows = torch.tensor([1, 0, 3], dtype=torch.int32)[:, None].expand_as(mask)
    rows = torch.where(mask, rows, torch.zeros_like(rows)).reshape(-1)
    table = torch.zeros(4, 3)
    table[1] = torch.tensor([2.0, 0.5, -1.0])
    table[3] = torch.tensor([0.0, 3.0, 1.0])
    modes = torch.zeros(4, 3, dtype=torch.int8)
    modes[1] = modes[3] = plan.mode_code
    ref_steer_(x, None, plan.enc_w, plan.enc_b, plan.threshold, plan.dec_w, plan.max_act, table,
               modes, rows, None, plan.activation, 1.0, -5.0, 5.0)
    torch.testing.assert_close(steered[layer + 1].reshape(-1, 128), x, rtol=1e-5, atol=1e-5)
    # rows 1 (no steering) is untouched at that layer
    torch.testing.assert_close(steered[layer + 1][1], clean[layer + 1][1])


def test_batch_with_different_rows_equals_each_row_alone(tiny, sae):
    model, tok = tiny
    rows = [[4.0, 0.0, -2.0], None, [-3.0, 5.0, 1.0]]
    with attach(model, sae, spec=_spec(), layer=1) as st:
        st.set_strengths(rows)
        batched = _gen(model, tok, steerer=st)
        for i, (p, r) in enumerate(zip(PROMPTS, rows)):
            st.set_strengths([r])
            alone = _gen(model, tok, prompts=[p], steerer=st)
            n = alone.shape[1]
            assert torch.equal(batched[i, :n], alone[0]), f"row {i} differs when batched"


def test_hooks_removed_after_exception_inside_generate(tiny, sae):
    model, tok = tiny
    layers = decoder_layers(model)
    before = [len(layer._forward_hooks) for layer in layers], len(model._forward_pre_hooks)
    with pytest.raises(ValueError, match="boom"):
        with attach(model, sae, spec=_spec(), layer=0) as st:
            st.set_strengths([[1.0, 1.0, 1.0]])

            def explode(*a, **k):
                raise ValueError("boom")
            layers[0].register_forward_hook(explode)
            try:
                _gen(model, tok, prompts=PROMPTS[:1], steerer=st)
            finally:
                layers[0]._forward_hooks.popitem()
    after = [len(layer._forward_hooks) for layer in layers], len(model._forward_pre_hooks)
    assert after == before


def test_parameters_frozen_and_unchanged(tiny, sae):
    model, tok = tiny
    snap = {n: p.detach().clone() for n, p in model.named_parameters()}
    sae_snap = [t.clone() for t in sae.parameters()]
    with attach(model, sae, spec=_spec(), layer=1) as st:
        st.set_strengths([[3.0, 3.0, 3.0]] * 3)
        _gen(model, tok, steerer=st)
    for n, p in model.named_parameters():
        assert p.grad is None and not p.requires_grad, n
        assert torch.equal(p, snap[n]), n
    for t, s in zip(sae.parameters(), sae_snap):
        assert torch.equal(t, s) and t.grad is None and not t.requires_grad


def test_multi_layer_and_two_saes(tiny, sae):
    model, tok = tiny
    base = _gen(model, tok)
    sae2 = random_sae(128, 256, "jumprelu", seed=5)
    with attach(model, sae, spec=_spec(), layers=[0, -1]) as st:
        st.add_sae(sae2, SteeringSpec(features=[1, 2], mode="add"), layers=[1])
        st.set_strengths([[2.0, 2.0, 2.0]] * 3, group=0)
        st.set_strengths([[3.0, -3.0]] * 3, group=1)
        out = _gen(model, tok, steerer=st)
        assert st.groups[0].layers == [0, 3] and st.groups[1].layers == [1]
    assert not torch.equal(out, base)


def test_request_metadata_keys(tiny, sae):
    model, tok = tiny
    with attach(model, sae, spec=_spec(), layer=1) as st:
        st.set_requests([{"sae_feature_idx": 50, "sae_max_activation": 8.0, "sae_strength_scale": 2.0},
                         None, {"features": [3, 200], "strengths": [1.0, -1.0], "mode": "scale"}])
        t = st.groups[0].tables[0]
        assert t.modes[1].tolist() == [0, 2, 0] and t.modes[2].tolist() == [0, 0, 0]
        # set strength 1 (default) * scale 2 * (8 / 6) on feature 50
        assert t.strengths[1, 1].item() == pytest.approx(2.0 * 8.0 / 6.0)
        assert t.modes[3].tolist() == [3, 0, 3]
        with pytest.raises(SteeringSpecError, match=r"feature 7 is not among the features"):
            st.set_requests([{"sae_feature_idx": 7}])
        with pytest.raises(SteeringSpecError, match=r"unknown steering request key 'sae_featur'"):
            st.set_requests([{"sae_featur": 7}])


def test_prompt_steering_option_and_schedule(tiny, sae):
    model, tok = tiny
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        clean = model(**enc).logits
    logits = {}
    for steer_prompt in (True, False):
        with attach(model, sae, spec=_spec(), layer=1, steer_prompt=steer_prompt,
                    strength_schedule="cosine") as st:
            st.set_strengths([[1.0, 1.0, 1.0]] * 3)
            with torch.no_grad():
                logits[steer_prompt] = model(**enc).logits
    # prompt steering off: every prompt position but the last is unsteered
    torch.testing.assert_close(logits[False][:, :-1], clean[:, :-1])
    assert not torch.allclose(logits[False][:, -1], clean[:, -1])
    assert not torch.allclose(logits[True][:, :-1], clean[:, :-1])
    assert schedule_multiplier("linear", 0, 10) == 1.0
    assert schedule_multiplier("linear", 5, 10) == 0.5
    assert schedule_multiplier("cosine", 10, 10) == pytest.approx(0.0)
    with pytest.raises(SteeringSpecError, match="strength_schedule='wavy'"):
        attach(model, sae, spec=_spec(), strength_schedule="wavy")


def test_stats_and_activation_summaries(tiny, sae):
    model, tok = tiny
    with attach(model, sae, spec=_spec(), layer=1, record_activations=True) as st:
        st.set_strengths([[2.0, 2.0, 2.0], [1.0, 1.0, 1.0], None])
        _gen(model, tok, steerer=st, n=4)
        d = st.stats.as_dict()
    assert d["strength_count"] == 6 and d["strength_mean"] == pytest.approx(1.5)
    assert d["strength_std"] == pytest.approx(0.5)
    assert d["steps"] == 4 and d["failures"] == 0
    assert set(d["features"]) == {3, 50, 200}
    assert all(f["after_max"] >= 6.0 for f in d["features"].values())  # set to 6*s


def test_profiled_time_counts_every_hook(tiny, sae, monkeypatch):
    """With profile=True, stats.steer_time_s holds the row-map pre-hook, each
    steered layer's hook and the missed-step check: a clock that advances by
    exactly 1 s per reading makes each timed hook add exactly 1 s."""
    import sae_fast.backends.hf as hf

    model, tok = tiny
    enc = tok(list(PROMPTS[:2]), return_tensors="pt", padding=True)
    with attach(model, sae, spec=_spec(), layers=[0, 1], profile=True) as st:
        st.set_strengths([[2.0, 2.0, 2.0], [1.0, 1.0, 1.0]])
        ticks = iter(range(10**6))
        monkeypatch.setattr(hf.time, "perf_counter", lambda: float(next(ticks)))
        with torch.no_grad():
            model(**enc)
        monkeypatch.undo()
        assert st.stats.steer_time_s == pytest.approx(4.0)  # pre + 2 layers + post


def test_failure_is_counted_not_silent(tiny, sae, caplog):
    model, tok = tiny
    with attach(model, sae, spec=_spec(), layer=1, max_batch=2) as st:
        st.set_strengths([[1.0, 1.0, 1.0]])
        _gen(model, tok, steerer=st, n=2)  # 3 rows > max_batch=2
        assert st.stats.failures >= 1
        assert "exceeds max_batch=2" in next(iter(st.stats.failure_reasons))


def test_bad_inputs_name_the_value(tiny, sae):
    model, tok = tiny
    # transformers keeps hooks of its own (output_hidden_states capture): count ours only
    hooks_before = [len(layer._forward_hooks) for layer in decoder_layers(model)]
    with pytest.raises(SteeringSpecError, match=r"layer 9 is out of range .* 4 decoder layers"):
        attach(model, sae, spec=_spec(), layer=9)
    with pytest.raises(SAELoadError, match=r"d_in=64 but the model's hidden size at layer 3 is 128"):
        attach(model, random_sae(64, 128), spec=_spec(features=[1], max_activations=[6.0]), layer=-1)
    with attach(model, sae, spec=_spec(), layer=1) as st:
        with pytest.raises(SteeringSpecError, match=r"strengths\[1\] = nan is not finite"):
            st.set_strengths([[1.0, float("nan"), 1.0]])
    with pytest.raises(UnsupportedModelError, match="cannot find the decoder layers of Linear"):
        HFSteerer(torch.nn.Linear(2, 2))
    # nothing left attached after failed attaches
    assert [len(layer._forward_hooks) for layer in decoder_layers(model)] == hooks_before
    assert len(model._forward_pre_hooks) == 0


def test_three_line_generate(tiny, sae, tmp_path):
    import sae_fast
    from sae_fast.sae import save_sae

    model, tok = tiny
    save_sae(sae, tmp_path / "sae")
    plain = sae_fast.generate(model, PROMPTS[:2], tokenizer=tok, max_new_tokens=8)
    steered = sae_fast.generate(model, PROMPTS[:2], str(tmp_path / "sae"), tokenizer=tok,
                                features=[3, 50], strengths=[5.0, 5.0], max_activations=[6, 6],
                                layer=1, max_new_tokens=8)
    assert len(plain) == 2 and plain != steered


def test_per_row_feature_indices_must_be_integers():
    """The per-request path refuses 3.7 and "3.7" (never steers feature 3) and
    accepts "3" like 3, in set_requests and in set_strengths(features=...)."""
    from sae_fast.backends.tables import SteeringTables
    from sae_fast.plan import SteeringSpec, SteeringSpecError, build_plan
    from sae_fast.sae import random_sae

    t = SteeringTables(build_plan(random_sae(16, 32, seed=1), SteeringSpec(features=[3, 5])), 2, 4)
    s, m = t.row_values(2.0, features=["3"])
    assert s.tolist() == [2.0, 0.0] and m.tolist()[1] == 0
    for bad in (3.7, "3.7", True):
        with pytest.raises(SteeringSpecError, match="is not an integer feature index"):
            t.row_values(2.0, features=[bad])


@pytest.mark.parametrize("hook,layer", [("blocks.2.hook_resid_post", 2),
                                        ("blocks.2.hook_resid_pre", 1),
                                        ("model.layers.2", 2)])  # not the last: HF norms it
def test_default_layer_follows_the_sae_hook(tiny, hook, layer):
    """An SAE trained on blocks.L.hook_resid_pre reads the input of block L,
    the output of decoder layer L-1: without an explicit layer it steers
    there, and the residual stream (hidden_states[L]) is where the delta lands."""
    from dataclasses import replace

    model, tok = tiny
    sae = replace(random_sae(128, 512, seed=11), hook_name=hook)
    assert sae.default_layer() == layer
    enc = tok(PROMPTS[:1], return_tensors="pt")
    with torch.no_grad():
        clean = model(**enc, output_hidden_states=True).hidden_states
    with attach(model, sae, features=[3], mode="add") as st:
        st.set_strengths([[4.0]])
        with torch.no_grad():
            steered = model(**enc, output_hidden_states=True).hidden_states
    # hidden_states[i + 1] is the output of decoder layer i
    for i in range(len(clean) - 1):
        if i < layer:
            torch.testing.assert_close(steered[i + 1], clean[i + 1])
    delta = steered[layer + 1] - clean[layer + 1]
    torch.testing.assert_close(delta[0], (4.0 * sae.W_dec[3]).expand_as(delta[0]),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("hook,match", [("blocks.0.hook_resid_pre", "reads the embeddings"),
                                        ("blocks.4.hook_mlp_out", "not the residual stream"),
                                        ("blocks.3.hook_resid_mid", "not the residual stream"),
                                        ("model.layers.3.mlp", "not the residual stream")])
def test_hook_names_we_do_not_understand_are_refused(tiny, hook, match):
    from dataclasses import replace

    model, _ = tiny
    sae = replace(random_sae(128, 512, seed=11), hook_name=hook)
    with pytest.raises(SAELoadError, match=match):
        attach(model, sae, features=[3], mode="add")
    attach(model, sae, features=[3], mode="add", layer=1).remove()  # explicit layer: the user's call
