"""Reliability (RELIABILITY.md): steering that did not run is reported, one
request never changes another, attach/detach leaves nothing behind, a missing
kernel path falls back loudly, and a kill never loses a checkpoint. The vLLM
halves of these checks live in test_backends_vllm.py (they need its engines)."""

import gc
import json
import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import tracemalloc
import zlib
from pathlib import Path

import pytest
import torch

from sae_fast.backends.common import decoder_layers, schedule_multiplier
from sae_fast.backends.hf import attach
from sae_fast.models import tiny_model
from sae_fast.plan import SteeringSpec, SteeringSpecError
from sae_fast.sae import random_sae

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["What is the capital of France?", "Numbers: one two", "Please write a short story"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread_module):
    """Tiny models on one intra-op thread (see conftest.one_thread_module)."""


@pytest.fixture(scope="module")
def sae():
    return random_sae(128, 512, seed=11)


def _spec(**kw):
    base = dict(features=[3, 50, 200], mode="set", max_activations=[6.0, 6.0, 6.0])
    base.update(kw)
    return SteeringSpec(**base)


def _gen(model, tok, prompts=PROMPTS, steerer=None, n=8):
    enc = tok(list(prompts), return_tensors="pt", padding=True)
    g = (steerer or model).generate(**enc, max_new_tokens=n, do_sample=False,
                                    pad_token_id=tok.pad_token_id)
    return g[:, enc["input_ids"].shape[1]:]


def _all_hooks(model):
    """Every forward / pre-hook on every module of the model."""
    return sorted((name, kind, k) for name, m in model.named_modules()
                  for kind, d in (("pre", m._forward_pre_hooks), ("fwd", m._forward_hooks))
                  for k in d)


def _rng(name):
    """A generator seeded from the test's name (crc32: stable across processes)."""
    return random.Random(zlib.crc32(name.encode()))


# ---------------------------------------------------------------- silent no-op
def _our_layer_hook(layer):
    return next(k for k, fn in layer._forward_hooks.items()
                if "_make_layer_hook" in getattr(fn, "__qualname__", ""))


def test_hf_bypassed_layer_hook_is_reported_not_silent(tiny, sae, caplog):
    """A hook removed behind the steerer's back (what a framework that resets
    hooks, or a path that skips the layer, does): every forward pass that had
    steered rows counts as missed, is a failure, and is logged as a warning."""
    model, tok = tiny
    layers = decoder_layers(model)
    with attach(model, sae, spec=_spec(), layers=[0, 1]) as st:
        st.set_strengths([[4.0, 4.0, 4.0]] * 3)
        _gen(model, tok, steerer=st, n=4)
        assert st.stats.missed == 0 and st.stats.failures == 0  # no false alarm
        del layers[1]._forward_hooks[_our_layer_hook(layers[1])]
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="sae_fast"):
            _gen(model, tok, steerer=st, n=4)
        assert st.stats.missed == 4  # one prefill + three decode forwards
        assert st.stats.failures == 4
        reason = next(iter(st.stats.failure_reasons))
        assert "layer(s) [1] did not run" in reason
        assert any(r.levelno == logging.WARNING and "did not run" in r.getMessage()
                   for r in caplog.records)
        # no steered row, or steering disabled: nothing was expected, nothing missed
        st.set_strengths(None)
        _gen(model, tok, steerer=st, n=2)
        st.set_strengths([[4.0, 4.0, 4.0]] * 3)
        st.disable()
        _gen(model, tok, steerer=st, n=2)
        assert st.stats.missed == 4
    assert st.stats.as_dict()["missed"] == 4


# ---------------------------------------------------------------- isolation
def _random_request(rng, features):
    k = rng.randint(1, len(features))
    feats = rng.sample(features, k)
    return {"features": feats, "strengths": [round(rng.uniform(-4, 4), 3) for _ in feats],
            "mode": rng.choice(["add", "set", "scale", "ablate"])}


def test_hf_batch_of_32_with_padding_each_row_equals_itself_alone(tiny, sae):
    """32 prompts of different lengths (left padding), random per-request
    steering on a third... two thirds of them; every row equals the same
    request generated alone, and a request that fails validation leaves the
    batch's steering, and so every other output, unchanged."""
    model, tok = tiny
    rng = _rng("hf-isolation-32")
    words = ["rivers", "cats", "numbers", "music", "the sea", "trees", "rain", "code"]
    prompts = [f"Request {i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 9)))
               for i in range(32)]
    requests = [None if i % 3 == 0 else _random_request(rng, [3, 50, 200]) for i in range(32)]
    assert len({len(tok(p)["input_ids"]) for p in prompts}) > 5  # real padding
    with attach(model, sae, spec=_spec(), layer=1, max_batch=32) as st:
        st.set_requests(requests)
        batched = _gen(model, tok, prompts, steerer=st)
        bad = list(requests)
        bad[5] = {"features": [3, 7]}  # 7 is not attached
        with pytest.raises(SteeringSpecError, match="feature 7 is not among"):
            st.set_requests(bad)
        assert torch.equal(_gen(model, tok, prompts, steerer=st), batched)
        for i, (p, r) in enumerate(zip(prompts, requests)):
            st.set_requests([r])
            alone = _gen(model, tok, [p], steerer=st)
            assert torch.equal(batched[i, :alone.shape[1]], alone[0]), f"row {i} ({r}) differs"
        assert st.stats.failures == 0
    plain = _gen(model, tok, prompts)
    steered = [i for i, r in enumerate(requests) if r is not None]
    assert sum(not torch.equal(batched[i], plain[i]) for i in steered) > len(steered) // 2
    assert all(torch.equal(batched[i], plain[i]) for i in range(32) if requests[i] is None)


# ---------------------------------------------------------------- lifecycle
def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_hf_1000_attach_detach_cycles_leave_nothing_behind(tiny, sae):
    """1000 attach/steer/detach cycles: no hook left on any module, Python
    allocations within 256 KiB and RSS within 32 MiB of where they were after
    a warm-up, and unsteered output identical to the never-attached model."""
    model, tok = tiny
    enc = tok(PROMPTS[:1], return_tensors="pt")
    base = _gen(model, tok)
    with torch.no_grad():
        base_logits = model(**enc).logits
    hooks0 = _all_hooks(model)

    def cycle(i):
        st = attach(model, sae, spec=_spec(), layer=i % 4)
        st.set_strengths([[1.0, -1.0, 2.0]])
        if i % 100 == 0:  # a steered forward now and then
            with torch.no_grad():
                model(**enc)
        st.remove()

    for i in range(50):
        cycle(i)
    gc.collect()
    tracemalloc.start()
    snap0, rss0 = tracemalloc.take_snapshot(), _rss_bytes()
    for i in range(1000):
        cycle(i)
    gc.collect()
    grown = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(snap0, "filename"))
    tracemalloc.stop()
    assert _all_hooks(model) == hooks0
    assert grown < 256 * 1024, f"Python allocations grew by {grown} bytes over 1000 cycles"
    assert _rss_bytes() - rss0 < 32 << 20
    with torch.no_grad():
        assert torch.equal(model(**enc).logits, base_logits)
    assert torch.equal(_gen(model, tok), base)


def test_hf_exception_inside_generation_leaves_no_hook(tiny, sae):
    """The op raising mid-forward (on_error="raise") aborts generate; leaving
    the ``with`` block removes every hook, and the model's output is the
    never-attached one."""
    model, tok = tiny
    hooks0 = _all_hooks(model)
    base = _gen(model, tok, n=4)

    def explode(*args, **kwargs):
        raise RuntimeError("op exploded")

    with pytest.raises(RuntimeError, match="op exploded"):
        with attach(model, sae, spec=_spec(), layers=[1, 2], on_error="raise") as st:
            st.set_strengths([[1.0, 1.0, 1.0]] * 3)
            st.groups[0].tables[1].apply_ = explode  # layer 2's op, after layer 1 steered
            _gen(model, tok, steerer=st, n=4)
    assert _all_hooks(model) == hooks0
    assert torch.equal(_gen(model, tok, n=4), base)


# ---------------------------------------------------------------- schedules
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_hf_strength_schedule_scales_each_steps_delta_as_the_reference_says(tiny, sae, schedule):
    """mode add: the layer's output moves by exactly mult(step) * s * W_dec[f]
    at decode step ``step``, with mult from schedule_multiplier."""
    model, tok = tiny
    layer = decoder_layers(model)[1]
    seen = []

    def record_before(module, args, output):  # registered first: sees the unsteered output
        seen.append([output[0].detach().clone() if isinstance(output, tuple)
                     else output.detach().clone()])

    def record_after(module, args, output):
        seen[-1].append(output[0].detach().clone() if isinstance(output, tuple)
                        else output.detach().clone())

    n, s = 6, 3.0
    h0 = layer.register_forward_hook(record_before)
    try:
        with attach(model, sae, spec=SteeringSpec(features=[50], mode="add"), layer=1,
                    strength_schedule=schedule) as st:
            h1 = layer.register_forward_hook(record_after)
            try:
                st.set_strengths([[s]])
                _gen(model, tok, PROMPTS[:1], steerer=st, n=n)
            finally:
                h1.remove()
    finally:
        h0.remove()
    direction = sae.W_dec[50].float()
    assert len(seen) == n
    for step, (before, after) in enumerate(seen):
        want = schedule_multiplier(schedule, step, n) * s * direction
        delta = (after - before).float()
        torch.testing.assert_close(delta, want.expand_as(delta), atol=2e-5, rtol=1e-5)
    assert schedule_multiplier(schedule, n - 1, n) < 0.5  # the schedule really decays


# ---------------------------------------------------------------- dtypes
def test_sae_in_another_dtype_than_the_model_steers_as_the_model_dtype(tiny, sae):
    """A bf16 SAE on an fp32 model (and an fp32 SAE on a bf16 model) is cast
    once into the model's dtype: the output equals that of the same SAE cast
    by hand beforehand."""
    model, tok = tiny
    outs = {}
    for name, s in (("bf16", sae.to(dtype=torch.bfloat16)),
                    ("cast", sae.to(dtype=torch.bfloat16).to(dtype=torch.float32))):
        with attach(model, s, spec=_spec(), layer=1) as st:
            st.set_strengths([[2.0, -1.0, 3.0]] * 3)
            outs[name] = _gen(model, tok, steerer=st)
            assert st.stats.failures == 0
    assert torch.equal(outs["bf16"], outs["cast"])
    bf_model = type(model).from_pretrained(model.name_or_path, dtype=torch.bfloat16).eval()
    for name, s in (("fp32", sae), ("cast", sae.to(dtype=torch.bfloat16))):
        with attach(bf_model, s, spec=_spec(), layer=1) as st:
            st.set_strengths([[2.0, -1.0, 3.0]] * 3)
            outs[name] = _gen(bf_model, tok, steerer=st)
            assert st.stats.failures == 0 and st.groups[0].tables[0].plan.enc_w.dtype == torch.bfloat16
    assert torch.equal(outs["fp32"], outs["cast"])


# ---------------------------------------------------------------- fallbacks
_FALLBACK_SCRIPT = textwrap.dedent("""
    import json, sys, warnings
    block = sys.argv[1]
    sys.modules[block] = None  # `import sae_fast._C` / `import triton` now fails
    import torch
    torch.set_num_threads(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from sae_fast import ops
        from sae_fast.backends.hf import attach
        from sae_fast.generate import load_hf
        from sae_fast.plan import SteeringSpec
        from sae_fast.sae import random_sae
        model, tok = load_hf(sys.argv[2])
        sae = random_sae(128, 512, seed=11)
        spec = SteeringSpec(features=[3, 50, 200], mode="set", max_activations=[6.0] * 3)
        enc = tok(["What is the capital of France?", "Numbers: one two"], return_tensors="pt",
                  padding=True)
        with attach(model, sae, spec=spec, layer=1) as st:
            st.set_strengths([[4.0, -2.0, 1.0], [1.0, 1.0, 1.0]])
            out = st.generate(**enc, max_new_tokens=8, do_sample=False,
                              pad_token_id=tok.pad_token_id)
            failures = st.stats.failures
    fallback = [str(w.message) for w in caught if "falling back" in str(w.message)]
    print("RESULT " + json.dumps({"tokens": out[:, enc["input_ids"].shape[1]:].tolist(),
                                  "warnings": fallback, "info": ops.backend_info(),
                                  "failures": failures, "count": ops.fallback_count()}))
""")


def _run_fallback(tmp_path, block, env_extra):
    script = tmp_path / "fallback.py"
    script.write_text(_FALLBACK_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("SAE_FAST_REQUIRE_EXT",
                                                            "SAE_FAST_BACKEND")}
    env.update(env_extra, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(script), block, str(tiny_model("llama"))],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def _steered_tokens_here(tiny, sae):
    model, tok = tiny
    with attach(model, sae, spec=_spec(), layer=1) as st:
        st.set_strengths([[4.0, -2.0, 1.0], [1.0, 1.0, 1.0]])
        return _gen(model, tok, PROMPTS[:2], steerer=st).tolist()


def test_without_the_compiled_extension_everything_runs_on_the_reference(tiny, sae, tmp_path):
    """`sae_fast._C` made unimportable: the same generation (the reference op
    gives the tokens the C++ op gives here), one warning naming the import
    error, and the fallback counter counting every op call."""
    res = _run_fallback(tmp_path, "sae_fast._C", {})
    assert res["info"]["extension_devices"] == []
    assert "import of sae_fast._C halted" in res["info"]["extension_error"]
    assert res["info"]["selected"] == {"cpu": "reference"}
    assert len(res["warnings"]) == 1
    assert "ext unavailable (ModuleNotFoundError: import of sae_fast._C" in res["warnings"][0]
    assert res["count"] >= 8 and res["count"] == res["info"]["fallbacks"]
    assert res["failures"] == 0
    assert res["tokens"] == _steered_tokens_here(tiny, sae)


def test_without_triton_the_forced_triton_path_falls_back_loudly(tiny, sae, tmp_path):
    """`triton` made unimportable while SAE_FAST_BACKEND=triton asks for it
    (under TRITON_INTERPRET so that CPU tensors could use it): the reference
    runs, with one warning naming the import error and the counter moving."""
    res = _run_fallback(tmp_path, "triton", {"SAE_FAST_BACKEND": "triton",
                                             "TRITON_INTERPRET": "1"})
    assert res["info"]["selected"] == {"cpu": "reference"}
    assert "triton" in res["info"]["triton_error"].lower()
    assert len(res["warnings"]) == 1 and "triton unavailable" in res["warnings"][0]
    assert res["count"] >= 8 and res["failures"] == 0
    assert res["tokens"] == _steered_tokens_here(tiny, sae)


# ---------------------------------------------------------------- checkpoints
_CKPT_WRITER = textwrap.dedent("""
    import sys, torch
    from sae_fast.predictor import PredictorConfig, StrengthPredictor
    from sae_fast.train.checkpoint import CheckpointManager
    mgr = CheckpointManager(sys.argv[1], keep=2)
    torch.manual_seed(0)
    p = StrengthPredictor(PredictorConfig(input_dim=512, num_features=4, hidden_size=1024))
    opt = torch.optim.AdamW(p.parameters())
    p(torch.randn(2, 512)).mean.sum().backward()
    opt.step()
    ck = mgr.load_valid()  # resume where the killed writer left off
    step = 0 if ck is None else ck["state"]["step"]
    while True:
        step += 1
        with torch.no_grad():
            for t in p.state_dict().values():  # parameters and buffers
                t.fill_(float(step))
        mgr.save(step, p, opt, {"marker": step})
        print(step, flush=True)
""")


def test_sigkill_during_checkpoint_writes_never_leaves_a_corrupt_latest(tmp_path):
    """A writer saving ~10 MB checkpoints back to back, resuming from the
    latest, is SIGKILLed at seeded random moments, five times: every time the
    latest checkpoint verifies and holds the weights of its own step, and the
    next writer continues after it."""
    from sae_fast.train.checkpoint import CheckpointManager

    script = tmp_path / "writer.py"
    script.write_text(_CKPT_WRITER)
    root = tmp_path / "ck"
    rng = _rng("sigkill-checkpoint")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    seen_steps = []
    for attempt in range(5):
        proc = subprocess.Popen([sys.executable, str(script), str(root)], env=env,
                                stdout=subprocess.PIPE, text=True)
        try:
            first = proc.stdout.readline()  # one save done: the kill lands mid-run
            assert first.strip(), "writer died before its first save"
            time.sleep(rng.uniform(0.0, 0.4))
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait(timeout=60)
        ck = CheckpointManager(root, keep=2).load()  # verifies every file's sha256
        step = int(ck["state"]["step"])
        assert ck["state"]["marker"] == step
        assert all(torch.all(t == float(step)) for t in ck["predictor"].state_dict().values())
        seen_steps.append(step)
        assert not list(root.glob(".tmp-*"))  # the next manager cleaned the leftovers
    assert seen_steps == sorted(seen_steps) and seen_steps[-1] > seen_steps[0] >= 1


def test_resaving_an_older_step_drops_the_abandoned_later_ones(tmp_path):
    """After a resume from step 2 (say step 3 was corrupt), the new step 3
    replaces the old and later ones (step 4) go: ``latest`` always names a
    checkpoint that exists (pruning by step number alone once deleted it)."""
    from sae_fast.predictor import PredictorConfig, StrengthPredictor
    from sae_fast.train.checkpoint import CheckpointManager

    mgr = CheckpointManager(tmp_path / "ck", keep=3)
    p = StrengthPredictor(PredictorConfig(input_dim=8, num_features=2, hidden_size=16))
    for step in (1, 2, 3, 4):
        mgr.save(step, p, None, {"attempt": 1})
    mgr.save(3, p, None, {"attempt": 2})
    assert [c.name for c in mgr.list()] == ["step_00000002", "step_00000003"]
    ck = mgr.load()
    assert ck["state"] == {"attempt": 2, "step": 3}
    mgr.save(1, p, None, {"attempt": 3})
    assert mgr.latest().name == "step_00000001" and mgr.load()["state"]["attempt"] == 3


def test_corrupt_latest_checkpoint_is_refused_and_the_previous_one_used(tmp_path, caplog):
    from sae_fast.predictor import PredictorConfig, StrengthPredictor
    from sae_fast.train.checkpoint import CheckpointError, CheckpointManager

    mgr = CheckpointManager(tmp_path / "ck", keep=3)
    p = StrengthPredictor(PredictorConfig(input_dim=8, num_features=2, hidden_size=16))
    for step in (1, 2, 3):
        mgr.save(step, p, None, {"x": step})
    w = tmp_path / "ck" / "step_00000003" / "predictor" / "predictor.safetensors"
    w.write_bytes(w.read_bytes()[:-5] + b"xxxxx")
    with caplog.at_level(logging.WARNING, logger="sae_fast"):
        ck = mgr.load_valid()
    assert ck["state"]["step"] == 2
    text = caplog.text
    assert "step_00000003 refused" in text and "contents do not match the manifest" in text
    (tmp_path / "ck" / "latest").write_text("step_00000007\n")  # a pointer to nothing
    assert mgr.load_valid()["state"]["step"] == 2
    for name in ("step_00000001", "step_00000002"):
        (tmp_path / "ck" / name / "trainer_state.json").write_text("{")
    with pytest.raises(CheckpointError, match=r"no readable checkpoint .*step_00000007 but"):
        mgr.load_valid()
    assert CheckpointManager(tmp_path / "empty").load_valid() is None


# ---------------------------------------------------------------- trainer options
def test_tensorboard_writes_events_or_warns_when_missing(tmp_path, monkeypatch, caplog):
    from sae_fast.train.trainer import MetricsLogger

    pytest.importorskip("tensorboard")
    (tmp_path / "a").mkdir()
    m = MetricsLogger(tmp_path / "a", tensorboard=True)
    m.log({"step": 1, "train/reward_mean": 0.5})
    m.close()
    assert list((tmp_path / "a" / "tensorboard").glob("events.out.tfevents.*"))
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with caplog.at_level(logging.WARNING, logger="sae_fast"):
        m2 = MetricsLogger(tmp_path / "b", tensorboard=True)
    assert m2.tb is None and "TensorBoard cannot be used" in caplog.text
    assert "trainer.tensorboard: false" in caplog.text
