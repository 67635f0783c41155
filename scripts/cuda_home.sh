# Sourced by scripts/cuda_compile_check.sh and benchmarks/gpu_check.sh.
# find_cuda_home: prints the CUDA toolkit folder: $CUDA_HOME when it holds
# nvcc, else the toolkit of the nvcc on PATH (which may be a one-line wrapper
# script, `exec /path/to/toolkit/bin/nvcc "$@"`, naming the real one), else
# the usual install folders. Prints nothing when there is none.
find_cuda_home() {
  if [[ -n "${CUDA_HOME:-}" && -x "${CUDA_HOME}/bin/nvcc" ]]; then echo "$CUDA_HOME"; return; fi
  local nvcc real d
  nvcc="$(command -v nvcc || true)"
  if [[ -n "$nvcc" ]]; then
    real="$(readlink -f "$nvcc")"
    # A small shell wrapper (`exec /path/to/toolkit/bin/nvcc "$@"`) names the real one.
    if [[ "$(head -c 2 "$real")" == "#!" ]]; then
      real="$(grep -o '/[^"'"'"' ]*/bin/nvcc' "$real" | head -1 || true)"
    fi
    if [[ -n "$real" && -x "$real" ]]; then dirname "$(dirname "$real")"; return; fi
  fi
  for d in /usr/local/cuda /usr/local/cuda-13* /usr/local/cuda-12*; do
    if [[ -x "$d/bin/nvcc" ]]; then echo "$d"; return; fi
  done
}
