"""Run one training config over several seeds and report what holds across them.

    python scripts/seeds.py --config examples/sentiment/config.yaml --seeds 0 1 2 \
        --output-dir runs/sentiment-seeds [--set KEY=VALUE ...] [--aggregate-only]

Each seed trains with ``sae-fast train --config C --seed N --output-dir OUT/seed<N>``
(a seed whose ``summary.json`` exists is not rerun; one with checkpoints but no
summary is resumed). Then, from every seed's ``summary.json``,
``eval/per_question.json`` and ``metrics.jsonl``:

- per seed: each method's combined reward (95% interval over validation
  questions), concept, fluency and repetition;
- pooled: each question's scores averaged over the seeds, then the mean and
  95% interval over questions (the questions are the unit of sampling; the
  seeds change the training, the constant's selection split and the random
  strengths);
- the spread over seeds (mean, std, min, max of each method's mean);
- per question type (data_source), pooled;
- the checks issue 15 asks for: the learned predictor beats the best constant
  with non-overlapping 95% intervals (per seed and pooled), its fluency is
  within ``--fluency-margin`` nats/token of unsteered, and its sampled training
  reward rises (mean of the last ``--curve-window`` steps above the first).

Writes ``OUT/seeds.md`` and ``OUT/seeds.json`` and prints the markdown.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sae_fast.checks import atomic_write  # noqa: E402
from sae_fast.train.trainer import SCORES, mean_ci95  # noqa: E402

ORDER = ["unsteered", "random", "best_constant", "configured", "learned"]


def run_seed(config: str, seed: int, out: Path, sets: list[str], threads: int = 0) -> None:
    if (out / "summary.json").is_file():
        print(f"seed {seed}: {out}/summary.json exists, not rerun", flush=True)
        return
    cmd = [sys.executable, "-m", "sae_fast.cli", "train", "--config", config, "--seed", str(seed),
           "--output-dir", str(out), "--threads", str(threads)]
    for s in sets:
        cmd += ["--set", s]
    if (out / "checkpoints").is_dir():
        cmd.append("--resume")
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def load_seed(out: Path) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    per_q = json.loads((out / "eval" / "per_question.json").read_text())
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {"summary": summary, "per_question": per_q,
            "train_reward": [r["reward/mean"] for r in rows if r.get("kind") == "train"],
            "val_curve": [(r["step"], r.get("val/learned/reward_mean")) for r in rows
                          if r.get("kind") == "val" and "val/learned/reward_mean" in r]}


def interval(values) -> dict:
    m, h = mean_ci95(list(values))
    return {"mean": m, "ci95": h, "lo": m - h, "hi": m + h}


def aggregate(seeds: dict[int, dict], fluency_margin: float, window: int) -> dict:
    methods = [m for m in ORDER if all(m in s["per_question"] for s in seeds.values())]
    first = next(iter(seeds.values()))["per_question"]
    n = len(first[methods[0]]["rewards"])
    groups = first[methods[0]]["groups"]
    for seed, s in seeds.items():
        for m in methods:
            if len(s["per_question"][m]["rewards"]) != n:
                raise SystemExit(f"seed {seed}: {m} has {len(s['per_question'][m]['rewards'])} "
                                 f"validation questions, seed {next(iter(seeds))} has {n}")
    keys = ["rewards", *SCORES]
    pooled: dict[str, dict] = {}
    for m in methods:
        row = {}
        for key in keys:
            if not all(key in s["per_question"][m] for s in seeds.values()):
                continue
            per_q = [sum(s["per_question"][m][key][i] for s in seeds.values()) / len(seeds)
                     for i in range(n)]
            row[key] = interval(per_q)
            row.setdefault("_per_q", {})[key] = per_q
        by_group = {}
        for g in sorted(set(groups)):
            idx = [i for i, x in enumerate(groups) if x == g]
            by_group[g] = {key: sum(row["_per_q"][key][i] for i in idx) / len(idx)
                           for key in row["_per_q"]}
        row["by_group"] = by_group
        row.pop("_per_q")
        means = [interval(s["per_question"][m]["rewards"])["mean"] for s in seeds.values()]
        mu = sum(means) / len(means)
        sd = math.sqrt(sum((x - mu) ** 2 for x in means) / (len(means) - 1)) if len(means) > 1 else 0.0
        row["seed_spread"] = {"mean": mu, "std": sd, "min": min(means), "max": max(means)}
        pooled[m] = row
    per_seed = {}
    for seed, s in seeds.items():
        v = s["summary"]["validation"]
        rows = {m: {**interval(s["per_question"][m]["rewards"]),
                    **{k: v[m].get(k) for k in SCORES if k in v[m]},
                    "detail": v[m].get("detail", "")} for m in methods}
        tr = s["train_reward"]
        w = max(1, min(window, len(tr) // 2))
        per_seed[seed] = {"methods": rows, "train_reward_first": sum(tr[:w]) / w,
                          "train_reward_last": sum(tr[-w:]) / w, "curve_window": w,
                          "val_curve": s["val_curve"],
                          "keep_best": s["summary"].get("keep_best")}
    # paired: learned minus each baseline on the same question (the question's difficulty
    # cancels, so this interval is the sharper test of "beats")
    paired = {}
    if "learned" in methods:
        for m in methods:
            if m == "learned":
                continue
            diff = [sum(s["per_question"]["learned"]["rewards"][i] - s["per_question"][m]["rewards"][i]
                        for s in seeds.values()) / len(seeds) for i in range(n)]
            paired[m] = interval(diff)
    checks = {}
    if "best_constant" in paired:
        checks["paired_beats_best_constant"] = paired["best_constant"]["lo"] > 0
    if "learned" in pooled and "best_constant" in pooled:
        lr, bc = pooled["learned"]["rewards"], pooled["best_constant"]["rewards"]
        checks["pooled_beats_best_constant_disjoint_ci"] = lr["lo"] > bc["hi"]
        checks["per_seed_beats_best_constant_disjoint_ci"] = {
            seed: r["methods"]["learned"]["lo"] > r["methods"]["best_constant"]["hi"]
            for seed, r in per_seed.items()}
    if "learned" in pooled and "fluency" in pooled["learned"]:
        unsteered = pooled.get("unsteered", {}).get("fluency", {}).get("mean", 0.0)
        cost = pooled["learned"]["fluency"]["mean"] - unsteered
        checks["fluency_cost"] = cost
        checks["fluency_within_margin"] = cost <= fluency_margin
    checks["train_reward_rises"] = {seed: r["train_reward_last"] > r["train_reward_first"]
                                    for seed, r in per_seed.items()}
    return {"seeds": list(seeds), "n_val": n, "methods": methods, "pooled": pooled,
            "paired_learned_minus": paired,
            "per_seed": per_seed, "checks": checks, "fluency_margin": fluency_margin}


def fmt(x, digits=4) -> str:
    return "" if x is None else f"{x:+.{digits}f}" if isinstance(x, float) else str(x)


def markdown(agg: dict, config: str) -> str:
    seeds = agg["seeds"]
    out = [f"# {config} over seeds {', '.join(map(str, seeds))}", "",
           f"{agg['n_val']} validation questions; each question's scores averaged over the "
           "seeds, then the mean and 95% interval over questions. Reward = concept - "
           "fluency_weight * max(0, fluency) - repetition_weight * repetition; fluency is the "
           "completion's NLL under the unsteered model minus that of the unsteered completion "
           "(nats/token, lower is better).", "",
           "| method | reward (pooled) | 95% interval | concept | fluency | repetition | "
           "seed mean +- std [min, max] |", "|---|---|---|---|---|---|---|"]
    for m in agg["methods"]:
        p = agg["pooled"][m]
        r = p["rewards"]
        sp = p["seed_spread"]
        out.append(f"| {m} | {r['mean']:.4f} | [{r['lo']:.4f}, {r['hi']:.4f}] | "
                   + " | ".join(f"{p[k]['mean']:.4f}" if k in p else "" for k in SCORES)
                   + f" | {sp['mean']:.4f} +- {sp['std']:.4f} [{sp['min']:.4f}, {sp['max']:.4f}] |")
    out += ["", "## Per seed (reward, 95% interval over questions)", "",
            "| seed | " + " | ".join(agg["methods"]) + " | train reward first -> last | "
            "kept step |", "|---|" + "---|" * (len(agg["methods"]) + 2)]
    for seed, r in agg["per_seed"].items():
        cells = [f"{r['methods'][m]['mean']:.4f} +- {r['methods'][m]['ci95']:.4f}"
                 for m in agg["methods"]]
        kb = (r.get("keep_best") or {}).get("step", "")
        out.append(f"| {seed} | " + " | ".join(cells) + f" | {r['train_reward_first']:.4f} -> "
                   f"{r['train_reward_last']:.4f} (mean of {r['curve_window']} steps) | {kb} |")
    if agg["paired_learned_minus"]:
        out += ["", "## Learned minus each baseline, paired by question (pooled over seeds)", "",
                "| baseline | mean difference | 95% interval |", "|---|---|---|"]
        for m, d in agg["paired_learned_minus"].items():
            out.append(f"| {m} | {d['mean']:+.4f} | [{d['lo']:+.4f}, {d['hi']:+.4f}] |")
    groups = sorted(agg["pooled"][agg["methods"][0]]["by_group"])
    out += ["", "## Per question type (pooled reward; concept / fluency in brackets)", "",
            "| type | " + " | ".join(agg["methods"]) + " |", "|---|" + "---|" * len(agg["methods"])]
    for g in groups:
        cells = []
        for m in agg["methods"]:
            b = agg["pooled"][m]["by_group"][g]
            cells.append(f"{b['rewards']:.3f} ({b.get('concept', float('nan')):.3f} / "
                         f"{b.get('fluency', float('nan')):+.3f})")
        out.append(f"| {g} | " + " | ".join(cells) + " |")
    c = agg["checks"]
    out += ["", "## Checks", ""]
    if "pooled_beats_best_constant_disjoint_ci" in c:
        out.append(f"- learned beats the best constant with disjoint 95% intervals, pooled: "
                   f"**{c['pooled_beats_best_constant_disjoint_ci']}**; per seed: "
                   f"{c['per_seed_beats_best_constant_disjoint_ci']}")
    if "paired_beats_best_constant" in c:
        out.append(f"- learned minus best constant, paired 95% interval above 0: "
                   f"**{c['paired_beats_best_constant']}**")
    if "fluency_cost" in c:
        out.append(f"- learned fluency cost vs unsteered: {c['fluency_cost']:+.4f} nats/token "
                   f"(margin {agg['fluency_margin']}): **{c['fluency_within_margin']}**")
    out.append(f"- sampled training reward rises (last vs first window): {c['train_reward_rises']}")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--output-dir", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per seed's run (default 0 = torch's default)")
    p.add_argument("--aggregate-only", action="store_true", help="do not train missing seeds")
    p.add_argument("--fluency-margin", type=float, default=0.25,
                   help="allowed learned-minus-unsteered fluency (nats/token)")
    p.add_argument("--curve-window", type=int, default=10,
                   help="training steps averaged at each end of the reward curve")
    args = p.parse_args(argv)
    out = Path(args.output_dir)
    if len(args.seeds) != len(set(args.seeds)):
        p.error(f"--seeds {args.seeds}: repeated seed")
    seeds = {}
    for seed in args.seeds:
        d = out / f"seed{seed}"
        if not args.aggregate_only:
            run_seed(args.config, seed, d, args.set, args.threads)
        if not (d / "summary.json").is_file():
            print(f"seed {seed}: no {d}/summary.json, left out", file=sys.stderr)
            continue
        seeds[seed] = load_seed(d)
    if not seeds:
        p.error(f"no finished seed under {out}")
    agg = aggregate(seeds, args.fluency_margin, args.curve_window)
    text = markdown(agg, args.config)
    atomic_write(out / "seeds.json", json.dumps(agg, indent=2, default=float))
    atomic_write(out / "seeds.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
