"""sae_fast data files (JSONL / JSON / parquet, as ``sae-fast train`` reads
them) -> verl's RLHF parquet format (what ``RLHFDataset`` and verl's reward
managers read): ``data_source``, ``prompt`` (chat messages), ``ability``,
``reward_model {style, ground_truth}``, ``extra_info {split, index, ...}``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence, Union

from sae_fast.train.data import load_dataset


def to_verl_rows(paths: Union[str, Path, Sequence[Union[str, Path]]], split: str, **kw) -> list[dict]:
    rows = []
    for ex in load_dataset(paths, **kw):
        prompt = ex.prompt if isinstance(ex.prompt, list) else [{"role": "user", "content": ex.prompt}]
        gt = ex.ground_truth
        rows.append({"data_source": ex.data_source, "prompt": prompt, "ability": "sae_steering",
                     "reward_model": {"style": "rule",
                                      "ground_truth": gt if isinstance(gt, str) else json.dumps(gt)},
                     "extra_info": {"split": split, "index": ex.index,
                                    "sae_fast": json.dumps(ex.extra_info, default=str)}})
    return rows


def write_verl_parquet(paths, out: Union[str, Path], split: str = "train", **kw) -> Path:
    """Convert and write atomically; returns the parquet path."""
    import pandas as pd

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.parquet")
    pd.DataFrame(to_verl_rows(paths, split, **kw)).to_parquet(tmp, index=False)
    tmp.replace(out)
    return out
