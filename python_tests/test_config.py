"""The configuration schema: the sae: block seed keys, validation, unknown-key
rejection, CLI-style overrides and the example config."""

from pathlib import Path

import pytest

from sae_fast.config import (Config, ConfigError, SAEConfig, load_config, parse_override,
                             set_dotted)

ROOT = Path(__file__).resolve().parents[1]
SEED_KEYS = ["enable", "model_path", "hidden_size", "num_features", "target_layer",
             "predictor_hidden_size", "predictor_layers", "max_strength", "min_strength",
             "strength_scale", "enable_steering", "target_layers", "selected_features",
             "strength_schedule", "feature_idx", "feature_idxs", "max_activation",
             "max_activations", "strengths", "mode"]


def test_sae_block_has_every_spec_key():
    names = set(SAEConfig.__dataclass_fields__)
    assert set(SEED_KEYS) <= names


def test_spec_example_block_validates():
    cfg = Config.from_dict({"sae": {
        "enable": True, "model_path": "/path/to/sae", "hidden_size": 4096, "num_features": 4,
        "target_layer": -1, "predictor_hidden_size": 1024, "predictor_layers": 2,
        "max_strength": 5.0, "min_strength": -5.0, "strength_scale": 1.0,
        "enable_steering": True, "target_layers": [12, 24, -1], "selected_features": [1, 5, 10, 20],
        "strength_schedule": "cosine"}})
    assert cfg.sae.features == [1, 5, 10, 20]
    assert cfg.sae.layers == [12, 24, -1]
    spec = cfg.sae.steering_spec()
    assert spec.features == [1, 5, 10, 20] and spec.strength_scale == 1.0


@pytest.mark.parametrize("data,key", [
    ({"sae": {"num_featurez": 3}}, "sae.num_featurez"),
    ({"trainer": {"batchsize": 3}}, "trainer.batchsize"),
    ({"sea": {}}, "sea"),
    ({"reward": {"name": "gsm8k", "kwarg": {}}}, "reward.kwarg"),
])
def test_unknown_keys_rejected_with_their_name(data, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        Config.from_dict(data)


@pytest.mark.parametrize("sae,match", [
    ({"min_strength": 3.0, "max_strength": -3.0}, "min_strength=3.0 > max_strength=-3.0"),
    ({"num_features": 3, "selected_features": [1, 2]}, "num_features=3"),
    ({"feature_idx": 1, "feature_idxs": [2, 3]}, "select different features"),
    ({"selected_features": [1, 1]}, "selected twice"),
    ({"selected_features": [-1]}, "negative"),
    ({"selected_features": []}, "empty"),
    ({"max_activation": 1.0, "max_activations": [1.0]}, "not both"),
    ({"selected_features": [1, 2], "max_activations": [1.0, 2.0, 3.0]}, "3 values for 2"),
    ({"selected_features": [1], "strengths": [9.0]}, "outside"),
    ({"target_layer": 3, "target_layers": [1, 2]}, "target_layer=3"),
    ({"mode": "push"}, "sae.mode"),
    ({"strength_schedule": "step"}, "sae.strength_schedule"),
    ({"predictor_layers": -1}, "predictor_layers"),
    ({"hidden_size": "big"}, "sae.hidden_size"),
    ({"enable": "yes"}, "sae.enable"),
    ({"strength_scale": float("nan")}, "not finite"),
])
def test_bad_sae_values_name_the_key(sae, match):
    with pytest.raises(ConfigError, match=match):
        Config.from_dict({"sae": sae})


def test_no_features_selected_is_an_error_only_when_used():
    cfg = Config.from_dict({"sae": {}})
    with pytest.raises(ConfigError, match="no features selected"):
        _ = cfg.sae.features
    assert Config.from_dict({"sae": {"num_features": 3}}).sae.features == [0, 1, 2]


def test_effective_bounds_and_fixed_strengths():
    s = SAEConfig(selected_features=[1, 2], min_strength=-2, max_strength=4, strength_scale=0.5,
                  strengths=[1.0])
    assert s.effective_bounds() == (-1.0, 2.0)
    assert s.fixed_strengths() == [0.5, 0.5]
    spec = s.steering_spec()
    assert (spec.min_strength, spec.max_strength, spec.strength_scale) == (-1.0, 2.0, 1.0)


@pytest.mark.parametrize("section,data,match", [
    ("algorithm", {"name": "grpo", "n_samples": 1}, "n_samples >= 2"),
    ("algorithm", {"name": "a2c"}, "algorithm.name"),
    ("algorithm", {"clip_ratio": 1.5}, "clip_ratio"),
    ("algorithm", {"init_log_std": 3.0}, "init_log_std"),
    ("rollout", {"backend": "tgi"}, "rollout.backend"),
    ("rollout", {"temperature": 0}, "temperature"),
    ("trainer", {"batch_size": 0}, "batch_size"),
    ("embedding", {"source": "cls"}, "embedding.source"),
    ("model", {"device": "tpu"}, "model.device"),
])
def test_other_sections_validated(section, data, match):
    with pytest.raises(ConfigError, match=match):
        Config.from_dict({section: data})


def test_overrides_parse_yaml_values_and_reject_unknown_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("sae:\n  selected_features: [1, 2]\ntrainer:\n  batch_size: 4\n")
    cfg = load_config(path, overrides=["sae.strength_scale=2.5", "trainer.seed=7",
                                       "reward.kwargs={method: flexible}"],
                      values={"data.train_files": ["a.jsonl"]})
    assert cfg.sae.strength_scale == 2.5 and cfg.trainer.seed == 7
    assert cfg.reward.kwargs == {"method": "flexible"}
    assert cfg.trainer.batch_size == 4 and cfg.data.train_files == ["a.jsonl"]
    with pytest.raises(ConfigError, match="sae.strenght_scale"):
        load_config(path, overrides=["sae.strenght_scale=1"])
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("no-equals-sign")
    d = {"a": 1}
    with pytest.raises(ConfigError, match="not a section"):
        set_dotted(d, "a.b", 2)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("sae: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(lst)


def test_roundtrip_yaml(tmp_path):
    cfg = Config.from_dict({"sae": {"selected_features": [4]}, "reward": {"name": "gsm8k"}})
    path = tmp_path / "out.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path).to_dict() == cfg.to_dict()


def test_check_for_training_names_missing_inputs():
    with pytest.raises(ConfigError, match="model.path"):
        Config.from_dict({}).check_for_training()
    with pytest.raises(ConfigError, match="data.train_files"):
        Config.from_dict({"model": {"path": "m"}}).check_for_training()
    with pytest.raises(ConfigError, match="sae.model_path"):
        Config.from_dict({"model": {"path": "m"}, "data": {"train_files": ["t"]},
                          "sae": {"num_features": 2}}).check_for_training()
    Config.from_dict({"model": {"path": "m"}, "data": {"train_files": ["t"]},
                      "sae": {"enable": False}}).check_for_training()


def test_example_config_loads():
    cfg = load_config(ROOT / "examples" / "sae_ppo_config.yaml")
    assert cfg.sae.enable
    assert cfg.sae.features
    assert cfg.algorithm.name in ("grpo", "ppo", "reinforce")


@pytest.mark.parametrize("yaml_text,match", [
    # YAML's .inf is a float: refused as not finite, and the message says so
    ("sae:\n  selected_features: [1]\n  strengths: [.inf]\n",
     r"sae\.strengths: \[inf\] does not fit .*sae\.strengths\[0\]: inf is not finite"),
    # a bare `inf` is a string in YAML: refused as not a number
    ("sae:\n  selected_features: [1]\n  strengths: [inf]\n",
     r"sae\.strengths\[0\]: expected a number, got 'inf'"),
    ("sae:\n  max_activation: .nan\n", r"sae\.max_activation: nan does not fit .*nan is not finite"),
    ("sae:\n  target_layer: 1.5\n", r"sae\.target_layer: 1\.5 does not fit .*expected an integer"),
])
def test_union_errors_keep_their_reason(tmp_path, yaml_text, match):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=match):
        load_config(path)


def test_record_activations_defaults_to_what_the_backend_can_do():
    assert Config.from_dict({}).trainer.record_activations is None
    assert Config.from_dict({"trainer": {"record_activations": False}}).trainer.record_activations is False
