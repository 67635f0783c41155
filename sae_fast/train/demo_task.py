"""The real demo task: SmolLM2-135M-Instruct steered with one feature of the
shipped SAE (``assets/smollm2_sae``), where the right strength depends on the
question.

Two question types, told apart only by their wording:

    "up"    "... use the word W as often as you can"   -> push the feature up
    "down"  "... never use the word W"                 -> push it down

W is the word the chosen feature promotes most in SmolLM2's own generations.
The reward is the built-in rule ``token_preference``: the mean over generated
tokens of +1 for a token of the wanted set and -1 for a token of the other
set, where "up" = tokens that pushing the feature up makes SmolLM2 generate
more often and "down" = tokens that pushing it down makes more frequent. So
for "up" questions a positive strength helps and for "down" questions it
hurts; any single constant strength helps one half of a balanced set and
hurts the other, while a predictor that reads the question can win on both.

The feature is picked by evidence (``select_feature``), not by hand:
candidates are features that fire on held-out text and whose decoder
direction, read through the unembedding, promotes whole words; each
candidate is then probed by generating with strengths -S, 0, +S, and the one
whose steering moves the most generated-token mass wins. The evidence is
saved next to the SAE in ``demo_task.json`` (``scripts/make_demo_task.py``).
"""

from __future__ import annotations

import json
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from sae_fast.train.tasks import SteeringTask

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
ASSET_SAE = REPO / "assets" / "smollm2_sae"
DATA_DIR = REPO / "examples" / "data"
TASK_FILE = "demo_task.json"

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


@dataclass
class DemoTask(SteeringTask):
    """The shipped task; ``word`` is the word the questions ask for or forbid."""

    word: str = ""


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


def load_demo_task(sae_dir: Optional[Path] = None, data_dir: Optional[Path] = None,
                   model_path: Optional[str] = None) -> DemoTask:
    """The shipped task: SAE folder + ``demo_task.json`` + the JSONL files."""
    from sae_fast.models import smollm2

    sae_dir = Path(sae_dir or ASSET_SAE)
    data_dir = Path(data_dir or DATA_DIR)
    spec_path = sae_dir / TASK_FILE
    if not spec_path.is_file():
        raise FileNotFoundError(f"{spec_path} is missing; build it with scripts/make_demo_task.py")
    spec = json.loads(spec_path.read_text())
    paths = {k: data_dir / f"demo_{k}.jsonl" for k in ("train", "val")}
    for p in paths.values():
        if not p.is_file():
            raise FileNotFoundError(f"{p} is missing; build it with scripts/make_demo_task.py")
    return DemoTask(model_path=model_path or str(smollm2()), sae_path=str(sae_dir),
                    train_path=str(paths["train"]), val_path=str(paths["val"]),
                    feature=int(spec["feature"]), layer=int(spec["layer"]),
                    strength=float(spec["strength"]), word=spec["word"],
                    token_sets={k: [int(t) for t in v] for k, v in spec["token_sets"].items()},
                    evidence=spec.get("evidence", {}))


# --------------------------------------------------------------------------- selection
_WORD = re.compile(r"^ [A-Za-z]{3,}$")  # a whole word (leading space), not a word piece


@torch.no_grad()
def logit_lens(model: Any, sae: Any, features: Sequence[int]) -> torch.Tensor:
    """Unembedding logits of each decoder direction (through the final norm weight)."""
    norm_w = model.model.norm.weight.float()
    W_U = model.get_output_embeddings().weight.float()
    dirs = sae.W_dec[list(features)].float() * norm_w
    return dirs @ W_U.T


@torch.no_grad()
def candidate_features(model: Any, tokenizer: Any, sae: Any, feature_acts: torch.Tensor,
                       n: int = 6, min_freq: float = 1e-3, max_freq: float = 0.05) -> list[dict]:
    """Features that fire on held-out text (``feature_acts`` [tokens, d_sae]) with
    a frequency in [min_freq, max_freq] and whose decoder direction promotes
    whole words through the unembedding; ranked by the words' logit margin."""
    freq = (feature_acts > 0).float().mean(0)
    alive = torch.nonzero((freq >= min_freq) & (freq <= max_freq)).flatten().tolist()
    out = []
    for chunk in range(0, len(alive), 512):
        feats = alive[chunk:chunk + 512]
        logits = logit_lens(model, sae, feats)
        top = logits.topk(10, dim=-1)
        for j, f in enumerate(feats):
            words = [tokenizer.decode([t]) for t in top.indices[j].tolist()]
            good = [w for w in words if _WORD.match(w)]
            if len(good) < 7:
                continue
            z = (top.values[j, 0] - logits[j].mean()) / logits[j].std()
            out.append({"feature": f, "freq": float(freq[f]), "lens_z": float(z),
                        "promotes": words})
    out.sort(key=lambda c: -c["lens_z"])
    return out[:n]


@torch.no_grad()
def probe_feature(model: Any, tokenizer: Any, sae: Any, feature: int, layer: int,
                  strength: float, prompts: Sequence[str], new_tokens: int = 16,
                  top: int = 8, seed: int = 0, words_only: bool = False,
                  add_special_tokens: bool = False) -> dict:
    """Generate with strengths 0, +S, -S (sampled, fixed seed); the tokens whose
    frequency rises most at +S (vs -S) form the "up" set, and vice versa.
    ``words_only``: only whole-word tokens (a leading space and 3+ letters)
    may enter the sets, so the reward counts words, not punctuation or
    newlines."""
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
        keep[[t for t in moved if _WORD.match(tokenizer.decode([t]))]] = True
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


def residual_scale(acts: torch.Tensor) -> float:
    """Median residual-stream norm (positions >= 4) at the steered layer."""
    return float(acts.norm(dim=-1).median())
