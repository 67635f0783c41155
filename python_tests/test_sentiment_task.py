"""The sentiment task (examples/sentiment): its config validates and names
real files and a real reward, its questions are what
scripts/make_sentiment_task.py builds, every tone x topic-tier cell is there,
and train and validation share no topic."""

import json
from pathlib import Path

from sae_fast.config import load_config
from sae_fast.train.rewards import reward_from_config
from repo_scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
TASK = ROOT / "examples" / "sentiment"


def _builder():
    return load_script("scripts/make_sentiment_task.py")


def _read(name):
    return [json.loads(x) for x in (TASK / name).read_text().splitlines()]


def test_config_validates_and_points_at_the_shipped_files(monkeypatch):
    monkeypatch.chdir(ROOT)  # the config's data paths are relative to the checkout
    cfg = load_config(TASK / "config.yaml")
    assert cfg.model.path == "builtin:smollm2" and cfg.sae.model_path == "builtin:smollm2_sentiment_sae"
    assert cfg.sae.features == [384] and cfg.reward.name == "vader"
    assert cfg.reward.fluency_weight > 0 and cfg.reward.repetition_weight > 0
    for f in cfg.data.train_files + cfg.data.val_files:
        assert Path(f).is_file(), f
    scores, _ = reward_from_config(cfg.reward)(["x"], ["What a lovely day!"], ["positive"], [None])
    assert scores[0] > 0.5


def test_questions_are_what_the_builder_writes_with_disjoint_topics():
    mod = _builder()
    for split in ("train", "val"):
        assert _read(f"{split}.jsonl") == mod.rows(split)
    train, val = _read("train.jsonl"), _read("val.jsonl")
    cells = {(r["ground_truth"], r["data_source"]) for r in val}
    assert len(cells) == 6 and cells == {(r["ground_truth"], r["data_source"]) for r in train}
    topics = lambda rows: {t for r in rows for tier in mod.TOPICS.values() for t in tier  # noqa: E731
                           if t in r["prompt"]}
    assert topics(train) and topics(val) and not topics(train) & topics(val)
    assert len(train) == 288 and len(val) == 384
