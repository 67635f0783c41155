// The boundary between the torch-facing host code (steer_cuda_host.cpp,
// compiled by the C++ compiler: argument checks, device guard, stream,
// exceptions) and the CUDA kernels (steer_cuda.cu, compiled by nvcc: launch
// planning and the launch itself). Plain C++ on purpose: nothing here needs
// torch, and no exception ever crosses it (a launch reports failure through
// LaunchResult, and the caller throws). Keeping torch and its exceptions out
// of the nvcc translation unit also halves that unit's compile time.
#pragma once

#include <cstdint>

namespace sae_fast {
namespace gpu {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// One steering launch: all three ops are this with different tables.
//   steer_            enc_w, dec_w, enc_b, threshold, max_act, modes (+ kth for TopK)
//   clamp_direction_  enc_w = dec_w = directions, identity activation, no bias/threshold
//   add_vectors_      dec_w = vectors, strengths = weights, modes = null (weights used as given)
struct SteerArgs {
  void* hidden = nullptr;             // [n_rows, d], row stride h_stride
  const void* residual = nullptr;     // [n_rows, d] or null, row stride r_stride
  const void* enc_w = nullptr;        // [k, d] or null
  const void* dec_w = nullptr;        // [k, d]
  const float* enc_b = nullptr;       // [k] or null
  const float* threshold = nullptr;   // [k] or null
  const float* max_act = nullptr;     // [k] or null
  const float* strengths = nullptr;   // [R, k]
  const int8_t* modes = nullptr;      // [R, k] or null
  const void* row_index = nullptr;    // [n_rows] int32 or int64
  const float* kth = nullptr;         // [n_rows] or null (TopK only)
  int64_t h_stride = 0, r_stride = 0, n_rows = 0, d = 0, k = 0, R = 0;
  int activation = 1;                 // Activation code (steer_codes.h)
  bool idx64 = false;
  float scale = 1.f, lo = -1e30f, hi = 1e30f;
  DType dtype = DType::kFloat32;
  int device = 0;
  void* stream = nullptr;             // cudaStream_t
};

struct LaunchResult {
  bool ok = true;
  bool cluster_refused = false;  // a cluster launch was refused and retried without clusters
  char message[512] = {0};       // the error (ok == false) or the refusal's reason
};

// Plans and enqueues one kernel on `stream`; no sync, no allocation.
LaunchResult launch_steer(const SteerArgs& args);

}  // namespace gpu
}  // namespace sae_fast
