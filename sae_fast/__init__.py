"""sae_fast: fast SAE feature steering for frozen LLMs, with RL-trained
per-question strength prediction.

Public surface:
    load_sae, SAEWeights            sae-lens folders / objects -> frozen weights
    SteeringSpec, build_plan        what to steer -> compact device tensors
    ops                             fused steering ops (ext -> Triton -> torch)
    attach                          transformers backend (see sae_fast.vllm for vLLM)
    generate                        three-line steered generation
"""

import logging

from sae_fast import ops
from sae_fast.backends.hf import HFSteerer, attach
from sae_fast.generate import generate
from sae_fast.plan import SteeringPlan, SteeringSpec, SteeringSpecError, build_plan
from sae_fast.sae import SAELoadError, SAEWeights, load_sae
from sae_fast.stats import SteeringStats

__version__ = "0.1.0"
__all__ = ["ops", "load_sae", "SAEWeights", "SAELoadError", "SteeringSpec", "SteeringSpecError",
           "SteeringPlan", "build_plan", "attach", "HFSteerer", "generate", "SteeringStats"]

logging.getLogger(__name__).addHandler(logging.NullHandler())
