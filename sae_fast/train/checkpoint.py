"""Atomic training checkpoints.

Layout under ``<output_dir>/checkpoints/``::

    step_00000010/
        predictor/predictor.safetensors + predictor_config.json
        best_predictor/        (trainer.keep_best) the best predictor so far
        optimizer.pt           AdamW state (weights_only loadable)
        trainer_state.json     step, updater state, config, ...
        manifest.json          sha256 + size of every file above (written last)
    latest                     name of the newest complete checkpoint

A checkpoint is built in a hidden temporary folder, fsynced, then renamed into
place (``os.replace``), and ``latest`` is rewritten through a temporary file
+ ``os.replace``: a kill at any moment leaves either the previous checkpoint
or the new one, never a half-written one. Loading verifies the manifest and
names the first bad file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from sae_fast.checks import atomic_dir, atomic_write

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step_(\d{8})$")
LATEST = "latest"
MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt; the message names the file."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class CheckpointManager:
    def __init__(self, root: os.PathLike, keep: int = 3) -> None:
        self.root = Path(root)
        self.keep = max(1, int(keep))
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(".tmp-*"):  # leftovers of a kill during save
            shutil.rmtree(stale, ignore_errors=True)

    # ------------------------------------------------------------------ save
    def save(self, step: int, predictor: Any, optimizer: Optional[torch.optim.Optimizer],
             state: dict, best_predictor: Any = None) -> Path:
        """``best_predictor``: the predictor kept by ``trainer.keep_best`` so far
        (saved beside the current one, so a resumed run keeps its choice)."""
        name = f"step_{int(step):08d}"

        def build(tmp: Path) -> None:
            if predictor is not None:
                predictor.save(tmp / "predictor")
            if best_predictor is not None:
                best_predictor.save(tmp / "best_predictor")
            if optimizer is not None:
                torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            (tmp / "trainer_state.json").write_text(json.dumps({**state, "step": int(step)},
                                                               indent=2, default=str))
            files = sorted(p for p in tmp.rglob("*") if p.is_file())
            manifest = {str(p.relative_to(tmp)): {"sha256": _sha256(p), "bytes": p.stat().st_size}
                        for p in files}
            (tmp / MANIFEST).write_text(json.dumps({"step": int(step), "files": manifest}, indent=2))

        # re-saving a step (after resuming from an older one) replaces it
        final = atomic_dir(self.root / name, build, replace=True)
        atomic_write(self.root / LATEST, name + "\n")
        self._prune(int(step))
        return final

    def _prune(self, saved: int) -> None:
        """Keep the ``keep`` newest checkpoints up to the one just saved; those
        of later steps belong to an attempt this run resumed before, and are
        redone. The checkpoint ``latest`` names is never deleted."""
        steps = self.list()
        newer = [p for p in steps if int(STEP_DIR.match(p.name).group(1)) > saved]
        kept = [p for p in steps if p not in newer]
        for path in newer + kept[:-self.keep]:
            shutil.rmtree(path, ignore_errors=True)

    # ------------------------------------------------------------------ find / load
    def list(self) -> list[Path]:
        """Complete checkpoints (with a manifest), oldest first."""
        out = []
        for p in self.root.iterdir() if self.root.exists() else []:
            m = STEP_DIR.match(p.name)
            if m and p.is_dir() and (p / MANIFEST).is_file():
                out.append((int(m.group(1)), p))
        return [p for _, p in sorted(out)]

    def latest(self) -> Optional[Path]:
        pointer = self.root / LATEST
        if pointer.is_file():
            name = pointer.read_text().strip()
            path = self.root / name
            if not STEP_DIR.match(name):
                raise CheckpointError(f"{pointer}: names {name!r}, not a checkpoint folder")
            if not path.is_dir():
                raise CheckpointError(f"{pointer} names {name} but {path} does not exist")
            return path
        found = self.list()
        return found[-1] if found else None

    def verify(self, path: Path) -> dict:
        path = Path(path)
        mpath = path / MANIFEST
        if not mpath.is_file():
            raise CheckpointError(f"{path}: no {MANIFEST}; the checkpoint is incomplete")
        try:
            manifest = json.loads(mpath.read_text())
            files = manifest["files"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{mpath}: unreadable manifest ({err})") from err
        for rel, meta in files.items():
            f = path / rel
            if not f.is_file():
                raise CheckpointError(f"{f}: listed in the manifest but missing")
            if f.stat().st_size != meta["bytes"] or _sha256(f) != meta["sha256"]:
                raise CheckpointError(f"{f}: contents do not match the manifest (corrupt checkpoint)")
        return manifest

    def load_valid(self) -> Optional[dict]:
        """The newest checkpoint that verifies and reads, for a resume: a
        corrupt or missing latest one is refused with a warning naming it and
        the reason, and the previous one is used. None when there is none at
        all; CheckpointError (with every reason) when none is readable."""
        candidates: list[Path] = []
        reasons: list[str] = []
        try:
            latest = self.latest()
            if latest is not None:
                candidates.append(latest)
        except CheckpointError as err:
            reasons.append(str(err))
        candidates += [p for p in reversed(self.list()) if p not in candidates]
        for path in candidates:
            try:
                ck = self.load(path)
            except CheckpointError as err:
                reasons.append(str(err))
                log.warning("checkpoint %s refused: %s; trying the previous one", path.name, err)
                continue
            if reasons:
                log.warning("resuming from %s instead of the latest checkpoint (%s)", path.name,
                            "; ".join(reasons))
            return ck
        if reasons:
            raise CheckpointError(f"no readable checkpoint under {self.root}: " + "; ".join(reasons))
        return None

    def load(self, path: Optional[Path] = None) -> dict:
        """Verify and read a checkpoint (default: the latest).

        Returns ``{"path", "state", "predictor", "best_predictor", "optimizer"}`` (each
        of the last three None when the checkpoint has none)."""
        from sae_fast.predictor import PredictorError, StrengthPredictor

        path = Path(path) if path is not None else self.latest()
        if path is None:
            raise CheckpointError(f"no checkpoint found under {self.root}")
        self.verify(path)
        try:
            state = json.loads((path / "trainer_state.json").read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{path / 'trainer_state.json'}: unreadable ({err})") from err
        found = {}
        for key in ("predictor", "best_predictor"):
            found[key] = None
            if (path / key).is_dir():
                try:
                    found[key] = StrengthPredictor.load(path / key)
                except PredictorError as err:
                    raise CheckpointError(str(err)) from err
        optimizer = None
        if (path / "optimizer.pt").is_file():
            try:
                optimizer = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
            except Exception as err:
                raise CheckpointError(f"{path / 'optimizer.pt'}: unreadable ({err})") from err
        return {"path": path, "state": state, **found, "optimizer": optimizer}
