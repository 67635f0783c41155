"""Configuration schema: the ``sae:`` block (SPEC section 2) and the standalone
trainer's sections, as dataclasses.

Every key is validated and unknown keys are rejected with their full dotted
name, so a typo never silently falls back to a default::

    model:      base LLM (path, dtype, device)
    sae:        the SAE block (seed keys + extensions)
    data:       train/val files and field names
    embedding:  question embeddings from the frozen LLM
    rollout:    generation backend (hf | vllm) and decoding
    algorithm:  grpo | ppo | reinforce and their knobs
    reward:     built-in name, ``module.path:function`` or ``file.py:function``
    trainer:    steps, batch size, validation, checkpoints, output dir

``load_config(path, overrides=["sae.strength_scale=2", ...])`` reads YAML (or
JSON), applies dotted overrides (values parsed as YAML) and validates.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union

log = logging.getLogger(__name__)

STEERING_MODES = ("add", "set", "clamp", "scale", "ablate", "clamp_direction")
SCHEDULES = ("constant", "linear", "cosine")


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names the key."""


# --------------------------------------------------------------------------- schema helpers
def _fail(path: str, msg: str) -> None:
    raise ConfigError(f"{path}: {msg}")


def _finite(path: str, value: float) -> float:
    if not math.isfinite(value):
        _fail(path, f"{value} is not finite")
    return value


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against a type hint; returns the (lightly coerced) value."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Union:
        if value is None and type(None) in args:
            return None
        errors = []
        for sub in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, sub, path)
            except ConfigError as err:
                errors.append(str(err))
        reasons = "; ".join(errors)
        _fail(path, f"{value!r} does not fit {_type_name(tp)} ({reasons})")
    if origin is Literal:
        if value not in args:
            _fail(path, f"{value!r} is not one of {', '.join(repr(a) for a in args)}")
        return value
    if origin in (list, Sequence) or tp is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            _fail(path, f"expected a list, got {type(value).__name__} {value!r}")
        sub = args[0] if args else Any
        return [_coerce(v, sub, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            _fail(path, f"expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            _fail(path, f"expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            _fail(path, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(path, f"expected a number, got {value!r}")
        return _finite(path, float(value))
    if tp is str:
        if not isinstance(value, str):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)
            _fail(path, f"expected a string, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"config schema: unsupported type {tp!r} at {path}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def build(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys by name."""
    if data is None:
        data = {}
    if dataclasses.is_dataclass(data) and isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        _fail(path or cls.__name__, f"expected a mapping of keys, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = [k for k in data if k not in names]
    if unknown:
        key = f"{path}.{unknown[0]}" if path else str(unknown[0])
        raise ConfigError(f"unknown config key {key!r}; expected one of: {', '.join(names)}")
    kwargs = {}
    for name in names:
        if name in data:
            sub = f"{path}.{name}" if path else name
            kwargs[name] = _coerce(data[name], hints[name], sub)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{path or cls.__name__}: {err}") from err


class _Section:
    """Mixin: section name for error messages and a validate() hook."""

    _section = ""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        pass

    def _err(self, key: str, msg: str) -> None:
        _fail(f"{self._section}.{key}", msg)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- sections
@dataclass
class ModelConfig(_Section):
    """The frozen base LLM."""

    _section = "model"
    path: Optional[str] = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "auto"  # auto = cuda when available, else cpu
    trust_remote_code: bool = False

    def validate(self) -> None:
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            self._err("device", f"{self.device!r}; expected auto, cpu or cuda[:N]")


@dataclass
class SAEConfig(_Section):
    """The ``sae:`` block (seed keys first, then the extensions)."""

    _section = "sae"
    enable: bool = True
    model_path: Optional[str] = None
    hidden_size: Optional[int] = None  # checked against the LLM and the SAE at load
    num_features: Optional[int] = None  # features the predictor controls
    target_layer: Optional[int] = None  # effective default -1 (last layer)
    predictor_hidden_size: int = 1024
    predictor_layers: int = 2  # hidden layers of the MLP (0 = linear)
    max_strength: float = 5.0
    min_strength: float = -5.0
    strength_scale: float = 1.0
    enable_steering: bool = True  # runtime on/off; False = hooks attached, not steering
    # extensions
    target_layers: Optional[list[int]] = None
    selected_features: Optional[list[int]] = None
    strength_schedule: Literal["constant", "linear", "cosine"] = "constant"
    feature_idx: Optional[int] = None
    feature_idxs: Optional[list[int]] = None
    max_activation: Optional[float] = None
    max_activations: Optional[list[float]] = None
    strengths: Optional[list[float]] = None  # fixed strengths (generate / a validation row)
    mode: Literal["add", "set", "clamp", "scale", "ablate", "clamp_direction"] = "add"
    topk_mode: Literal["exact", "approx_relu"] = "exact"

    def validate(self) -> None:
        for key in ("hidden_size", "num_features", "predictor_hidden_size"):
            v = getattr(self, key)
            if v is not None and v < 1:
                self._err(key, f"{v} must be >= 1")
        if self.predictor_layers < 0:
            self._err("predictor_layers", f"{self.predictor_layers} must be >= 0")
        if self.min_strength > self.max_strength:
            self._err("min_strength", f"min_strength={self.min_strength} > max_strength="
                      f"{self.max_strength}; the bounds must satisfy min_strength <= max_strength")
        given = {k: getattr(self, k) for k in ("feature_idx", "feature_idxs", "selected_features")
                 if getattr(self, k) is not None}
        lists = {k: ([v] if k == "feature_idx" else list(v)) for k, v in given.items()}
        if len({tuple(v) for v in lists.values()}) > 1:
            self._err(next(iter(given)), f"{' and '.join(f'{k}={v}' for k, v in given.items())} "
                      "select different features; give one of them")
        feats = next(iter(lists.values()), None)
        if feats is not None:
            if not feats:
                self._err(next(iter(given)), "is empty; select at least one SAE feature")
            for i, f in enumerate(feats):
                if f < 0:
                    self._err(next(iter(given)), f"feature index {f} (position {i}) is negative")
            if len(set(feats)) != len(feats):
                dup = next(f for f in feats if feats.count(f) > 1)
                self._err(next(iter(given)), f"feature {dup} is selected twice")
            if self.num_features is not None and self.num_features != len(feats):
                self._err("num_features", f"num_features={self.num_features} but "
                          f"{next(iter(given))} selects {len(feats)} features {feats}; they must match")
        if self.max_activation is not None and self.max_activations is not None:
            self._err("max_activation", "give max_activation (one value) or max_activations "
                      "(one per feature), not both")
        n = self.resolved_num_features()
        for key in ("max_activations", "strengths"):
            vals = getattr(self, key)
            if vals is not None and n is not None and len(vals) not in (1, n):
                self._err(key, f"has {len(vals)} values for {n} features")
        if self.strengths is not None:
            lo, hi = self.min_strength, self.max_strength
            for i, s in enumerate(self.strengths):
                if not lo <= s <= hi:
                    self._err("strengths", f"strengths[{i}]={s} is outside [min_strength, "
                              f"max_strength] = [{lo}, {hi}]")
        if self.target_layers is not None:
            if not self.target_layers:
                self._err("target_layers", "is empty; give at least one layer or leave it unset")
            if len(set(self.target_layers)) != len(self.target_layers):
                self._err("target_layers", f"{self.target_layers} lists a layer twice")
            if self.target_layer is not None and self.target_layer not in self.target_layers:
                self._err("target_layer", f"target_layer={self.target_layer} is not in target_layers="
                          f"{self.target_layers}; target_layers wins when given, so drop one of them")

    # ---- resolved views
    def resolved_num_features(self) -> Optional[int]:
        feats = self.explicit_features()
        return len(feats) if feats is not None else self.num_features

    def explicit_features(self) -> Optional[list[int]]:
        if self.selected_features is not None:
            return list(self.selected_features)
        if self.feature_idxs is not None:
            return list(self.feature_idxs)
        if self.feature_idx is not None:
            return [self.feature_idx]
        return None

    @property
    def features(self) -> list[int]:
        """The selected SAE features (default: 0..num_features-1)."""
        feats = self.explicit_features()
        if feats is not None:
            return feats
        if self.num_features is None:
            raise ConfigError("sae: no features selected; set sae.selected_features (or "
                              "feature_idx / feature_idxs) or sae.num_features")
        return list(range(self.num_features))

    @property
    def layers(self) -> list[int]:
        if self.target_layers is not None:
            return list(self.target_layers)
        return [self.target_layer if self.target_layer is not None else -1]

    def effective_bounds(self) -> tuple[float, float]:
        """Bounds of the applied strengths: [min, max] times strength_scale."""
        a, b = self.min_strength * self.strength_scale, self.max_strength * self.strength_scale
        return (min(a, b), max(a, b))

    def max_activation_list(self) -> Optional[list[float]]:
        n = len(self.features)
        if self.max_activations is not None:
            return list(self.max_activations) * (n if len(self.max_activations) == 1 else 1)
        if self.max_activation is not None:
            return [self.max_activation] * n
        return None

    def steering_spec(self):
        """The SteeringSpec the rollout backends attach. Strengths handed to the
        backends are *effective* (already bounded and scaled), so the spec runs
        with scale 1 and the effective bounds."""
        from sae_fast.plan import SteeringSpec

        lo, hi = self.effective_bounds()
        return SteeringSpec(features=self.features, mode=self.mode,
                            max_activations=self.max_activation_list(), strength_scale=1.0,
                            min_strength=lo, max_strength=hi, topk_mode=self.topk_mode)

    def fixed_strengths(self) -> Optional[list[float]]:
        if self.strengths is None:
            return None
        n = len(self.features)
        vals = list(self.strengths) * (n if len(self.strengths) == 1 else 1)
        return [v * self.strength_scale for v in vals]


@dataclass
class DataConfig(_Section):
    _section = "data"
    train_files: list[str] = field(default_factory=list)
    val_files: list[str] = field(default_factory=list)
    prompt_key: Optional[str] = None  # default: prompt, then question
    answer_key: Optional[str] = None  # default: answer, ground_truth, reward_model.ground_truth
    max_train_samples: Optional[int] = None
    max_val_samples: Optional[int] = None
    chat_template: Literal["auto", "always", "never"] = "auto"

    def validate(self) -> None:
        for key in ("max_train_samples", "max_val_samples"):
            v = getattr(self, key)
            if v is not None and v < 1:
                self._err(key, f"{v} must be >= 1")


@dataclass
class EmbeddingConfig(_Section):
    _section = "embedding"
    source: Literal["hidden", "input_embeddings"] = "hidden"
    layer: Optional[int] = None  # default: the first steering layer
    max_length: int = 512
    batch_size: int = 16
    cache: bool = True
    exclude_special_tokens: bool = True

    def validate(self) -> None:
        for key in ("max_length", "batch_size"):
            if getattr(self, key) < 1:
                self._err(key, f"{getattr(self, key)} must be >= 1")


@dataclass
class RolloutConfig(_Section):
    _section = "rollout"
    backend: Literal["hf", "vllm"] = "hf"
    max_new_tokens: int = 64
    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    val_do_sample: bool = False
    val_temperature: float = 1.0
    max_batch: int = 64
    steer_prompt: bool = True
    max_prompt_length: int = 1024
    vllm_kwargs: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        for key in ("max_new_tokens", "max_batch", "max_prompt_length"):
            if getattr(self, key) < 1:
                self._err(key, f"{getattr(self, key)} must be >= 1")
        for key in ("temperature", "val_temperature"):
            if getattr(self, key) <= 0:
                self._err(key, f"{getattr(self, key)} must be > 0")
        if not 0 < self.top_p <= 1:
            self._err("top_p", f"{self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            self._err("top_k", f"{self.top_k} must be >= 0 (0 = off)")


@dataclass
class AlgorithmConfig(_Section):
    _section = "algorithm"
    name: Literal["grpo", "ppo", "reinforce"] = "grpo"
    n_samples: int = 4  # strength vectors sampled per question (GRPO group size)
    ppo_epochs: int = 4
    minibatch_size: Optional[int] = None  # None = the whole batch
    clip_ratio: float = 0.2
    entropy_coef: float = 0.0
    kl_coef: float = 0.0  # KL(previous policy || new policy) penalty
    value_coef: float = 0.5  # ppo only (value head baseline)
    lr: float = 3e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    init_log_std: float = 0.0  # log-std of the Gaussian in the pre-squash space
    min_log_std: float = -5.0
    max_log_std: float = 1.0
    normalize_advantages: bool = True
    baseline: Literal["mean", "ema", "none"] = "mean"  # reinforce only
    ema_decay: float = 0.9

    def validate(self) -> None:
        if self.n_samples < 1:
            self._err("n_samples", f"{self.n_samples} must be >= 1")
        if self.name == "grpo" and self.n_samples < 2:
            self._err("n_samples", f"grpo needs n_samples >= 2 to normalise within a group, got "
                      f"{self.n_samples}")
        if self.ppo_epochs < 1:
            self._err("ppo_epochs", f"{self.ppo_epochs} must be >= 1")
        if self.minibatch_size is not None and self.minibatch_size < 1:
            self._err("minibatch_size", f"{self.minibatch_size} must be >= 1")
        if not 0 < self.clip_ratio < 1:
            self._err("clip_ratio", f"{self.clip_ratio} must be in (0, 1)")
        for key in ("entropy_coef", "kl_coef", "value_coef", "weight_decay", "grad_clip"):
            if getattr(self, key) < 0:
                self._err(key, f"{getattr(self, key)} must be >= 0")
        if self.lr <= 0:
            self._err("lr", f"{self.lr} must be > 0")
        if self.min_log_std > self.max_log_std:
            self._err("min_log_std", f"{self.min_log_std} > max_log_std={self.max_log_std}")
        if not self.min_log_std <= self.init_log_std <= self.max_log_std:
            self._err("init_log_std", f"{self.init_log_std} is outside [min_log_std, max_log_std]"
                      f" = [{self.min_log_std}, {self.max_log_std}]")
        if not 0 <= self.ema_decay < 1:
            self._err("ema_decay", f"{self.ema_decay} must be in [0, 1)")


@dataclass
class RewardConfig(_Section):
    """``name``: a built-in (exact_match, gsm8k, keyword, token_preference,
    verl), ``module.path:function`` or ``path/to/file.py:function`` with verl's
    signature ``fn(data_source, solution_str, ground_truth, extra_info, **kwargs)``."""

    _section = "reward"
    name: str = "exact_match"
    kwargs: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if not self.name:
            self._err("name", "is empty")


@dataclass
class TrainerConfig(_Section):
    _section = "trainer"
    output_dir: str = "./sae_outputs"
    total_steps: Optional[int] = None  # default: total_epochs over the train set
    total_epochs: int = 1
    batch_size: int = 8  # questions per step
    val_every: int = 10  # steps; 0 = only before and after training
    val_before_train: bool = True
    save_every: int = 10
    keep_checkpoints: int = 3
    seed: int = 0
    progress_bar: bool = True
    plots: bool = True
    tensorboard: bool = True  # used when torch.utils.tensorboard imports
    val_constant_grid: Optional[list[float]] = None  # effective strengths; default 5 values
    final_eval: bool = True  # unsteered / random / best constant / learned table at the end
    # feature activations before/after steering in the final eval; default: on
    # where the rollout engine can record them (hf), off where it cannot (vllm,
    # verl); true with an engine that cannot is refused
    record_activations: Optional[bool] = None

    def validate(self) -> None:
        for key in ("total_epochs", "batch_size", "keep_checkpoints"):
            if getattr(self, key) < 1:
                self._err(key, f"{getattr(self, key)} must be >= 1")
        if self.total_steps is not None and self.total_steps < 0:
            self._err("total_steps", f"{self.total_steps} must be >= 0")
        for key in ("val_every", "save_every"):
            if getattr(self, key) < 0:
                self._err(key, f"{getattr(self, key)} must be >= 0 (0 = off)")


@dataclass
class Config(_Section):
    model: ModelConfig = field(default_factory=ModelConfig)
    sae: SAEConfig = field(default_factory=SAEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    @classmethod
    def from_dict(cls, data: Optional[dict]) -> "Config":
        return build(cls, data or {}, "")

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def check_for_training(self) -> None:
        """Cross-section checks that only matter for ``train``."""
        if not self.model.path:
            raise ConfigError("model.path: the base model is not set (--base-model-path)")
        if not self.data.train_files:
            raise ConfigError("data.train_files: no training data (--train-data)")
        if self.sae.enable:
            if not self.sae.model_path:
                raise ConfigError("sae.model_path: the SAE is not set (--sae-model-path), or "
                                  "run with --disable-sae")
            _ = self.sae.features  # raises when nothing is selected


# --------------------------------------------------------------------------- loading
def read_file(path: Union[str, Path]) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    text = p.read_text()
    try:
        if p.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as err:  # yaml.YAMLError / json.JSONDecodeError
        raise ConfigError(f"{p}: not valid {'JSON' if p.suffix == '.json' else 'YAML'} ({err})") \
            from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of sections, got {type(data).__name__}")
    return data


def set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"override key {key!r} is not a dotted name like sae.strength_scale")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {'.'.join(parts[:i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    import yaml

    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except Exception as err:
        raise ConfigError(f"override {text!r}: value {raw!r} is not valid YAML ({err})") from err
    return key.strip(), value


def load_config(path: Union[str, Path, None] = None, overrides: Optional[Sequence[str]] = None,
                values: Optional[dict[str, Any]] = None) -> Config:
    """Read ``path`` (YAML/JSON), apply ``overrides`` ("a.b=value" strings) and
    ``values`` ({"a.b": value}; CLI flags), validate, return a Config."""
    data = read_file(path) if path is not None else {}
    data = copy.deepcopy(data)
    for text in overrides or ():
        set_dotted(data, *parse_override(text))
    for key, value in (values or {}).items():
        set_dotted(data, key, value)
    return Config.from_dict(data)
