"""The standalone trainer: RL on the strength predictor with a frozen LLM.

One step (DESIGN "data flow of one RL step"):

    questions -> embeddings (frozen LLM, no grad, cached) -> predictor ->
    n sampled strength vectors per question -> rollout engine generates with
    per-row strengths -> reward fn -> advantages -> PPO/GRPO/REINFORCE update
    of the predictor only -> metrics.jsonl (+ TensorBoard) -> checkpoint

Validation compares the learned predictor (deterministic mean strengths)
with unsteered generation and random strengths (and, at the end, the best
single constant strength of a grid, chosen on training questions, a split
separate from the reported one). Every method gets three scores: concept
(the reward function), fluency (mean per-token NLL under the frozen
unsteered model, minus that of the unsteered completion of the same prompt)
and repetition (repeated bigram share); the reward is their weighted
combination (``reward.fluency_weight``, ``reward.repetition_weight``). ``--disable-sae`` runs the same loop without any
SAE or predictor, so its metrics are the unsteered baseline, labelled so.

Reproducibility: batches, policy samples and the generation sampler are
seeded from (seed, step), and checkpoints hold the predictor, the optimizer
and the updater state, so a resumed run reproduces an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from sae_fast.checks import atomic_write
from sae_fast.config import Config, ConfigError
from sae_fast.train.checkpoint import CheckpointError, CheckpointManager
from sae_fast.train.data import BatchSchedule, Example, format_prompt, load_dataset
from sae_fast.train.rewards import RewardFunction, reward_from_config
from sae_fast.train.rollout import Decoding, RolloutEngine, make_engine

log = logging.getLogger(__name__)

UNSTEERED_LABEL = "unsteered (--disable-sae)"
Callback = Callable[["Trainer", int, dict], None]


def _mix(*parts: int) -> int:
    """A 63-bit seed from integers (stable across runs and processes)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its normal-approximation 95% interval."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    m = sum(values) / n
    if n < 2:
        return m, 0.0
    var = sum((v - m) ** 2 for v in values) / (n - 1)
    return m, 1.96 * math.sqrt(var / n)


SCORES = ("concept", "fluency", "repetition")  # MethodResult.scores keys besides the reward


@dataclass
class MethodResult:
    name: str
    rewards: list[float]  # the combined reward (= concept when the fluency weights are 0)
    strengths: Optional[torch.Tensor] = None  # [N, k] effective strengths (None = unsteered)
    detail: str = ""
    # per question: concept, fluency (NLL minus the unsteered completion's, nats/token; lower
    # is more fluent), repetition (repeated bigram share), nll
    scores: dict[str, list[float]] = field(default_factory=dict)
    texts: list[str] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)  # data_source per question
    selection: dict = field(default_factory=dict)  # best constant: where and how it was chosen

    def score_mean(self, key: str) -> float:
        return mean_ci95(self.scores[key])[0] if self.scores.get(key) else float("nan")

    @property
    def mean(self) -> float:
        return mean_ci95(self.rewards)[0]

    @property
    def ci95(self) -> float:
        return mean_ci95(self.rewards)[1]


def format_table(results: Sequence[MethodResult], title: str = "") -> str:
    """A plain-text table: method | combined reward, its 95% CI | concept |
    fluency (NLL above unsteered) | repetition | n."""
    rows = [(r.name + (f" ({r.detail})" if r.detail else ""), r) for r in results]
    w = max([len("method")] + [len(name) for name, _ in rows])
    lines = [title] if title else []
    lines.append(f"{'method':<{w}}  {'reward':>8}  {'95% CI':>17}  {'concept':>8}  "
                 f"{'fluency':>8}  {'repeat':>6}  {'n':>4}")
    lines.append("-" * (w + 66))
    for name, r in rows:
        m, ci = r.mean, r.ci95
        lines.append(f"{name:<{w}}  {m:>8.4f}  [{m - ci:>7.4f}, {m + ci:>7.4f}]  "
                     f"{r.score_mean('concept'):>8.4f}  {r.score_mean('fluency'):>8.3f}  "
                     f"{r.score_mean('repetition'):>6.3f}  {len(r.rewards):>4}")
    lines.append("reward = concept - fluency_weight * max(0, fluency) - repetition_weight * "
                 "repeat; fluency = NLL above the unsteered completion (nats/token, lower = "
                 "more fluent); repeat = repeated bigram share")
    return "\n".join(lines)


def group_means(result: MethodResult) -> dict[str, dict[str, float]]:
    """Per question type (data_source): the mean of the reward and of each score."""
    out: dict[str, dict[str, float]] = {}
    for g in sorted(set(result.groups)):
        idx = [i for i, x in enumerate(result.groups) if x == g]
        row = {"n": float(len(idx)), "reward": mean_ci95([result.rewards[i] for i in idx])[0]}
        for key, vals in result.scores.items():
            row[key] = mean_ci95([vals[i] for i in idx])[0]
        out[g] = row
    return out


class MetricsLogger:
    """Appends JSON lines to metrics.jsonl (and TensorBoard scalars when available)."""

    def __init__(self, output_dir: Path, tensorboard: bool = True, purge_step: Optional[int] = None):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(output_dir) / "tensorboard"), purge_step=purge_step)
            except Exception as err:  # tensorboard not installed: metrics.jsonl only
                log.warning("trainer.tensorboard is true but TensorBoard cannot be used (%s: %s); "
                            "metrics go to %s only. pip install tensorboard, or set "
                            "trainer.tensorboard: false", type(err).__name__, err, self.path)
                self.tb = None

    def truncate_after(self, step: int) -> None:
        """Drop rows of steps after ``step`` (they are redone after a resume)."""
        if not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn line from the kill
            if int(row.get("step", 0)) <= step:
                kept.append(line)
        atomic_write(self.path, "".join(k + "\n" for k in kept))

    def log(self, row: dict) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps(row, default=float) + "\n")
            fh.flush()
        if self.tb is not None:
            step = int(row.get("step", 0))
            for k, v in row.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class Trainer:
    """Train the strength predictor for ``cfg`` (see module docstring).

    ``model``/``tokenizer``/``sae``/``reward_fn``/``engine`` may be passed in
    (tests, notebooks); otherwise they are loaded from the config.
    ``callbacks`` run after every completed step (its metrics written and its
    checkpoint, if due, saved) as ``cb(trainer, step, metrics)``."""

    def __init__(self, cfg: Config, *, model: Any = None, tokenizer: Any = None, sae: Any = None,
                 reward_fn: Optional[RewardFunction] = None, engine: Optional[RolloutEngine] = None,
                 resume: bool = False, callbacks: Sequence[Callback] = (),
                 train_examples: Optional[list[Example]] = None,
                 val_examples: Optional[list[Example]] = None) -> None:
        self.cfg = cfg
        self.resume = resume
        self.callbacks = list(callbacks)
        self.steer = bool(cfg.sae.enable)
        self.run_mode = UNSTEERED_LABEL if not self.steer else \
            "steered" if cfg.sae.enable_steering else "steering off (sae.enable_steering=false)"
        self.out = Path(cfg.trainer.output_dir)
        self._model, self._tokenizer, self._sae = model, tokenizer, sae
        self._engine = engine
        self._reward_fn = reward_fn
        self._train_examples, self._val_examples = train_examples, val_examples
        self.step = 0
        self.timings: dict[str, float] = {}
        # trainer.keep_best: {"step", "reward", "predictor"} of the best selection-split score
        self.best: Optional[dict] = None
        # validation results that do not depend on the predictor (unsteered, random,
        # configured): generation is seeded and the same at every validation
        self._fixed_results: dict[str, MethodResult] = {}
        self._setup_done = False

    # ================================================================== setup
    def setup(self) -> "Trainer":
        if self._setup_done:
            return self
        cfg = self.cfg
        torch.manual_seed(cfg.trainer.seed)
        self._check_output_dir()
        self.reward_fn = self._reward_fn or reward_from_config(cfg.reward)
        self.train_examples = self._train_examples or load_dataset(
            cfg.data.train_files, prompt_key=cfg.data.prompt_key, answer_key=cfg.data.answer_key,
            max_samples=cfg.data.max_train_samples)
        if self._val_examples is not None:
            self.val_examples = self._val_examples
        elif cfg.data.val_files:
            self.val_examples = load_dataset(cfg.data.val_files, prompt_key=cfg.data.prompt_key,
                                             answer_key=cfg.data.answer_key,
                                             max_samples=cfg.data.max_val_samples)
        else:
            log.warning("no validation data (data.val_files): validating on the training set")
            self.val_examples = self.train_examples[:cfg.data.max_val_samples or 64]
        can_record = (self._engine.records_activations if self._engine is not None
                      else cfg.rollout.backend == "hf")
        self.record_activations = cfg.trainer.record_activations
        if self.record_activations is None:
            self.record_activations = can_record
        elif self.record_activations and not can_record:
            backend = self._engine.backend if self._engine is not None else cfg.rollout.backend
            raise ConfigError(
                f"trainer.record_activations: true, but the {backend} rollout engine cannot "
                "record feature activations (its steering op runs inside the engine's graph); "
                "set it false or use rollout.backend: hf")
        self._load_model()
        self._load_sae()
        self.engine = self._engine or make_engine(cfg, self.model, self.tokenizer, self.sae,
                                                  steer=self.steer)
        from sae_fast.train.embeddings import embedder_from_config

        self.embedder = embedder_from_config(self.model, self.tokenizer, cfg.embedding,
                                             default_layer=cfg.sae.layers[0],
                                             guard=self.engine.unsteered)
        from sae_fast.train.fluency import FluencyScorer

        self.fluency = FluencyScorer(self.model, self.tokenizer, batch_size=cfg.embedding.batch_size,
                                     guard=self.engine.unsteered)
        self._ref_nll: dict[str, float] = {}  # prompt -> NLL of its unsteered completion
        self.train_prompts = [format_prompt(e, self.tokenizer, cfg.data.chat_template)
                              for e in self.train_examples]
        self.val_prompts = [format_prompt(e, self.tokenizer, cfg.data.chat_template)
                            for e in self.val_examples]
        if self.steer and cfg.embedding.cache:
            # Embed every question once, in a fixed order: later lookups are
            # cache hits, and an embedding never depends on which other
            # questions shared its padded batch (resumed runs match exactly).
            with self._timed("embed"):
                self.embedder.embed_texts(list(dict.fromkeys(self.train_prompts + self.val_prompts)))
            log.info("embedded %d distinct questions in %.1f s", len(self.embedder._cache),
                     self.timings.get("embed", 0.0))
        self.schedule = BatchSchedule(len(self.train_examples), cfg.trainer.batch_size,
                                      cfg.trainer.seed)
        self.total_steps = cfg.trainer.total_steps if cfg.trainer.total_steps is not None else \
            self.schedule.steps_for_epochs(cfg.trainer.total_epochs)
        self.predictor = self.optimizer = self.updater = None
        if self.steer:
            from sae_fast.predictor import build_predictor
            from sae_fast.train.rl import PolicyUpdater, make_optimizer

            self.predictor = build_predictor(cfg.sae, self.embedder.dim, cfg.algorithm)
            self.predictor.config.embedding = self.embedder.describe()
            self.predictor.attach_embedder(self.embedder)
            if cfg.embedding.standardize:
                with torch.no_grad():
                    self.predictor.fit_input_stats(self.embedder.embed_texts(self.train_prompts))
            self.optimizer = make_optimizer(self.predictor, cfg.algorithm)
            self.updater = PolicyUpdater(self.predictor, self.optimizer, cfg.algorithm)
        self.ckpt = CheckpointManager(self.out / "checkpoints", keep=cfg.trainer.keep_checkpoints)
        if self.resume:
            self._restore()
        self.metrics = MetricsLogger(self.out, cfg.trainer.tensorboard,
                                     purge_step=self.step + 1 if self.resume else None)
        if self.resume:
            self.metrics.truncate_after(self.step)
            self.step = max(self.step, 0)
        atomic_write(self.out / "config.yaml", cfg.to_yaml())
        self._setup_done = True
        return self

    def _check_output_dir(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        ckpts = self.out / "checkpoints"
        has = ckpts.is_dir() and any(p.name.startswith("step_") for p in ckpts.iterdir())
        if has and not self.resume:
            raise ConfigError(f"trainer.output_dir: {self.out} already holds checkpoints; pass "
                              "--resume to continue that run or choose another --output-dir")
        if not self.resume and (self.out / "metrics.jsonl").exists():
            (self.out / "metrics.jsonl").unlink()

    def _load_model(self) -> None:
        from sae_fast.generate import load_hf

        cfg = self.cfg
        if self._model is None:
            if not cfg.model.path:
                raise ConfigError("model.path: the base model is not set (--base-model-path)")
            from sae_fast.models import resolve_builtin

            dtype = getattr(torch, cfg.model.dtype)
            self.model, self.tokenizer = load_hf(resolve_builtin(cfg.model.path), dtype=dtype)
            device = cfg.model.device
            if device == "auto":
                device = "cuda" if torch.cuda.is_available() else "cpu"
            self.model.to(device)
        else:
            self.model, self.tokenizer = load_hf(self._model, self._tokenizer)
        # The LLM is frozen: eval mode, no parameter requires grad.
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        from sae_fast.backends.common import hidden_size_of

        self.hidden_size = hidden_size_of(self.model)
        hs = cfg.sae.hidden_size
        if hs is not None and hs != self.hidden_size:
            raise ConfigError(f"sae.hidden_size={hs} but the model {cfg.model.path or ''} has hidden "
                              f"size {self.hidden_size}; set sae.hidden_size to match the LLM")

    def _load_sae(self) -> None:
        from sae_fast.sae import SAELoadError, load_sae

        self.sae = None
        if not self.steer:
            return
        src = self._sae if self._sae is not None else self.cfg.sae.model_path
        if src is None:
            raise ConfigError("sae.model_path: the SAE is not set (--sae-model-path), or run with "
                              "--disable-sae")
        from sae_fast.models import resolve_builtin

        device = next(self.model.parameters()).device
        self.sae = load_sae(resolve_builtin(src), device=device)
        self.sae.check_hidden_size(self.hidden_size)
        if self.cfg.sae.hidden_size is not None and self.sae.d_in != self.cfg.sae.hidden_size:
            raise SAELoadError(f"SAE {self.sae.source} has d_in={self.sae.d_in} but "
                               f"sae.hidden_size={self.cfg.sae.hidden_size}")
        bad = [f for f in self.cfg.sae.features if f >= self.sae.d_sae]
        if bad:
            raise ConfigError(f"sae: feature index {bad[0]} is out of range for SAE "
                              f"{self.sae.source} with d_sae={self.sae.d_sae}")
        for t in self.sae.parameters():
            t.requires_grad_(False)

    def _restore(self) -> None:
        ck = self.ckpt.load_valid()  # a corrupt latest checkpoint falls back to the previous
        if ck is None:
            log.warning("--resume: no checkpoint in %s; starting from step 0", self.ckpt.root)
            self.step = -1  # metrics rows of the lost attempt are dropped below, then step 0
            return
        path = ck["path"]
        state = ck["state"]
        if self.steer:
            if ck["predictor"] is None:
                raise CheckpointError(f"{path}: no predictor in this checkpoint (was it written by a "
                                      "--disable-sae run?)")
            shape_keys = ("input_dim", "num_features", "hidden_size", "num_layers", "value_head")
            theirs = tuple(getattr(ck["predictor"].config, k) for k in shape_keys)
            ours = tuple(getattr(self.predictor.config, k) for k in shape_keys)
            if theirs != ours:
                raise CheckpointError(f"{path}: predictor shape ({', '.join(shape_keys)}) = "
                                      f"{theirs} does not match this run's {ours}: the checkpoint "
                                      "was written by a run with another configuration")
            self.predictor.load_state_dict(ck["predictor"].state_dict())
            if ck["optimizer"] is not None:
                self.optimizer.load_state_dict(ck["optimizer"])
            self.updater.load_state_dict(state.get("updater", {}))
            if state.get("best") is not None and ck.get("best_predictor") is not None:
                self.best = {**state["best"], "predictor": ck["best_predictor"]}
        self.step = int(state["step"])
        saved = state.get("config")
        if saved is not None and saved != self.cfg.to_dict():
            log.warning("--resume: the configuration differs from the checkpoint's; continuing "
                        "with the new one")
        log.info("resumed from %s (step %d)", path, self.step)

    # ================================================================== pieces
    @property
    def bounds(self) -> tuple[float, float]:
        return self.cfg.sae.effective_bounds()

    def _decoding(self, seed: int, val: bool = False) -> Decoding:
        r = self.cfg.rollout
        if val:
            return Decoding(max_new_tokens=r.max_new_tokens, do_sample=r.val_do_sample,
                            temperature=r.val_temperature, top_p=r.top_p, top_k=r.top_k, seed=seed)
        return Decoding(max_new_tokens=r.max_new_tokens, do_sample=r.do_sample,
                        temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, seed=seed)

    def _reference_nll(self, prompts: Sequence[str]) -> list[float]:
        """NLL of each prompt's unsteered completion (validation decoding), computed once."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._ref_nll]
        if missing:
            with self._timed("fluency"):
                ref = self.engine.generate(missing, None, self._decoding(
                    _mix(self.cfg.trainer.seed, 5), val=True))
                nll = self.fluency.nll(missing, [c.token_ids for c in ref])
            self._ref_nll.update(zip(missing, nll))
        return [self._ref_nll[p] for p in prompts]

    def _score(self, examples: Sequence[Example], prompts: Sequence[str], completions,
               fluency: bool = True, reference: bool = False,
               ) -> tuple[list[float], dict[str, float], dict[str, list[float]]]:
        """(combined rewards, the reward function's extra means, per-rollout scores).
        ``fluency=False`` skips the NLL forwards (training with a zero fluency weight);
        ``reference``: the completions are the unsteered validation-decoding ones that
        :meth:`_reference_nll` would generate, so their NLL is cached as the reference."""
        extra = []
        for ex, p, c in zip(examples, prompts, completions):
            info = dict(ex.extra_info)
            info.setdefault("prompt", p)
            info["response_ids"] = c.token_ids
            extra.append(info)
        concept, extras = self.reward_fn([e.data_source for e in examples],
                                         [c.text for c in completions],
                                         [e.ground_truth for e in examples], extra)
        from sae_fast.train.fluency import repeated_ngram_fraction

        r = self.cfg.reward
        scores: dict[str, list[float]] = {"concept": list(concept), "repetition": [
            repeated_ngram_fraction(c.token_ids, r.repetition_n) for c in completions]}
        if fluency:
            with self._timed("fluency"):
                nll = self.fluency.nll(list(prompts), [c.token_ids for c in completions])
            if reference:
                for p, v in zip(prompts, nll):
                    self._ref_nll.setdefault(p, v)
            scores["nll"] = nll
            scores["fluency"] = [a - b for a, b in zip(nll, self._reference_nll(prompts))]
        combined = []
        for i, c in enumerate(concept):
            v = c - r.repetition_weight * scores["repetition"][i]
            if fluency and r.fluency_weight > 0:
                v -= r.fluency_weight * max(0.0, scores["fluency"][i])
            combined.append(v)
        return combined, extras, scores

    @contextlib.contextmanager
    def _timed(self, key: str) -> Iterator[None]:
        """Add the wall time of the block to ``self.timings[key]``."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - t0

    # ================================================================== one step
    def train_step(self) -> dict:
        """Run step ``self.step + 1``; returns its metrics."""
        cfg = self.cfg
        step = self.step + 1
        n = cfg.algorithm.n_samples
        self.timings = {}
        t_start = time.perf_counter()
        idx = self.schedule.batch(step - 1)
        examples = [self.train_examples[i] for i in idx]
        prompts = [self.train_prompts[i] for i in idx]
        gen = torch.Generator().manual_seed(_mix(cfg.trainer.seed, step, 1))
        batch = None
        strengths = None
        with self._timed("embed"):
            emb = self.embedder.embed_texts(prompts) if self.steer else None
        if self.steer:
            with self._timed("predict"):
                self.predictor.train()
                self.updater.begin_step(step, self.total_steps)
                batch = self.predictor.sample(emb, n, generator=gen)
                strengths = batch["strengths"]
        rep_examples = [e for e in examples for _ in range(n)]
        rep_prompts = [p for p in prompts for _ in range(n)]
        self.engine.reset_stats()
        with self._timed("generate"):
            completions = self.engine.generate(
                rep_prompts, strengths, self._decoding(_mix(cfg.trainer.seed, step, 2)),
                log_probs=None if batch is None else batch["log_prob"])
        steer_stats = self.engine.stats_dict()
        with self._timed("reward"):
            rewards, extras, scores = self._score(rep_examples, rep_prompts, completions,
                                                  fluency=cfg.reward.fluency_weight > 0)
        r = torch.tensor(rewards, dtype=torch.float32)
        metrics: dict[str, Any] = {"kind": "train", "step": step, "run_mode": self.run_mode,
                                   "epoch": self.schedule.epoch_of(step)}
        if self.steer:
            with self._timed("update"):
                metrics.update(self.updater.update(emb, batch, r, generator=gen))
        metrics.update({"reward/mean": float(r.mean()), "reward/std": float(r.std()) if r.numel() > 1
                        else 0.0, "reward/max": float(r.max()), "reward/min": float(r.min())})
        metrics.update({f"reward/{k}": v for k, v in extras.items()})
        metrics.update({f"reward/{k}_mean": sum(v) / len(v) for k, v in scores.items() if v})
        metrics["response_length/mean"] = sum(len(c.token_ids) for c in completions) / len(completions)
        if strengths is not None:
            metrics.update(self._strength_metrics(strengths, "strength"))
        metrics.update({"steering/successes": steer_stats["successes"],
                        "steering/failures": steer_stats["failures"],
                        "steering/steered_rows": steer_stats["steered_rows"]})
        if steer_stats.get("steer_time_s"):
            self.timings["steer"] = float(steer_stats["steer_time_s"])  # inside generate
        self.timings["step"] = time.perf_counter() - t_start
        metrics.update({f"timing/{k}_s": v for k, v in self.timings.items()})
        self.step = step
        return metrics

    def _strength_metrics(self, s: torch.Tensor, prefix: str) -> dict:
        s = s.detach().float()
        out = {f"{prefix}/mean": float(s.mean()), f"{prefix}/std": float(s.std()) if s.numel() > 1
               else 0.0, f"{prefix}/min": float(s.min()), f"{prefix}/max": float(s.max())}
        feats = self.cfg.sae.features
        if len(feats) <= 16:
            for j, f in enumerate(feats):
                out[f"{prefix}/f{f}_mean"] = float(s[:, j].mean())
        return out

    # ================================================================== validation
    def _val_embeddings(self) -> torch.Tensor:
        return self.embedder.embed_texts(self.val_prompts)

    def learned_strengths(self, prompts: Optional[Sequence[str]] = None) -> torch.Tensor:
        prompts = self.val_prompts if prompts is None else list(prompts)
        with torch.no_grad():
            return self.predictor.mean_strengths(self.embedder.embed_texts(prompts)).detach()

    def random_strengths(self, n: int, seed_salt: int = 3) -> torch.Tensor:
        lo, hi = self.bounds
        g = torch.Generator().manual_seed(_mix(self.cfg.trainer.seed, seed_salt))
        return lo + (hi - lo) * torch.rand(n, len(self.cfg.sae.features), generator=g)

    def run_method(self, name: str, strengths: Optional[torch.Tensor], detail: str = "",
                   examples: Optional[Sequence[Example]] = None,
                   prompts: Optional[Sequence[str]] = None) -> MethodResult:
        examples = self.val_examples if examples is None else examples
        prompts = self.val_prompts if prompts is None else prompts
        # The same sampler seed for every method: differences come from steering.
        completions = self.engine.generate(list(prompts), strengths,
                                           self._decoding(_mix(self.cfg.trainer.seed, 5), val=True))
        # unsteered with the validation decoding: these completions are the fluency reference
        rewards, _, scores = self._score(examples, prompts, completions,
                                         reference=strengths is None)
        return MethodResult(name=name, rewards=rewards, strengths=strengths, detail=detail,
                            scores=scores, texts=[c.text for c in completions],
                            groups=[e.data_source for e in examples])

    def validate(self, methods: Sequence[str] = ("learned", "unsteered", "random")) -> dict:
        """Validation rewards per method; logged as val/<method>/reward_mean."""
        results: dict[str, MethodResult] = {}
        n = len(self.val_examples)
        for m in methods:
            if m in self._fixed_results:
                results[m] = self._fixed_results[m]
            elif m == "unsteered":
                results[m] = self.run_method(UNSTEERED_LABEL if not self.steer else "unsteered", None)
            elif not self.steer:
                continue
            elif m == "learned":
                results[m] = self.run_method("learned predictor", self.learned_strengths())
            elif m == "random":
                lo, hi = self.bounds
                results[m] = self.run_method("random strengths", self.random_strengths(n),
                                             detail=f"uniform [{lo:g}, {hi:g}]")
            elif m == "configured" and self.cfg.sae.fixed_strengths() is not None:
                fixed = torch.tensor(self.cfg.sae.fixed_strengths())
                results[m] = self.run_method("configured strengths", fixed.expand(n, -1).clone(),
                                             detail=str(self.cfg.sae.strengths))
            if m in results and m != "learned":
                self._fixed_results[m] = results[m]
        return results

    def constant_grid(self) -> list[float]:
        if self.cfg.trainer.val_constant_grid is not None:
            return list(self.cfg.trainer.val_constant_grid)
        lo, hi = self.bounds
        return [lo + (hi - lo) * i / 8 for i in range(9)]

    def constant_select_split(self) -> tuple[list[Example], list[str]]:
        """The questions the best constant is chosen on: ``constant_select_size``
        training questions (a fixed seeded subset), or the validation set when 0."""
        size = self.cfg.trainer.constant_select_size
        if size == 0:
            return list(self.val_examples), list(self.val_prompts)
        import random

        idx = sorted(random.Random(_mix(self.cfg.trainer.seed, 7)).sample(
            range(len(self.train_examples)), min(size, len(self.train_examples))))
        return [self.train_examples[i] for i in idx], [self.train_prompts[i] for i in idx]

    def best_constant(self) -> MethodResult:
        """The best single constant strength (same on every feature) of the grid,
        by mean reward on :meth:`constant_select_split`, then run on validation."""
        k = len(self.cfg.sae.features)
        examples, prompts = self.constant_select_split()
        on_val = self.cfg.trainer.constant_select_size == 0
        best_c, best_mean = None, -math.inf
        for c in self.constant_grid():
            res = self.run_method("constant", torch.full((len(examples), k), float(c)),
                                  examples=examples, prompts=prompts)
            if res.mean > best_mean:
                best_c, best_mean = float(c), res.mean
        where = "the validation set itself" if on_val else f"{len(examples)} training questions"
        out = self.run_method("best constant strength",
                              torch.full((len(self.val_examples), k), best_c),
                              detail=f"s={best_c:g} of {len(self.constant_grid())}, chosen on "
                                     f"{where}")
        out.selection = {"split": "val" if on_val else "train", "n": len(examples),
                         "grid": self.constant_grid(), "strength": best_c,
                         "select_reward_mean": best_mean}
        return out

    def track_best(self) -> dict:
        """``trainer.keep_best``: score the current predictor on the selection
        split (:meth:`constant_select_split`) and keep a copy when it is the best
        so far. Returns the ``select/*`` metrics for the validation row."""
        if not (self.cfg.trainer.keep_best and self.steer):
            return {}
        if self.best is not None and self.best.get("last_step") == self.step:
            return {"select/learned/reward_mean": self.best["last_reward"],
                    "select/best_step": self.best["step"]}
        examples, prompts = self.constant_select_split()
        score = self.run_method("learned predictor", self.learned_strengths(prompts),
                                examples=examples, prompts=prompts).mean
        if self.best is None or score > self.best["reward"]:
            import copy

            from sae_fast.predictor import StrengthPredictor

            kept = StrengthPredictor(copy.deepcopy(self.predictor.config)).eval()
            kept.load_state_dict(self.predictor.state_dict())
            self.best = {"step": self.step, "reward": score, "predictor": kept}
        self.best.update(last_step=self.step, last_reward=score)
        return {"select/learned/reward_mean": score, "select/best_step": self.best["step"]}

    def _log_val(self, results: dict[str, MethodResult], extra: Optional[dict] = None) -> dict:
        row: dict[str, Any] = {"kind": "val", "step": self.step, "run_mode": self.run_mode,
                               **(extra or {})}
        for key, res in results.items():
            tag = "unsteered" if key == "unsteered" else key
            row[f"val/{tag}/reward_mean"] = res.mean
            row[f"val/{tag}/reward_ci95"] = res.ci95
            for score in SCORES:
                if res.scores.get(score):
                    row[f"val/{tag}/{score}_mean"] = res.score_mean(score)
            if res.strengths is not None and key == "learned":
                row.update(self._strength_metrics(res.strengths, "val/learned/strength"))
        self.metrics.log(row)
        return row

    # ================================================================== loop
    def _save_checkpoint(self) -> None:
        state = {"updater": self.updater.state_dict() if self.updater else {},
                 "config": self.cfg.to_dict(), "run_mode": self.run_mode,
                 "total_steps": self.total_steps, "time": time.time(),
                 "best": None if self.best is None else
                 {k: v for k, v in self.best.items() if k != "predictor"}}
        self.ckpt.save(self.step, self.predictor, self.optimizer, state,
                       best_predictor=None if self.best is None else self.best["predictor"])

    def fit(self) -> dict:
        """Train to ``total_steps`` (continuing after a resume); returns a summary."""
        from tqdm.auto import tqdm

        self.setup()
        cfg = self.cfg.trainer
        log.info("run mode: %s; %d steps, %d questions per step, %d samples per question",
                 self.run_mode, self.total_steps, cfg.batch_size, self.cfg.algorithm.n_samples)
        if not self.steer:
            log.warning("SAE steering DISABLED (--disable-sae): rollouts run the plain LLM; the "
                        "metrics are the unsteered baseline")
        if cfg.val_before_train and self.step == 0:
            self._log_val(self.validate(), self.track_best())
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not cfg.progress_bar,
                   desc="sae-fast train" + ("" if self.steer else " [SAE DISABLED]"),
                   dynamic_ncols=True)
        try:
            while self.step < self.total_steps:
                metrics = self.train_step()
                self.metrics.log(metrics)
                post = {"reward": f"{metrics['reward/mean']:.3f}"}
                if "strength/mean" in metrics:
                    post.update(s_mean=f"{metrics['strength/mean']:.2f}",
                                s_std=f"{metrics['strength/std']:.2f}")
                bar.set_postfix(post)
                bar.update(1)
                if cfg.val_every and self.step % cfg.val_every == 0 and self.step < self.total_steps:
                    row = self._log_val(self.validate(), self.track_best())
                    bar.write(self._val_line(row))
                if cfg.save_every and (self.step % cfg.save_every == 0 or
                                       self.step == self.total_steps):
                    self._save_checkpoint()
                for cb in self.callbacks:
                    cb(self, self.step, metrics)
        finally:
            bar.close()
        return self.finish()

    def _val_line(self, row: dict) -> str:
        parts = [f"step {row['step']}"]
        for k, v in row.items():
            if k.endswith("/reward_mean"):
                # val/<method>/reward_mean; select/learned/reward_mean (trainer.keep_best)
                name = k.split("/")[1] if k.startswith("val/") else "learned_on_selection_split"
                parts.append(f"{name}={v:.3f}")
        return "validation: " + " ".join(parts)

    def finish(self) -> dict:
        """Final validation (+ best constant), plots, the trained predictor."""
        cfg = self.cfg.trainer
        summary: dict[str, Any] = {"run_mode": self.run_mode, "steps": self.step,
                                   "output_dir": str(self.out)}
        if cfg.save_every == 0 or not self.ckpt.list() or \
                self.ckpt.latest().name != f"step_{self.step:08d}":
            self._save_checkpoint()
        select = self.track_best()
        if self.best is not None:
            summary["keep_best"] = {"step": self.best["step"], "select_reward_mean":
                                    self.best["reward"], "last_step_select_reward_mean":
                                    self.best["last_reward"]}
            if self.best["step"] != self.step:
                log.info("keep_best: reporting the predictor of step %d (selection reward %.4f; "
                         "step %d: %.4f)", self.best["step"], self.best["reward"], self.step,
                         self.best["last_reward"])
                self.predictor.load_state_dict(self.best["predictor"].state_dict())
                self.predictor.clear_cache()
        final = self.validate()
        if cfg.final_eval and self.steer:
            final["best_constant"] = self.best_constant()
        self._log_val(final, select)
        order = ["unsteered", "random", "best_constant", "configured", "learned"]
        results = [final[k] for k in order if k in final]
        title = "final validation" + (
            "" if self.steer else f" -- SAE steering DISABLED ({UNSTEERED_LABEL})")
        summary["table"] = format_table(results, title)
        summary["validation"] = {k: {"name": v.name, "detail": v.detail, "mean": v.mean,
                                     "ci95": v.ci95, "n": len(v.rewards),
                                     **{key: v.score_mean(key) for key in SCORES if v.scores.get(key)},
                                     "by_group": group_means(v), **(
                                         {"selection": v.selection} if v.selection else {})}
                                 for k, v in final.items()}
        if self.steer:
            self.predictor.save(self.out / "predictor")
            self._write_eval_files(final)
        if cfg.samples:
            shown = [e.prompt if isinstance(e.prompt, str) else e.prompt[-1]["content"]
                     for e in self.val_examples]  # the question, without the chat template
            write_samples(self.out / "samples.md", shown,
                          [final[k] for k in order if k in final], cfg.samples)
        atomic_write(self.out / "summary.json", json.dumps(summary, indent=2, default=float))
        if cfg.plots:
            from sae_fast.train.plots import make_all

            summary["plots"] = [str(p) for p in make_all(self.out, title=self.run_mode)]
        self.metrics.close()
        return summary

    def _write_eval_files(self, final: dict) -> None:
        ev = self.out / "eval"
        ev.mkdir(exist_ok=True)
        learned = final["learned"].strengths
        data = {"features": self.cfg.sae.features, "bounds": list(self.bounds),
                "groups": [e.data_source for e in self.val_examples],
                "strengths": learned.tolist(),
                "rewards": final["learned"].rewards,
                "unsteered_concept": final["unsteered"].scores.get("concept", [])
                if "unsteered" in final else []}
        atomic_write(ev / "strengths.json", json.dumps(data))
        # every method's per-question scores: what scripts/seeds.py pools over seeds
        per_question = {k: {"name": v.name, "detail": v.detail, "rewards": v.rewards,
                            "groups": v.groups, **{key: v.scores[key] for key in (*SCORES, "nll")
                                                   if v.scores.get(key)},
                            "strengths": None if v.strengths is None else v.strengths.tolist()}
                        for k, v in final.items()}
        atomic_write(ev / "per_question.json", json.dumps(per_question))
        if self.record_activations:
            # One pass per question type (data_source): a predictor that pushes
            # one type up and another down would average out in a single mean.
            by_group: dict[str, dict] = {}
            self.engine.set_record_activations(True)
            try:
                for g in sorted({e.data_source for e in self.val_examples}):
                    idx = [i for i, e in enumerate(self.val_examples) if e.data_source == g]
                    self.engine.reset_stats()
                    self.run_method("learned predictor", learned[idx],
                                    examples=[self.val_examples[i] for i in idx],
                                    prompts=[self.val_prompts[i] for i in idx])
                    feats = self.engine.stats_dict().get("features", {})
                    by_group[g] = {str(k): v for k, v in feats.items()}
            finally:
                self.engine.set_record_activations(False)
            atomic_write(ev / "activations.json",
                              json.dumps(merge_activation_summaries(list(by_group.values()))))
            atomic_write(ev / "activations_by_group.json", json.dumps(by_group))

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Detach the steering hooks (of an engine this trainer built)."""
        if getattr(self, "engine", None) is not None and self._engine is None:
            self.engine.close()
        if getattr(self, "metrics", None) is not None:
            self.metrics.close()


def write_samples(path: Path, prompts: Sequence[str], results: Sequence[MethodResult],
                  count: int) -> None:
    """``samples.md``: for the first ``count`` validation prompts of each
    question type, every method's completion side by side with its scores."""
    base = results[0]
    groups = base.groups or [""] * len(prompts)
    by_group = [[i for i, x in enumerate(groups) if x == g] for g in dict.fromkeys(groups)]
    order = [i for tier in itertools.zip_longest(*by_group) for i in tier if i is not None]
    lines = ["# Validation samples", "",
             "Each prompt with every method's completion (greedy unless the config samples "
             "validation). reward = combined score; concept = the task's reward; fluency = "
             "NLL above the unsteered completion (nats/token, lower = more fluent); repeat = "
             "repeated bigram share.", ""]
    for i in order[:count]:
        group = f" ({groups[i]})" if groups[i] else ""
        lines += [f"## Prompt {i}{group}", "", "```", prompts[i].strip(), "```", ""]
        for r in results:
            s = "" if r.strengths is None else ", strengths " + ", ".join(
                f"{float(x):.2f}" for x in r.strengths[i].reshape(-1))
            sc = "; ".join(f"{k} {r.scores[k][i]:.3f}" for k in SCORES if r.scores.get(k))
            lines += [f"**{r.name}**{s}: reward {r.rewards[i]:.3f}; {sc}", "",
                      "> " + (r.texts[i].strip().replace("\n", "\n> ") or "(empty)"), ""]
    atomic_write(path, "\n".join(lines) + "\n")


def merge_activation_summaries(parts: Sequence[dict]) -> dict:
    """Token-weighted merge of per-feature activation summaries
    (SteeringStats ``features`` entries) from disjoint sets of questions."""
    out: dict[str, dict] = {}
    for part in parts:
        for f, v in part.items():
            acc = out.setdefault(f, {"tokens": 0})
            n0, n = acc["tokens"], v["tokens"]
            for key, val in v.items():
                if key == "tokens":
                    continue
                if key.endswith("_max"):
                    acc[key] = max(acc.get(key, float("-inf")), val)
                else:  # means and active fractions: weighted by tokens
                    acc[key] = (acc.get(key, 0.0) * n0 + val * n) / max(n0 + n, 1)
            acc["tokens"] = n0 + n
    return out


def train(cfg: Config, **kw: Any) -> dict:
    """Build a Trainer, fit, close; returns the summary."""
    trainer = Trainer(cfg, **kw)
    try:
        return trainer.fit()
    finally:
        trainer.close()
