"""Strength predictor: bounds, Gaussian policy, save/load, predict_strengths
through a frozen tiny LLM, caching."""

import math

import pytest
import torch

from sae_fast.config import AlgorithmConfig, SAEConfig
from sae_fast.predictor import (PredictorConfig, PredictorError, StrengthPredictor,
                                build_predictor)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread_module):
    """Tiny models on one intra-op thread (see conftest.one_thread_module)."""


def _pred(**kw):
    base = dict(input_dim=24, num_features=5, hidden_size=32, num_layers=2)
    base.update(kw)
    torch.manual_seed(0)
    return StrengthPredictor(PredictorConfig(**base))


@pytest.mark.parametrize("lo,hi,scale", [(-5.0, 5.0, 1.0), (0.0, 3.0, 2.0), (-1.0, 4.0, 0.5)])
def test_strengths_bounded_and_scaled(lo, hi, scale):
    p = _pred(min_strength=lo, max_strength=hi, strength_scale=scale)
    with torch.no_grad():
        p.mean_head.weight.normal_(0, 50.0)  # push means far out
    x = torch.randn(64, 24) * 10
    s = p.mean_strengths(x).detach()
    assert s.shape == (64, 5)
    assert float(s.min()) >= lo * scale - 1e-5 and float(s.max()) <= hi * scale + 1e-5
    samp = p.sample(x, n=3)
    assert samp["strengths"].shape == (192, 5)
    assert float(samp["strengths"].min()) >= lo * scale - 1e-5
    assert float(samp["strengths"].max()) <= hi * scale + 1e-5


def test_initial_mean_is_the_middle_of_the_bounds():
    p = _pred(min_strength=0.0, max_strength=4.0)
    s = p.mean_strengths(torch.randn(8, 24))
    assert torch.allclose(s, torch.full_like(s, 2.0), atol=0.2)


def test_squash_unsquash_roundtrip():
    p = _pred(min_strength=-2.0, max_strength=6.0, strength_scale=1.5)
    u = torch.randn(10, 5)
    assert torch.allclose(p.unsquash(p.squash(u)), u, atol=1e-4)


def test_sample_log_prob_matches_normal_and_is_seeded():
    p = _pred()
    x = torch.randn(4, 24)
    a = p.sample(x, n=2, generator=torch.Generator().manual_seed(1))
    b = p.sample(x, n=2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a["u"], b["u"])
    out = p(x)
    mean = out.mean.repeat_interleave(2, 0)
    ref = torch.distributions.Normal(mean, out.log_std.exp()).log_prob(a["u"]).sum(-1)
    assert torch.allclose(a["log_prob"], ref, atol=1e-5)
    # question-major rows: rows 0,1 share question 0's mean
    assert torch.equal(a["mean"][0], a["mean"][1])


def test_deterministic_mean_at_eval():
    p = _pred()
    x = torch.randn(3, 24)
    det = p.predict_strengths(embeddings=x)
    with torch.no_grad():  # the policy mean, squashed by hand: min + (max - min) * (tanh + 1) / 2
        mean = p(x).mean
    c = p.config
    ref = (c.min_strength + (c.max_strength - c.min_strength) * (torch.tanh(mean) + 1) / 2) \
        * c.strength_scale
    torch.testing.assert_close(det, ref, atol=1e-6, rtol=1e-6)
    assert torch.equal(p.predict_strengths(embeddings=x), det)
    assert not torch.equal(p.predict_strengths(embeddings=x, sample=True),
                           p.predict_strengths(embeddings=x))


def test_log_std_clamped():
    p = _pred(min_log_std=-2.0, max_log_std=0.5)
    with torch.no_grad():
        p.log_std.fill_(10.0)
    assert float(p(torch.randn(1, 24)).log_std.detach().max()) == 0.5


def test_save_load_roundtrip(tmp_path):
    p = _pred(value_head=True, features=[1, 2, 3, 4, 9], steering={"mode": "add"})
    p.save(tmp_path / "pred")
    assert sorted(f.name for f in (tmp_path / "pred").iterdir()) == [
        "predictor.safetensors", "predictor_config.json"]
    q = StrengthPredictor.load(tmp_path / "pred")
    x = torch.randn(6, 24)
    assert torch.equal(p.mean_strengths(x), q.mean_strengths(x))
    assert q.config.features == [1, 2, 3, 4, 9] and q.value_head is not None


def test_load_errors(tmp_path):
    with pytest.raises(PredictorError, match="no predictor_config.json"):
        StrengthPredictor.load(tmp_path)
    p = _pred()
    p.save(tmp_path / "p")
    (tmp_path / "p" / "predictor.safetensors").write_bytes(b"garbage")
    with pytest.raises(PredictorError, match="not a readable safetensors"):
        StrengthPredictor.load(tmp_path / "p")
    _pred(num_features=3).save(tmp_path / "q")
    cfg = (tmp_path / "q" / "predictor_config.json")
    cfg.write_text(cfg.read_text().replace('"num_features": 3', '"num_features": 4'))
    with pytest.raises(PredictorError, match="do not match"):
        StrengthPredictor.load(tmp_path / "q")


@pytest.mark.parametrize("kw,match", [
    (dict(min_strength=2.0, max_strength=1.0), "min_strength"),
    (dict(num_features=0), "num_features"),
    (dict(num_layers=-1), "num_layers"),
    (dict(features=[1, 2]), "features lists 2"),
    (dict(strength_scale=float("inf")), "not finite"),
    (dict(activation="swish2"), "activation"),
])
def test_config_errors(kw, match):
    with pytest.raises(PredictorError, match=match):
        PredictorConfig(**{**dict(input_dim=8, num_features=5), **kw})


def test_bad_input_shapes_and_values():
    p = _pred()
    with pytest.raises(PredictorError, match="expected \\[B, 24\\]"):
        p(torch.randn(2, 23))
    with pytest.raises(PredictorError, match="NaN"):
        p(torch.full((1, 24), float("nan")))
    with pytest.raises(PredictorError, match="embedder"):
        p.predict_strengths(input_ids=torch.ones(1, 3, dtype=torch.long))


def test_from_sae_config_and_layers():
    s = SAEConfig(selected_features=[3, 8], predictor_hidden_size=16, predictor_layers=3,
                  min_strength=-1, max_strength=2, strength_scale=3)
    p = build_predictor(s, 10, AlgorithmConfig(name="ppo", init_log_std=-1.0))
    assert p.config.num_features == 2 and p.config.features == [3, 8]
    assert sum(isinstance(m, torch.nn.Linear) for m in p.trunk) == 3
    assert p.value_head is not None and float(p.log_std[0]) == -1.0
    lin = build_predictor(SAEConfig(num_features=4, predictor_layers=0), 10)
    assert len(lin.trunk) == 0 and lin.mean_head.in_features == 10


def test_size_of_a_user_sized_predictor_is_in_budget():
    # d_model 4096, hidden 1024, 2 layers, 512 features: the user's 10-50 MB budget
    p = StrengthPredictor(PredictorConfig(input_dim=4096, num_features=512, hidden_size=1024,
                                          num_layers=2))
    mb = p.num_bytes() / 2**20
    assert 10 <= mb <= 50, mb


def test_predict_strengths_from_input_ids_via_frozen_llm(tiny):
    from sae_fast.train.embeddings import QuestionEmbedder

    model, tok = tiny
    before = {n: p.clone() for n, p in model.named_parameters()}
    p = _pred(input_dim=128, num_features=2)
    emb = QuestionEmbedder(model, tok, layer=1)
    p.attach_embedder(emb)
    enc = tok(["Please write a happy story", "What is 2 plus 3?"], return_tensors="pt",
              padding=True)
    s = p.predict_strengths(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    assert s.shape == (2, 2) and not s.requires_grad
    ref = p.mean_strengths(emb.embed_ids(enc["input_ids"], enc["attention_mask"]))
    assert torch.allclose(s, ref, atol=1e-6)
    assert torch.allclose(p.predict_strengths(texts=["Please write a happy story"]), s[:1], atol=1e-5)
    # LLM parameters are not predictor parameters and are untouched
    pred_ids = {id(t) for t in p.parameters()}
    assert not pred_ids & {id(t) for t in model.parameters()}
    for n, t in model.named_parameters():
        assert torch.equal(t, before[n]) and not t.requires_grad


def test_prediction_cache_invalidates_after_an_update(tiny):
    from sae_fast.train.embeddings import QuestionEmbedder

    model, tok = tiny
    p = _pred(input_dim=128, num_features=2)
    p.attach_embedder(QuestionEmbedder(model, tok, layer=-1))
    enc = tok(["Numbers: one two"], return_tensors="pt")
    a = p.predict_strengths(**enc)
    assert len(p._cache) == 1
    assert torch.equal(p.predict_strengths(**enc), a)
    opt = torch.optim.SGD(p.parameters(), lr=1.0)
    loss = p(torch.randn(1, 128)).mean.sum() * 100
    loss.backward()
    opt.step()
    b = p.predict_strengths(**enc)
    assert not torch.equal(a, b)
    assert math.isfinite(float(b.sum()))


def test_input_stats_standardise_each_dimension_and_persist(tmp_path):
    """fit_input_stats: the trunk sees (x - mean) / std per dimension (then the
    LayerNorm); a shared offset that swamps the differences is removed."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, generator=g) * 100  # the part every question shares
    x = base + torch.randn(40, 64, generator=g) * torch.linspace(0.01, 2.0, 64)
    p = StrengthPredictor(PredictorConfig(input_dim=64, num_features=2))
    seen = []
    p.trunk.register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
    p(x)
    assert float(seen[-1].std(0).mean()) < 0.2  # unfitted: the LayerNorm leaves it swamped
    p.fit_input_stats(x)
    assert torch.allclose(p.input_mean, x.mean(0)) and torch.allclose(p.input_scale, x.std(0))
    p(x)
    z = (x - x.mean(0)) / x.std(0)
    ref = torch.nn.functional.layer_norm(z, (64,))
    assert torch.allclose(seen[-1], ref, atol=1e-5)
    p.save(tmp_path / "p")
    q = StrengthPredictor.load(tmp_path / "p")
    assert torch.equal(q.input_mean, p.input_mean) and torch.allclose(q(x).mean, p(x).mean)
    with pytest.raises(PredictorError, match="at least 2 embeddings, got 1"):
        p.fit_input_stats(x[:1])


def test_predictor_saved_without_input_stats_loads_as_identity(tmp_path):
    from safetensors.torch import load_file, save_file

    p = StrengthPredictor(PredictorConfig(input_dim=8, num_features=1))
    p.save(tmp_path / "old")
    w = tmp_path / "old" / "predictor.safetensors"
    state = {k: v for k, v in load_file(str(w)).items() if not k.startswith("input_")}
    save_file(state, str(w))  # as written before the stats existed
    q = StrengthPredictor.load(tmp_path / "old")
    assert torch.equal(q.input_mean, torch.zeros(8)) and torch.equal(q.input_scale, torch.ones(8))
    x = torch.randn(3, 8)
    assert torch.allclose(q(x).mean, p(x).mean)
