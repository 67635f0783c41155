"""scripts/oracle_gap.py: the per-type oracle and best constant from a sweep's per-question
dump, checked against values worked out by hand."""

import json
import math

import pytest
from repo_scripts import load_script


def _load():
    return load_script("scripts/oracle_gap.py")


def _dump():
    # two types, two questions each; strength -10 suits type a, +10 type b, 0 is in between
    groups = ["x_a", "x_a", "x_b", "x_b"]
    concept = {"-10": [1.0, 0.8, -1.0, -0.6], "0": [0.2, 0.2, 0.2, 0.2], "10": [-1.0, -1.0, 0.9, 0.7]}
    fluency = {"-10": [0.5, -0.3, 0.5, 0.5], "0": [0.0] * 4, "10": [0.1, 0.1, 0.1, 0.1]}
    return {s: {"groups": groups, "texts": ["t"] * 4, "prompts": ["p"] * 4, "rewards": concept[s],
                "scores": {"concept": concept[s], "fluency": fluency[s], "repetition": [0.0] * 4}}
            for s in concept}


def test_oracle_and_best_constant_match_a_hand_computation():
    og = _load()
    d = _dump()
    r = og.rewards_per_strength(d, fluency_weight=1.0, repetition_weight=0.0)
    # fluency below 0 (more fluent than unsteered) is not rewarded: max(0, -0.3) = 0
    assert r["-10"] == pytest.approx([0.5, 0.8, -1.5, -1.1])
    assert r["10"] == pytest.approx([-1.1, -1.1, 0.8, 0.6])
    out = og.oracle_gap(r, d["0"]["groups"], [0, 1, 2, 3])
    # means: -10 -> -0.325, 0 -> 0.2, +10 -> -0.2: the best constant is 0
    assert out["best_strength"] == "0"
    assert out["per_type"] == {"x_a": "-10", "x_b": "10"}
    oracle = [0.5, 0.8, 0.8, 0.6]
    assert out["oracle"][0] == pytest.approx(sum(oracle) / 4)
    gaps = [o - 0.2 for o in oracle]
    m = sum(gaps) / 4
    half = 1.96 * math.sqrt(sum((g - m) ** 2 for g in gaps) / 3 / 4)
    assert out["gap"] == pytest.approx((m, half))
    assert out["unsteered"] == pytest.approx((0.2, 0.0))


def test_weights_change_the_choice_and_a_sweep_without_zero_is_refused():
    og = _load()
    d = _dump()
    # without the fluency cost, -10 gives type a 1.0 / 0.8 and stays a's best; b keeps +10
    r = og.rewards_per_strength(d, fluency_weight=0.0, repetition_weight=0.0)
    assert og.oracle_gap(r, d["0"]["groups"], [0, 1])["best_strength"] == "-10"
    del r["0"]
    with pytest.raises(ValueError, match="no strength 0"):
        og.oracle_gap(r, d["0"]["groups"], [0, 1])


def test_cli_rescores_with_vader(tmp_path, capsys):
    pytest.importorskip("vaderSentiment")
    og = _load()
    d = _dump()
    for s in d:  # text whose tone is clear to VADER: happy at -10, miserable at +10
        d[s]["texts"] = {"-10": ["What a wonderful, happy day!"] * 4, "0": ["It is a table."] * 4,
                         "10": ["A terrible, miserable, awful day."] * 4}[s]
    p = tmp_path / "perq.json"
    p.write_text(json.dumps(d))
    assert og.main([str(p), "--rescore", "upbeat", "--fluency-weight", "0"]) == 0
    out = capsys.readouterr().out
    # upbeat: -10 (the happy text) is best for both types, so oracle = best constant, gap 0
    line = [ln for ln in out.splitlines() if ln.startswith("x ")][0]
    assert "s=-10" in line and "x_a:-10 x_b:-10" in line and "+0.000 +-0.000" in line


def test_policy_sim_reward_interpolates_the_sweep_by_hand():
    """scripts/policy_sim.py's reward lookup: linear between the grid strengths around s,
    the nearest one with lookup='nearest', clamped to the grid's ends."""
    sim = load_script("scripts/policy_sim.py")
    d = _dump()
    for s in d:
        d[s]["prompts"] = ["q0", "q1", "q2", "q3"]
    r = sim.SweepReward(d, fluency_weight=1.0, repetition_weight=0.0)
    # q0's rewards: -10 -> 0.5, 0 -> 0.2, +10 -> -1.1
    assert r("q0", -10) == pytest.approx(0.5) and r("q0", 10) == pytest.approx(-1.1)
    assert r("q0", -5) == pytest.approx(0.35) and r("q0", 2.5) == pytest.approx(0.2 - 0.25 * 1.3)
    assert r("q0", -99) == pytest.approx(0.5) and r("q0", 99) == pytest.approx(-1.1)
    near = sim.SweepReward(d, fluency_weight=1.0, repetition_weight=0.0, lookup="nearest")
    assert near("q0", -6) == pytest.approx(0.5) and near("q0", -4) == pytest.approx(0.2)
    assert r.groups == {"q0": "x_a", "q1": "x_a", "q2": "x_b", "q3": "x_b"}
    # the best grid constant over all four questions is 0 (means -0.325, 0.2, -0.2)
    assert r.best_constant(["q0", "q1", "q2", "q3"]) == (0.0, pytest.approx(0.2))
    with pytest.raises(ValueError, match="lookup 'cubic'"):
        sim.SweepReward(d, 1.0, 0.0, lookup="cubic")
