"""Every access to a private (underscore or undocumented) vLLM attribute lives
here, behind a check of the installed vLLM version against the tested range.

Outside the tested range a warning is logged once; a needed attribute that is
missing raises :class:`VLLMSteeringError` naming it, never a bare
AttributeError deep in a worker.
"""

from __future__ import annotations

import functools
import importlib
import logging
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np

log = logging.getLogger(__name__)

TESTED_VERSIONS = ("0.32",)  # major.minor prefixes this module was run against


class VLLMSteeringError(RuntimeError):
    """The engine cannot steer as asked (not set up for steering, op missing
    from the compiled graph, a vLLM internal that moved, a worker call failed)."""


@functools.lru_cache(maxsize=None)
def vllm_version() -> str:
    import vllm

    return str(getattr(vllm, "__version__", "unknown"))


@functools.lru_cache(maxsize=None)
def check_version() -> bool:
    """True if the installed vLLM is in the tested range (warns once if not)."""
    v = vllm_version()
    ok = any(v == t or v.startswith(t + ".") for t in TESTED_VERSIONS)
    if not ok:
        log.warning("sae_fast: vLLM %s is outside the tested range %s; steering hooks rely on "
                    "vLLM internals (sae_fast/backends/vllm_engine/_compat.py)", v, TESTED_VERSIONS)
    return ok


def _need(obj: Any, attr: str, what: str) -> Any:
    try:
        return getattr(obj, attr)
    except AttributeError:
        raise VLLMSteeringError(
            f"sae_fast: vLLM {vllm_version()} has no {type(obj).__name__}.{attr} ({what}); "
            f"tested with vLLM {', '.join(TESTED_VERSIONS)}") from None


# ---------------------------------------------------------------- classes
_RUNNER_CLASSES = (("vllm.v1.worker.gpu_model_runner", "GPUModelRunner"),
                   ("vllm.v1.worker.cpu_model_runner", "CPUModelRunner"),
                   ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner"),
                   ("vllm.v1.worker.cpu.model_runner", "CPUModelRunner"))


def runner_classes() -> Iterable[type]:
    """The model-runner classes of this vLLM build that define load_model."""
    for modname, clsname in _RUNNER_CLASSES:
        try:
            cls = getattr(importlib.import_module(modname), clsname)
        except Exception:  # this vLLM build lacks that runner
            continue
        if "load_model" in cls.__dict__:
            yield cls


def input_processor_class() -> type:
    from vllm.v1.engine.input_processor import InputProcessor

    return InputProcessor


def validation_error() -> type:
    """vLLM's request-validation error (HTTP 400 in the OpenAI server)."""
    try:
        from vllm.exceptions import VLLMValidationError

        return VLLMValidationError
    except ImportError:  # older vLLM: the server maps ValueError to 400
        return ValueError


def resolve_qualname(qualname: str) -> Any:
    from vllm.utils.import_utils import resolve_obj_by_qualname

    return resolve_obj_by_qualname(qualname)


# ---------------------------------------------------------------- engines
def input_processor_of(engine: Any) -> Any:
    """The InputProcessor of an offline LLM, an LLMEngine or an AsyncLLM."""
    for obj in (engine, getattr(engine, "llm_engine", None)):
        proc = getattr(obj, "input_processor", None)
        if proc is not None:
            return proc
    raise VLLMSteeringError(f"cannot find the input processor of {type(engine).__name__} "
                            f"(vLLM {vllm_version()})")


def vllm_config_of(engine: Any) -> Any:
    for obj in (engine, getattr(engine, "llm_engine", None)):
        cfg = getattr(obj, "vllm_config", None)
        if cfg is not None:
            return cfg
    return getattr(input_processor_of(engine), "vllm_config")


def wrap_assign_request_id(admit: Callable[[Any, Any], None]) -> Callable[[], None]:
    """Call ``admit(processor, request)`` for every request any engine of this
    process adds (offline LLM, AsyncLLM, the OpenAI server), before vLLM gives
    it an internal id. Returns an undo function."""
    cls = input_processor_class()
    raw = cls.__dict__.get("assign_request_id")
    if getattr(raw, "_sae_fast_original", None) is not None:
        return lambda: None
    if raw is None:
        raise VLLMSteeringError(f"sae_fast: vLLM {vllm_version()} has no "
                                "InputProcessor.assign_request_id (request admission hook)")
    original = raw.__func__ if isinstance(raw, staticmethod) else raw
    bound_static = isinstance(raw, staticmethod)

    def assign_request_id(self, request):
        admit(self, request)
        return original(request) if bound_static else original(self, request)

    assign_request_id._sae_fast_original = raw  # type: ignore[attr-defined]
    cls.assign_request_id = assign_request_id

    def undo() -> None:
        cls.assign_request_id = raw

    return undo


# ---------------------------------------------------------------- workers
def wrap_runner_load_model(cls: type, after: Callable[[Any], None]) -> Any:
    """Make ``cls.load_model`` call ``after(runner)`` once the model is built
    (before it is compiled or captured). Returns the original."""
    original = cls.__dict__["load_model"]

    @functools.wraps(original)
    def load_model(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        after(self)
        return result

    cls.load_model = load_model
    return original


def hook_runner_step(runner: Any, on_step: Callable[[Any, Sequence[str], np.ndarray], None]) -> str:
    """Call ``on_step(scheduler_output, req_ids, tokens_per_request)`` after the
    runner has prepared each step's inputs and before the forward pass.
    Returns which runner API was hooked."""
    if hasattr(runner, "_prepare_inputs") and hasattr(runner, "input_batch"):  # V1 runner
        orig = runner._prepare_inputs

        def _prepare_inputs(scheduler_output, num_scheduled_tokens, *a, **kw):
            out = orig(scheduler_output, num_scheduled_tokens, *a, **kw)
            on_step(scheduler_output, runner.input_batch.req_ids, num_scheduled_tokens)
            return out

        runner._prepare_inputs = _prepare_inputs
        return "v1"
    if hasattr(runner, "prepare_inputs"):  # V2 runner (written against 0.32, not run on CPU)
        orig2 = runner.prepare_inputs

        def prepare_inputs(scheduler_output, *a, **kw):
            batch = orig2(scheduler_output, *a, **kw)
            n = int(batch.num_reqs)
            counts = np.diff(np.asarray(batch.query_start_loc_np[: n + 1])).astype(np.int64)
            on_step(scheduler_output, batch.req_ids, counts)
            return batch

        runner.prepare_inputs = prepare_inputs
        return "v2"
    raise VLLMSteeringError(f"sae_fast: unknown vLLM model runner {type(runner).__name__} "
                            f"(vLLM {vllm_version()}): cannot map tokens to requests")


def finished_request_ids(scheduler_output: Any) -> Iterable[str]:
    return getattr(scheduler_output, "finished_req_ids", None) or ()


def new_requests(scheduler_output: Any) -> Iterable[Any]:
    """NewRequestData of this step (req_id, sampling_params, num_computed_tokens)."""
    return getattr(scheduler_output, "scheduled_new_reqs", None) or ()


def runner_model(runner: Any) -> Any:
    return _need(runner, "get_model", "the model runner's model")()


def max_tokens_per_step(runner: Any, vllm_config: Any) -> int:
    return max(int(getattr(runner, "max_num_tokens", 0) or 0),
               int(vllm_config.scheduler_config.max_num_batched_tokens))


def sequence_parallel(vllm_config: Any) -> bool:
    pc = vllm_config.compilation_config.pass_config
    return bool(getattr(pc, "enable_sp", False) or getattr(pc, "enable_sequence_parallelism", False))


def compiled(vllm_config: Any) -> bool:
    mode = vllm_config.compilation_config.mode
    return (not vllm_config.model_config.enforce_eager
            and int(getattr(mode, "value", mode) or 0) != 0)


def text_hidden_size(vllm_config: Any) -> int:
    cfg = vllm_config.model_config.hf_config
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    return int(cfg.hidden_size)


def is_pipeline_placeholder(layer: Any) -> bool:
    return type(layer).__name__ == "PPMissingLayer"


def worker_extension_qualname(vllm_config: Any) -> str:
    return getattr(vllm_config.parallel_config, "worker_extension_cls", "") or ""


def additional_config(vllm_config: Any) -> Optional[dict]:
    extra = getattr(vllm_config, "additional_config", None)
    return extra if isinstance(extra, dict) else None
