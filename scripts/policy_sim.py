"""Research: replay the trainer's policy learning on a strength sweep's rewards,
in seconds instead of the half hour a real run takes.

Before spending a run on a learning rate or an exploration width, ask whether
the trainer's own GRPO update can find good per-question strengths *when the
reward is known*: this builds the real :class:`sae_fast.train.trainer.Trainer`
(the frozen model, the question embeddings, the predictor, the optimiser, the
batch schedule and the sampling seeds of the config), then replaces every
rollout by a lookup in the per-question dumps of ``scripts/strength_sweep.py
--per-question`` (one for the training split, one for validation): the
reward of question ``i`` at strength ``s`` is the combined reward (the
config's fluency and repetition weights) interpolated linearly between the
two grid strengths around ``s`` (``--lookup nearest``: the nearest one, a
step function like greedy decoding's jumps).

What it cannot show: the reward *between* grid points (greedy text changes
at strengths the grid never tried), so a policy that succeeds here can still
fail on real rollouts; one that fails here will fail there.

    python scripts/policy_sim.py --config examples/sentiment/config.yaml \\
        --train-sweep perq_train.json --val-sweep perq_val.json \\
        [--set algorithm.lr=1e-3 ...] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import bisect
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from oracle_gap import rewards_per_strength  # noqa: E402


class SweepReward:
    """reward(question prompt, strength) from one per-question sweep dump."""

    def __init__(self, per_q: dict, fluency_weight: float, repetition_weight: float,
                 lookup: str = "linear"):
        rewards = rewards_per_strength(per_q, fluency_weight, repetition_weight)
        self.grid = sorted(float(s) for s in rewards)
        keys = {float(s): s for s in rewards}
        prompts = next(iter(per_q.values()))["prompts"]
        self.groups = dict(zip(prompts, next(iter(per_q.values()))["groups"]))
        self.table = {p: [rewards[keys[g]][i] for g in self.grid] for i, p in enumerate(prompts)}
        if lookup not in ("linear", "nearest"):
            raise ValueError(f"lookup {lookup!r}: expected 'linear' or 'nearest'")
        self.lookup = lookup

    def __call__(self, prompt: str, s: float) -> float:
        row, g = self.table[prompt], self.grid
        s = min(max(s, g[0]), g[-1])
        j = min(max(bisect.bisect_right(g, s) - 1, 0), len(g) - 2)
        w = (s - g[j]) / (g[j + 1] - g[j])
        if self.lookup == "nearest":
            return row[j + 1] if w >= 0.5 else row[j]
        return (1 - w) * row[j] + w * row[j + 1]

    def best_constant(self, prompts: Sequence[str]) -> tuple[float, float]:
        best = max(self.grid, key=lambda s: sum(self(p, s) for p in prompts))
        return best, sum(self(p, best) for p in prompts) / len(prompts)


def simulate(trainer, train_r: SweepReward, val_r: SweepReward, every: int = 10) -> list[dict]:
    """Run the trainer's steps with swept rewards; a row per ``every`` steps."""
    from sae_fast.train.trainer import _mix, mean_ci95

    cfg, n = trainer.cfg, trainer.cfg.algorithm.n_samples
    rows, window = [], []

    def val_row(step: int) -> dict:
        s = trainer.learned_strengths(trainer.val_prompts)[:, 0].tolist()
        raw = [e.prompt for e in trainer.val_examples]
        rewards = [val_r(p, x) for p, x in zip(raw, s)]
        by_type: dict[str, list[float]] = {}
        for p, x in zip(raw, s):
            by_type.setdefault(val_r.groups[p], []).append(x)
        m, h = mean_ci95(rewards)
        return {"step": step, "val": m, "val_ci95": h,
                "train_sampled": sum(window) / len(window) if window else None,
                "strength_per_type": {k: round(sum(v) / len(v), 1) for k, v in sorted(by_type.items())},
                "strength_std_within_type": round(float(torch.tensor(
                    [x - sum(by_type[val_r.groups[p]]) / len(by_type[val_r.groups[p]])
                     for p, x in zip(raw, s)]).std()), 1)}

    rows.append(val_row(0))
    for step in range(1, trainer.total_steps + 1):
        idx = trainer.schedule.batch(step - 1)
        prompts = [trainer.train_prompts[i] for i in idx]
        raw = [trainer.train_examples[i].prompt for i in idx]
        gen = torch.Generator().manual_seed(_mix(cfg.trainer.seed, step, 1))
        emb = trainer.embedder.embed_texts(prompts)
        trainer.predictor.train()
        trainer.updater.begin_step(step, trainer.total_steps)
        batch = trainer.predictor.sample(emb, n, generator=gen)
        s = batch["strengths"][:, 0].tolist()
        r = torch.tensor([train_r(p, x) for p, x in zip([q for q in raw for _ in range(n)], s)])
        trainer.updater.update(emb, batch, r, generator=gen)
        window.append(float(r.mean()))
        if step % every == 0 or step == trainer.total_steps:
            rows.append(val_row(step))
            window = []
    return rows


def main(argv=None) -> int:
    from sae_fast.config import load_config
    from sae_fast.train.trainer import Trainer

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[], help="key=value overrides")
    p.add_argument("--train-sweep", required=True, help="strength_sweep.py --split train --per-question")
    p.add_argument("--val-sweep", required=True, help="strength_sweep.py --split val --per-question")
    p.add_argument("--lookup", choices=("linear", "nearest"), default="linear")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="write every seed's rows as JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {}
    for seed in args.seeds:
        tmp = tempfile.mkdtemp(prefix="policy_sim_")
        cfg = load_config(args.config, overrides=list(args.set) + [
            f"trainer.seed={seed}", f"trainer.output_dir={tmp}", "trainer.tensorboard=false",
            "trainer.plots=false", "trainer.progress_bar=false"])
        train_r = SweepReward(json.loads(Path(args.train_sweep).read_text()),
                              cfg.reward.fluency_weight, cfg.reward.repetition_weight, args.lookup)
        val_r = SweepReward(json.loads(Path(args.val_sweep).read_text()),
                            cfg.reward.fluency_weight, cfg.reward.repetition_weight, args.lookup)
        with Trainer(cfg) as trainer:
            trainer.setup()
            if seed == args.seeds[0]:
                s, m = train_r.best_constant([e.prompt for e in trainer.train_examples])
                v = [val_r(e.prompt, s) for e in trainer.val_examples]
                print(f"best constant on the training sweep: s={s:g} ({m:.3f}); "
                      f"on validation {sum(v) / len(v):.3f}")
            rows = simulate(trainer, train_r, val_r, args.every)
        shutil.rmtree(tmp, ignore_errors=True)
        results[seed] = rows
        for r in rows:
            ts = "" if r["train_sampled"] is None else f" train(sampled) {r['train_sampled']:+.3f}"
            print(f"seed {seed} step {r['step']:3d} val {r['val']:+.3f} +-{r['val_ci95']:.3f}{ts}"
                  f"  within-type std {r['strength_std_within_type']:5.1f}  {r['strength_per_type']}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
