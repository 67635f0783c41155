"""The package's one number validator and one atomic writer.

``finite`` checks numbers wherever a user can hand them in (specs, request
rows, strength rows, configs, predictor configs); ``atomic_write`` writes
every file the package persists (SAE folders, predictors, checkpoints, the
model cache), and ``atomic_dir`` builds whole folders the same way. A kill
at any moment leaves the previous file (or folder) or the new one, never a
half-written one.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence, Type, Union

import torch

Numbers = Union[float, int, Sequence[Any], torch.Tensor]


def finite(values: Numbers, name: str, error: Type[Exception] = ValueError,
           what: str = "values") -> Any:
    """``values`` as floats, refusing anything that is not a finite number.

    A scalar gives a float, a sequence a list of floats, a tensor a CPU fp32
    tensor (same shape). The error (of type ``error``) names the position
    and the value: ``strengths[1] = nan is not finite; NaN/inf strengths are
    never applied``."""
    if isinstance(values, torch.Tensor):
        row = values.detach().to(device="cpu", dtype=torch.float32)
        ok = torch.isfinite(row)
        if not bool(ok.all()):
            flat = row.reshape(-1)
            bad = int((~ok.reshape(-1)).nonzero()[0])
            where = f"{name}[{bad}]" if row.dim() else name
            raise error(f"{where} = {flat[bad].item()} is not finite; NaN/inf {what} are "
                        "never applied")
        return row
    if isinstance(values, (list, tuple)):
        return [_one(v, f"{name}[{i}]", error, what) for i, v in enumerate(values)]
    return _one(values, name, error, what)


def _one(value: Any, where: str, error: Type[Exception], what: str) -> float:
    if isinstance(value, bool):
        raise error(f"{where} = {value!r} is not a number")
    try:
        f = float(value)
    except (TypeError, ValueError) as err:
        raise error(f"{where} = {value!r} is not a number") from err
    if not math.isfinite(f):
        raise error(f"{where} = {f} is not finite; NaN/inf {what} are never applied")
    return f


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Union[str, os.PathLike], data: Union[str, bytes, Callable[[str], Any]]) -> Path:
    """Write ``path`` through a temporary file in its folder + ``os.replace``.

    ``data`` is text, bytes, or a callable that writes the temporary path it
    is given (``safetensors.save_file``, ``torch.save``...). The file is
    fsynced before the rename and the folder after it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        if callable(data):
            os.close(fd)
            data(tmp)
        else:
            with os.fdopen(fd, "w" if isinstance(data, str) else "wb") as fh:
                fh.write(data)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _fsync_dir(path.parent)
    return path


def atomic_dir(final: Union[str, os.PathLike], build: Callable[[Path], Any], *,
               replace: bool = False) -> Path:
    """Build a folder with ``build(tmp_folder)`` and rename it to ``final``.

    ``replace=False``: an existing ``final`` is kept and returned (a cache
    another process may have filled first). ``replace=True``: an existing
    ``final`` is swapped out and removed after the new one is in place.
    Every file is fsynced before the rename."""
    final = Path(final)
    if final.exists() and not replace:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".tmp-{final.name}-"))
    try:
        build(tmp)
        for p in tmp.rglob("*"):
            if p.is_file():
                with p.open("rb") as fh:
                    os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if final.exists():
            if not replace:
                return final
            trash = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".tmp-old-{final.name}-"))
            os.replace(final, trash / final.name)
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first
            if not final.exists():
                raise
        _fsync_dir(final.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
