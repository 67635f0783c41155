"""Where the C++ CPU op should switch from its row kernel to its GEMM path.

    python benchmarks/cpu_crossover.py [--rounds 5]

The op takes the GEMM path once the live work T * k * d reaches
``SAE_FAST_CPU_GEMM_MIN_WORK`` (read once per process). This script times
``torch.ops.sae_fast.steer_`` (fp32, every row steered, set mode, residual
given, 1 thread) for shapes around the default, in two child processes per
round: one forced onto the row kernel, one onto the GEMM path, alternating
which goes first. It prints per shape the median us of each and the median
per-round ratio GEMM / row; the default belongs where that ratio crosses 1.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

SHAPES = [(T, d, k) for d in (576, 2048, 4096) for k in (8, 32) for T in (1, 4, 8, 16, 32, 64, 128)]

CHILD = r"""
import json, sys, time, torch
torch.set_num_threads(1)
import sae_fast.ops  # registers the ops
from sae_fast.ops import codes
from sae_fast.ops.testing import random_steer_case
out = {}
for T, d, k in json.loads(sys.argv[1]):
    c = random_steer_case(T, d, k, R=2, modes=[codes.MODE_SET], seed=T + d + k)
    c["row_index"].fill_(1)
    c["modes"][1] = codes.MODE_SET
    h0 = c["hidden"].clone()
    op = torch.ops.sae_fast.steer_.default
    args = [c[n] for n in ("hidden", "residual", "enc_w", "enc_b", "threshold", "dec_w", "max_act",
                           "strengths", "modes", "row_index", "topk_kth")]
    args += [c["activation"], 1.0, float("-inf"), float("inf")]
    n = max(20, int(2e6 // (T * k * d + 20000)))
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            c["hidden"].copy_(h0)
            op(*args)
        best = min(best, (time.perf_counter() - t0) / n)
    out[f"{T},{d},{k}"] = best
print(json.dumps(out))
"""


def child(force: str) -> dict:
    env = dict(os.environ, SAE_FAST_CPU_GEMM_MIN_WORK="0" if force == "gemm" else str(1 << 62))
    p = subprocess.run([sys.executable, "-c", CHILD, json.dumps(SHAPES)], env=env,
                       capture_output=True, text=True, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    runs = {"row": [], "gemm": []}
    for r in range(a.rounds):
        for force in (("row", "gemm") if r % 2 == 0 else ("gemm", "row")):
            runs[force].append(child(force))
    print("| T | d | k | T*k*d | row us | GEMM us | GEMM / row |\n|---:|---:|---:|---:|---:|---:|---:|")
    for T, d, k in SHAPES:
        key = f"{T},{d},{k}"
        row = [x[key] for x in runs["row"]]
        gemm = [x[key] for x in runs["gemm"]]
        ratio = statistics.median(g / r for g, r in zip(gemm, row))
        print(f"| {T} | {d} | {k} | {T * k * d} | {statistics.median(row) * 1e6:.1f} | "
              f"{statistics.median(gemm) * 1e6:.1f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
