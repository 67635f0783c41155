"""RL training of the strength predictor with a frozen LLM.

    from sae_fast.config import load_config
    from sae_fast.train import Trainer
    summary = Trainer(load_config("examples/sae_ppo_config.yaml")).fit()

Modules: ``embeddings`` (question embeddings from the frozen LLM), ``data``
(JSONL / parquet questions), ``rewards`` (verl-signature reward functions),
``rollout`` (HF / vLLM engines with per-row strengths), ``rl`` (GRPO, PPO-clip,
REINFORCE on Gaussian strength actions), ``checkpoint`` (atomic checkpoints),
``plots``, ``synthetic`` (a tiny task for demos and tests), ``demo_task`` (the
embedded SmolLM2 task, read from package data), ``probe`` (measure a feature's
effect on a word set) and ``trainer``. Inference (``sae-fast generate``,
``sae_fast.generate``) does not go through this package except for the
question embedder a predictor needs.
"""

from sae_fast.train.trainer import MethodResult, Trainer, format_table, train

__all__ = ["Trainer", "train", "format_table", "MethodResult"]
