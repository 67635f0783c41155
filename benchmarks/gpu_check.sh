#!/usr/bin/env bash
# The whole GPU check of the CUDA/Triton steering kernels, for the GPU machine
# (H100/H200, system python with a CUDA torch, nvcc, compute-sanitizer; no
# network, nothing installed):
#
#   benchmarks/gpu_check.sh OUTDIR
#
# Stages, in priority order (each logs to OUTDIR/<stage>.log, has its own time
# limit, and later stages are skipped once the overall budget is spent; a
# failing stage does not stop the others):
#   build        sae_fast._C with SAE_FAST_CUDA=ON, in place (cmake, or
#                torch.utils.cpp_extension when cmake is missing)
#   tests_cuda   pytest -m cuda python_tests/test_ops_cuda.py
#   memcheck     compute-sanitizer memcheck on small steer_/clamp/add cases
#   bench        benchmarks/bench_ops_gpu.py --json OUTDIR/bench_ops_gpu.json
#   hf_decode    benchmarks/bench_hf_gpu.py: one HF decode step, random Llama-3-8B
#                shapes in bf16, batch 1/64/256, unsteered/steered/full-SAE hook
#   tests_triton python_tests/test_ops_triton.py (compiled Triton, no interpreter)
#   racecheck    compute-sanitizer racecheck (shared-memory hazards), one case
#   predictor    benchmarks/bench_predictor.py --skip-train-step (CPU and CUDA rows)
# and prints a markdown table last (also OUTDIR/summary.md). Exit status: 0
# when every stage that ran passed.
#
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET_S (default 330),
# TORCH_CUDA_ARCH_LIST (default: the GPU's), CUDA_HOME (default: from nvcc).
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: $0 OUTDIR" >&2
  exit 2
fi
mkdir -p "$1"
OUT="$(cd "$1" && pwd)"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export OUT ROOT
export PY="${PYTHON:-python3}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET SAE_FAST_BACKEND SAE_FAST_CUDA_ROWS_PER_BLOCK SAE_FAST_CUDA_CLUSTER || true
BUDGET_S="${GPU_CHECK_BUDGET_S:-330}"
STAGES_TSV="$OUT/stages.tsv"
: >"$STAGES_TSV"
FAILED=0

# ------------------------------------------------------------------ helpers
source "$ROOT/scripts/cuda_home.sh"
CUDA_HOME="$(find_cuda_home || true)"
export CUDA_HOME
SANITIZER="$(command -v compute-sanitizer || true)"
for c in "$CUDA_HOME/bin/compute-sanitizer" "$CUDA_HOME/compute-sanitizer/compute-sanitizer"; do
  if [[ -z "$SANITIZER" && -x "$c" ]]; then SANITIZER="$c"; fi
done
export SANITIZER

# stage NAME MAX_SECONDS MIN_SECONDS FUNCTION: runs FUNCTION in a child bash
# under `timeout`, logs to $OUT/NAME.log and records its status.
stage() {
  local name=$1 max_s=$2 min_s=$3 fn=$4
  local left=$((BUDGET_S - SECONDS)) limit rc=0 t0 status
  if ((left < min_s)); then
    printf '%s\t%s\t%s\n' "$name" "skipped (time budget)" 0 >>"$STAGES_TSV"
    echo "=== [$name] skipped: ${left}s of the budget left"
    return 0
  fi
  limit=$((max_s < left ? max_s : left))
  export STAGE_LIMIT_S=$limit
  echo "=== [$name] (limit ${limit}s, ${SECONDS}s elapsed)"
  t0=$SECONDS
  timeout --kill-after=15 "$limit" bash -c "set -euo pipefail; $fn" >"$OUT/$name.log" 2>&1 || rc=$?
  if ((rc == 0)); then
    status=ok
  elif ((rc == 124 || rc == 137)); then
    status="timeout (${limit}s)"
    FAILED=1
  else
    status="FAIL (rc=$rc)"
    FAILED=1
  fi
  printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - t0))" >>"$STAGES_TSV"
  tail -n 25 "$OUT/$name.log" | sed "s/^/  [$name] /"
  echo "=== [$name] $status in $((SECONDS - t0))s"
}

# pytest without the repo's addopts (which name pytest-benchmark options that
# may not be installed here).
# pytest-xdist (when there) runs the tests in 4 processes: Triton compiles are
# CPU-bound, and a worker that crashes is replaced, so one native fault fails
# one test instead of ending the stage.
export PYTEST_ARGS="-q -ra -o addopts= -p no:cacheprovider"
if "$PY" -c "import xdist" 2>/dev/null; then PYTEST_ARGS="$PYTEST_ARGS -n 4"; fi

# ------------------------------------------------------------------ stages
build_with_cmake() {
  local gen="Unix Makefiles"
  if command -v ninja >/dev/null 2>&1; then gen=Ninja; fi
  echo "building with cmake ($gen)"
  cmake -S "$ROOT" -B "$ROOT/build-gpu" -G "$gen" -DCMAKE_BUILD_TYPE=Release \
    -DSAE_FAST_CUDA=ON -DPython_EXECUTABLE="$(command -v "$PY")" \
    -DCMAKE_CUDA_COMPILER="$CUDA_HOME/bin/nvcc" -DCUDA_TOOLKIT_ROOT_DIR="$CUDA_HOME" \
    -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$ROOT/sae_fast" &&
    cmake --build "$ROOT/build-gpu" -j "$MAX_JOBS"
}

build_with_cpp_extension() {
  mkdir -p "$ROOT/build-gpu/setuptools"
  (cd "$ROOT/build-gpu" && "$PY" - "$ROOT" <<'EOF'
import sys

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CUDAExtension, is_ninja_available

root = sys.argv[1]
ext = CUDAExtension(
    "sae_fast._C",
    [f"{root}/csrc/torch_bindings.cpp", f"{root}/csrc/cpu/steer_cpu.cpp",
     f"{root}/csrc/cuda/steer_cuda_host.cpp", f"{root}/csrc/cuda/steer_cuda.cu"],
    include_dirs=[f"{root}/csrc"],
    define_macros=[("SAE_FAST_WITH_CUDA", None)],
    extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
)
use_ninja = is_ninja_available()
setup(name="sae_fast_ext_build", ext_modules=[ext],
      cmdclass={"build_ext": BuildExtension.with_options(use_ninja=use_ninja)},
      script_args=["build_ext", "--build-lib", root, "--build-temp", f"{root}/build-gpu/setuptools"])
EOF
  )
}

build_stage() {
  echo "python: $("$PY" -c 'import sys, torch; print(sys.version.split()[0], torch.__version__, torch.version.cuda)')"
  echo "CUDA_HOME=$CUDA_HOME"
  [[ -n "$CUDA_HOME" ]] || { echo "no CUDA toolkit (nvcc) found"; exit 1; }
  "$CUDA_HOME/bin/nvcc" --version | tail -2
  if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
    TORCH_CUDA_ARCH_LIST="$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')"
  fi
  export TORCH_CUDA_ARCH_LIST
  export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
  echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
  rm -f "$ROOT"/sae_fast/_C*.so
  if command -v cmake >/dev/null 2>&1 && build_with_cmake; then
    echo "built with cmake"
  else
    echo "no cmake, or the cmake build failed: building with torch.utils.cpp_extension"
    rm -f "$ROOT"/sae_fast/_C*.so
    build_with_cpp_extension
  fi
  ls -la "$ROOT"/sae_fast/_C*.so
  "$PY" - <<'EOF'
import torch

import sae_fast.ops as ops

info = ops.backend_info()
print("backend_info:", info)
assert "cuda" in info["extension_devices"], "sae_fast._C has no CUDA kernels"
print("device:", torch.cuda.get_device_name(0), "backend for cuda:", ops.backend_for("cuda"))
EOF
}

tests_cuda_stage() {
  SAE_FAST_REQUIRE_CUDA_EXT=1 "$PY" -m pytest $PYTEST_ARGS -m cuda \
    --junitxml="$OUT/tests_cuda.xml" "$ROOT/python_tests/test_ops_cuda.py"
}

tests_triton_stage() {
  if [[ ! -f "$ROOT/python_tests/test_ops_triton.py" ]]; then
    echo "python_tests/test_ops_triton.py not present"
    return 0
  fi
  env -u TRITON_INTERPRET "$PY" -m pytest $PYTEST_ARGS --junitxml="$OUT/tests_triton.xml" \
    "$ROOT/python_tests/test_ops_triton.py"
}

# Small cases for the sanitizers: every launch plan, both load widths, all
# three ops; the reference runs on CPU copies so only our kernels (and a few
# copies) execute under the tool.
cat >"$OUT/sanitize_case.py" <<'EOF'
import os
import sys

import torch

import sae_fast.ops as ops
from sae_fast.ops import codes, reference
from sae_fast.ops.testing import assert_steer_close, clone_case, random_steer_case

assert "cuda" in ops.backend_info()["extension_devices"], ops.backend_info()
quick = len(sys.argv) > 1 and sys.argv[1] == "quick"
plans = [("1", "0"), ("4", "0"), ("1", "2")] if not quick else [("2", "0"), ("1", "2")]
shapes = [(torch.bfloat16, 256, codes.ACT_TOPK), (torch.float16, 123, codes.ACT_THRESHOLD_RELU),
          (torch.float32, 64, codes.ACT_IDENTITY)]
if quick:
    shapes = shapes[:2]


def cpu(case):
    return {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in case.items()}


n = 0
for rb, cs in plans:
    os.environ["SAE_FAST_CUDA_ROWS_PER_BLOCK"] = rb
    os.environ["SAE_FAST_CUDA_CLUSTER"] = cs
    for dtype, d, act in shapes:
        case = random_steer_case(6, d, 5, R=3, dtype=dtype, device="cuda", activation=act, seed=n)
        out = clone_case(case)
        torch.ops.sae_fast.steer_(**out)
        torch.cuda.synchronize()
        assert_steer_close(out["hidden"].cpu(), cpu(case), what=f"rb={rb} cs={cs} {dtype} d={d}")
        n += 1
        if quick:
            continue
        h, v, w, ri = case["hidden"], case["dec_w"], case["strengths"], case["row_index"]
        got = h.clone()
        torch.ops.sae_fast.add_vectors_(got, v, w, ri)
        want = h.cpu().clone()
        reference.add_vectors_(want, v.cpu(), w.cpu(), ri.cpu())
        torch.testing.assert_close(got.cpu().float(), want.float(), atol=0.1, rtol=0.05)
        got = h.clone()
        args = (case["residual"], v, case["max_act"], w, case["modes"], ri, 1.0, -2.0, 2.0)
        torch.ops.sae_fast.clamp_direction_(got, *args)
        want = h.cpu().clone()
        reference.clamp_direction_(want, *[a.cpu() if isinstance(a, torch.Tensor) else a for a in args])
        torch.testing.assert_close(got.cpu().float(), want.float(), atol=0.1, rtol=0.05)
        n += 2
torch.cuda.synchronize()
print(f"sanitizer cases ok: {n} op calls")
EOF

memcheck_stage() {
  [[ -n "$SANITIZER" ]] || { echo "compute-sanitizer not found"; exit 1; }
  # Without the caching allocator every tensor is its own allocation, so an
  # out-of-bounds access cannot hide inside a larger cached block.
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck --error-exitcode 1 \
    --print-limit 20 "$PY" "$OUT/sanitize_case.py"
}

racecheck_stage() {
  [[ -n "$SANITIZER" ]] || { echo "compute-sanitizer not found"; exit 1; }
  "$SANITIZER" --tool racecheck --error-exitcode 1 --print-limit 20 \
    "$PY" "$OUT/sanitize_case.py" quick
}

bench_stage() {
  local quick=""
  if ((STAGE_LIMIT_S < 150)); then quick="--quick"; fi
  "$PY" "$ROOT/benchmarks/bench_ops_gpu.py" --json "$OUT/bench_ops_gpu.json" $quick
}

hf_decode_stage() {
  "$PY" "$ROOT/benchmarks/bench_hf_gpu.py" --json "$OUT/bench_hf_gpu.json"
}

predictor_stage() {
  "$PY" "$ROOT/benchmarks/bench_predictor.py" --skip-train-step
}

export -f hf_decode_stage predictor_stage build_with_cmake build_with_cpp_extension build_stage tests_cuda_stage tests_triton_stage memcheck_stage racecheck_stage bench_stage
export BUDGET_S

{
  echo "date: $(date -u +%FT%TZ)"
  nvidia-smi -L 2>/dev/null || echo "nvidia-smi unavailable"
  "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)' 2>&1 || true
  "$PY" -c 'import triton; print("triton", triton.__version__)' 2>&1 || true
  echo "git: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?') $(git -C "$ROOT" status --porcelain 2>/dev/null | wc -l) changed files"
} | tee "$OUT/env.txt"

stage build 270 60 build_stage
if grep -q $'^build\tok' "$STAGES_TSV"; then
  stage tests_cuda 150 30 tests_cuda_stage
  stage memcheck 120 40 memcheck_stage
  stage bench 150 40 bench_stage
  stage hf_decode 150 60 hf_decode_stage
  stage tests_triton 200 40 tests_triton_stage
  stage racecheck 90 40 racecheck_stage
  stage predictor 60 20 predictor_stage
else
  echo "build failed: skipping the stages that need the extension"
  for s in tests_cuda memcheck bench racecheck; do
    printf '%s\t%s\t%s\n' "$s" "skipped (no build)" 0 >>"$STAGES_TSV"
  done
  stage tests_triton 120 40 tests_triton_stage
  stage predictor 60 20 predictor_stage
fi

echo
echo "## sae_fast GPU check ($(head -1 "$OUT/env.txt" | cut -d' ' -f2-), total ${SECONDS}s)"
echo
if ! "$PY" "$ROOT/benchmarks/bench_ops_gpu.py" --table "$OUT/bench_ops_gpu.json" \
    --status "$STAGES_TSV" | tee "$OUT/summary.md"; then
  echo "(table printer failed; stage statuses:)"
  cat "$STAGES_TSV"
fi
if [[ -f "$OUT/hf_decode.log" ]]; then
  echo; echo "### HF decode step, random Llama-3-8B shapes, bf16 (bench_hf_gpu.py)"; grep '^|' "$OUT/hf_decode.log" || true
fi | tee -a "$OUT/summary.md"
if [[ -f "$OUT/predictor.log" ]]; then
  echo; echo "### predictor (bench_predictor.py, 1 CPU thread)"; grep '^|' "$OUT/predictor.log" || true
fi | tee -a "$OUT/summary.md"
# Everything in one archive as well (the device tool brings back at most 8 files).
tar czf "$OUT/logs.tar.gz" -C "$OUT" --exclude logs.tar.gz . 2>/dev/null || true
exit "$FAILED"
