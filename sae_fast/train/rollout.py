"""Rollout engines: generate completions for a batch of prompts, each row with
its own steering strengths, through one backend.

``RolloutEngine`` is the small adapter the trainer talks to
(``rollout.backend: hf | vllm``):

    engine.generate(prompts, strengths[B, k] | None, decoding) -> [Completion]
    engine.unsteered()       context: no steering at all (baselines, embeddings)
    engine.stats             SteeringStats of the backend
    engine.close()           detach hooks / free the engine

Strengths given to an engine are *effective* (bounded and scaled, as the
predictor outputs them); ``None`` or a ``None`` row means unsteered.
"""

from __future__ import annotations

import abc
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

import torch

from sae_fast.stats import SteeringStats

log = logging.getLogger(__name__)


@dataclass
class Decoding:
    max_new_tokens: int = 64
    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None  # reseed the sampler before generating (reproducible rollouts)


@dataclass
class Completion:
    text: str
    token_ids: list[int] = field(default_factory=list)


class RolloutError(RuntimeError):
    pass


def starts_with_bos(texts: Sequence[str], tokenizer: Any) -> bool:
    """True when every text already begins with the BOS token (a chat template
    put it there): tokenising with special tokens would then double it."""
    bos = getattr(tokenizer, "bos_token", None)
    return bool(bos) and bool(texts) and all(t.startswith(bos) for t in texts)


class RolloutEngine(abc.ABC):
    backend = "abstract"
    # whether set_record_activations(True) records per-feature activations
    # before/after steering (the HF hooks can; an op inside vLLM's graph cannot)
    records_activations = False

    def __init__(self, features: Optional[Sequence[int]] = None) -> None:
        self.features = list(features) if features is not None else None

    @property
    def steering_available(self) -> bool:
        return self.features is not None

    @property
    def num_features(self) -> int:
        return len(self.features or [])

    @abc.abstractmethod
    def generate(self, prompts: Sequence[str], strengths: Optional[Any],
                 decoding: Decoding, log_probs: Optional[Any] = None) -> list[Completion]:
        """One completion per prompt; ``strengths`` [B, k] or None (unsteered).
        ``log_probs`` [B]: the policy's log-prob of each row's strengths, for
        engines that carry it with the sample (verl's agent loop returns it in
        ``extra_fields``); the others ignore it."""

    @contextlib.contextmanager
    def unsteered(self) -> Iterator[None]:
        yield

    def stats_dict(self, reset: bool = False) -> dict:
        """Steering statistics (SteeringStats.as_dict keys: successes, failures,
        steered_rows, strength_mean, features, ...)."""
        return SteeringStats().as_dict()

    def reset_stats(self) -> None:
        pass

    def set_record_activations(self, flag: bool) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "RolloutEngine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _check_strengths(self, prompts: Sequence[str], strengths: Any) -> Optional[list]:
        if strengths is None:
            return None
        if not self.steering_available:
            raise RolloutError("strengths were given but this engine has no SAE attached "
                               "(steering disabled)")
        rows = strengths.tolist() if isinstance(strengths, torch.Tensor) else list(strengths)
        if len(rows) != len(prompts):
            raise RolloutError(f"{len(rows)} strength rows for {len(prompts)} prompts")
        return rows


class HFRolloutEngine(RolloutEngine):
    records_activations = True
    """transformers ``generate`` with the HF steering backend: one batched call
    per chunk of ``max_batch`` rows, per-row strengths."""

    backend = "hf"

    def __init__(self, model: Any, tokenizer: Any, sae: Any = None, spec: Any = None, *,
                 layers: Optional[Sequence[int]] = None, max_batch: int = 64,
                 steer_prompt: bool = True, strength_schedule: str = "constant",
                 enable_steering: bool = True, max_prompt_length: int = 1024) -> None:
        from sae_fast.backends.hf import attach

        super().__init__(spec.features if sae is not None else None)
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = int(max_batch)
        self.max_prompt_length = int(max_prompt_length)
        self.steerer = None
        self._empty_stats = SteeringStats()
        if sae is not None:
            import inspect

            from sae_fast.backends.hf import HFSteerer

            extra = {}
            if "profile" in inspect.signature(HFSteerer.__init__).parameters:
                extra["profile"] = True  # host time inside the hooks -> stats steer_time_s
            self.steerer = attach(model, sae, spec=spec, layers=list(layers) if layers else None,
                                  max_batch=self.max_batch, steer_prompt=steer_prompt,
                                  strength_schedule=strength_schedule, on_error="record", **extra)
            if not enable_steering:
                log.warning("sae.enable_steering=false: hooks are attached but steering is off, "
                            "so every rollout runs unsteered")
                self.steerer.disable()
        self._steering_on = enable_steering

    @property
    def stats(self) -> SteeringStats:
        return self.steerer.stats if self.steerer is not None else self._empty_stats

    def stats_dict(self, reset: bool = False) -> dict:
        d = self.stats.as_dict()
        if reset:
            self.stats.reset()
        return d

    def reset_stats(self) -> None:
        self.stats.reset()

    def set_record_activations(self, flag: bool) -> None:
        if self.steerer is not None:
            self.steerer.record_activations = bool(flag)

    @contextlib.contextmanager
    def unsteered(self) -> Iterator[None]:
        if self.steerer is None:
            yield
            return
        was = self.steerer.enabled
        self.steerer.disable()
        try:
            yield
        finally:
            if was:
                self.steerer.enable()

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], strengths: Optional[Any],
                 decoding: Decoding, log_probs: Optional[Any] = None) -> list[Completion]:
        rows = self._check_strengths(prompts, strengths)
        out: list[Completion] = []
        if decoding.seed is not None:
            torch.manual_seed(int(decoding.seed))
        for start in range(0, len(prompts), self.max_batch):
            chunk = list(prompts[start:start + self.max_batch])
            chunk_rows = None if rows is None else rows[start:start + self.max_batch]
            out.extend(self._generate_chunk(chunk, chunk_rows, decoding))
        return out

    def _generate_chunk(self, prompts: list[str], rows: Optional[list],
                        decoding: Decoding) -> list[Completion]:
        tok = self.tokenizer
        device = next(self.model.parameters()).device
        enc = tok(prompts, return_tensors="pt", padding=True, truncation=True,
                  max_length=self.max_prompt_length,
                  add_special_tokens=not starts_with_bos(prompts, tok)).to(device)
        kwargs = dict(max_new_tokens=decoding.max_new_tokens, do_sample=decoding.do_sample,
                      pad_token_id=tok.pad_token_id)
        if decoding.do_sample:
            kwargs.update(temperature=decoding.temperature, top_p=decoding.top_p,
                          top_k=decoding.top_k)
        else:  # greedy: neutral sampling knobs so transformers does not warn
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if self.steerer is None or rows is None:
            with self.unsteered():
                gen = self.model.generate(**enc, **kwargs)
        else:
            self.steerer.set_strengths(rows)
            try:
                gen = self.steerer.generate(**enc, **kwargs)
            finally:
                self.steerer.set_strengths(None)
        return self._decode(gen[:, enc["input_ids"].shape[1]:])

    def _decode(self, ids: torch.Tensor) -> list[Completion]:
        tok = self.tokenizer
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        if tok.eos_token_id is not None:
            eos_ids.add(tok.eos_token_id)
        out = []
        for row in ids.tolist():
            cut = []
            for t in row:
                if t in eos_ids:
                    break
                if t == tok.pad_token_id:
                    continue
                cut.append(t)
            out.append(Completion(text=tok.decode(cut, skip_special_tokens=True), token_ids=cut))
        return out

    def close(self) -> None:
        if self.steerer is not None:
            self.steerer.remove()
            self.steerer = None


class VLLMRolloutEngine(RolloutEngine):
    """A ``vllm.LLM`` made steerable by ``sae_fast.vllm`` (the vLLM backend):
    every row becomes one request whose steering rides in
    ``SamplingParams.extra_args["sae"]``; one ``generate`` call per batch."""

    backend = "vllm"

    def __init__(self, model_path: Optional[str], sae: Any = None, spec: Any = None, *,
                 layers: Optional[Sequence[int]] = None, strength_schedule: str = "constant",
                 enable_steering: bool = True, max_prompt_length: int = 1024,
                 max_new_tokens: int = 64, seed: int = 0, dtype: str = "float32",
                 vllm_kwargs: Optional[dict] = None, llm: Any = None) -> None:
        super().__init__(spec.features if sae is not None else None)
        try:
            import sae_fast.vllm as sv
            from vllm import SamplingParams  # noqa: F401
        except ImportError as err:
            raise RolloutError("rollout.backend=vllm needs sae_fast.backends.vllm_engine and vllm "
                               f"installed ({err})") from err
        if sae is not None and strength_schedule != "constant":
            raise RolloutError(f"sae.strength_schedule={strength_schedule!r} is not supported by "
                               "the vLLM backend; use rollout.backend=hf or strength_schedule="
                               "constant")
        self._sv = sv
        self._own_llm = llm is None
        if sae is not None and not layers:  # slots go only where steering is attached
            from sae_fast.sae import load_sae

            sae = load_sae(sae, device="cpu")
            layers = [sae.default_layer()]
        if llm is None:
            from vllm import LLM

            kw = dict(model=model_path, dtype=dtype, seed=int(seed),
                      max_model_len=int(max_prompt_length) + int(max_new_tokens))
            if sae is not None:
                kw.update(sv.engine_args(max_features=max(len(spec.features), 1),
                                         layers=list(layers) if layers else None))
            kw.update(vllm_kwargs or {})
            llm = LLM(**kw)
        self.llm = llm
        self.handle = None
        if sae is not None:
            self.handle = sv.attach(self.llm, sae, spec=spec,
                                    layers=list(layers) if layers else None)
            if not enable_steering:
                log.warning("sae.enable_steering=false: steering attached but off, so every "
                            "rollout runs unsteered")
                self.handle.disable()

    def stats_dict(self, reset: bool = False) -> dict:
        if self.handle is None:
            return SteeringStats().as_dict()
        return self.handle.stats(reset=reset)

    def reset_stats(self) -> None:
        if self.handle is not None:
            self.handle.stats(reset=True)

    def generate(self, prompts: Sequence[str], strengths: Optional[Any],
                 decoding: Decoding, log_probs: Optional[Any] = None) -> list[Completion]:
        from vllm import SamplingParams

        rows = self._check_strengths(prompts, strengths)
        params = []
        for i in range(len(prompts)):
            sp = SamplingParams(
                max_tokens=decoding.max_new_tokens,
                temperature=decoding.temperature if decoding.do_sample else 0.0,
                top_p=decoding.top_p if decoding.do_sample else 1.0,
                top_k=(decoding.top_k or -1) if decoding.do_sample else -1,
                seed=None if decoding.seed is None else (int(decoding.seed) + i) % (1 << 31))
            if rows is not None and rows[i] is not None:
                sp = self.handle.sampling_params(sp, strengths=list(rows[i]))
            params.append(sp)
        if self.handle is not None:
            outs = self.handle.generate(list(prompts), params, use_tqdm=False)
        else:
            outs = self.llm.generate(list(prompts), params, use_tqdm=False)
        done = []
        for o in outs:
            if isinstance(o, Exception):
                raise RolloutError(f"vLLM rejected a steered request: {o}")
            done.append(Completion(text=o.outputs[0].text, token_ids=list(o.outputs[0].token_ids)))
        return done

    def close(self) -> None:
        if self.handle is not None:
            self.handle.detach()
            self.handle = None


def make_engine(cfg: Any, model: Any, tokenizer: Any, sae: Any, *, steer: bool) -> RolloutEngine:
    """The engine for ``cfg.rollout.backend``; ``steer=False`` attaches nothing
    (``--disable-sae``)."""
    r, s = cfg.rollout, cfg.sae
    spec = s.steering_spec() if steer else None
    if r.backend == "hf":
        return HFRolloutEngine(model, tokenizer, sae if steer else None, spec, layers=s.layers,
                               max_batch=r.max_batch, steer_prompt=r.steer_prompt,
                               strength_schedule=s.strength_schedule,
                               enable_steering=s.enable_steering,
                               max_prompt_length=r.max_prompt_length)
    if r.backend == "vllm":
        return VLLMRolloutEngine(cfg.model.path, sae if steer else None, spec, layers=s.layers,
                                 strength_schedule=s.strength_schedule,
                                 enable_steering=s.enable_steering,
                                 max_prompt_length=r.max_prompt_length,
                                 max_new_tokens=r.max_new_tokens, seed=cfg.trainer.seed,
                                 dtype=cfg.model.dtype, vllm_kwargs=r.vllm_kwargs)
    raise RolloutError(f"rollout.backend={r.backend!r}; expected hf or vllm")
