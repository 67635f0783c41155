"""Per-request steering: one parser and one alias table for both backends.

A request carries its steering as metadata (HF ``set_requests``) or in vLLM's
``SamplingParams.extra_args`` (an OpenAI request's ``vllm_xargs`` becomes
``extra_args``). Accepted forms:

* nested: ``{"sae": {"features": [3], "strengths": [2.0], "mode": "set"}}``,
  or ``{"sae": [{"group": "a", ...}, {"group": "b", ...}]}`` for several SAEs;
* the same nested value as a JSON string, ``{"sae": "{\\"features\\": [3]}"}``
  (OpenAI's ``vllm_xargs`` schema allows no nested objects);
* flat keys at the top level, as ``vllm_xargs`` can carry them:
  ``sae_features``, ``sae_strengths``, ``sae_mode``, ``sae_strength_scale``,
  ``sae_max_activations``, ``sae_group``, and the SPEC keys
  ``sae_feature_idx``, ``sae_max_activation``, ``sae_strength_scale``.

Numbers may be given as strings (``"2.5"``, ``"3"``); feature indices must be
integers (``3.7`` and ``"3.7"`` are refused, never truncated). NaN/inf
strengths are refused later, where the strengths row is built.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Mapping, Optional

from sae_fast.plan import SteeringSpecError

REQUEST_KEY = "sae"

# The one alias table: request key -> canonical name. Canonical names are the
# keyword arguments of ``SteeringTables.row_values`` plus ``group``.
ALIASES: dict[str, str] = {
    "features": "features", "feature_idx": "features", "feature_idxs": "features",
    "sae_feature_idx": "features", "sae_features": "features",
    "strengths": "strengths", "strength": "strengths", "sae_strengths": "strengths",
    "mode": "mode", "sae_mode": "mode",
    "strength_scale": "scale", "sae_strength_scale": "scale",
    "max_activations": "max_activation", "max_activation": "max_activation",
    "sae_max_activation": "max_activation", "sae_max_activations": "max_activation",
    "group": "group", "sae_group": "group",
}
# Keys that may appear at the top level of extra_args (flat form).
FLAT_KEYS = tuple(k for k in ALIASES if k.startswith("sae_"))

_INT = re.compile(r"^[+-]?\d+$")


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


def request_row_kwargs(meta: Mapping[str, Any]) -> dict:
    """Canonical row kwargs (features, strengths, mode, scale, max_activation,
    group) of one steering entry, with types coerced and checked."""
    kw: dict[str, Any] = {}
    for key, value in meta.items():
        name = ALIASES.get(key)
        if name is None:
            raise SteeringSpecError(
                f"unknown steering request key {key!r}; expected one of "
                f"{', '.join(sorted(ALIASES))}")
        if name in kw:
            raise SteeringSpecError(f"steering request gives {name} twice (key {key!r})")
        kw[name] = value
    if "features" in kw:
        feats = kw["features"]
        feats = list(feats) if isinstance(feats, (list, tuple)) else [feats]
        if not feats:
            raise SteeringSpecError("features is empty; select at least one SAE feature")
        kw["features"] = [feature_index(f, f"features[{i}]") for i, f in enumerate(feats)]
        kw.setdefault("strengths", 1.0)
    for name in ("strengths", "max_activation"):
        if name in kw:
            kw[name] = _numbers(kw[name], name)
    if "scale" in kw:
        kw["scale"] = number(kw["scale"], "strength_scale")
    if "mode" in kw and not isinstance(kw["mode"], str):
        raise SteeringSpecError(f"mode = {kw['mode']!r} is not a mode name")
    if "group" in kw and not isinstance(kw["group"], str):
        raise SteeringSpecError(f"group = {kw['group']!r} is not an SAE group name")
    n = len(kw.get("features") or ())
    for name in ("strengths", "max_activation"):
        vals = kw.get(name)
        if n and isinstance(vals, list) and len(vals) not in (1, n):
            raise SteeringSpecError(f"{name} has {len(vals)} values for {n} features "
                                    f"{kw['features']}")
    return kw
