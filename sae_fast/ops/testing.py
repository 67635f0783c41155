"""Random op inputs and tolerance checks shared by tests and benchmarks
(the flashinfer.testing pattern). Never used on the hot path."""

from __future__ import annotations

from typing import Optional

import torch

from sae_fast.ops import codes, reference

# Tolerance of the delta (steered - unsteered), relative to its scale, per dtype.
DELTA_RTOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}


def random_steer_case(
    T: int,
    d: int,
    k: int,
    *,
    R: int = 4,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    residual: bool = True,
    idx_dtype: torch.dtype = torch.int32,
    activation: int = codes.ACT_THRESHOLD_RELU,
    modes: Optional[list[int]] = None,
    seed: int = 0,
) -> dict:
    """Keyword arguments for ``steer_`` on fresh random data.

    Encoder rows are correlated with the hidden rows so a good share of the
    features is active (otherwise set/scale/ablate would mostly see f = 0).
    Row 0 of the tables is all-off; the other rows draw modes from ``modes``.
    """
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, d, generator=g)
    res = torch.randn(T, d, generator=g) if residual else None
    x = hidden + (res if res is not None else 0)
    enc_w = torch.randn(k, d, generator=g) / d**0.5
    if T > 0:  # point some encoders at actual rows so pre-activations straddle 0
        pick = torch.randint(0, T, (k,), generator=g)
        enc_w = enc_w + 0.5 * x[pick] / x[pick].norm(dim=-1, keepdim=True)
    enc_b = 0.1 * torch.randn(k, generator=g)
    threshold = 0.1 * torch.rand(k, generator=g)
    dec_w = torch.randn(k, d, generator=g) / d**0.5
    max_act = 1 + 4 * torch.rand(k, generator=g)
    strengths = 3 * torch.randn(R, k, generator=g)  # negative ones included
    choices = torch.tensor(modes or [codes.MODE_OFF, codes.MODE_ADD, codes.MODE_SET,
                                     codes.MODE_SCALE, codes.MODE_ABLATE], dtype=torch.int8)
    mode_tab = choices[torch.randint(0, len(choices), (R, k), generator=g)]
    mode_tab[0] = codes.MODE_OFF
    strengths[0] = 0
    row_index = torch.randint(0, R, (T,), generator=g).to(idx_dtype)  # duplicates included
    kth = None
    if activation == codes.ACT_TOPK:
        pre = (x.float() @ enc_w.t() + enc_b)
        # Halfway between two neighbouring pre-activations: no feature sits on
        # the boundary, where fp32 summation order could flip the comparison.
        srt = pre.sort(dim=-1, descending=True).values
        m = k // 2
        kth = (0.5 * (srt[:, m - 1] + srt[:, m]) if k > 1 else srt[:, 0] - 0.5).contiguous()
    dev = torch.device(device)
    return dict(
        hidden=hidden.to(dev, dtype), residual=None if res is None else res.to(dev, dtype),
        enc_w=enc_w.to(dev, dtype), enc_b=enc_b.to(dev), threshold=threshold.to(dev),
        dec_w=dec_w.to(dev, dtype), max_act=max_act.to(dev), strengths=strengths.to(dev),
        modes=mode_tab.to(dev), row_index=row_index.to(dev),
        topk_kth=None if kth is None else kth.to(dev), activation=activation,
        scale=1.25, min_strength=-4.0, max_strength=4.0,
    )


def clone_case(case: dict) -> dict:
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in case.items()}


def reference_out(case: dict) -> torch.Tensor:
    """The oracle's output for ``case`` (computed on a copy)."""
    c = clone_case(case)
    reference.steer_(**c)
    return c["hidden"]


def assert_steer_close(out: torch.Tensor, case: dict, *, what: str = "") -> None:
    """``out`` (a kernel's steered hidden) matches the reference within the
    dtype's tolerance, and untouched rows (all modes off) are bit-identical."""
    ref = reference_out(case)
    base = case["hidden"]
    assert out.shape == ref.shape and out.dtype == ref.dtype, f"{what}: shape/dtype changed"
    if out.numel() == 0:  # T = 0 (or d = 0): nothing to compare
        return
    delta_scale = (ref.float() - base.float()).abs().max().clamp(min=1.0)
    tol = DELTA_RTOL[out.dtype] * delta_scale + (0 if out.dtype == torch.float32 else
                                                   2 * _ulp(ref).max())
    err = (out.float() - ref.float()).abs().max()
    assert err <= tol, f"{what}: max |out - ref| = {err:.3g} > tol {tol:.3g} ({out.dtype})"
    off_rows = (case["modes"][case["row_index"].long()] == codes.MODE_OFF).all(dim=-1)
    if bool(off_rows.any()):
        assert torch.equal(out[off_rows], base[off_rows]), f"{what}: an all-off row was modified"


def _ulp(t: torch.Tensor) -> torch.Tensor:
    f = t.float().abs()
    eps = torch.finfo(t.dtype).eps
    return (f * eps).clamp(min=eps)
