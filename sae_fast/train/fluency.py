"""Fluency of a completion, measured by the frozen *unsteered* model, and its
repetition.

* :class:`FluencyScorer` gives the mean per-token negative log-likelihood
  (nats) of each completion given its prompt under the LLM with steering off
  (``guard``: the rollout engine's ``unsteered`` context). Steering that
  breaks the text raises it against the unsteered completion of the same
  prompt; the trainer's fluency term is that difference.
* :func:`repeated_ngram_fraction` is 1 - distinct-n over a completion's
  tokens: the share of its n-grams that repeat an earlier one ("is not rain
  is not rain is not" scores high). Loops are *likely* under the model (a low
  NLL), so the NLL alone would reward them; the two terms go together.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional, Sequence

import torch

from sae_fast.train.rollout import starts_with_bos


def repeated_ngram_fraction(token_ids: Sequence[int], n: int = 2) -> float:
    """Share of the n-grams of ``token_ids`` that are repeats of an earlier one
    (1 - distinct-n); 0.0 for fewer than n tokens."""
    if n < 1:
        raise ValueError(f"repetition n={n}; expected an integer >= 1")
    ids = [int(t) for t in token_ids]
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


class FluencyScorer:
    """Mean per-token NLL of completions under the unsteered model.

    ``model``/``tokenizer``: the frozen HF LLM the rollouts come from (or an
    unsteered copy of it); ``guard``: a callable returning a context manager
    entered around every forward (the engine's ``unsteered``)."""

    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int = 16,
                 guard: Optional[Callable[[], Any]] = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self.guard = guard or contextlib.nullcontext

    def _keeps_logits(self) -> bool:
        """Whether the model's forward takes ``logits_to_keep`` (transformers' causal LMs)."""
        if not hasattr(self, "_keep"):
            import inspect

            try:
                self._keep = "logits_to_keep" in inspect.signature(self.model.forward).parameters
            except (TypeError, ValueError):
                self._keep = False
        return self._keep

    @torch.no_grad()
    def nll(self, prompts: Sequence[str], completion_ids: Sequence[Sequence[int]]) -> list[float]:
        """One value per (prompt, completion token ids); 0.0 for an empty completion."""
        if len(prompts) != len(completion_ids):
            raise ValueError(f"{len(prompts)} prompts but {len(completion_ids)} completions")
        out: list[float] = []
        for i in range(0, len(prompts), self.batch_size):
            out += self._batch(prompts[i:i + self.batch_size],
                               completion_ids[i:i + self.batch_size])
        return out

    def _batch(self, prompts: Sequence[str], completions: Sequence[Sequence[int]]) -> list[float]:
        tok = self.tokenizer
        special = not starts_with_bos(prompts, tok)  # as the rollout engines tokenize
        prompt_ids = [tok(p, add_special_tokens=special)["input_ids"] for p in prompts]
        seqs = [list(p) + [int(t) for t in c] for p, c in zip(prompt_ids, completions)]
        width = max(len(s) for s in seqs)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        device = next(self.model.parameters()).device
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        target = torch.zeros((len(seqs), width), dtype=torch.bool)  # completion positions
        for b, (s, p) in enumerate(zip(seqs, prompt_ids)):
            off = width - len(s)  # left padding, as the rollouts were generated
            ids[b, off:] = torch.tensor(s, dtype=torch.long)
            mask[b, off:] = 1
            target[b, off + len(p):] = True
        kw = {}
        if self._keeps_logits():
            # left padding puts every completion at the end: the LM head (a [B, S, V]
            # buffer) runs only on the last positions, the ones that predict a completion
            kw["logits_to_keep"] = min(width, max(len(c) for c in completions) + 1)
        with self.guard():
            logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                                **kw).logits
        off = width - logits.shape[1]  # logits column j is position off + j
        tgt = target[:, off + 1:]  # position t predicts token t + 1
        # log-softmax over the vocabulary only where a completion token is predicted
        rows = torch.log_softmax(logits[:, :-1][tgt.to(device)].float(), dim=-1)
        tok_lp = rows.gather(-1, ids[:, off + 1:][tgt].to(device).unsqueeze(-1)).squeeze(-1).cpu()
        sums = torch.zeros(len(seqs)).index_add_(0, tgt.nonzero()[:, 0], -tok_lp)
        counts = tgt.sum(1)
        return [float(s / c) if c > 0 else 0.0 for s, c in zip(sums, counts)]
