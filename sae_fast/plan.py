"""Steering plans: an intervention spec turned into compact device tensors for
the selected features only. Built once per configuration, never per step; a
plan knows nothing about models.

Spec keys (SPEC section 2; the ``sae:`` block and request metadata use them):

    mode             add | set (alias clamp) | scale | ablate | clamp_direction
    feature_idx      one feature            (with max_activation, strength_scale)
    feature_idxs     several features       (with max_activations, strengths)
    strengths        per-feature default strengths (default 1.0 each)
    strength_scale   global scale g applied to every strength
    min_strength / max_strength   bounds applied to every strength before g
    topk_mode        exact (default) | approx_relu   (TopK SAEs only)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence, Union

import torch

from sae_fast import ops
from sae_fast.checks import finite
from sae_fast.ops import codes
from sae_fast.request import (DEFAULT_MODE, MODES, TOPK_MODES, SteeringSpecError,  # noqa: F401
                              canonical, feature_list)
from sae_fast.sae import SAEWeights

SPEC_ONLY_KEYS = ("min_strength", "max_strength", "topk_mode")


def _finite(name: str, values: Sequence[float]) -> list[float]:
    return finite(list(values), name, SteeringSpecError, what=name)


@dataclass
class SteeringSpec:
    """What to steer: features, mode, per-feature targets and strengths."""

    features: list[int]
    mode: str = DEFAULT_MODE
    max_activations: Optional[list[float]] = None
    strengths: Optional[list[float]] = None
    strength_scale: float = 1.0
    min_strength: float = -5.0
    max_strength: float = 5.0
    topk_mode: str = "exact"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise SteeringSpecError(f"mode={self.mode!r} is not one of {', '.join(MODES)}")
        if self.topk_mode not in TOPK_MODES:
            raise SteeringSpecError(f"topk_mode={self.topk_mode!r} is not one of {', '.join(TOPK_MODES)}")
        feats = list(self.features) if isinstance(self.features, (list, tuple)) else [self.features]
        if not feats:
            raise SteeringSpecError("features is empty; select at least one SAE feature")
        for i, f in enumerate(feats):
            if isinstance(f, bool) or not isinstance(f, (int,)) and not (
                    isinstance(f, float) and f.is_integer()):
                raise SteeringSpecError(f"features[{i}] = {f!r} is not an integer feature index")
        feats = [int(f) for f in feats]
        n = len(feats)
        for name in ("max_activations", "strengths"):
            vals = getattr(self, name)
            if vals is None:
                continue
            vals = list(vals) if isinstance(vals, (list, tuple)) else [vals]
            if len(vals) == 1 and n > 1:
                vals = vals * n
            if len(vals) != n:
                raise SteeringSpecError(f"{name} has {len(vals)} values for {n} features {feats}")
            setattr(self, name, _finite(name, vals))
        (self.strength_scale, self.min_strength, self.max_strength) = _finite(
            "strength_scale/min_strength/max_strength",
            [self.strength_scale, self.min_strength, self.max_strength])
        if self.min_strength > self.max_strength:
            raise SteeringSpecError(f"min_strength={self.min_strength} > max_strength={self.max_strength}")
        # Merge exact duplicates; reject duplicates with conflicting values.
        seen: dict[int, int] = {}
        keep = []
        for i, f in enumerate(feats):
            if f in seen:
                j = seen[f]
                for name in ("max_activations", "strengths"):
                    vals = getattr(self, name)
                    if vals is not None and vals[i] != vals[j]:
                        raise SteeringSpecError(
                            f"feature {f} is listed twice with different {name} "
                            f"({vals[j]} and {vals[i]})")
                continue
            seen[f] = i
            keep.append(i)
        self.features = [feats[i] for i in keep]
        for name in ("max_activations", "strengths"):
            vals = getattr(self, name)
            if vals is not None:
                setattr(self, name, [vals[i] for i in keep])

    @property
    def k(self) -> int:
        return len(self.features)

    @classmethod
    def from_dict(cls, d: dict[str, Any], defaults: Optional[dict[str, Any]] = None) -> "SteeringSpec":
        """Build from config/request keys (any spelling of :data:`sae_fast.request.ALIASES`,
        plus min_strength / max_strength / topk_mode), e.g.
        ``{"feature_idx": 3, "max_activation": 8.0, "strength_scale": 2.0}`` or
        ``{"feature_idxs": [1, 5], "max_activations": [4, 6], "strengths": [1, -1]}``."""
        kw = canonical(d, SPEC_ONLY_KEYS, what="steering spec")
        if defaults:
            kw = {**canonical(defaults, SPEC_ONLY_KEYS, what="steering spec"), **kw}
        for key in ("group", "schedule"):
            if kw.get(key) is not None:
                raise SteeringSpecError(f"{key}={kw[key]!r} is not part of a steering spec: name the "
                                        "group when attaching (name=...), the schedule with "
                                        "strength_schedule=...")
            kw.pop(key, None)
        if kw.get("features") is None:
            raise SteeringSpecError("no features selected: set features (feature_idx / feature_idxs)")
        kw["features"] = feature_list(kw["features"])
        if kw.get("mode") is None:
            kw.pop("mode", None)
        return cls(**kw)


@dataclass(frozen=True)
class PlanSource:
    """What a plan needs to know about its SAE when the weights stay elsewhere
    (a plan sent to a vLLM worker)."""

    architecture: str
    d_in: int
    d_sae: int
    k: Optional[int]
    source: str


@dataclass
class SteeringPlan:
    """Compact device tensors for one SAE's selected features.

    ``strengths`` rows and ``modes`` rows built by :meth:`strength_row` /
    :meth:`modes_row` feed the ops; ``apply_`` runs one step.
    """

    spec: SteeringSpec
    sae: Union[SAEWeights, "PlanSource", None]  # None: a capacity plan (columns filled later)
    features: torch.Tensor  # [k] int64
    enc_w: torch.Tensor  # [k, d]
    enc_b: torch.Tensor  # [k] fp32
    threshold: torch.Tensor  # [k] fp32
    dec_w: torch.Tensor  # [k, d]
    max_act: torch.Tensor  # [k] fp32
    default_strengths: torch.Tensor  # [k] fp32 (unbounded, unscaled)
    activation: int
    mode_code: int
    full_enc: Optional[tuple] = field(default=None, repr=False)  # (W_enc, b_enc_eff) for exact TopK

    @property
    def k(self) -> int:
        return int(self.features.numel())

    @property
    def d(self) -> int:
        return int(self.enc_w.shape[1])

    @property
    def device(self) -> torch.device:
        return self.enc_w.device

    @property
    def dtype(self) -> torch.dtype:
        return self.enc_w.dtype

    @property
    def needs_encode(self) -> bool:
        return self.spec.mode != "add"

    # ---- capacity plans: fixed-size tables whose columns are filled later
    @classmethod
    def capacity(cls, k: int, d: int, *, dtype: torch.dtype = torch.float32,
                 device: Union[str, torch.device] = "cpu") -> "SteeringPlan":
        """An empty plan of ``k`` all-zero columns (every column off): persistent
        buffers a backend allocates once, before any graph capture, and then
        fills with :meth:`write_columns` / empties with :meth:`clear_columns`."""
        f32 = dict(dtype=torch.float32, device=device)
        return cls(spec=SteeringSpec(features=list(range(k)), mode="set"), sae=None,
                   features=torch.arange(k, device=device),
                   enc_w=torch.zeros(k, d, dtype=dtype, device=device),
                   enc_b=torch.zeros(k, **f32), threshold=torch.zeros(k, **f32),
                   dec_w=torch.zeros(k, d, dtype=dtype, device=device),
                   max_act=torch.zeros(k, **f32), default_strengths=torch.zeros(k, **f32),
                   activation=codes.ACT_THRESHOLD_RELU, mode_code=codes.MODE_SET)

    def write_columns(self, cols: torch.Tensor, plan: "SteeringPlan") -> None:
        """Copy ``plan``'s features into columns ``cols`` of this capacity plan,
        in place (same tensors, so graphs that captured them see the change).
        A clamp_direction plan (identity activation) is stored with a -inf
        threshold: the thresholded-ReLU columns then pass the projection as is."""
        thr = plan.threshold
        if plan.activation == codes.ACT_IDENTITY:
            thr = torch.full_like(thr, float("-inf"))
        elif plan.activation != codes.ACT_THRESHOLD_RELU:
            raise SteeringSpecError(f"activation {codes.ACT_NAMES.get(plan.activation)} cannot be "
                                    "written into a capacity plan (thresholded ReLU columns)")
        dev = self.device
        self.enc_w.index_copy_(0, cols, plan.enc_w.to(device=dev, dtype=self.enc_w.dtype))
        self.dec_w.index_copy_(0, cols, plan.dec_w.to(device=dev, dtype=self.dec_w.dtype))
        for name, src in (("enc_b", plan.enc_b), ("threshold", thr), ("max_act", plan.max_act)):
            getattr(self, name).index_copy_(0, cols, src.to(device=dev, dtype=torch.float32))

    def clear_columns(self, cols: torch.Tensor) -> None:
        for t in (self.enc_w, self.dec_w, self.enc_b, self.threshold, self.max_act):
            t.index_fill_(0, cols, 0)

    def nbytes(self) -> int:
        extra = sum(t.numel() * t.element_size() for t in self.full_enc) if self.full_enc else 0
        return extra + sum(t.numel() * t.element_size() for t in (
            self.enc_w, self.enc_b, self.threshold, self.dec_w, self.max_act))

    # ---- rows for the per-request tables
    def strength_row(self, strengths: Union[None, float, Sequence[float], torch.Tensor] = None,
                     scale: float = 1.0) -> torch.Tensor:
        """Validated fp32 row [k] of strengths (scaled by ``scale``; the op then
        bounds them to [min, max] and multiplies by the spec's strength_scale)."""
        if strengths is None:
            row = self.default_strengths.clone()
        else:
            vals = strengths if isinstance(strengths, torch.Tensor) else (
                [strengths] if isinstance(strengths, (int, float)) else list(strengths))
            row = finite(vals, "strengths", SteeringSpecError, "strengths")
            row = torch.as_tensor(row, dtype=torch.float32).reshape(-1)
            if row.numel() == 1:
                row = row.expand(self.k).clone()
        if row.numel() != self.k:
            raise SteeringSpecError(f"strengths has {row.numel()} values, expected {self.k} "
                                    f"(one per selected feature {self.spec.features})")
        scale = finite(scale, "scale", SteeringSpecError, "scales")
        return (row * scale).to(self.device)

    def modes_row(self, mode: Optional[str] = None) -> torch.Tensor:
        code = self.mode_code if mode is None else _mode_code(mode)
        return torch.full((self.k,), code, dtype=torch.int8, device=self.device)

    def column_of(self, feature: int) -> int:
        """Column of an SAE feature index in this plan's tables."""
        hits = (self.features == int(feature)).nonzero()
        if hits.numel() == 0:
            raise SteeringSpecError(f"feature {feature} is not in this plan's selection "
                                    f"{self.spec.features}")
        return int(hits[0])

    # ---- running
    def topk_kth(self, hidden: torch.Tensor, residual: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Per-row TopK threshold (exact TopK path), else None: halfway between
        the k-th and (k+1)-th largest full pre-activations, so a kernel that sums
        in another order still selects exactly the top k (ties aside)."""
        if self.activation != codes.ACT_TOPK:
            return None
        W, b = self.full_enc
        x = hidden.float() if residual is None else hidden.float() + residual.float()
        return topk_threshold(torch.addmm(b, x, W), self.sae.k)

    def apply_(self, hidden: torch.Tensor, residual: Optional[torch.Tensor], strengths: torch.Tensor,
               modes: torch.Tensor, row_index: torch.Tensor, *, scale: Optional[float] = None,
               bounds: Optional[tuple[float, float]] = None) -> None:
        """One steering step in place on ``hidden`` (see ``ops.steer_``).

        By default the op bounds strengths to the spec's [min, max] and scales
        them by its strength_scale; backends that bound and scale on the host
        when writing their tables pass ``scale`` and ``bounds`` explicitly."""
        kth = self.topk_kth(hidden, residual)
        lo, hi = bounds if bounds is not None else (self.spec.min_strength, self.spec.max_strength)
        ops.steer_(hidden, residual, self.enc_w, self.enc_b, self.threshold, self.dec_w,
                   self.max_act, strengths, modes, row_index, kth, self.activation,
                   self.spec.strength_scale if scale is None else scale, lo, hi)

    def steer_(self, hidden: torch.Tensor, residual: Optional[torch.Tensor] = None,
               strengths: Union[None, float, Sequence[float], torch.Tensor] = None) -> torch.Tensor:
        """Convenience: steer every row of ``hidden`` [..., d] with one strengths row."""
        flat = hidden.reshape(-1, hidden.shape[-1])
        res = None if residual is None else residual.reshape(-1, hidden.shape[-1])
        table = torch.zeros(2, self.k, dtype=torch.float32, device=self.device)
        table[1] = self.strength_row(strengths)
        modes = torch.zeros(2, self.k, dtype=torch.int8, device=self.device)
        modes[1] = self.mode_code
        rows = torch.ones(flat.shape[0], dtype=torch.int32, device=self.device)
        self.apply_(flat, res, table, modes, rows)
        return hidden


def topk_threshold(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Threshold [T] separating each row's k largest values of ``pre`` from the rest."""
    if k >= pre.shape[-1]:
        return torch.full(pre.shape[:-1], float("-inf"), device=pre.device)
    top = torch.topk(pre, k + 1, dim=-1).values
    return (0.5 * (top[..., k - 1] + top[..., k])).contiguous()


def _mode_code(mode: str) -> int:
    if mode == "clamp_direction":
        return codes.MODE_SET
    if mode not in codes.MODE_CODES:
        raise SteeringSpecError(f"mode={mode!r} is not one of {', '.join(MODES)}")
    return codes.MODE_CODES[mode]


def build_plan(sae: SAEWeights, spec: Union[SteeringSpec, dict], *,
               device: Union[str, torch.device, None] = None,
               dtype: Optional[torch.dtype] = None) -> SteeringPlan:
    """Gather the selected features' tensors from ``sae`` for ``spec``."""
    if isinstance(spec, dict):
        spec = SteeringSpec.from_dict(spec)
    device = torch.device(device) if device is not None else sae.device
    dtype = dtype or sae.dtype
    bad = [f for f in spec.features if not 0 <= f < sae.d_sae]
    if bad:
        raise SteeringSpecError(f"feature index {bad[0]} is out of range for SAE {sae.source} "
                                f"with d_sae={sae.d_sae} (valid: 0..{sae.d_sae - 1})")
    idx = torch.tensor(spec.features, dtype=torch.long)
    W_enc = sae.W_enc.float().cpu()
    b_enc_eff = sae.b_enc.float().cpu()
    if sae.apply_b_dec_to_input:
        b_enc_eff = b_enc_eff - sae.b_dec.float().cpu() @ W_enc
    dec = sae.W_dec.float().cpu()[idx]
    max_act = torch.tensor(spec.max_activations, dtype=torch.float32) if spec.max_activations \
        else torch.ones(spec.k)
    strengths = torch.tensor(spec.strengths, dtype=torch.float32) if spec.strengths \
        else torch.ones(spec.k)
    full_enc = None
    if spec.mode == "clamp_direction":
        norms = dec.norm(dim=-1, keepdim=True)
        if bool((norms == 0).any()):
            z = spec.features[int((norms.squeeze(1) == 0).nonzero()[0])]
            raise SteeringSpecError(f"feature {z} has a zero decoder row; it has no direction to clamp")
        u = dec / norms
        enc_w, enc_b, dec_w = u, torch.zeros(spec.k), u
        threshold, activation = torch.zeros(spec.k), codes.ACT_IDENTITY
    else:
        enc_w, enc_b, dec_w = W_enc[:, idx].t(), b_enc_eff[idx], dec
        if sae.architecture == "jumprelu":
            threshold = sae.threshold.float().cpu()[idx].clamp(min=0)
            activation = codes.ACT_THRESHOLD_RELU
        elif sae.architecture == "topk" and spec.topk_mode == "exact" and spec.mode != "add":
            threshold, activation = torch.zeros(spec.k), codes.ACT_TOPK
            # The same (rounded) encoder weights as the selected columns, kept in
            # fp32, so the full encode and the kernel see the same pre-activations.
            full_enc = (W_enc.to(dtype).float().to(device=device), b_enc_eff.to(device=device))
        else:  # standard; TopK in add mode (no encode) or approximated by ReLU (approx_relu)
            threshold, activation = torch.zeros(spec.k), codes.ACT_THRESHOLD_RELU
    return SteeringPlan(
        spec=spec, sae=sae, features=idx.to(device),
        enc_w=enc_w.contiguous().to(device=device, dtype=dtype),
        enc_b=enc_b.contiguous().to(device=device, dtype=torch.float32),
        threshold=threshold.contiguous().to(device=device, dtype=torch.float32),
        dec_w=dec_w.contiguous().to(device=device, dtype=dtype),
        max_act=max_act.to(device), default_strengths=strengths.to(device),
        activation=activation, mode_code=_mode_code(spec.mode), full_enc=full_enc)


def union_features(specs: Iterable[SteeringSpec]) -> list[int]:
    """Sorted union of the features of several specs (one table per layer)."""
    return sorted({f for s in specs for f in s.features})
