"""Training/validation questions from JSONL, JSON or verl-style parquet.

Each record needs a prompt and a ground truth:

    prompt      ``prompt`` or ``question`` (a string, or a list of chat messages
                ``[{"role": "user", "content": ...}]`` as verl stores it)
    answer      ``answer``, ``ground_truth`` or ``reward_model.ground_truth``
    optional    ``data_source`` (default: the file's stem), ``extra_info`` (dict)

A malformed line gets an error naming the file and the line (row for
parquet). Batches are a deterministic function of (seed, step), so a resumed
run sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

log = logging.getLogger(__name__)

PROMPT_KEYS = ("prompt", "question")
ANSWER_KEYS = ("answer", "ground_truth")


class DataError(ValueError):
    """Missing or malformed data; the message names the file and line."""


@dataclass
class Example:
    prompt: Union[str, list]  # text or chat messages
    ground_truth: Any
    data_source: str
    extra_info: dict = field(default_factory=dict)
    index: int = 0
    source_file: str = ""

    @property
    def prompt_key(self) -> str:
        """A stable text key of the prompt (for caches and grouping)."""
        if isinstance(self.prompt, str):
            return self.prompt
        return json.dumps(self.prompt, sort_keys=True, ensure_ascii=False)


def _record_to_example(rec: Any, where: str, index: int, source: str,
                       prompt_key: Optional[str], answer_key: Optional[str]) -> Example:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    pkeys = (prompt_key,) if prompt_key else PROMPT_KEYS
    prompt = next((rec[k] for k in pkeys if k in rec), None)
    if prompt is None:
        raise DataError(f"{where}: no prompt field; expected one of {', '.join(pkeys)} "
                        f"(found keys {sorted(rec)})")
    prompt = _normalise_prompt(prompt, where)
    if answer_key:
        akeys: Sequence[str] = (answer_key,)
    else:
        akeys = ANSWER_KEYS
    truth = _missing = object()
    for k in akeys:
        node: Any = rec
        for part in k.split("."):
            node = node.get(part, _missing) if isinstance(node, dict) else _missing
        if node is not _missing:
            truth = node
            break
    if truth is _missing and not answer_key:
        rm = rec.get("reward_model")
        if isinstance(rm, dict) and "ground_truth" in rm:
            truth = rm["ground_truth"]
    if truth is _missing:
        want = ", ".join(akeys) + ("" if answer_key else " or reward_model.ground_truth")
        raise DataError(f"{where}: no answer field; expected {want} (found keys {sorted(rec)})")
    ds = rec.get("data_source", source)
    extra = rec.get("extra_info") or {}
    if not isinstance(extra, dict):
        raise DataError(f"{where}: extra_info must be an object, got {type(extra).__name__}")
    return Example(prompt=prompt, ground_truth=_plain(truth), data_source=str(ds),
                   extra_info=_plain(extra), index=index, source_file=source)


def _plain(value: Any) -> Any:
    """numpy arrays / scalars from parquet -> plain Python."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _normalise_prompt(prompt: Any, where: str) -> Union[str, list]:
    prompt = _plain(prompt)
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError(f"{where}: the prompt is empty")
        return prompt
    if isinstance(prompt, list) and prompt and all(
            isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in prompt]
    raise DataError(f"{where}: the prompt must be a string or a list of "
                    f"{{'role', 'content'}} messages, got {type(prompt).__name__} {str(prompt)[:80]!r}")


def load_examples(path: Union[str, Path], *, prompt_key: Optional[str] = None,
                  answer_key: Optional[str] = None, max_samples: Optional[int] = None
                  ) -> list[Example]:
    """Read one .jsonl / .json / .parquet file."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"data file {str(p)!r} does not exist")
    if p.is_dir():
        raise DataError(f"data path {str(p)!r} is a folder; expected a .jsonl, .json or .parquet file")
    source = p.stem
    out: list[Example] = []
    suffix = p.suffix.lower()
    if suffix == ".parquet":
        try:
            import pandas as pd

            frame = pd.read_parquet(p)
        except ImportError as err:
            raise DataError(f"{p}: reading parquet needs pandas and pyarrow") from err
        except Exception as err:
            raise DataError(f"{p}: not a readable parquet file ({err})") from err
        for i, rec in enumerate(frame.to_dict(orient="records")):
            out.append(_record_to_example(rec, f"{p}: row {i}", len(out), source, prompt_key,
                                          answer_key))
            if max_samples and len(out) >= max_samples:
                break
    elif suffix == ".json":
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as err:
            raise DataError(f"{p}: line {err.lineno}: not valid JSON ({err.msg})") from err
        if not isinstance(data, list):
            raise DataError(f"{p}: expected a JSON list of records, got {type(data).__name__}")
        for i, rec in enumerate(data):
            out.append(_record_to_example(rec, f"{p}: record {i}", len(out), source, prompt_key,
                                          answer_key))
            if max_samples and len(out) >= max_samples:
                break
    elif suffix in (".jsonl", ".ndjson"):
        with p.open("r", encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{p}:{lineno}: not valid JSON ({err.msg} at column "
                                    f"{err.colno})") from err
                out.append(_record_to_example(rec, f"{p}:{lineno}", len(out), source, prompt_key,
                                              answer_key))
                if max_samples and len(out) >= max_samples:
                    break
    else:
        raise DataError(f"{p}: unknown data format {suffix or '(no suffix)'!r}; expected .jsonl, "
                        ".json or .parquet")
    if not out:
        raise DataError(f"{p}: contains no records")
    return out


def load_dataset(paths: Union[str, Path, Sequence[Union[str, Path]]], **kw: Any) -> list[Example]:
    """Read and concatenate several files (indices renumbered)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise DataError("no data files given")
    max_samples = kw.pop("max_samples", None)
    out: list[Example] = []
    for path in paths:
        for ex in load_examples(path, **kw):
            ex.index = len(out)
            out.append(ex)
    return out[:max_samples] if max_samples else out


class BatchSchedule:
    """Question batches as a pure function of (seed, step): epoch ``e`` is a
    permutation seeded by (seed, e); step ``t`` takes the next ``batch_size``
    indices, wrapping into the next epoch. No state to save for resuming."""

    def __init__(self, n: int, batch_size: int, seed: int = 0, shuffle: bool = True) -> None:
        if n < 1:
            raise DataError("the training set is empty")
        self.n = int(n)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = shuffle
        self._perm: dict[int, list[int]] = {}

    def _epoch_order(self, epoch: int) -> list[int]:
        if epoch not in self._perm:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._perm[epoch] = torch.randperm(self.n, generator=g).tolist()
            else:
                self._perm[epoch] = list(range(self.n))
            if len(self._perm) > 4:
                self._perm.pop(min(self._perm))
        return self._perm[epoch]

    def batch(self, step: int) -> list[int]:
        start = step * self.batch_size
        return [self._epoch_order((start + j) // self.n)[(start + j) % self.n]
                for j in range(self.batch_size)]

    def epoch_of(self, step: int) -> float:
        return step * self.batch_size / self.n

    def steps_for_epochs(self, epochs: int) -> int:
        return max(1, -(-epochs * self.n // self.batch_size))


def format_prompt(example: Example, tokenizer: Any, chat_template: str = "auto") -> str:
    """The prompt text fed to the LLM (chat template applied when asked/available)."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    use = chat_template == "always" or (chat_template == "auto" and has_template)
    if chat_template == "always" and not has_template:
        raise DataError("data.chat_template=always but the tokenizer has no chat template")
    msgs = example.prompt if isinstance(example.prompt, list) else \
        [{"role": "user", "content": example.prompt}]
    if use:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    if isinstance(example.prompt, str):
        return example.prompt
    return "\n".join(m["content"] for m in msgs)
