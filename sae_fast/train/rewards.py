"""Reward functions with verl's signature::

    fn(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> float | dict

A dict must carry ``score``; its other numeric entries are logged as extra
metrics. Built-ins:

    exact_match       normalised string equality (also against the text after ``####``)
    gsm8k             the number after ``#### `` (strict) or the last number (flexible)
    keyword           fraction of ground-truth keywords present, or a weighted lexicon
    token_preference  +1/-1 per generated token id in a wanted/unwanted set (synthetic tasks)
    vader             VADER's compound sentiment score (vaderSentiment), signed by ground_truth
    by_data_source    routes each sample to one of the above by its data_source
    verl              verl.utils.reward_score.default_compute_score (needs verl)

Anything else is ``module.path:function`` or ``path/to/file.py:function``.
``RewardConfig.kwargs`` are passed to the function as keyword arguments.
The trainer puts ``response_ids`` (generated token ids) and ``prompt`` into
``extra_info`` next to the dataset's own extra_info.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import math
import re
import string
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

log = logging.getLogger(__name__)


class RewardError(ValueError):
    """Unknown reward function or a reward function that misbehaved."""


# --------------------------------------------------------------------------- helpers
_PUNCT = str.maketrans("", "", string.punctuation)
_NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def normalize_text(s: Any) -> str:
    s = str(s).lower().translate(_PUNCT)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _to_number(text: str) -> Optional[float]:
    t = text.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        return float(t)
    except ValueError:
        return None


def extract_hash_answer(text: str) -> Optional[str]:
    """The answer after the last ``####`` (GSM8K convention), or None."""
    if "####" not in text:
        return None
    tail = text.rsplit("####", 1)[1].strip()
    m = _NUMBER.search(tail.replace("$", ""))
    return m.group(0).replace(",", "") if m else (tail.split("\n")[0].strip() or None)


# --------------------------------------------------------------------------- built-ins
def exact_match(data_source: str, solution_str: str, ground_truth: Any,
                extra_info: Optional[dict] = None, **_: Any) -> float:
    truth = extract_hash_answer(str(ground_truth)) or str(ground_truth)
    candidates = [solution_str]
    hashed = extract_hash_answer(solution_str)
    if hashed is not None:
        candidates.append(hashed)
    want = normalize_text(truth)
    return 1.0 if any(normalize_text(c) == want for c in candidates) else 0.0


def gsm8k(data_source: str, solution_str: str, ground_truth: Any,
          extra_info: Optional[dict] = None, method: str = "strict", format_score: float = 0.0,
          score: float = 1.0, **_: Any) -> float:
    """``method``: strict (needs ``#### N``) or flexible (the last number)."""
    if method not in ("strict", "flexible"):
        raise RewardError(f"gsm8k method={method!r}; expected strict or flexible")
    truth_text = extract_hash_answer(str(ground_truth)) or str(ground_truth)
    truth = _to_number(truth_text)
    answer = extract_hash_answer(solution_str)
    if answer is None and method == "flexible":
        nums = _NUMBER.findall(solution_str.replace("$", ""))
        answer = nums[-1].replace(",", "") if nums else None
    if answer is None:
        return 0.0
    value = _to_number(answer)
    if truth is None or value is None:
        return score if normalize_text(answer) == normalize_text(truth_text) else format_score
    return score if math.isclose(value, truth, rel_tol=0, abs_tol=1e-6) else format_score


def keyword(data_source: str, solution_str: str, ground_truth: Any,
            extra_info: Optional[dict] = None, lexicon: Optional[dict] = None,
            per_word: bool = False, **_: Any) -> float:
    """With ``lexicon`` ({word: weight}): the weighted count of lexicon words in
    the solution (divided by its word count when ``per_word``). Otherwise:
    the fraction of ground-truth keywords (a list, or a comma/pipe separated
    string) that appear as whole words."""
    words = re.findall(r"[\w']+", solution_str.lower())
    if lexicon:
        weights = {str(k).lower(): float(v) for k, v in lexicon.items()}
        total = sum(weights.get(w, 0.0) for w in words)
        return total / max(len(words), 1) if per_word else total
    if isinstance(ground_truth, str):
        keys = [k.strip() for k in re.split(r"[|,]", ground_truth) if k.strip()]
    else:
        keys = [str(k) for k in (ground_truth or [])]
    if not keys:
        return 0.0
    present = set(words)
    text = " " + " ".join(words) + " "
    hits = sum(1 for k in keys if (k.lower() in present or f" {k.lower()} " in text))
    return hits / len(keys)


def token_preference(data_source: str, solution_str: str, ground_truth: Any,
                     extra_info: Optional[dict] = None, token_sets: Optional[dict] = None,
                     **_: Any) -> float:
    """Mean over generated tokens of +1 (token in the wanted set) / -1 (token in
    any other set): ``token_sets`` maps a name to token ids and ``ground_truth``
    names the wanted set. Needs ``extra_info["response_ids"]``."""
    if not token_sets:
        raise RewardError("token_preference needs reward.kwargs.token_sets: {name: [token ids]}")
    want = str(ground_truth)
    if want not in token_sets:
        raise RewardError(f"token_preference: ground_truth {want!r} is not a token set name; "
                          f"expected one of {sorted(token_sets)}")
    ids = (extra_info or {}).get("response_ids")
    if ids is None:
        raise RewardError("token_preference needs extra_info['response_ids'] (the generated ids)")
    ids = [int(i) for i in ids]
    if not ids:
        return 0.0
    good = set(int(i) for i in token_sets[want])
    bad = set(int(i) for name, s in token_sets.items() if name != want for i in s) - good
    return (sum(i in good for i in ids) - sum(i in bad for i in ids)) / len(ids)


_VADER: list = []  # the one SentimentIntensityAnalyzer (loading its lexicon takes ~0.1 s)


def vader(data_source: str, solution_str: str, ground_truth: Any,
          extra_info: Optional[dict] = None, **_: Any) -> dict:
    """VADER's compound score of the text (vaderSentiment, in [-1, 1]); for
    ``ground_truth`` "negative" its negation, so higher is always better.
    Also reports the raw ``compound``."""
    want = str(ground_truth).lower()
    if want not in ("positive", "negative"):
        raise RewardError(f"vader: ground_truth {ground_truth!r}; expected 'positive' or "
                          "'negative' (the sentiment to steer towards)")
    if not _VADER:
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError as err:
            raise RewardError("reward 'vader' needs the vaderSentiment package "
                              "(pip install vaderSentiment)") from err
        _VADER.append(SentimentIntensityAnalyzer())
    compound = float(_VADER[0].polarity_scores(solution_str)["compound"])
    return {"score": compound if want == "positive" else -compound, "compound": compound}


def verl_default(data_source: str, solution_str: str, ground_truth: Any,
                 extra_info: Optional[dict] = None, **kwargs: Any):
    fn = _verl_default_compute_score()
    return fn(data_source, solution_str, ground_truth, extra_info, **kwargs)


def _verl_default_compute_score() -> Callable:
    try:
        from verl.utils.reward_score import default_compute_score
    except ImportError as err:
        raise RewardError("reward 'verl' needs verl installed (verl.utils.reward_score."
                          "default_compute_score); pick a built-in reward or install verl") from err
    return default_compute_score


def by_data_source(data_source: str, solution_str: str, ground_truth: Any,
                   extra_info: Optional[dict] = None, routes: Optional[dict] = None,
                   default: Any = None, **_: Any):
    """Route each sample to a reward by its data_source (like verl's default).

    ``routes``: {data_source: name or {"name": ..., "kwargs": {...}}};
    ``default``: the same for unlisted sources (error when missing)."""
    target = (routes or {}).get(data_source, default)
    if target is None:
        raise RewardError(f"by_data_source: no route for data_source {data_source!r} and no "
                          f"default; routes: {sorted(routes or {})}")
    name, kw = (target.get("name"), target.get("kwargs") or {}) if isinstance(target, dict) \
        else (target, {})
    if name == "by_data_source":
        raise RewardError("by_data_source cannot route to itself")
    return resolve(str(name))(data_source, solution_str, ground_truth, extra_info, **kw)


BUILTINS: dict[str, Callable] = {
    "by_data_source": by_data_source,
    "exact_match": exact_match,
    "gsm8k": gsm8k,
    "keyword": keyword,
    "lexicon": keyword,
    "token_preference": token_preference,
    "vader": vader,
    "verl": verl_default,
}


# --------------------------------------------------------------------------- resolution
def resolve(name: str) -> Callable:
    """A reward callable from a built-in name, ``module.path:function`` or
    ``path/to/file.py:function``."""
    if name in BUILTINS:
        if name == "verl":
            _verl_default_compute_score()  # fail now, not at the first rollout
        return BUILTINS[name]
    if ":" not in name:
        raise RewardError(f"unknown reward function {name!r}; expected one of "
                          f"{', '.join(sorted(BUILTINS))}, 'module.path:function' or "
                          "'path/to/file.py:function'")
    target, func = name.rsplit(":", 1)
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise RewardError(f"reward function file {target!r} does not exist (from {name!r})")
        spec = importlib.util.spec_from_file_location(f"_sae_fast_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as err:
            raise RewardError(f"reward function file {target!r} failed to import: "
                              f"{type(err).__name__}: {err}") from err
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as err:
            raise RewardError(f"reward function module {target!r} cannot be imported "
                              f"(from {name!r}): {err}") from err
    fn = getattr(module, func, None)
    if fn is None or not callable(fn):
        raise RewardError(f"reward function {func!r} not found in {target!r} (from {name!r})")
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return fn
    positional = [p for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) < 3 and not any(p.kind == p.VAR_POSITIONAL for p in params.values()):
        raise RewardError(f"reward function {name!r} takes {len(positional)} positional arguments; "
                          "expected verl's fn(data_source, solution_str, ground_truth, extra_info)")
    return fn


class RewardFunction:
    """Scores a batch; normalises float/dict returns; validates the scores."""

    def __init__(self, name_or_fn: Union[str, Callable] = "exact_match",
                 kwargs: Optional[dict] = None) -> None:
        self.fn = resolve(name_or_fn) if isinstance(name_or_fn, str) else name_or_fn
        self.name = name_or_fn if isinstance(name_or_fn, str) else \
            getattr(name_or_fn, "__name__", "custom")
        self.kwargs = dict(kwargs or {})

    def score_one(self, data_source: str, solution_str: str, ground_truth: Any,
                  extra_info: Optional[dict] = None) -> tuple[float, dict]:
        try:
            res = self.fn(data_source, solution_str, ground_truth, extra_info, **self.kwargs)
        except RewardError:
            raise
        except Exception as err:
            raise RewardError(f"reward function {self.name!r} raised {type(err).__name__}: {err} "
                              f"(data_source={data_source!r})") from err
        extras: dict = {}
        if isinstance(res, dict):
            if "score" not in res:
                raise RewardError(f"reward function {self.name!r} returned a dict without 'score' "
                                  f"(keys {sorted(res)})")
            extras = {k: float(v) for k, v in res.items()
                      if k != "score" and isinstance(v, (int, float)) and not isinstance(v, bool)}
            res = res["score"]
        try:
            value = float(res)
        except (TypeError, ValueError) as err:
            raise RewardError(f"reward function {self.name!r} returned {res!r}; expected a number "
                              "or a dict with 'score'") from err
        if not math.isfinite(value):
            raise RewardError(f"reward function {self.name!r} returned {value} (not finite)")
        return value, extras

    def __call__(self, data_sources: Sequence[str], solutions: Sequence[str],
                 ground_truths: Sequence[Any], extra_infos: Sequence[Optional[dict]]
                 ) -> tuple[list[float], dict[str, float]]:
        scores: list[float] = []
        sums: dict[str, float] = {}
        for ds, sol, gt, ex in zip(data_sources, solutions, ground_truths, extra_infos):
            value, extras = self.score_one(ds, sol, gt, ex)
            scores.append(value)
            for k, v in extras.items():
                sums[k] = sums.get(k, 0.0) + v
        n = max(len(scores), 1)
        return scores, {k: v / n for k, v in sums.items()}


def reward_from_config(cfg: Any) -> RewardFunction:
    """From an :class:`sae_fast.config.RewardConfig`."""
    return RewardFunction(cfg.name, cfg.kwargs)
