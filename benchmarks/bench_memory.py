"""Memory that steering keeps resident or allocates (pytest-benchmark, suite
"memory"). Nothing here is timed: each test runs once through
``benchmark.pedantic`` so that its numbers land in the same JSON as the timed
suites, in ``extra_info["memory"]`` (every key ``*_bytes``, or ``*_count``).

    pytest benchmarks/bench_memory.py -q --benchmark-enable --benchmark-only \
        --benchmark-json=out.json

Quantities:

* SAE resident bytes, for the shipped demo SAE (``sae_fast/assets/smollm2_sae``: TopK,
  576 x 4608, bf16) and a random standard (576, 4608) fp32 SAE, at k = 8 and
  32 selected features. ``sae_full_bytes``: every SAE tensor as loaded.
  HF backend (fp32 model, max_batch 64): ``hf_plan_bytes`` = the
  SteeringPlan's tensors (``plan.nbytes()``: the k selected encoder and
  decoder columns, plus, for an exact-TopK plan, the full fp32 encoder that
  the exact TopK threshold needs), ``hf_tables_bytes`` = its SteeringTables
  (strengths and modes [max_batch + 1, k], row map). As attached today the
  HF steerer also keeps the SAEWeights referenced (through
  ``plan.sae``), so ``hf_attached_bytes`` = full SAE + plan + tables.
  vLLM backend (bf16 model, 256 rows = vLLM's default max_num_seqs): one
  ``LayerSlot`` with k columns (``max_features=k``) and, for the default
  capacity, 32 columns: every tensor of the slot (capacity plan, tables,
  call counter); ``vllm_row_index_bytes`` is the one token -> row map all
  slots share (max_num_batched_tokens 8192 + 1024 here); the host keeps an
  fp32 plan of the k columns per attached SAE (``vllm_host_plan_bytes``;
  for an SAE listed in additional_config that plan's ``sae`` field also
  keeps the loaded SAEWeights alive on the host, not counted here).
  vLLM refuses exact TopK, so the demo SAE's vLLM plans are approx_relu.
* Predictor parameter bytes for d = 576 and 4096 (the shapes of
  bench_predictor.py: hidden 1024, 2 layers, 512 features).
* Extra activation memory of steering in HF, per candidate of bench_hf.py
  (unsteered, steered, full_sae_hook), for one decode step at batch 1, 16
  and 64 and for a batch-16 prefill. Method: ``torch.profiler`` with
  ``profile_memory=True`` records every allocation and free of torch's CPU
  allocator as a signed ``[memory]`` event; the forward runs twice in one
  session and the running sum of the events inside the second forward is
  the live memory that forward allocated beyond what it started with; every
  hook runs inside a ``hook::<label>`` profiler range.
  ``forward_peak_bytes``: the running sum's maximum over the forward;
  ``extra_forward_peak_bytes``: that minus the unsteered forward's (what the
  hooks add to the step's high-water mark); ``hook_peak_bytes``: the
  largest running sum inside any one hook range, counted from the range's
  start (the hooks' own working memory: e.g. the fused op's GEMM-path
  temporaries for large token counts, see csrc/cpu/steer_cpu.cpp, or the
  full SAE hook's [T, d_sae] codes);
  ``hook_retained_bytes``: the net of the hook ranges (what they leave
  allocated: the steerer's row map replaces the previous step's, so ~0).
  CPU has no allocator statistics and ``tracemalloc`` does not see torch's
  allocator, hence the profiler. Not seen: the fused op's own scratch
  outside ATen (stack arrays for small k, std::vectors beyond: at most a
  row tile x k floats and one byte per table row).
"""

from __future__ import annotations

import gc

import pytest
import torch
from torch.profiler import ProfilerActivity, profile, record_function

from bench_hf import CANDIDATES, Bench, DecodeStep, check_steering, frozen_heap
from bench_predictor import FEATURES, HIDDEN, LAYERS, MODELS, predictor_config
from sae_fast.backends.tables import SteeringTables
from sae_fast.backends.vllm_engine import LayerSlot
from sae_fast.backends.common import AttachedSAE
from sae_fast.plan import SteeringSpec, build_plan
from sae_fast.predictor import StrengthPredictor
from sae_fast.sae import load_sae, random_sae
from sae_fast.train.demo_task import demo_sae_dir

D_IN, D_SAE = 576, 4608
KS = (8, 32)
HF_MAX_BATCH = 64
VLLM_ROWS, VLLM_DEFAULT_COLUMNS, VLLM_MAX_TOKENS = 256, 32, 8192 + 1024
FORWARDS = [("decode", 1), ("decode", 16), ("decode", 64), ("prefill", 16)]


def nbytes(*tensors) -> int:
    """Bytes of the tensors' elements (None entries skipped)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _record(benchmark, group: str, fn, info: dict) -> dict:
    """Run ``fn`` once under pytest-benchmark; its dict of numbers goes to
    ``extra_info["memory"]``."""
    memory: dict = {}
    benchmark.group = group
    benchmark.pedantic(lambda: memory.update(fn()), rounds=1, iterations=1)
    benchmark.extra_info.update(suite="memory", group=group, memory=memory, **info)
    return memory


# ---------------------------------------------------------------- SAE resident
DEMO_SAE = demo_sae_dir()  # the shipped SAE, package data


def _slot_bytes(slot) -> int:
    p, t = slot.tables.plan, slot.tables
    return nbytes(p.features, p.enc_w, p.enc_b, p.threshold, p.dec_w, p.max_act,
                  p.default_strengths, t.strengths, t.modes, t.row_index, slot.calls)


def sae_resident(sae) -> dict:
    """Bytes of the SAE and of each backend's resident steering tensors."""
    full = nbytes(*sae.parameters())
    out = {"sae_full_bytes": full}
    row_index = torch.zeros(VLLM_MAX_TOKENS, dtype=torch.int32)
    out["vllm_row_index_bytes"] = nbytes(row_index)
    topk = sae.architecture == "topk"
    for k in KS:
        feats = list(range(0, sae.d_sae, sae.d_sae // k))[:k]
        spec = SteeringSpec(features=feats, mode="set", max_activations=[4.0] * k)
        plan = build_plan(sae, spec, device="cpu", dtype=torch.float32)
        tables = SteeringTables(plan, HF_MAX_BATCH, max_tokens=1)
        tb = nbytes(tables.strengths, tables.modes, tables.row_index)
        out[f"hf_plan_bytes_k{k}"] = plan.nbytes()
        out[f"hf_tables_bytes_k{k}"] = tb
        out[f"hf_attached_bytes_k{k}"] = full + plan.nbytes() + tb
        spec_v = SteeringSpec(features=feats, mode="set", max_activations=[4.0] * k,
                              topk_mode="approx_relu" if topk else "exact")
        plan_v = build_plan(sae, spec_v, device="cpu", dtype=torch.float32)
        if topk:
            out[f"hf_plan_approx_relu_bytes_k{k}"] = plan_v.nbytes()
        host = AttachedSAE(name="bench", uid="bench", layers=[15], plan=plan_v)
        out[f"vllm_host_plan_bytes_k{k}"] = plan_v.nbytes() + nbytes(
            host.rows.strengths, host.rows.modes, host.rows.row_index)
        for cols, key in ((k, f"vllm_slot_bytes_k{k}"),
                          (max(k, VLLM_DEFAULT_COLUMNS), f"vllm_slot_default_capacity_bytes_k{k}")):
            slot = LayerSlot(15, sae.d_in, cols, VLLM_ROWS, row_index, torch.device("cpu"),
                             torch.bfloat16)
            slot.write_columns(torch.arange(k), plan_v)
            out[key] = _slot_bytes(slot)
    return out


@pytest.mark.parametrize("which", ["demo", "random"])
def test_sae_resident(benchmark, which):
    """Full SAE vs what each backend keeps resident for k = 8 and 32 features."""
    sae = load_sae(str(DEMO_SAE)) if which == "demo" else random_sae(D_IN, D_SAE, seed=0)
    _record(benchmark, f"memory SAE resident {which} {sae.architecture} {sae.d_in}x{sae.d_sae}",
            lambda: sae_resident(sae),
            dict(sae=which, architecture=sae.architecture, sae_dtype=str(sae.dtype),
                 d_in=sae.d_in, d_sae=sae.d_sae,
                 ks=list(KS), hf_max_batch=HF_MAX_BATCH, vllm_rows=VLLM_ROWS,
                 vllm_dtype="bfloat16", vllm_max_tokens=VLLM_MAX_TOKENS))


# ---------------------------------------------------------------- predictor
@pytest.mark.parametrize("model,d", MODELS)
def test_predictor_params(benchmark, model, d):
    """Parameter bytes of the bench_predictor.py predictor at input size d."""
    def measure() -> dict:
        pred = StrengthPredictor(predictor_config(d))
        return {"predictor_params_bytes": pred.num_bytes(),
                "predictor_param_count": sum(p.numel() for p in pred.parameters())}

    _record(benchmark, f"memory predictor {model} (d={d})", measure,
            dict(model=model, d=d, hidden=HIDDEN, layers=LAYERS, features=FEATURES,
                 dtype="float32"))


# ---------------------------------------------------------------- HF activations
@pytest.fixture(scope="module")
def bench():
    pytest.importorskip("transformers")
    b = Bench()
    for hooks in b.hooks.values():
        hooks.ranges = True
    with frozen_heap():  # profile_memory's gc.collect() stays cheap
        yield b
    b.close()


def profile_memory(fn) -> dict:
    """Live-memory numbers of one call of ``fn`` from the profiler's
    allocation events (see the module docstring). ``fn`` runs twice in one
    profiling session and only the second call (range ``bench::forward``)
    counts: the profiler reports no size for freeing a block allocated
    before the session started, and every block the second call frees (the
    previous KV-cache tensors, the previous row map) was allocated by the
    first. Python's GC is off meanwhile so that no earlier garbage is freed
    inside the window."""
    gc.collect()
    gc.disable()
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
            with record_function("bench::forward"):
                fn()
    finally:
        gc.enable()
    events = prof.profiler.kineto_results.events()
    (f0, f1), = [(e.start_ns(), e.start_ns() + e.duration_ns()) for e in events
                 if e.name() == "bench::forward"]
    mem = sorted((e.start_ns(), e.nbytes()) for e in events
                 if e.name() == "[memory]" and f0 <= e.start_ns() <= f1)
    ranges = [(e.start_ns(), e.start_ns() + e.duration_ns()) for e in events
              if e.name().startswith("hook::") and f0 <= e.start_ns() <= f1]
    live = peak = 0
    for _, n in mem:
        live += n
        peak = max(peak, live)
    hook_peak = retained = 0
    for t0, t1 in ranges:
        live = 0
        for t, n in mem:
            if t0 <= t <= t1:
                live += n
                hook_peak = max(hook_peak, live)
        retained += live
    return {"forward_peak_bytes": peak, "forward_net_bytes": sum(n for _, n in mem),
            "hook_peak_bytes": hook_peak, "hook_retained_bytes": retained,
            "hook_range_count": len(ranges)}


@pytest.mark.parametrize("phase,B", FORWARDS, ids=[f"{p}-b{b}" for p, b in FORWARDS])
def test_hf_activation_memory(benchmark, bench, phase, B):
    """Extra live memory per candidate for one forward (decode step or prefill)."""
    if phase == "decode":
        step = DecodeStep(bench, B)

        def call(name: str) -> None:
            step.reset()
            step(name)
    else:
        enc = bench.batch(B)

        def call(name: str) -> None:
            with torch.no_grad():
                logits = bench.model(**enc, use_cache=False).logits
            assert logits.shape == (*enc["input_ids"].shape, bench.vocab), name

    def measure() -> dict:
        out = {}
        for name in CANDIDATES:
            bench.use(name)
            out[name] = profile_memory(lambda: call(name))
        base = out["unsteered"]["forward_peak_bytes"]
        for name in CANDIDATES:
            out[name]["extra_forward_peak_bytes"] = out[name]["forward_peak_bytes"] - base
        return out

    mem = _record(benchmark, f"memory hf {phase} SmolLM2-135M b{B}", measure,
                  dict(model="SmolLM2-135M-Instruct", dtype="float32", phase=phase, batch=B,
                       layer=15, k=8, d_sae=D_SAE, mode="set",
                       method="torch.profiler profile_memory: running sum of [memory] events"))
    check_steering(bench)
    assert mem["unsteered"]["hook_range_count"] == 0
    assert mem["steered"]["hook_range_count"] == 3
    assert mem["full_sae_hook"]["hook_range_count"] == 1
