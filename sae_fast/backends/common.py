"""Backend-neutral pieces shared by the HF and vLLM backends and the trainer:

* the attach vocabulary: :func:`spec_from_kwargs` / :func:`layers_from` turn
  the keywords every ``attach`` accepts (:data:`ATTACH_KEYWORDS`) into a
  :class:`SteeringSpec`, and :class:`AttachedSAE` is the one record of an
  attached SAE (name, layers, compact plan) in both backends;
* request resolution: :func:`resolve_request` turns a request's steering
  entries into validated host rows per attached SAE;
* model helpers: finding decoder layers, resolving layer indices, hidden
  sizes, strength schedules, and the error for models we cannot steer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from sae_fast.backends.tables import SteeringTables
from sae_fast.plan import SteeringPlan, SteeringSpec
from sae_fast.request import DEFAULT_MODE, SCHEDULES, SteeringRequest, SteeringSpecError  # noqa: F401

# The keywords (beyond the model and the SAE) that every attach function
# accepts with the same meaning and defaults; backends add their own after them.
ATTACH_KEYWORDS = dict(spec=None, layer=None, layers=None, features=None, mode=DEFAULT_MODE,
                       max_activations=None, strengths=None, strength_scale=1.0,
                       min_strength=-5.0, max_strength=5.0, topk_mode="exact", name=None)


def spec_from_kwargs(spec: Union[SteeringSpec, Mapping[str, Any], None] = None, *,
                     features: Optional[Sequence[int]] = None, mode: str = DEFAULT_MODE,
                     max_activations: Any = None, strengths: Any = None,
                     strength_scale: float = 1.0, min_strength: float = -5.0,
                     max_strength: float = 5.0, topk_mode: str = "exact") -> SteeringSpec:
    """The spec of an attach call: ``spec`` (a SteeringSpec, or a dict in any
    spelling of the alias table) or the keyword form (``features`` and the
    rest), not both."""
    if spec is not None:
        if features is not None:
            raise SteeringSpecError("give spec=... or features=[...], not both")
        return SteeringSpec.from_dict(dict(spec)) if isinstance(spec, Mapping) else spec
    if features is None:
        raise SteeringSpecError("attach needs features=[...] (or spec=...)")
    return SteeringSpec(features=list(features), mode=mode, max_activations=max_activations,
                        strengths=strengths, strength_scale=strength_scale,
                        min_strength=min_strength, max_strength=max_strength, topk_mode=topk_mode)


def layers_from(layer: Optional[int], layers: Optional[Sequence[int]]) -> Optional[list[int]]:
    """``layer`` or ``layers`` as a list (None: the SAE's own hook layer)."""
    if layer is not None and layers is not None:
        raise SteeringSpecError("give layer or layers, not both")
    return [layer] if layer is not None else (list(layers) if layers is not None else None)


@dataclass
class AttachedSAE:
    """One attached SAE: its name, the decoder layers it steers and its
    compact plan (spec included). ``tables`` holds the per-layer device
    tables where the backend keeps them with the record (HF); the vLLM
    driver and admission hook keep only this record, its workers the slots."""

    name: str
    layers: list[int]
    plan: SteeringPlan
    uid: str = ""
    tables: list[SteeringTables] = field(default_factory=list, repr=False)
    _host: SteeringTables = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._host = SteeringTables(self.plan, max_rows=1, max_tokens=1)

    @property
    def spec(self) -> SteeringSpec:
        return self.plan.spec

    @property
    def k(self) -> int:
        return self.plan.k

    @property
    def features(self) -> list[int]:
        return list(self.plan.spec.features)

    def row(self, request: Union[SteeringRequest, Mapping[str, Any]]
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """Validated host rows (strengths [k] fp32, modes [k] int8) of one
        request: bounded to the spec's range, scaled, ready to write."""
        kw = SteeringRequest.parse(request).row_kwargs()
        mode = kw.get("mode")
        if mode is not None:
            attached = self.plan.spec.mode
            if mode == "clamp_direction" and attached != "clamp_direction":
                raise SteeringSpecError(
                    f"mode='clamp_direction' needs the SAE {self.name!r} attached with "
                    f"mode='clamp_direction' (it was attached with mode={attached!r})")
            if attached == "clamp_direction":
                kw["mode"] = "set"
        return self._host.row_values(**kw)


def resolve_request(entries: list, groups: Mapping[str, AttachedSAE]
                    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{group name: (strengths [k], modes [k])} for one request's entries.
    Raises SteeringSpecError naming the bad value."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for entry in entries:
        req = SteeringRequest.parse(entry)
        name = req.group
        if name is None:
            if not groups:
                raise SteeringSpecError("the request carries SAE steering but no SAE is attached "
                                        "to this engine (sae_fast.vllm.attach, or 'saes' in "
                                        "additional_config['sae_fast'])")
            if len(groups) > 1:
                raise SteeringSpecError(f"several SAEs are attached ({sorted(groups)}); name one "
                                        "with a 'group' key (sae_group) in each steering entry")
            name = next(iter(groups))
        group = groups.get(name)
        if group is None:
            raise SteeringSpecError(f"steering group {name!r} is not attached "
                                    f"(attached: {sorted(groups)})")
        if name in out:
            raise SteeringSpecError(f"the request steers group {name!r} twice")
        try:
            out[name] = group.row(req)
        except SteeringSpecError as err:
            raise SteeringSpecError(f"SAE {name!r}: {err}") from None
    return out
_LAYER_PATHS = ("model.layers", "model.decoder.layers", "model.language_model.layers",
                "transformer.h", "gpt_neox.layers", "transformer.layers")


class UnsupportedModelError(TypeError):
    """The model's decoder layers could not be located."""


def find_submodule(model: nn.Module, paths: Sequence[str], accept: Any) -> Optional[Any]:
    """The first dotted attribute path of ``paths`` on ``model`` whose value
    ``accept(value)`` takes (None if none does)."""
    for path in paths:
        obj: Any = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if obj is not None and accept(obj):
            return obj
    return None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder layers of a transformers causal LM."""
    found = find_submodule(model, _LAYER_PATHS,
                           lambda m: isinstance(m, nn.ModuleList) and len(m) > 0)
    if found is not None:
        return found
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
