"""Three-line steered generation with transformers:

    import sae_fast
    texts = sae_fast.generate("path/to/model", ["Tell me a story"], sae="path/to/sae",
                              features=[123], strengths=[4.0], max_new_tokens=40)
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch

from sae_fast.request import DEFAULT_MODE


def load_hf(model: Union[str, Any], tokenizer: Any = None, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a folder path, or pass-through objects."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(model, str):
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(model)
        model = AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
    elif tokenizer is None:
        raise ValueError("pass tokenizer=... with a model object")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model, tokenizer


def format_prompts(tokenizer: Any, prompts: Sequence[str], chat: bool = False) -> list[str]:
    """``prompts`` through the tokenizer's chat template when ``chat`` (and the
    tokenizer has one), else unchanged."""
    texts = list(prompts)
    if chat and getattr(tokenizer, "chat_template", None):
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p in texts]
    return texts


@torch.no_grad()
def generate(model: Union[str, Any], prompts: Sequence[str], sae: Any = None, *,
             tokenizer: Any = None, spec: Any = None, features: Optional[Sequence[int]] = None,
             strengths: Any = None, mode: str = DEFAULT_MODE, layer: Optional[int] = None,
             layers: Optional[Sequence[int]] = None, max_activations: Any = None,
             strength_scale: float = 1.0, strength_schedule: str = "constant",
             max_new_tokens: int = 32, chat: bool = False, seed: Optional[int] = None,
             **gen_kwargs: Any) -> list[str]:
    """Generate a completion per prompt, steered when ``sae`` is given.

    The steering keywords are ``sae_fast.attach``'s (``spec`` or features /
    mode / max_activations / strength_scale, ``layer(s)``, ``strength_schedule``).
    ``strengths``: one row for every prompt, or one row per prompt ([B, k]).
    ``seed`` reseeds the sampler first (``do_sample=True``); the rest goes to
    ``model.generate`` (greedy by default)."""
    from sae_fast.backends.hf import attach

    model, tokenizer = load_hf(model, tokenizer)
    texts = format_prompts(tokenizer, prompts, chat)
    enc = tokenizer(texts, return_tensors="pt", padding=True).to(next(model.parameters()).device)
    gen_kwargs.setdefault("do_sample", False)
    gen_kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    if seed is not None:
        torch.manual_seed(int(seed))
    if sae is None:
        out = model.generate(**enc, max_new_tokens=max_new_tokens, **gen_kwargs)
    else:
        with attach(model, sae, spec=spec, layer=layer, layers=layers, features=features,
                    mode=mode, max_activations=max_activations, strength_scale=strength_scale,
                    strength_schedule=strength_schedule,
                    max_batch=max(len(texts), 1)) as steerer:
            rows = strengths
            if rows is None or not isinstance(rows, torch.Tensor) and (
                    isinstance(rows, (int, float)) or not isinstance(rows[0], (list, tuple))):
                rows = [rows if rows is not None else steerer.groups[0].spec.strengths
                        or 1.0] * len(texts)
            steerer.set_strengths(rows)
            out = steerer.generate(**enc, max_new_tokens=max_new_tokens, **gen_kwargs)
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
