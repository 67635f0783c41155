"""Worker side: persistent per-layer slots, the per-step token -> row map,
SAEs attached from ``additional_config`` at model load, and the worker
extension whose methods ``collective_rpc`` calls on every rank."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from sae_fast.backends.common import UnsupportedModelError, decoder_layers, resolve_layer
from sae_fast.backends.tables import SteeringTables
from sae_fast.ops import count_
from sae_fast.checks import atomic_write
from sae_fast.backends.vllm_engine import _compat
from sae_fast.backends.vllm_engine._compat import VLLMSteeringError
from sae_fast.backends.vllm_engine.config import ServeConfig
from sae_fast.backends.common import AttachedSAE, resolve_request
from sae_fast.backends.vllm_engine.groups import DEFAULT_MAX_FEATURES, prepare_group
from sae_fast.backends.vllm_engine.transport import plan_from_payload
from sae_fast.ops import codes
from sae_fast.plan import SteeringPlan, SteeringSpec, SteeringSpecError
from sae_fast.request import request_entries
from sae_fast.stats import SteeringStats

log = logging.getLogger(__name__)

SLOT_ATTR = "_sae_fast_slot"
RUNNER_ATTR = "_sae_fast"
_MAX_FAILED_REQUESTS = 256  # per-request failure messages kept for stats()


def config_uid(entry_fingerprint: str) -> str:
    """Deterministic uid of a config-attached SAE: the same in the serving
    process (prefix-cache salt) and in every worker."""
    return hashlib.sha256(f"config/{entry_fingerprint}".encode()).hexdigest()[:16]


class LayerSlot:
    """Persistent steering buffers of one decoder layer (allocated before any
    compilation or graph capture, never reallocated). Columns are handed out
    to attached SAEs; unused columns and unused rows are all zero (off)."""

    def __init__(self, layer: int, hidden_size: int, capacity: int, max_rows: int,
                 row_index: torch.Tensor, device: torch.device, dtype: torch.dtype) -> None:
        self.layer = layer
        self.capacity = capacity
        plan = SteeringPlan.capacity(capacity, hidden_size, dtype=dtype, device=device)
        self.tables = SteeringTables(plan, max_rows=max_rows, max_tokens=1)
        self.row_index = row_index  # shared by every slot of the engine
        self.calls = torch.zeros(1, dtype=torch.int64, device=device)
        self.free_columns = list(range(capacity))

    def apply_(self, hidden: torch.Tensor, residual: Optional[torch.Tensor]) -> None:
        """Runs inside the (compiled) decoder-layer forward."""
        self.tables.apply_(hidden, residual, self.row_index[: hidden.shape[0]])
        count_(self.calls)  # an op call, not an add_ Inductor could inline (ops.count_)

    # ---- columns (host side, between steps)
    def take_columns(self, k: int) -> list[int]:
        if k > len(self.free_columns):
            raise SteeringSpecError(
                f"layer {self.layer} has {len(self.free_columns)} free feature columns of "
                f"{self.capacity}, but {k} are needed; detach another SAE or create the engine "
                f"with sae_fast.vllm.engine_args(max_features=...) >= "
                f"{self.capacity - len(self.free_columns) + k}")
        cols, self.free_columns = self.free_columns[:k], self.free_columns[k:]
        return cols

    def write_columns(self, cols: torch.Tensor, plan: SteeringPlan) -> None:
        self.tables.plan.write_columns(cols, plan)

    def clear_columns(self, cols: torch.Tensor) -> None:
        self.tables.plan.clear_columns(cols)
        self.tables.strengths.index_fill_(1, cols, 0)
        self.tables.modes.index_fill_(1, cols, 0)
        self.free_columns = sorted(self.free_columns + cols.tolist())


@dataclass
class _Placement:
    slot: LayerSlot
    cols: torch.Tensor  # int64 column indices on the slot's device


def slot_layers(cfg: ServeConfig, entries_layers: Sequence[Optional[Sequence[int]]],
                num_layers: int, default_layers: Sequence[int]) -> list[int]:
    """Layers that get a slot: ``layers`` if given, else the layers of the
    configured SAEs (an SAE without layer/layers uses its default layer: its
    hook layer, else the last). No configured layer = no slot."""
    if cfg.layers is not None:
        return sorted({resolve_layer(int(x), num_layers) for x in cfg.layers})
    out: set[int] = set()
    for layers, default in zip(entries_layers, default_layers):
        for x in (layers if layers is not None else [default]):
            out.add(resolve_layer(int(x), num_layers))
    return sorted(out)


def configured_groups(cfg: ServeConfig, num_layers: int, hidden_size: int
                      ) -> tuple[list[int], list[AttachedSAE]]:
    """(slot layers, prepared groups) of the SAEs listed in the config: loaded
    on the host, checked against the model, errors naming the SAE. The same
    in the serving process (admission) and in every worker."""
    from sae_fast.sae import load_sae

    entries = cfg.named_saes()
    loaded = []
    for e in entries:  # loaded first: their layers decide where slots go
        try:
            loaded.append(load_sae(e.path, device="cpu"))
        except Exception as err:
            raise type(err)(f"sae_fast: SAE {e.name!r} (additional_config.sae_fast.saes): "
                            f"{err}") from None
    steerable = slot_layers(cfg, [e.layer_list() for e in entries], num_layers,
                            [w.default_layer() for w in loaded])
    groups = [prepare_group(w, e.spec(), name=e.name, uid=config_uid(e.fingerprint()),
                            layers=e.layer_list(), num_layers=num_layers,
                            hidden_size=hidden_size, max_features=cfg.max_features,
                            steerable=steerable)[0]
              for e, w in zip(entries, loaded)]
    return steerable, groups


def check_layer_structure(layer: nn.Module, index: int, vcfg: Any) -> None:
    """Refuse, at engine start, a decoder layer whose forward does not take and
    return the residual stream as ``(hidden_states, residual)`` (vLLM's Llama,
    Qwen2, Mistral, Gemma... layers do; GPT-2's returns one tensor). Found
    later, the failure would surface in the first forward, and in compiled
    mode buried under dynamo's "Observed exception"."""
    import inspect

    cls = type(layer)
    fwd = getattr(cls.forward, "_sae_fast_original", cls.forward)
    try:
        params = inspect.signature(fwd).parameters
    except (TypeError, ValueError):
        return
    if "residual" not in params:
        arch = ",".join(getattr(vcfg.model_config.hf_config, "architectures", None) or ["?"])
        raise UnsupportedModelError(
            f"sae_fast: vLLM model {arch}: decoder layer {index} is a {cls.__name__}, whose "
            f"forward{inspect.signature(fwd)} does not carry the residual stream as "
            "(hidden_states, residual); sae_fast steers vLLM decoder layers of the "
            "forward(positions, hidden_states, residual) -> (hidden_states, residual) kind "
            "(Llama, Qwen2, Mistral, Gemma families). Steer this model with the transformers "
            "backend (sae_fast.attach) instead")


class WorkerSteering:
    """Steering state of one model runner (one worker / TP rank)."""

    def __init__(self, runner: Any, model: nn.Module, cfg: ServeConfig) -> None:
        vcfg = runner.vllm_config
        if _compat.sequence_parallel(vcfg):
            raise VLLMSteeringError("sae_fast steering does not support sequence parallelism "
                                    "(hidden states are split by token); disable it")
        self.layers = decoder_layers(model)
        self.num_layers = len(self.layers)
        self.hidden_size = _compat.text_hidden_size(vcfg)
        self.device = torch.device(runner.device)
        self.dtype = vcfg.model_config.dtype
        max_num_seqs = int(vcfg.scheduler_config.max_num_seqs)
        self.max_rows = int(cfg.max_rows or max_num_seqs)
        if self.max_rows < max_num_seqs:
            raise VLLMSteeringError(
                f"sae_fast: max_rows={self.max_rows} is below the engine's max_num_seqs="
                f"{max_num_seqs}: a batch could hold more steered requests than rows. Give "
                f"max_rows >= {max_num_seqs}, or lower max_num_seqs (engine_args(max_rows=N) "
                "sets both)")
        self.config = cfg
        self.steerable, prepared = configured_groups(cfg, self.num_layers, self.hidden_size)
        per_layer: dict[int, int] = {}
        for group in prepared:
            for x in group.layers:
                per_layer[x] = per_layer.get(x, 0) + group.k
        self.capacity = int(cfg.max_features or max([DEFAULT_MAX_FEATURES if not prepared else 0,
                                                     *per_layer.values()]))
        max_tokens = _compat.max_tokens_per_step(runner, vcfg) + 1024
        self.row_index = torch.zeros(max_tokens, dtype=torch.int32, device=self.device)
        self.slots: dict[int, LayerSlot] = {}
        self.remote: set[int] = set()  # layers another pipeline stage runs
        for i in self.steerable:
            layer = self.layers[i]
            if _compat.is_pipeline_placeholder(layer):
                self.remote.add(i)
                continue
            check_layer_structure(layer, i, vcfg)
            from sae_fast.backends.vllm_engine.patch import patch_layer_class

            slot = LayerSlot(i, self.hidden_size, self.capacity, self.max_rows, self.row_index,
                             self.device, self.dtype)
            patch_layer_class(type(layer))
            object.__setattr__(layer, SLOT_ATTR, slot)
            self.slots[i] = slot
        self.compiled = _compat.compiled(vcfg)
        self.groups: dict[str, AttachedSAE] = {}
        self.placements: dict[str, list[_Placement]] = {}
        # Every steered request keeps its validated host rows for its whole
        # life; a table row is bound to it only while it is scheduled. With
        # max_rows >= max_num_seqs a row is always free or reclaimable (from
        # a preempted request), so a steered request never runs unsteered.
        self.req_values: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.req_rows: dict[str, int] = {}
        self.row_owner: dict[int, str] = {}
        self.free_rows = list(range(self.max_rows, 0, -1))  # pop() hands out 1, 2, ...
        self.enabled = True
        self.salted = bool(cfg.salt_prefix_cache) and bool(prepared)
        self.stats = SteeringStats()
        self.group_counts: dict[str, dict[str, int]] = {}
        self.unsalted_prefix_hits = 0
        self.rows_reclaimed = 0
        self.failed_requests: dict[str, str] = {}
        self._high_water = 0
        self._verify: Optional[list] = None  # [slot, calls before the first steered step]
        # silent no-op detection: every slot's op runs once per forward pass, so
        # between two checks its call counter must move at least as often as
        # there were steps with steered tokens (read lazily: no per-step sync)
        self.steered_steps = 0
        self._in_flight = 0  # steered steps counted whose forward is still to come
        self._ran_mark: dict[int, tuple[int, int]] = {i: (0, 0) for i in self.slots}
        self._last_log = time.monotonic()
        self._logged_steps = 0
        self._written_steps = -1
        for g in prepared:
            self._place(g)

    # ---------------------------------------------------------------- control
    def info(self) -> dict:
        return {"ready": True, "hidden_size": self.hidden_size, "num_layers": self.num_layers,
                "steerable_layers": self.steerable, "max_features": self.capacity,
                "max_rows": self.max_rows, "compiled": self.compiled,
                "dtype": str(self.dtype).replace("torch.", ""), "device": str(self.device),
                "groups": {n: g.layers for n, g in self.groups.items()}}

    def attach(self, payload: dict) -> dict:
        name = payload["name"]
        if name in self.groups:
            raise SteeringSpecError(f"a steering group named {name!r} is already attached")
        group = AttachedSAE(name=name, uid=payload["uid"],
                            layers=[int(x) for x in payload["layers"]],
                            plan=plan_from_payload(payload["plan"]))
        out = self._place(group)
        self.salted = bool(payload.get("salted"))  # engine-wide: the latest attach decides
        return out

    def _place(self, group: AttachedSAE) -> dict:
        missing = [x for x in group.layers if x not in self.slots and x not in self.remote]
        if missing:
            raise SteeringSpecError(
                f"SAE {group.name!r}: layer(s) {missing} have no steering slot in this engine "
                f"(slots at: {self.steerable}); create it with "
                "sae_fast.vllm.engine_args(layers=[...])")
        taken: list[_Placement] = []
        try:
            for x in group.layers:
                if x in self.remote:
                    continue
                slot = self.slots[x]
                cols = torch.tensor(slot.take_columns(group.k), dtype=torch.long,
                                    device=self.device)
                taken.append(_Placement(slot, cols))
                slot.write_columns(cols, group.plan)
        except Exception:
            for pl in taken:
                pl.slot.clear_columns(pl.cols)
            raise
        self.groups[group.name] = group
        self.placements[group.name] = taken
        self.group_counts.setdefault(group.name, {"requests": 0, "tokens": 0})
        if taken:
            self._verify = [taken[0].slot, None]
        log.info("sae_fast: attached %s (k=%d, mode=%s) at layers %s", group.name, group.k,
                 group.plan.spec.mode, group.layers)
        return {"name": group.name, "layers": group.layers,
                "columns": {str(pl.slot.layer): pl.cols.tolist() for pl in taken}}

    def detach(self, name: Optional[str] = None) -> list[str]:
        names = list(self.groups) if name is None else [name]
        for n in names:
            if n not in self.groups:
                continue
            for pl in self.placements.pop(n):
                pl.slot.clear_columns(pl.cols)
            del self.groups[n]
            for values in self.req_values.values():
                values.pop(n, None)
            log.info("sae_fast: detached %s", n)
        if not self.groups:
            self._verify = None
        return names

    def set_enabled(self, enabled: bool) -> bool:
        self.enabled = bool(enabled)
        return self.enabled

    def check_ran(self) -> dict[int, int]:
        """Op calls per slot; records as missed the steered steps a slot's op
        did not run for since the last check (a layer whose patched forward was
        bypassed, a graph replayed without the op)."""
        calls = {i: int(s.calls.item()) for i, s in self.slots.items()}
        done = self.steered_steps - self._in_flight
        short = {}
        for i, c in calls.items():
            c0, s0 = self._ran_mark[i]
            missing = (done - s0) - (c - c0)
            if missing > 0:
                short[i] = missing
            self._ran_mark[i] = (c, done)
        if short:
            self.stats.record_missed(
                f"sae_fast: the steering op did not run at layer(s) {sorted(short)} on steps "
                "with steered tokens (its decoder layer's patched forward was bypassed or a "
                "captured graph lacks the op); those tokens ran unsteered",
                steps=max(short.values()))
        return calls

    def stats_dict(self, reset: bool = False) -> dict:
        calls = self.check_ran()
        d = self.stats.as_dict()
        d["features"] = {str(k): v for k, v in d["features"].items()}
        d["op_calls"] = {str(i): c for i, c in calls.items()}
        d["active_requests"] = len(self.req_values)
        d["rows_bound"] = len(self.req_rows)
        d["rows_reclaimed"] = self.rows_reclaimed
        d["max_rows"] = self.max_rows
        d["groups"] = {n: dict(c) for n, c in self.group_counts.items()}
        d["enabled"] = self.enabled
        d["compiled"] = self.compiled
        d["unsalted_prefix_hits"] = self.unsalted_prefix_hits
        d["failed_requests"] = dict(self.failed_requests)
        if reset:
            self.stats.reset()
            self.failed_requests.clear()
            self.unsalted_prefix_hits = 0
            self.rows_reclaimed = 0
            for c in self.group_counts.values():
                c.update(requests=0, tokens=0)
        return d

    def write_stats(self, folder: Path) -> Path:
        """``stats_dict()`` as ``<folder>/worker-<pid>.json``, replaced atomically
        (launchers whose RPCs return nothing, e.g. verl's servers, read it)."""
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"worker-{os.getpid()}.json"
        return atomic_write(path, json.dumps(self.stats_dict(), default=str))

    # ---------------------------------------------------------------- per step
    def on_step(self, scheduler_output: Any, req_ids: Sequence[str],
                num_scheduled: np.ndarray) -> None:
        """Refresh rows and the token -> row map before the forward pass (its
        host time is accumulated in stats.steer_time_s)."""
        t0 = time.perf_counter()
        before = self.steered_steps
        try:
            self._step(scheduler_output, req_ids, num_scheduled)
        finally:
            self.stats.steer_time_s += time.perf_counter() - t0
        # this step's forward has not run yet: check_ran must not count it
        self._in_flight = self.steered_steps - before
        try:
            interval = self.config.stats_log_interval_s
            if interval and time.monotonic() - self._last_log >= interval:
                self._log_stats()
            if self.config.stats_dir and self.stats.steps != self._written_steps:
                self._written_steps = self.stats.steps
                self.write_stats(Path(self.config.stats_dir))
        finally:
            self._in_flight = 0

    def _log_stats(self) -> None:
        self._last_log = time.monotonic()
        if self.stats.steps == self._logged_steps:
            return
        self._logged_steps = self.stats.steps
        calls = self.check_ran()
        log.info("sae_fast: %d steered steps, %d steered tokens, %d failures; per SAE %s; op "
                 "calls per layer %s", self.stats.steps, self.stats.steered_rows,
                 self.stats.failures, self.group_counts, calls)

    def _step(self, scheduler_output: Any, req_ids: Sequence[str],
              num_scheduled: np.ndarray) -> None:
        if self.req_values:
            for rid in _compat.finished_request_ids(scheduler_output):
                self._forget(rid)
        for new in _compat.new_requests(scheduler_output):
            self._register(new)
        self._check_verify()

        n = len(num_scheduled)
        if not self.enabled or not self.req_values or n == 0:
            self._zero_map()
            return
        ids = req_ids[:n]
        rows = np.zeros(n, dtype=np.int32)
        values, bound = self.req_values, self.req_rows
        batch: Optional[set] = None
        for i, rid in enumerate(ids):
            if rid in values:
                row = bound.get(rid)
                if row is None:
                    if batch is None:
                        batch = set(ids)
                    row = self._bind_row(rid, batch)
                rows[i] = row
        if not rows.any():
            self._zero_map()
            return
        tokens = np.repeat(rows, num_scheduled)
        T = int(tokens.shape[0])
        if T > self.row_index.shape[0]:
            msg = (f"sae_fast: {T} scheduled tokens exceed the row map of "
                   f"{self.row_index.shape[0]}")
            self.stats.record_failure(msg)
            raise VLLMSteeringError(msg)
        self.row_index[:T].copy_(self._staged(torch.from_numpy(tokens)), non_blocking=True)
        if self._high_water > T:
            self.row_index[T:self._high_water].zero_()
        self._high_water = T
        steered = rows > 0
        self.stats.record_step(int(num_scheduled[steered].sum()))
        self.steered_steps += 1
        counts = self.group_counts
        for i in np.flatnonzero(steered):
            for name in values[ids[i]]:
                counts[name]["tokens"] += int(num_scheduled[i])
        if self._verify is not None and self._verify[1] is None:
            self._verify[1] = int(self._verify[0].calls.item())

    def _staged(self, t: torch.Tensor) -> torch.Tensor:
        """Host tensor ready for a stream-ordered copy that does not block the
        host: pinned on CUDA (the caching host allocator keeps the block until
        the copy has run), as is on CPU."""
        return t.pin_memory() if self.device.type == "cuda" else t

    def _zero_map(self) -> None:
        if self._high_water:
            self.row_index[: self._high_water].zero_()
            self._high_water = 0

    def _check_verify(self) -> None:
        """After the first steered step following an attach, the layer's call
        counter must have moved: otherwise the compiled graph lacks the op."""
        if self._verify is None or self._verify[1] is None:
            return
        slot, before = self._verify
        self._verify = None
        if int(slot.calls.item()) == before:
            msg = (f"sae_fast: the steering op did not run at layer {slot.layer} although steered "
                   "tokens were scheduled: the model's compiled graph was built without sae_fast's "
                   "decoder-layer patch (e.g. loaded from a compile cache written by an unpatched "
                   "engine). Use a separate VLLM_CACHE_ROOT or VLLM_DISABLE_COMPILE_CACHE=1.")
            self.stats.record_failure(msg)
            raise VLLMSteeringError(msg)

    def _register(self, new: Any) -> None:
        rid = new.req_id
        sp = getattr(new, "sampling_params", None)
        extra = getattr(sp, "extra_args", None) if sp is not None else None
        if not extra or rid in self.req_values:
            return
        try:
            entries = request_entries(extra)
            if not entries:
                return
            values = resolve_request(entries, self.groups)
        except SteeringSpecError as err:
            self._fail_request(rid, str(err))
            return
        self.req_values[rid] = values
        for name, (s, m) in values.items():
            self.stats.record_strengths(s[m != codes.MODE_OFF])
            self.group_counts[name]["requests"] += 1
        if getattr(new, "num_computed_tokens", 0) and not self.salted:
            self.unsalted_prefix_hits += 1
            if self.unsalted_prefix_hits == 1:
                log.warning("sae_fast: steered request %s reused %d prefix-cached tokens and no "
                            "steering cache salt is set by sae_fast; unless the launcher salts "
                            "steered requests (steering_cache_salt), their KV may have been "
                            "computed under other steering", rid, new.num_computed_tokens)

    def _bind_row(self, rid: str, batch: set) -> int:
        """A table row for a scheduled steered request: a free one, else one
        reclaimed from a steered request not in this batch (preempted)."""
        if self.free_rows:
            row = self.free_rows.pop()
        else:
            victim = next((r for r in self.req_rows if r not in batch), None)
            if victim is None:  # impossible while max_rows >= max_num_seqs
                raise VLLMSteeringError(f"sae_fast: all {self.max_rows} steering rows are bound "
                                        "to requests of this batch")
            row = self.req_rows.pop(victim)
            self._clear_row(row)
            self.rows_reclaimed += 1
        for name, (s, m) in self.req_values[rid].items():
            s_dev = self._staged(s).to(self.device, non_blocking=True)
            m_dev = self._staged(m).to(self.device, non_blocking=True)
            for pl in self.placements[name]:
                pl.slot.tables.strengths[row].index_copy_(0, pl.cols, s_dev)
                pl.slot.tables.modes[row].index_copy_(0, pl.cols, m_dev)
        self.req_rows[rid] = row
        return row

    def _fail_request(self, rid: str, reason: str) -> None:
        msg = f"request steering rejected in the worker: {reason}"
        self.stats.record_failure(msg)
        log.warning("sae_fast: request %s: %s", rid, msg)
        if len(self.failed_requests) < _MAX_FAILED_REQUESTS:
            self.failed_requests[rid] = reason

    def _forget(self, rid: str) -> None:
        self.req_values.pop(rid, None)
        row = self.req_rows.pop(rid, None)
        if row is not None:
            self._clear_row(row)
            self.free_rows.append(row)

    def _clear_row(self, row: int) -> None:
        for pls in self.placements.values():
            for pl in pls:
                pl.slot.tables.clear_row(row)


class SAESteeringWorkerExtension:
    """vLLM worker extension (``worker_extension_cls=EXTENSION_QUALNAME``);
    its methods are called on every worker through ``collective_rpc``. Names
    are prefixed ``sae_`` so they never collide with the worker's own."""

    def _sae_state(self) -> WorkerSteering:
        ws = getattr(getattr(self, "model_runner", None), RUNNER_ATTR, None)
        if ws is None:
            raise VLLMSteeringError(
                "sae_fast steering is not set up in this worker: the model was loaded before "
                "sae_fast.backends.vllm_engine was imported, or the engine did not ask for it "
                "(create it with sae_fast.vllm.engine_args())")
        return ws

    def sae_info(self) -> dict:
        return self._sae_state().info()

    def sae_attach(self, payload: dict) -> dict:
        return self._sae_state().attach(payload)

    def sae_detach(self, name: Optional[str] = None) -> list:
        return self._sae_state().detach(name)

    def sae_set_enabled(self, enabled: bool) -> bool:
        return self._sae_state().set_enabled(enabled)

    def sae_stats(self, reset: bool = False) -> dict:
        return self._sae_state().stats_dict(reset)
