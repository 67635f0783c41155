"""The steering probe that builds a one-feature task's reward token sets:
generate with strengths 0, +S and -S and see which tokens steering makes more
frequent. Used by the synthetic task (``sae-fast demo --tiny``) and by
``scripts/make_demo_task.py``, which built the shipped SmolLM2 demo task."""

from __future__ import annotations

import re
from typing import Any, Optional, Sequence

import torch

# a whole word (leading space, 3+ letters), not a word piece, punctuation or a newline
WHOLE_WORD = re.compile(r"^ [A-Za-z]{3,}$")


@torch.no_grad()
def probe_feature(model: Any, tokenizer: Any, sae: Any, feature: int, layer: int,
                  strength: float, prompts: Sequence[str], new_tokens: int = 16,
                  top: int = 8, seed: int = 0, words_only: bool = False,
                  add_special_tokens: bool = False) -> dict:
    """Generate with strengths 0, +S, -S (sampled, fixed seed); the tokens whose
    frequency rises most at +S (vs -S) form the "up" set, and vice versa.
    ``words_only``: only whole-word tokens (``WHOLE_WORD``) may enter the sets,
    so the reward counts words, not punctuation or newlines."""
    from sae_fast.backends.hf import attach

    enc = tokenizer(list(prompts), return_tensors="pt", padding=True,
                    add_special_tokens=add_special_tokens)
    vocab = len(tokenizer)

    def freq(st, s: Optional[float]) -> tuple[torch.Tensor, list[str]]:
        st.set_strengths(None if s is None else [[s]] * len(prompts))
        torch.manual_seed(seed)
        out = st.generate(**enc, max_new_tokens=new_tokens, do_sample=True,
                          pad_token_id=tokenizer.pad_token_id)
        ids = out[:, enc["input_ids"].shape[1]:]
        texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
        flat = ids.reshape(-1)
        return torch.bincount(flat, minlength=vocab).float() / max(flat.numel(), 1), texts

    with attach(model, sae, features=[feature], mode="add", layer=layer, max_batch=len(prompts),
                min_strength=-abs(strength), max_strength=abs(strength)) as st:
        (c0, t0), (cp, tp), (cn, tn) = freq(st, None), freq(st, strength), freq(st, -strength)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    up_score, down_score = cp - cn, cn - cp
    for t in special:
        up_score[t] = down_score[t] = float("-inf")
    if words_only:
        moved = torch.nonzero((cp != 0) | (cn != 0)).flatten().tolist()
        keep = torch.zeros(vocab, dtype=torch.bool)
        keep[[t for t in moved if WHOLE_WORD.match(tokenizer.decode([t]))]] = True
        up_score[~keep] = down_score[~keep] = float("-inf")
    up = [int(t) for t in up_score.topk(top).indices if up_score[t] > 0]
    down = [int(t) for t in down_score.topk(top).indices if down_score[t] > 0 and int(t) not in up]
    mass = lambda c, s: float(c[s].sum()) if s else 0.0  # noqa: E731
    res = {"feature": feature, "strength": strength, "words_only": words_only,
           "up": up, "down": down,
           "up_tokens": [tokenizer.decode([t]) for t in up],
           "down_tokens": [tokenizer.decode([t]) for t in down],
           "up_mass": {"plus": mass(cp, up), "zero": mass(c0, up), "minus": mass(cn, up)},
           "down_mass": {"plus": mass(cp, down), "zero": mass(c0, down), "minus": mass(cn, down)},
           "samples": {"zero": t0[:2], "plus": tp[:2], "minus": tn[:2]}}
    # the reward range this feature offers: the "up" reward at +S minus at -S
    res["effect"] = (res["up_mass"]["plus"] - res["down_mass"]["plus"]) - \
                    (res["up_mass"]["minus"] - res["down_mass"]["minus"])
    return res
