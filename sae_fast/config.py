"""Configuration schema: the ``sae:`` block (SPEC section 2) and the standalone
trainer's sections, as pydantic v2 models.

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

Why pydantic v2 (and not OmegaConf structured configs): the vLLM server block
(``sae_fast.backends.vllm_engine.config``) already uses it; its errors carry a
location tuple that :func:`_describe` turns into the dotted key and the bad
value (``rollout.top_p = 1.5: ...``); and ``extra="forbid"``, ``Literal`` types,
``Field`` bounds and ``allow_inf_nan=False`` state the schema without
hand-written checks. Models are ``strict``: a number for a ``str`` field, a
string for a number or ``"yes"`` for a bool is refused, never converted (an
int is still accepted for a float). verl's own config is OmegaConf; it reaches
these models as plain dicts (``OmegaConf.to_container``) in
``integrations/verl/sae_fast_verl/config.py``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Optional, Sequence, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sae_fast.request import DEFAULT_MODE, Mode, Schedule, TopKMode


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names the key."""


class _Refused(ValueError):
    """Raised by a cross-field check: ``key`` is the field it blames."""

    def __init__(self, key: str, msg: str) -> None:
        super().__init__(msg)
        self.key, self.msg = key, msg


# --------------------------------------------------------------------------- errors
def _dotted(prefix: str, loc: Sequence[Any]) -> str:
    out = prefix
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _describe(err: ValidationError, root: type, prefix: str = "") -> str:
    """One line per pydantic error, each naming the full dotted key."""
    parts = []
    for e in err.errors():
        loc, cause = tuple(e.get("loc", ())), (e.get("ctx") or {}).get("error")
        if isinstance(cause, _Refused):
            parts.append(f"{_dotted(prefix, loc + (cause.key,))}: {cause.msg}")
        elif e.get("type") == "extra_forbidden":
            model = root
            for part in loc[:-1]:
                model = model.model_fields[part].annotation
            parts.append(f"unknown config key {_dotted(prefix, loc)!r}; expected one of: "
                         f"{', '.join(model.model_fields)}")
        else:
            parts.append(f"{_dotted(prefix, loc) or root.__name__} = {e.get('input')!r}: "
                         f"{e.get('msg', 'invalid')}")
    return "; ".join(parts)


def build(cls: type, data: Any, path: str = "") -> Any:
    """Validate model ``cls`` from a mapping; errors name ``path.key``."""
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or cls.__name__}: expected a mapping of keys, got "
                          f"{type(data).__name__} {data!r}")
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_describe(err, cls, path)) from None


class _Section(BaseModel):
    """A config section: strict, closed, finite; errors are ConfigError."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False,
                              validate_assignment=True)
    _section: ClassVar[str] = ""

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as err:
            raise ConfigError(_describe(err, type(self), self._section)) from None

    # Only direct construction comes through __init__: nested sections and
    # model_validate() keep pydantic's own path (whole location tuples).
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]

    def __setattr__(self, name: str, value: Any) -> None:
        old = self.__dict__.get(name)
        try:
            super().__setattr__(name, value)
        except ValidationError as err:
            if name in self.__dict__:  # pydantic keeps a value its model validator refused
                self.__dict__[name] = old
            raise ConfigError(_describe(err, type(self), self._section)) from None

    def to_dict(self) -> dict:
        return self.model_dump()


# --------------------------------------------------------------------------- sections
class ModelConfig(_Section):
    """The frozen base LLM."""

    _section: ClassVar[str] = "model"
    path: Optional[str] = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")  # auto = cuda if available
    trust_remote_code: bool = False


FeatureIndex = Annotated[int, Field(ge=0)]


class SAEConfig(_Section):
    """The ``sae:`` block (seed keys first, then the extensions)."""

    _section: ClassVar[str] = "sae"
    enable: bool = True
    model_path: Optional[str] = None
    hidden_size: Optional[int] = Field(None, ge=1)  # checked against the LLM and the SAE at load
    num_features: Optional[int] = Field(None, ge=1)  # features the predictor controls
    target_layer: Optional[int] = None  # effective default -1 (last layer)
    predictor_hidden_size: int = Field(1024, ge=1)
    predictor_layers: int = Field(2, ge=0)  # hidden layers of the MLP (0 = linear)
    max_strength: float = 5.0
    min_strength: float = -5.0
    strength_scale: float = 1.0
    enable_steering: bool = True  # runtime on/off; False = hooks attached, not steering
    # extensions
    target_layers: Optional[list[int]] = Field(None, min_length=1)
    selected_features: Optional[list[FeatureIndex]] = Field(None, min_length=1)
    strength_schedule: Schedule = "constant"
    feature_idx: Optional[int] = Field(None, ge=0)
    feature_idxs: Optional[list[FeatureIndex]] = Field(None, min_length=1)
    max_activation: Optional[float] = None
    max_activations: Optional[list[float]] = None
    strengths: Optional[list[float]] = None  # fixed strengths (generate / a validation row)
    mode: Mode = DEFAULT_MODE
    topk_mode: TopKMode = "exact"

    @model_validator(mode="after")
    def _cross_checks(self) -> "SAEConfig":
        if self.min_strength > self.max_strength:
            raise _Refused("min_strength", f"min_strength={self.min_strength} > max_strength="
                           f"{self.max_strength}; the bounds must satisfy min_strength <= "
                           "max_strength")
        given = {k: getattr(self, k) for k in ("feature_idx", "feature_idxs", "selected_features")
                 if getattr(self, k) is not None}
        lists = {k: ([v] if k == "feature_idx" else list(v)) for k, v in given.items()}
        first = next(iter(given), None)
        if len({tuple(v) for v in lists.values()}) > 1:
            raise _Refused(first, f"{' and '.join(f'{k}={v}' for k, v in given.items())} "
                           "select different features; give one of them")
        feats = lists.get(first)
        if feats is not None:
            if len(set(feats)) != len(feats):
                dup = next(f for f in feats if feats.count(f) > 1)
                raise _Refused(first, f"feature {dup} is selected twice")
            if self.num_features is not None and self.num_features != len(feats):
                raise _Refused("num_features", f"num_features={self.num_features} but {first} "
                               f"selects {len(feats)} features {feats}; they must match")
        if self.max_activation is not None and self.max_activations is not None:
            raise _Refused("max_activation", "give max_activation (one value) or "
                           "max_activations (one per feature), not both")
        n = self.resolved_num_features()
        for key in ("max_activations", "strengths"):
            vals = getattr(self, key)
            if vals is not None and n is not None and len(vals) not in (1, n):
                raise _Refused(key, f"has {len(vals)} values for {n} features")
        lo, hi = self.min_strength, self.max_strength
        for i, s in enumerate(self.strengths or ()):
            if not lo <= s <= hi:
                raise _Refused("strengths", f"strengths[{i}]={s} is outside [min_strength, "
                               f"max_strength] = [{lo}, {hi}]")
        if self.target_layers is not None:
            if len(set(self.target_layers)) != len(self.target_layers):
                raise _Refused("target_layers", f"{self.target_layers} lists a layer twice")
            if self.target_layer is not None and self.target_layer not in self.target_layers:
                raise _Refused("target_layer", f"target_layer={self.target_layer} is not in "
                               f"target_layers={self.target_layers}; target_layers wins when "
                               "given, so drop one of them")
        return self

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


class DataConfig(_Section):
    _section: ClassVar[str] = "data"
    train_files: list[str] = Field(default_factory=list)
    val_files: list[str] = Field(default_factory=list)
    prompt_key: Optional[str] = None  # default: prompt, then question
    answer_key: Optional[str] = None  # default: answer, ground_truth, reward_model.ground_truth
    max_train_samples: Optional[int] = Field(None, ge=1)
    max_val_samples: Optional[int] = Field(None, ge=1)
    chat_template: Literal["auto", "always", "never"] = "auto"


class EmbeddingConfig(_Section):
    _section: ClassVar[str] = "embedding"
    source: Literal["hidden", "input_embeddings"] = "hidden"
    layer: Optional[int] = None  # default: the first steering layer
    max_length: int = Field(512, ge=1)
    batch_size: int = Field(16, ge=1)
    cache: bool = True
    exclude_special_tokens: bool = True
    # mean: over the prompt's tokens; last: the hidden state of the last prompt token (it
    # has read the whole prompt; a mean is dominated by a long shared chat template)
    pool: Literal["mean", "last"] = "mean"
    # standardise the predictor's input per dimension by the training questions' mean and
    # std (StrengthPredictor.fit_input_stats): questions that share a long chat template
    # differ in a small part of their mean-pooled hidden state. Off by default: on the
    # sentiment task at lr 1e-2 it drove strengths to the bounds (issue 15 notes)
    standardize: bool = False


class RolloutConfig(_Section):
    _section: ClassVar[str] = "rollout"
    backend: Literal["hf", "vllm"] = "hf"
    max_new_tokens: int = Field(64, ge=1)
    do_sample: bool = True
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # 0 = off
    val_do_sample: bool = False
    val_temperature: float = Field(1.0, gt=0)
    max_batch: int = Field(64, ge=1)
    steer_prompt: bool = True
    max_prompt_length: int = Field(1024, ge=1)
    vllm_kwargs: dict[str, Any] = Field(default_factory=dict)


class AlgorithmConfig(_Section):
    _section: ClassVar[str] = "algorithm"
    name: Literal["grpo", "ppo", "reinforce"] = "grpo"
    n_samples: int = Field(4, ge=1)  # strength vectors sampled per question (GRPO group size)
    ppo_epochs: int = Field(4, ge=1)
    minibatch_size: Optional[int] = Field(None, ge=1)  # None = the whole batch
    clip_ratio: float = Field(0.2, gt=0, lt=1)
    entropy_coef: float = Field(0.0, ge=0)
    kl_coef: float = Field(0.0, ge=0)  # KL(previous policy || new policy) penalty
    value_coef: float = Field(0.5, ge=0)  # ppo only (value head baseline)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    init_log_std: float = 0.0  # log-std of the Gaussian in the pre-squash space
    min_log_std: float = -5.0
    max_log_std: float = 1.0
    # The exploration std. With a std that does not shrink, GRPO maximises the reward
    # smoothed by its own sampling noise, E_{s ~ N(mu, sigma)} r(s), whose optimum lies away
    # from the deterministic one wherever r falls off steeply on one side (over-steering);
    # on the sentiment task one Adam-updated log_std moved -1.00 -> -1.08 in 38 steps.
    #   final_log_std: anneal log_std linearly from init_log_std (step 1) to this value
    #                  (the last step); log_std is then a schedule, not learned
    #   log_std_lr:    learn log_std with its own learning rate (default: lr)
    final_log_std: Optional[float] = None
    log_std_lr: Optional[float] = Field(None, gt=0)
    normalize_advantages: bool = True
    baseline: Literal["mean", "ema", "none"] = "mean"  # reinforce only
    ema_decay: float = Field(0.9, ge=0, lt=1)

    @model_validator(mode="after")
    def _cross_checks(self) -> "AlgorithmConfig":
        if self.name == "grpo" and self.n_samples < 2:
            raise _Refused("n_samples", "grpo needs n_samples >= 2 to normalise within a "
                           f"group, got {self.n_samples}")
        if self.min_log_std > self.max_log_std:
            raise _Refused("min_log_std", f"{self.min_log_std} > max_log_std={self.max_log_std}")
        if not self.min_log_std <= self.init_log_std <= self.max_log_std:
            raise _Refused("init_log_std", f"{self.init_log_std} is outside [min_log_std, "
                           f"max_log_std] = [{self.min_log_std}, {self.max_log_std}]")
        if self.final_log_std is not None:
            if not self.min_log_std <= self.final_log_std <= self.max_log_std:
                raise _Refused("final_log_std", f"{self.final_log_std} is outside [min_log_std, "
                               f"max_log_std] = [{self.min_log_std}, {self.max_log_std}]")
            if self.log_std_lr is not None:
                raise _Refused("log_std_lr", f"{self.log_std_lr} is set, but final_log_std="
                               f"{self.final_log_std} makes log_std a schedule that is not "
                               "learned; set one of the two")
        return self


class RewardConfig(_Section):
    """``name``: a built-in (exact_match, gsm8k, keyword, token_preference,
    verl), ``module.path:function`` or ``path/to/file.py:function`` with verl's
    signature ``fn(data_source, solution_str, ground_truth, extra_info, **kwargs)``."""

    _section: ClassVar[str] = "reward"
    name: str = Field("exact_match", min_length=1)
    kwargs: dict[str, Any] = Field(default_factory=dict)
    # combined reward = concept (the function above)
    #   - fluency_weight * max(0, NLL of the completion - NLL of the unsteered completion)
    #   - repetition_weight * repeated n-gram share (1 - distinct-n)
    # NLL: mean per-token, in nats, under the frozen unsteered model (sae_fast.train.fluency)
    fluency_weight: float = Field(0.0, ge=0)
    repetition_weight: float = Field(0.0, ge=0)
    repetition_n: int = Field(2, ge=1)


class TrainerConfig(_Section):
    _section: ClassVar[str] = "trainer"
    output_dir: str = "./sae_outputs"
    total_steps: Optional[int] = Field(None, ge=0)  # default: total_epochs over the train set
    total_epochs: int = Field(1, ge=1)
    batch_size: int = Field(8, ge=1)  # questions per step
    val_every: int = Field(10, ge=0)  # steps; 0 = only before and after training
    val_before_train: bool = True
    save_every: int = Field(10, ge=0)  # 0 = off
    keep_checkpoints: int = Field(3, ge=1)
    seed: int = 0
    progress_bar: bool = True
    plots: bool = True
    tensorboard: bool = True  # used when torch.utils.tensorboard imports
    val_constant_grid: Optional[list[float]] = None  # effective strengths; default 9 values
    # the best constant is chosen on this many training questions (a split separate from the
    # reported validation set); 0 = on the validation set itself (optimistic, labelled so)
    constant_select_size: int = Field(32, ge=0)
    samples: int = Field(4, ge=0)  # validation prompts shown side by side in samples.md
    # keep the predictor of the step (0, every val_every, the last) that scores best on the
    # constant_select_size training questions, the same split the best constant is chosen
    # on; the final table reports that predictor (the last step's stays in checkpoints/)
    keep_best: bool = False
    final_eval: bool = True  # unsteered / random / best constant / learned table at the end
    # feature activations before/after steering in the final eval; default: on
    # where the rollout engine can record them (hf), off where it cannot (vllm,
    # verl); true with an engine that cannot is refused
    record_activations: Optional[bool] = None


class Config(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    sae: SAEConfig = Field(default_factory=SAEConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    embedding: EmbeddingConfig = Field(default_factory=EmbeddingConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)

    @model_validator(mode="before")
    @classmethod
    def _empty_sections(cls, data: Any) -> Any:
        # a YAML section whose keys are all commented out reads as None: its defaults
        if isinstance(data, dict):
            return {k: ({} if v is None else v) for k, v in data.items()}
        return data

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
