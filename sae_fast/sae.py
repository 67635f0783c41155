"""Frozen SAE weights: one container, loaded from a sae-lens folder without
importing sae-lens, validated once with errors that name the file and the
mismatch.

Supported architectures: ``standard`` (ReLU), ``jumprelu`` and ``topk``.
sae-lens flags that change encode/decode are honoured or refused:

- ``apply_b_dec_to_input``: honoured (folded into the effective encoder bias
  of a plan).
- ``normalize_activations``: ``none`` and ``expected_average_only_in`` are
  identity at inference in sae-lens (the scaling factor is folded into the
  weights at save time), so they are accepted; ``constant_norm_rescale`` and
  ``layer_norm`` rescale every token by its own norm and are refused.
- TopK ``rescale_acts_by_decoder_norm``: folded at load time (encoder columns
  and bias multiplied by the decoder row norms, decoder rows divided by them),
  which leaves encode, decode and the top-k selection of sae-lens unchanged.
- ``reshape_activations`` other than ``none`` (attention ``hook_z`` SAEs):
  refused.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Union

import torch

log = logging.getLogger(__name__)

ARCHITECTURES = ("standard", "jumprelu", "topk")
IDENTITY_NORMALISATIONS = ("none", "expected_average_only_in", None)
CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"


class SAELoadError(ValueError):
    """An SAE could not be loaded or does not fit the model it is attached to."""


def layer_of_hook(hook_name: Optional[str], source: str = "") -> Optional[int]:
    """See :attr:`SAEWeights.hook_layer`."""
    if not hook_name:
        return None
    where = f" ({source})" if source else ""
    m = re.fullmatch(r"blocks\.(\d+)\.hook_resid_(pre|post)", hook_name)
    if m:
        layer = int(m.group(1)) - (1 if m.group(2) == "pre" else 0)
        if layer < 0:
            raise SAELoadError(f"hook_name {hook_name!r}{where} reads the embeddings (the input "
                               "of block 0), which no decoder-layer hook can steer; pass layer=... "
                               "explicitly if you mean another point of the residual stream")
        return layer
    m = re.fullmatch(r"(?:model\.layers|model\.decoder\.layers|model\.language_model\.layers|"
                     r"transformer\.h|gpt_neox\.layers|transformer\.layers|layers)\.(\d+)",
                     hook_name)
    if m:
        return int(m.group(1))
    raise SAELoadError(f"hook_name {hook_name!r}{where} is not the residual stream after a "
                       "decoder layer (understood: blocks.L.hook_resid_post, "
                       "blocks.L.hook_resid_pre, model.layers.L); pass layer=... explicitly")


@dataclass(frozen=True)
class SAEWeights:
    """Canonical (folded) SAE weights. Never trained: every tensor is frozen."""

    W_enc: torch.Tensor  # [d_in, d_sae]
    b_enc: torch.Tensor  # [d_sae]
    W_dec: torch.Tensor  # [d_sae, d_in]
    b_dec: torch.Tensor  # [d_in]
    architecture: str = "standard"
    threshold: Optional[torch.Tensor] = None  # [d_sae] (jumprelu)
    k: Optional[int] = None  # topk
    apply_b_dec_to_input: bool = True
    hook_name: Optional[str] = None
    source: str = "<memory>"
    cfg: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        validate(self)

    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def d_sae(self) -> int:
        return int(self.W_enc.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    @property
    def hook_layer(self) -> Optional[int]:
        """The decoder layer whose *output* this SAE reads, from its hook name,
        or None when there is no hook name:

        * ``blocks.L.hook_resid_post``, ``model.layers.L``, ``transformer.h.L``: L;
        * ``blocks.L.hook_resid_pre``: L - 1 (the input of block L is the output
          of layer L - 1; ``blocks.0.hook_resid_pre`` reads the embeddings,
          which no decoder-layer hook can steer: refused);
        * anything else (``hook_resid_mid``, ``hook_mlp_out``, a submodule...)
          is refused with an error naming it, never guessed."""
        return layer_of_hook(self.hook_name, str(self.source))

    def default_layer(self) -> int:
        """Where steering goes when no layer is given: :attr:`hook_layer`, else
        the last decoder layer (-1)."""
        layer = self.hook_layer
        return -1 if layer is None else layer

    def to(self, device: Union[str, torch.device, None] = None,
           dtype: Optional[torch.dtype] = None) -> "SAEWeights":
        def mv(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else t.to(device=device, dtype=dtype)

        return replace(self, W_enc=mv(self.W_enc), b_enc=mv(self.b_enc), W_dec=mv(self.W_dec),
                       b_dec=mv(self.b_dec), threshold=mv(self.threshold))

    def parameters(self) -> list[torch.Tensor]:
        return [t for t in (self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.threshold)
                if t is not None]

    def decoder_norms(self) -> torch.Tensor:
        return self.W_dec.float().norm(dim=-1)

    def check_hidden_size(self, hidden_size: int, layer: Any = None) -> None:
        """Raise if the SAE's d_in differs from the model's hidden size."""
        if self.d_in != hidden_size:
            where = f" at layer {layer}" if layer is not None else ""
            raise SAELoadError(
                f"SAE {self.source} has d_in={self.d_in} but the model's hidden size{where} is "
                f"{hidden_size}; the SAE was trained on a different model or layer")

    # Full (all d_sae features) encode/decode, fp32: used for exact TopK, for
    # feature statistics and as the "full SAE hook" baseline in benchmarks.
    def encode_pre(self, x: torch.Tensor) -> torch.Tensor:
        xin = x.float()
        if self.apply_b_dec_to_input:
            xin = xin - self.b_dec.float()
        return xin @ self.W_enc.float() + self.b_enc.float()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.encode_pre(x)
        if self.architecture == "standard":
            return torch.relu(pre)
        if self.architecture == "jumprelu":
            return torch.relu(pre) * (pre > self.threshold.float())
        vals, idx = torch.topk(pre, self.k, dim=-1)
        return torch.zeros_like(pre).scatter_(-1, idx, torch.relu(vals))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f.float() @ self.W_dec.float() + self.b_dec.float()


def validate(sae: SAEWeights) -> None:
    src = sae.source
    if sae.architecture not in ARCHITECTURES:
        raise SAELoadError(f"{src}: unknown SAE architecture {sae.architecture!r}; "
                           f"supported: {', '.join(ARCHITECTURES)}")
    if sae.W_enc.dim() != 2:
        raise SAELoadError(f"{src}: W_enc must be 2-D [d_in, d_sae], got shape {tuple(sae.W_enc.shape)}")
    d_in, d_sae = sae.W_enc.shape
    expected = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if sae.architecture == "jumprelu":
        if sae.threshold is None:
            raise SAELoadError(f"{src}: architecture 'jumprelu' needs a 'threshold' tensor [d_sae]")
        expected["threshold"] = (d_sae,)
    if d_in != d_sae and tuple(sae.W_dec.shape) == (d_in, d_sae):
        raise SAELoadError(f"{src}: W_dec has shape {tuple(sae.W_dec.shape)}, which is W_enc's "
                           f"[d_in, d_sae]: it looks stored transposed; sae-lens stores W_dec "
                           f"as [d_sae, d_in] = {(d_sae, d_in)}")
    for name, shape in expected.items():
        t = getattr(sae, name)
        if tuple(t.shape) != shape:
            raise SAELoadError(f"{src}: {name} has shape {tuple(t.shape)}, expected {shape} "
                               f"(d_in={d_in}, d_sae={d_sae})")
        if not t.is_floating_point():
            raise SAELoadError(f"{src}: {name} must be floating point, got {t.dtype}")
        if t.device.type != "meta":
            bad = ~torch.isfinite(t)
            if bool(bad.any()):
                first = tuple(int(i) for i in bad.nonzero()[0])
                raise SAELoadError(f"{src}: {name} has {int(bad.sum())} non-finite values "
                                   f"(first at index {first}: {t[first].item()})")
    if sae.architecture == "topk":
        if sae.k is None or not (1 <= int(sae.k) <= d_sae):
            raise SAELoadError(f"{src}: topk SAE needs 1 <= k <= d_sae={d_sae}, got k={sae.k}")


# cfg.json keys this loader reads, with the type each must have (absent keys
# take sae-lens's defaults: architecture 'standard', apply_b_dec_to_input true)
_CFG_TYPES: dict[str, tuple[type, ...]] = {
    "architecture": (str,), "d_in": (int,), "d_sae": (int,), "k": (int,),
    "apply_b_dec_to_input": (bool,), "hook_name": (str,), "dtype": (str,),
    "metadata": (dict,), "activation_fn": (str,), "activation_fn_str": (str,),
    "activation_fn_kwargs": (dict,), "normalize_activations": (str, type(None)),
    "rescale_acts_by_decoder_norm": (bool,), "reshape_activations": (str, type(None)),
}
# the activation function each architecture computes (sae-lens's activation_fn)
_ACTIVATIONS = {"standard": ("relu",), "jumprelu": ("relu", "jumprelu"), "topk": ("topk", "relu")}


def _check_cfg_types(cfg: dict, src: str) -> None:
    for key, types in _CFG_TYPES.items():
        if key not in cfg:
            continue
        v = cfg[key]
        ok = isinstance(v, types) and not (isinstance(v, bool) and bool not in types)
        if not ok:
            want = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise SAELoadError(f"{src}: cfg.json key {key!r} must be {want}, got "
                               f"{type(v).__name__} {v!r}")
    for key in ("d_in", "d_sae", "k"):
        if key in cfg and cfg[key] < 1:
            raise SAELoadError(f"{src}: cfg.json key {key!r} must be >= 1, got {cfg[key]}")
    if "dtype" in cfg and not isinstance(getattr(torch, cfg["dtype"].replace("torch.", ""), None),
                                         torch.dtype):
        raise SAELoadError(f"{src}: cfg.json dtype {cfg['dtype']!r} is not a torch dtype "
                           "(e.g. 'float32', 'bfloat16')")


def _check_cfg(cfg: dict, src: str) -> None:
    _check_cfg_types(cfg, src)
    arch = cfg.get("architecture", "standard")
    for key in ("activation_fn", "activation_fn_str"):
        fn = cfg.get(key)
        if fn is not None and arch in _ACTIVATIONS and fn not in _ACTIVATIONS[arch]:
            raise SAELoadError(f"{src}: {key}={fn!r} is not supported for architecture {arch!r} "
                               f"(supported: {', '.join(_ACTIVATIONS[arch])}); the fused ops "
                               "compute ReLU, JumpReLU and TopK encoders only")
    norm = cfg.get("normalize_activations", "none")
    if norm not in IDENTITY_NORMALISATIONS:
        raise SAELoadError(
            f"{src}: normalize_activations={norm!r} is not supported: it rescales every token by "
            "its own norm, which the fused steering ops do not implement; supported: 'none', "
            "'expected_average_only_in' (folded at save time)")
    reshape = cfg.get("reshape_activations", "none")
    if reshape not in ("none", None):
        raise SAELoadError(f"{src}: reshape_activations={reshape!r} (attention hook_z SAEs) is "
                           "not supported; only residual-stream SAEs ('none') can steer")


def _fold_decoder_norm(W_enc, b_enc, W_dec):
    """TopK rescale_acts_by_decoder_norm: pre *= |W_dec_i|, f/|W_dec_i| @ W_dec."""
    n = W_dec.float().norm(dim=-1).clamp(min=1e-8)
    return ((W_enc.float() * n).to(W_enc.dtype), (b_enc.float() * n).to(b_enc.dtype),
            (W_dec.float() / n[:, None]).to(W_dec.dtype))


def _topk_k(cfg: dict) -> Optional[int]:
    """k of a TopK SAE: ``k``, else sae-lens's ``activation_fn_kwargs.k``."""
    k = cfg.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))
    return None if k is None else int(k)


def from_state(state: dict[str, torch.Tensor], cfg: dict, source: str = "<memory>") -> SAEWeights:
    """Build SAEWeights from a sae-lens state dict and cfg dict."""
    _check_cfg(cfg, source)
    arch = cfg.get("architecture", "standard")
    if arch not in ARCHITECTURES:
        raise SAELoadError(f"{source}: unknown SAE architecture {arch!r}; supported: "
                           f"{', '.join(ARCHITECTURES)}")
    needed = ["W_enc", "b_enc", "W_dec", "b_dec"] + (["threshold"] if arch == "jumprelu" else [])
    missing = [n for n in needed if n not in state]
    if missing:
        raise SAELoadError(f"{source}: missing tensors {missing} for architecture {arch!r} "
                           f"(found {sorted(state)})")
    W_enc, b_enc, W_dec = state["W_enc"], state["b_enc"], state["W_dec"]
    for key in ("d_in", "d_sae"):
        want = cfg.get(key)
        have = W_enc.shape[0 if key == "d_in" else 1] if W_enc.dim() == 2 else None
        if want is not None and have is not None and int(want) != int(have):
            raise SAELoadError(f"{source}: cfg says {key}={want} but W_enc has shape "
                               f"{tuple(W_enc.shape)} ({key}={have})")
    if arch == "topk" and cfg.get("rescale_acts_by_decoder_norm", False):
        W_enc, b_enc, W_dec = _fold_decoder_norm(W_enc, b_enc, W_dec)
    meta = cfg.get("metadata") or {}
    return SAEWeights(
        W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=state["b_dec"], architecture=arch,
        threshold=state.get("threshold") if arch == "jumprelu" else None,
        k=_topk_k(cfg) if arch == "topk" else None,
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
        hook_name=meta.get("hook_name") or cfg.get("hook_name"), source=source, cfg=dict(cfg))


def load_sae(path: Union[str, Path, Any], device: Union[str, torch.device] = "cpu",
             dtype: Optional[torch.dtype] = None) -> SAEWeights:
    """Load an SAE from a sae-lens folder, an in-memory sae-lens ``SAE``, or pass
    through an existing :class:`SAEWeights`."""
    if isinstance(path, SAEWeights):
        return path.to(device=device, dtype=dtype)
    if not isinstance(path, (str, Path)):
        return from_sae_lens(path).to(device=device, dtype=dtype)
    folder = Path(path)
    if not folder.exists():
        raise SAELoadError(f"SAE path {str(folder)!r} does not exist; expected a sae-lens folder "
                           f"with {CFG_FILE} and {WEIGHTS_FILE}")
    if folder.is_file():
        raise SAELoadError(f"SAE path {str(folder)!r} is a file; expected a sae-lens folder with "
                           f"{CFG_FILE} and {WEIGHTS_FILE}")
    cfg_path, w_path = folder / CFG_FILE, folder / WEIGHTS_FILE
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise SAELoadError(f"SAE folder {str(folder)!r} has no {p.name}; expected a sae-lens "
                               f"folder with {CFG_FILE} and {WEIGHTS_FILE} (found: "
                               f"{sorted(x.name for x in folder.iterdir())})")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as err:
        raise SAELoadError(f"{cfg_path}: not valid JSON ({err})") from err
    if not isinstance(cfg, dict):
        raise SAELoadError(f"{cfg_path}: expected a JSON object, got {type(cfg).__name__}")
    try:
        from safetensors.torch import load_file

        state = load_file(str(w_path), device="cpu")
    except Exception as err:  # safetensors raises its own error types
        raise SAELoadError(f"{w_path}: not a readable safetensors file ({err})") from err
    sae = from_state(state, cfg, source=str(folder))
    if dtype is None and "dtype" in cfg:  # checked to be a torch dtype name by from_state
        dtype = getattr(torch, cfg["dtype"].replace("torch.", ""))
    return sae.to(device=device, dtype=dtype)


def from_sae_lens(sae: Any) -> SAEWeights:
    """Convert an in-memory sae-lens ``SAE`` object (no copy of its parameters)."""
    cfg_obj = getattr(sae, "cfg", None)
    if cfg_obj is None or not hasattr(sae, "W_enc"):
        raise SAELoadError(f"expected a sae-lens SAE object or a folder path, got {type(sae).__name__}")
    cfg = cfg_obj.to_dict() if hasattr(cfg_obj, "to_dict") else dict(vars(cfg_obj))
    if "architecture" not in cfg and hasattr(cfg_obj, "architecture"):
        cfg["architecture"] = cfg_obj.architecture()
    state = {n: getattr(sae, n).detach() for n in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")
             if isinstance(getattr(sae, n, None), torch.Tensor)}
    return from_state(state, cfg, source=f"<sae-lens {type(sae).__name__}>")


def from_pretrained(release: str, sae_id: str, device: str = "cpu") -> SAEWeights:
    """Load through ``sae_lens.SAE.from_pretrained`` (needs sae-lens and a hub)."""
    try:
        from sae_lens import SAE
    except ImportError as err:
        raise SAELoadError("from_pretrained needs sae-lens: pip install 'sae_fast[sae-lens]'") from err
    loaded = SAE.from_pretrained(release, sae_id, device=device)
    sae = loaded[0] if isinstance(loaded, tuple) else loaded
    return from_sae_lens(sae)


def save_sae(sae: SAEWeights, folder: Union[str, Path], dtype: Optional[torch.dtype] = None) -> Path:
    """Write a sae-lens folder (cfg.json + sae_weights.safetensors), atomically."""
    from safetensors.torch import save_file

    from sae_fast.checks import atomic_write

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = sae.to(dtype=dtype) if dtype is not None else sae
    state = {n: t.contiguous().cpu() for n, t in
             (("W_enc", out.W_enc), ("b_enc", out.b_enc), ("W_dec", out.W_dec), ("b_dec", out.b_dec),
              ("threshold", out.threshold)) if t is not None}
    cfg = dict(sae.cfg)
    cfg.update(d_in=sae.d_in, d_sae=sae.d_sae, architecture=sae.architecture,
               apply_b_dec_to_input=sae.apply_b_dec_to_input,
               dtype=str(out.dtype).replace("torch.", ""))
    cfg.setdefault("normalize_activations", "none")
    cfg.pop("rescale_acts_by_decoder_norm", None)  # weights are stored folded
    if sae.k is not None:
        cfg["k"] = sae.k
    if sae.hook_name:
        cfg.setdefault("metadata", {})["hook_name"] = sae.hook_name
    atomic_write(folder / WEIGHTS_FILE, lambda p: save_file(state, p))
    atomic_write(folder / CFG_FILE, json.dumps(cfg, indent=2))
    return folder


def random_sae(d_in: int, d_sae: int, architecture: str = "standard", k: Optional[int] = None,
               seed: int = 0, dtype: torch.dtype = torch.float32) -> SAEWeights:
    """A randomly initialised SAE (for tests, tiny demos and benchmarks only):
    decoder rows of unit norm, encoder = decoder transpose, small biases."""
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(d_sae, d_in, generator=g)
    W_dec = W_dec / W_dec.norm(dim=-1, keepdim=True)
    W_enc = W_dec.t().contiguous() * (1.0 + 0.1 * torch.rand(d_sae, generator=g))
    b_enc = 0.1 * torch.randn(d_sae, generator=g)
    b_dec = 0.05 * torch.randn(d_in, generator=g)
    threshold = 0.2 * torch.rand(d_sae, generator=g) if architecture == "jumprelu" else None
    if architecture == "topk" and k is None:
        k = max(1, int(math.sqrt(d_sae)))
    return SAEWeights(W_enc=W_enc.to(dtype), b_enc=b_enc.to(dtype), W_dec=W_dec.to(dtype),
                      b_dec=b_dec.to(dtype), architecture=architecture,
                      threshold=None if threshold is None else threshold.to(dtype), k=k,
                      source=f"<random {architecture} {d_in}x{d_sae} seed={seed}>",
                      cfg={"architecture": architecture, "d_in": d_in, "d_sae": d_sae})
