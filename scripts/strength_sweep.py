"""Research: how concept, fluency and repetition move with one constant
steering strength, per question type, for a training config.

For every strength of a grid, the trainer's own validation pass (its engine,
decoding, reward and fluency scoring) runs with that strength on every
question; prints, per ``data_source``, the mean reward (combined), concept,
fluency (NLL above the unsteered completion) and repetition, and writes them
as JSON. Default config: the embedded demo task.

    python scripts/strength_sweep.py [--config CFG.yaml] [--set key=value ...]
        [--grid -86 -43 0 43 86] [--split val|train] [--out sweep.json]

This is how a task's need for a prompt-dependent *magnitude* is checked: if
one strength is best for every question type on the combined score, a
constant wins and the task cannot show what a learned predictor adds.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    from sae_fast.config import load_config
    from sae_fast.train.demo_task import load_demo_task
    from sae_fast.train.trainer import Trainer, group_means

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="a training config (default: the embedded demo task)")
    p.add_argument("--set", action="append", default=[], help="key=value overrides")
    p.add_argument("--grid", type=float, nargs="+", help="strengths (default: 9 over the bounds)")
    p.add_argument("--split", choices=("val", "train"), default="val")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="strength_sweep.json")
    p.add_argument("--per-question", metavar="PATH",
                   help="also write every question's scores and text per strength (JSON): "
                        "what an oracle per question or per type would get under other weights")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    values = {} if args.config else load_demo_task().overrides()
    values["trainer.output_dir"] = tempfile.mkdtemp(prefix="sae_fast_sweep_")
    values["trainer.progress_bar"] = False
    cfg = load_config(args.config, overrides=args.set, values=values)
    t0 = time.perf_counter()
    with Trainer(cfg) as tr:
        tr.setup()
        examples = tr.val_examples if args.split == "val" else tr.train_examples
        prompts = tr.val_prompts if args.split == "val" else tr.train_prompts
        lo, hi = tr.bounds
        grid = args.grid or [lo + (hi - lo) * i / 8 for i in range(9)]
        k = len(cfg.sae.features)
        table: dict[str, dict[str, dict]] = {}
        per_q: dict[str, dict] = {}
        for s in grid:
            strengths = None if s == 0 else torch.full((len(examples), k), float(s))
            res = tr.run_method(f"s={s:g}", strengths, examples=examples, prompts=prompts)
            for g, row in group_means(res).items():
                table.setdefault(g, {})[f"{s:g}"] = row
            per_q[f"{s:g}"] = {"prompts": [e.prompt for e in examples], "groups": res.groups,
                               "rewards": res.rewards, "scores": res.scores, "texts": res.texts}
            print(f"s={s:9.3f} done ({time.perf_counter() - t0:.0f} s); e.g. "
                  f"{res.texts[0][:100]!r}", file=sys.stderr)
    for g, by_s in table.items():
        print(f"\n{g}")
        print(f"{'strength':>9} {'reward':>8} {'concept':>8} {'fluency':>8} {'repeat':>7} {'n':>4}")
        for s, r in by_s.items():
            print(f"{float(s):>9.2f} {r['reward']:>8.3f} {r['concept']:>8.3f} "
                  f"{r['fluency']:>8.3f} {r['repetition']:>7.3f} {int(r['n']):>4}")
    Path(args.out).write_text(json.dumps(table, indent=1))
    if args.per_question:
        Path(args.per_question).write_text(json.dumps(per_q))
    return 0


if __name__ == "__main__":
    sys.exit(main())
