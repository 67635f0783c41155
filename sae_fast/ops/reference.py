"""Pure-torch oracle for every steering op (SPEC section 1).

Tests and benchmarks import these; every kernel (C++, CUDA, Triton) must
match them. All arithmetic runs in fp32 whatever the input dtype, and the
result is rounded once into ``hidden``'s dtype.

Shapes (T token rows, d hidden size, k selected features, R strengths rows):
    hidden, residual : [T, d]    residual optional; the residual stream is
                                 hidden + residual, the delta goes into hidden
    enc_w            : [k, d]    selected encoder columns, transposed (folded
                                 with any input normalisation)
    enc_b            : [k]       effective encoder bias (b_enc - b_dec @ W_enc)
    threshold        : [k]       activation threshold (>= 0; 0 for ReLU SAEs)
    dec_w            : [k, d]    selected decoder rows (folded with 1/norm scale)
    max_act          : [k]       per-feature max activation (set mode)
    strengths        : [R, k]    fp32 per-row strengths; row 0 unused (off)
    modes            : [R, k]    int8 codes from ``codes.py``; row 0 all off
    row_index        : [T]       int32/int64 row of strengths per token row
    topk_kth         : [T]       TopK threshold: a feature is among the top k of its
                                 row iff pre >= topk_kth (plans pass the midpoint of
                                 the k-th and (k+1)-th largest full pre-activations)
"""

from __future__ import annotations

import torch

from sae_fast.ops import codes


def selected_activations(
    pre: torch.Tensor,
    threshold: torch.Tensor,
    activation: int,
    topk_kth: torch.Tensor | None,
) -> torch.Tensor:
    """Activations of the selected features from their pre-activations [T, k]."""
    if activation == codes.ACT_THRESHOLD_RELU:
        return torch.where(pre > threshold.float(), pre, torch.zeros_like(pre))
    if activation == codes.ACT_IDENTITY:
        return pre
    if activation == codes.ACT_TOPK:
        if topk_kth is None:
            raise ValueError("activation=topk needs topk_kth [T] (k-th largest pre-activation)")
        keep = (pre >= topk_kth.float()[:, None]) & (pre > 0)
        return torch.where(keep, pre, torch.zeros_like(pre))
    raise ValueError(f"unknown activation code {activation}; expected one of {sorted(codes.ACT_NAMES)}")


def steer_coefficients(
    x: torch.Tensor,
    enc_w: torch.Tensor,
    enc_b: torch.Tensor,
    threshold: torch.Tensor,
    max_act: torch.Tensor,
    strengths: torch.Tensor,
    modes: torch.Tensor,
    row_index: torch.Tensor,
    topk_kth: torch.Tensor | None,
    activation: int,
    scale: float,
    min_strength: float,
    max_strength: float,
) -> torch.Tensor:
    """fp32 coefficients c[t, i] = f'_i - f_i for each token row and feature."""
    idx = row_index.long()
    mode = modes[idx].to(torch.int32)
    s = strengths[idx].float().clamp(min_strength, max_strength) * scale
    pre = x @ enc_w.float().t() + enc_b.float()
    f = selected_activations(pre, threshold, activation, topk_kth)
    zero = torch.zeros_like(f)
    coef = torch.where(mode == codes.MODE_ADD, s, zero)
    coef = torch.where(mode == codes.MODE_SET, s * max_act.float() - f, coef)
    coef = torch.where(mode == codes.MODE_SCALE, f * s - f, coef)
    coef = torch.where(mode == codes.MODE_ABLATE, -f, coef)
    return coef


def stream(hidden: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """The residual stream in fp32: hidden + residual (vLLM layers) or hidden."""
    return hidden.float() if residual is None else hidden.float() + residual.float()


def steer_(
    hidden: torch.Tensor,
    residual: torch.Tensor | None,
    enc_w: torch.Tensor,
    enc_b: torch.Tensor,
    threshold: torch.Tensor,
    dec_w: torch.Tensor,
    max_act: torch.Tensor,
    strengths: torch.Tensor,
    modes: torch.Tensor,
    row_index: torch.Tensor,
    topk_kth: torch.Tensor | None,
    activation: int,
    scale: float,
    min_strength: float,
    max_strength: float,
) -> None:
    """h' = h + sum_i (f'_i - f_i(h + r)) * W_dec[i], in place on ``hidden``."""
    if hidden.shape[0] == 0:
        return
    x = stream(hidden, residual)
    coef = steer_coefficients(
        x, enc_w, enc_b, threshold, max_act, strengths, modes, row_index, topk_kth,
        activation, scale, min_strength, max_strength,
    )
    hidden.copy_((hidden.float() + coef @ dec_w.float()).to(hidden.dtype))


def clamp_direction_(
    hidden: torch.Tensor,
    residual: torch.Tensor | None,
    directions: torch.Tensor,
    max_act: torch.Tensor,
    strengths: torch.Tensor,
    modes: torch.Tensor,
    row_index: torch.Tensor,
    scale: float,
    min_strength: float,
    max_strength: float,
) -> None:
    """h' = h - (x.u)u + s*max_act*u for unit directions u (rows with mode set).

    This is ``steer_`` with an identity activation and u as both encoder and
    decoder; several directions are applied at once (exact when orthogonal).
    """
    zeros = torch.zeros(directions.shape[0], dtype=torch.float32, device=directions.device)
    steer_(
        hidden, residual, directions, zeros, zeros, directions, max_act, strengths, modes,
        row_index, None, codes.ACT_IDENTITY, scale, min_strength, max_strength,
    )


def add_vectors_(
    hidden: torch.Tensor,
    vectors: torch.Tensor,
    weights: torch.Tensor,
    row_index: torch.Tensor,
) -> None:
    """hidden[t] += sum_j weights[row_index[t], j] * vectors[j], in place."""
    if hidden.shape[0] == 0:
        return
    w = weights[row_index.long()].float()
    hidden.copy_((hidden.float() + w @ vectors.float()).to(hidden.dtype))

