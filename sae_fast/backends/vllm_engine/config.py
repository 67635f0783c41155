"""The ``sae_fast`` block of vLLM's ``additional_config``: slot capacity and
the SAEs every worker attaches when the model loads (servers, verl rollout
servers, any engine built from arguments alone).

    --additional-config '{"sae_fast": {"saes": [
        {"name": "style", "path": "/sae/folder", "layer": 12,
         "features": [3, 7], "mode": "set", "max_activations": [8, 8]}]}}'

``saes`` may also be the path of a YAML or JSON file holding that list.
Unknown keys are errors naming the dotted key (pydantic models,
``extra="forbid"``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from sae_fast.backends.common import layers_from, spec_from_kwargs
from sae_fast.plan import SteeringSpec
from sae_fast.request import DEFAULT_MODE, Mode, SteeringSpecError, TopKMode

CONFIG_KEY = "sae_fast"  # key in VllmConfig.additional_config (part of vLLM's compile-cache key)



class SAEEntry(BaseModel):
    """One SAE attached at engine start."""

    model_config = ConfigDict(extra="forbid")

    name: Optional[str] = None
    path: str
    layer: Optional[int] = None
    layers: Optional[list[int]] = None
    features: list[int] = Field(min_length=1)
    mode: Mode = DEFAULT_MODE
    max_activations: Optional[list[float]] = None
    strengths: Optional[list[float]] = None
    strength_scale: float = 1.0
    min_strength: float = -5.0
    max_strength: float = 5.0
    topk_mode: TopKMode = "exact"

    def layer_list(self) -> Optional[list[int]]:
        try:
            return layers_from(self.layer, self.layers)
        except SteeringSpecError as err:
            raise SteeringSpecError(f"SAE {self.name!r}: {err}") from None

    def spec(self) -> SteeringSpec:
        """The entry's steering fields (the attach vocabulary) as a SteeringSpec."""
        return spec_from_kwargs(**self.model_dump(exclude={"name", "path", "layer", "layers"}))

    def fingerprint(self) -> str:
        return json.dumps(self.model_dump(), sort_keys=True)


class ServeConfig(BaseModel):
    """``additional_config["sae_fast"]``."""

    model_config = ConfigDict(extra="forbid")

    max_features: Optional[int] = Field(default=None, ge=1)
    layers: Optional[list[int]] = None
    max_rows: Optional[int] = Field(default=None, ge=1)
    saes: list[SAEEntry] = Field(default_factory=list)
    salt_prefix_cache: bool = True
    stats_log_interval_s: float = Field(default=60.0, ge=0)
    stats_dir: Optional[str] = None  # each worker also writes its stats() there as JSON

    @field_validator("saes", mode="before")
    @classmethod
    def _load_file(cls, value: Any) -> Any:
        if isinstance(value, (str, Path)):
            return load_saes_file(value)
        return value

    def named_saes(self) -> list[SAEEntry]:
        """Entries with their names filled in (``sae0``, ``sae1``, ... by
        position) and checked unique."""
        out, seen = [], set()
        for i, e in enumerate(self.saes):
            name = e.name or f"sae{i}"
            if name in seen:
                raise SteeringSpecError(f"additional_config.sae_fast.saes[{i}]: the name "
                                        f"{name!r} is used twice")
            seen.add(name)
            out.append(e.model_copy(update={"name": name}))
        return out


def _read(path: Union[str, Path]) -> Any:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as err:
        raise SteeringSpecError(f"additional_config.sae_fast.saes: cannot read {str(p)!r} "
                                f"({err.strerror or err})") from None
    if p.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise SteeringSpecError(f"additional_config.sae_fast: {str(p)!r} is not valid JSON "
                                    f"({err.msg}, line {err.lineno})") from None
    return data


def _read_block(path: Union[str, Path]) -> dict:
    data = _read(path)
    return data if isinstance(data, dict) else {"saes": data}


def load_saes_file(path: Union[str, Path]) -> Any:
    p = Path(path)
    data = _read(p)
    if isinstance(data, dict) and "saes" in data:
        data = data["saes"]
    if not isinstance(data, list):
        raise SteeringSpecError(f"additional_config.sae_fast.saes: {str(p)!r} holds a "
                                f"{type(data).__name__}, expected a list of SAE entries")
    return data


def _describe(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e.get("loc", ()))
        msg = e.get("msg", "invalid")
        if e.get("type") == "extra_forbidden":
            parts.append(f"additional_config.sae_fast.{loc}: unknown key")
        else:
            parts.append(f"additional_config.sae_fast.{loc} = {e.get('input')!r}: {msg}")
    return "; ".join(parts)


def parse(raw: Any) -> ServeConfig:
    """The validated ``sae_fast`` block (a dict, a ServeConfig, or a path to a
    YAML/JSON file holding the block). Raises SteeringSpecError naming the key."""
    if isinstance(raw, ServeConfig):
        return raw
    if raw is None:
        raw = {}
    if isinstance(raw, (str, Path)):
        raw = _read_block(raw)
    if not isinstance(raw, dict):
        raise SteeringSpecError(f"additional_config.sae_fast = {raw!r}: expected a dict")
    try:
        return ServeConfig.model_validate(raw)
    except ValidationError as err:
        raise SteeringSpecError(_describe(err)) from None
