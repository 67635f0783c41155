"""The verl-facing config mapping shares the standalone trainer's schema."""

import pytest

from integrations.verl import sae_config_from_verl, steering_enabled
from sae_fast.config import ConfigError


def test_sae_block_from_verl_config():
    cfg = {"trainer": {"total_epochs": 1},
           "sae": {"enable": True, "model_path": "/sae", "num_features": 4, "target_layer": -1,
                   "predictor_hidden_size": 64, "predictor_layers": 2, "max_strength": 5.0,
                   "min_strength": -5.0, "strength_scale": 1.0, "enable_steering": True,
                   "selected_features": [1, 5, 10, 20], "strength_schedule": "cosine"}}
    sae = sae_config_from_verl(cfg)
    assert sae.features == [1, 5, 10, 20] and sae.strength_schedule == "cosine"
    assert steering_enabled(sae)
    assert not steering_enabled(sae_config_from_verl(cfg, disable_sae=True))


def test_omegaconf_input_and_unknown_key():
    omegaconf = pytest.importorskip("omegaconf")
    cfg = omegaconf.OmegaConf.create({"sae": {"num_features": 2, "strenght_scale": 1.0}})
    with pytest.raises(ConfigError, match=r"unknown config key 'sae.strenght_scale'"):
        sae_config_from_verl(cfg)


def test_unknown_key_in_plain_dict():
    with pytest.raises(ConfigError, match=r"unknown config key 'sae.feature_idz'"):
        sae_config_from_verl({"sae": {"feature_idz": 3}})
