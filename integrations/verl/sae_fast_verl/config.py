"""The ``sae:`` block and verl's Hydra config.

* :func:`sae_config_from_verl` reads a ``sae:`` block out of a verl config
  (dict or OmegaConf) into the same validated ``SAEConfig`` that
  ``sae-fast train`` uses (one schema; unknown keys are errors naming them);
* :func:`compose` builds verl's own ``ppo_trainer.yaml`` with the overrides a
  steered rollout-only job needs, then places the steering where verl's vLLM
  servers read it: ``actor_rollout_ref.rollout.engine_kwargs.vllm`` gets our
  worker extension (composed with verl's) and ``additional_config["sae_fast"]``
  (the SAE every server attaches at model load), and the agent loop is ours.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

from sae_fast.config import Config, ConfigError, SAEConfig, build

AGENT_NAME = "sae_steering"


def _plain(cfg: Any) -> Any:
    """OmegaConf containers -> plain dicts/lists (verl configs are OmegaConf)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:
        return cfg
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def sae_config_from_verl(cfg: Any, *, disable_sae: bool = False) -> SAEConfig:
    """Validated SAEConfig from a verl trainer config holding a top-level
    ``sae:`` block (or from the block itself). ``disable_sae`` turns steering
    off."""
    cfg = _plain(cfg)
    if not isinstance(cfg, dict):
        raise ConfigError(f"expected a verl config mapping, got {type(cfg).__name__}")
    block = cfg.get("sae", cfg) if "sae" in cfg else cfg
    block = dict(_plain(block) or {})
    if disable_sae:
        block["enable"] = False
    return build(SAEConfig, block, "sae")


def steering_enabled(sae_cfg: SAEConfig) -> bool:
    """Whether rollouts attach and apply steering for this config."""
    return bool(sae_cfg.enable and sae_cfg.enable_steering)


def serve_block(cfg: Config, stats_file: Optional[str] = None) -> dict:
    """``additional_config["sae_fast"]`` for the rollout servers: the SAE of
    ``cfg.sae`` at its layers. Strengths travel per request and are already
    effective (bounded and scaled by the predictor), so the SAE entry runs
    with scale 1 and the effective bounds."""
    s = cfg.sae
    spec = s.steering_spec()
    entry = {"name": "sae", "path": str(Path(s.model_path).resolve()), "layers": list(s.layers),
             "features": list(spec.features), "mode": spec.mode,
             "min_strength": spec.min_strength, "max_strength": spec.max_strength,
             "strength_scale": 1.0, "topk_mode": spec.topk_mode}
    if spec.max_activations is not None:
        entry["max_activations"] = list(spec.max_activations)
    block: dict[str, Any] = {"saes": [entry]}
    if stats_file:
        block["stats_dir"] = stats_file
    return block


def verl_config_dir() -> str:
    import verl

    return os.path.join(os.path.dirname(verl.__file__), "trainer", "config")


def base_overrides(cfg: Config, *, n_gpus: int = 1, nnodes: int = 1) -> list[str]:
    """Hydra overrides of verl's ppo_trainer.yaml for a rollout-only steering job."""
    r = cfg.rollout
    R = "actor_rollout_ref.rollout"
    return [
        f"actor_rollout_ref.model.path={Path(cfg.model.path).resolve()}",
        f"{R}.name=vllm", f"{R}.mode=async", f"{R}.load_format=auto",
        f"{R}.nnodes={nnodes}", f"{R}.n_gpus_per_node={n_gpus}",
        f"trainer.n_gpus_per_node={n_gpus}", f"trainer.nnodes={nnodes}",
        f"{R}.tensor_model_parallel_size=1", f"{R}.dtype={cfg.model.dtype}",
        f"{R}.prompt_length={r.max_prompt_length}", f"{R}.response_length={r.max_new_tokens}",
        f"{R}.temperature={r.temperature}", f"{R}.top_p={r.top_p}",
        f"{R}.top_k={r.top_k if r.top_k > 0 else -1}",
        f"{R}.calculate_log_probs=False", f"{R}.skip_tokenizer_init=False",
        f"{R}.agent.num_workers=1", f"{R}.agent.default_agent_loop={AGENT_NAME}",
        f"data.max_prompt_length={r.max_prompt_length}",
        f"data.max_response_length={r.max_new_tokens}",
        f"trainer.project_name=sae_fast", f"trainer.experiment_name={Path(cfg.trainer.output_dir).name}",
        "trainer.logger=[console,file]",
    ]


def agent_loop_yaml(folder: Path) -> Path:
    """verl's agent-loop registry file naming our loop (Ray workers load it)."""
    p = Path(folder) / "sae_agent_loops.yaml"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(f"- name: {AGENT_NAME}\n  _target_: sae_fast_verl.agent_loop.SAESteeringAgentLoop\n")
    return p


def compose(cfg: Config, overrides: Sequence[str] = (), *, steer: bool = True,
            work_dir: Optional[Path] = None, stats_file: Optional[str] = None,
            n_gpus: int = 1, nnodes: int = 1) -> Any:
    """verl's own ppo_trainer config composed with our overrides, then the
    user's ``overrides`` (Hydra syntax, applied last, so they win)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf, open_dict

    if cfg.model.path is None:
        raise ConfigError("model.path: the LLM is required (--base-model-path)")
    if steer and not cfg.sae.model_path:
        raise ConfigError("sae.model_path: the SAE is required (--sae-model-path) unless "
                          "--disable-sae")
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=verl_config_dir(), version_base=None):
        vcfg = hydra_compose(config_name="ppo_trainer",
                             overrides=base_overrides(cfg, n_gpus=n_gpus, nnodes=nnodes) + list(overrides))
    with open_dict(vcfg):
        rollout = vcfg.actor_rollout_ref.rollout
        if work_dir is not None:
            rollout.agent.agent_loop_config_path = str(agent_loop_yaml(work_dir))
        rollout.enable_sleep_mode = False
        current = rollout.engine_kwargs.get("vllm")
        vllm_kwargs = dict(_plain(current) or {}) if current is not None else {}
        if steer:
            from sae_fast_verl.extension import QUALNAME

            vllm_kwargs["worker_extension_cls"] = QUALNAME
            vllm_kwargs["additional_config"] = {"sae_fast": serve_block(cfg, stats_file)}
        rollout.engine_kwargs.vllm = vllm_kwargs
    return vcfg


def validate(vcfg: Any) -> dict:
    """verl's dataclasses for the parts our job uses (raises if they refuse)."""
    from verl.utils.config import omega_conf_to_dataclass
    from verl.workers.config import HFModelConfig

    return {"rollout": omega_conf_to_dataclass(vcfg.actor_rollout_ref.rollout),
            "model": omega_conf_to_dataclass(vcfg.actor_rollout_ref.model,
                                             dataclass_type=HFModelConfig)}
