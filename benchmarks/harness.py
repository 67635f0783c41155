"""Paired, interleaved timing for pytest-benchmark groups.

A group holds its baseline and its candidates, measured in the same run:
every round times each candidate once, in an order rotated from round to
round, so slow drift of the machine (other jobs, thermal state, caches) hits
every candidate alike. Per round, each candidate's time is divided by the
baseline's time *of that round*; the report gives medians and spreads of the
times and of those paired ratios.

pytest-benchmark stays the runner and the file format: a group is one
benchmark whose own stats time the whole paired measurement, and whose
``extra_info["paired"]`` holds the result::

    def test_group(benchmark):
        record(benchmark, "steer T=16 d=576 k=8 fp32", baseline="torch_minimal",
               candidates={"torch_minimal": f0, "ext": f1, ...}, rounds=15)

Micro-candidates run ``inner`` calls per round (calibrated so that one round
of one candidate takes about ``target_s``), and the time per call is reported.
"""

from __future__ import annotations

import gc
import os
import platform
import re
import statistics
import subprocess
import time
from typing import Callable, Mapping, Optional

import torch

Fn = Callable[[], object]


def _quantiles(xs: list[float]) -> tuple[float, float, float]:
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], statistics.median(xs), q[2]


def calibrate(fn: Fn, target_s: float, max_inner: int = 100_000) -> int:
    """Calls per timed batch so that one batch takes about ``target_s``."""
    fn()
    n = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        dt = time.perf_counter() - t0
        if dt >= target_s / 4 or n >= max_inner:
            return max(1, min(max_inner, int(n * target_s / max(dt, 1e-9))))
        n *= 4


def paired(candidates: Mapping[str, Fn], baseline: str, rounds: int = 11,
           inner: Optional[int] = None, target_s: float = 0.02, warmup: int = 1,
           sync: Optional[Fn] = None, before: Optional[Mapping[str, Fn]] = None) -> dict:
    """Time every candidate ``rounds`` times, interleaved and rotated.

    Returns ``{"baseline", "rounds", "inner", "candidates": {name: {"median_s",
    "q1_s", "q3_s", "samples_s", "ratio", "ratio_q1", "ratio_q3"}}}``; times
    are seconds per call, ratios are the per-round paired ratios to the
    baseline (median and quartiles over rounds). ``before[name]``, if given,
    runs untimed before each of that candidate's batches (e.g. attaching its
    hooks); ``sync`` runs around every timed batch (e.g. a CUDA sync)."""
    before = before or {}
    if baseline not in candidates:
        raise ValueError(f"baseline {baseline!r} is not one of the candidates {sorted(candidates)}")
    names = list(candidates)
    counts = {}
    for n in names:
        if n in before:
            before[n]()
        counts[n] = calibrate(candidates[n], target_s) if inner is None else int(inner)
        for _ in range(warmup):
            candidates[n]()
    samples: dict[str, list[float]] = {n: [] for n in names}
    gc_was = gc.isenabled()
    gc.collect()  # once: a collection per round costs ~0.3 s beside a loaded model
    gc.disable()
    try:
        for r in range(rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for n in order:
                fn, m = candidates[n], counts[n]
                if n in before:
                    before[n]()
                if sync is not None:
                    sync()
                t0 = time.perf_counter()
                for _ in range(m):
                    fn()
                if sync is not None:
                    sync()
                samples[n].append((time.perf_counter() - t0) / m)
    finally:
        if gc_was:
            gc.enable()
    out = {}
    for n in names:
        ratios = [a / b for a, b in zip(samples[n], samples[baseline])]
        q1, med, q3 = _quantiles(samples[n])
        r1, rm, r3 = _quantiles(ratios)
        out[n] = {"median_s": med, "q1_s": q1, "q3_s": q3, "samples_s": samples[n],
                  "ratio": rm, "ratio_q1": r1, "ratio_q3": r3, "inner": counts[n]}
    return {"baseline": baseline, "rounds": rounds, "candidates": out}


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_isa() -> str:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    for isa in ("avx512f", "avx2", "neon"):
        if isa in flags:
            return isa.replace("avx512f", "avx512")
    return "baseline"


def machine_slug() -> str:
    """A short machine name for result files: cpu model, ISA, core count."""
    name = re.sub(r"\(r\)|\(tm\)|cpu|processor|@.*", "", cpu_name().lower())
    name = re.sub(r"[^a-z0-9]+", "-", name).strip("-") or platform.machine()
    return f"{name}-{cpu_isa()}-{os.cpu_count()}c"


def _git_rev() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except Exception:
        return "unknown"


def versions() -> dict:
    out = {"torch": torch.__version__, "python": platform.python_version()}
    for mod in ("vllm", "transformers", "triton"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            pass
    return out


def machine_info() -> dict:
    return {"cpu": cpu_name(), "isa": cpu_isa(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "commit": _git_rev(), **versions()}


def record(benchmark, group: str, candidates: Mapping[str, Fn], baseline: str,
           suite: str, info: Optional[dict] = None, **kwargs) -> dict:
    """Run :func:`paired` under pytest-benchmark and store the result in the
    benchmark's ``extra_info`` (``suite``, ``group``, ``paired``, machine,
    versions, threads and the caller's ``info``: dtype, shapes...)."""
    benchmark.group = group
    result: dict = {}

    def once():
        result.update(paired(candidates, baseline, **kwargs))

    benchmark.pedantic(once, rounds=1, iterations=1)
    benchmark.extra_info.update({**machine_info(), **(info or {}), "suite": suite,
                                 "group": group, "paired": result})
    return result


if __name__ == "__main__":  # `make bench` names its result file after the machine
    print(machine_slug())
