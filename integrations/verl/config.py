"""The ``sae:`` block of a verl config -> sae_fast's validated SAEConfig."""

from __future__ import annotations

from typing import Any

from sae_fast.config import ConfigError, SAEConfig, build


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
    ``sae:`` block (or from the block itself). Unknown keys are errors naming
    the key; ``disable_sae`` (the ``--disable-sae`` flag) turns steering off so
    verl's standard PPO runs unchanged."""
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
