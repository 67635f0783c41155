"""Parity with sae-lens itself: our loader reads what sae-lens writes, and our
steering equals sae-lens ``encode -> modify -> decode`` with the error term
(``use_error_term=True``) for standard, jumprelu and topk SAEs."""

import os
import zlib

import pytest
import torch

SEED_OFFSET = int(os.environ.get("SAE_FAST_TEST_SEED", "0"))
sae_lens = pytest.importorskip("sae_lens")
pytestmark = pytest.mark.sae_lens

from sae_fast.plan import SteeringSpec, build_plan  # noqa: E402
from sae_fast.sae import from_sae_lens, load_sae  # noqa: E402


def _make(arch: str, d_in: int, d_sae: int):
    g = torch.Generator().manual_seed(zlib.crc32(arch.encode()) + SEED_OFFSET)
    if arch == "standard":
        sae = sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=d_in, d_sae=d_sae))
    elif arch == "jumprelu":
        sae = sae_lens.JumpReLUSAE(sae_lens.JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae))
    else:
        sae = sae_lens.TopKSAE(sae_lens.TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=16,
                                                      rescale_acts_by_decoder_norm=True))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=g) / d_in**0.5)
        sae.W_dec.copy_(torch.randn(d_sae, d_in, generator=g) * torch.rand(d_sae, 1, generator=g))
        sae.b_enc.copy_(0.1 * torch.randn(d_sae, generator=g))
        sae.b_dec.copy_(0.1 * torch.randn(d_in, generator=g))
        if arch == "jumprelu":
            sae.threshold.copy_(0.2 * torch.rand(d_sae, generator=g))
    return sae


def _sae_lens_steer(sae, x, feats, fn):
    sae.use_error_term = True

    def hook(acts, hook):  # noqa: ARG001
        acts = acts.clone()
        acts[..., feats] = fn(acts[..., feats])
        return acts

    sae.hook_sae_acts_post.add_hook(hook)
    try:
        with torch.no_grad():
            return sae(x)
    finally:
        sae.reset_hooks()


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "topk"])
@pytest.mark.parametrize("mode", ["set", "scale", "ablate", "add"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_steer_equals_sae_lens_with_error_term(tmp_path, arch, mode, dtype):
    d_in, d_sae = 123, 320
    sae = _make(arch, d_in, d_sae)
    sae.save_model(str(tmp_path / arch))
    ours = load_sae(tmp_path / arch)
    assert ours.architecture == arch
    x = torch.randn(9, d_in, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        f = sae.encode(x)
    # steer features that are active somewhere plus a few inactive ones
    active = (f > 0).any(0).nonzero().flatten().tolist()
    feats = sorted(set(active[:4] + [0, d_sae - 1]))
    k = len(feats)
    strengths = torch.linspace(-1.5, 2.0, k)
    max_acts = torch.linspace(1.0, 4.0, k)
    spec = SteeringSpec(features=feats, mode=mode, strengths=strengths.tolist(),
                        max_activations=max_acts.tolist(), strength_scale=1.0,
                        min_strength=-1.0, max_strength=1.5)
    s = strengths.clamp(-1.0, 1.5)
    fn = {"set": lambda a: (s * max_acts).expand_as(a).to(a.dtype), "scale": lambda a: a * s,
          "ablate": lambda a: torch.zeros_like(a), "add": lambda a: a + s}[mode]
    # Low precision: our plan holds weights rounded to `dtype` and the model's
    # stream is in `dtype`, so sae-lens gets the same rounded weights and input
    # (fp32 maths); what remains is accumulation-order and output rounding.
    x = x.to(dtype).float()
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(p.to(dtype).float())
    want = _sae_lens_steer(sae, x, feats, fn)
    plan = build_plan(ours, spec, dtype=dtype)
    out = plan.steer_(x.clone().to(dtype)).float()
    delta = (want - x).abs().max().clamp(min=1)
    tol = {torch.float32: 2e-4, torch.bfloat16: 6e-2, torch.float16: 1.5e-2}[dtype]
    err = (out - want).abs().max()
    assert err <= tol * delta + 2 * torch.finfo(dtype).eps * x.abs().max(), \
        f"{arch}/{mode}/{dtype}: {err:.3g}"


def test_in_memory_sae_lens_object():
    sae = _make("jumprelu", 64, 128)
    ours = from_sae_lens(sae)
    x = torch.randn(4, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), sae.encode(x), rtol=1e-5, atol=1e-5)
