"""Build-time patches, installed in every vLLM process (the
``vllm.general_plugins`` entry point, or importing this package):

* the model runners' ``load_model`` gets a post-hook that, for an engine that
  opted in, gives the chosen decoder layers their slots, attaches the SAEs of
  ``additional_config["sae_fast"]["saes"]`` and hooks the per-step input
  preparation -- after the model is built, before anything is compiled;
* the decoder-layer classes' ``forward`` applies the layer's slot to its
  ``(hidden_states, residual)`` output;
* request admission (validation + prefix-cache salt) for every engine of the
  process (see ``admission``).
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Optional

import torch

from sae_fast.backends.common import UnsupportedModelError
from sae_fast.backends.vllm_engine import _compat
from sae_fast.backends.vllm_engine.config import CONFIG_KEY, ServeConfig, parse
from sae_fast.backends.vllm_engine.worker import RUNNER_ATTR, SLOT_ATTR, WorkerSteering

log = logging.getLogger(__name__)

EXTENSION_QUALNAME = "sae_fast.vllm.SAESteeringWorkerExtension"

_PATCHED_CLASSES: dict[type, Any] = {}
_RUNNER_PATCHES: dict[type, Any] = {}
_UNDO_ADMISSION: list = []


def opted_in(vllm_config: Any) -> Optional[ServeConfig]:
    """The validated ``sae_fast`` block of an engine that asked for steering
    (our worker extension, or a subclass of it, or the config block), else None."""
    extra = _compat.additional_config(vllm_config)
    raw = extra.get(CONFIG_KEY) if extra is not None else None
    ext = _compat.worker_extension_qualname(vllm_config)
    ours = ext == EXTENSION_QUALNAME
    if not ours and ext:
        try:
            from sae_fast.backends.vllm_engine.worker import SAESteeringWorkerExtension

            ours = issubclass(_compat.resolve_qualname(ext), SAESteeringWorkerExtension)
        except Exception:
            ours = False
    if raw is None and not ours:
        return None
    cfg = parse(raw)
    if extra is not None and CONFIG_KEY not in extra:
        # Recorded before anything is compiled, so vLLM's compile-cache key
        # (which hashes additional_config) separates patched from plain graphs.
        extra[CONFIG_KEY] = cfg.model_dump(exclude_defaults=True)
    return cfg


def patch_layer_class(cls: type) -> None:
    """Make ``cls.forward`` apply the layer's slot (if it has one) to its
    ``(hidden_states, residual)`` output. Python here runs when the forward is
    traced (compiled mode) or called (eager mode), never per step in a graph."""
    if getattr(cls.forward, "_sae_fast_original", None) is not None:
        return
    original = cls.forward

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        slot = getattr(self, SLOT_ATTR, None)
        if slot is None:
            return out
        if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], torch.Tensor)
                and (out[1] is None or isinstance(out[1], torch.Tensor))):
            raise UnsupportedModelError(
                f"sae_fast: {type(self).__name__}.forward returned {type(out).__name__}, not "
                "(hidden_states, residual); this vLLM model is not supported for steering")
        hidden, residual = out
        slot.apply_(hidden, residual)
        return hidden, residual

    forward._sae_fast_original = original  # type: ignore[attr-defined]
    cls.forward = forward
    _PATCHED_CLASSES[cls] = original


def setup_runner(runner: Any) -> None:
    """After the model is built, before it is compiled: add slots, attach the
    configured SAEs, hook the per-step input preparation."""
    if getattr(runner, RUNNER_ATTR, None) is not None:
        return
    cfg = opted_in(runner.vllm_config)
    if cfg is None:
        return
    _compat.check_version()
    model = _compat.runner_model(runner)
    ws = WorkerSteering(runner, model, cfg)
    object.__setattr__(runner, RUNNER_ATTR, ws)
    _compat.hook_runner_step(runner, ws.on_step)
    log.info("sae_fast: steering slots at layers %s (max_features=%d, max_rows=%d, %s mode), "
             "SAEs %s", sorted(ws.slots), ws.capacity, ws.max_rows,
             "compiled" if ws.compiled else "eager", sorted(ws.groups))


def install() -> None:
    """Install the build-time and admission hooks in this process
    (idempotent). Inert for engines that did not ask for steering."""
    for cls in _compat.runner_classes():
        if cls in _RUNNER_PATCHES:
            continue
        _RUNNER_PATCHES[cls] = _compat.wrap_runner_load_model(cls, setup_runner)
    if not _UNDO_ADMISSION:
        from sae_fast.backends.vllm_engine.admission import admit

        try:
            _UNDO_ADMISSION.append(_compat.wrap_assign_request_id(admit))
        except Exception as err:  # a vLLM without the hook point: attach() still validates
            log.warning("sae_fast: request admission hook not installed: %s", err)


def uninstall() -> None:
    """Undo install() and the decoder-layer patches (engines built while it was
    installed keep their compiled graphs; use only when none is alive)."""
    for cls, original in list(_RUNNER_PATCHES.items()):
        cls.load_model = original
    _RUNNER_PATCHES.clear()
    for cls, original in list(_PATCHED_CLASSES.items()):
        cls.forward = original
    _PATCHED_CLASSES.clear()
    while _UNDO_ADMISSION:
        _UNDO_ADMISSION.pop()()
