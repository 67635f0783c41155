"""Triton kernels for the steering ops (the middle layer of ext -> Triton -> torch).

Same maths and arguments as ``reference.py`` (SPEC section 1). Each op is at
most two launches on the current stream, with no host synchronisation and no
data-dependent shapes, so it can be captured in a CUDA graph:

1. ``_steer_coef_kernel``: per tile of (token rows x selected features), the
   pre-activations of the features that need an encode (set/scale/ablate) are
   ``(hidden + residual) @ enc_w.T + enc_b`` in fp32, then the activation and
   the mode give ``coef[t, c] = f'_c - f_c`` (written to a small fp32 scratch
   ``[T, k]``). ``add_vectors_`` skips this step: its coefficients are the
   rows of ``weights`` picked by ``row_index``.
2. ``_add_rows_kernel``: per tile of (token rows x hidden columns),
   ``hidden += coef @ dec_w`` accumulated in fp32 and rounded once. Rows whose
   coefficients are all zero (every mode off: row 0, padding, unsteered
   requests) are never stored, so they stay bit-identical.

Two launches rather than one fused kernel because every coefficient of a row
must be known before any column of that row is written (the encode reads the
unsteered row), and because splitting the decode over hidden columns keeps
the GPU busy at decode-time batch sizes (T of 1..64). The scratch is a normal
caching-allocator tensor; under CUDA-graph capture it comes from the graph's
pool like any activation.

Everything runs in fp32 whatever the input dtype (``tl.dot`` with
``input_precision="ieee"``, no TF32). Tables must be contiguous; ``hidden``
and ``residual`` only need a contiguous last dimension.

Differences from the C++ path that come from "no host sync": ``row_index``
entries outside ``[0, R)`` cannot be checked on the host for GPU tensors, so
the kernels treat such token rows as no-ops (on CPU tensors, i.e. under
``TRITON_INTERPRET=1``, they are rejected with the C++ message). Unknown mode
codes act as "off".

``import triton`` happens only here; ``sae_fast.ops`` imports this module
lazily. ``TRITON_INTERPRET=1`` must be set before that import for the kernels
to run on CPU tensors (``triton.jit`` reads it when a kernel is decorated).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from sae_fast.ops import _noop_fake, codes  # the ops return nothing: one no-op fake serves all

NAMESPACE = "sae_fast_triton"

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Fixed tile sizes (no autotuning: it would launch benchmark runs, also during
# CUDA-graph capture). The fp32 "ieee" tl.dot runs on FMA units and keeps its
# operands in registers; with 8 warps, BLOCK_T <= 64 and these sizes, sm_90
# builds (triton 3.9, fp32/fp16/bf16) use <= 190 registers and spill nothing,
# while 4 warps or BLOCK_D = 128 spill. tl.dot needs every block dim >= 16.
_NUM_WARPS = 8
_COEF_BLOCK_D = 32
_COEF_BLOCK_D_DECODE = 128  # T <= 16: tiles of 16 rows x 16 features
_ADD_BLOCK_K = 16
_ADD_BLOCK_D = 64


class SteerArgumentError(ValueError, RuntimeError):
    """Bad arguments to a Triton steering op.

    Also a RuntimeError, which is what the C++ ops raise (TORCH_CHECK), so a
    caller can catch either the same way on every backend.
    """


# ---------------------------------------------------------------- kernels
@triton.jit
def _steer_coef_kernel(
    hidden_ptr, residual_ptr, enc_w_ptr, enc_b_ptr, threshold_ptr, max_act_ptr,
    strengths_ptr, modes_ptr, row_index_ptr, kth_ptr, coef_ptr,
    T, d, k, R, stride_h, stride_r,
    scale, lo, hi,
    HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_THRESHOLD: tl.constexpr,
    ACTIVATION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """coef[t, c] = f'_c - f_c for a BLOCK_T x BLOCK_K tile (fp32)."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    feats = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    rows64 = rows.to(tl.int64)
    feats64 = feats.to(tl.int64)
    in_rows = rows < T
    feat_ok = feats < k

    r = tl.load(row_index_ptr + rows64, mask=in_rows, other=0).to(tl.int64)
    row_ok = in_rows & (r >= 0) & (r < R)  # out-of-range rows: no-op (no host check on GPU)
    tile_ok = row_ok[:, None] & feat_ok[None, :]
    rk = r[:, None] * k + feats64[None, :]
    mode = tl.load(modes_ptr + rk, mask=tile_ok, other=0).to(tl.int32)
    s = tl.load(strengths_ptr + rk, mask=tile_ok, other=0.0)
    # clamp that keeps NaN (like torch.clamp), so a NaN strength is never hidden
    s = tl.where(s < lo, lo, s)
    s = tl.where(s > hi, hi, s)
    s = s * scale

    # Only set/scale/ablate need the feature's current activation.
    need = ((mode == 2) | (mode == 3) | (mode == 4)).to(tl.int32)
    need_row = tl.max(need, axis=1) > 0
    need_feat = tl.max(need, axis=0) > 0
    pre = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    if tl.max(need_row.to(tl.int32), axis=0) > 0:
        for d0 in range(0, d, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            col_ok = cols < d
            xmask = need_row[:, None] & col_ok[None, :]
            x = tl.load(hidden_ptr + rows64[:, None] * stride_h + cols[None, :], mask=xmask,
                        other=0.0).to(tl.float32)
            if HAS_RESIDUAL:
                x += tl.load(residual_ptr + rows64[:, None] * stride_r + cols[None, :],
                             mask=xmask, other=0.0).to(tl.float32)
            w = tl.load(enc_w_ptr + feats64[:, None] * d + cols[None, :],
                        mask=need_feat[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
            pre = tl.dot(x, tl.trans(w), pre, input_precision="ieee")
    if HAS_BIAS:
        pre += tl.load(enc_b_ptr + feats64, mask=feat_ok, other=0.0)[None, :]

    zero = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    if ACTIVATION == 0:  # threshold-relu (ReLU: threshold 0; JumpReLU)
        if HAS_THRESHOLD:
            thr = tl.load(threshold_ptr + feats64, mask=feat_ok, other=0.0)
        else:
            thr = tl.zeros([BLOCK_K], dtype=tl.float32)
        f = tl.where(pre > thr[None, :], pre, zero)
    elif ACTIVATION == 1:  # identity (clamp_direction)
        f = pre
    else:  # exact TopK: keep if pre >= k-th largest full pre-activation and > 0
        kth = tl.load(kth_ptr + rows64, mask=in_rows, other=0.0)
        f = tl.where((pre >= kth[:, None]) & (pre > 0.0), pre, zero)

    max_act = tl.load(max_act_ptr + feats64, mask=feat_ok, other=0.0)
    coef = tl.where(mode == 1, s, zero)
    coef = tl.where(mode == 2, s * max_act[None, :] - f, coef)
    coef = tl.where(mode == 3, f * s - f, coef)
    coef = tl.where(mode == 4, -f, coef)
    tl.store(coef_ptr + rows64[:, None] * k + feats64[None, :], coef,
             mask=in_rows[:, None] & feat_ok[None, :])


@triton.jit
def _add_rows_kernel(
    hidden_ptr, table_ptr, coef_ptr, row_index_ptr,
    T, d, k, R, stride_h, stride_c,
    GATHER: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """hidden[t, cols] += sum_c coef[row(t), c] * table[c, cols], one rounding.

    row(t) = row_index[t] when GATHER (add_vectors_), else t (steer scratch).
    Rows with no nonzero coefficient are not stored (bit-identical no-op).
    """
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rows64 = rows.to(tl.int64)
    in_rows = rows < T
    col_ok = cols < d
    if GATHER:
        crow = tl.load(row_index_ptr + rows64, mask=in_rows, other=0).to(tl.int64)
        row_ok = in_rows & (crow >= 0) & (crow < R)
    else:
        crow = rows64
        row_ok = in_rows

    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    nonzero = tl.zeros([BLOCK_T], dtype=tl.int32)
    for k0 in range(0, k, BLOCK_K):
        feats = k0 + tl.arange(0, BLOCK_K)
        feats64 = feats.to(tl.int64)
        feat_ok = feats < k
        c = tl.load(coef_ptr + crow[:, None] * stride_c + feats64[None, :],
                    mask=row_ok[:, None] & feat_ok[None, :], other=0.0)
        c_nz = (c != 0.0).to(tl.int32)  # NaN counts as nonzero: it must show
        nonzero = tl.maximum(nonzero, tl.max(c_nz, axis=1))
        feat_nz = tl.max(c_nz, axis=0) > 0
        w = tl.load(table_ptr + feats64[:, None] * d + cols[None, :],
                    mask=feat_nz[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(c, w, acc, input_precision="ieee")

    store = (nonzero > 0)[:, None] & col_ok[None, :]
    ptrs = hidden_ptr + rows64[:, None] * stride_h + cols[None, :]
    h = tl.load(ptrs, mask=store, other=0.0)
    tl.store(ptrs, (h.to(tl.float32) + acc).to(h.dtype), mask=store)


# ---------------------------------------------------------------- host checks
# Messages follow csrc/steer_common.h so every backend reports bad input alike.
def _fail(*parts) -> None:
    raise SteerArgumentError("".join(str(p) for p in parts))


def _shape(t: torch.Tensor) -> list:
    return list(t.shape)


def _check_same_device(hidden: torch.Tensor, t: torch.Tensor, name: str) -> None:
    if t.device != hidden.device:
        _fail(name, " is on ", t.device, " but hidden is on ", hidden.device)


def _check_row_major(t: torch.Tensor, name: str) -> None:
    if t.dim() != 2:
        _fail(name, " must be 2-D [rows, d], got shape ", _shape(t))
    if t.shape[1] > 1 and t.stride(1) != 1:
        _fail(name, " must have a contiguous last dimension, got strides ", list(t.stride()))


def _check_vec(hidden: torch.Tensor, t: torch.Tensor, name: str, k: int) -> None:
    if t.dim() != 1 or t.shape[0] != k:
        _fail(name, " must have shape [", k, "], got ", _shape(t))
    if t.dtype != torch.float32:
        _fail(name, " must be float32, got ", t.dtype)
    if not t.is_contiguous():
        _fail(name, " must be contiguous")
    _check_same_device(hidden, t, name)


def _check_hidden(hidden: torch.Tensor, residual: Optional[torch.Tensor]) -> None:
    _check_row_major(hidden, "hidden")
    if hidden.dtype not in _FLOAT_DTYPES:
        _fail("hidden must be float32, float16 or bfloat16, got ", hidden.dtype)
    if residual is not None:
        _check_row_major(residual, "residual")
        if residual.shape != hidden.shape:
            _fail("residual shape ", _shape(residual), " must equal hidden shape ", _shape(hidden))
        if residual.dtype != hidden.dtype:
            _fail("residual dtype ", residual.dtype, " must equal hidden dtype ", hidden.dtype)
        _check_same_device(hidden, residual, "residual")
    dev = hidden.device.type
    if dev == "cpu":
        if not _INTERPRETED:
            _fail("Triton kernels run on CPU tensors only under TRITON_INTERPRET=1, set before "
                  "triton is imported; hidden is on cpu")
    elif dev != "cuda":
        _fail("Triton steering kernels need cuda tensors (or cpu under TRITON_INTERPRET=1), "
              "hidden is on ", hidden.device)


def _check_table(hidden: torch.Tensor, w: torch.Tensor, name: str) -> None:
    if w.dim() != 2 or w.shape[1] != hidden.shape[1]:
        _fail(name, " must have shape [k, ", hidden.shape[1], "], got ", _shape(w))
    if w.dtype != hidden.dtype:
        _fail(name, " dtype ", w.dtype, " must equal hidden dtype ", hidden.dtype)
    if not w.is_contiguous():
        _fail(name, " must be contiguous")
    _check_same_device(hidden, w, name)


def _check_rows(hidden: torch.Tensor, strengths: torch.Tensor, row_index: torch.Tensor, k: int,
                strengths_name: str) -> None:
    if strengths.dim() != 2 or strengths.shape[1] != k or strengths.shape[0] < 1:
        _fail(strengths_name, " must have shape [R >= 1, ", k, "], got ", _shape(strengths))
    if strengths.dtype != torch.float32:
        _fail(strengths_name, " must be float32, got ", strengths.dtype)
    if not strengths.is_contiguous():
        _fail(strengths_name, " must be contiguous")
    _check_same_device(hidden, strengths, strengths_name)
    if row_index.dim() != 1 or row_index.shape[0] != hidden.shape[0]:
        _fail("row_index must have shape [", hidden.shape[0],
              "] (one entry per hidden row), got ", _shape(row_index))
    if row_index.dtype not in (torch.int32, torch.int64):
        _fail("row_index must be int32 or int64, got ", row_index.dtype)
    if not row_index.is_contiguous():
        _fail("row_index must be contiguous")
    _check_same_device(hidden, row_index, "row_index")
    # A range check needs the values on the host: free for CPU tensors, a sync
    # on GPU (not allowed: graph capture), where the kernels skip such rows.
    if row_index.device.type == "cpu" and row_index.numel() > 0:
        R = strengths.shape[0]
        bad = ((row_index < 0) | (row_index >= R)).nonzero()
        if bad.numel() > 0:
            t = int(bad[0, 0])
            _fail("row_index[", t, "] = ", int(row_index[t]), " is outside [0, ", R,
                  ") (rows of ", strengths_name, ")")


def _check_modes(hidden: torch.Tensor, modes: torch.Tensor, strengths: torch.Tensor) -> None:
    if modes.shape != strengths.shape:
        _fail("modes shape ", _shape(modes), " must equal strengths shape ", _shape(strengths))
    if modes.dtype != torch.int8:
        _fail("modes must be int8, got ", modes.dtype)
    if not modes.is_contiguous():
        _fail("modes must be contiguous")
    _check_same_device(hidden, modes, "modes")


def _check_strength_bounds(min_strength: float, max_strength: float) -> None:
    if not min_strength <= max_strength:
        _fail("min_strength (", min_strength, ") must be <= max_strength (", max_strength, ")")


# ---------------------------------------------------------------- launchers
def _pow2_between(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def _coef_blocks(T: int, k: int) -> dict:
    """Tile sizes of ``_steer_coef_kernel`` for T token rows and k features."""
    # Few rows (decode): narrower feature tiles give more programs to spread k*d
    # over, and a 16 x 16 tile leaves the registers for 4x wider d steps (256
    # spills in fp32): the serial loop over d bounds a decode call (H100, T=1,
    # d=4096: 160 us with 32-wide steps).
    if T <= 16:
        return dict(BLOCK_T=16, BLOCK_K=16, BLOCK_D=_COEF_BLOCK_D_DECODE)
    return dict(BLOCK_T=_pow2_between(T, 16, 64), BLOCK_K=_pow2_between(k, 16, 32),
                BLOCK_D=_COEF_BLOCK_D)


def _add_blocks(T: int) -> dict:
    """Tile sizes of ``_add_rows_kernel`` for T token rows."""
    return dict(BLOCK_T=_pow2_between(T, 16, 64), BLOCK_K=_ADD_BLOCK_K, BLOCK_D=_ADD_BLOCK_D)


def _launch_coef(hidden, residual, enc_w, enc_b, threshold, max_act, strengths, modes,
                 row_index, topk_kth, activation: int, scale: float, lo: float,
                 hi: float) -> torch.Tensor:
    T, d = hidden.shape
    k = enc_w.shape[0]
    coef = torch.empty((T, k), dtype=torch.float32, device=hidden.device)
    blocks = _coef_blocks(T, k)
    grid = (triton.cdiv(T, blocks["BLOCK_T"]), triton.cdiv(k, blocks["BLOCK_K"]))
    _steer_coef_kernel[grid](
        hidden, residual if residual is not None else hidden, enc_w,
        enc_b if enc_b is not None else max_act, threshold if threshold is not None else max_act,
        max_act, strengths, modes, row_index, topk_kth if topk_kth is not None else max_act, coef,
        T, d, k, strengths.shape[0], hidden.stride(0),
        residual.stride(0) if residual is not None else 0,
        float(scale), float(lo), float(hi),
        HAS_RESIDUAL=residual is not None, HAS_BIAS=enc_b is not None,
        HAS_THRESHOLD=threshold is not None, ACTIVATION=int(activation),
        num_warps=_NUM_WARPS, **blocks,
    )
    return coef


def _launch_add_rows(hidden, table, coef, row_index: Optional[torch.Tensor]) -> None:
    T, d = hidden.shape
    k = table.shape[0]
    blocks = _add_blocks(T)
    grid = (triton.cdiv(T, blocks["BLOCK_T"]), triton.cdiv(d, blocks["BLOCK_D"]))
    _add_rows_kernel[grid](
        hidden, table, coef, row_index if row_index is not None else coef,
        T, d, k, coef.shape[0], hidden.stride(0), coef.stride(0),
        GATHER=row_index is not None,
        num_warps=_NUM_WARPS, **blocks,
    )


def steer_(
    hidden: torch.Tensor, residual: Optional[torch.Tensor], enc_w: torch.Tensor,
    enc_b: torch.Tensor, threshold: torch.Tensor, dec_w: torch.Tensor, max_act: torch.Tensor,
    strengths: torch.Tensor, modes: torch.Tensor, row_index: torch.Tensor,
    topk_kth: Optional[torch.Tensor], activation: int, scale: float, min_strength: float,
    max_strength: float,
) -> None:
    """Triton ``steer_`` (semantics of ``reference.steer_``), in place on ``hidden``."""
    _check_hidden(hidden, residual)
    _check_table(hidden, enc_w, "enc_w")
    k = enc_w.shape[0]
    _check_table(hidden, dec_w, "dec_w")
    if dec_w.shape[0] != k:
        _fail("dec_w has ", dec_w.shape[0], " rows but enc_w has ", k)
    _check_vec(hidden, enc_b, "enc_b", k)
    _check_vec(hidden, threshold, "threshold", k)
    _check_vec(hidden, max_act, "max_act", k)
    _check_rows(hidden, strengths, row_index, k, "strengths")
    _check_modes(hidden, modes, strengths)
    if activation not in codes.ACT_NAMES:
        _fail("activation must be 0 (threshold_relu), 1 (identity) or 2 (topk), got ", activation)
    if activation == codes.ACT_TOPK:
        kth = topk_kth
        if kth is None:
            _fail("activation=2 (topk) needs topk_kth [T]")
        if not (kth.dim() == 1 and kth.shape[0] == hidden.shape[0] and kth.dtype == torch.float32
                and kth.is_contiguous()):
            _fail("topk_kth must be a contiguous float32 [", hidden.shape[0], "], got ",
                  _shape(kth), " ", kth.dtype)
        _check_same_device(hidden, kth, "topk_kth")
    else:
        topk_kth = None
    _check_strength_bounds(min_strength, max_strength)
    if hidden.shape[0] == 0 or hidden.shape[1] == 0 or k == 0:
        return
    coef = _launch_coef(hidden, residual, enc_w, enc_b, threshold, max_act, strengths, modes,
                        row_index, topk_kth, activation, scale, min_strength, max_strength)
    _launch_add_rows(hidden, dec_w, coef, None)


def clamp_direction_(
    hidden: torch.Tensor, residual: Optional[torch.Tensor], directions: torch.Tensor,
    max_act: torch.Tensor, strengths: torch.Tensor, modes: torch.Tensor, row_index: torch.Tensor,
    scale: float, min_strength: float, max_strength: float,
) -> None:
    """Triton ``clamp_direction_``: steer_ with identity activation, u as encoder and decoder."""
    _check_hidden(hidden, residual)
    _check_table(hidden, directions, "directions")
    k = directions.shape[0]
    _check_vec(hidden, max_act, "max_act", k)
    _check_rows(hidden, strengths, row_index, k, "strengths")
    _check_modes(hidden, modes, strengths)
    _check_strength_bounds(min_strength, max_strength)
    if hidden.shape[0] == 0 or hidden.shape[1] == 0 or k == 0:
        return
    coef = _launch_coef(hidden, residual, directions, None, None, max_act, strengths, modes,
                        row_index, None, codes.ACT_IDENTITY, scale, min_strength, max_strength)
    _launch_add_rows(hidden, directions, coef, None)


def add_vectors_(hidden: torch.Tensor, vectors: torch.Tensor, weights: torch.Tensor,
                 row_index: torch.Tensor) -> None:
    """Triton ``add_vectors_``: hidden[t] += weights[row_index[t]] @ vectors, in place."""
    _check_hidden(hidden, None)
    _check_table(hidden, vectors, "vectors")
    k = vectors.shape[0]
    _check_rows(hidden, weights, row_index, k, "weights")
    if hidden.shape[0] == 0 or hidden.shape[1] == 0 or k == 0:
        return
    _launch_add_rows(hidden, vectors, weights, row_index)


def _is_interpreted(kernel) -> bool:
    return type(kernel).__name__ == "InterpretedFunction"


# triton.jit picks the interpreter when the kernel is decorated (module import).
_INTERPRETED = _is_interpreted(_steer_coef_kernel)


# ---------------------------------------------------------------- torch ops
def _has_op(name: str) -> bool:
    try:
        getattr(getattr(torch.ops, NAMESPACE), name)
    except (AttributeError, RuntimeError):
        return False
    return True


def register_ops():
    """Define ``torch.ops.sae_fast_triton.{steer_, clamp_direction_, add_vectors_}``.

    Idempotent (safe to call twice, also after a module reload). Returns the
    op namespace; its ops take exactly the arguments of ``torch.ops.sae_fast_ref``.
    """
    if not _has_op("steer_"):
        @torch.library.custom_op(f"{NAMESPACE}::steer_", mutates_args=("hidden",))
        def _steer_op(
            hidden: torch.Tensor, residual: Optional[torch.Tensor], enc_w: torch.Tensor,
            enc_b: torch.Tensor, threshold: torch.Tensor, dec_w: torch.Tensor,
            max_act: torch.Tensor, strengths: torch.Tensor, modes: torch.Tensor,
            row_index: torch.Tensor, topk_kth: Optional[torch.Tensor], activation: int,
            scale: float, min_strength: float, max_strength: float,
        ) -> None:
            steer_(hidden, residual, enc_w, enc_b, threshold, dec_w, max_act, strengths, modes,
                   row_index, topk_kth, activation, scale, min_strength, max_strength)

        _steer_op.register_fake(_noop_fake)

    if not _has_op("clamp_direction_"):
        @torch.library.custom_op(f"{NAMESPACE}::clamp_direction_", mutates_args=("hidden",))
        def _clamp_direction_op(
            hidden: torch.Tensor, residual: Optional[torch.Tensor], directions: torch.Tensor,
            max_act: torch.Tensor, strengths: torch.Tensor, modes: torch.Tensor,
            row_index: torch.Tensor, scale: float, min_strength: float, max_strength: float,
        ) -> None:
            clamp_direction_(hidden, residual, directions, max_act, strengths, modes, row_index,
                             scale, min_strength, max_strength)

        _clamp_direction_op.register_fake(_noop_fake)

    if not _has_op("add_vectors_"):
        @torch.library.custom_op(f"{NAMESPACE}::add_vectors_", mutates_args=("hidden",))
        def _add_vectors_op(hidden: torch.Tensor, vectors: torch.Tensor, weights: torch.Tensor,
                            row_index: torch.Tensor) -> None:
            add_vectors_(hidden, vectors, weights, row_index)

        _add_vectors_op.register_fake(_noop_fake)

    return getattr(torch.ops, NAMESPACE)
