"""Question embeddings from the frozen LLM, the predictor's input.

Two sources:

- ``hidden``: mean over the prompt tokens of the output of decoder layer
  ``layer`` (negative counts from the end). The forward stops right after
  that layer, so early layers are cheap.
- ``input_embeddings``: mean of the input token embeddings (no transformer
  layer runs at all; the cheapest path).

Special tokens (BOS and friends) are left out of the mean by default: at
position 0 they carry residual norms ~100x the median and would dominate it.
Everything runs under ``torch.no_grad`` with the model in eval mode, and each
distinct prompt is embedded once (an in-memory cache keyed by its text or its
token ids): training revisits the same questions every epoch.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Optional, Sequence

import torch

log = logging.getLogger(__name__)

SOURCES = ("hidden", "input_embeddings")
POOLS = ("mean", "last")  # mean over the prompt tokens, or the last prompt token


class _Stop(Exception):
    """Raised by the capture hook to end the forward after the wanted layer."""


class QuestionEmbedder:
    def __init__(self, model: Any, tokenizer: Any, *, source: str = "hidden",
                 layer: int = -1, max_length: int = 512, batch_size: int = 16,
                 cache: bool = True, exclude_special_tokens: bool = True,
                 guard: Optional[Callable[[], Any]] = None, pool: str = "mean") -> None:
        """``guard``: a callable returning a context manager entered around every
        forward, e.g. a rollout engine's ``unsteered`` (embeddings are always of
        the unsteered model)."""
        from sae_fast.backends.common import decoder_layers, hidden_size_of, resolve_layer

        if pool not in POOLS:
            raise ValueError(f"embedding pool={pool!r}; expected one of {', '.join(POOLS)}")
        self.pool = pool
        if source not in SOURCES:
            raise ValueError(f"embedding source={source!r}; expected one of {', '.join(SOURCES)}")
        self.model = model
        self.tokenizer = tokenizer
        self.source = source
        self.max_length = int(max_length)
        self.batch_size = int(batch_size)
        self.use_cache = cache
        self.exclude_special_tokens = exclude_special_tokens
        self.guard = guard or contextlib.nullcontext
        self.hidden_size = hidden_size_of(model)
        self.layers = decoder_layers(model)
        self.layer = resolve_layer(int(layer), len(self.layers)) if source == "hidden" else None
        self._cache: dict[Any, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0
        special = getattr(tokenizer, "all_special_ids", None) or []
        self._special = torch.tensor(sorted(set(int(i) for i in special)), dtype=torch.long)

    @property
    def dim(self) -> int:
        return self.hidden_size

    def describe(self) -> dict:
        return {"source": self.source, "layer": self.layer, "max_length": self.max_length,
                "exclude_special_tokens": self.exclude_special_tokens, "pool": self.pool}

    # ------------------------------------------------------------------ public
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """[B, hidden] fp32 embeddings of already formatted prompt texts."""
        texts = list(texts)
        out: list[Optional[torch.Tensor]] = [self._cache.get(t) if self.use_cache else None
                                             for t in texts]
        todo = [i for i, e in enumerate(out) if e is None]
        self.hits += len(texts) - len(todo)
        self.misses += len(todo)
        unique = list(dict.fromkeys(texts[i] for i in todo))
        for start in range(0, len(unique), self.batch_size):
            chunk = unique[start:start + self.batch_size]
            from sae_fast.train.rollout import starts_with_bos

            enc = self.tokenizer(chunk, return_tensors="pt", padding=True, truncation=True,
                                 max_length=self.max_length,
                                 add_special_tokens=not starts_with_bos(chunk, self.tokenizer))
            emb = self._embed(enc["input_ids"], enc["attention_mask"])
            for t, e in zip(chunk, emb):
                if self.use_cache:
                    self._cache[t] = e
                for i in todo:
                    if texts[i] == t:
                        out[i] = e
        return torch.stack(out) if out else torch.zeros(0, self.hidden_size)

    def embed_ids(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None
                  ) -> torch.Tensor:
        """[B, hidden] fp32 embeddings of tokenised prompts (padding either side)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        outs = []
        for start in range(0, input_ids.shape[0], self.batch_size):
            outs.append(self._embed(input_ids[start:start + self.batch_size],
                                    attention_mask[start:start + self.batch_size]))
        return torch.cat(outs) if outs else torch.zeros(0, self.hidden_size)

    def clear_cache(self) -> None:
        self._cache.clear()

    # ------------------------------------------------------------------ internals
    @torch.no_grad()
    def _embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        device = next(self.model.parameters()).device
        ids = input_ids.to(device)
        mask = attention_mask.to(device)
        keep = mask.bool()
        if self.exclude_special_tokens and self._special.numel():
            no_special = keep & ~torch.isin(ids, self._special.to(device))
            # a prompt made only of special tokens keeps them rather than nothing
            keep = torch.where(no_special.any(dim=1, keepdim=True), no_special, keep)
        with self.guard():
            if self.source == "input_embeddings":
                states = self.model.get_input_embeddings()(ids)
            else:
                states = self._layer_output(ids, mask)
        if self.pool == "last":  # the last real token (padding on either side)
            pos = torch.arange(ids.shape[1], device=device).expand_as(ids)
            last = torch.where(mask.bool(), pos, -1).max(dim=1).values.clamp(min=0)
            return states.float()[torch.arange(ids.shape[0], device=device), last].cpu()
        w = keep.to(torch.float32)[..., None]
        pooled = (states.float() * w).sum(1) / w.sum(1).clamp(min=1.0)
        return pooled.cpu()

    def _layer_output(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        captured: dict[str, torch.Tensor] = {}

        def hook(module, args, output):
            captured["h"] = output[0] if isinstance(output, tuple) else output
            raise _Stop

        was_training = self.model.training
        self.model.eval()
        handle = self.layers[self.layer].register_forward_hook(hook)
        try:
            self.model(input_ids=ids, attention_mask=mask, use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
            self.model.train(was_training)
        if "h" not in captured:
            raise RuntimeError(f"decoder layer {self.layer} did not run during the embedding forward")
        return captured["h"]


def embedder_from_config(model: Any, tokenizer: Any, cfg: Any, default_layer: int = -1,
                         guard: Optional[Callable[[], Any]] = None) -> QuestionEmbedder:
    """From an :class:`sae_fast.config.EmbeddingConfig`."""
    layer = cfg.layer if cfg.layer is not None else default_layer
    return QuestionEmbedder(model, tokenizer, source=cfg.source, layer=layer,
                            max_length=cfg.max_length, batch_size=cfg.batch_size, cache=cfg.cache,
                            exclude_special_tokens=cfg.exclude_special_tokens, guard=guard,
                            pool=cfg.pool)
