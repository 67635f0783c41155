"""Attached SAEs ("groups") of a vLLM engine: the one record type used by the
driver, the request-admission hook and every worker, plus request
resolution (entries -> validated host rows) and the prefix-cache salt."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, Union

import torch

from sae_fast.backends.common import resolve_layer
from sae_fast.backends.requests import request_row_kwargs
from sae_fast.backends.tables import SteeringTables
from sae_fast.ops import codes
from sae_fast.plan import SteeringPlan, SteeringSpec, SteeringSpecError, build_plan
from sae_fast.sae import SAEWeights, load_sae

DEFAULT_MAX_FEATURES = 32


@dataclass
class AttachedSAE:
    """One attached SAE (spec + compact host plan) at one or more layers."""

    name: str
    uid: str
    layers: list[int]
    plan: SteeringPlan  # host fp32 copy of the selected features
    rows: SteeringTables = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.rows = SteeringTables(self.plan, max_rows=1, max_tokens=1)

    @property
    def k(self) -> int:
        return self.plan.k

    def row(self, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Validated host rows (strengths [k] fp32, modes [k] int8) of one request."""
        mode = kwargs.get("mode")
        if mode is not None:
            attached = self.plan.spec.mode
            if mode == "clamp_direction" and attached != "clamp_direction":
                raise SteeringSpecError(
                    f"mode='clamp_direction' needs the SAE {self.name!r} attached with "
                    f"mode='clamp_direction' (it was attached with mode={attached!r})")
            if attached == "clamp_direction" and mode == "clamp_direction":
                kwargs = {**kwargs, "mode": "set"}
        return self.rows.row_values(**kwargs)


def resolve_request(entries: list[dict], groups: Mapping[str, AttachedSAE]
                    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{group name: (strengths [k], modes [k])} for one request's entries.
    Raises SteeringSpecError naming the bad value."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for entry in entries:
        kw = request_row_kwargs(entry)
        name = kw.pop("group", None)
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
            out[name] = group.row(kw)
        except SteeringSpecError as err:
            raise SteeringSpecError(f"SAE {name!r}: {err}") from None
    return out


def steering_fingerprint(values: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                         groups: Mapping[str, AttachedSAE], epoch: int) -> str:
    """Stable hash of a request's effective steering (prefix-cache salt)."""
    h = hashlib.sha256(f"sae_fast/{epoch}".encode())
    for name in sorted(values):
        s, m = values[name]
        h.update(name.encode())
        h.update(groups[name].uid.encode())
        h.update(s.numpy().tobytes())
        h.update(m.numpy().tobytes())
    return h.hexdigest()[:32]


def combine_salt(user_salt: Optional[str], fingerprint: str) -> str:
    ours = f"sae_fast:{fingerprint}"
    return ours if not user_salt else f"{user_salt}|{ours}"


def prepare_group(sae: Union[SAEWeights, str, Any], spec: SteeringSpec, *, name: str, uid: str,
                  layers: Optional[Sequence[int]], num_layers: int, hidden_size: int,
                  max_features: Optional[int], steerable: Optional[Sequence[int]]
                  ) -> tuple[AttachedSAE, SAEWeights]:
    """Load ``sae`` on the host, resolve and check its layers, build its fp32
    plan and refuse what the compiled vLLM graph cannot run. Every error
    names the SAE and the value."""
    weights = load_sae(sae, device="cpu")
    if layers is None:
        layers = [weights.default_layer()]
    resolved: list[int] = []
    for x in layers:
        idx = resolve_layer(x, num_layers)
        if idx not in resolved:
            resolved.append(idx)
    for idx in resolved:
        weights.check_hidden_size(hidden_size, layer=idx)
    if steerable is not None:
        missing = [x for x in resolved if x not in steerable]
        if missing:
            raise SteeringSpecError(
                f"SAE {name!r}: layer(s) {missing} have no steering slot in this engine "
                f"(slots at: {sorted(steerable)}); create it with "
                "sae_fast.vllm.engine_args(layers=[...]) or list the SAE in "
                "additional_config['sae_fast']['saes']")
    plan = build_plan(weights, spec, device="cpu", dtype=torch.float32)
    if plan.activation == codes.ACT_TOPK:
        raise SteeringSpecError(
            f"SAE {name!r}: exact TopK steering in mode={spec.mode!r} needs a full SAE encode of "
            f"every token (d_sae={weights.d_sae}), which the vLLM backend's fixed compiled graph "
            "does not run; attach with topk_mode='approx_relu' (approximate: features act as "
            "ReLU) or mode='add'")
    if max_features is not None and plan.k > int(max_features):
        raise SteeringSpecError(
            f"SAE {name!r}: {plan.k} features exceed this engine's max_features={max_features} "
            "per layer; create it with sae_fast.vllm.engine_args(max_features=...)")
    return AttachedSAE(name=name, uid=uid, layers=resolved, plan=plan), weights
