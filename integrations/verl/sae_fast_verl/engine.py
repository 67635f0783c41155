"""A sae_fast rollout engine over verl's rollout stack: ``LLMServerManager``
(vLLM async servers in Ray actors, each attaching the SAE from
``additional_config`` at model load) and ``AgentLoopManager`` with our agent
loop. The standalone trainer's loop talks to it like to its HF and vLLM
engines: ``generate(prompts, strengths[B, k] | None, decoding)``."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from sae_fast.train.rollout import Completion, Decoding, RolloutEngine

from sae_fast_verl.agent_loop import AGENT_NAME

log = logging.getLogger(__name__)

_COUNTERS = ("steps", "steered_rows", "successes", "failures", "strength_count", "steer_time_s")


def _objects(values: Sequence[Any]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = list(values)
    return out


def read_worker_stats(folder: Path) -> list[dict]:
    """The stats every steered rollout worker last wrote (one file per process)."""
    out = []
    for p in sorted(Path(folder).glob("worker-*.json")):
        try:
            out.append(json.loads(p.read_text()))
        except (OSError, json.JSONDecodeError):  # replaced while reading: next call sees it
            continue
    return out


def merge_worker_stats(parts: Sequence[dict]) -> dict:
    """Counters summed over workers; strength mean/std pooled."""
    total: dict[str, Any] = {k: 0 for k in _COUNTERS}
    s1 = s2 = 0.0
    groups: dict[str, dict[str, int]] = {}
    failures: dict[str, int] = {}
    for d in parts:
        for k in _COUNTERS:
            total[k] += d.get(k, 0) or 0
        n = d.get("strength_count", 0) or 0
        m, sd = d.get("strength_mean", 0.0), d.get("strength_std", 0.0)
        s1 += n * m
        s2 += n * (sd * sd + m * m)
        for g, c in (d.get("groups") or {}).items():
            acc = groups.setdefault(g, {"requests": 0, "tokens": 0})
            for k in acc:
                acc[k] += c.get(k, 0)
        for r, c in (d.get("failure_reasons") or {}).items():
            failures[r] = failures.get(r, 0) + c
    n = total["strength_count"]
    mean = s1 / n if n else 0.0
    total["strength_mean"] = mean
    total["strength_std"] = max(s2 / n - mean * mean, 0.0) ** 0.5 if n > 1 else 0.0
    total["groups"] = groups
    total["failure_reasons"] = failures
    total["workers"] = len(parts)
    total["features"] = {}
    return total


class VerlRolloutEngine(RolloutEngine):
    """Rollouts through verl's servers and agent loop (``rollout.engine: verl``)."""

    backend = "verl"

    def __init__(self, verl_config: Any, tokenizer: Any, features: Optional[Sequence[int]], *,
                 stats_dir: Optional[Path] = None, agent_loop_manager: Any = None) -> None:
        super().__init__(features)
        self.vcfg = verl_config
        self.tokenizer = tokenizer
        self.stats_dir = Path(stats_dir) if stats_dir else None
        self.server_manager = None
        self.agent_loop_manager = agent_loop_manager
        if agent_loop_manager is None:
            from verl.experimental.agent_loop.agent_loop import AgentLoopManager
            from verl.workers.rollout.llm_server import LLMServerManager

            self.server_manager = LLMServerManager.create(config=verl_config)
            self.agent_loop_manager = AgentLoopManager.create(
                config=verl_config, llm_client=self.server_manager.get_client())
        self._baseline: dict[str, Any] = {}
        self.last_extra_fields: dict[str, Any] = {}  # the agent loop's extra_fields, last batch

    @property
    def server_addresses(self) -> list[str]:
        return list(self.server_manager.get_addresses()) if self.server_manager else []

    def generate(self, prompts: Sequence[str], strengths: Optional[Any],
                 decoding: Decoding, log_probs: Optional[Any] = None) -> list[Completion]:
        from verl import DataProto

        rows = self._check_strengths(prompts, strengths)
        n_real = len(prompts)
        # verl splits a batch evenly over its agent-loop workers: pad with
        # unsteered copies of the first prompt, dropped from the result.
        workers = int(self.vcfg.actor_rollout_ref.rollout.agent.num_workers)
        pad = (-n_real) % max(workers, 1)
        prompts = list(prompts) + [prompts[0]] * pad
        if rows is not None:
            rows = list(rows) + [None] * pad
        n = len(prompts)
        seeds = [None if decoding.seed is None else (int(decoding.seed) + i) % (1 << 31)
                 for i in range(n)]
        batch = DataProto(non_tensor_batch={
            "raw_prompt": _objects([[{"role": "user", "content": p}] for p in prompts]),
            "sae_prompt": _objects(list(prompts)),
            "sae_strengths": _objects([None if rows is None or rows[i] is None else
                                       [float(x) for x in rows[i]] for i in range(n)]),
            "sae_seed": _objects(seeds),
            "sae_log_prob": _objects([None if log_probs is None or i >= n_real else
                                      float(log_probs[i]) for i in range(n)]),
            "agent_name": _objects([AGENT_NAME] * n),
        }, meta_info={"validate": not decoding.do_sample})
        out = self.agent_loop_manager.generate_sequences(batch)
        responses = out.batch["responses"]
        mask = out.batch["response_mask"].bool()
        done = []
        for i in range(n_real):
            ids = responses[i][mask[i]].tolist()
            done.append(Completion(text=self.tokenizer.decode(ids, skip_special_tokens=True),
                                   token_ids=ids))
        self.last_extra_fields = {k: out.non_tensor_batch[k][:n_real] for k in
                                  ("sae_strengths", "sae_log_prob", "sae_steered")
                                  if k in out.non_tensor_batch}
        requested = out.non_tensor_batch.get("sae_strengths")
        if requested is not None and rows is not None:
            for i in range(n_real):  # what each sample asked for came back with it
                want = None if rows[i] is None else [float(x) for x in rows[i]]
                if (requested[i] is None) != (want is None):
                    raise RuntimeError(f"sample {i}: the agent loop returned steering "
                                       f"{requested[i]} for requested {want}")
        return done

    # ---- statistics from the rollout workers (their RPCs return nothing here)
    def _totals(self) -> dict:
        if self.stats_dir is None:
            return merge_worker_stats([])
        return merge_worker_stats(read_worker_stats(self.stats_dir))

    def stats_dict(self, reset: bool = False) -> dict:
        cur = self._totals()
        out = dict(cur)
        for k in _COUNTERS:
            out[k] = cur[k] - self._baseline.get(k, 0)
        if reset:
            self._baseline = {k: cur[k] for k in _COUNTERS}
        return out

    def reset_stats(self) -> None:
        self.stats_dict(reset=True)

    def close(self) -> None:
        self.agent_loop_manager = None
        self.server_manager = None
