"""sae_fast.train.trainer: the trainer on a synthetic task with a tiny local
Llama (the LLM and the SAE frozen; only the predictor learns): beats the
baselines, resume after interrupt / corrupt checkpoint / SIGKILL, unsteered
runs, user errors, the vLLM rollout backend, and the summary helpers."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sae_fast.config import ConfigError, load_config
from sae_fast.plan import SteeringSpecError
from sae_fast.sae import SAELoadError, load_sae, random_sae, save_sae
from sae_fast.train import rewards as R
from sae_fast.train.checkpoint import CheckpointError, CheckpointManager
from sae_fast.train.data import DataError
from sae_fast.train.rollout import Decoding, HFRolloutEngine
from sae_fast.train.trainer import UNSTEERED_LABEL, Trainer, mean_ci95, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread_module):
    """Tiny models on one intra-op thread (see conftest.one_thread_module)."""


def make_cfg(task, out, **over):
    values = task.overrides()
    values.update({
        "sae.predictor_hidden_size": 64, "sae.predictor_layers": 1,
        "rollout.max_new_tokens": 8, "rollout.max_batch": 64,
        "algorithm.n_samples": 4, "algorithm.lr": 1e-2,
        "trainer.batch_size": 8, "trainer.total_steps": 4, "trainer.val_every": 0,
        "trainer.save_every": 2, "trainer.output_dir": str(out), "trainer.progress_bar": False,
        "trainer.seed": 0,
    })
    values.update(over)
    return load_config(None, values=values)


def run(cfg, tiny, **kw):
    model, tok = tiny
    return train(cfg, model=model, tokenizer=tok, **kw)


def hooks(model):
    """Every forward (pre-)hook on the model and its decoder layers."""
    from sae_fast.backends.common import decoder_layers

    mods = [model, *decoder_layers(model)]
    return [(id(m), k) for m in mods for k in (*m._forward_pre_hooks, *m._forward_hooks)]


def metrics_rows(out):
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_training_beats_unsteered_random_and_best_constant(tiny, task, tmp_path):
    """The main job: on a task where the best strength depends on the question
    type, the learned predictor beats every baseline on held-out questions."""
    out = tmp_path / "run"
    cfg = make_cfg(task, out, **{"trainer.total_steps": 20, "trainer.val_every": 10,
                                 "trainer.save_every": 10})
    t0 = time.perf_counter()
    summary = run(cfg, tiny)
    elapsed = time.perf_counter() - t0
    v = summary["validation"]
    learned = v["learned"]
    for key in ("unsteered", "random", "best_constant"):
        assert learned["mean"] > v[key]["mean"] + 0.3, (key, v)
        assert learned["mean"] - learned["ci95"] > v[key]["mean"] + v[key]["ci95"], (key, v)
    # predicted strengths differ between the question types, in the right direction
    data = json.loads((out / "eval" / "strengths.json").read_text())
    up = [s[0] for s, g in zip(data["strengths"], data["groups"]) if g == "up"]
    down = [s[0] for s, g in zip(data["strengths"], data["groups"]) if g == "down"]
    assert min(up) > 1.0 and max(down) < -1.0, (up, down)
    # outputs: plots, predictor, metrics with strength stats, activations before/after
    for name in ("reward_curve.png", "strength_distributions.png", "feature_activations.png",
                 "predictor/predictor.safetensors", "summary.json", "config.yaml"):
        assert (out / name).is_file(), name
    acts = json.loads((out / "eval" / "activations.json").read_text())
    assert acts[str(task.feature)]["after_mean"] > acts[str(task.feature)]["before_mean"]
    by = json.loads((out / "eval" / "activations_by_group.json").read_text())
    f = str(task.feature)
    assert set(by) == {"up", "down"}
    assert by["up"][f]["after_mean"] > by["up"][f]["before_mean"], by
    assert by["down"][f]["after_mean"] <= by["down"][f]["before_mean"], by
    assert by["up"][f]["after_mean"] > by["down"][f]["after_mean"], by
    assert acts[f]["tokens"] == by["up"][f]["tokens"] + by["down"][f]["tokens"]
    rows = metrics_rows(out)
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == list(range(1, 21))
    assert {"reward/mean", "strength/mean", "strength/std", "steering/successes",
            "steering/failures", "timing/generate_s"} <= set(train_rows[0])
    assert all(r["steering/failures"] == 0 for r in train_rows)
    assert [r["step"] for r in rows if r["kind"] == "val"] == [0, 10, 20]
    assert "learned predictor" in summary["table"] and "best constant" in summary["table"]
    print(f"\ntraining test: {elapsed:.1f} s\n{summary['table']}")


def test_llm_and_sae_frozen_only_predictor_trains(tiny, task, tmp_path):
    model, tok = tiny
    sae = load_sae(task.sae_path)
    llm_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    hooks_before = hooks(model)
    sae_before = [t.detach().clone() for t in sae.parameters()]
    cfg = make_cfg(task, tmp_path / "f", **{"trainer.total_steps": 3, "trainer.final_eval": False,
                                            "algorithm.name": "ppo"})
    tr = Trainer(cfg, model=model, tokenizer=tok, sae=sae)
    tr.setup()
    init = {k: v.clone() for k, v in tr.predictor.state_dict().items()}
    try:
        tr.fit()
    finally:
        tr.close()
    for n, p in model.named_parameters():
        assert torch.equal(p, llm_before[n]), n
        assert not p.requires_grad and p.grad is None, n
    for t, t0 in zip(sae.parameters(), sae_before):
        assert torch.equal(t, t0) and not t.requires_grad and t.grad is None
    opt_params = [p for g in tr.optimizer.param_groups for p in g["params"]]
    pred_params = list(tr.predictor.parameters())
    assert {id(p) for p in opt_params} == {id(p) for p in pred_params}
    assert not {id(p) for p in opt_params} & {id(p) for p in model.parameters()}
    assert len(tr.optimizer.state) > 0 and set(tr.optimizer.state) <= set(pred_params)
    assert any(not torch.equal(v, init[k]) for k, v in tr.predictor.state_dict().items())
    assert tr.engine.steerer is None  # our hooks removed on close
    assert hooks(model) == hooks_before


class Boom(Exception):
    pass


def test_resume_after_interrupt_matches_uninterrupted_run(tiny, task, tmp_path):
    over = {"trainer.total_steps": 6, "trainer.save_every": 2, "trainer.val_every": 3,
            "trainer.final_eval": False, "trainer.plots": False}
    run(make_cfg(task, tmp_path / "a", **over), tiny)

    def bomb(trainer, step, metrics):
        if step == 3:  # step 3 completed (metrics written), last checkpoint: step 2
            raise Boom

    cfg_b = make_cfg(task, tmp_path / "b", **over)
    with pytest.raises(Boom):
        run(cfg_b, tiny, callbacks=[bomb])
    assert CheckpointManager(tmp_path / "b" / "checkpoints").latest().name == "step_00000002"
    with pytest.raises(ConfigError, match="--resume"):
        run(cfg_b, tiny)  # never silently restarts over an existing run
    run(cfg_b, tiny, resume=True)

    a = CheckpointManager(tmp_path / "a" / "checkpoints").load()
    b = CheckpointManager(tmp_path / "b" / "checkpoints").load()
    assert a["state"]["step"] == b["state"]["step"] == 6
    for (k, v), (k2, v2) in zip(a["predictor"].state_dict().items(),
                                b["predictor"].state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for key in sa[i]:
            assert torch.equal(torch.as_tensor(sa[i][key]), torch.as_tensor(sb[i][key]))
    ra, rb = metrics_rows(tmp_path / "a"), metrics_rows(tmp_path / "b")
    assert [r["step"] for r in rb if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [r["reward/mean"] for r in ra if r["kind"] == "train"] == \
        [r["reward/mean"] for r in rb if r["kind"] == "train"]
    assert [r["step"] for r in rb if r["kind"] == "val"] == [0, 3, 6]


def test_resume_with_a_corrupt_latest_checkpoint_uses_the_previous_one(tiny, task, tmp_path,
                                                                       caplog):
    """Killed after step 5 with checkpoints 2 and 4, then step 4's predictor
    file corrupted: --resume refuses it by name, resumes from step 2, redoes
    steps 3..6, and ends exactly where an uninterrupted run ends."""
    import logging

    over = {"trainer.total_steps": 6, "trainer.save_every": 2, "trainer.val_every": 0,
            "trainer.final_eval": False, "trainer.plots": False, "trainer.keep_checkpoints": 3}
    run(make_cfg(task, tmp_path / "a", **over), tiny)

    def bomb(trainer, step, metrics):
        if step == 5:
            raise Boom

    cfg_b = make_cfg(task, tmp_path / "b", **over)
    with pytest.raises(Boom):
        run(cfg_b, tiny, callbacks=[bomb])
    ck = tmp_path / "b" / "checkpoints"
    assert CheckpointManager(ck).latest().name == "step_00000004"
    w = ck / "step_00000004" / "predictor" / "predictor.safetensors"
    w.write_bytes(w.read_bytes()[:-4] + b"\x00\x01\x02\x03")
    with caplog.at_level(logging.WARNING, logger="sae_fast"):
        run(cfg_b, tiny, resume=True)
    assert "step_00000004 refused" in caplog.text and "resuming from step_00000002" in caplog.text
    a, b = (CheckpointManager(tmp_path / x / "checkpoints").load() for x in ("a", "b"))
    assert b["state"]["step"] == 6
    for (k, v), (_, v2) in zip(a["predictor"].state_dict().items(),
                               b["predictor"].state_dict().items()):
        assert torch.equal(v, v2), k
    rows = [r for r in metrics_rows(tmp_path / "b") if r["kind"] == "train"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["reward/mean"] for r in rows] == \
        [r["reward/mean"] for r in metrics_rows(tmp_path / "a") if r["kind"] == "train"]


def test_disable_sae_runs_the_same_loop_unsteered_and_labelled(tiny, task, tmp_path):
    over = {"trainer.total_steps": 2, "trainer.plots": False}
    steered = run(make_cfg(task, tmp_path / "s", **over), tiny)
    off = run(make_cfg(task, tmp_path / "u", **{**over, "sae.enable": False}), tiny)
    assert off["run_mode"] == UNSTEERED_LABEL
    assert "DISABLED" in off["table"] and UNSTEERED_LABEL in off["table"]
    assert set(off["validation"]) == {"unsteered"}
    # the unsteered validation equals the steered run's unsteered baseline
    assert off["validation"]["unsteered"]["mean"] == steered["validation"]["unsteered"]["mean"]
    rows_on = [r for r in metrics_rows(tmp_path / "s") if r["kind"] == "train"]
    rows_off = [r for r in metrics_rows(tmp_path / "u") if r["kind"] == "train"]
    assert all(r["run_mode"] == UNSTEERED_LABEL for r in rows_off)
    reward_keys = lambda r: {k for k in r if k.startswith(("reward/", "response_length"))}  # noqa
    assert reward_keys(rows_on[0]) == reward_keys(rows_off[0])
    assert "strength/mean" not in rows_off[0]
    assert not (tmp_path / "u" / "predictor").exists()
    # --resume works for an unsteered run too
    run(make_cfg(task, tmp_path / "u", **{**over, "sae.enable": False,
                                           "trainer.total_steps": 3}), tiny, resume=True)
    assert [r["step"] for r in metrics_rows(tmp_path / "u") if r["kind"] == "train"] == [1, 2, 3]


@pytest.mark.parametrize("name", ["ppo", "reinforce"])
def test_other_algorithms_run(tiny, task, tmp_path, name):
    cfg = make_cfg(task, tmp_path / name, **{"algorithm.name": name, "trainer.total_steps": 2,
                                             "trainer.final_eval": False, "trainer.plots": False,
                                             "algorithm.entropy_coef": 0.01,
                                             "algorithm.kl_coef": 0.05})
    run(cfg, tiny)
    rows = [r for r in metrics_rows(tmp_path / name) if r["kind"] == "train"]
    assert len(rows) == 2 and all(math.isfinite(r["actor/loss"]) for r in rows)


def test_annealed_exploration_std_follows_its_schedule_through_the_trainer(tiny, task, tmp_path):
    cfg = make_cfg(task, tmp_path / "anneal", **{
        "trainer.total_steps": 3, "trainer.final_eval": False, "trainer.plots": False,
        "algorithm.init_log_std": -0.5, "algorithm.final_log_std": -2.0})
    run(cfg, tiny)
    rows = [r for r in metrics_rows(tmp_path / "anneal") if r["kind"] == "train"]
    assert [r["actor/log_std_mean"] for r in rows] == pytest.approx([-0.5, -1.25, -2.0])


def test_user_errors(tiny, task, tmp_path):
    # SAE whose d_in does not match the LLM
    small = save_sae(random_sae(64, 128, seed=1), tmp_path / "small_sae")
    with pytest.raises(SAELoadError, match="d_in=64 but the model's hidden size is 128"):
        run(make_cfg(task, tmp_path / "e1", **{"sae.model_path": str(small)}), tiny)
    with pytest.raises(ConfigError, match="sae.hidden_size=4096"):
        run(make_cfg(task, tmp_path / "e2", **{"sae.hidden_size": 4096}), tiny)
    with pytest.raises(ConfigError, match="out of range"):
        run(make_cfg(task, tmp_path / "e3", **{"sae.selected_features": [100000]}), tiny)
    with pytest.raises(R.RewardError, match="unknown reward function 'bleu'"):
        run(make_cfg(task, tmp_path / "e4", **{"reward.name": "bleu"}), tiny)
    with pytest.raises(DataError, match="does not exist"):
        run(make_cfg(task, tmp_path / "e5", **{"data.train_files": [str(tmp_path / "x.jsonl")]}),
            tiny)
    with pytest.raises(ConfigError, match="min_strength=5.0 > max_strength=-5.0"):
        make_cfg(task, tmp_path / "e6", **{"sae.min_strength": 5.0, "sae.max_strength": -5.0})
    with pytest.raises(ConfigError, match="num_features=2"):
        make_cfg(task, tmp_path / "e7", **{"sae.num_features": 2})
    with pytest.raises(CheckpointError, match="no predictor"):
        out = tmp_path / "e8"
        run(make_cfg(task, out, **{"sae.enable": False, "trainer.total_steps": 1,
                                   "trainer.plots": False}), tiny)
        run(make_cfg(task, out, **{"trainer.total_steps": 2}), tiny, resume=True)
    out = tmp_path / "e9"  # a checkpoint from a run with another predictor
    run(make_cfg(task, out, **{"trainer.total_steps": 1, "trainer.plots": False,
                               "trainer.final_eval": False}), tiny)
    with pytest.raises(CheckpointError, match=r"predictor shape \(input_dim, num_features, "
                                              r"hidden_size.*\(128, 1, 64, 1, False\) does not "
                                              r"match this run's \(128, 1, 32, 1, False\)"):
        run(make_cfg(task, out, **{"trainer.total_steps": 2, "sae.predictor_hidden_size": 32}),
            tiny, resume=True)
    with pytest.raises(SteeringSpecError, match="layer 9 is out of range"):
        run(make_cfg(task, tmp_path / "e10", **{"sae.target_layer": 9}), tiny)
    # the vLLM rollout engine cannot record per-feature activations: refused
    # before any engine starts, not silently empty
    with pytest.raises(ConfigError, match=r"record_activations: true, but the vllm rollout"):
        run(make_cfg(task, tmp_path / "e11", **{"rollout.backend": "vllm",
                                                "trainer.record_activations": True}), tiny)


def test_mean_ci95():
    m, ci = mean_ci95([1.0, 2.0, 3.0, 4.0])
    assert m == 2.5 and math.isclose(ci, 1.96 * math.sqrt(5 / 3 / 4))
    assert mean_ci95([2.0]) == (2.0, 0.0)


# =========================================================================== SIGKILL
@pytest.mark.slow
def test_sigkill_mid_run_then_resume_matches_uninterrupted(task, tmp_path):
    """A real kill -9 of the CLI trainer, then --resume: the run completes with
    every step exactly once and the same final predictor as a clean run."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}

    def cmd(out, resume=False):
        cfg = make_cfg(task, out, **{"trainer.total_steps": 40, "trainer.save_every": 1,
                                     "trainer.final_eval": False, "trainer.plots": False,
                                     "trainer.val_before_train": False})
        path = tmp_path / f"{out.name}.yaml"
        path.write_text(cfg.to_yaml())
        return [sys.executable, "-m", "sae_fast.cli", "-q", "train", "--config", str(path)] + \
            (["--resume"] if resume else [])

    clean = tmp_path / "clean"
    subprocess.run(cmd(clean), env=env, check=True, capture_output=True, timeout=600)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(cmd(killed), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            latest = killed / "checkpoints" / "latest"
            if latest.is_file() and int(latest.read_text().strip()[5:]) >= 5:
                break
            if proc.poll() is not None:
                pytest.fail("the trainer finished before it could be killed")
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    mgr = CheckpointManager(killed / "checkpoints")
    killed_at = mgr.load()["state"]["step"]
    assert 5 <= killed_at < 40
    subprocess.run(cmd(killed, resume=True), env=env, check=True, capture_output=True, timeout=600)
    a = CheckpointManager(clean / "checkpoints").load()
    b = CheckpointManager(killed / "checkpoints").load()
    assert a["state"]["step"] == b["state"]["step"] == 40
    for (k, v), (_, v2) in zip(a["predictor"].state_dict().items(),
                               b["predictor"].state_dict().items()):
        assert torch.equal(v, v2), k
    steps = [r["step"] for r in metrics_rows(killed) if r["kind"] == "train"]
    assert steps == list(range(1, 41))


# =========================================================================== vLLM rollouts
@pytest.mark.vllm
def test_vllm_rollout_backend_matches_hf_and_trains(tiny, task, tmp_path):
    """rollout.backend=vllm: the same per-row steering as the HF backend
    (greedy, token for token) and a short training run through it. Last in
    this file: importing vLLM binds this process's threads."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_DISABLE_COMPILE_CACHE", "1")
    pytest.importorskip("vllm")
    from sae_fast.plan import SteeringSpec

    model, tok = tiny
    cfg = make_cfg(task, tmp_path / "vllm", **{
        "rollout.backend": "vllm", "rollout.max_prompt_length": 256,
        "rollout.vllm_kwargs": {"enforce_eager": True}, "trainer.total_steps": 2,
        "trainer.final_eval": False, "trainer.plots": False})
    tr = Trainer(cfg, model=model, tokenizer=tok)
    try:
        tr.setup()
        assert tr.engine.backend == "vllm"
        prompts = ["Please write a happy story about art.", "What is 3 plus 4? Numbers: 3 4",
                   "Tell me something kind"]
        rows = torch.tensor([[5.0], [-5.0], [0.0]])
        greedy = Decoding(max_new_tokens=6, do_sample=False)
        spec = SteeringSpec(features=[task.feature], mode="add", min_strength=-5, max_strength=5)
        with HFRolloutEngine(model, tok, load_sae(task.sae_path), spec, layers=[-1]) as hf:
            for strengths in (rows, None):
                assert [c.token_ids for c in tr.engine.generate(prompts, strengths, greedy)] == \
                    [c.token_ids for c in hf.generate(prompts, strengths, greedy)]
        tr.fit()
    finally:
        tr.close()
    rows = [r for r in metrics_rows(tmp_path / "vllm") if r["kind"] == "train"]
    assert len(rows) == 2 and all(r["steering/successes"] > 0 and r["steering/failures"] == 0
                                  for r in rows)


def test_merge_activation_summaries_weights_by_tokens():
    from sae_fast.train.trainer import merge_activation_summaries

    a = {"7": {"tokens": 30, "before_mean": 1.0, "after_mean": 4.0, "after_max": 9.0,
               "after_active_frac": 0.5}}
    b = {"7": {"tokens": 10, "before_mean": 3.0, "after_mean": 0.0, "after_max": 2.0,
               "after_active_frac": 0.1},
         "8": {"tokens": 5, "before_mean": 2.0, "after_mean": 1.0, "after_max": 1.0,
               "after_active_frac": 1.0}}
    m = merge_activation_summaries([a, b])
    assert m["7"]["tokens"] == 40 and m["8"]["tokens"] == 5
    assert m["7"]["before_mean"] == pytest.approx((30 * 1.0 + 10 * 3.0) / 40)
    assert m["7"]["after_mean"] == pytest.approx(3.0)
    assert m["7"]["after_max"] == 9.0
    assert m["7"]["after_active_frac"] == pytest.approx(0.4)
    assert m["8"] == b["8"]


def test_embedding_standardize_fits_the_predictor_on_training_questions(tiny, task, tmp_path):
    from sae_fast.predictor import StrengthPredictor

    model, tok = tiny
    cfg = make_cfg(task, tmp_path / "run", **{"trainer.total_steps": 1, "trainer.final_eval": False,
                                              "embedding.standardize": True})
    with Trainer(cfg, model=model, tokenizer=tok) as tr:
        tr.setup()
        emb = tr.embedder.embed_texts(tr.train_prompts)
        assert torch.allclose(tr.predictor.input_mean, emb.mean(0), atol=1e-5)
        assert torch.allclose(tr.predictor.input_scale, emb.std(0), rtol=1e-4)
        tr.fit()
    saved = StrengthPredictor.load(tmp_path / "run" / "predictor")
    assert torch.allclose(saved.input_mean, emb.mean(0), atol=1e-5)


def test_keep_best_reports_the_step_that_scores_best_on_the_selection_split(tiny, task, tmp_path):
    """trainer.keep_best: the predictor scored best on the selection split (the
    training questions the best constant is chosen on) is the one reported and
    saved, even when training later ruins it; a resumed run keeps the same choice."""
    over = {"trainer.total_steps": 8, "trainer.val_every": 2, "trainer.save_every": 2,
            "trainer.keep_checkpoints": 10, "trainer.keep_best": True, "trainer.plots": False,
            "trainer.constant_select_size": 16}

    def ruin(trainer, step, metrics):
        if step == 5:  # flip the predictor: the sign of every strength reverses
            with torch.no_grad():
                trainer.predictor.mean_head.weight.neg_()
                trainer.predictor.mean_head.bias.neg_()
            trainer.predictor.clear_cache()

    out_a = tmp_path / "a"
    summary = run(make_cfg(task, out_a, **over), tiny, callbacks=[ruin])
    vals = [r for r in metrics_rows(out_a) if r["kind"] == "val"]
    scores = {r["step"]: r["select/learned/reward_mean"] for r in vals}
    # each validation row carries the learned strengths' statistics (flipped at step 5)
    assert all("val/learned/strength/mean" in r for r in vals)
    assert vals[2]["val/learned/strength/max"] != vals[3]["val/learned/strength/max"]
    assert sorted(scores) == [0, 2, 4, 6, 8]
    best = max(scores, key=scores.get)
    assert best in (2, 4) and scores[best] > max(scores[6], scores[8]) + 0.3, scores
    assert summary["keep_best"]["step"] == best
    assert summary["keep_best"]["select_reward_mean"] == pytest.approx(scores[best])
    # the reported predictor is the one the loop checkpointed at that step, not the last one
    from sae_fast.predictor import StrengthPredictor

    saved = StrengthPredictor.load(out_a / "predictor").state_dict()
    at_best = CheckpointManager(out_a / "checkpoints").load(
        out_a / "checkpoints" / f"step_{best:08d}")["predictor"].state_dict()
    last = CheckpointManager(out_a / "checkpoints").load()["predictor"].state_dict()
    assert all(torch.equal(saved[k], at_best[k]) for k in saved)
    assert not torch.equal(saved["mean_head.weight"], last["mean_head.weight"])
    # the final table's learned row beats the ruined last predictor's selection score
    assert summary["validation"]["learned"]["mean"] > scores[8]

    out_b = tmp_path / "b"

    def bomb(trainer, step, metrics):
        if step == 7:  # last checkpoint: step 6, which holds the best predictor so far
            raise Boom

    with pytest.raises(Boom):
        run(make_cfg(task, out_b, **over), tiny, callbacks=[ruin, bomb])
    summary_b = run(make_cfg(task, out_b, **over), tiny, callbacks=[ruin], resume=True)
    assert summary_b["keep_best"] == summary["keep_best"]
    saved_b = StrengthPredictor.load(out_b / "predictor").state_dict()
    assert all(torch.equal(saved[k], saved_b[k]) for k in saved)
