"""sae_fast.train.rl: the Gaussian policy against closed-form formulas,
group advantages, the PPO clip objective, and policy updates (GRPO, PPO,
REINFORCE)."""

import math

import pytest
import torch

from sae_fast.train.rl import PolicyUpdater, group_advantages, make_optimizer, ppo_clip_objective


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread_module):
    """Tiny models on one intra-op thread (see conftest.one_thread_module)."""


def test_policy_matches_closed_form_gaussian():
    """StrengthPredictor.policy (the one distribution rl.py uses) against the
    diagonal-Gaussian formulas written out by hand."""
    from sae_fast.predictor import StrengthPredictor
    g = torch.Generator().manual_seed(0)
    mean, log_std = torch.randn(5, 3, generator=g), torch.randn(3, generator=g) * 0.3
    u = torch.randn(5, 3, generator=g)
    pol = StrengthPredictor.policy(mean, log_std)
    var = (2 * log_std).exp()
    lp = (-(u - mean) ** 2 / (2 * var) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
    assert torch.allclose(pol.log_prob(u), lp, atol=1e-5)
    ent = (0.5 + 0.5 * math.log(2 * math.pi) + log_std).sum().expand(5)
    assert torch.allclose(pol.entropy(), ent, atol=1e-5)
    m2, s2 = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g) * 0.2
    kl = (s2 - log_std + (var + (mean - m2) ** 2) / (2 * (2 * s2).exp()) - 0.5).sum(-1)
    got = torch.distributions.kl_divergence(pol, StrengthPredictor.policy(m2, s2))
    assert torch.allclose(got, kl, atol=1e-5)


def test_group_advantages():
    r = torch.tensor([1.0, 0.0, 1.0, 0.0, 5.0, 5.0, 5.0, 5.0])
    adv = group_advantages(r, 4)
    assert torch.allclose(adv[4:], torch.zeros(4))
    assert adv[0] > 0 > adv[1] and abs(float(adv[:4].sum())) < 1e-5
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(r, 3)


def test_ppo_clip_objective():
    adv = torch.tensor([1.0, -1.0])
    old = torch.zeros(2)
    loss, diag = ppo_clip_objective(torch.log(torch.tensor([2.0, 0.5])), old, adv, 0.2)
    # ratio 2 with A>0 clipped at 1.2; ratio 0.5 with A<0 clipped at 0.8
    assert math.isclose(float(loss), -(1.2 - 0.8) / 2, rel_tol=1e-5)
    assert diag["clipfrac"] == 1.0


@pytest.mark.parametrize("name", ["grpo", "ppo", "reinforce"])
def test_policy_update_moves_mean_towards_rewarded_actions(name):
    from sae_fast.config import AlgorithmConfig
    from sae_fast.predictor import PredictorConfig, StrengthPredictor

    torch.manual_seed(0)
    p = StrengthPredictor(PredictorConfig(input_dim=8, num_features=1, hidden_size=16,
                                          num_layers=1, value_head=name == "ppo"))
    cfg = AlgorithmConfig(name=name, n_samples=8, lr=5e-2, ppo_epochs=4, kl_coef=0.1,
                          entropy_coef=0.01, baseline="ema")
    upd = PolicyUpdater(p, make_optimizer(p, cfg), cfg)
    emb = torch.randn(4, 8)
    for step in range(15):
        batch = p.sample(emb, cfg.n_samples, generator=torch.Generator().manual_seed(step))
        rewards = batch["strengths"][:, 0]  # higher strength = higher reward
        m = upd.update(emb, batch, rewards, generator=torch.Generator().manual_seed(step))
        assert all(math.isfinite(v) for v in m.values())
    assert float(p.mean_strengths(emb).detach().mean()) > 1.0
    if name == "ppo":
        assert m["actor/value_loss"] > 0
