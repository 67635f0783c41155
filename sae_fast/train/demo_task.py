"""The real demo task: SmolLM2-135M-Instruct steered with one feature of the
shipped SAE, where the right strength depends on the question.

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

The task ships as package data (found with ``importlib.resources``, so it
works from an installed wheel): the SAE folder ``sae_fast/assets/smollm2_sae``
(sae-lens format, its card, and ``demo_task.json``: feature, layer, strength,
word, reward token sets and the evidence behind them) and the questions
``sae_fast/assets/demo_data/demo_{train,val}.jsonl``. The feature was picked by
evidence, not by hand, by ``scripts/make_demo_task.py`` (candidate features
read through a logit lens, each probed by generating with strengths -S, 0,
+S; the one whose steering moves the most generated-token mass wins), which
also wrote the question files.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
from dataclasses import dataclass
from importlib.resources import as_file, files
from pathlib import Path
from typing import Optional, Union

from sae_fast.train.tasks import SteeringTask

log = logging.getLogger(__name__)

TASK_FILE = "demo_task.json"
SAE_ASSET = "smollm2_sae"
DATA_ASSET = "demo_data"

_extracted = contextlib.ExitStack()  # only used when the package is not on a real file system
atexit.register(_extracted.close)


def asset_path(*parts: str) -> Path:
    """A file-system path to ``sae_fast/assets/<parts...>``, the package data
    shipped with sae_fast (inside site-packages for an installed wheel)."""
    res = files("sae_fast") / "assets"
    for part in parts:
        res = res / part
    if isinstance(res, Path):
        return res
    # a zipped install: extract for the life of the process (directories: Python >= 3.12)
    return Path(_extracted.enter_context(as_file(res)))


def demo_sae_dir() -> Path:
    """The shipped SmolLM2 SAE folder (also holding ``demo_task.json``)."""
    return asset_path(SAE_ASSET)


def demo_data_dir() -> Path:
    """The folder of the shipped ``demo_{train,val}.jsonl`` question files."""
    return asset_path(DATA_ASSET)


@dataclass
class DemoTask(SteeringTask):
    """The shipped task; ``word`` is the word the questions ask for or forbid."""

    word: str = ""


def load_demo_task(sae_dir: Optional[Union[str, Path]] = None,
                   data_dir: Optional[Union[str, Path]] = None,
                   model_path: Optional[str] = None) -> DemoTask:
    """The shipped task: SAE folder + ``demo_task.json`` + the JSONL files
    (defaults: the package data, ``demo_sae_dir()`` and ``demo_data_dir()``)."""
    from sae_fast.models import smollm2

    sae_dir = Path(sae_dir) if sae_dir else demo_sae_dir()
    data_dir = Path(data_dir) if data_dir else demo_data_dir()
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
