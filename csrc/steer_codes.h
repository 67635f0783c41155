// Integer codes of the steering ops (mirrors sae_fast/ops/codes.py) and the
// CUDA feature limit. Plain C++ (no torch headers): the CUDA kernels include
// it too.
#pragma once

#include <cstdint>

namespace sae_fast {

enum Mode : int8_t { kOff = 0, kAdd = 1, kSet = 2, kScale = 3, kAblate = 4 };
enum Activation : int64_t { kThresholdRelu = 0, kIdentity = 1, kTopK = 2 };

// Features beyond this many per call use a heap buffer on the CPU path and
// are rejected on the CUDA path (shared-memory coefficient table).
constexpr int64_t kMaxFeaturesCuda = 4096;

}  // namespace sae_fast
