#!/usr/bin/env bash
# Compile-only check of the CUDA kernels (csrc/cuda/*.cu) on a machine without
# a GPU: builds sae_fast._C with SAE_FAST_CUDA=ON against a CUDA build of
# torch in a separate venv, then checks that the library carries the CUDA
# kernels and registers them with the dispatcher. Nothing runs on a GPU.
#
#   scripts/cuda_compile_check.sh            (CI calls it after the CPU tests)
#
# Environment (all optional):
#   SAE_FAST_CUDA_VENV     venv with the CUDA torch        (default: .venv-cuda)
#   SAE_FAST_CUDA_TORCH    pip requirement for that torch  (default: torch==2.14.1)
#   SAE_FAST_CUDA_BUILD    CMake build folder              (default: build-cuda)
#   CUDA_HOME              CUDA toolkit; otherwise derived from the nvcc on PATH
#                          (which may be a one-line wrapper naming the real one)
#   TORCH_CUDA_ARCH_LIST   (default: 9.0)    MAX_JOBS (default: 2)
#
# The build folder is kept between runs (ninja rebuilds only what changed);
# it is wiped and configured again once if configuring fails. The main venv
# and its build are never touched.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SAE_FAST_CUDA_VENV:-$ROOT/.venv-cuda}"
TORCH_REQ="${SAE_FAST_CUDA_TORCH:-torch==2.14.1}"
BUILD="${SAE_FAST_CUDA_BUILD:-$ROOT/build-cuda}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-2}"
LOG_DIR="$BUILD/logs"
T_START=$SECONDS

say() { echo "[cuda_compile_check] $*"; }
die() { echo "[cuda_compile_check] ERROR: $*" >&2; exit 1; }
elapsed() { echo "$((SECONDS - T_START))s"; }

# ------------------------------------------------------------------ 1. venv
VENV_CHECK='
import importlib.util
import sys

import torch

req = sys.argv[1]
ok = torch.version.cuda is not None
if req.startswith("torch=="):
    ok = ok and torch.__version__.split("+")[0] == req[len("torch=="):]
ok = ok and all(importlib.util.find_spec(m) is not None for m in ("cmake", "ninja"))
print(torch.__version__)
sys.exit(0 if ok else 1)
'
TORCH_VERSION=""
venv_ok() {
  [[ -x "$VENV/bin/python" ]] || return 1
  # pipefail: the status is python's (tail only keeps its last line)
  TORCH_VERSION="$("$VENV/bin/python" -c "$VENV_CHECK" "$TORCH_REQ" 2>/dev/null | tail -1)"
}
if ! venv_ok; then
  say "creating $VENV with $TORCH_REQ (CUDA build, ~5 GB; log: $VENV.install.log)"
  [[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV"
  "$VENV/bin/pip" install --disable-pip-version-check "$TORCH_REQ" cmake ninja setuptools wheel \
    >"$VENV.install.log" 2>&1 || { tail -20 "$VENV.install.log" >&2; die "pip install failed"; }
  venv_ok || die "$VENV has no CUDA build of $TORCH_REQ with cmake and ninja"
fi
PY="$VENV/bin/python"
CMAKE="$VENV/bin/cmake"
NINJA="$VENV/bin/ninja"
say "venv ok (torch $TORCH_VERSION) at $(elapsed)"

# ------------------------------------------------------------------ 2. toolkit
source "$ROOT/scripts/cuda_home.sh"
CUDA_HOME="$(find_cuda_home)"
[[ -n "$CUDA_HOME" ]] || die "no CUDA toolkit found (set CUDA_HOME)"
export CUDA_HOME
say "CUDA_HOME=$CUDA_HOME ($("$CUDA_HOME/bin/nvcc" --version | tail -1))"

# ------------------------------------------------------------------ 3. configure
configure() {
  mkdir -p "$BUILD" "$LOG_DIR"
  "$CMAKE" -S "$ROOT" -B "$BUILD" -G Ninja \
    -DCMAKE_MAKE_PROGRAM="$NINJA" \
    -DCMAKE_BUILD_TYPE=Release \
    -DSAE_FAST_CUDA=ON \
    -DPython_EXECUTABLE="$PY" \
    -DCMAKE_CUDA_COMPILER="$CUDA_HOME/bin/nvcc" \
    -DCUDA_TOOLKIT_ROOT_DIR="$CUDA_HOME" \
    -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$BUILD" \
    >"$LOG_DIR/configure.log" 2>&1
}
mkdir -p "$LOG_DIR"
if ! configure; then
  say "configure failed; wiping $BUILD and trying once more"
  rm -rf "$BUILD"
  configure || { cat "$LOG_DIR/configure.log" >&2; die "cmake configure failed"; }
fi
grep -q "building CPU + CUDA kernels" "$LOG_DIR/configure.log" \
  || { cat "$LOG_DIR/configure.log" >&2; die "configure did not enable the CUDA kernels"; }
say "configured at $(elapsed)"

# ------------------------------------------------------------------ 4. build
if ! "$CMAKE" --build "$BUILD" -j "$MAX_JOBS" >"$LOG_DIR/build.log" 2>&1; then
  grep -n -E "error|FAILED" "$LOG_DIR/build.log" | head -60 >&2 || true
  tail -30 "$LOG_DIR/build.log" >&2
  die "build failed (full log: $LOG_DIR/build.log)"
fi
SO="$BUILD/_C.so"
[[ -f "$SO" ]] || die "no $SO after the build"
if grep -q "warning" "$LOG_DIR/build.log"; then
  say "compiler warnings:"
  grep -n "warning" "$LOG_DIR/build.log" | head -20
fi
say "built $SO at $(elapsed)"

# ------------------------------------------------------------------ 5. checks
# 5a. host launch stubs for every kernel instantiation (3 dtypes x {16-byte
#     loads with 1, 4, 8 rows per block; scalar loads}), and device code in
#     the fat binary.
n_kernels="$(nm -C "$SO" | grep -o 'steer_kernel<[^(]*>' | sort -u | wc -l)"
[[ "$n_kernels" -ge 12 ]] || die "expected 12 steer_kernel instantiations in $SO, found $n_kernels"
FATBIN_CHECK='
import subprocess
import sys

so = sys.argv[1]
out = subprocess.run(["readelf", "-S", "-W", so], capture_output=True, text=True, check=True).stdout
sec = [line.split("]", 1)[1].split() for line in out.splitlines() if " .nv_fatbin " in line + " "]
if not sec:
    sys.exit(f"{so} has no .nv_fatbin section")
off, size = int(sec[0][3], 16), int(sec[0][4], 16)
with open(so, "rb") as f:
    f.seek(off)
    fatbin = f.read(size)
if fatbin[:4] != bytes.fromhex("50ed55ba"):
    sys.exit("the .nv_fatbin section does not start with the fatbin magic")
n = fatbin.count(b"steer_kernel")
print(f"[cuda_compile_check] fatbin {size / 1e6:.1f} MB; device code names steer_kernel "
      f"{n} times (0 if compressed)")
'
"$PY" -c "$FATBIN_CHECK" "$SO" || die "no CUDA device code in $SO"
say "$n_kernels steer_kernel instantiations"

# 5b. the library loads (no GPU needed) and registers CUDA kernels for every op.
REG_CHECK='
import sys
import warnings

warnings.filterwarnings("ignore")
import torch

torch.ops.load_library(sys.argv[1])
info = torch.ops.sae_fast.build_info()
assert info == "cpu,cuda", f"build_info() = {info!r}, expected cpu,cuda"
for op in ("steer_", "clamp_direction_", "add_vectors_"):
    for key in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"sae_fast::{op}", key), \
            f"sae_fast::{op} has no {key} kernel"
assert torch._C._dispatch_has_kernel_for_dispatch_key("sae_fast::count_",
                                                      "CompositeExplicitAutograd"), \
    "sae_fast::count_ has no CompositeExplicitAutograd kernel"
print(f"[cuda_compile_check] registrations ok: build_info={info!r}, CPU and CUDA kernels for "
      f"3 ops, count_ for every device (torch {torch.__version__}, CUDA {torch.version.cuda})")
'
if ! out="$("$PY" -c "$REG_CHECK" "$SO" 2>&1)"; then
  echo "$out" >&2
  die "registration check failed"
fi
echo "$out" | grep -v -i "numpy" || true

say "OK in $(elapsed)"
