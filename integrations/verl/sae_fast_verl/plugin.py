"""Loaded by verl in every process (``verl.plugins`` entry point, or
``VERL_USE_EXTERNAL_MODULES=sae_fast_verl.plugin``): registers the agent loop
and the trainer. Each import is guarded so a process that lacks a part of
verl (e.g. TransferQueue for the v1 trainers) still gets the rest, and says why."""

import logging

log = logging.getLogger(__name__)
REGISTERED: dict[str, str] = {}

try:
    from sae_fast_verl import agent_loop  # noqa: F401  (@register("sae_steering"))

    REGISTERED["agent_loop"] = agent_loop.AGENT_NAME
except Exception as err:  # pragma: no cover - depends on the installed verl
    log.warning("sae_fast_verl: agent loop not registered: %s", err)

try:
    from sae_fast_verl import trainer  # noqa: F401  (@register_trainer("sae_predictor"))

    REGISTERED["trainer"] = trainer.TRAINER_NAME
except Exception as err:  # pragma: no cover
    log.warning("sae_fast_verl: trainer not registered: %s", err)
