"""transformers ``generate`` on SmolLM2-135M (CPU): unsteered vs steered vs the
usual full-SAE hook, in one run (pytest-benchmark).

    pytest benchmarks/bench_hf.py --benchmark-enable --benchmark-json=out.json
    python benchmarks/bench_hf.py [--rounds 3]   # paired, interleaved ratios

Batch 16, 64 new tokens, greedy; steering at one middle layer, k=8 features,
set mode. The SAE is random (d_sae = 8 x 576): the cost of a steering step
does not depend on the weights' values. Whole generate calls vary by +-15%
between rounds on this shared 2-core machine, so the steered variant also
reports the host time spent inside the steering hook (``hook_share``), and
the script mode interleaves the variants round by round.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import pytest
import torch

BATCH, NEW_TOKENS, LAYER, K, D_SAE = 16, 64, 15, 8, 4608
PROMPTS = ["Tell me about the history of Rome.", "What is a prime number?",
           "Write a haiku about the sea.", "Explain photosynthesis simply."] * 4


def _setup():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sae_fast.generate import load_hf
    from sae_fast.models import smollm2

    model, tok = load_hf(str(smollm2()))
    enc = tok(PROMPTS[:BATCH], return_tensors="pt", padding=True)
    return model, tok, enc


def _full_sae_hook(sae, feats, target):
    """The common approach: encode all d_sae features, edit, decode, keep the error."""
    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        x = h.float()
        f = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
        f_new = f.clone()
        f_new[..., feats] = target
        new = (h.float() + (f_new - f) @ sae.W_dec).to(h.dtype)
        return (new, *output[1:]) if isinstance(output, tuple) else new
    return hook


def run_variant(name, model, tok, enc, sae):
    """One generate call; returns (seconds, hook seconds or None)."""
    from sae_fast.backends.hf import attach, decoder_layers

    kw = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
              pad_token_id=tok.pad_token_id)
    feats = list(range(0, D_SAE, D_SAE // K))[:K]
    if name == "unsteered":
        t0 = time.perf_counter()
        model.generate(**enc, **kw)
        return time.perf_counter() - t0, None
    if name == "steered":
        with attach(model, sae, layer=LAYER, features=feats, mode="set",
                    max_activations=[4.0] * K, profile=True, max_batch=BATCH) as st:
            st.set_strengths([[1.0] * K] * BATCH)
            t0 = time.perf_counter()
            st.generate(**enc, **kw)
            return time.perf_counter() - t0, st.stats.steer_time_s
    handle = decoder_layers(model)[LAYER].register_forward_hook(
        _full_sae_hook(sae, torch.tensor(feats), 4.0))
    try:
        t0 = time.perf_counter()
        model.generate(**enc, **kw)
        return time.perf_counter() - t0, None
    finally:
        handle.remove()


@pytest.fixture(scope="module")
def setup():
    pytest.importorskip("transformers")
    from sae_fast.sae import random_sae

    model, tok, enc = _setup()
    sae = random_sae(576, D_SAE, seed=0)
    run_variant("unsteered", model, tok, enc, sae)  # warm-up
    return model, tok, enc, sae


@pytest.mark.parametrize("variant", ["unsteered", "steered", "full_sae_hook"])
def test_hf_generate(benchmark, setup, variant):
    model, tok, enc, sae = setup
    hook_times = []

    def once():
        dt, hook = run_variant(variant, model, tok, enc, sae)
        if hook is not None:
            hook_times.append(hook / dt)

    benchmark.group = f"hf generate SmolLM2-135M b{BATCH} n{NEW_TOKENS}"
    benchmark.extra_info.update(machine=platform.processor() or platform.machine(),
                                torch=torch.__version__, threads=torch.get_num_threads(),
                                batch=BATCH, new_tokens=NEW_TOKENS, layer=LAYER, k=K, d_sae=D_SAE)
    benchmark.pedantic(once, rounds=3, iterations=1)
    benchmark.extra_info["tokens_per_s"] = BATCH * NEW_TOKENS / benchmark.stats.stats.median
    if hook_times:
        benchmark.extra_info["hook_share"] = statistics.median(hook_times)


def main() -> None:
    from sae_fast.sae import random_sae

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    model, tok, enc = _setup()
    sae = random_sae(576, D_SAE, seed=0)
    run_variant("unsteered", model, tok, enc, sae)
    times = {v: [] for v in ("unsteered", "steered", "full_sae_hook")}
    hook_share = []
    for _ in range(a.rounds):
        for v in times:
            dt, hook = run_variant(v, model, tok, enc, sae)
            times[v].append(dt)
            if hook is not None:
                hook_share.append(hook / dt)
    base = statistics.median(times["unsteered"])
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, batch {BATCH}, {NEW_TOKENS} new tokens")
    print("| variant | median s | tokens/s | vs unsteered |\n|---|---:|---:|---:|")
    for v, ts in times.items():
        med = statistics.median(ts)
        print(f"| {v} | {med:.2f} | {BATCH * NEW_TOKENS / med:.0f} | {med / base:.3f}x |")
    print(f"steering hook share of steered generate time (median): "
          f"{100 * statistics.median(hook_share):.2f}%")


if __name__ == "__main__":
    main()
