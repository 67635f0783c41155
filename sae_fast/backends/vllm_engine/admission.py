"""Request admission in the serving process, for every engine that opted in
(offline ``LLM``, ``AsyncLLM``, the OpenAI server, verl's rollout servers).

Installed at class level on vLLM's ``InputProcessor`` by ``install()``: each
request is validated against the SAEs attached to its engine before the
engine sees it (a bad request raises a ``VLLMValidationError``: HTTP 400 in
the OpenAI server, an exception in ``LLM.generate``), and every steered
request gets the steering fingerprint as ``cache_salt``, so prefix KV is only
shared by requests with identical steering.

The SAEs come from ``additional_config["sae_fast"]["saes"]`` (loaded on the
host when the engine starts: only their compact plans are kept) and from
``attach``/``attach_async``, which add and remove groups here.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from sae_fast.backends.common import AttachedSAE, resolve_request
from sae_fast.backends.vllm_engine import _compat
from sae_fast.backends.vllm_engine.config import ServeConfig
from sae_fast.backends.vllm_engine.groups import combine_salt, steering_fingerprint
from sae_fast.plan import SteeringSpecError
from sae_fast.request import request_entries

log = logging.getLogger(__name__)

_STATE_ATTR = "_sae_fast_admission"
_NOT_OPTED_IN = object()


class SteeringRequestError(SteeringSpecError):
    """One request's steering is invalid; ``index`` is its position in the batch."""

    def __init__(self, message: str, index: Optional[int] = None) -> None:
        super().__init__(message)
        self.index = index


_REJECT_CLASS: Optional[type] = None


def rejection(message: str) -> Exception:
    """A SteeringRequestError that vLLM's servers map to HTTP 400."""
    global _REJECT_CLASS
    if _REJECT_CLASS is None:
        base = _compat.validation_error()
        if base is ValueError:
            _REJECT_CLASS = SteeringRequestError
        else:
            class SteeringRequestRejected(SteeringRequestError, base):  # type: ignore[misc, valid-type]
                def __init__(self, msg: str) -> None:
                    SteeringRequestError.__init__(self, msg)
                    self.parameter = "vllm_xargs"
                    self.value = None

            _REJECT_CLASS = SteeringRequestRejected
    return _REJECT_CLASS(message)


class Admission:
    """Steering state of one engine's serving side: attached groups, the
    attach/enable epoch (part of every salt), and counters."""

    def __init__(self, vllm_config: Any, cfg: ServeConfig) -> None:
        from sae_fast.backends.vllm_engine.worker import configured_groups

        self.config = cfg
        self.groups: dict[str, AttachedSAE] = {}
        self.epoch = 0
        self.salt = bool(cfg.salt_prefix_cache)
        self.counters: dict[str, dict[str, int]] = {}
        self.rejected = 0
        if not cfg.saes:
            return
        hf = vllm_config.model_config.hf_config
        text = hf.get_text_config() if hasattr(hf, "get_text_config") else hf
        _, groups = configured_groups(cfg, int(text.num_hidden_layers), int(text.hidden_size))
        for group in groups:
            self.add(group)
        log.info("sae_fast: serving with SAEs %s", {n: g.layers for n, g in self.groups.items()})

    def add(self, group: AttachedSAE) -> None:
        self.groups[group.name] = group
        self.counters.setdefault(group.name, {"admitted": 0})
        self.epoch += 1

    def remove(self, name: Optional[str]) -> None:
        for n in list(self.groups) if name is None else [name]:
            self.groups.pop(n, None)
        self.epoch += 1

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
        try:
            values = self.validate(params)
        except SteeringSpecError as err:
            self.rejected += 1
            _metrics().rejected.inc()
            raise rejection(f"sae_fast steering: {err}") from None
        if not values:
            return
        for name in values:
            self.counters[name]["admitted"] += 1
            _metrics().admitted.labels(sae=name).inc()
        if self.salt:
            fp = steering_fingerprint(values, self.groups, self.epoch)
            request.cache_salt = combine_salt(request.cache_salt, fp)


def state_of(processor: Any) -> Optional[Admission]:
    """The Admission of an InputProcessor (created on first use from its
    engine's config), or None for an engine that did not opt in."""
    st = getattr(processor, _STATE_ATTR, None)
    if st is _NOT_OPTED_IN:
        return None
    if st is not None:
        return st
    from sae_fast.backends.vllm_engine.patch import opted_in

    vcfg = getattr(processor, "vllm_config", None)
    cfg = opted_in(vcfg) if vcfg is not None else None
    if cfg is None:
        setattr(processor, _STATE_ATTR, _NOT_OPTED_IN)
        return None
    st = Admission(vcfg, cfg)
    setattr(processor, _STATE_ATTR, st)
    return st


def admit(processor: Any, request: Any) -> None:
    """The class-level hook: validate and salt one request."""
    st = state_of(processor)
    if st is not None:
        st.admit(request)


class _Metrics:
    """Prometheus counters in the serving process (the OpenAI server's
    ``/metrics`` shows them): steered requests per attached SAE, rejections."""

    def __init__(self) -> None:
        self.admitted = self.rejected = _NoCounter()
        try:
            from prometheus_client import Counter

            self.admitted = Counter("sae_fast_steered_requests", "Requests admitted with SAE "
                                    "steering (sae_fast), per attached SAE", ["sae"])
            self.rejected = Counter("sae_fast_rejected_requests", "Requests whose SAE steering "
                                    "was rejected at admission (sae_fast)")
        except Exception as err:  # no prometheus_client, or registered twice
            log.debug("sae_fast: no Prometheus counters: %s", err)


class _NoCounter:
    def inc(self, n: float = 1) -> None:
        pass

    def labels(self, **kw: str) -> "_NoCounter":
        return self


_METRICS: Optional[_Metrics] = None


def _metrics() -> _Metrics:
    global _METRICS
    if _METRICS is None:
        _METRICS = _Metrics()
    return _METRICS
