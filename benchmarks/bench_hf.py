"""transformers on SmolLM2-135M (CPU, 1 thread): one decode step and a whole
``generate``, unsteered vs steered vs the usual full-SAE hook, timed
interleaved in the same run (``harness.record``, suite "hf").

    pytest benchmarks/bench_hf.py -q --benchmark-enable --benchmark-only \
        --benchmark-json=out.json
    python benchmarks/bench_hf.py            # the same, through pytest

Steering: ``sae_fast.backends.hf.attach`` at layer 15, k=8 features spread
over a random SAE ``random_sae(576, 4608, seed=0)`` (the cost of a step does
not depend on the weights' values), set mode, target 4.0, every batch row
steered. Candidates of every group (the same model object; only the hooks
installed on it differ):

    unsteered      BASELINE: no hook on the model (the steerer's hooks are
                   detached, so torch takes its no-hook fast path)
    steered        every hook the sae_fast HF backend installs: the model
                   pre-hook (token -> strengths-row map, every forward), the
                   layer-15 hook (the fused op) and the model post-hook
                   (missed-step check)
    full_sae_hook  the usual public approach: one forward hook at layer 15
                   that encodes all 4608 features, sets the 8 selected ones,
                   decodes the edit and keeps the SAE error term

Switching candidates swaps the hooks' entries in torch's hook dicts (a dict
insert / pop per hook, no re-attach) in the harness's untimed ``before``
step, so every timed call runs the same model with exactly one candidate's
hooks. While installed, every hook runs
inside a timing wrapper: ``hook_us_per_step`` (all of a candidate's hooks,
per forward) and ``hook_share`` (of the candidate's total time) are
measured over the very calls the harness times (two ``perf_counter`` calls
per hook: well under 1 us of a ~10 ms step). ``backend_steer_us_per_step``
is the backend's own counter (``profile=True``: ``stats.steer_time_s``),
which times the same three hooks from inside the backend.

Groups:

* "hf decode step SmolLM2-135M b{B}": ONE decode forward on a DynamicCache.
  A short prompt batch is prefilled once (unsteered); each timed call feeds
  one token, and the harness's untimed ``before`` step crops the cache back
  to the prompt (``DynamicCache.crop``) ahead of every call, so every call
  attends over the same cache length and does the same work. Before
  timing, steered and full_sae_hook logits must agree (same maths) and
  differ from unsteered. One call per round (a step takes 10 ms or more),
  11 / 9 / 5 rounds at B = 1 / 16 / 64, after one warm-up call per
  candidate.
* "hf generate SmolLM2-135M b16 n32": a whole greedy ``generate`` (batch 16,
  32 new tokens, ``min_new_tokens = max_new_tokens``), one call per round,
  3 rounds, no warm-up call (in a whole-file run the decode groups have
  already run every candidate's hooks on this model; run alone, round 0
  carries the first-call costs, which the harness's rotation spreads over
  the candidates).

Every candidate checks its output shape, so a broken variant fails.
"""

from __future__ import annotations

import contextlib
import gc
import os
import time
from typing import Callable, Optional

import pytest
import torch

from harness import record

LAYER, K, D_IN, D_SAE = 15, 8, 576, 4608
FEATURES = list(range(0, D_SAE, D_SAE // K))[:K]
TARGET = 4.0  # max_activation; strength 1.0 -> every selected feature set to 4.0
DECODE_BATCHES = (1, 16, 64)
DECODE_ROUNDS = {1: 11, 16: 9, 64: 5}  # one call per round: a step is >= 10 ms
GEN_BATCH, NEW_TOKENS = 16, 32
CANDIDATES = ("unsteered", "steered", "full_sae_hook")
PROMPTS = ["Tell me about the history of Rome.", "What is a prime number?",
           "Write a haiku about the sea.", "Explain photosynthesis simply."]


def full_sae_hook(sae, features: list[int], target: float):
    """Forward hook of the common approach: encode all d_sae features, edit the
    selected ones, decode the edit, keep the error term (h + (f' - f) W_dec),
    in the SAE's dtype (bench_hf_gpu.py uses it too)."""
    feats = torch.tensor(features, device=sae.W_enc.device)

    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        x = h.to(sae.W_enc.dtype)
        f = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
        f_new = f.clone()
        f_new[..., feats] = target
        new = (x + (f_new - f) @ sae.W_dec).to(h.dtype)
        return (new, *output[1:]) if isinstance(output, tuple) else new
    return hook


class Hooks:
    """A candidate's registered hooks, switched on and off by swapping their
    entries in torch's hook dicts. While on, each runs in a wrapper that adds
    its host time to ``seconds[label]`` and counts its calls; with ``ranges``
    set it also runs inside a profiler range ``hook::<label>``
    (bench_memory.py reads those)."""

    def __init__(self, handles: dict[str, list]) -> None:
        self.seconds = {label: 0.0 for label in handles}
        self.calls = {label: 0 for label in handles}
        self.ranges = False
        self._entries = []
        for label, hs in handles.items():
            for h in hs:
                d = h.hooks_dict_ref()
                self._entries.append((d, h.id, self._timed(label, d[h.id])))
        self.off()

    def _timed(self, label: str, fn: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                if self.ranges:
                    with torch.profiler.record_function(f"hook::{label}"):
                        return fn(*args, **kwargs)
                return fn(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - t0
                self.calls[label] += 1
        return wrapper

    def reset(self) -> None:
        self.seconds = dict.fromkeys(self.seconds, 0.0)
        self.calls = dict.fromkeys(self.calls, 0)

    def on(self) -> None:
        for d, hid, fn in self._entries:
            d[hid] = fn

    def off(self) -> None:
        for d, hid, _ in self._entries:
            d.pop(hid, None)


class Bench:
    """The model, its tokenizer, the attached steerer and each candidate's
    hooks (all off until a candidate is selected)."""

    def __init__(self) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sae_fast.backends.common import decoder_layers
        from sae_fast.backends.hf import attach
        from sae_fast.generate import load_hf
        from sae_fast.models import smollm2
        from sae_fast.sae import random_sae

        self.model, self.tok = load_hf(str(smollm2()))
        self.vocab = self.model.config.vocab_size
        sae = random_sae(D_IN, D_SAE, seed=0)
        self.steerer = attach(self.model, sae, layer=LAYER, features=FEATURES, mode="set",
                              max_activations=[TARGET] * K, profile=True,
                              max_batch=max(DECODE_BATCHES + (GEN_BATCH,)))
        st = self.steerer
        full = decoder_layers(self.model)[LAYER].register_forward_hook(
            full_sae_hook(sae, FEATURES, TARGET))
        # every hook the backend installed: pre-forward row map, layer hooks,
        # post-forward missed-step check
        self.hooks = {"unsteered": Hooks({}),
                      "steered": Hooks({"pre": [st._pre_handle], "layer": list(st._handles),
                                        "post": [st._post_handle]}),
                      "full_sae_hook": Hooks({"layer": [full]})}
        self._full_handle = full
        self.current = "unsteered"

    def use(self, name: str) -> None:
        """Install ``name``'s hooks only (a no-op when already selected)."""
        if name != self.current:
            self.hooks[self.current].off()
            self.hooks[name].on()
            self.current = name

    def batch(self, B: int) -> dict:
        enc = self.tok([PROMPTS[i % len(PROMPTS)] for i in range(B)], return_tensors="pt",
                       padding=True)
        self.steerer.set_strengths([[1.0] * K] * B)
        return dict(enc)

    def close(self) -> None:
        self._full_handle.remove()
        self.steerer.remove()


@contextlib.contextmanager
def frozen_heap():
    """Move every object alive now (torch, transformers, the model) to gc's
    permanent generation for the block: a collection (the harness's one
    before its rounds, the profiler's in bench_memory.py) then scans only the
    benchmark's own garbage (a full scan takes ~0.3 s here)."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@pytest.fixture(scope="module")
def bench():
    pytest.importorskip("transformers")
    b = Bench()
    with frozen_heap():
        yield b
    b.close()


def _candidates(bench: Bench, call: Callable[[str], None],
                reset: Optional[Callable[[], None]] = None) -> tuple[dict, dict, dict]:
    """Harness candidates (each runs ``call``), their untimed ``before``
    steps (each selects its candidate's hooks, then runs ``reset``) and
    per-candidate total seconds over every call (warm-up included), the
    denominator of ``hook_share``. Zeroes the hook counters. With ``reset``
    the harness must run one call per batch (``inner=1``)."""
    total = {n: 0.0 for n in CANDIDATES}
    for hooks in bench.hooks.values():
        hooks.reset()
    bench.steerer.stats.steer_time_s = 0.0

    def make(name: str):
        def fn():
            assert bench.current == name
            t0 = time.perf_counter()
            call(name)
            total[name] += time.perf_counter() - t0
        return fn

    def prepare(name: str):
        def fn():
            bench.use(name)
            if reset is not None:
                reset()
        return fn
    return ({n: make(n) for n in CANDIDATES}, {n: prepare(n) for n in CANDIDATES}, total)


def _hook_info(bench: Bench, total: dict) -> dict:
    """Hook time per forward (per hook label and in all) and its share of
    each hooked candidate's time, over the calls since :func:`_candidates`."""
    out = {}
    for name in ("steered", "full_sae_hook"):
        hk = bench.hooks[name]
        steps = hk.calls["layer"]  # one layer hook call per forward
        per = {lb: 1e6 * s / max(steps, 1) for lb, s in hk.seconds.items()}
        out[name] = dict(hook_us_per_step=sum(per.values()), forwards=steps,
                         hook_share=sum(hk.seconds.values()) / total[name],
                         **{f"{lb}_hook_us_per_step": v for lb, v in per.items()})
    out["steered"]["backend_steer_us_per_step"] = (
        1e6 * bench.steerer.stats.steer_time_s / max(out["steered"]["forwards"], 1))
    return out


def check_steering(bench: Bench) -> None:
    """No steering failure and no missed steered step so far."""
    st = bench.steerer.stats
    assert st.failures == 0 and st.missed == 0, st.failure_reasons


class DecodeStep:
    """One decode forward of batch ``B`` on a DynamicCache prefilled once
    (unsteered, short prompts). :meth:`reset` crops the cache back to the
    prompt (a few tensor views per layer) and must run before each call, so
    every call attends over the same cache length and does the same work.
    Calling it with a candidate's name checks the logits' shape and returns
    them."""

    def __init__(self, bench: Bench, B: int) -> None:
        from transformers import DynamicCache

        self.model = bench.model
        enc = bench.batch(B)
        mask = enc["attention_mask"]
        self.cache = DynamicCache(config=self.model.config)
        bench.use("unsteered")
        with torch.no_grad():
            out = self.model(**enc, past_key_values=self.cache, use_cache=True)
        self.prompt_len = self.cache.get_seq_length()
        self.kwargs = dict(input_ids=out.logits[:, -1:].argmax(-1),
                           attention_mask=torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype)], 1),
                           position_ids=mask.sum(1, keepdim=True), past_key_values=self.cache,
                           use_cache=True)
        self.want = (B, 1, bench.vocab)

    def reset(self) -> None:
        extra = self.cache.get_seq_length() - self.prompt_len
        if extra:
            self.cache.crop(-extra)

    def __call__(self, name: str) -> torch.Tensor:
        assert self.cache.get_seq_length() == self.prompt_len, "reset() before each call"
        with torch.no_grad():
            logits = self.model(**self.kwargs).logits
        assert logits.shape == self.want, f"{name}: logits {tuple(logits.shape)} != {self.want}"
        return logits


@pytest.mark.parametrize("B", DECODE_BATCHES)
def test_decode_step(benchmark, bench, B):
    """One decode forward (batch B), see :class:`DecodeStep`."""
    step = DecodeStep(bench, B)
    logits = {}
    for name in CANDIDATES:
        bench.use(name)
        step.reset()
        logits[name] = step(name)
    scale = logits["unsteered"].abs().max().item()
    torch.testing.assert_close(logits["steered"], logits["full_sae_hook"], rtol=1e-3,
                               atol=1e-3 * scale, msg="steered and full_sae_hook disagree")
    assert not torch.allclose(logits["steered"], logits["unsteered"]), "steering had no effect"

    cands, before, total = _candidates(bench, step, reset=step.reset)
    res = record(benchmark, f"hf decode step SmolLM2-135M b{B}", cands, baseline="unsteered",
                 suite="hf", rounds=DECODE_ROUNDS[B], inner=1, warmup=1, before=before,
                 info=dict(model="SmolLM2-135M-Instruct", dtype="float32", batch=B,
                           prompt_tokens=step.prompt_len, layer=LAYER, k=K, d_sae=D_SAE, mode="set",
                           cache="DynamicCache cropped back to the prompt before each call "
                                 "(untimed)",
                           tokens_per_call=B))
    check_steering(bench)
    hooks = _hook_info(bench, total)
    benchmark.extra_info["hooks"] = hooks
    for name in ("steered", "full_sae_hook"):
        benchmark.extra_info[f"{name}_ratio"] = res["candidates"][name]["ratio"]
        benchmark.extra_info[f"{name}_hook_us_per_step"] = hooks[name]["hook_us_per_step"]


def test_generate(benchmark, bench):
    """A whole greedy generate: batch 16, exactly 32 new tokens."""
    model = bench.model
    enc = bench.batch(GEN_BATCH)
    kw = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
              pad_token_id=bench.tok.pad_token_id)
    want = (GEN_BATCH, enc["input_ids"].shape[1] + NEW_TOKENS)

    def gen(name: str) -> None:
        run = bench.steerer.generate if name == "steered" else model.generate
        out = run(**enc, **kw)
        assert tuple(out.shape) == want, f"{name}: output {tuple(out.shape)} != {want}"

    cands, before, total = _candidates(bench, gen)
    res = record(benchmark, f"hf generate SmolLM2-135M b{GEN_BATCH} n{NEW_TOKENS}", cands,
                 baseline="unsteered", suite="hf", rounds=3, inner=1, warmup=0, before=before,
                 info=dict(model="SmolLM2-135M-Instruct", dtype="float32", batch=GEN_BATCH,
                           new_tokens=NEW_TOKENS, layer=LAYER, k=K, d_sae=D_SAE, mode="set",
                           tokens_per_call=GEN_BATCH * NEW_TOKENS))
    check_steering(bench)
    hooks = _hook_info(bench, total)
    benchmark.extra_info["hooks"] = hooks
    for name in CANDIDATES:
        benchmark.extra_info[f"{name}_tokens_per_s"] = (
            GEN_BATCH * NEW_TOKENS / res["candidates"][name]["median_s"])
    for name in ("steered", "full_sae_hook"):
        benchmark.extra_info[f"{name}_ratio"] = res["candidates"][name]["ratio"]
        benchmark.extra_info[f"{name}_hook_share"] = hooks[name]["hook_share"]
        benchmark.extra_info[f"{name}_hook_us_per_step"] = hooks[name]["hook_us_per_step"]


if __name__ == "__main__":
    import sys

    sys.exit(pytest.main([__file__, "-q", "--benchmark-enable", "--benchmark-only",
                          "-p", "no:cacheprovider", *sys.argv[1:]]))
