"""Persistent per-layer steering tables shared by the HF and vLLM backends.

One :class:`SteeringTables` per (layer, plan) holds, allocated once before any
CUDA-graph capture and never resized:

    strengths [max_rows + 1, k] fp32   row r = one request / batch row
    modes     [max_rows + 1, k] int8   0 = off; row 0 all off = exact no-op
    row_index [max_tokens]      int32  token row -> strengths row

Hosts (backends) write rows when requests arrive and refresh ``row_index``
every step; the op reads them on device, so nothing on the hot path syncs
with the host or allocates.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from sae_fast.checks import finite
from sae_fast.ops import codes
from sae_fast.plan import SteeringPlan, _mode_code
from sae_fast.request import SteeringSpecError, feature_index


UNBOUNDED = (float("-inf"), float("inf"))


class SteeringTables:
    def __init__(self, plan: SteeringPlan, max_rows: int, max_tokens: int) -> None:
        if max_rows < 1 or max_tokens < 1:
            raise ValueError(f"max_rows={max_rows} and max_tokens={max_tokens} must be >= 1")
        self.plan = plan
        self.max_rows = int(max_rows)
        self.max_tokens = int(max_tokens)
        dev = plan.device
        self.strengths = torch.zeros(self.max_rows + 1, plan.k, dtype=torch.float32, device=dev)
        self.modes = torch.zeros(self.max_rows + 1, plan.k, dtype=torch.int8, device=dev)
        self.row_index = torch.zeros(self.max_tokens, dtype=torch.int32, device=dev)
        self._feature_col = {int(f): j for j, f in enumerate(plan.features.tolist())}

    @property
    def k(self) -> int:
        return self.plan.k

    def columns(self, features: Optional[Sequence[int]]) -> list[int]:
        """Table columns of ``features`` (all columns when None); unknown features
        raise an error naming them and the allowed set."""
        if features is None:
            return list(range(self.k))
        cols = []
        for i, f in enumerate(features):
            j = self._feature_col.get(feature_index(f, f"features[{i}]"))
            if j is None:
                raise SteeringSpecError(
                    f"feature {f} is not among the features attached at this layer "
                    f"{sorted(self._feature_col)}; attach with it in the selection")
            cols.append(j)
        return cols

    def row_values(self, strengths: Union[None, float, Sequence[float], torch.Tensor] = None, *,
                   features: Optional[Sequence[int]] = None, mode: Optional[str] = None,
                   scale: Optional[float] = None,
                   max_activation: Union[None, float, Sequence[float]] = None,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Validated host rows (strengths [k], modes [k]) ready to write.

        ``features`` selects a subset of the plan's features (the others are
        off); ``strengths`` has one value per selected feature, or one value
        for all of them (the global intervention). Strengths are bounded to the
        spec's [min_strength, max_strength] here, then multiplied by ``scale``
        (default: the spec's strength_scale) and, for a per-request
        ``max_activation``, by its ratio to the plan's: the op then runs with
        scale 1 (times a schedule) and no further bounds.
        """
        p = self.plan
        cols = self.columns(features)
        sub = p.default_strengths.cpu()[cols] if strengths is None else strengths
        s_sub = _sub_row(sub, len(cols), "strengths").clamp(p.spec.min_strength, p.spec.max_strength)
        g = p.spec.strength_scale if scale is None else finite(scale, "strength_scale",
                                                                SteeringSpecError, "scales")
        s_sub = s_sub * g
        if max_activation is not None:
            m_new = _sub_row(max_activation, len(cols), "max_activation")
            m_plan = p.max_act.cpu()[cols]
            if bool((m_plan == 0).any()):
                raise SteeringSpecError("a per-request max_activation needs a nonzero max_activation "
                                        "at attach time for the same features")
            s_sub = s_sub * (m_new / m_plan)
        code = p.mode_code if mode is None else _mode_code(mode)
        if code != codes.MODE_ADD and p.sae.architecture == "topk" and \
                p.spec.topk_mode == "exact" and p.activation != codes.ACT_TOPK:
            raise SteeringSpecError(f"mode={mode!r} needs a TopK encode, but this layer's plan "
                                    "was built in add mode; attach with a non-add mode")
        full_s = torch.zeros(self.k, dtype=torch.float32)
        full_m = torch.zeros(self.k, dtype=torch.int8)
        full_s[cols] = s_sub
        full_m[cols] = code
        return full_s, full_m

    def write_row(self, row: int, strengths=None, *, features=None, mode=None, scale=None,
                  max_activation=None, non_blocking: bool = False) -> torch.Tensor:
        """Write one steered row (1..max_rows); returns the effective strengths
        (bounded, scaled) of its active features, for statistics."""
        self._check_row(row)
        s, m = self.row_values(strengths, features=features, mode=mode, scale=scale,
                               max_activation=max_activation)
        self.strengths[row].copy_(s, non_blocking=non_blocking)
        self.modes[row].copy_(m, non_blocking=non_blocking)
        return s[m != codes.MODE_OFF]

    def clear_row(self, row: int) -> None:
        self._check_row(row)
        self.modes[row].zero_()
        self.strengths[row].zero_()

    def clear(self) -> None:
        self.modes.zero_()
        self.strengths.zero_()
        self.row_index.zero_()

    def _check_row(self, row: int) -> None:
        if not 1 <= row <= self.max_rows:
            raise IndexError(f"row {row} is outside 1..{self.max_rows} (row 0 is the no-op row)")

    def apply_(self, hidden: torch.Tensor, residual: Optional[torch.Tensor],
               row_index: Optional[torch.Tensor] = None, scale: float = 1.0) -> None:
        """Steer ``hidden`` [T, d] in place with the current tables (rows are
        already bounded and scaled; ``scale`` is a schedule multiplier).
        ``row_index`` defaults to the first T entries of the persistent map."""
        T = hidden.shape[0]
        if row_index is None:
            if T > self.max_tokens:
                raise ValueError(f"{T} token rows exceed max_tokens={self.max_tokens}")
            row_index = self.row_index[:T]
        self.plan.apply_(hidden, residual, self.strengths, self.modes, row_index, scale=scale,
                         bounds=UNBOUNDED)

    def selected_activations(self, x: torch.Tensor) -> torch.Tensor:
        """Activations [T, k] of the plan's features for stream rows x (stats only)."""
        from sae_fast.ops.reference import selected_activations

        p = self.plan
        pre = x.float() @ p.enc_w.float().t() + p.enc_b
        return selected_activations(pre, p.threshold, p.activation, p.topk_kth(x, None))


def _sub_row(values, n: int, name: str) -> torch.Tensor:
    if not isinstance(values, torch.Tensor):
        values = [values] if isinstance(values, (int, float)) else values
        if not isinstance(values, (list, tuple)):
            raise SteeringSpecError(f"{name} = {values!r} is not a list of numbers")
    row = finite(values, name, SteeringSpecError, what="strengths")
    row = torch.as_tensor(row, dtype=torch.float32).reshape(-1)
    if row.numel() == 1 and n > 1:
        row = row.expand(n).clone()
    if row.numel() != n:
        raise SteeringSpecError(f"{name} has {row.numel()} values for {n} selected features")
    return row
