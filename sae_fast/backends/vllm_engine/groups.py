"""Attached SAEs ("groups") of a vLLM engine: preparing one for the compiled
graph, and the prefix-cache salt of a request's steering. The record
(:class:`AttachedSAE`) and request resolution are backend-neutral
(``sae_fast.backends.common``), shared with the HF backend."""

from __future__ import annotations

import hashlib
from typing import Any, Mapping, Optional, Sequence, Union

import torch

from sae_fast.backends.common import AttachedSAE, resolve_layer
from sae_fast.ops import codes
from sae_fast.plan import SteeringSpec, SteeringSpecError, build_plan
from sae_fast.sae import SAEWeights, load_sae

DEFAULT_MAX_FEATURES = 32


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
