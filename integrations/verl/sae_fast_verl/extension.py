"""The vLLM worker extension of steered verl rollout servers: sae_fast's
steering methods composed with verl's own ``vLLMColocateWorkerExtension``
(verl calls its ``monkey_patch_model`` at server start and its weight-sync
methods; replacing it would break both)."""

from verl.workers.rollout.vllm_rollout.utils import vLLMColocateWorkerExtension

from sae_fast.backends.vllm_engine import SAESteeringWorkerExtension

QUALNAME = "sae_fast_verl.extension.SAEVerlWorkerExtension"


class SAEVerlWorkerExtension(SAESteeringWorkerExtension, vLLMColocateWorkerExtension):
    """Both extensions' methods; ours are all prefixed ``sae_``."""
