"""sae_fast: fast SAE feature steering for frozen LLMs, with RL-trained
per-question strength prediction.

Public surface:
    load_sae, SAEWeights                 sae-lens folders / objects -> frozen weights
    SteeringSpec, build_plan, SteeringPlan   what to steer -> compact device tensors
    SteeringRequest                      one request's steering (the one vocabulary)
    ops                                  fused steering ops (ext -> Triton -> torch)
    attach                               steer a transformers model or a vLLM LLM
                                         (async engines: sae_fast.vllm.attach_async)
    HFSteerer, AttachedSAE, SteeringStats  what attach returns / keeps / counts
    generate                             three-line steered generation (transformers)
    StrengthPredictor, PredictorConfig   the per-question strength MLP
    Config, load_config                  the ``sae:`` block and the trainer's sections
    Trainer                              RL training of the predictor (LLM frozen):
                                         ``Trainer(load_config(path)).fit()``

``Trainer``, ``Config`` and ``load_config`` import on first use,
so that ``import sae_fast`` (done by every vLLM worker through the plugin)
stays light.
"""

import importlib
import logging
from typing import Any

from sae_fast import ops
from sae_fast.backends import attach
from sae_fast.backends.common import AttachedSAE
from sae_fast.backends.hf import HFSteerer
from sae_fast.generate import generate
from sae_fast.plan import SteeringPlan, SteeringSpec, SteeringSpecError, build_plan
from sae_fast.predictor import PredictorConfig, PredictorError, StrengthPredictor
from sae_fast.request import SteeringRequest
from sae_fast.sae import SAELoadError, SAEWeights, load_sae
from sae_fast.stats import SteeringStats

__version__ = "0.1.0"
__all__ = ["ops", "load_sae", "SAEWeights", "SAELoadError", "SteeringSpec", "SteeringSpecError",
           "SteeringPlan", "SteeringRequest", "build_plan", "attach", "HFSteerer", "AttachedSAE",
           "generate", "SteeringStats", "StrengthPredictor", "PredictorConfig", "PredictorError",
           "Config", "ConfigError", "load_config", "Trainer"]

_LAZY = {"Config": "sae_fast.config", "ConfigError": "sae_fast.config",
         "load_config": "sae_fast.config", "Trainer": "sae_fast.train.trainer"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sae_fast' has no attribute {name!r}")


logging.getLogger(__name__).addHandler(logging.NullHandler())
