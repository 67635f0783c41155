"""Driver -> worker plan transport: plain data (msgpack-safe, no pickling):
JSON-able metadata plus the plan tensors as ``safetensors`` bytes."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from sae_fast.plan import PlanSource, SteeringPlan, SteeringSpec
from sae_fast.sae import SAEWeights

PLAN_TENSORS = ("features", "enc_w", "enc_b", "threshold", "dec_w", "max_act", "default_strengths")


def plan_payload(plan: SteeringPlan, sae: SAEWeights) -> dict:
    spec = plan.spec
    # clone: some plans share storage (clamp_direction: enc_w is dec_w), safetensors refuses that
    tensors = {n: getattr(plan, n).detach().to("cpu").contiguous().clone() for n in PLAN_TENSORS}
    return {
        "spec": {"features": list(spec.features), "mode": spec.mode,
                 "max_activations": spec.max_activations, "strengths": spec.strengths,
                 "strength_scale": spec.strength_scale, "min_strength": spec.min_strength,
                 "max_strength": spec.max_strength, "topk_mode": spec.topk_mode},
        "sae": {"architecture": sae.architecture, "d_in": sae.d_in, "d_sae": sae.d_sae,
                "k": sae.k, "source": str(sae.source)},
        "activation": int(plan.activation), "mode_code": int(plan.mode_code),
        "tensors": st_save(tensors),
    }


def plan_from_payload(p: Mapping[str, Any]) -> SteeringPlan:
    t = st_load(bytes(p["tensors"]))
    missing = [n for n in PLAN_TENSORS if n not in t]
    if missing:
        raise ValueError(f"plan payload lacks tensors {missing}")
    return SteeringPlan(spec=SteeringSpec(**p["spec"]), sae=PlanSource(**p["sae"]),
                        activation=int(p["activation"]), mode_code=int(p["mode_code"]),
                        **{n: t[n] for n in PLAN_TENSORS})
