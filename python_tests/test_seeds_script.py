"""scripts/seeds.py: the multi-seed report pools each question over seeds, and
its checks (disjoint intervals, fluency margin, rising training reward) say what
the numbers say; checked against numpy/statistics on hand-made run folders."""

import json
import statistics
from pathlib import Path

import numpy as np
import pytest
from repo_scripts import load_script


def _script():
    return load_script("scripts/seeds.py")


def _write_seed(d: Path, rng, shift: float, rising: bool, n=40):
    groups = ["a"] * (n // 2) + ["b"] * (n - n // 2)
    per_q, validation = {}, {}
    for m, base in (("unsteered", 0.0), ("random", -0.1), ("best_constant", 0.05),
                    ("learned", shift)):
        rewards = (base + 0.1 * rng.standard_normal(n)).tolist()
        fluency = (0.0 if m == "unsteered" else 0.1) + 0.01 * rng.standard_normal(n)
        per_q[m] = {"name": m, "rewards": rewards, "groups": groups,
                    "concept": rewards, "fluency": fluency.tolist(), "repetition": [0.0] * n}
        validation[m] = {"mean": float(np.mean(rewards)), "concept": float(np.mean(rewards)),
                         "fluency": float(fluency.mean()), "repetition": 0.0, "detail": ""}
    (d / "eval").mkdir(parents=True)
    (d / "eval" / "per_question.json").write_text(json.dumps(per_q))
    (d / "summary.json").write_text(json.dumps({"validation": validation,
                                                "keep_best": {"step": 20}}))
    curve = np.linspace(0, 1, 30) if rising else np.linspace(1, 0, 30)
    rows = [{"kind": "train", "step": i + 1, "reward/mean": float(r)} for i, r in enumerate(curve)]
    rows.append({"kind": "val", "step": 30, "val/learned/reward_mean": 0.3})
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return per_q


def test_pooled_report_matches_an_independent_computation(tmp_path, capsys):
    mod = _script()
    rng = np.random.default_rng(0)
    per_seed = {s: _write_seed(tmp_path / f"seed{s}", rng, shift=0.5, rising=s != 2)
                for s in (0, 1, 2)}
    assert mod.main(["--config", "c.yaml", "--seeds", "0", "1", "2", "--output-dir",
                     str(tmp_path), "--aggregate-only", "--fluency-margin", "0.15"]) == 0
    agg = json.loads((tmp_path / "seeds.json").read_text())
    for m in ("unsteered", "random", "best_constant", "learned"):
        per_q = np.mean([per_seed[s][m]["rewards"] for s in (0, 1, 2)], axis=0)
        got = agg["pooled"][m]["rewards"]
        assert got["mean"] == pytest.approx(per_q.mean())
        assert got["ci95"] == pytest.approx(1.96 * per_q.std(ddof=1) / np.sqrt(len(per_q)))
        seed_means = [np.mean(per_seed[s][m]["rewards"]) for s in (0, 1, 2)]
        assert agg["pooled"][m]["seed_spread"]["std"] == pytest.approx(statistics.stdev(seed_means))
        a = [i for i in range(40) if i < 20]
        assert agg["pooled"][m]["by_group"]["a"]["rewards"] == pytest.approx(per_q[a].mean())
    diff = np.mean([np.array(per_seed[s]["learned"]["rewards"])
                    - np.array(per_seed[s]["best_constant"]["rewards"]) for s in (0, 1, 2)], axis=0)
    got = agg["paired_learned_minus"]["best_constant"]
    assert got["mean"] == pytest.approx(diff.mean())
    assert got["ci95"] == pytest.approx(1.96 * diff.std(ddof=1) / np.sqrt(len(diff)))
    c = agg["checks"]
    assert c["paired_beats_best_constant"] is True
    assert c["pooled_beats_best_constant_disjoint_ci"] is True
    assert all(c["per_seed_beats_best_constant_disjoint_ci"].values())
    assert c["fluency_cost"] == pytest.approx(
        np.mean([per_seed[s]["learned"]["fluency"] for s in (0, 1, 2)])
        - np.mean([per_seed[s]["unsteered"]["fluency"] for s in (0, 1, 2)]))
    assert c["fluency_within_margin"] is True
    assert c["train_reward_rises"] == {"0": True, "1": True, "2": False}
    text = (tmp_path / "seeds.md").read_text()
    assert "| learned |" in text and text in capsys.readouterr().out


def test_checks_fail_when_the_learned_method_does_not_separate(tmp_path):
    mod = _script()
    rng = np.random.default_rng(1)
    for s in (0, 1):
        _write_seed(tmp_path / f"seed{s}", rng, shift=0.06, rising=True)
    mod.main(["--config", "c.yaml", "--seeds", "0", "1", "--output-dir", str(tmp_path),
              "--aggregate-only", "--fluency-margin", "0.05"])
    c = json.loads((tmp_path / "seeds.json").read_text())["checks"]
    assert c["pooled_beats_best_constant_disjoint_ci"] is False
    assert c["paired_beats_best_constant"] is False
    assert c["fluency_within_margin"] is False


def test_missing_seed_and_mismatched_validation_sets_are_refused(tmp_path):
    mod = _script()
    rng = np.random.default_rng(2)
    _write_seed(tmp_path / "seed0", rng, 0.5, True, n=40)
    with pytest.raises(SystemExit):
        mod.main(["--config", "c.yaml", "--seeds", "5", "--output-dir", str(tmp_path),
                  "--aggregate-only"])
    _write_seed(tmp_path / "seed1", rng, 0.5, True, n=30)
    with pytest.raises(SystemExit, match="validation questions"):
        mod.main(["--config", "c.yaml", "--seeds", "0", "1", "--output-dir", str(tmp_path),
                  "--aggregate-only"])
