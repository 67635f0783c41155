"""Build the offline English corpus used to train the demo SAE.

Text = docstrings of the installed Python packages (``ast.get_docstring``,
modules are parsed, never imported) plus every ``*.dist-info/METADATA``.
Tokenised with the SmolLM2 tokenizer into fixed ``context_size`` windows
(BOS first), shuffled with a fixed seed, split into train / held-out and
saved as ``datasets`` folders with one ``input_ids`` column.

    python scripts/build_demo_corpus.py --out /tmp/sfcache/demo_corpus
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import logging
import random
import site
import sys
import time
from pathlib import Path

log = logging.getLogger("build_demo_corpus")


def iter_texts(roots: list[Path], max_file_bytes: int = 400_000):
    """Yield (source, text) pairs: module/class/function docstrings and METADATA."""
    seen: set[str] = set()
    for root in roots:
        for meta in sorted(root.glob("*.dist-info/METADATA")):
            yield str(meta), meta.read_text(errors="ignore")
        for py in sorted(root.rglob("*.py")):
            try:
                if py.stat().st_size > max_file_bytes:
                    continue
                tree = ast.parse(py.read_text(errors="ignore"))
            except (SyntaxError, ValueError, OSError, RecursionError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if not doc or len(doc) < 80:
                        continue
                    h = hashlib.md5(doc.encode()).hexdigest()
                    if h in seen:  # vendored copies repeat the same text
                        continue
                    seen.add(h)
                    yield str(py), doc


class WindowPacker:
    """Texts -> windows of ``context_size`` token ids, each starting with BOS, documents
    joined by EOS and split across windows (the tail that fills no window is dropped)."""

    def __init__(self, tok, context_size: int):
        self.tok, self.body = tok, context_size - 1
        self.bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        self.windows: list[list[int]] = []
        self._buf: list[int] = []

    def add(self, texts: list[str]) -> None:
        for ids in self.tok(list(texts), add_special_tokens=False)["input_ids"]:
            self._buf.extend(ids + [self.tok.eos_token_id])
        while len(self._buf) >= self.body:
            self.windows.append([self.bos] + self._buf[:self.body])
            self._buf = self._buf[self.body:]


def save_windows(windows: list[list[int]], out: Path, heldout_frac: float, seed: int) -> int:
    """Shuffle ``windows`` (seeded) and save them as ``out/train`` and ``out/heldout`` (the
    format ``train_demo_sae.py`` and ``sae_card.py`` read); returns the held-out count."""
    import datasets

    random.Random(seed).shuffle(windows)
    n_held = max(1, int(len(windows) * heldout_frac))
    out.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict({"input_ids": windows[n_held:]}).save_to_disk(str(out / "train"))
    datasets.Dataset.from_dict({"input_ids": windows[:n_held]}).save_to_disk(str(out / "heldout"))
    return n_held


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--model", default=None, help="SmolLM2 folder (default: sae_fast.models.smollm2())")
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=8_000_000)
    p.add_argument("--heldout-frac", type=float, default=0.02)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from transformers import AutoTokenizer

    from sae_fast.models import smollm2

    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(args.model or str(smollm2()))
    roots = [Path(p) for p in site.getsitepackages()] + [Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"]
    roots = [r for r in dict.fromkeys(roots) if r.is_dir()]
    packer = WindowPacker(tok, args.context_size)
    windows, batch, n_docs = packer.windows, [], 0
    for _, text in iter_texts(roots):
        batch.append(text)
        n_docs += 1
        if len(batch) >= 512:
            packer.add(batch)
            batch.clear()
            if len(windows) * args.context_size >= args.max_tokens:
                break
    if batch:
        packer.add(batch)
    n_held = save_windows(windows, Path(args.out), args.heldout_frac, args.seed)
    log.info("%d docs -> %d windows of %d tokens (%d held out), %.1fM tokens, %.0f s",
             n_docs, len(windows), args.context_size, n_held,
             len(windows) * args.context_size / 1e6, time.time() - t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
