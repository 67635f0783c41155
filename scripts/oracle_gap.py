"""Research: how much could *any* per-question-type strength beat the best
constant, before training anything?

Reads the per-question dump of ``scripts/strength_sweep.py --per-question``
(every question's concept, fluency and repetition at each constant strength
of a grid) and, for the reward weights given, prints per question family
(the ``data_source`` prefix before the first ``_``):

- unsteered (strength 0) and the best constant of the grid, chosen on the
  same questions (flattering to the constant);
- the per-type oracle: the best grid strength for each ``data_source``, the
  ceiling of a predictor that tells the types apart and picks their best
  constant;
- each one's 95% interval over questions and the paired gap (oracle minus
  best constant on the same question) with its interval.

If the oracle's interval overlaps the best constant's, no predictor can show
the disjoint intervals issue 15 asks for on that design and question count.

``--rescore`` recomputes the concept score from the stored texts with VADER
under another task design, so one sweep checks several designs:
``asked`` (compound signed by the tone a ``gloomy*`` / other family asks
for), ``upbeat`` (compound), ``neutralize`` (1 - |compound|), ``counter``
(against the topic tier: -compound for ``*_happy``, +compound for
``*_sad``, 1 - |compound| otherwise).

    python scripts/oracle_gap.py perq.json [--fluency-weight 1] [--repetition-weight 1]
        [--rescore neutralize]
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional

from sae_fast.train.trainer import mean_ci95

DESIGNS: dict[str, Callable[[float, str], float]] = {
    "asked": lambda c, g: -c if g.startswith("gloomy") else c,
    "upbeat": lambda c, g: c,
    "neutralize": lambda c, g: 1.0 - abs(c),
    "counter": lambda c, g: (-c if g.endswith("_happy") else c if g.endswith("_sad")
                             else 1.0 - abs(c)),
}


def rewards_per_strength(per_q: dict, fluency_weight: float, repetition_weight: float,
                         concept: Optional[dict[str, list[float]]] = None) -> dict[str, list[float]]:
    """Per strength: each question's ``concept - wf * max(0, fluency) - wr * repetition``
    (the trainer's combined reward), with the stored concept unless ``concept`` is given."""
    out = {}
    for s, d in per_q.items():
        c = concept[s] if concept is not None else d["scores"]["concept"]
        out[s] = [ci - fluency_weight * max(0.0, f) - repetition_weight * r
                  for ci, f, r in zip(c, d["scores"]["fluency"], d["scores"]["repetition"])]
    return out


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def oracle_gap(rewards: dict[str, list[float]], groups: list[str], idx: list[int]) -> dict:
    """Over the questions ``idx``: unsteered, best constant, per-type oracle and the paired
    gap, each as (mean, 95% half-width); the chosen strengths."""
    if "0" not in rewards:
        raise ValueError(f"the sweep has no strength 0 (unsteered); strengths: {sorted(rewards)}")
    best = max(rewards, key=lambda s: _mean([rewards[s][i] for i in idx]))
    per_type = {}
    for ty in sorted({groups[i] for i in idx}):
        j = [i for i in idx if groups[i] == ty]
        per_type[ty] = max(rewards, key=lambda s: _mean([rewards[s][i] for i in j]))
    oracle = [rewards[per_type[groups[i]]][i] for i in idx]
    const = [rewards[best][i] for i in idx]
    return {"unsteered": mean_ci95([rewards["0"][i] for i in idx]),
            "best_constant": mean_ci95(const), "best_strength": best,
            "oracle": mean_ci95(oracle), "per_type": per_type,
            "gap": mean_ci95([a - b for a, b in zip(oracle, const)])}


def main(argv=None) -> int:
    import json

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("per_question", help="the JSON of strength_sweep.py --per-question")
    p.add_argument("--fluency-weight", type=float, default=1.0)
    p.add_argument("--repetition-weight", type=float, default=1.0)
    p.add_argument("--rescore", choices=sorted(DESIGNS), help="recompute concept with VADER")
    args = p.parse_args(argv)
    per_q = json.loads(open(args.per_question).read())
    groups = next(iter(per_q.values()))["groups"]
    concept = None
    if args.rescore:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        vader, design = SentimentIntensityAnalyzer(), DESIGNS[args.rescore]
        concept = {s: [design(vader.polarity_scores(t)["compound"], g)
                       for t, g in zip(d["texts"], groups)] for s, d in per_q.items()}
    rewards = rewards_per_strength(per_q, args.fluency_weight, args.repetition_weight, concept)
    fmt = lambda mc: f"{mc[0]:+.3f} +-{mc[1]:.3f}"  # noqa: E731
    print(f"{'family':<10} {'unsteered':>14} {'best constant':>20} {'per-type oracle':>16} "
          f"{'paired gap':>15}  oracle strengths")
    for fam in sorted({g.split("_")[0] for g in groups}):
        idx = [i for i, g in enumerate(groups) if g.split("_")[0] == fam]
        r = oracle_gap(rewards, groups, idx)
        print(f"{fam:<10} {fmt(r['unsteered']):>14} {'s=' + r['best_strength']:>6} "
              f"{fmt(r['best_constant']):>13} {fmt(r['oracle']):>16} {fmt(r['gap']):>15}  "
              + " ".join(f"{t}:{s}" for t, s in r["per_type"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
