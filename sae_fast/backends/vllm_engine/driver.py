"""Driver side: make an engine steerable (``engine_args``), attach SAEs at run
time to an offline ``LLM`` (``attach``) or an ``AsyncLLM`` / any vLLM
``EngineClient`` (``attach_async``), and the engine-wide controls."""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
from typing import Any, Mapping, Optional, Sequence, Union

from sae_fast.backends.common import AttachedSAE, layers_from, resolve_request, spec_from_kwargs
from sae_fast.backends.vllm_engine import _compat
from sae_fast.backends.vllm_engine._compat import VLLMSteeringError
from sae_fast.backends.vllm_engine.admission import Admission, SteeringRequestError, state_of
from sae_fast.backends.vllm_engine.config import CONFIG_KEY, parse
from sae_fast.backends.vllm_engine.groups import combine_salt, prepare_group
from sae_fast.backends.vllm_engine.patch import EXTENSION_QUALNAME, install
from sae_fast.backends.vllm_engine.transport import plan_payload
from sae_fast.plan import SteeringPlan, SteeringSpec, SteeringSpecError
from sae_fast.request import DEFAULT_MODE, REQUEST_KEY, request_entries
from sae_fast.sae import SAEWeights

log = logging.getLogger(__name__)


# =====================================================================
# Engine options
# =====================================================================
def engine_args(max_features: Optional[int] = None, layers: Optional[Sequence[int]] = None,
                max_rows: Optional[int] = None, saes: Union[None, str, Sequence[dict]] = None,
                salt_prefix_cache: bool = True, stats_log_interval_s: Optional[float] = None,
                stats_dir: Optional[str] = None,
                additional_config: Optional[dict] = None) -> dict:
    """Keyword arguments for ``vllm.LLM(...)`` / ``AsyncEngineArgs`` that make
    an engine steerable: our worker extension and the ``sae_fast`` block of
    ``additional_config``.

    max_features: columns per layer slot (sum of ``k`` of the SAEs attached at
        one layer). Default: what ``saes`` needs, else 32.
    layers: decoder layers that get a slot (negative counts from the end).
        Default: the layers of ``saes``. Each slot costs one op call per step
        even when nothing is steered, so only these layers get one; attaching
        elsewhere later is an error.
    max_rows: steered requests in one batch; also sets ``max_num_seqs`` to the
        same value, so a scheduled steered request always has a row.
        Default: the engine's ``max_num_seqs``.
    saes: SAEs every worker attaches at model load (entries of
        ``additional_config["sae_fast"]["saes"]``, or a YAML/JSON file).
    stats_log_interval_s: how often each worker logs its statistics (0 = never).
    stats_dir: a folder where each worker also writes them as JSON, every step.
    """
    block: dict[str, Any] = {}
    if max_features is not None:
        block["max_features"] = int(max_features)
    if layers is not None:
        block["layers"] = [int(x) for x in layers]
    if max_rows is not None:
        block["max_rows"] = int(max_rows)
    if saes is not None:
        block["saes"] = saes if isinstance(saes, str) else [dict(e) for e in saes]
    if not salt_prefix_cache:
        block["salt_prefix_cache"] = False
    if stats_log_interval_s is not None:
        block["stats_log_interval_s"] = float(stats_log_interval_s)
    if stats_dir is not None:
        block["stats_dir"] = str(stats_dir)
    cfg = parse(block)  # fail here, naming the key, not in a worker
    extra = dict(additional_config or {})
    extra[CONFIG_KEY] = cfg.model_dump(exclude_defaults=True)
    out: dict[str, Any] = {"worker_extension_cls": EXTENSION_QUALNAME,
                           "additional_config": extra}
    if max_rows is not None:
        out["max_num_seqs"] = int(max_rows)
    return out


# =====================================================================
# Driver-side state of one engine
# =====================================================================
def _is_async(engine: Any) -> bool:
    return inspect.iscoroutinefunction(getattr(engine, "collective_rpc", None))


def _not_steerable(err: Exception) -> VLLMSteeringError:
    return VLLMSteeringError(
        f"this engine cannot steer: it was created without sae_fast's worker extension ({err}). "
        f"Create it with LLM(model, **sae_fast.vllm.engine_args(layers=[...])) "
        f"(worker_extension_cls={EXTENSION_QUALNAME!r})")


@contextlib.contextmanager
def _steerable_or_explain():
    """A worker without our extension lacks ``sae_info``: say how to fix it."""
    try:
        yield
    except Exception as err:
        if "sae_info" in str(err) or isinstance(err, (NotImplementedError, AttributeError)):
            raise _not_steerable(err) from err
        raise


class _EngineState:
    """Driver-side steering state of one engine (stored on the engine object).
    Its groups are the engine's admission groups: one source of truth for
    validation, salts and handles."""

    def __init__(self, engine: Any, info: dict, admission: Admission) -> None:
        self.engine = engine
        self.info = info
        self.admission = admission
        self.enabled = True
        self._counter = 0

    @property
    def groups(self) -> dict[str, AttachedSAE]:
        return self.admission.groups

    @staticmethod
    def _admission(engine: Any) -> Admission:
        install()
        proc = _compat.input_processor_of(engine)
        adm = state_of(proc)
        if adm is None:  # opted in through the worker extension only after the fact
            raise VLLMSteeringError(f"engine {type(engine).__name__} did not opt in to steering; "
                                    "create it with sae_fast.vllm.engine_args()")
        return adm

    @classmethod
    def _store(cls, engine: Any, infos: list) -> "_EngineState":
        st = cls(engine, infos[0], cls._admission(engine))
        engine._sae_fast_state = st
        return st

    @classmethod
    def of(cls, engine: Any) -> "_EngineState":
        if _is_async(engine):
            raise VLLMSteeringError(
                f"{type(engine).__name__} is an async engine: use "
                "`await sae_fast.vllm.attach_async(engine, ...)` (and stats_async, "
                "set_enabled_async, detach_async)")
        st = getattr(engine, "_sae_fast_state", None)
        if st is not None:
            return st
        with _steerable_or_explain():
            infos = engine.collective_rpc("sae_info")
        return cls._store(engine, infos)

    @classmethod
    async def of_async(cls, engine: Any) -> "_EngineState":
        if not _is_async(engine):
            raise VLLMSteeringError(f"{type(engine).__name__} is not an async engine: use "
                                    "sae_fast.vllm.attach(llm, ...)")
        st = getattr(engine, "_sae_fast_state", None)
        if st is not None:
            return st
        with _steerable_or_explain():
            infos = await engine.collective_rpc("sae_info")
        return cls._store(engine, infos)

    def new_name(self) -> str:
        while f"sae{self._counter}" in self.groups:
            self._counter += 1
        return f"sae{self._counter}"

    def prepare(self, sae: Any, spec: SteeringSpec, layers: Optional[Sequence[int]],
                name: Optional[str], salt: bool) -> tuple[AttachedSAE, dict]:
        name = name or self.new_name()
        if name in self.groups:
            raise SteeringSpecError(f"a steering group named {name!r} is already attached")
        info = self.info
        uid = hashlib.sha256(f"{name}/{id(self)}/{self.admission.epoch}/{spec}".encode()
                             ).hexdigest()[:16]
        group, weights = prepare_group(sae, spec, name=name, uid=uid, layers=layers,
                                       num_layers=int(info["num_layers"]),
                                       hidden_size=int(info["hidden_size"]),
                                       max_features=int(info["max_features"]),
                                       steerable=info["steerable_layers"])
        payload = {"name": name, "uid": uid, "layers": group.layers, "salted": bool(salt),
                   "plan": plan_payload(group.plan, weights)}
        return group, payload

    def commit(self, group: AttachedSAE, salt: bool) -> None:
        self.admission.salt = bool(salt)
        self.admission.add(group)


# =====================================================================
# Handles
# =====================================================================
class _Handle:
    def __init__(self, state: _EngineState, group: AttachedSAE) -> None:
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

    @property
    def enabled(self) -> bool:
        return self._state.enabled

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
                if hasattr(value, "tolist"):
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

    def _forget(self) -> bool:
        if not self.attached:
            return False
        self.attached = False
        # The admission hook stays: later requests for this group are
        # rejected, never run unsteered.
        self._state.admission.remove(self.name)
        return True

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, layers={self.layers}, "
                f"k={self.group.k}, mode={self.group.plan.spec.mode!r}, "
                f"attached={self.attached})")


class VLLMSteering(_Handle):
    """Handle of one SAE attached to an offline ``LLM``. A context manager:
    the SAE is detached on exit, also on error. ``enable``/``disable``/
    ``stats`` act on the engine's steering as a whole."""

    def generate(self, prompts: Any, sampling_params: Any = None, **kwargs: Any) -> list:
        """``llm.generate`` where a request with invalid steering does not
        abort the others: its slot in the result holds a SteeringRequestError."""
        return generate(self._state.engine, prompts, sampling_params, **kwargs)

    def enable(self) -> None:
        set_enabled(self._state.engine, True)

    def disable(self) -> None:
        set_enabled(self._state.engine, False)

    def stats(self, reset: bool = False) -> dict:
        return stats(self._state.engine, reset=reset)

    def detach(self) -> None:
        if not self._forget():
            return
        try:
            self._state.engine.collective_rpc("sae_detach", args=(self.name,))
        except Exception as err:  # engine already dead: nothing left to steer
            log.warning("sae_fast: detaching %s from the workers failed: %s", self.name, err)

    def __enter__(self) -> "VLLMSteering":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.detach()


class AsyncVLLMSteering(_Handle):
    """Handle of one SAE attached to an async engine (``AsyncLLM`` or any
    ``EngineClient``): the same as :class:`VLLMSteering` with awaitable
    controls, and an async context manager."""

    async def enable(self) -> None:
        await set_enabled_async(self._state.engine, True)

    async def disable(self) -> None:
        await set_enabled_async(self._state.engine, False)

    async def stats(self, reset: bool = False) -> dict:
        return await stats_async(self._state.engine, reset=reset)

    async def detach(self) -> None:
        if not self._forget():
            return
        try:
            await self._state.engine.collective_rpc("sae_detach", args=(self.name,))
        except Exception as err:
            log.warning("sae_fast: detaching %s from the workers failed: %s", self.name, err)

    async def __aenter__(self) -> "AsyncVLLMSteering":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.detach()


# =====================================================================
# attach / controls
# =====================================================================
def attach(llm: Any, sae: Union[SAEWeights, str, Any], *,
           spec: Union[SteeringSpec, dict, None] = None, layer: Optional[int] = None,
           layers: Optional[Sequence[int]] = None, features: Optional[Sequence[int]] = None,
           mode: str = DEFAULT_MODE, max_activations: Any = None, strengths: Any = None,
           strength_scale: float = 1.0, min_strength: float = -5.0, max_strength: float = 5.0,
           topk_mode: str = "exact", name: Optional[str] = None,
           salt_prefix_cache: bool = True) -> VLLMSteering:
    """Attach ``sae`` (an SAEWeights, a sae-lens folder or object) to every
    worker of an offline ``llm`` at ``layer``/``layers`` (which must have
    slots: ``engine_args(layers=...)``) and return a :class:`VLLMSteering`.
    Requests then steer through ``SamplingParams.extra_args``."""
    spec = spec_from_kwargs(spec, features=features, mode=mode, max_activations=max_activations,
                            strengths=strengths, strength_scale=strength_scale,
                            min_strength=min_strength, max_strength=max_strength,
                            topk_mode=topk_mode)
    lay = layers_from(layer, layers)
    st = _EngineState.of(llm)
    group, payload = st.prepare(sae, spec, lay, name, salt_prefix_cache)
    try:
        llm.collective_rpc("sae_attach", args=(payload,))
    except Exception:
        try:  # undo on the workers where it succeeded (tensor-parallel ranks)
            llm.collective_rpc("sae_detach", args=(group.name,))
        except Exception:
            pass
        raise
    st.commit(group, salt_prefix_cache)
    return VLLMSteering(st, group)


async def attach_async(engine: Any, sae: Union[SAEWeights, str, Any], *,
                       spec: Union[SteeringSpec, dict, None] = None, layer: Optional[int] = None,
                       layers: Optional[Sequence[int]] = None,
                       features: Optional[Sequence[int]] = None, mode: str = DEFAULT_MODE,
                       max_activations: Any = None, strengths: Any = None,
                       strength_scale: float = 1.0, min_strength: float = -5.0,
                       max_strength: float = 5.0, topk_mode: str = "exact",
                       name: Optional[str] = None,
                       salt_prefix_cache: bool = True) -> AsyncVLLMSteering:
    """:func:`attach` for an ``AsyncLLM`` (or any vLLM ``EngineClient`` whose
    ``collective_rpc`` is a coroutine)."""
    spec = spec_from_kwargs(spec, features=features, mode=mode, max_activations=max_activations,
                            strengths=strengths, strength_scale=strength_scale,
                            min_strength=min_strength, max_strength=max_strength,
                            topk_mode=topk_mode)
    lay = layers_from(layer, layers)
    st = await _EngineState.of_async(engine)
    group, payload = st.prepare(sae, spec, lay, name, salt_prefix_cache)
    try:
        await engine.collective_rpc("sae_attach", args=(payload,))
    except Exception:
        try:
            await engine.collective_rpc("sae_detach", args=(group.name,))
        except Exception:
            pass
        raise
    st.commit(group, salt_prefix_cache)
    return AsyncVLLMSteering(st, group)


def _after_set_enabled(st: _EngineState, enabled: bool) -> None:
    st.enabled = bool(enabled)
    st.admission.epoch += 1


def set_enabled(llm: Any, enabled: bool) -> None:
    """Global on/off of steering on every worker, without detaching."""
    st = _EngineState.of(llm)
    llm.collective_rpc("sae_set_enabled", args=(bool(enabled),))
    _after_set_enabled(st, enabled)


async def set_enabled_async(engine: Any, enabled: bool) -> None:
    st = await _EngineState.of_async(engine)
    await engine.collective_rpc("sae_set_enabled", args=(bool(enabled),))
    _after_set_enabled(st, enabled)


def _merge_stats(st: _EngineState, per_rank: list) -> dict:
    out = dict(per_rank[0])
    out["ranks"] = per_rank
    out["admission"] = {"groups": {n: dict(c) for n, c in st.admission.counters.items()},
                        "rejected": st.admission.rejected}
    return out


def stats(llm: Any, reset: bool = False) -> dict:
    """Steering statistics of the engine (rank 0; ``ranks`` holds every rank's,
    ``admission`` the serving side's admitted/rejected counts)."""
    st = _EngineState.of(llm)
    return _merge_stats(st, llm.collective_rpc("sae_stats", args=(bool(reset),)))


async def stats_async(engine: Any, reset: bool = False) -> dict:
    st = await _EngineState.of_async(engine)
    return _merge_stats(st, await engine.collective_rpc("sae_stats", args=(bool(reset),)))


def detach_all(llm: Any) -> None:
    st = _EngineState.of(llm)
    st.admission.remove(None)
    llm.collective_rpc("sae_detach", args=(None,))


async def detach_async(engine: Any, name: Optional[str] = None) -> None:
    """Detach one SAE by name (None = all) from an async engine."""
    st = await _EngineState.of_async(engine)
    st.admission.remove(name)
    await engine.collective_rpc("sae_detach", args=(name,))


def steering_cache_salt(extra_args: Optional[Mapping[str, Any]], user_salt: Optional[str] = None,
                        namespace: str = "") -> Optional[str]:
    """``cache_salt`` for a request, for launchers that bypass the admission
    hook (it is installed for every engine by the entry point): a hash of the
    request's steering entries (and ``namespace``), or ``user_salt`` unchanged
    for an unsteered request. Identical steering gets identical salts."""
    entries = request_entries(extra_args)
    if not entries:
        return user_salt
    blob = json.dumps([namespace, entries], sort_keys=True,
                      default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
    return combine_salt(user_salt, hashlib.sha256(blob.encode()).hexdigest()[:32])


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
                st.admission.validate(p)
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
