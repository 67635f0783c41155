"""Builds sae_fast._C by driving CMakeLists.txt (the vLLM pattern).

Environment:
  SAE_FAST_CUDA=ON|OFF|AUTO   build the CUDA kernels (default AUTO)
  SAE_FAST_REQUIRE_EXT=1      fail the install if the extension fails to build
                              (CI sets it); otherwise the package installs and
                              falls back to Triton / pure torch at run time
  SAE_FAST_SKIP_EXT=1         do not build the extension at all
  MAX_JOBS                    parallel compile jobs
"""

import logging
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
log = logging.getLogger("sae_fast.setup")


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if os.environ.get("SAE_FAST_SKIP_EXT") == "1":
            print("sae_fast: SAE_FAST_SKIP_EXT=1, not building the extension", file=sys.stderr)
            return
        try:
            self._cmake_build(ext)
        except (subprocess.CalledProcessError, OSError) as err:
            if os.environ.get("SAE_FAST_REQUIRE_EXT") == "1":
                raise
            print(f"sae_fast: WARNING extension build failed ({err}); the package will use "
                  "the Triton / pure-torch paths. Set SAE_FAST_REQUIRE_EXT=1 to make this fatal.",
                  file=sys.stderr)

    def _cmake_build(self, ext: Extension) -> None:
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        cfg = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DSAE_FAST_CUDA={os.environ.get('SAE_FAST_CUDA', 'AUTO').upper()}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        try:
            import ninja  # noqa: F401

            cfg += ["-G", "Ninja"]
        except ImportError:
            pass
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.check_call(["cmake", str(ROOT), *cfg], cwd=build_dir)
        subprocess.check_call(["cmake", "--build", ".", "-j", jobs], cwd=build_dir)
        # Editable installs import from the source tree: put the library there too.
        if self.inplace or getattr(self, "editable_mode", False):
            src = out_dir / Path(self.get_ext_filename(ext.name)).name
            dst = ROOT / "sae_fast" / src.name
            if src.exists() and src.resolve() != dst.resolve():
                dst.write_bytes(src.read_bytes())

    def get_ext_filename(self, fullname: str) -> str:
        # CMake names the module plainly "_C.so" (no ABI tag).
        return os.path.join(*fullname.split(".")[:-1], fullname.split(".")[-1] + ".so")


from setuptools import find_packages  # noqa: E402

# The verl plugin's import name is sae_fast_verl; its source sits in integrations/verl/.
# The demo's shipped files (the SmolLM2 SAE, its card, the task and its questions),
# read at run time through importlib.resources (sae_fast.train.demo_task.asset_path):
# data-only folders, listed as packages so setuptools ships them as package data.
DATA_PACKAGES = ["sae_fast.assets", "sae_fast.assets.smollm2_sae", "sae_fast.assets.smollm2_sentiment_sae",
                 "sae_fast.assets.demo_data"]
PACKAGE_DATA = {"sae_fast.assets.smollm2_sae": ["*.json", "*.md", "*.safetensors"],
                "sae_fast.assets.smollm2_sentiment_sae": ["*.json", "*.md", "*.safetensors"],
                "sae_fast.assets.demo_data": ["*.jsonl"]}
PACKAGES = find_packages(include=["sae_fast*"]) + DATA_PACKAGES + ["sae_fast_verl"]
setup(ext_modules=[CMakeExtension("sae_fast._C")], cmdclass={"build_ext": CMakeBuild},
      packages=PACKAGES, package_dir={"sae_fast_verl": "integrations/verl/sae_fast_verl"},
      package_data=PACKAGE_DATA)
