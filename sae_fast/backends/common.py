"""Backend-neutral model helpers shared by the HF and vLLM backends and the
trainer: finding decoder layers, resolving layer indices, hidden sizes,
strength schedules, and the error for models we cannot steer."""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from sae_fast.plan import SteeringSpecError

SCHEDULES = ("constant", "linear", "cosine")
_LAYER_PATHS = ("model.layers", "model.decoder.layers", "model.language_model.layers",
                "transformer.h", "gpt_neox.layers", "transformer.layers")


class UnsupportedModelError(TypeError):
    """The model's decoder layers could not be located."""


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder layers of a transformers causal LM."""
    for path in _LAYER_PATHS:
        obj: Any = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return obj
    raise UnsupportedModelError(
        f"cannot find the decoder layers of {type(model).__name__}: looked for "
        f"{', '.join(_LAYER_PATHS)}; supported families include Llama, Qwen2, Mistral, Gemma2, "
        "GPT-2 and GPT-NeoX")


def hidden_size_of(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    for name in ("hidden_size", "n_embd", "d_model"):
        if cfg is not None and getattr(cfg, name, None):
            return int(getattr(cfg, name))
    raise UnsupportedModelError(f"cannot read the hidden size of {type(model).__name__} from its config")


def resolve_layer(layer: int, num_layers: int) -> int:
    """Negative layers count from the end; out of range is an error naming both."""
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise SteeringSpecError(f"layer {layer!r} is not an integer")
    idx = layer + num_layers if layer < 0 else layer
    if not 0 <= idx < num_layers:
        raise SteeringSpecError(f"layer {layer} is out of range for a model with {num_layers} "
                                f"decoder layers (valid: {-num_layers}..{num_layers - 1})")
    return idx


def schedule_multiplier(schedule: str, step: int, steps: int) -> float:
    """Strength multiplier at generated position ``step`` (0 = first token)."""
    if schedule == "constant":
        return 1.0
    frac = min(max(step, 0), steps) / max(steps, 1)
    if schedule == "linear":
        return 1.0 - frac
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * frac))
    raise SteeringSpecError(f"strength_schedule={schedule!r} is not one of {', '.join(SCHEDULES)}")
