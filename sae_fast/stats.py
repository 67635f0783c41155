"""Steering statistics shared by every backend: strength mean/std, steered
steps, successes and failures (a failure is a step where steering could not
be applied and the model ran unsteered: counted and logged once, never
silent), and per-feature activation summaries before/after steering."""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass, field
import torch

log = logging.getLogger(__name__)


@dataclass
class FeatureSummary:
    """Running mean / max of one feature's activation, before and after steering."""

    count: int = 0
    before_sum: float = 0.0
    after_sum: float = 0.0
    before_max: float = float("-inf")
    after_max: float = float("-inf")
    before_active: int = 0
    after_active: int = 0

    def pooled(self, other: "FeatureSummary") -> "FeatureSummary":
        """The summary of both token sets together."""
        return FeatureSummary(self.count + other.count, self.before_sum + other.before_sum,
                              self.after_sum + other.after_sum,
                              max(self.before_max, other.before_max),
                              max(self.after_max, other.after_max),
                              self.before_active + other.before_active,
                              self.after_active + other.after_active)

    def as_dict(self) -> dict:
        n = max(self.count, 1)
        return {"tokens": self.count, "before_mean": self.before_sum / n,
                "after_mean": self.after_sum / n, "before_max": self.before_max,
                "after_max": self.after_max, "before_active_frac": self.before_active / n,
                "after_active_frac": self.after_active / n}


@dataclass
class SteeringStats:
    steps: int = 0  # hooked forward calls that ran steering
    steered_rows: int = 0  # token rows with a non-off strengths row
    successes: int = 0
    failures: int = 0
    missed: int = 0  # steps that had to steer but whose op never ran (also failures)
    strength_n: int = 0
    strength_sum: float = 0.0
    strength_m2: float = 0.0  # sum of squared deviations from the mean (Chan et al. pooling)
    steer_time_s: float = 0.0  # host time inside the steering code (when profiling)
    failure_reasons: dict = field(default_factory=dict)
    features: dict = field(default_factory=dict)  # feature idx -> FeatureSummary
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def record_strengths(self, strengths: torch.Tensor) -> None:
        """Strengths as requested (after bounds and scale), one entry per (request, feature)."""
        s = strengths.detach().double().reshape(-1)
        if s.numel() == 0:
            return
        n, total = int(s.numel()), float(s.sum())
        m2 = float(((s - total / n) ** 2).sum())  # about the batch mean: no cancellation
        with self._lock:
            self._pool_strengths(n, total, m2)

    def _pool_strengths(self, n: int, total: float, m2: float) -> None:
        """Pool a batch (count, sum, M2 about its own mean) into the running moments."""
        if n == 0:
            return
        n0 = self.strength_n
        if n0:
            delta = total / n - self.strength_sum / n0
            self.strength_m2 += m2 + delta * delta * n0 * n / (n0 + n)
        else:
            self.strength_m2 = m2
        self.strength_n = n0 + n
        self.strength_sum += total

    def record_step(self, steered_rows: int) -> None:
        with self._lock:
            self.steps += 1
            self.steered_rows += int(steered_rows)
            self.successes += 1

    def record_failure(self, reason: str) -> None:
        with self._lock:
            self.failures += 1
            first = reason not in self.failure_reasons
            self.failure_reasons[reason] = self.failure_reasons.get(reason, 0) + 1
        if first:
            log.error("steering failed and the model ran unsteered for this step: %s "
                      "(further failures with this reason are only counted)", reason)

    def record_missed(self, reason: str, steps: int = 1) -> None:
        """``steps`` steps whose steering op never ran although they had
        steered tokens (a bypassed hook, a graph replayed without the op): a
        failure, and a warning whenever the count passes a power of two."""
        with self._lock:
            before = self.missed
            self.missed += int(steps)
            n = self.missed
        self.record_failure(reason)
        if before == 0 or n.bit_length() > before.bit_length():
            log.warning("sae_fast: %d step(s) so far were meant to steer but the steering op "
                        "did not run: %s", n, reason)

    def record_features(self, features: list[int], before: torch.Tensor, after: torch.Tensor) -> None:
        """before/after: [rows, k] activations of the plan's features."""
        b, a = before.detach().float(), after.detach().float()
        if b.shape[0] == 0:
            return
        with self._lock:
            for j, f in enumerate(features):
                s = self.features.setdefault(int(f), FeatureSummary())
                s.count += int(b.shape[0])
                s.before_sum += float(b[:, j].sum())
                s.after_sum += float(a[:, j].sum())
                s.before_max = max(s.before_max, float(b[:, j].max()))
                s.after_max = max(s.after_max, float(a[:, j].max()))
                s.before_active += int((b[:, j] > 0).sum())
                s.after_active += int((a[:, j] > 0).sum())

    @property
    def strength_mean(self) -> float:
        return self.strength_sum / self.strength_n if self.strength_n else 0.0

    @property
    def strength_std(self) -> float:
        if self.strength_n < 2:
            return 0.0
        return math.sqrt(max(self.strength_m2 / self.strength_n, 0.0))

    def as_dict(self) -> dict:
        return {"steps": self.steps, "steered_rows": self.steered_rows,
                "successes": self.successes, "failures": self.failures, "missed": self.missed,
                "failure_reasons": dict(self.failure_reasons),
                "strength_mean": self.strength_mean, "strength_std": self.strength_std,
                "strength_count": self.strength_n, "steer_time_s": self.steer_time_s,
                "features": {f: s.as_dict() for f, s in sorted(self.features.items())}}

    def merge(self, other: "SteeringStats") -> "SteeringStats":
        out = SteeringStats()
        for name in ("steps", "steered_rows", "successes", "failures", "missed", "steer_time_s"):
            setattr(out, name, getattr(self, name) + getattr(other, name))
        for src in (self, other):
            out._pool_strengths(src.strength_n, src.strength_sum, src.strength_m2)
            for r, n in src.failure_reasons.items():
                out.failure_reasons[r] = out.failure_reasons.get(r, 0) + n
            for f, summary in src.features.items():
                out.features[f] = out.features[f].pooled(summary) if f in out.features else summary
        return out

    def reset(self) -> None:
        fresh = SteeringStats()
        with self._lock:
            for name in ("steps", "steered_rows", "successes", "failures", "missed", "strength_n",
                         "strength_sum", "strength_m2", "steer_time_s"):
                setattr(self, name, getattr(fresh, name))
            self.failure_reasons.clear()
            self.features.clear()

