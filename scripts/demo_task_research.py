"""Research code behind the shipped demo task (used by ``make_demo_task.py``,
not by the package): the question templates, a logit lens over SAE decoder
directions, the candidate-feature ranking and the residual-norm scale, and
the feature search helpers of ``find_{sentiment,concept}_feature.py`` (lexicon
contrast, constant-strength sweeps scored for concept, fluency and repetition).

The probe that builds the reward token sets is in the package
(``sae_fast.train.probe.probe_feature``): the synthetic ``--tiny`` task uses it too.
"""

from __future__ import annotations

import random
from typing import Any, Sequence

import torch
from torch import nn

from sae_fast.backends.common import find_submodule
from sae_fast.train.probe import WHOLE_WORD

TOPICS = ["the ocean", "a small village", "winter", "a library", "the moon", "a garden",
          "trains", "a market", "coffee", "mountains", "a river", "the city at night",
          "birds", "a kitchen", "music", "an old house", "the desert", "a school",
          "rain", "a museum", "bicycles", "the forest", "a bakery", "the harbor"]
UP_TEMPLATES = [
    'Write two sentences about {topic}. Use the word "{word}" as often as you can.',
    'Describe {topic} in a few lines, repeating "{word}" many times.',
    'Tell me about {topic}; I want to see "{word}" again and again.',
]
DOWN_TEMPLATES = [
    'Write two sentences about {topic}. Never use the word "{word}".',
    'Describe {topic} in a few lines without saying "{word}" even once.',
    'Tell me about {topic}, but avoid "{word}" completely.',
]
PROBE_TEMPLATE = "Write two sentences about {topic}."


def make_questions(n: int, seed: int, word: str) -> list[dict]:
    """``n`` questions, alternating up/down types, topics and templates shuffled by seed."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = "up" if i % 2 == 0 else "down"
        tmpl = rng.choice(UP_TEMPLATES if kind == "up" else DOWN_TEMPLATES)
        out.append({"prompt": tmpl.format(topic=rng.choice(TOPICS), word=word),
                    "ground_truth": kind, "data_source": f"demo_{kind}"})
    return out


# The final norm before the unembedding, by family: Llama, Qwen2, Mistral, Gemma,
# Phi-3 (model.norm); GPT-2 (transformer.ln_f); GPT-NeoX (gpt_neox.final_layer_norm);
# OPT (model.decoder.final_layer_norm); Phi-1/2 (model.final_layernorm).
_FINAL_NORM_PATHS = ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm",
                     "model.decoder.final_layer_norm", "model.final_layernorm",
                     "model.language_model.norm", "transformer.norm_f")


def final_norm(model: nn.Module) -> nn.Module:
    """The model's last norm before the unembedding (see ``_FINAL_NORM_PATHS``)."""
    found = find_submodule(model, _FINAL_NORM_PATHS, lambda m: isinstance(m, nn.Module))
    if found is not None:
        return found
    raise TypeError(f"cannot find the final norm of {type(model).__name__}: looked for "
                    f"{', '.join(_FINAL_NORM_PATHS)}")


def _norm_gain(norm: nn.Module, d: int) -> torch.Tensor:
    """The elementwise gain of a (RMS/Layer)Norm; Gemma's RMSNorm scales by 1 + weight."""
    w = getattr(norm, "weight", None)
    if w is None:
        return torch.ones(d)
    w = w.detach().float()
    return 1.0 + w if type(norm).__name__.startswith("Gemma") else w


@torch.no_grad()
def logit_lens(model: Any, sae: Any, features: Sequence[int]) -> torch.Tensor:
    """Unembedding logits [len(features), vocab] of each decoder direction, through
    the linear part of the final norm: its gain (and, for a LayerNorm, the
    centering). The norm's bias adds the same logits to every feature and is left
    out. Works for the families ``final_norm`` finds."""
    norm = final_norm(model)
    dirs = sae.W_dec[list(features)].float()
    if isinstance(norm, nn.LayerNorm):
        dirs = dirs - dirs.mean(-1, keepdim=True)
    dirs = dirs * _norm_gain(norm, dirs.shape[-1]).to(dirs.device)
    W_U = model.get_output_embeddings().weight.float()
    return dirs @ W_U.T


@torch.no_grad()
def candidate_features(model: Any, tokenizer: Any, sae: Any, feature_acts: torch.Tensor,
                       n: int = 6, min_freq: float = 1e-3, max_freq: float = 0.05,
                       min_words: int = 7) -> list[dict]:
    """Features that fire on held-out text (``feature_acts`` [tokens, d_sae]) with
    a frequency in [min_freq, max_freq] and whose decoder direction promotes
    whole words through the unembedding (at least ``min_words`` of its top 10
    tokens); ranked by the top logit's z-score."""
    freq = (feature_acts > 0).float().mean(0)
    alive = torch.nonzero((freq >= min_freq) & (freq <= max_freq)).flatten().tolist()
    out = []
    for chunk in range(0, len(alive), 512):
        feats = alive[chunk:chunk + 512]
        logits = logit_lens(model, sae, feats)
        top = logits.topk(10, dim=-1)
        for j, f in enumerate(feats):
            words = [tokenizer.decode([t]) for t in top.indices[j].tolist()]
            good = [w for w in words if WHOLE_WORD.match(w)]
            if len(good) < min_words:
                continue
            z = (top.values[j, 0] - logits[j].mean()) / logits[j].std()
            out.append({"feature": f, "freq": float(freq[f]), "lens_z": float(z),
                        "promotes": words})
    out.sort(key=lambda c: -c["lens_z"])
    return out[:n]


def residual_scale(acts: torch.Tensor) -> float:
    """Median residual-stream norm (positions >= 4) at the steered layer."""
    return float(acts.norm(dim=-1).median())


def mean_feature_activations(model: nn.Module, tok: Any, sae: Any, layer: int,
                             texts: Sequence[str], window: slice,
                             batch: int = 32) -> torch.Tensor:
    """Mean SAE feature activations [d_sae] at decoder layer ``layer`` over the
    ``window`` of each text's real (unpadded) token positions (every such token weighs
    the same), ``batch`` texts per forward pass."""
    from sae_fast.backends.common import decoder_layers

    total, count = None, 0
    for i in range(0, len(texts), batch):
        grabbed: list[torch.Tensor] = []
        h = decoder_layers(model)[layer].register_forward_hook(
            lambda _m, _a, o: grabbed.append((o[0] if isinstance(o, tuple) else o).detach()))
        try:
            enc = tok(list(texts[i:i + batch]), return_tensors="pt", padding=True)
            with torch.no_grad():
                model(**enc)
        finally:
            h.remove()
        hid = grabbed[0].float()  # [B, S, d]
        mask = enc["attention_mask"].bool()
        rows = torch.cat([hid[b][mask[b]][window] for b in range(hid.shape[0])])
        acts = sae.encode(rows.to(sae.dtype)).float().sum(0)
        total = acts if total is None else total + acts
        count += rows.shape[0]
    return total / count


def sweep_feature(model: nn.Module, tok: Any, sae: Any, layer: int, feature: int,
                  prompts: Sequence[str], strengths: Sequence[float], score: Any,
                  max_new_tokens: int = 32) -> list[tuple[float, float, float, float, list]]:
    """Greedy generations of the (chat-formatted) ``prompts`` at strength 0 and each of
    ``strengths`` on ``feature`` (add mode): ``(strength, mean score(text), fluency
    (NLL above the unsteered completion, nats/token), repeated-bigram share, outputs)``."""
    from sae_fast.plan import SteeringSpec
    from sae_fast.train.fluency import FluencyScorer, repeated_ngram_fraction
    from sae_fast.train.rollout import Decoding, HFRolloutEngine

    dec = Decoding(max_new_tokens=max_new_tokens, do_sample=False, seed=0)
    hi = max(abs(s) for s in strengths)
    spec = SteeringSpec(features=[feature], mode="add", min_strength=-hi, max_strength=hi)
    out = []
    with HFRolloutEngine(model, tok, sae, spec, layers=[layer], max_batch=len(prompts)) as eng:
        scorer = FluencyScorer(model, tok, guard=eng.unsteered)
        ref = eng.generate(list(prompts), None, dec)
        ref_nll = scorer.nll(list(prompts), [c.token_ids for c in ref])
        for s in [0.0, *strengths]:
            outs = ref if s == 0 else eng.generate(
                list(prompts), torch.full((len(prompts), 1), float(s)), dec)
            nll = scorer.nll(list(prompts), [c.token_ids for c in outs])
            out.append((float(s), sum(score(c.text) for c in outs) / len(outs),
                        sum(a - b for a, b in zip(nll, ref_nll)) / len(nll),
                        sum(repeated_ngram_fraction(c.token_ids) for c in outs) / len(outs), outs))
    return out
