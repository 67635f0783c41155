"""Policy-gradient losses on the Gaussian strength actions.

Each question is a one-step episode (a contextual bandit): the action is the
strength vector, the reward scores the steered generation. Algorithms:

    grpo       n samples per question, advantages normalised within each
               question's group, PPO-clipped updates for several epochs
    ppo        PPO-clip with a learned value baseline V(question) (the
               predictor's value head), several epochs
    reinforce  vanilla policy gradient, one epoch, baseline = batch mean,
               an exponential moving average, or none

Optional for all: an entropy bonus, a KL penalty to the policy that sampled
the batch, and an exploration std that is annealed (``final_log_std``) or
learned at its own rate (``log_std_lr``). Log-probabilities, entropies and KLs are those of
``torch.distributions`` (a diagonal Gaussian, ``StrengthPredictor.policy``).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch.distributions import kl_divergence

from sae_fast.predictor import StrengthPredictor


def group_advantages(rewards: torch.Tensor, group_size: int, normalize_std: bool = True,
                     eps: float = 1e-6) -> torch.Tensor:
    """GRPO: reward minus its group mean (divided by the group std). Rows are
    question-major groups of ``group_size``; a group with equal rewards gets 0."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.reshape(-1, group_size).float()
    adv = r - r.mean(dim=1, keepdim=True)
    if normalize_std and group_size > 1:
        adv = adv / (r.std(dim=1, keepdim=True) + eps)
    return adv.reshape(-1)


def normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    if x.numel() < 2:
        return x - x.mean()
    return (x - x.mean()) / (x.std() + eps)


def ppo_clip_objective(logp_new: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor,
                       clip_ratio: float) -> tuple[torch.Tensor, dict]:
    """PPO-clip loss (to minimise) and diagnostics."""
    log_ratio = (logp_new - logp_old).clamp(-20, 20)
    ratio = torch.exp(log_ratio)
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - clip_ratio, 1 + clip_ratio) * adv
    loss = -torch.min(unclipped, clipped).mean()
    with torch.no_grad():
        clipfrac = ((ratio - 1).abs() > clip_ratio).float().mean()
        approx_kl = ((ratio - 1) - log_ratio).mean()  # k3 estimator, >= 0
    return loss, {"clipfrac": float(clipfrac), "approx_kl": float(approx_kl)}


class PolicyUpdater:
    """Computes advantages and updates the predictor from one rollout batch."""

    def __init__(self, predictor: StrengthPredictor, optimizer: torch.optim.Optimizer,
                 cfg: Any) -> None:
        self.predictor = predictor
        self.optimizer = optimizer
        self.cfg = cfg  # sae_fast.config.AlgorithmConfig
        self.ema_baseline: Optional[float] = None

    def state_dict(self) -> dict:
        return {"ema_baseline": self.ema_baseline}

    def load_state_dict(self, state: dict) -> None:
        self.ema_baseline = state.get("ema_baseline")

    def begin_step(self, step: int, total_steps: int) -> Optional[float]:
        """Set the exploration log-std for training step ``step`` (1-based) of
        ``total_steps`` when ``final_log_std`` anneals it; call before sampling.
        Returns the scheduled value (None when log_std is learned)."""
        value = scheduled_log_std(self.cfg, step, total_steps)
        if value is not None:
            with torch.no_grad():
                self.predictor.log_std.fill_(value)
        return value

    def advantages(self, rewards: torch.Tensor, values: Optional[torch.Tensor] = None) -> torch.Tensor:
        c = self.cfg
        if c.name == "grpo":
            return group_advantages(rewards, c.n_samples, normalize_std=c.normalize_advantages)
        if c.name == "ppo":
            if values is None:
                raise ValueError("ppo needs the value head's predictions")
            adv = rewards - values
        else:  # reinforce
            if c.baseline == "mean":
                adv = rewards - rewards.mean()
            elif c.baseline == "ema":
                base = self.ema_baseline if self.ema_baseline is not None else float(rewards.mean())
                adv = rewards - base
                self.ema_baseline = c.ema_decay * base + (1 - c.ema_decay) * float(rewards.mean())
            else:
                adv = rewards.clone()
        return normalize(adv) if c.normalize_advantages else adv

    def clip_loss(self, logp: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor
                  ) -> tuple[torch.Tensor, dict]:
        """The PPO-clip policy loss of one minibatch (one action per row) and its
        diagnostics (clipfrac, approx_kl); the verl integration uses verl's."""
        return ppo_clip_objective(logp, logp_old, adv, self.cfg.clip_ratio)

    def update(self, embeddings: torch.Tensor, batch: dict[str, torch.Tensor],
               rewards: torch.Tensor, generator: Optional[torch.Generator] = None) -> dict:
        """One policy update.

        ``embeddings`` [Q, d] (one per question), ``batch`` from
        :meth:`StrengthPredictor.sample` with ``n_samples`` rows per question,
        ``rewards`` [Q*n]. Returns metrics (floats)."""
        c = self.cfg
        n = c.n_samples
        emb = embeddings.repeat_interleave(n, dim=0)
        rewards = rewards.float()
        values = None
        if c.name == "ppo":
            with torch.no_grad():
                values = self.predictor(emb).value
        adv = self.advantages(rewards, values).detach()
        u, logp_old = batch["u"], batch["log_prob"]
        mean_old, log_std_old = batch["mean"], batch["log_std"]
        rows = emb.shape[0]
        epochs = 1 if c.name == "reinforce" else c.ppo_epochs
        mb = min(c.minibatch_size or rows, rows)
        params = [p for p in self.predictor.parameters() if p.requires_grad]
        sums: dict[str, float] = {}
        updates = 0
        for _ in range(epochs):
            order = torch.randperm(rows, generator=generator) if mb < rows else torch.arange(rows)
            for start in range(0, rows, mb):
                idx = order[start:start + mb]
                out = self.predictor(emb[idx])
                pi = StrengthPredictor.policy(out.mean, out.log_std)
                logp = pi.log_prob(u[idx])
                if c.name == "reinforce":
                    pg_loss = -(logp * adv[idx]).mean()
                    diag = {"clipfrac": 0.0,
                            "approx_kl": float((logp_old[idx] - logp.detach()).mean())}
                else:
                    pg_loss, diag = self.clip_loss(logp, logp_old[idx], adv[idx])
                entropy = pi.entropy().mean()
                kl = kl_divergence(StrengthPredictor.policy(mean_old[idx], log_std_old[idx]),
                                   pi).mean()
                loss = pg_loss - c.entropy_coef * entropy + c.kl_coef * kl
                value_loss = torch.zeros(())
                if c.name == "ppo" and out.value is not None:
                    value_loss = ((out.value - rewards[idx]) ** 2).mean()
                    loss = loss + c.value_coef * value_loss
                if not bool(torch.isfinite(loss)):
                    raise FloatingPointError(f"policy loss is {float(loss)}; stopping before the "
                                             "predictor is corrupted (lower algorithm.lr?)")
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                # max_norm=inf measures the norm without clipping
                gnorm = torch.nn.utils.clip_grad_norm_(
                    params, c.grad_clip if c.grad_clip > 0 else float("inf"))
                self.optimizer.step()
                updates += 1
                for k, v in (("loss", float(loss.detach())), ("pg_loss", float(pg_loss.detach())),
                             ("entropy", float(entropy.detach())), ("kl_prev", float(kl.detach())),
                             ("value_loss", float(value_loss.detach())), ("grad_norm", float(gnorm)),
                             ("clipfrac", diag["clipfrac"]), ("approx_kl", diag["approx_kl"])):
                    sums[k] = sums.get(k, 0.0) + v
        metrics = {f"actor/{k}": v / max(updates, 1) for k, v in sums.items()}
        metrics["actor/advantage_abs_mean"] = float(adv.abs().mean())
        metrics["actor/log_std_mean"] = float(self.predictor.log_std.detach().mean())
        metrics["actor/updates"] = updates
        return metrics


def scheduled_log_std(cfg: Any, step: int, total_steps: int) -> Optional[float]:
    """The annealed log-std of training step ``step`` (1-based): linear from
    ``init_log_std`` at step 1 to ``final_log_std`` at ``total_steps``; None
    when ``final_log_std`` is not set (log_std is learned)."""
    final = getattr(cfg, "final_log_std", None)
    if final is None:
        return None
    if total_steps <= 1:
        return float(final)
    t = min(max(step - 1, 0), total_steps - 1) / (total_steps - 1)
    return float(cfg.init_log_std + t * (final - cfg.init_log_std))


def make_optimizer(predictor: StrengthPredictor, cfg: Any) -> torch.optim.Optimizer:
    """AdamW over the predictor's own parameters only (nothing of the LLM/SAE).

    With ``final_log_std`` set, log_std is a schedule (``PolicyUpdater.begin_step``)
    and is frozen here; with ``log_std_lr`` set it is a parameter group of its own."""
    if getattr(cfg, "final_log_std", None) is not None:
        predictor.log_std.requires_grad_(False)
    params = [p for p in predictor.parameters() if p.requires_grad]
    log_std_lr = getattr(cfg, "log_std_lr", None)
    if log_std_lr is None or not predictor.log_std.requires_grad:
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    rest = [p for p in params if p is not predictor.log_std]
    return torch.optim.AdamW([{"params": rest}, {"params": [predictor.log_std], "lr": log_std_lr}],
                             lr=cfg.lr, weight_decay=cfg.weight_decay)
