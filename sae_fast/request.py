"""The steering vocabulary: one typed request model and one alias table,
used by the HF backend, the vLLM backend (and its server), the config's
``sae:`` block, ``SteeringSpec.from_dict`` and the CLI.

A request names *what to steer and how hard*:

    features          SAE feature indices        (SPEC: feature_idx / feature_idxs,
                                                  selected_features)
    strengths         one per feature, or one for all (the global intervention)
    max_activations   per-feature targets of set/clamp (SPEC: max_activation(s))
    mode              add | set (alias clamp) | scale | ablate | clamp_direction
    strength_scale    global scale g
    group             which attached SAE (when several are attached)
    schedule          constant | linear | cosine over the generated tokens

Requests travel as metadata (HF ``set_requests``) or in vLLM's
``SamplingParams.extra_args`` (an OpenAI request's ``vllm_xargs`` becomes
``extra_args``), in these forms:

* nested: ``{"sae": {"features": [3], "strengths": [2.0], "mode": "set"}}``,
  or ``{"sae": [{"group": "a", ...}, {"group": "b", ...}]}`` for several SAEs;
* the same nested value as a JSON string, ``{"sae": "{\\"features\\": [3]}"}``
  (OpenAI's ``vllm_xargs`` schema allows no nested objects);
* flat keys at the top level, as ``vllm_xargs`` can carry them:
  ``sae_features``, ``sae_strengths``, ``sae_mode``, ``sae_strength_scale``,
  ``sae_max_activations``, ``sae_group``, and the SPEC keys
  ``sae_feature_idx``, ``sae_max_activation``.

Numbers may be given as strings (``"2.5"``, ``"3"``); feature indices must be
integers (``3.7`` and ``"3.7"`` are refused, never truncated). NaN/inf
strengths are refused where the strengths row is built, naming the value.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Mapping, Optional, get_args

# The typed vocabulary (pydantic models use the Literal types; code uses the tuples).
Mode = Literal["add", "set", "clamp", "scale", "ablate", "clamp_direction"]
TopKMode = Literal["exact", "approx_relu"]
Schedule = Literal["constant", "linear", "cosine"]
MODES: tuple[str, ...] = get_args(Mode)
TOPK_MODES: tuple[str, ...] = get_args(TopKMode)
SCHEDULES: tuple[str, ...] = get_args(Schedule)
DEFAULT_MODE: Mode = "set"  # the one default of SteeringSpec, both attaches, the config and the CLI
REQUEST_KEY = "sae"


class SteeringSpecError(ValueError):
    """An intervention spec, a steering request or a strengths vector is invalid."""


# The one alias table: every accepted spelling -> the field of SteeringRequest.
ALIASES: dict[str, str] = {
    "features": "features", "feature_idx": "features", "feature_idxs": "features",
    "selected_features": "features", "sae_feature_idx": "features", "sae_features": "features",
    "strengths": "strengths", "strength": "strengths", "sae_strengths": "strengths",
    "max_activations": "max_activations", "max_activation": "max_activations",
    "sae_max_activation": "max_activations", "sae_max_activations": "max_activations",
    "mode": "mode", "sae_mode": "mode",
    "strength_scale": "strength_scale", "sae_strength_scale": "strength_scale",
    "group": "group", "sae_group": "group",
    "schedule": "schedule", "strength_schedule": "schedule", "sae_strength_schedule": "schedule",
}
# Keys that may appear at the top level of extra_args (flat form).
FLAT_KEYS = tuple(k for k in ALIASES if k.startswith("sae_"))

_INT = re.compile(r"^[+-]?\d+$")


def canonical(meta: Mapping[str, Any], extra: Iterable[str] = (), what: str = "steering request"
              ) -> dict[str, Any]:
    """``meta`` with its keys mapped through :data:`ALIASES` (``extra``: keys
    the caller accepts as they are). Unknown keys and a field given twice are
    errors naming the key."""
    extra = tuple(extra)
    out: dict[str, Any] = {}
    given: dict[str, str] = {}
    for key, value in meta.items():
        name = ALIASES.get(key, key if key in extra else None)
        if name is None:
            raise SteeringSpecError(f"unknown {what} key {key!r}; expected one of "
                                    f"{', '.join(sorted((*ALIASES, *extra)))}")
        if name in out:
            raise SteeringSpecError(f"{what} gives {name} twice (keys {given[name]!r} and {key!r})")
        out[name] = value
        given[name] = key
    return out


def request_entries(extra_args: Optional[Mapping[str, Any]]) -> list[dict]:
    """The raw steering entries of a request ([] = unsteered)."""
    if not extra_args:
        return []
    if not isinstance(extra_args, Mapping):
        raise SteeringSpecError(f"extra_args must be a dict, got {type(extra_args).__name__}")
    flat = {k: v for k, v in extra_args.items() if k in FLAT_KEYS}
    raw = extra_args.get(REQUEST_KEY)
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as err:
            raise SteeringSpecError(f"extra_args[{REQUEST_KEY!r}] = {raw!r} is not valid JSON "
                                    f"({err.msg} at char {err.pos})") from err
    if raw is None or raw is False:
        return [flat] if flat else []
    if flat:
        raise SteeringSpecError(f"give the steering either as extra_args[{REQUEST_KEY!r}] or as "
                                f"the flat keys {', '.join(sorted(flat))}, not both")
    if isinstance(raw, Mapping):
        return [dict(raw)]
    if isinstance(raw, (list, tuple)) and all(isinstance(e, Mapping) for e in raw):
        return [dict(e) for e in raw]
    raise SteeringSpecError(f"extra_args[{REQUEST_KEY!r}] must be a dict (or a list of dicts "
                            f"with a 'group' key each, or either as a JSON string), got {raw!r}")


def feature_index(value: Any, where: str = "feature") -> int:
    """An integer feature index from an int, an integral float or a string of
    digits; anything else (3.7, "3.7", True, None) is refused."""
    if isinstance(value, bool):
        raise SteeringSpecError(f"{where} = {value!r} is not an integer feature index")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, str) and _INT.match(value.strip()):
        return int(value.strip())
    raise SteeringSpecError(f"{where} = {value!r} is not an integer feature index")


def feature_list(value: Any, where: str = "features") -> list[int]:
    feats = list(value) if isinstance(value, (list, tuple)) else [value]
    if not feats:
        raise SteeringSpecError(f"{where} is empty; select at least one SAE feature")
    return [feature_index(f, f"{where}[{i}]") for i, f in enumerate(feats)]


def number(value: Any, where: str) -> float:
    """A float from a number or a numeric string ("2.5", "inf": finiteness is
    checked where strengths rows are built, so the message names the value)."""
    if isinstance(value, bool):
        raise SteeringSpecError(f"{where} = {value!r} is not a number")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise SteeringSpecError(f"{where} = {value!r} is not a number")


def _numbers(value: Any, where: str) -> Any:
    if value is None or hasattr(value, "tolist") and not isinstance(value, (list, tuple)):
        return value  # None or a tensor: validated where the row is built
    if isinstance(value, (list, tuple)):
        return [number(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return number(value, where)


def _choice(value: Any, where: str, allowed: tuple) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise SteeringSpecError(f"{where}={value!r} is not one of {', '.join(allowed)}")
    return value


@dataclass(frozen=True)
class SteeringRequest:
    """One steering entry, typed and checked. ``None`` = not given (the
    attached SAE's spec decides)."""

    features: Optional[list[int]] = None
    strengths: Any = None  # a number, a list (one per feature) or a tensor
    max_activations: Any = None
    mode: Optional[str] = None
    strength_scale: Optional[float] = None
    group: Optional[str] = None
    schedule: Optional[str] = None

    @classmethod
    def parse(cls, meta: Mapping[str, Any]) -> "SteeringRequest":
        """From any accepted spelling (see :data:`ALIASES`), types coerced and
        checked; errors name the key and the value."""
        if isinstance(meta, SteeringRequest):
            return meta
        if not isinstance(meta, Mapping):
            raise SteeringSpecError(f"a steering request must be a dict, got {meta!r}")
        kw = canonical(meta)
        if "features" in kw:
            kw["features"] = feature_list(kw["features"])
            if kw.get("strengths") is None:
                kw["strengths"] = 1.0
        for name in ("strengths", "max_activations"):
            if name in kw:
                kw[name] = _numbers(kw[name], name)
        if kw.get("strength_scale") is not None:
            kw["strength_scale"] = number(kw["strength_scale"], "strength_scale")
        if kw.get("mode") is not None:
            if not isinstance(kw["mode"], str):
                raise SteeringSpecError(f"mode = {kw['mode']!r} is not a mode name")
            _choice(kw["mode"], "mode", MODES)
        if kw.get("group") is not None and not isinstance(kw["group"], str):
            raise SteeringSpecError(f"group = {kw['group']!r} is not an SAE group name")
        if kw.get("schedule") is not None:
            _choice(kw["schedule"], "schedule", SCHEDULES)
        n = len(kw.get("features") or ())
        for name in ("strengths", "max_activations"):
            vals = kw.get(name)
            if n and isinstance(vals, list) and len(vals) not in (1, n):
                raise SteeringSpecError(f"{name} has {len(vals)} values for {n} features "
                                        f"{kw['features']}")
        return cls(**kw)

    def row_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``SteeringTables.row_values`` for this request.
        A per-request schedule is refused: the schedule is chosen when the SAE
        is attached (``strength_schedule``), for every row of a batch."""
        if self.schedule is not None:
            raise SteeringSpecError(f"schedule={self.schedule!r} per request is not supported: "
                                    "a strength schedule is set when the SAE is attached "
                                    "(attach(..., strength_schedule=...) / sae.strength_schedule)")
        kw = {"strengths": self.strengths, "features": self.features, "mode": self.mode,
              "scale": self.strength_scale, "max_activation": self.max_activations}
        return {k: v for k, v in kw.items() if v is not None}
