"""Public steering ops with layered dispatch: compiled extension -> Triton -> torch.

Every path is a registered torch op (opaque to torch.compile, with a fake
implementation), so callers inside compiled or CUDA-graph-captured regions
always see one op call:

    torch.ops.sae_fast.*         C++ (CPU) and CUDA kernels from sae_fast._C
    torch.ops.sae_fast_triton.*  Triton kernels (GPU; CPU only under TRITON_INTERPRET=1)
    torch.ops.sae_fast_ref.*     the pure-torch oracle of reference.py

The path is chosen once per device type, logged once, and can be forced with
``SAE_FAST_BACKEND=ext|triton|reference`` (default ``auto``). A path lower than
the best one for the device, or other than the forced one, counts as a
fallback (``fallback_count()``), with one warning per device.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from typing import Optional

import torch

from sae_fast.ops import codes, reference
from sae_fast.ops.codes import (  # noqa: F401  (re-exported)
    ACT_IDENTITY,
    ACT_THRESHOLD_RELU,
    ACT_TOPK,
    MODE_ABLATE,
    MODE_ADD,
    MODE_CODES,
    MODE_OFF,
    MODE_SCALE,
    MODE_SET,
)

log = logging.getLogger(__name__)

BACKENDS = ("ext", "triton", "reference")

# ---------------------------------------------------------------- extension
_EXT_ERROR: Optional[str] = None
try:
    import sae_fast._C  # noqa: F401  (registers torch.ops.sae_fast.*)

    _EXT_DEVICES = set(torch.ops.sae_fast.build_info().split(","))
except Exception as err:  # ImportError, OSError (ABI mismatch), RuntimeError
    _EXT_DEVICES = set()
    _EXT_ERROR = f"{type(err).__name__}: {err}"


def _noop_fake(*args, **kwargs) -> None:
    """Fake (meta) implementation of every steering op, here and in
    triton_steer: they mutate hidden in place and return nothing."""
    return None


# an extension built before count_ existed still serves the steering ops
_EXT_COUNT = bool(_EXT_DEVICES) and hasattr(torch.ops.sae_fast, "count_")

if _EXT_DEVICES:
    for _name in ("steer_", "clamp_direction_", "add_vectors_") + (("count_",) if _EXT_COUNT else ()):
        torch.library.register_fake(f"sae_fast::{_name}")(_noop_fake)


# ---------------------------------------------------------------- reference as ops
@torch.library.custom_op("sae_fast_ref::steer_", mutates_args=("hidden",))
def _ref_steer(
    hidden: torch.Tensor, residual: Optional[torch.Tensor], enc_w: torch.Tensor,
    enc_b: torch.Tensor, threshold: torch.Tensor, dec_w: torch.Tensor, max_act: torch.Tensor,
    strengths: torch.Tensor, modes: torch.Tensor, row_index: torch.Tensor,
    topk_kth: Optional[torch.Tensor], activation: int, scale: float, min_strength: float,
    max_strength: float,
) -> None:
    reference.steer_(hidden, residual, enc_w, enc_b, threshold, dec_w, max_act, strengths, modes,
                     row_index, topk_kth, activation, scale, min_strength, max_strength)


@torch.library.custom_op("sae_fast_ref::clamp_direction_", mutates_args=("hidden",))
def _ref_clamp_direction(
    hidden: torch.Tensor, residual: Optional[torch.Tensor], directions: torch.Tensor,
    max_act: torch.Tensor, strengths: torch.Tensor, modes: torch.Tensor,
    row_index: torch.Tensor, scale: float, min_strength: float, max_strength: float,
) -> None:
    reference.clamp_direction_(hidden, residual, directions, max_act, strengths, modes,
                               row_index, scale, min_strength, max_strength)


@torch.library.custom_op("sae_fast_ref::add_vectors_", mutates_args=("hidden",))
def _ref_add_vectors(hidden: torch.Tensor, vectors: torch.Tensor, weights: torch.Tensor,
                     row_index: torch.Tensor) -> None:
    reference.add_vectors_(hidden, vectors, weights, row_index)


@torch.library.custom_op("sae_fast_ref::count_", mutates_args=("counter",))
def _ref_count(counter: torch.Tensor) -> None:
    counter.add_(1)


for _op in (_ref_steer, _ref_clamp_direction, _ref_add_vectors, _ref_count):
    _op.register_fake(_noop_fake)


# ---------------------------------------------------------------- triton
_TRITON_ERROR: Optional[str] = None
_TRITON_OPS = None


def _triton_ops():
    """Import the Triton kernels lazily (importing triton costs ~1 s)."""
    global _TRITON_OPS, _TRITON_ERROR
    if _TRITON_OPS is None and _TRITON_ERROR is None:
        try:
            from sae_fast.ops import triton_steer

            _TRITON_OPS = triton_steer.register_ops()
        except Exception as err:
            _TRITON_ERROR = f"{type(err).__name__}: {err}"
    return _TRITON_OPS


def _triton_usable(device_type: str) -> bool:
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    if device_type not in ("cpu", "cuda"):
        return False
    return _triton_ops() is not None


# ---------------------------------------------------------------- selection
_lock = threading.Lock()
_selected: dict[str, str] = {}
# devices whose chosen path is below their best one, or not the forced one
_fallback_devices: set[str] = set()
_fallbacks = 0


def _preferred(device_type: str) -> list[str]:
    forced = os.environ.get("SAE_FAST_BACKEND", "auto").strip().lower()
    if forced not in ("auto", *BACKENDS):
        raise ValueError(f"SAE_FAST_BACKEND={forced!r}; expected one of auto, {', '.join(BACKENDS)}")
    if forced != "auto":
        return [forced]
    if device_type == "cuda":
        return ["ext", "triton", "reference"]
    return ["ext", "reference"]


def _available(backend: str, device_type: str) -> bool:
    if backend == "ext":
        return device_type in _EXT_DEVICES
    if backend == "triton":
        return _triton_usable(device_type)
    return True


@torch._dynamo.assume_constant_result  # evaluated once at trace time, no graph break
def backend_for(device_type: str) -> str:
    """The op path used for tensors on ``device_type`` (chosen once, logged once)."""
    sel = _selected.get(device_type)
    if sel is not None:
        return sel
    with _lock:
        if device_type in _selected:
            return _selected[device_type]
        wanted = _preferred(device_type)
        chosen = next((b for b in wanted if _available(b, device_type)), "reference")
        if chosen != wanted[0]:
            _fallback_devices.add(device_type)
            why = {"ext": _EXT_ERROR or f"sae_fast._C has no {device_type} kernels",
                   "triton": _TRITON_ERROR or "triton unavailable for this device"}.get(wanted[0], "")
            msg = (f"sae_fast ops on {device_type}: {wanted[0]} unavailable ({why}); "
                   f"falling back to {chosen}")
            log.warning(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
        else:
            log.info("sae_fast ops on %s: using %s", device_type, chosen)
        _selected[device_type] = chosen
        return chosen


def reset_backend_selection() -> None:
    """Forget the per-device choice (tests that flip SAE_FAST_BACKEND use it)."""
    global _fallbacks
    with _lock:
        _selected.clear()
        _fallback_devices.clear()
        _resolved.clear()
        _fallbacks = 0


def fallback_count() -> int:
    """Eager op calls that ran on a lower path than the device's best one."""
    return _fallbacks


def backend_info() -> dict:
    return {
        "extension_devices": sorted(_EXT_DEVICES),
        "extension_error": _EXT_ERROR,
        "triton_error": _TRITON_ERROR,
        "selected": dict(_selected),
        "fallbacks": _fallbacks,
    }


def _namespace(device_type: str):
    global _fallbacks
    chosen = backend_for(device_type)
    if not torch.compiler.is_compiling() and device_type in _fallback_devices:
        _fallbacks += 1
    if chosen == "ext":
        return torch.ops.sae_fast
    if chosen == "triton":
        return _triton_ops()
    return torch.ops.sae_fast_ref


# (device type, op name) -> (backend, the resolved OpOverload), for eager
# calls: at decode sizes an op call is a few thousand FLOPs, so the Python
# above the kernel is most of its cost (BENCHMARKS.md, dispatch floor). An
# entry is used only while its backend is still the device's selection.
_resolved: dict = {}


def _op(name: str, device_type: str):
    if torch.compiler.is_compiling():  # traced once: dynamo sees the selection
        return getattr(_namespace(device_type), name)
    hit = _resolved.get((device_type, name))
    if hit is not None and hit[0] == _selected.get(device_type):
        return hit[1]
    packet = getattr(_namespace(device_type), name)  # selects, counts a fallback
    op = getattr(packet, "default", packet)  # triton_steer's ops may be plain callables
    if device_type not in _fallback_devices:  # fallback calls are counted each time
        _resolved[(device_type, name)] = (_selected.get(device_type), op)
    return op


# ---------------------------------------------------------------- public ops
def count_(counter: torch.Tensor) -> None:
    """``counter += 1`` in place as one opaque op call (the C++ one when the
    extension is loaded, else the reference custom op), so a compiled graph
    runs it exactly once per execution: Inductor lowers a plain ``add_`` on a
    one-element tensor into its CPU kernels, where, in a graph compiled while
    torch saw one thread and run with more (vLLM compiles with dynamic
    threads), every OpenMP thread performs the increment."""
    (torch.ops.sae_fast.count_ if _EXT_COUNT else torch.ops.sae_fast_ref.count_)(counter)


def steer_(
    hidden: torch.Tensor,
    residual: Optional[torch.Tensor],
    enc_w: torch.Tensor,
    enc_b: torch.Tensor,
    threshold: torch.Tensor,
    dec_w: torch.Tensor,
    max_act: torch.Tensor,
    strengths: torch.Tensor,
    modes: torch.Tensor,
    row_index: torch.Tensor,
    topk_kth: Optional[torch.Tensor] = None,
    activation: int = codes.ACT_THRESHOLD_RELU,
    scale: float = 1.0,
    min_strength: float = float("-inf"),
    max_strength: float = float("inf"),
) -> None:
    """Fused encode-selected -> modify -> decode-delta -> add, in place on ``hidden``.

    See ``reference.steer_`` for the exact semantics and shapes.
    """
    _op("steer_", hidden.device.type)(
        hidden, residual, enc_w, enc_b, threshold, dec_w, max_act, strengths, modes, row_index,
        topk_kth, int(activation), float(scale), float(min_strength), float(max_strength))


def clamp_direction_(
    hidden: torch.Tensor,
    residual: Optional[torch.Tensor],
    directions: torch.Tensor,
    max_act: torch.Tensor,
    strengths: torch.Tensor,
    modes: torch.Tensor,
    row_index: torch.Tensor,
    scale: float = 1.0,
    min_strength: float = float("-inf"),
    max_strength: float = float("inf"),
) -> None:
    """h' = h - (x.u)u + s*max_act*u for unit directions u, in place on ``hidden``."""
    _op("clamp_direction_", hidden.device.type)(
        hidden, residual, directions, max_act, strengths, modes, row_index, float(scale),
        float(min_strength), float(max_strength))


def add_vectors_(hidden: torch.Tensor, vectors: torch.Tensor, weights: torch.Tensor,
                 row_index: torch.Tensor) -> None:
    """hidden[t] += sum_j weights[row_index[t], j] * vectors[j], in place."""
    _op("add_vectors_", hidden.device.type)(hidden, vectors, weights, row_index)


