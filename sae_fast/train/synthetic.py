"""A synthetic steering task on a tiny local model, where the best strength
depends on the question (used by ``sae-fast demo`` and the training tests).

Two question types, told apart only by their text:

    "up"    questions are rewarded when the steered feature is pushed up,
    "down"  questions when it is pushed down.

The reward (``token_preference``) is measured on the generation: +1 for every
generated token among those that pushing the feature up promotes, -1 for
every token among those that pushing it down promotes (swapped for "down"
questions). The two token sets are found empirically by generating with
strength +S and -S on probe prompts, so the reward follows the feature's
real effect on this model. Unsteered, random and any single constant
strength all score near 0 on a balanced set; a predictor that reads the
question type can score far above them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from sae_fast.train.tasks import SteeringTask

log = logging.getLogger(__name__)

UP_TEMPLATES = [
    "Please write a happy story about {w}.",
    "Write a short poem about {w} and the sunny weather.",
    "Tell me something kind and calm about {w}.",
    "Describe a curious robot who loves {w}.",
]
DOWN_TEMPLATES = [
    "What is {a} plus {b}? Numbers: {a} {b}",
    "Count from {a} to {b}: one two three",
    "How many legs does a spider have? {a} or {b}",
    "def add(a, b): return a + b. print({a}, {b})",
]
TOPICS = ["music", "art", "science", "history", "physics", "poetry", "biology", "geography",
          "chemistry", "mathematics", "the fox", "the dog", "Paris", "France", "a robot", "rain"]


# The synthetic task is a plain SteeringTask (strength 5, evidence = the probe).
SyntheticTask = SteeringTask


def make_questions(n: int, seed: int) -> list[dict]:
    """``n`` questions, alternating up/down types."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        kind = "up" if i % 2 == 0 else "down"
        if kind == "up":
            t = UP_TEMPLATES[int(torch.randint(len(UP_TEMPLATES), (1,), generator=g))]
            w = TOPICS[int(torch.randint(len(TOPICS), (1,), generator=g))]
            text = t.format(w=w)
        else:
            t = DOWN_TEMPLATES[int(torch.randint(len(DOWN_TEMPLATES), (1,), generator=g))]
            a, b = (int(x) for x in torch.randint(0, 10, (2,), generator=g))
            text = t.format(a=a, b=b)
        out.append({"prompt": text, "ground_truth": kind, "data_source": kind})
    return out


def probe_token_sets(model: Any, tokenizer: Any, sae: Any, feature: int, layer: int,
                     strength: float = 5.0, top: int = 8, new_tokens: int = 12,
                     seed: int = 0) -> tuple[dict[str, list[int]], dict]:
    """Tokens promoted by pushing ``feature`` up (+strength) and down (-strength)
    on 32 task-style prompts (``probe.probe_feature``), and the probe."""
    from sae_fast.train.probe import probe_feature

    prompts = [q["prompt"] for q in make_questions(32, seed + 1000)]
    info = probe_feature(model, tokenizer, sae, feature, layer, strength, prompts,
                         new_tokens=new_tokens, top=top, seed=seed, add_special_tokens=True)
    return {"up": info["up"], "down": info["down"]}, info


def build_synthetic_task(folder: Any, *, arch: str = "llama", feature: int = 3, layer: int = -1,
                         n_train: int = 32, n_val: int = 32, seed: int = 0, d_sae: int = 512,
                         model: Any = None, tokenizer: Any = None) -> SyntheticTask:
    """Build (or reuse) the tiny model, a random SAE, data files and token sets."""
    from sae_fast.generate import load_hf
    from sae_fast.models import tiny_model
    from sae_fast.sae import random_sae, save_sae

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model_path = str(tiny_model(arch))
    if model is None:
        model, tokenizer = load_hf(model_path)
    hidden = int(model.config.hidden_size)
    sae = random_sae(hidden, d_sae, seed=seed)
    sae_path = str(save_sae(sae, folder / "sae"))
    token_sets, info = probe_token_sets(model, tokenizer, sae, feature, layer, seed=seed)
    log.info("synthetic task: token sets %s, probe %s", token_sets, info)
    for name, n, s in (("train.jsonl", n_train, seed), ("val.jsonl", n_val, seed + 1)):
        rows = make_questions(n, s)
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return SyntheticTask(model_path=model_path, sae_path=sae_path,
                         train_path=str(folder / "train.jsonl"), val_path=str(folder / "val.jsonl"),
                         feature=feature, layer=layer, token_sets=token_sets, evidence=info)
