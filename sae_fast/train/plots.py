"""Training plots (matplotlib, Agg backend; files only, no display):

    reward_curve.png            train reward per step + validation curves per method
    strength_distributions.png  predicted strengths per feature, split by data_source
    feature_activations.png     selected features' activation before vs after steering
    strength_vs_unsteered.png   each question's learned strength against its unsteered
                                concept score (how close it already is), by data_source

``make_all(output_dir)`` rebuilds them from ``metrics.jsonl`` and the files
of the final evaluation (``eval/strengths.json``, ``eval/activations.json``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)

MAX_FEATURES_PLOTTED = 16


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, out: Path) -> Path:
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def read_metrics(path: Path) -> list[dict]:
    rows = []
    if not Path(path).is_file():
        return rows
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a torn last line after a kill
    return rows


def plot_reward_curve(rows: list[dict], out: Path, title: str = "") -> Optional[Path]:
    train = [r for r in rows if r.get("kind") == "train" and "reward/mean" in r]
    val = [r for r in rows if r.get("kind") == "val"]
    if not train and not val:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        steps = [r["step"] for r in train]
        ax.plot(steps, [r["reward/mean"] for r in train], color="0.6", lw=1, label="train (sampled)")
        if len(train) >= 5:
            w = max(2, len(train) // 10)
            sm = [sum(r["reward/mean"] for r in train[max(0, i - w + 1):i + 1]) /
                  len(train[max(0, i - w + 1):i + 1]) for i in range(len(train))]
            ax.plot(steps, sm, color="k", lw=1.5, label=f"train (mean of {w})")
    methods = sorted({k.split("/")[1] for r in val for k in r if k.startswith("val/")
                      and k.endswith("/reward_mean")})
    for m in methods:
        pts = [(r["step"], r[f"val/{m}/reward_mean"], r.get(f"val/{m}/reward_ci95", 0.0))
               for r in val if f"val/{m}/reward_mean" in r]
        if not pts:
            continue
        xs, ys, es = zip(*pts)
        ax.errorbar(xs, ys, yerr=es, marker="o", ms=3, capsize=2, label=f"val: {m}")
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.set_title(title or "reward")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, out)


def plot_strength_distributions(data: dict, out: Path) -> Optional[Path]:
    """``data``: {"features": [...], "strengths": [[...k] per question],
    "groups": [label per question], "bounds": [lo, hi]}."""
    strengths = data.get("strengths") or []
    if not strengths:
        return None
    feats = data.get("features") or list(range(len(strengths[0])))
    k = min(len(feats), MAX_FEATURES_PLOTTED)
    groups = data.get("groups") or ["all"] * len(strengths)
    labels = sorted(set(groups))
    plt = _plt()
    cols = min(k, 4)
    rows_n = -(-k // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(3.2 * cols, 2.6 * rows_n), squeeze=False)
    lo, hi = data.get("bounds") or (min(min(r) for r in strengths), max(max(r) for r in strengths))
    if lo == hi:
        lo, hi = lo - 1, hi + 1
    bins = [lo + (hi - lo) * i / 30 for i in range(31)]
    for j in range(rows_n * cols):
        ax = axes[j // cols][j % cols]
        if j >= k:
            ax.axis("off")
            continue
        for lab in labels:
            vals = [r[j] for r, g in zip(strengths, groups) if g == lab]
            ax.hist(vals, bins=bins, alpha=0.6, label=str(lab))
        ax.set_title(f"feature {feats[j]}", fontsize=9)
        ax.set_xlim(lo, hi)
        if j == 0:
            ax.legend(fontsize=7)
    extra = "" if len(feats) <= k else f" (first {k} of {len(feats)} features)"
    fig.suptitle(f"predicted strengths per feature{extra}", fontsize=10)
    return _save(plt, fig, out)


def plot_feature_activations(data: dict, out: Path,
                             by_group: Optional[dict] = None) -> Optional[Path]:
    """``data``: {feature: {"before_mean", "after_mean", ...}} from SteeringStats;
    ``by_group``: {data_source: such a dict}, one pair of bars per feature and
    question type (else one pair per feature over all questions)."""
    if not data:
        return None
    feats = list(data)[:MAX_FEATURES_PLOTTED]
    groups = sorted(by_group) if by_group else [None]
    cols = [(f, g) for f in feats for g in groups
            if g is None or f in by_group[g]]
    src = lambda g: data if g is None else by_group[g]  # noqa: E731
    before = [src(g)[f]["before_mean"] for f, g in cols]
    after = [src(g)[f]["after_mean"] for f, g in cols]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(4, 0.9 * len(cols) + 2), 3.5))
    xs = list(range(len(cols)))
    ax.bar([x - 0.2 for x in xs], before, width=0.4, label="before steering")
    ax.bar([x + 0.2 for x in xs], after, width=0.4, label="after steering")
    ax.set_xticks(xs)
    ax.set_xticklabels([str(f) if g is None else f"{f}\n{g}" for f, g in cols], fontsize=8)
    ax.set_xlabel("SAE feature" + ("" if by_group is None else " / question type"))
    ax.set_ylabel("mean activation per token")
    ax.set_title("feature activation at the steered layer\n(validation, learned strengths)", fontsize=9)
    ax.axhline(0, color="k", lw=0.5)
    ax.legend(fontsize=8)
    return _save(plt, fig, out)


def plot_strength_vs_unsteered(data: dict, out: Path) -> Optional[Path]:
    """``data`` as for :func:`plot_strength_distributions` plus
    "unsteered_concept" (per question): the first feature's learned strength
    against the concept score the question gets without steering."""
    xs, strengths = data.get("unsteered_concept"), data.get("strengths") or []
    if not xs or not strengths:
        return None
    groups = data.get("groups") or ["all"] * len(strengths)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for lab in sorted(set(groups)):
        idx = [i for i, g in enumerate(groups) if g == lab]
        ax.scatter([xs[i] for i in idx], [strengths[i][0] for i in idx], s=14, alpha=0.7,
                   label=str(lab))
    feats = data.get("features") or [0]
    ax.set_xlabel("concept score without steering")
    ax.set_ylabel(f"learned strength (feature {feats[0]})")
    ax.set_title("learned strength vs how close the question already is", fontsize=9)
    ax.axhline(0, color="k", lw=0.5)
    ax.legend(fontsize=7)
    return _save(plt, fig, out)


def make_all(output_dir: Any, title: str = "") -> list[Path]:
    """Rebuild every plot that has data in ``output_dir``; returns the files."""
    out_dir = Path(output_dir)
    made = []
    try:
        p = plot_reward_curve(read_metrics(out_dir / "metrics.jsonl"), out_dir / "reward_curve.png",
                              title)
        made.append(p)
        s = out_dir / "eval" / "strengths.json"
        if s.is_file():
            data = json.loads(s.read_text())
            made.append(plot_strength_distributions(data, out_dir / "strength_distributions.png"))
            made.append(plot_strength_vs_unsteered(data, out_dir / "strength_vs_unsteered.png"))
        a = out_dir / "eval" / "activations.json"
        ag = out_dir / "eval" / "activations_by_group.json"
        if a.is_file():
            made.append(plot_feature_activations(
                json.loads(a.read_text()), out_dir / "feature_activations.png",
                by_group=json.loads(ag.read_text()) if ag.is_file() else None))
    except ImportError as err:
        log.warning("plots skipped: matplotlib is not installed (%s)", err)
    return [p for p in made if p is not None]
