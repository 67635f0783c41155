"""Turn a pytest-benchmark JSON into a markdown table (and optionally a plot).

    python benchmarks/report.py benchmarks/results/cpu.json [--plot out.png]

Per group, every candidate's median time and its ratio to the group's
baseline (``ext`` when present, else the fastest) from the same run.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path


def _impl(name: str) -> str:
    m = re.search(r"\[(.*?)\]", name)
    parts = m.group(1).split("-") if m else [name]
    for p in parts:
        if p in ("ext", "reference", "full_sae", "noop", "triton", "cuda", "unsteered", "steered",
                 "full_sae_hook"):
            return p
    return parts[0]


def load(path: str) -> dict[str, dict[str, dict]]:
    data = json.loads(Path(path).read_text())
    groups: dict[str, dict[str, dict]] = defaultdict(dict)
    for b in data["benchmarks"]:
        groups[b.get("group") or b["name"]][_impl(b["name"])] = b
    return groups


def table(groups: dict[str, dict[str, dict]], unit: float = 1e6, unit_name: str = "us") -> str:
    lines = [f"| group | impl | median ({unit_name}) | vs ext |", "|---|---|---:|---:|"]
    for group, impls in groups.items():
        base = impls.get("ext") or min(impls.values(), key=lambda b: b["stats"]["median"])
        for name, b in sorted(impls.items(), key=lambda kv: kv[1]["stats"]["median"]):
            med = b["stats"]["median"]
            lines.append(f"| {group} | {name} | {med * unit:.1f} | "
                         f"{med / base['stats']['median']:.2f}x |")
    return "\n".join(lines)


def plot(groups: dict[str, dict[str, dict]], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(groups)
    impls = sorted({i for g in groups.values() for i in g})
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(names)), 4))
    width = 0.8 / max(len(impls), 1)
    for j, impl in enumerate(impls):
        xs = [i + j * width for i, g in enumerate(names) if impl in groups[g]]
        ys = [groups[g][impl]["stats"]["median"] * 1e6 for g in names if impl in groups[g]]
        ax.bar(xs, ys, width, label=impl)
    ax.set_yscale("log")
    ax.set_ylabel("median time per step (us, log)")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))])
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=7)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("json")
    ap.add_argument("--plot")
    a = ap.parse_args()
    groups = load(a.json)
    print(table(groups))
    if a.plot:
        plot(groups, a.plot)


if __name__ == "__main__":
    main()
