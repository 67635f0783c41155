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
    names = set(SAEConfig.model_fields)
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
    ({"selected_features": [-1]},
     r"sae\.selected_features\[0\] = -1: Input should be greater than or equal to 0"),
    ({"selected_features": []}, r"sae\.selected_features = \[\]: List should have at least 1"),
    ({"target_layers": [1, 1]}, r"sae\.target_layers: \[1, 1\] lists a layer twice"),
    ({"max_activation": 1.0, "max_activations": [1.0]}, "not both"),
    ({"selected_features": [1, 2], "max_activations": [1.0, 2.0, 3.0]}, "3 values for 2"),
    ({"selected_features": [1], "strengths": [9.0]}, "outside"),
    ({"target_layer": 3, "target_layers": [1, 2]}, "target_layer=3"),
    ({"mode": "push"}, "sae.mode"),
    ({"strength_schedule": "step"}, "sae.strength_schedule"),
    ({"predictor_layers": -1}, "predictor_layers"),
    ({"hidden_size": "big"}, "sae.hidden_size"),
    ({"enable": "yes"}, "sae.enable"),
    ({"strength_scale": float("nan")}, r"sae\.strength_scale = nan: Input should be a finite"),
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
    # YAML's .inf / .nan are floats: refused by pydantic's allow_inf_nan=False, naming the key
    ("sae:\n  selected_features: [1]\n  strengths: [.inf]\n",
     r"sae\.strengths\[0\] = inf: Input should be a finite number"),
    # a bare `inf` is a string in YAML: refused as not a number (strict: never parsed)
    ("sae:\n  selected_features: [1]\n  strengths: [inf]\n",
     r"sae\.strengths\[0\] = 'inf': Input should be a valid number"),
    ("sae:\n  max_activation: .nan\n", r"sae\.max_activation = nan: Input should be a finite"),
    ("algorithm:\n  lr: -.inf\n", r"algorithm\.lr = -inf: Input should be a finite number"),
    ("sae:\n  target_layer: 1.5\n", r"sae\.target_layer = 1\.5: Input should be a valid integer"),
])
def test_yaml_errors_name_the_key_and_value(tmp_path, yaml_text, match):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=match):
        load_config(path)


def test_record_activations_defaults_to_what_the_backend_can_do():
    assert Config.from_dict({}).trainer.record_activations is None
    assert Config.from_dict({"trainer": {"record_activations": False}}).trainer.record_activations is False


@pytest.mark.parametrize("data,match", [
    ({"model": {"path": 3}}, r"^model\.path = 3: Input should be a valid string$"),
    ({"reward": {"name": 1.5}}, r"^reward\.name = 1\.5: Input should be a valid string$"),
    ({"trainer": {"output_dir": 7}}, r"^trainer\.output_dir = 7: Input should be a valid string$"),
    ({"data": {"train_files": ["a.jsonl", 2]}},
     r"^data\.train_files\[1\] = 2: Input should be a valid string$"),
])
def test_a_number_for_a_str_field_is_refused_not_converted(data, match):
    with pytest.raises(ConfigError, match=match):
        Config.from_dict(data)


@pytest.mark.parametrize("section,key,value", [
    ("sae", "strength_scale", float("nan")), ("sae", "max_strength", float("inf")),
    ("rollout", "temperature", float("inf")), ("algorithm", "clip_ratio", float("nan")),
    ("trainer", "val_constant_grid", [0.0, float("-inf")]),
])
def test_nan_and_inf_are_refused_naming_the_key(section, key, value):
    with pytest.raises(ConfigError, match=rf"^{section}\.{key}(\[\d\])? = .*finite number"):
        Config.from_dict({section: {key: value}})


@pytest.mark.parametrize("key,value,bound", [
    ("rollout.top_p", 0, "greater than 0"), ("rollout.top_p", 1.5, "less than or equal to 1"),
    ("algorithm.lr", 0, "greater than 0"), ("algorithm.lr", -1e-3, "greater than 0"),
    ("rollout.top_k", -1, "greater than or equal to 0"),
    ("algorithm.ema_decay", 1.0, "less than 1"), ("trainer.keep_checkpoints", 0, "greater than"),
    ("embedding.max_length", 0, "greater than"), ("data.max_val_samples", 0, "greater than"),
    ("sae.hidden_size", 0, "greater than or equal to 1"),
])
def test_field_bounds_name_the_key_and_the_value(key, value, bound):
    with pytest.raises(ConfigError, match=rf"^{key.replace('.', r'[.]')} = {value!r}: .*{bound}"):
        load_config(None, values={key: value})
    assert load_config(None, values={key: 0.5 if "top_p" in key or "ema" in key else 1})


@pytest.mark.parametrize("data,key,expected", [
    ({"sae": {"strenght_scale": 2}}, "sae.strenght_scale", "strength_scale"),
    ({"rollout": {"vllm_kwargs": {}, "topp": 0.9}}, "rollout.topp", "top_p"),
    ({"trainer": {"seed": 1, "sed": 2}}, "trainer.sed", "seed"),
    ({"model": {"paht": "m"}}, "model.paht", "trust_remote_code"),
])
def test_unknown_nested_key_is_named_with_its_dotted_path(data, key, expected):
    with pytest.raises(ConfigError, match=rf"unknown config key '{key}'; expected one of: .*"
                                          rf"\b{expected}\b") as err:
        Config.from_dict(data)
    assert str(err.value).startswith(f"unknown config key '{key}'")


def test_every_error_is_reported_at_once():
    with pytest.raises(ConfigError) as err:
        Config.from_dict({"sae": {"max_strength": "abc"}, "rollout": {"top_p": 1.5}})
    assert "sae.max_strength = 'abc'" in str(err.value) and "rollout.top_p = 1.5" in str(err.value)


def test_default_mode_is_set():
    assert SAEConfig().mode == "set"
    assert Config.from_dict({"sae": {"num_features": 2}}).sae.steering_spec().mode == "set"
    assert Config.from_dict({"sae": {"mode": "add"}}).sae.mode == "add"


def test_demo_tasks_and_the_example_say_add_explicitly():
    from sae_fast.train.tasks import SteeringTask

    task = SteeringTask("m", "s", "t", "v", feature=1, layer=0, token_sets={})
    assert task.overrides()["sae.mode"] == "add"
    assert load_config(ROOT / "examples" / "sae_ppo_config.yaml").sae.mode == "add"


def test_direct_construction_and_assignment_raise_config_error():
    with pytest.raises(ConfigError, match=r"^sae\.predictor_layers = -1: "):
        SAEConfig(predictor_layers=-1)
    cfg = Config.from_dict({"sae": {"num_features": 2}})
    with pytest.raises(ConfigError, match=r"^rollout\.top_p = 2: "):
        cfg.rollout.top_p = 2
    with pytest.raises(ConfigError, match=r"^sae\.min_strength: min_strength=9\.0 > max_strength"):
        cfg.sae.min_strength = 9
    assert cfg.rollout.top_p == 1.0 and cfg.sae.min_strength == -5.0  # refused values not kept
    cfg.trainer.seed = 4
    assert cfg.trainer.seed == 4


def test_strict_types_refuse_lax_coercions():
    for sae, key in [({"enable": "true"}, "sae.enable"),
                     ({"num_features": "3"}, "sae.num_features"),
                     ({"num_features": True}, "sae.num_features"),
                     ({"max_strength": "5"}, "sae.max_strength")]:
        with pytest.raises(ConfigError, match=rf"^{key.replace('.', '[.]')} = "):
            Config.from_dict({"sae": sae})
    assert Config.from_dict({"sae": {"max_strength": 3}}).sae.max_strength == 3.0  # int -> float


def test_empty_yaml_section_means_its_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("sae:\n  # num_features: 4\ntrainer:\n")
    cfg = load_config(path)
    assert cfg.sae == SAEConfig() and cfg.trainer.batch_size == 8
