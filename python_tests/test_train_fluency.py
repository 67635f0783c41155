"""sae_fast.train.fluency and the trainer's fluency-aware reward: repeated
n-gram shares against hand counts, the batched left-padded NLL against an
unbatched per-position reference, the scorer running unsteered, and the
trainer's combined reward, per-method scores, constant selection split and
samples.md."""

import contextlib
import json
import math

import pytest
import torch

from sae_fast.train.fluency import FluencyScorer, repeated_ngram_fraction


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread_module):
    """Tiny models on one intra-op thread (see conftest.one_thread_module)."""


@pytest.mark.parametrize("ids,n,expected", [
    ([], 2, 0.0), ([5], 2, 0.0), ([1, 2, 3, 4], 2, 0.0),
    ([1, 2, 1, 2, 1, 2], 2, 1 - 2 / 5),  # bigrams 12 21 12 21 12: 2 distinct of 5
    ([7, 7, 7, 7], 1, 1 - 1 / 4), ([7, 7, 7, 7], 2, 1 - 1 / 3),
    ([1, 2, 3, 1, 2, 4], 3, 0.0), ([1, 2, 3, 1, 2, 3], 3, 1 - 3 / 4),
])
def test_repeated_ngram_fraction_hand_counts(ids, n, expected):
    assert repeated_ngram_fraction(ids, n) == pytest.approx(expected)


def test_repeated_ngram_fraction_rejects_bad_n():
    with pytest.raises(ValueError, match="n=0"):
        repeated_ngram_fraction([1, 2], 0)


def _reference_nll(model, tok, prompt, completion):
    """Unbatched, unpadded: -mean log p(completion token | everything before)."""
    ids = tok(prompt)["input_ids"] + list(completion)
    logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    start = len(ids) - len(completion)
    vals = [-float(lp[t - 1, ids[t]]) for t in range(start, len(ids))]
    return sum(vals) / len(vals)


def test_nll_matches_an_unbatched_reference_on_ragged_batches(tiny):
    model, tok = tiny
    g = torch.Generator().manual_seed(0)
    prompts = ["Please write a happy story", "Hi", "What is 1 plus 2? Answer briefly.", "x y z"]
    comps = [torch.randint(3, tok.vocab_size, (n,), generator=g).tolist() for n in (5, 1, 9, 3)]
    entered = []

    @contextlib.contextmanager
    def guard():
        entered.append(1)
        yield

    with torch.no_grad():
        ref = [_reference_nll(model, tok, p, c) for p, c in zip(prompts, comps)]
        got = FluencyScorer(model, tok, batch_size=3, guard=guard).nll(prompts, comps)
    assert got == pytest.approx(ref, rel=1e-4, abs=1e-4)
    assert len(entered) == 2  # one forward per batch of 3, inside the guard
    # the LM head on the last positions only (logits_to_keep) vs on every position
    full = FluencyScorer(model, tok, batch_size=3)
    full._keep = False
    assert FluencyScorer(model, tok, batch_size=3)._keeps_logits()
    assert full.nll(prompts, comps) == pytest.approx(got, rel=1e-5, abs=1e-5)
    mixed = FluencyScorer(model, tok).nll(["Hi", "x y z"], [[], comps[3]])
    assert mixed == pytest.approx([0.0, ref[3]], rel=1e-4, abs=1e-4)
    assert FluencyScorer(model, tok).nll(["Hi"], [[]]) == [0.0]
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        FluencyScorer(model, tok).nll(["a", "b"], [[1]])


def test_nll_is_of_the_unsteered_model(tiny, task):
    """Scored through the engine's ``unsteered`` guard, a completion's NLL does
    not depend on the steering attached to the same model."""
    from sae_fast.plan import SteeringSpec
    from sae_fast.train.rollout import HFRolloutEngine

    model, tok = tiny
    prompts, comps = ["Please write a happy story"], [[11, 12, 13, 14]]
    plain = FluencyScorer(model, tok).nll(prompts, comps)
    spec = SteeringSpec(features=[task.feature], mode="add", min_strength=-50, max_strength=50)
    with HFRolloutEngine(model, tok, task.sae_path, spec, layers=[-1], max_batch=4) as eng:
        eng.steerer.set_strengths(torch.tensor([[40.0]]))
        steered = FluencyScorer(model, tok).nll(prompts, comps)
        guarded = FluencyScorer(model, tok, guard=eng.unsteered).nll(prompts, comps)
    assert guarded == pytest.approx(plain, abs=1e-6)
    assert abs(steered[0] - plain[0]) > 1e-3  # the guard is what made the difference


def test_trainer_reports_three_scores_and_writes_samples(tiny, task, tmp_path):
    from test_train_trainer import make_cfg, run

    out = tmp_path / "run"
    cfg = make_cfg(task, out, **{"trainer.total_steps": 2, "reward.fluency_weight": 0.5,
                                 "reward.repetition_weight": 0.25, "trainer.samples": 2,
                                 "trainer.constant_select_size": 6})
    summary = run(cfg, tiny)
    v = summary["validation"]
    for key in ("unsteered", "random", "best_constant", "learned"):
        assert {"concept", "fluency", "repetition"} <= set(v[key]), (key, v[key])
        assert set(v[key]["by_group"]) == {"up", "down"}
    # the unsteered validation completion is the fluency reference: its own fluency is 0 and
    # every method's fluency is its NLL minus the unsteered completion's, question by question
    assert v["unsteered"]["fluency"] == pytest.approx(0.0, abs=1e-5)
    per_q = json.loads((out / "eval" / "per_question.json").read_text())
    for key in ("random", "best_constant", "learned"):
        assert per_q[key]["fluency"] == pytest.approx(
            [a - b for a, b in zip(per_q[key]["nll"], per_q["unsteered"]["nll"])], abs=1e-6)
        assert per_q[key]["rewards"] == pytest.approx(
            [c - 0.5 * max(0.0, f) - 0.25 * r for c, f, r in zip(
                per_q[key]["concept"], per_q[key]["fluency"], per_q[key]["repetition"])], abs=1e-6)
    # unsteered: combined = concept - 0.25 * repetition (its fluency term is ~0)
    u = v["unsteered"]
    assert u["mean"] == pytest.approx(u["concept"] - 0.25 * u["repetition"], abs=1e-5)
    sel = v["best_constant"]["selection"]
    assert sel["split"] == "train" and sel["n"] == 6 and len(sel["grid"]) == 9
    assert "chosen on 6 training questions" in summary["table"]
    assert "concept" in summary["table"] and "fluency" in summary["table"]
    text = (out / "samples.md").read_text()
    assert text.count("## Prompt") == 2 and "(up)" in text and "(down)" in text
    for name in ("unsteered", "best constant strength", "learned predictor"):
        assert f"**{name}**" in text
    data = json.loads((out / "eval" / "strengths.json").read_text())
    assert len(data["unsteered_concept"]) == len(data["strengths"]) == v["learned"]["n"]
    assert (out / "strength_vs_unsteered.png").is_file()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert all("reward/fluency_mean" in r and "reward/repetition_mean" in r for r in train_rows)
    assert all(math.isfinite(r["reward/mean"]) for r in train_rows)
