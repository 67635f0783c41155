"""A verl trainer that trains only the strength predictor (the LLM is frozen:
no actor, critic or reference workers, no LLM optimizer, no weight sync).

``@register_trainer("sae_predictor")`` makes it a verl v1 trainer
(``trainer.v1.trainer_mode=sae_predictor``): it has the interface verl's
``TaskRunnerV1`` drives (``init``, ``get_llm_client``, ``fit(agent_loop_manager)``),
and ``sae-fast train --engine verl`` drives it the same way from the
driver. One step:

    questions -> embeddings (frozen LLM on the driver, each question once)
    -> predictor samples n strength vectors per question
    -> verl's AgentLoopManager + our agent loop -> vLLM rollout servers steer
       each sample with its own strengths (SAE attached from additional_config)
    -> reward (sae_fast's reward config: built-ins, verl's default_compute_score,
       or the user's function) -> verl's GRPO advantage
       (core_algos.compute_grpo_outcome_advantage) -> PPO-clip update of the
       predictor with verl's policy loss (get_policy_loss_fn("vanilla"))
    -> metrics to verl's Tracking -> atomic checkpoint.

Validation (deterministic strengths, greedy decoding), the baseline table,
checkpoints and resume are sae_fast's trainer's, over the same engine.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from verl.trainer.ppo import core_algos
from verl.trainer.ppo.v1 import PPOTrainer, register_trainer

from sae_fast.config import Config
from sae_fast.train.rl import PolicyUpdater
from sae_fast.train.trainer import MetricsLogger, Trainer

log = logging.getLogger(__name__)

TRAINER_NAME = "sae_predictor"


class VerlPolicyUpdater(PolicyUpdater):
    """sae_fast's predictor update with verl's advantage estimator (GRPO) and
    verl's PPO-clip policy loss; one action (a strength vector) per sample,
    so every tensor verl sees is [B, 1] with an all-ones response mask."""

    def __init__(self, predictor: Any, optimizer: torch.optim.Optimizer, cfg: Any) -> None:
        super().__init__(predictor, optimizer, cfg)
        from omegaconf import OmegaConf

        self.policy_loss = core_algos.get_policy_loss_fn("vanilla")
        self.loss_config = OmegaConf.create({
            "clip_ratio": float(cfg.clip_ratio), "clip_ratio_low": float(cfg.clip_ratio),
            "clip_ratio_high": float(cfg.clip_ratio), "clip_ratio_c": 3.0,
            "global_batch_info": {}})
        self.verl_calls = {"advantage": 0, "policy_loss": 0}

    def advantages(self, rewards: torch.Tensor, values: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.cfg.name != "grpo":  # ppo (value head) / reinforce keep sae_fast's estimators
            return super().advantages(rewards, values)
        n = int(self.cfg.n_samples)
        index = np.repeat(np.arange(rewards.numel() // n), n)  # the GRPO group of each sample
        adv, _ = core_algos.compute_grpo_outcome_advantage(
            token_level_rewards=rewards.float().view(-1, 1),
            response_mask=torch.ones(rewards.numel(), 1), index=index,
            norm_adv_by_std_in_grpo=bool(self.cfg.normalize_advantages))
        self.verl_calls["advantage"] += 1
        return adv.view(-1)

    def clip_loss(self, logp: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor
                  ) -> tuple[torch.Tensor, dict]:
        loss, m = self.policy_loss(old_log_prob=logp_old.view(-1, 1), log_prob=logp.view(-1, 1),
                                   advantages=adv.view(-1, 1),
                                   response_mask=torch.ones(logp.numel(), 1),
                                   loss_agg_mode="token-mean", config=self.loss_config)
        self.verl_calls["policy_loss"] += 1
        return loss, {"clipfrac": float(m["actor/pg_clipfrac"]),
                      "approx_kl": float(m["actor/ppo_kl"])}


class TrackingMetrics(MetricsLogger):
    """sae_fast's metrics.jsonl (resume truncation included) plus verl's
    ``Tracking`` (console / file / wandb ... as ``trainer.logger`` says)."""

    def __init__(self, inner: MetricsLogger, tracking: Any) -> None:
        self.__dict__.update(inner.__dict__)
        self.tracking = tracking

    def log(self, row: dict) -> None:
        super().log(row)
        numeric = {k: v for k, v in row.items() if isinstance(v, (int, float))
                   and not isinstance(v, bool) and k != "step"}
        self.tracking.log(data=numeric, step=int(row.get("step", 0)))

    def close(self) -> None:
        super().close()
        self.tracking.finish()


def _config_from_verl(vcfg: Any) -> Config:
    from omegaconf import OmegaConf

    from sae_fast.config import build

    if "sae_fast" not in vcfg:
        raise ValueError("the verl config has no sae_fast block (the sae_fast Config this "
                         "trainer runs); compose it with sae_fast_verl.launch")
    return build(Config, OmegaConf.to_container(vcfg.sae_fast, resolve=True), "")


@register_trainer(TRAINER_NAME)
class SAEPredictorTrainer(PPOTrainer):
    """See the module docstring. ``config`` is verl's composed config holding
    our Config under ``sae_fast`` (or pass ``sae_config``)."""

    def __init__(self, config: Any, sae_config: Optional[Config] = None, *,
                 resume: bool = False, stats_dir: Optional[Path] = None) -> None:
        # Not PPOTrainer.__init__: it builds actor/critic workers and a replay
        # buffer, which a frozen-LLM job does not have.
        self.config = config
        self.sae_cfg = sae_config if sae_config is not None else _config_from_verl(config)
        self.resume = resume
        self.stats_dir = stats_dir
        self.server_manager = None
        self.logger = None
        self.core: Optional[Trainer] = None

    # ---- the interface verl's TaskRunnerV1 drives
    def init(self) -> None:
        from verl.workers.rollout.llm_server import LLMServerManager

        self.server_manager = LLMServerManager.create(config=self.config)

    def get_llm_client(self) -> Any:
        return self.server_manager.get_client()

    def get_teacher_client(self) -> None:
        return None

    def get_reward_handles(self) -> None:
        return None  # rewards are computed on the driver (sae_fast's reward config)

    # PPOTrainer's abstract hooks: its own fit loop calls them; ours is
    # sae_fast's trainer loop, which logs and checkpoints itself.
    def on_step_end(self) -> None:
        pass

    def on_sample_end(self) -> None:
        pass

    def fit(self, agent_loop_manager: Any) -> dict:
        from verl.utils.tracking import Tracking

        from transformers import AutoTokenizer

        from sae_fast_verl.engine import VerlRolloutEngine

        cfg = self.sae_cfg
        tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
        engine = VerlRolloutEngine(self.config, tokenizer,
                                   cfg.sae.features if cfg.sae.enable else None,
                                   stats_dir=self.stats_dir, agent_loop_manager=agent_loop_manager)
        # The driver loads the frozen LLM for question embeddings only (each
        # question embedded once, cached); generation runs on the servers.
        core = Trainer(cfg, engine=engine, resume=self.resume)
        core.setup()
        if core.updater is not None:
            updater = VerlPolicyUpdater(core.predictor, core.optimizer, cfg.algorithm)
            updater.load_state_dict(core.updater.state_dict())
            core.updater = updater
        from omegaconf import OmegaConf

        self.logger = Tracking(project_name=self.config.trainer.project_name,
                               experiment_name=self.config.trainer.experiment_name,
                               default_backend=list(self.config.trainer.logger),
                               config=OmegaConf.to_container(self.config, resolve=True))
        core.metrics = TrackingMetrics(core.metrics, self.logger)
        self.core = core
        try:
            summary = core.fit()
        finally:
            core.close()
        summary["verl_calls"] = dict(getattr(core.updater, "verl_calls", {}))
        return summary
