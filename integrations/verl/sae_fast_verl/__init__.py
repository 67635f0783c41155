"""sae_fast's verl plugin (import name ``sae_fast_verl``): SAE steering and
strength-predictor training inside verl 0.9's RL stack, without forking verl.

* ``config``     the ``sae:`` block -> verl's Hydra config (rollout engine kwargs,
                 our worker extension, agent loop), composed from verl's own YAML
* ``extension``  our vLLM worker extension composed with verl's
                 ``vLLMColocateWorkerExtension`` (verl calls ``monkey_patch_model``)
* ``agent_loop`` ``@register("sae_steering")``: per-sample strengths in ``extra_args``
* ``engine``     a sae_fast rollout engine over verl's ``AgentLoopManager``
* ``trainer``    ``@register_trainer("sae_predictor")``: trains only the predictor
* ``launch``     ``sae-fast train --engine verl``; ``--disable-sae`` runs verl's PPO
* ``data``       JSONL -> verl's parquet format

verl loads this package in every process (driver, Ray actors, vLLM workers)
through the ``verl.plugins`` entry point; ``register()`` is what it calls.
"""

PLUGIN_MODULE = "sae_fast_verl.plugin"


def register() -> None:
    """Import the modules whose decorators register our agent loop and trainer."""
    from sae_fast_verl import plugin  # noqa: F401
