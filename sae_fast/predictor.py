"""Strength predictor: an MLP from a question embedding to per-feature steering
strengths, with a Gaussian policy head for RL exploration.

The policy lives in an unbounded pre-squash space ``u``::

    u ~ Normal(mean(e), exp(log_std))          (log_std: learned, per feature)
    strength = strength_scale * (min + (max - min) * (tanh(u) + 1) / 2)

so sampled strengths always lie inside the bounds and the squash does not
depend on the parameters: log-prob ratios of the strength actions equal those
of ``u`` (the tanh Jacobian cancels), which is what PPO/GRPO need. At
evaluation the deterministic strength is the squashed mean.

    pred = StrengthPredictor(PredictorConfig(input_dim=576, num_features=8))
    pred.attach_embedder(embedder)               # the frozen LLM (no grad)
    strengths = pred.predict_strengths(input_ids=ids, attention_mask=mask)   # [B, 8]
    pred.save("out/predictor"); StrengthPredictor.load("out/predictor")

Only the predictor has trainable parameters; the embedder (frozen LLM) is held
by reference and is never a submodule, so ``pred.parameters()`` is exactly
what an optimizer should see.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from sae_fast.checks import atomic_write, finite

log = logging.getLogger(__name__)

WEIGHTS_FILE = "predictor.safetensors"
CONFIG_FILE = "predictor_config.json"
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh, "silu": nn.SiLU}


class PredictorError(ValueError):
    """Bad predictor configuration, input or saved file."""


@dataclass
class PredictorConfig:
    input_dim: int
    num_features: int
    hidden_size: int = 1024
    num_layers: int = 2  # hidden layers (0 = a linear map)
    min_strength: float = -5.0
    max_strength: float = 5.0
    strength_scale: float = 1.0
    init_log_std: float = 0.0
    min_log_std: float = -5.0
    max_log_std: float = 1.0
    activation: str = "gelu"
    value_head: bool = False  # a critic for PPO (shares the trunk)
    # Metadata to reuse the predictor later (generate, verl): what it steers
    # and how its input embedding is computed.
    features: Optional[list[int]] = None
    steering: dict = field(default_factory=dict)
    embedding: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key in ("input_dim", "num_features", "hidden_size"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise PredictorError(f"{key}={v!r} must be a positive integer")
        if not isinstance(self.num_layers, int) or self.num_layers < 0:
            raise PredictorError(f"num_layers={self.num_layers!r} must be an integer >= 0")
        for key in ("min_strength", "max_strength", "strength_scale", "init_log_std",
                    "min_log_std", "max_log_std"):
            setattr(self, key, finite(getattr(self, key), key, PredictorError))
        if self.min_strength > self.max_strength:
            raise PredictorError(f"min_strength={self.min_strength} > max_strength={self.max_strength}")
        if self.min_log_std > self.max_log_std:
            raise PredictorError(f"min_log_std={self.min_log_std} > max_log_std={self.max_log_std}")
        if self.activation not in ACTIVATIONS:
            raise PredictorError(f"activation={self.activation!r}; expected one of {sorted(ACTIVATIONS)}")
        if self.features is not None:
            self.features = [int(f) for f in self.features]
            if len(self.features) != self.num_features:
                raise PredictorError(f"num_features={self.num_features} but features lists "
                                     f"{len(self.features)} features {self.features}")

    @classmethod
    def from_sae_config(cls, sae_cfg: Any, input_dim: int, **kw: Any) -> "PredictorConfig":
        """From a :class:`sae_fast.config.SAEConfig` (the ``sae:`` block)."""
        feats = sae_cfg.features
        steering = dict(mode=sae_cfg.mode, layers=sae_cfg.layers,
                        max_activations=sae_cfg.max_activation_list(),
                        strength_schedule=sae_cfg.strength_schedule, topk_mode=sae_cfg.topk_mode,
                        sae_model_path=sae_cfg.model_path)
        return cls(input_dim=int(input_dim), num_features=len(feats),
                   hidden_size=sae_cfg.predictor_hidden_size, num_layers=sae_cfg.predictor_layers,
                   min_strength=sae_cfg.min_strength, max_strength=sae_cfg.max_strength,
                   strength_scale=sae_cfg.strength_scale, features=feats, steering=steering, **kw)

    def effective_bounds(self) -> tuple[float, float]:
        a, b = self.min_strength * self.strength_scale, self.max_strength * self.strength_scale
        return (min(a, b), max(a, b))


@dataclass
class PolicyOutput:
    mean: torch.Tensor  # [B, k] pre-squash mean
    log_std: torch.Tensor  # [k] (broadcast over B)
    value: Optional[torch.Tensor] = None  # [B] (value head)

    def distribution(self) -> torch.distributions.Normal:
        return torch.distributions.Normal(self.mean, self.log_std.exp().expand_as(self.mean))


class StrengthPredictor(nn.Module):
    """MLP question embedding -> bounded per-feature strengths (+ Gaussian policy)."""

    def __init__(self, config: PredictorConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        # Embeddings from different layers / models differ in scale by orders of
        # magnitude (a few positions carry huge norms); a parameter-free
        # LayerNorm keeps the MLP's input well conditioned whatever the source.
        self.norm = nn.LayerNorm(c.input_dim, elementwise_affine=False)
        # Per-dimension standardisation over the training questions (fit_input_stats):
        # mean-pooled hidden states of chat prompts share a large common part (the
        # template and system prompt), so questions differ in a small subspace that
        # the per-sample LayerNorm alone leaves swamped. Identity until fitted.
        self.register_buffer("input_mean", torch.zeros(c.input_dim))
        self.register_buffer("input_scale", torch.ones(c.input_dim))
        layers: list[nn.Module] = []
        width = c.input_dim
        for _ in range(c.num_layers):
            layers += [nn.Linear(width, c.hidden_size), ACTIVATIONS[c.activation]()]
            width = c.hidden_size
        self.trunk = nn.Sequential(*layers)
        self.mean_head = nn.Linear(width, c.num_features)
        # Start at the middle of the bounds with a small spread of means, so the
        # first rollouts explore around one point rather than at random extremes.
        with torch.no_grad():
            self.mean_head.weight.mul_(0.01)
            self.mean_head.bias.zero_()
        self.log_std = nn.Parameter(torch.full((c.num_features,), c.init_log_std))
        self.value_head = nn.Linear(width, 1) if c.value_head else None
        self._embedder: Any = None  # frozen LLM embedder, held by reference only
        self._cache: dict[Any, torch.Tensor] = {}
        self._cache_version: tuple = ()

    # ------------------------------------------------------------------ core
    @property
    def num_features(self) -> int:
        return self.config.num_features

    def forward(self, embeddings: torch.Tensor) -> PolicyOutput:
        x = self._check_input(embeddings)
        h = self.trunk(self.norm((x - self.input_mean) / self.input_scale))
        mean = self.mean_head(h)
        log_std = self.log_std.clamp(self.config.min_log_std, self.config.max_log_std)
        value = self.value_head(h).squeeze(-1) if self.value_head is not None else None
        return PolicyOutput(mean=mean, log_std=log_std, value=value)

    def _check_input(self, embeddings: torch.Tensor) -> torch.Tensor:
        if not isinstance(embeddings, torch.Tensor):
            raise PredictorError(f"embeddings must be a tensor [B, {self.config.input_dim}], got "
                                 f"{type(embeddings).__name__}")
        if embeddings.dim() == 1:
            embeddings = embeddings[None]
        if embeddings.dim() != 2 or embeddings.shape[-1] != self.config.input_dim:
            raise PredictorError(f"embeddings have shape {tuple(embeddings.shape)}, expected "
                                 f"[B, {self.config.input_dim}] (input_dim of this predictor)")
        p = self.mean_head.weight
        x = embeddings.to(device=p.device, dtype=p.dtype)
        if not bool(torch.isfinite(x).all()):
            raise PredictorError("embeddings contain NaN/inf; the frozen LLM produced non-finite "
                                 "hidden states for this input")
        return x

    @torch.no_grad()
    def fit_input_stats(self, embeddings: torch.Tensor, eps: float = 1e-6) -> None:
        """Standardise inputs per dimension by the mean and std of ``embeddings``
        (the training questions'); saved with the predictor."""
        x = self._check_input(embeddings).float()
        if x.shape[0] < 2:
            raise PredictorError(f"fit_input_stats needs at least 2 embeddings, got {x.shape[0]}")
        self.input_mean.copy_(x.mean(0))
        # a floor relative to the typical spread keeps constant dimensions from blowing up
        std = x.std(0)
        self.input_scale.copy_(std.clamp_min(max(float(std.mean()) * 1e-2, eps)))

    def squash(self, u: torch.Tensor) -> torch.Tensor:
        """Pre-squash actions -> effective strengths (bounded, scaled)."""
        c = self.config
        unit = (torch.tanh(u) + 1.0) * 0.5
        return (c.min_strength + (c.max_strength - c.min_strength) * unit) * c.strength_scale

    def unsquash(self, strengths: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
        """Effective strengths -> pre-squash actions (inverse of :meth:`squash`)."""
        c = self.config
        if c.strength_scale == 0 or c.max_strength == c.min_strength:
            return torch.zeros_like(strengths)
        unit = (strengths / c.strength_scale - c.min_strength) / (c.max_strength - c.min_strength)
        return torch.atanh((unit * 2.0 - 1.0).clamp(-1 + eps, 1 - eps))

    def mean_strengths(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Deterministic strengths (the squashed mean) [B, k]."""
        return self.squash(self(embeddings).mean)

    def sample(self, embeddings: torch.Tensor, n: int = 1,
               generator: Optional[torch.Generator] = None) -> dict[str, torch.Tensor]:
        """Sample ``n`` strength vectors per question for exploration.

        Returns (rows ordered question-major: q0s0, q0s1, ..., q1s0, ...):
        ``u`` [B*n, k] pre-squash actions, ``strengths`` [B*n, k] effective,
        ``log_prob`` [B*n] (sum over features), ``mean``/``log_std`` of the
        sampling policy (for a KL to it later)."""
        with torch.no_grad():
            out = self(embeddings)
            mean = out.mean.repeat_interleave(n, dim=0)
            pi = self.policy(mean, out.log_std)
            noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype,
                                device="cpu" if generator is None else generator.device)
            u = mean + pi.base_dist.scale * noise.to(mean.device)  # seeded: rsample has no generator
            logp = pi.log_prob(u)
        return {"u": u, "strengths": self.squash(u), "log_prob": logp, "mean": mean,
                "log_std": out.log_std.detach().clone().expand_as(mean).contiguous()}

    @staticmethod
    def policy(mean: torch.Tensor, log_std: torch.Tensor) -> torch.distributions.Distribution:
        """The exploration policy over pre-squash actions: a diagonal Gaussian
        (``Independent(Normal)``, so log_prob / entropy / KL sum over features)."""
        return torch.distributions.Independent(
            torch.distributions.Normal(mean, log_std.exp().expand_as(mean)), 1)

    # ------------------------------------------------------------------ user API
    def attach_embedder(self, embedder: Any) -> "StrengthPredictor":
        """Use ``embedder`` (a frozen-LLM QuestionEmbedder) for predict_strengths."""
        self._embedder = embedder
        return self

    @torch.no_grad()
    def predict_strengths(self, input_ids: Optional[torch.Tensor] = None,
                          attention_mask: Optional[torch.Tensor] = None, *,
                          texts: Optional[list[str]] = None,
                          embeddings: Optional[torch.Tensor] = None,
                          sample: bool = False, use_cache: bool = True) -> torch.Tensor:
        """Per-question strengths [B, num_features] (bounded, scaled).

        Give ``input_ids`` (+ ``attention_mask``) or ``texts`` (both embedded
        with the attached frozen-LLM embedder), or precomputed ``embeddings``.
        Deterministic (the policy mean) unless ``sample=True``. Predictions for
        token sequences seen before come from a cache (``use_cache``)."""
        if embeddings is None:
            if self._embedder is None:
                raise PredictorError("predict_strengths needs embeddings=..., or an embedder: "
                                     "call attach_embedder(QuestionEmbedder(model, tokenizer))")
            if texts is not None:
                embeddings = self._embedder.embed_texts(texts)
            elif input_ids is not None:
                if sample or not use_cache:
                    embeddings = self._embedder.embed_ids(input_ids, attention_mask)
                else:
                    return self._cached_predict(input_ids, attention_mask)
            else:
                raise PredictorError("predict_strengths needs input_ids, texts or embeddings")
        if sample:
            return self.sample(embeddings)["strengths"]
        return self.mean_strengths(embeddings)

    def _weights_version(self) -> tuple:
        # In-place optimizer updates bump each parameter's version counter, so a
        # changed predictor never serves stale cached strengths.
        return tuple(p._version for p in self.parameters()) + tuple(id(p) for p in self.parameters())

    def _cached_predict(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]):
        version = self._weights_version()
        if self._cache_version != version:
            self._cache.clear()
            self._cache_version = version
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        keys = [tuple(ids[m.bool()].tolist()) for ids, m in zip(input_ids.cpu(), attention_mask.cpu())]
        missing = [i for i, k in enumerate(keys) if k not in self._cache]
        if missing:
            emb = self._embedder.embed_ids(input_ids[missing], attention_mask[missing])
            strengths = self.mean_strengths(emb).detach()
            for j, i in enumerate(missing):
                self._cache[keys[i]] = strengths[j]
        return torch.stack([self._cache[k] for k in keys])

    def clear_cache(self) -> None:
        """Drop cached predictions (call after the weights change)."""
        self._cache.clear()

    def num_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())

    # ------------------------------------------------------------------ persistence
    def save(self, folder: Union[str, Path]) -> Path:
        """Write ``predictor.safetensors`` + ``predictor_config.json`` atomically."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        cfg = json.dumps(asdict(self.config), indent=2)
        atomic_write(folder / WEIGHTS_FILE, lambda p: save_file(state, p, metadata={"format": "pt"}))
        atomic_write(folder / CONFIG_FILE, cfg)
        return folder

    @classmethod
    def load(cls, folder: Union[str, Path],
             device: Union[str, torch.device] = "cpu") -> "StrengthPredictor":
        folder = Path(folder)
        cfg_path, w_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
        for p in (cfg_path, w_path):
            if not p.is_file():
                raise PredictorError(f"{folder}: no {p.name}; expected a predictor folder with "
                                     f"{CONFIG_FILE} and {WEIGHTS_FILE}")
        try:
            raw = json.loads(cfg_path.read_text())
            config = PredictorConfig(**raw)
        except (json.JSONDecodeError, TypeError) as err:
            raise PredictorError(f"{cfg_path}: not a valid predictor config ({err})") from err
        try:
            from safetensors.torch import load_file

            state = load_file(str(w_path), device="cpu")
        except Exception as err:  # safetensors raises its own types
            raise PredictorError(f"{w_path}: not a readable safetensors file ({err})") from err
        model = cls(config)
        for name in ("input_mean", "input_scale"):  # predictors saved before the stats: identity
            state.setdefault(name, getattr(model, name).clone())
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise PredictorError(f"{w_path}: weights do not match {cfg_path} ({err})") from err
        return model.to(device)


def build_predictor(sae_cfg: Any, input_dim: int, algorithm: Any = None) -> StrengthPredictor:
    """A fresh predictor for the ``sae:`` block (and the algorithm's std settings)."""
    kw: dict[str, Any] = {}
    if algorithm is not None:
        kw = dict(init_log_std=algorithm.init_log_std, min_log_std=algorithm.min_log_std,
                  max_log_std=algorithm.max_log_std, value_head=algorithm.name == "ppo")
    return StrengthPredictor(PredictorConfig.from_sae_config(sae_cfg, input_dim, **kw))
