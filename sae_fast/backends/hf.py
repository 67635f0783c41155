"""Hugging Face transformers backend: steer any causal LM's decoder layers
with one or more SAEs during ``generate``, each batch row with its own
strengths.

    steerer = attach(model, sae, layer=-1, features=[3, 7], mode="set",
                     max_activations=[5.0, 5.0])
    with steerer:
        steerer.set_strengths(torch.tensor([[1.0, 0.5], [-1.0, 0.0]]))  # per row
        out = steerer.generate(**tok(prompts, return_tensors="pt", padding=True),
                               max_new_tokens=32)

How rows map to strengths: batch row b uses table row b + 1 (row 0 is the
exact no-op); left-padding positions map to 0; with ``steer_prompt=False``
prompt positions map to 0 except the last one (whose hidden state produces
the first generated token). Hooks are removed on exit, also on error.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from sae_fast.backends.common import (SCHEDULES, AttachedSAE, decoder_layers, hidden_size_of,
                                     layers_from, resolve_layer, schedule_multiplier,
                                     spec_from_kwargs)
from sae_fast.backends.tables import SteeringTables
from sae_fast.plan import SteeringSpec, SteeringSpecError, build_plan
from sae_fast.request import DEFAULT_MODE, SteeringRequest
from sae_fast.sae import SAEWeights, load_sae
from sae_fast.stats import SteeringStats

log = logging.getLogger(__name__)
_NOTHING: frozenset = frozenset()


class HFSteerer:
    """Steering hooks on a transformers model. Use as a context manager."""

    def __init__(self, model: nn.Module, *, max_batch: int = 64, max_tokens: int = 1 << 16,
                 steer_prompt: bool = True, strength_schedule: str = "constant",
                 schedule_steps: Optional[int] = None, on_error: str = "record",
                 record_activations: bool = False, profile: bool = False) -> None:
        if strength_schedule not in SCHEDULES:
            raise SteeringSpecError(f"strength_schedule={strength_schedule!r} is not one of "
                                    f"{', '.join(SCHEDULES)}")
        if on_error not in ("record", "raise"):
            raise ValueError(f"on_error={on_error!r}; expected 'record' or 'raise'")
        self.model = model
        self.layers = decoder_layers(model)
        self.hidden_size = hidden_size_of(model)
        self.max_batch = int(max_batch)
        self.max_tokens = int(max_tokens)
        self.steer_prompt = steer_prompt
        self.strength_schedule = strength_schedule
        self.schedule_steps = schedule_steps
        self.on_error = on_error
        self.record_activations = record_activations
        self.profile = profile  # accumulate host time inside all its hooks in stats.steer_time_s
        self.groups: list[AttachedSAE] = []
        self.stats = SteeringStats()
        self._enabled = True
        self._handles: list[Any] = []
        self._rows_in_use = 0
        self._step = 0
        self._row_index: Optional[torch.Tensor] = None
        self._arange: dict = {}
        self._hooked_layers: set[int] = set()
        # silent no-op detection: layers that must steer in the current forward
        # pass, and those whose hook did; checked when the forward returns
        self._active_layers: frozenset[int] = _NOTHING
        self._expected: frozenset[int] = _NOTHING
        self._ran: set[int] = set()
        self._pre_handle = model.register_forward_pre_hook(self._timed(self._before_forward),
                                                           with_kwargs=True)
        self._post_handle = model.register_forward_hook(self._timed(self._after_forward))

    # ------------------------------------------------------------ setup
    def add_sae(self, sae: Union[SAEWeights, str, Any], spec: Union[SteeringSpec, Mapping[str, Any]],
                *, layers: Optional[Sequence[int]] = None, name: Optional[str] = None) -> AttachedSAE:
        """Attach ``sae`` with ``spec`` at ``layers`` (default: the SAE's hook
        layer if known, else the last layer). Returns its record."""
        param = next(self.model.parameters())
        sae = load_sae(sae, device=param.device)
        spec = spec_from_kwargs(spec)
        if layers is None:
            layers = [sae.default_layer()]
        resolved = [resolve_layer(int(layer), len(self.layers)) for layer in layers]
        for layer in resolved:
            sae.check_hidden_size(self.hidden_size, layer=layer)
        name = name or f"sae{len(self.groups)}"
        if any(g.name == name for g in self.groups):
            raise SteeringSpecError(f"an SAE named {name!r} is already attached")
        plan = build_plan(sae, spec, device=param.device, dtype=param.dtype)
        group = AttachedSAE(name=name, layers=resolved, plan=plan,
                            tables=[SteeringTables(plan, self.max_batch, max_tokens=1)
                                    for _ in resolved])
        for layer in resolved:
            if layer not in self._hooked_layers:
                self._handles.append(self.layers[layer].register_forward_hook(
                    self._make_layer_hook(layer)))
                self._hooked_layers.add(layer)
        self.groups.append(group)
        return group

    def _group(self, group: Union[int, str, AttachedSAE]) -> AttachedSAE:
        if isinstance(group, AttachedSAE):
            return group
        if not self.groups:
            raise RuntimeError("no SAE attached; call add_sae first")
        if isinstance(group, str):
            for g in self.groups:
                if g.name == group:
                    return g
            raise SteeringSpecError(f"no SAE named {group!r} is attached "
                                    f"(attached: {[g.name for g in self.groups]})")
        return self.groups[group]

    # ------------------------------------------------------------ control
    def enable(self) -> None:
        self._enabled = True

    def disable(self) -> None:
        """Run unsteered without removing hooks (global on/off)."""
        self._enabled = False

    @property
    def enabled(self) -> bool:
        return self._enabled

    def set_strengths(self, strengths: Union[torch.Tensor, Sequence[Any], None], *,
                      group: Union[int, str, AttachedSAE] = 0,
                      features: Optional[Sequence[int]] = None, mode: Optional[str] = None,
                      scale: Optional[float] = None) -> None:
        """Per-row strengths for the next generate calls: a [B, k] tensor, a
        list of B rows (a row may be None = unsteered, or one number = the
        same strength on every feature), or None to steer no row."""
        g = self._group(group)
        rows = [] if strengths is None else list(strengths)
        self._write_rows(g, [None if row is None else SteeringRequest(
            strengths=row, features=features, mode=mode, strength_scale=scale) for row in rows])

    def set_requests(self, requests: Sequence[Optional[Mapping[str, Any]]], *,
                     group: Union[int, str, AttachedSAE] = 0) -> None:
        """Per-row request metadata, in the one steering vocabulary
        (``sae_fast.request``: ``features`` / ``strengths`` / ``mode`` /
        ``strength_scale`` / ``max_activations``, or the SPEC keys
        ``sae_feature_idx``, ``sae_max_activation``, ``sae_strength_scale``).
        A row's ``group`` key, when given, must name the SAE being written."""
        g = self._group(group)
        reqs = []
        for meta in requests:
            req = SteeringRequest.parse(meta) if meta else None
            if req is not None and req.group is not None and req.group != g.name:
                raise SteeringSpecError(f"request key group={req.group!r}, but these rows are "
                                        f"written to the SAE {g.name!r}; pick the SAE with "
                                        "set_requests(..., group=name)")
            reqs.append(req)
        self._write_rows(g, reqs)

    def _write_rows(self, g: AttachedSAE, requests: list) -> None:
        if len(requests) > self.max_batch:
            raise ValueError(f"{len(requests)} rows exceed max_batch={self.max_batch}")
        staged = [None if r is None else g.row(r) for r in requests]  # validate all, then write
        for t in g.tables:
            t.strengths.zero_()
            t.modes.zero_()
        for b, vals in enumerate(staged):
            if vals is None:
                continue
            s, m = vals
            for t in g.tables:
                t.strengths[b + 1].copy_(s)
                t.modes[b + 1].copy_(m)
            self.stats.record_strengths(s[m != 0])
        self._rows_in_use = max(self._rows_for(x) for x in self.groups)
        self._active_layers = frozenset(x for grp in self.groups if self._rows_for(grp)
                                        for x in grp.layers)

    @staticmethod
    def _rows_for(g: AttachedSAE) -> int:
        active = (g.tables[0].modes != 0).any(dim=1).nonzero()
        return int(active.max()) if active.numel() else 0

    # ------------------------------------------------------------ hooks
    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._expected = _NOTHING
        self._ran.clear()
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        if ids is None:
            self._row_index = None
            return
        B, S = int(ids.shape[0]), int(ids.shape[1])
        past = kwargs.get("past_key_values")
        past_len = 0
        if past is not None and hasattr(past, "get_seq_length"):
            past_len = int(past.get_seq_length())
        if past_len == 0:
            self._step = 0
        else:
            self._step += 1
        device = ids.device
        if B > self.max_batch:
            self._row_index = None
            self.stats.record_failure(f"batch of {B} rows exceeds max_batch={self.max_batch}")
            return
        # token -> table row: row b+1 for batch row b, 0 (no-op) for padding;
        # two small ops per forward (this runs every decode step)
        rows = self._arange.get((B, device))
        if rows is None:
            rows = torch.arange(1, B + 1, dtype=torch.int32, device=device)[:, None]
            self._arange = {(B, device): rows}  # one batch size at a time
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[0] == B:
            row_index = rows * mask[:, -S:].ne(0)  # int32 [B, S], a new tensor
        else:
            row_index = rows.expand(B, S).contiguous()  # a copy: expand has stride 0
        if not self.steer_prompt and past_len == 0 and S > 1:
            row_index[:, :-1] = 0
        self._row_index = row_index.view(-1)
        if self._enabled:
            self._expected = self._active_layers  # replaced, never mutated: no copy

    def _after_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        """A forward pass that should have steered at a layer whose hook never
        ran (the hook was removed or bypassed behind the steerer's back, or the
        layer was skipped) is a failure, never a silent no-op."""
        missing = self._expected - self._ran if self._expected else _NOTHING
        self._expected = _NOTHING
        if missing:
            self.stats.record_missed(
                f"steering at layer(s) {sorted(missing)} did not run in a forward pass with "
                "steered rows: the layer hook was removed or bypassed (attached hooks: "
                f"{sorted(self._hooked_layers)})")

    def _timed(self, fn):
        """``fn`` with its host time added to stats.steer_time_s when profiling,
        so that the counter holds every hook the steerer runs (the row-map
        pre-hook and the missed-step check included, not only the layer hooks)."""
        def hook(*args: Any) -> Any:
            if not self.profile:
                return fn(*args)
            t0 = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.stats.steer_time_s += time.perf_counter() - t0
        return hook

    def _make_layer_hook(self, layer: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            if not self._enabled or self._row_index is None:
                return None
            t0 = time.perf_counter() if self.profile else 0.0
            try:
                return self._layer_hook_body(layer, output)
            finally:
                if self.profile:
                    self.stats.steer_time_s += time.perf_counter() - t0
        return hook

    def _layer_hook_body(self, layer: int, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
            self.stats.record_failure(f"layer {layer} returned {type(hidden).__name__} "
                                      "instead of a [batch, seq, hidden] tensor")
            return None
        try:
            new_hidden = self._steer(layer, hidden)
        except Exception as err:  # never run unsteered silently
            if self.on_error == "raise":
                raise
            self.stats.record_failure(f"{type(err).__name__}: {err}")
            return None
        if new_hidden is hidden:
            return None
        return (new_hidden, *output[1:]) if isinstance(output, tuple) else new_hidden

    def _steer(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        B, S, d = hidden.shape
        row_index = self._row_index
        if row_index.numel() != B * S:
            raise RuntimeError(f"layer {layer} saw {B}x{S} rows but the batch had "
                               f"{row_index.numel()} token rows")
        out = hidden
        if torch.is_grad_enabled() and hidden.requires_grad or not hidden.is_contiguous():
            out = hidden.clone(memory_format=torch.contiguous_format)
        flat = out.view(B * S, d)
        steps = self.schedule_steps or 64
        mult = schedule_multiplier(self.strength_schedule, self._step, steps)
        steered = False
        for g in self.groups:
            for t, g_layer in zip(g.tables, g.layers):
                if g_layer != layer:
                    continue
                before = t.selected_activations(flat) if self.record_activations else None
                t.apply_(flat, None, row_index, scale=mult)
                self._ran.add(layer)
                if before is not None:
                    self.stats.record_features(g.features, before, t.selected_activations(flat))
                steered = True
        if steered:
            self.stats.record_step(min(self._rows_in_use, B) * S)
        return out

    # ------------------------------------------------------------ generate
    @torch.no_grad()
    def generate(self, *args: Any, strengths: Any = None, requests: Any = None, **kwargs: Any):
        """``model.generate`` with steering; ``strengths`` / ``requests`` set the
        per-row steering first. The schedule length defaults to max_new_tokens."""
        if strengths is not None:
            self.set_strengths(strengths)
        if requests is not None:
            self.set_requests(requests)
        restore = self.schedule_steps
        if self.schedule_steps is None and "max_new_tokens" in kwargs:
            self.schedule_steps = int(kwargs["max_new_tokens"])
        try:
            return self.model.generate(*args, **kwargs)
        finally:
            self.schedule_steps = restore

    # ------------------------------------------------------------ teardown
    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._hooked_layers.clear()
        if self._pre_handle is not None:
            self._pre_handle.remove()
            self._pre_handle = None
        if self._post_handle is not None:
            self._post_handle.remove()
            self._post_handle = None

    @property
    def attached(self) -> bool:
        return self._pre_handle is not None

    def __enter__(self) -> "HFSteerer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def attach(model: nn.Module, sae: Union[SAEWeights, str, Any], *,
           spec: Union[SteeringSpec, Mapping[str, Any], None] = None, layer: Optional[int] = None,
           layers: Optional[Sequence[int]] = None, features: Optional[Sequence[int]] = None,
           mode: str = DEFAULT_MODE, max_activations: Any = None, strengths: Any = None,
           strength_scale: float = 1.0, min_strength: float = -5.0, max_strength: float = 5.0,
           topk_mode: str = "exact", name: Optional[str] = None,
           **steerer_kwargs: Any) -> HFSteerer:
    """Attach ``sae`` to a transformers ``model`` and return an :class:`HFSteerer`.

    The keywords up to ``name`` are the attach vocabulary shared with
    ``sae_fast.vllm.attach`` (``sae_fast.backends.common.ATTACH_KEYWORDS``):
    ``spec`` (a SteeringSpec or a dict of SPEC keys) or the keyword form
    (features, mode, max_activations, strengths, strength_scale, bounds,
    topk_mode). The rest go to :class:`HFSteerer` (max_batch, steer_prompt,
    strength_schedule, on_error, record_activations, profile, ...)."""
    spec = spec_from_kwargs(spec, features=features, mode=mode, max_activations=max_activations,
                            strengths=strengths, strength_scale=strength_scale,
                            min_strength=min_strength, max_strength=max_strength,
                            topk_mode=topk_mode)
    lay = layers_from(layer, layers)
    steerer = HFSteerer(model, **steerer_kwargs)
    try:
        steerer.add_sae(sae, spec, layers=lay, name=name)
    except Exception:
        steerer.remove()
        raise
    return steerer
