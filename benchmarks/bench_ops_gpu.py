"""GPU benchmarks of the steering ops: fused CUDA kernel vs Triton vs the torch reference.

Every candidate is timed the same way: ``n_inner`` calls captured in one CUDA
graph, the graph replayed ``reps`` times between CUDA events, per-call time =
replay time / n_inner (median over reps). Launch overhead is therefore the
graph's, as in a vLLM decode step; weights are L2-warm across calls. A
candidate that cannot be captured is timed as an eager loop between events
(marked in ``timing``).

Baselines stated beside the candidates, in the same run:
  * ``floor_add``: ``hidden.add_(residual)`` -- reads hidden and residual and
    writes hidden once, the memory traffic every steering op must pay
    (the "unsteered" floor);
  * device-to-device copy bandwidth of a 1 GiB buffer (``copy_bandwidth_GBps``).

Run as
    pytest benchmarks/bench_ops_gpu.py --benchmark-enable --benchmark-json OUT.json
    python benchmarks/bench_ops_gpu.py --json OUT.json [--quick]     (no pytest needed)
    python benchmarks/bench_ops_gpu.py --table OUT.json [--status STAGES.tsv]
``--table`` prints the markdown summary (it needs no GPU).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

log = logging.getLogger("sae_fast.bench_ops_gpu")

D_MODEL = 4096
DTYPE = torch.bfloat16
R_ROWS = 8
DECODE_T = (1, 16, 64, 256)
PREFILL_T = (4096,)
KS = (8, 64)
CASES = [(T, k) for T in DECODE_T + PREFILL_T for k in KS]
CANDIDATES = ("cuda_fused", "triton", "reference", "floor_add")
# The fused CUDA kernel with its rows-per-block forced (the default picks by
# batch size and shared-memory occupancy), for the larger batches only.
RB_SWEEP = ("cuda_rb1", "cuda_rb4", "cuda_rb8")
RB_SWEEP_MIN_T = 256


# ------------------------------------------------------------------ timing
def time_per_call(fn: Callable[[], None], *, n_inner: int = 20, reps: int = 25,
                  warmup: int = 3) -> dict:
    """Per-call GPU time of ``fn`` (microseconds) from CUDA-graph replays."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # first calls (autotune, JIT, one-time setup) outside capture
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()

    timing = "cuda_graph"
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for _ in range(n_inner):
                fn()
        run = graph.replay
    except Exception as err:  # not capturable: time an eager loop instead
        torch.cuda.synchronize()
        timing = f"eager_events ({type(err).__name__})"
        log.warning("graph capture failed (%s); timing eagerly", err)

        def run() -> None:
            for _ in range(n_inner):
                fn()

    for _ in range(warmup):
        run()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends):
        s.record()
        run()
        e.record()
    torch.cuda.synchronize()
    per_call = sorted(s.elapsed_time(e) * 1e3 / n_inner for s, e in zip(starts, ends))
    return {
        "us_median": statistics.median(per_call),
        "us_min": per_call[0],
        "us_p90": per_call[min(len(per_call) - 1, int(0.9 * len(per_call)))],
        "timing": timing,
        "n_inner": n_inner,
        "reps": reps,
        "_replay": run,
    }


def copy_bandwidth_GBps(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    src.random_(0, 255)
    dst = torch.empty_like(src)
    t = time_per_call(lambda: dst.copy_(src), n_inner=5, reps=10, warmup=2)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / (t["us_median"] * 1e-6) / 1e9


# ------------------------------------------------------------------ candidates
def _triton_namespace():
    try:
        from sae_fast.ops import triton_steer

        return triton_steer.register_ops()
    except Exception as err:  # triton missing, or the module not there yet
        log.warning("Triton ops unavailable: %s: %s", type(err).__name__, err)
        return None


def _has_cuda_ext() -> bool:
    import sae_fast.ops as ops

    return "cuda" in ops.backend_info()["extension_devices"]


def make_case(T: int, k: int, d: int = D_MODEL, dtype: torch.dtype = DTYPE) -> dict:
    """Decode/prefill-like inputs: every token steered (rows 1..R-1), modes
    set/add/ablate (stable under repeated in-place application)."""
    from sae_fast.ops import codes
    from sae_fast.ops.testing import random_steer_case

    case = random_steer_case(T, d, k, R=R_ROWS, dtype=dtype, device="cuda", residual=True,
                             modes=[codes.MODE_SET, codes.MODE_ADD, codes.MODE_ABLATE], seed=T * 131 + k)
    case["row_index"].copy_(1 + torch.arange(T, device="cuda") % (R_ROWS - 1))
    return case


def candidate_fn(name: str, case: dict, triton_ns=None) -> Optional[Callable[[], None]]:
    """The zero-argument callable timing ``name`` on ``case`` (None: unavailable)."""
    from sae_fast.ops import reference

    if name == "cuda_fused":
        if not _has_cuda_ext():
            return None
        return lambda: torch.ops.sae_fast.steer_(**case)
    if name.startswith("cuda_rb"):
        if not _has_cuda_ext():
            return None
        rb = name[len("cuda_rb"):]

        def forced() -> None:  # the plan is made on the host, i.e. at capture time
            old = os.environ.get("SAE_FAST_CUDA_ROWS_PER_BLOCK")
            os.environ["SAE_FAST_CUDA_ROWS_PER_BLOCK"] = rb
            try:
                torch.ops.sae_fast.steer_(**case)
            finally:
                if old is None:
                    os.environ.pop("SAE_FAST_CUDA_ROWS_PER_BLOCK", None)
                else:
                    os.environ["SAE_FAST_CUDA_ROWS_PER_BLOCK"] = old
        return forced
    if name == "triton":
        if triton_ns is None:
            return None
        return lambda: triton_ns.steer_(**case)
    if name == "reference":
        return lambda: reference.steer_(**case)
    if name == "floor_add":
        h, r = case["hidden"], case["residual"]
        return lambda: h.add_(r)
    raise ValueError(f"unknown candidate {name!r}")


def min_bytes(name: str, T: int, d: int, k: int, dtype: torch.dtype) -> int:
    """Bytes an ideal kernel must move: hidden read + residual read + hidden
    write, plus (steering ops) the k encoder and decoder rows once."""
    es = torch.empty((), dtype=dtype).element_size()
    stream = 3 * T * d * es
    return stream if name == "floor_add" else stream + 2 * k * d * es


def meta() -> dict:
    props = torch.cuda.get_device_properties(0)
    info = {
        "device": torch.cuda.get_device_name(0),
        "sm_count": props.multi_processor_count,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "dtype": str(DTYPE).replace("torch.", ""),
        "d": D_MODEL,
        "strength_rows": R_ROWS,
        "l2": "warm (weights reused across calls)",
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = None
    try:
        info["sae_fast_build"] = torch.ops.sae_fast.build_info()
    except Exception as err:
        info["sae_fast_build"] = f"unavailable ({type(err).__name__})"
    return info


def measure(name: str, T: int, k: int, case: dict, triton_ns=None, **timing_kw) -> Optional[dict]:
    fn = candidate_fn(name, case, triton_ns)
    if fn is None:
        return None
    stats = time_per_call(fn, **timing_kw)
    stats.pop("_replay")
    nbytes = min_bytes(name, T, D_MODEL, k, DTYPE)
    return {"group": f"T={T} k={k}", "candidate": name, "T": T, "d": D_MODEL, "k": k,
            "dtype": str(DTYPE).replace("torch.", ""), **stats, "min_bytes": nbytes,
            "GBps_effective": nbytes / (stats["us_median"] * 1e-6) / 1e9}


def run_all(quick: bool = False) -> dict:
    timing_kw = dict(n_inner=10, reps=10) if quick else dict(n_inner=20, reps=25)
    triton_ns = _triton_namespace()
    results, errors = [], []
    for T, k in CASES:
        case = make_case(T, k)
        for name in CANDIDATES + (RB_SWEEP if T >= RB_SWEEP_MIN_T else ()):
            try:
                rec = measure(name, T, k, case, triton_ns, **timing_kw)
            except Exception as err:  # record and go on: one broken path must not hide the rest
                torch.cuda.synchronize()
                errors.append({"group": f"T={T} k={k}", "candidate": name,
                               "error": f"{type(err).__name__}: {err}"[:500]})
                continue
            if rec is not None:
                results.append(rec)
                print(f"  T={T:5d} k={k:3d} {name:11s} {rec['us_median']:9.2f} us  ({rec['timing']})",
                      flush=True)
        del case
        torch.cuda.empty_cache()
    return {"meta": meta(), "copy_bandwidth_GBps": copy_bandwidth_GBps(), "results": results,
            "errors": errors}


# ------------------------------------------------------------------ markdown
def _fmt(x: Optional[float], nd: int = 1) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def markdown_table(data: Optional[dict], stages: Optional[list[tuple[str, str, str]]] = None) -> str:
    lines = []
    if stages:
        lines += ["| stage | status | seconds |", "|---|---|---|"]
        lines += [f"| {n} | {s} | {t} |" for n, s, t in stages]
        lines.append("")
    if not data:
        lines.append("(no benchmark results)")
        return "\n".join(lines)
    m = data.get("meta", {})
    lines.append(f"{m.get('device', '?')} ({m.get('sm_count', '?')} SMs), torch {m.get('torch', '?')}, "
                 f"triton {m.get('triton')}, {m.get('dtype', '?')}, d={m.get('d', '?')}; "
                 f"copy bandwidth {_fmt(data.get('copy_bandwidth_GBps'), 0)} GB/s; "
                 "us per call from CUDA-graph replays (median)")
    lines.append("")
    by = {}
    for r in data.get("results", []):
        by.setdefault((r["T"], r["k"]), {})[r["candidate"]] = r
    lines += ["| T | k | fused CUDA us | Triton us | reference us | floor us | "
              "fused vs ref | fused vs Triton | fused / floor | fused GB/s |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (T, k) in sorted(by):
        row = by[(T, k)]
        us = {c: (row[c]["us_median"] if c in row else None) for c in CANDIDATES}
        f = us["cuda_fused"]
        ratio = (lambda a, b: f"{a / b:.2f}x" if a and b else "-")
        gbps = row["cuda_fused"]["GBps_effective"] if "cuda_fused" in row else None
        lines.append(f"| {T} | {k} | {_fmt(f, 2)} | {_fmt(us['triton'], 2)} | "
                     f"{_fmt(us['reference'], 2)} | {_fmt(us['floor_add'], 2)} | "
                     f"{ratio(us['reference'], f)} | {ratio(us['triton'], f)} | "
                     f"{ratio(f, us['floor_add'])} | {_fmt(gbps, 0)} |")
    sweep = [(T, k) for (T, k) in sorted(by) if any(c in by[(T, k)] for c in RB_SWEEP)]
    if sweep:
        lines += ["", "fused CUDA with rows per block forced (us):", "",
                  "| T | k | default | " + " | ".join(c.replace("cuda_", "") for c in RB_SWEEP) + " |",
                  "|---:|---:|---:|" + "---:|" * len(RB_SWEEP)]
        for (T, k) in sweep:
            row = by[(T, k)]
            cells = [_fmt(row[c]["us_median"], 2) if c in row else "-"
                     for c in ("cuda_fused",) + RB_SWEEP]
            lines.append(f"| {T} | {k} | " + " | ".join(cells) + " |")
    for e in data.get("errors", []):
        lines.append(f"\nERROR {e['group']} {e['candidate']}: {e['error']}")
    return "\n".join(lines)


def read_stages(path: Optional[str]) -> list[tuple[str, str, str]]:
    if not path or not Path(path).exists():
        return []
    out = []
    for line in Path(path).read_text().splitlines():
        parts = line.split("\t")
        if len(parts) >= 2:
            out.append((parts[0], parts[1], parts[2] if len(parts) > 2 else ""))
    return out


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="run every case and write the results here")
    ap.add_argument("--quick", action="store_true", help="fewer replays per case")
    ap.add_argument("--table", help="print the markdown table of a results JSON")
    ap.add_argument("--status", help="with --table: stage statuses (name<TAB>status<TAB>seconds)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.table is not None:
        data = None
        if Path(args.table).exists():
            data = json.loads(Path(args.table).read_text())
        print(markdown_table(data, read_stages(args.status)))
        return 0
    if not torch.cuda.is_available():
        print("bench_ops_gpu: no CUDA GPU", file=sys.stderr)
        return 2
    data = run_all(quick=args.quick)
    text = json.dumps(data, indent=1)
    if args.json:
        Path(args.json).write_text(text)
    else:
        print(text)
    print(markdown_table(data))
    return 1 if data["errors"] else 0


# ------------------------------------------------------------------ pytest-benchmark
try:
    import pytest
except ImportError:  # script use needs no pytest
    pytest = None

if pytest is not None:
    pytestmark = [pytest.mark.cuda,
                  pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

    _CASE_CACHE: dict = {}

    def _cached_case(T: int, k: int) -> dict:
        if (T, k) not in _CASE_CACHE:
            _CASE_CACHE.clear()  # one shape at a time on the GPU
            _CASE_CACHE[(T, k)] = make_case(T, k)
        return _CASE_CACHE[(T, k)]

    @pytest.fixture(scope="module")
    def triton_ns():
        return _triton_namespace()

    @pytest.mark.parametrize("candidate", CANDIDATES)
    @pytest.mark.parametrize("T,k", CASES, ids=[f"T{T}-k{k}" for T, k in CASES])
    def test_steer_gpu(benchmark, triton_ns, T, k, candidate):
        case = _cached_case(T, k)
        fn = candidate_fn(candidate, case, triton_ns)
        if fn is None:
            pytest.skip(f"{candidate} unavailable on this machine")
        stats = time_per_call(fn)
        replay = stats.pop("_replay")
        benchmark.group = f"steer_ {str(DTYPE).replace('torch.', '')} T={T} d={D_MODEL} k={k}"
        benchmark.extra_info.update(meta())
        benchmark.extra_info.update({"T": T, "k": k, "candidate": candidate, **stats,
                                     "min_bytes": min_bytes(candidate, T, D_MODEL, k, DTYPE)})

        def replay_sync() -> None:  # host time of n_inner graph-replayed calls
            replay()
            torch.cuda.synchronize()

        benchmark.pedantic(replay_sync, rounds=20, warmup_rounds=2)

    def test_copy_bandwidth(benchmark):
        bw = copy_bandwidth_GBps()
        benchmark.group = "device copy"
        benchmark.extra_info.update(meta())
        benchmark.extra_info["copy_bandwidth_GBps"] = bw
        src = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)

        def copy_sync() -> None:
            dst.copy_(src)
            torch.cuda.synchronize()

        benchmark.pedantic(copy_sync, rounds=10, warmup_rounds=1)


if __name__ == "__main__":
    sys.exit(main())
