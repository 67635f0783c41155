"""verl integration of sae_fast.

What is here now: reading the ``sae:`` block out of a verl trainer config
(dict or OmegaConf) into the same validated :class:`sae_fast.config.SAEConfig`
the standalone trainer uses, so a verl job and ``sae-fast train`` share one
schema. The Ray-side pieces (worker extension wiring, agent loop, trainer
subclass) reuse ``sae_fast.backends.vllm`` and ``sae_fast.train``; they are
tracked as their own issue.
"""

from integrations.verl.config import sae_config_from_verl, steering_enabled

__all__ = ["sae_config_from_verl", "steering_enabled"]
