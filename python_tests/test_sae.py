"""SAE loading and validation: every listed error names the bad value."""

import json

import pytest
import torch
from safetensors.torch import save_file

from sae_fast.sae import SAELoadError, load_sae, random_sae, save_sae


def _write(folder, cfg, state):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(state, str(folder / "sae_weights.safetensors"))
    return folder


def _state(d_in=16, d_sae=32, threshold=False):
    g = torch.Generator().manual_seed(0)
    s = {"W_enc": torch.randn(d_in, d_sae, generator=g), "b_enc": torch.randn(d_sae, generator=g),
         "W_dec": torch.randn(d_sae, d_in, generator=g), "b_dec": torch.randn(d_in, generator=g)}
    if threshold:
        s["threshold"] = torch.rand(d_sae, generator=g)
    return s


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "topk"])
def test_roundtrip_and_dtype_device_moves(tmp_path, arch):
    sae = random_sae(16, 48, arch, k=5 if arch == "topk" else None, seed=3)
    save_sae(sae, tmp_path / arch)
    back = load_sae(tmp_path / arch)
    assert back.architecture == arch and back.d_in == 16 and back.d_sae == 48
    torch.testing.assert_close(back.W_dec, sae.W_dec)
    if arch == "topk":
        assert back.k == 5
    half = load_sae(tmp_path / arch, dtype=torch.bfloat16)
    assert half.W_enc.dtype == torch.bfloat16 and half.device.type == "cpu"
    x = torch.randn(4, 16)
    torch.testing.assert_close(back.encode(x), sae.encode(x))


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(SAELoadError, match=r"'.*nope' does not exist"):
        load_sae(tmp_path / "nope")


def test_file_instead_of_folder(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(SAELoadError, match=r"is a file; expected a sae-lens folder"):
        load_sae(f)


def test_missing_weights_file_is_named(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "cfg.json").write_text("{}")
    with pytest.raises(SAELoadError, match=r"has no sae_weights.safetensors"):
        load_sae(tmp_path / "s")


def test_corrupt_weights_file(tmp_path):
    folder = _write(tmp_path / "s", {"architecture": "standard"}, _state())
    (folder / "sae_weights.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(SAELoadError, match=r"sae_weights.safetensors: not a readable safetensors"):
        load_sae(folder)


def test_bad_json(tmp_path):
    folder = _write(tmp_path / "s", {}, _state())
    (folder / "cfg.json").write_text("{not json")
    with pytest.raises(SAELoadError, match=r"cfg.json: not valid JSON"):
        load_sae(folder)


def test_unknown_architecture_is_named(tmp_path):
    folder = _write(tmp_path / "s", {"architecture": "gated_v9"}, _state())
    with pytest.raises(SAELoadError, match=r"unknown SAE architecture 'gated_v9'"):
        load_sae(folder)


def test_shape_inconsistent_with_cfg(tmp_path):
    folder = _write(tmp_path / "s", {"architecture": "standard", "d_in": 17, "d_sae": 32}, _state())
    with pytest.raises(SAELoadError, match=r"cfg says d_in=17 but W_enc has shape \(16, 32\)"):
        load_sae(folder)


def test_inconsistent_tensor_shapes(tmp_path):
    st = _state()
    st["W_dec"] = torch.randn(32, 15)
    folder = _write(tmp_path / "s", {"architecture": "standard"}, st)
    with pytest.raises(SAELoadError, match=r"W_dec has shape \(32, 15\), expected \(32, 16\)"):
        load_sae(folder)


def test_nan_weights_are_named(tmp_path):
    st = _state()
    st["W_enc"][3, 5] = float("nan")
    folder = _write(tmp_path / "s", {"architecture": "standard"}, st)
    with pytest.raises(SAELoadError, match=r"W_enc has 1 non-finite values \(first at index \(3, 5\): nan\)"):
        load_sae(folder)


def test_jumprelu_without_threshold(tmp_path):
    folder = _write(tmp_path / "s", {"architecture": "jumprelu"}, _state())
    with pytest.raises(SAELoadError, match=r"missing tensors \['threshold'\]"):
        load_sae(folder)


def test_topk_bad_k(tmp_path):
    folder = _write(tmp_path / "s", {"architecture": "topk", "k": 99}, _state())
    with pytest.raises(SAELoadError, match=r"1 <= k <= d_sae=32, got k=99"):
        load_sae(folder)


@pytest.mark.parametrize("norm", ["constant_norm_rescale", "layer_norm"])
def test_unsupported_normalisation_is_refused(tmp_path, norm):
    folder = _write(tmp_path / "s", {"architecture": "standard", "normalize_activations": norm}, _state())
    with pytest.raises(SAELoadError, match=rf"normalize_activations='{norm}' is not supported"):
        load_sae(folder)


def test_expected_average_only_in_is_accepted(tmp_path):
    folder = _write(tmp_path / "s", {"architecture": "standard",
                                     "normalize_activations": "expected_average_only_in"}, _state())
    assert load_sae(folder).d_in == 16


def test_hook_z_refused(tmp_path):
    folder = _write(tmp_path / "s", {"architecture": "standard", "reshape_activations": "hook_z"}, _state())
    with pytest.raises(SAELoadError, match=r"reshape_activations='hook_z'"):
        load_sae(folder)


def test_hidden_size_mismatch_names_both_numbers_and_layer():
    sae = random_sae(16, 32)
    with pytest.raises(SAELoadError, match=r"d_in=16 but the model's hidden size at layer 7 is 576"):
        sae.check_hidden_size(576, layer=7)


def test_hook_layer_parsed():
    sae = random_sae(8, 16)
    from dataclasses import replace
    assert replace(sae, hook_name="blocks.12.hook_resid_post").hook_layer == 12
    assert replace(sae, hook_name="model.layers.15").hook_layer == 15


def test_rescale_acts_by_decoder_norm_folded(tmp_path):
    st = _state()
    st["W_dec"] = st["W_dec"] * torch.linspace(0.5, 3, 32)[:, None]
    folder = _write(tmp_path / "s", {"architecture": "topk", "k": 4,
                                     "rescale_acts_by_decoder_norm": True}, st)
    sae = load_sae(folder)
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(32))
    x = torch.randn(3, 16)
    pre = (x - st["b_dec"]) @ st["W_enc"] + st["b_enc"]
    pre = pre * st["W_dec"].norm(dim=-1)
    vals, idx = pre.topk(4, dim=-1)
    want = torch.zeros_like(pre).scatter_(-1, idx, vals.relu())
    torch.testing.assert_close(sae.encode(x), want, rtol=1e-5, atol=1e-5)


def test_transposed_w_dec_is_named_as_such(tmp_path):
    st = _state()
    st["W_dec"] = st["W_dec"].t().contiguous()  # [d_in, d_sae]: W_enc's layout
    folder = _write(tmp_path / "s", {"architecture": "standard"}, st)
    with pytest.raises(SAELoadError, match=r"W_dec has shape \(16, 32\).*looks stored transposed.*"
                                           r"\[d_sae, d_in\] = \(32, 16\)"):
        load_sae(folder)


def test_truncated_weights_file(tmp_path):
    folder = _write(tmp_path / "s", {"architecture": "standard"}, _state())
    w = folder / "sae_weights.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(SAELoadError, match=r"sae_weights.safetensors: not a readable safetensors"):
        load_sae(folder)


@pytest.mark.parametrize("cfg,match", [
    ({"d_in": "sixteen"}, r"key 'd_in' must be int, got str 'sixteen'"),
    ({"d_sae": 32.0}, r"key 'd_sae' must be int, got float 32.0"),
    ({"d_in": True}, r"key 'd_in' must be int, got bool True"),
    ({"architecture": 3}, r"key 'architecture' must be str, got int 3"),
    ({"apply_b_dec_to_input": "false"}, r"'apply_b_dec_to_input' must be bool, got str 'false'"),
    ({"k": 0, "architecture": "topk"}, r"key 'k' must be >= 1, got 0"),
    ({"dtype": "bfloat17"}, r"dtype 'bfloat17' is not a torch dtype"),
    ({"metadata": "blocks.1.hook_resid_post"}, r"key 'metadata' must be dict"),
    ({"d_sae": 31}, r"cfg says d_sae=31 but W_enc has shape \(16, 32\)"),
])
def test_cfg_json_with_wrong_types_is_refused_naming_key_and_value(tmp_path, cfg, match):
    folder = _write(tmp_path / "s", {"architecture": "standard", **cfg}, _state())
    with pytest.raises(SAELoadError, match=match):
        load_sae(folder)


def test_cfg_json_missing_keys_take_sae_lens_defaults_except_topk_k(tmp_path):
    """An empty cfg.json is a standard ReLU SAE with b_dec applied to the input
    (sae-lens's defaults); a TopK SAE without k is refused."""
    sae = load_sae(_write(tmp_path / "s", {}, _state()))
    assert sae.architecture == "standard" and sae.apply_b_dec_to_input and sae.k is None
    with pytest.raises(SAELoadError, match=r"topk SAE needs 1 <= k <= d_sae=32, got k=None"):
        load_sae(_write(tmp_path / "t", {"architecture": "topk"}, _state()))
    # sae-lens's older layout keeps k in activation_fn_kwargs
    topk = load_sae(_write(tmp_path / "u", {"architecture": "topk", "activation_fn": "topk",
                                            "activation_fn_kwargs": {"k": 5}}, _state()))
    assert topk.k == 5


@pytest.mark.parametrize("arch,fn", [("standard", "tanh-relu"), ("standard", "topk"),
                                     ("jumprelu", "gelu"), ("topk", "softplus")])
def test_unsupported_activation_function_is_refused(tmp_path, arch, fn):
    folder = _write(tmp_path / "s", {"architecture": arch, "activation_fn": fn, "k": 4},
                    _state(threshold=arch == "jumprelu"))
    with pytest.raises(SAELoadError, match=rf"activation_fn='{fn}' is not supported for "
                                           rf"architecture '{arch}'"):
        load_sae(folder)


def test_supported_activation_functions_load(tmp_path):
    for arch, fn in (("standard", "relu"), ("jumprelu", "relu"), ("topk", "topk")):
        folder = _write(tmp_path / arch, {"architecture": arch, "activation_fn_str": fn, "k": 4},
                        _state(threshold=arch == "jumprelu"))
        assert load_sae(folder).architecture == arch
