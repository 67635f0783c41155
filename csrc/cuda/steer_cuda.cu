// CUDA implementations of the sae_fast steering ops (steer_, clamp_direction_,
// add_vectors_). Semantics mirror csrc/cpu/steer_cpu.cpp and
// sae_fast/ops/reference.py exactly; see SPEC section 1.
//
// Design: one kernel launch per op call, on the current stream, with no host
// sync and no allocation (CUDA-graph safe: every table is read on device).
//
//   * A block owns RB consecutive token rows (RB = 1, 4 or 8; more rows per
//     block share each weight load from L2, which pays off for long prefills).
//   * Phase 1: every thread scans features; coefficients that need no encode
//     (add mode, add_vectors_ weights) are written to shared memory, features
//     that need an encode are flagged. A block whose rows are all "off"
//     (row 0: padding / unsteered) returns here without touching hidden.
//   * Phase 2: the residual stream x = hidden (+ residual) of the block's rows
//     is staged in shared memory as fp32, then each warp computes the dot
//     products enc_w[c] . x for a group of flagged features (1 feature per
//     group for RB = 1, up to 4 for more rows; 16-byte loads, warp-shuffle
//     reduction) and forms the coefficients f'_c - f_c.
//   * Phase 3: threads sweep d; each accumulates sum_c coef_c * dec_w[c][j]
//     in fp32 registers over the features with a nonzero coefficient and
//     rounds once into hidden's dtype (for short slices of d, a few lanes
//     split the features of one chunk and combine with shuffles). Rows with
//     no nonzero coefficient are never rewritten (exact no-op).
//
// Decode-sized batches (few rows) leave most SMs idle with one block per row.
// On sm_90+ a row is then split over a thread-block cluster of CS blocks: each
// block encodes 1/CS of the flagged features, the coefficients are exchanged
// through distributed shared memory (cluster.sync), and each block sweeps 1/CS
// of d. Still one launch, no global scratch.
//
// Tuning knobs (read per call; for tests and benchmarks):
//   SAE_FAST_CUDA_ROWS_PER_BLOCK = 1 | 4 | 8   force RB (default: by batch size;
//                                  always 1 when rows cannot use 16-byte loads)
//   SAE_FAST_CUDA_CLUSTER        = 0 | 1 | 2 | 4 | 8
//                                  0/1 disable clusters, 2/4/8 force that size
//                                  where the device supports it (default: auto)
//
// Host side: this file holds no torch code and throws nothing. Argument
// checks, the device guard and the stream live in steer_cuda_host.cpp, which
// calls launch_steer() (steer_cuda.h) and turns a failed LaunchResult into an
// exception on the C++ compiler's side.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cassert>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <unordered_map>

#include "cuda/steer_cuda.h"
#include "steer_codes.h"

#ifndef CUDA_KERNEL_ASSERT
#define CUDA_KERNEL_ASSERT(cond) assert(cond)
#endif

namespace sae_fast {
namespace {

namespace cg = cooperative_groups;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxCluster = 8;  // portable cluster size limit
constexpr int kMaxSlices = 8;   // lanes sharing one chunk in the decode sweep

template <typename T>
struct SteerParams {
  T* hidden;               // [T, d], row stride h_stride
  const T* residual;       // [T, d] or null, row stride r_stride
  const T* enc_w;          // [k, d] (null for add_vectors_)
  const T* dec_w;          // [k, d]
  const float* enc_b;      // [k] or null (0)
  const float* threshold;  // [k] or null (0)
  const float* max_act;    // [k] (null for add_vectors_)
  const float* strengths;  // [R, k]; add_vectors_: the weights
  const int8_t* modes;     // [R, k]; null: add_vectors_ (weights are the coefficients)
  const void* row_index;   // [T] int32 or int64
  const float* kth;        // [T] or null (TopK only)
  int64_t h_stride, r_stride, n_rows, d, k, R;
  int activation, idx64, stage_x, cluster;
  float scale, lo, hi;
};

// Shared-memory layout (dynamic part), identical on every block of a launch:
//   float xs[RB * d]      (only when stage_x)  staged residual stream, fp32
//   float coef[RB * k]                         f'_c - f_c per row and feature
//   int   enc_list[k]                          features that need an encode
//   int   nz_list[k]                           features with a nonzero coefficient
//   uint8 flags[k]                             per-feature "needs encode"
inline size_t smem_bytes(int rb, bool stage_x, int64_t d, int64_t k) {
  size_t b = stage_x ? static_cast<size_t>(rb) * d * sizeof(float) : 0;
  b += static_cast<size_t>(rb) * k * sizeof(float);
  b += 2 * static_cast<size_t>(k) * sizeof(int);
  b += (static_cast<size_t>(k) + 15) / 16 * 16;
  return b;
}

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void load_f32(const T* p, float (&out)[VEC]) {
  const Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int u = 0; u < VEC; ++u) out[u] = static_cast<float>(pk.v[u]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_from_f32(T* p, const float (&in)[VEC]) {
  Pack<T, VEC> pk;
#pragma unroll
  for (int u = 0; u < VEC; ++u) pk.v[u] = static_cast<T>(in[u]);
  *reinterpret_cast<Pack<T, VEC>*>(p) = pk;
}

template <int VEC>
__device__ __forceinline__ void load_smem(const float* p, float (&out)[VEC]) {
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int q = 0; q < VEC / 4; ++q) {
      const float4 v = reinterpret_cast<const float4*>(p)[q];
      out[4 * q + 0] = v.x, out[4 * q + 1] = v.y, out[4 * q + 2] = v.z, out[4 * q + 3] = v.w;
    }
  } else {
#pragma unroll
    for (int u = 0; u < VEC; ++u) out[u] = p[u];
  }
}

template <int VEC>
__device__ __forceinline__ void store_smem(float* p, const float (&in)[VEC]) {
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int q = 0; q < VEC / 4; ++q)
      reinterpret_cast<float4*>(p)[q] =
          make_float4(in[4 * q + 0], in[4 * q + 1], in[4 * q + 2], in[4 * q + 3]);
  } else {
#pragma unroll
    for (int u = 0; u < VEC; ++u) p[u] = in[u];
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// clamp(s, lo, hi) * scale with std::min(std::max(s, lo), hi) semantics (as the
// CPU path): a NaN strength stays NaN instead of being silently clamped.
__device__ __forceinline__ float clamp_scale(float s, float lo, float hi, float scale) {
  float v = s < lo ? lo : s;
  v = hi < v ? hi : v;
  return v * scale;
}

__device__ __forceinline__ bool needs_encode(int m) {
  return m == kSet || m == kScale || m == kAblate;
}

// x[v*VEC .. v*VEC+VEC) = hidden (+ residual) of token row `row` in fp32,
// read from global memory; zeros for row < 0 (a row that is not live).
template <typename T, int VEC>
__device__ __forceinline__ void load_x_global(const SteerParams<T>& p, int64_t row, int64_t v,
                                              float (&out)[VEC]) {
  if (row < 0) {
#pragma unroll
    for (int u = 0; u < VEC; ++u) out[u] = 0.f;
    return;
  }
  load_f32<T, VEC>(p.hidden + row * p.h_stride + v * VEC, out);
  if (p.residual) {
    float b[VEC];
    load_f32<T, VEC>(p.residual + row * p.r_stride + v * VEC, b);
#pragma unroll
    for (int u = 0; u < VEC; ++u) out[u] += b[u];
  }
}

// x[v*VEC .. v*VEC+VEC) of local row i: from shared memory when staged,
// otherwise from global memory (very large d).
template <typename T, int VEC>
__device__ __forceinline__ void load_x(const SteerParams<T>& p, const float* xs, int64_t row,
                                       int i, int64_t v, float (&out)[VEC]) {
  if (p.stage_x) {
    load_smem<VEC>(xs + i * p.d + v * VEC, out);
    return;
  }
  load_x_global<T, VEC>(p, row, v, out);
}

// Features encoded together by one warp: more rows per block make the x
// loads from shared memory the bottleneck, so each load then feeds several
// features.
template <int RB>
__host__ __device__ constexpr int feature_group() {
  return RB >= 4 ? 4 : RB;
}

// f'_c - f_c for an encode mode m, from the dot product enc_w[c] . x of token t.
template <typename T>
__device__ __forceinline__ float encoded_coef(const SteerParams<T>& p, int m, int c, int64_t r,
                                              int64_t t, float dot) {
  const float pre = dot + (p.enc_b ? p.enc_b[c] : 0.f);
  float f;
  if (p.activation == kThresholdRelu) {
    f = pre > (p.threshold ? p.threshold[c] : 0.f) ? pre : 0.f;
  } else if (p.activation == kIdentity) {
    f = pre;
  } else {
    f = (pre >= p.kth[t] && pre > 0.f) ? pre : 0.f;
  }
  const float sc = clamp_scale(p.strengths[r * p.k + c], p.lo, p.hi, p.scale);
  if (m == kSet) return sc * p.max_act[c] - f;
  if (m == kScale) return f * sc - f;
  return -f;  // kAblate
}

template <typename T, int VEC, int RB>
__global__ void __launch_bounds__(kThreads) steer_kernel(const SteerParams<T> p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ int64_t s_row[RB];  // strengths row of each local row; -1: no row
  __shared__ int s_row_nz[RB];   // local row gets a nonzero delta
  __shared__ int s_n_enc, s_n_nz;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int cs = p.cluster;
  const int q = static_cast<int>(blockIdx.x % cs);  // rank inside the cluster
  const int64_t t0 = static_cast<int64_t>(blockIdx.x / cs) * RB;
  const int64_t d = p.d, k = p.k;

  float* xs = reinterpret_cast<float*>(smem_raw);
  float* coef = xs + (p.stage_x ? RB * d : 0);
  int* enc_list = reinterpret_cast<int*>(coef + RB * k);
  int* nz_list = enc_list + k;
  unsigned char* flags = reinterpret_cast<unsigned char*>(nz_list + k);

  if (tid < RB) {
    const int64_t t = t0 + tid;
    int64_t r = -1;
    if (t < p.n_rows) {
      r = p.idx64 ? static_cast<const int64_t*>(p.row_index)[t]
                  : static_cast<int64_t>(static_cast<const int32_t*>(p.row_index)[t]);
      CUDA_KERNEL_ASSERT(r >= 0 && r < p.R);
      if (r < 0 || r >= p.R) r = -1;  // asserts compiled out: treat as a no-op row
    }
    s_row[tid] = r;
    s_row_nz[tid] = 0;
  }
  __syncthreads();

  // Phase 1: coefficients that need no encode; flag the features that do.
  int any_active = 0;
  for (int64_t c = tid; c < k; c += kThreads) {
    unsigned char need = 0;
#pragma unroll
    for (int i = 0; i < RB; ++i) {
      const int64_t r = s_row[i];
      float cf = 0.f;
      if (r >= 0) {
        const float s = p.strengths[r * k + c];
        if (p.modes == nullptr) {  // add_vectors_: the weight is the coefficient
          cf = s;
          any_active |= (cf != 0.f);
        } else {
          const int m = p.modes[r * k + c];
          if (m == kAdd) {
            cf = clamp_scale(s, p.lo, p.hi, p.scale);
          } else if (needs_encode(m)) {
            need = 1;  // coefficient formed after the encode
          } else {
            CUDA_KERNEL_ASSERT(m == kOff && "modes holds a code outside 0..4");
          }
          any_active |= (m != kOff);
        }
      }
      coef[i * k + c] = cf;
    }
    flags[c] = need;
  }
  if (!__syncthreads_or(any_active)) return;  // every row is off: exact no-op

  // Phase 2a: list the features that need an encode (ascending, one warp).
  if (warp == 0) {
    int n = 0;
    for (int64_t base = 0; base < k; base += 32) {
      const int64_t c = base + lane;
      const bool e = c < k && flags[c] != 0;
      const unsigned mask = __ballot_sync(0xffffffffu, e);
      if (e) enc_list[n + __popc(mask & ((1u << lane) - 1u))] = static_cast<int>(c);
      n += __popc(mask);
    }
    if (lane == 0) s_n_enc = n;
  }
  __syncthreads();
  const int n_enc = s_n_enc;
  const int64_t nv = d / VEC;  // VEC divides d (the host picks VEC = 1 otherwise)

  if (n_enc > 0) {
    // Phase 2b: stage x = hidden (+ residual) of the block's rows as fp32.
    if (p.stage_x) {
#pragma unroll
      for (int i = 0; i < RB; ++i) {
        const int64_t r = s_row[i];
        const int64_t t = t0 + i;
        for (int64_t v = tid; v < nv; v += kThreads) {
          float a[VEC];
          load_x_global<T, VEC>(p, r >= 0 ? t : -1, v, a);
          store_smem<VEC>(xs + i * d + v * VEC, a);
        }
      }
      __syncthreads();
    }

    // Phase 2c: each warp encodes a group of F flagged features at a time
    // (one x load from shared memory feeds F features). Groups are split over
    // the cluster: group g belongs to rank g % cs.
    constexpr int F = feature_group<RB>();
    int64_t rows[RB];
#pragma unroll
    for (int i = 0; i < RB; ++i) rows[i] = s_row[i] >= 0 ? t0 + i : -1;
    const int n_groups = (n_enc + F - 1) / F;
    for (int g = q + cs * warp; g < n_groups; g += cs * kWarps) {
      int cidx[F];
      const T* w[F];
#pragma unroll
      for (int f = 0; f < F; ++f) {
        // Past the end of the list a group repeats its first feature: an
        // in-bounds load whose result is dropped.
        cidx[f] = enc_list[g * F + f < n_enc ? g * F + f : g * F];
        w[f] = p.enc_w + static_cast<int64_t>(cidx[f]) * d;
      }
      float acc[F][RB];
#pragma unroll
      for (int f = 0; f < F; ++f)
#pragma unroll
        for (int i = 0; i < RB; ++i) acc[f][i] = 0.f;
#pragma unroll(F == 1 ? 4 : 2)
      for (int64_t v = lane; v < nv; v += 32) {
        float wv[F][VEC];
#pragma unroll
        for (int f = 0; f < F; ++f) load_f32<T, VEC>(w[f] + v * VEC, wv[f]);
#pragma unroll
        for (int i = 0; i < RB; ++i) {
          float xv[VEC];
          load_x<T, VEC>(p, xs, rows[i], i, v, xv);
#pragma unroll
          for (int f = 0; f < F; ++f)
#pragma unroll
            for (int u = 0; u < VEC; ++u) acc[f][i] = fmaf(xv[u], wv[f][u], acc[f][i]);
        }
      }
#pragma unroll
      for (int f = 0; f < F; ++f)
#pragma unroll
        for (int i = 0; i < RB; ++i) acc[f][i] = warp_sum(acc[f][i]);
      // Lane f * RB + i (< 32) finishes feature f of local row i.
#pragma unroll
      for (int f = 0; f < F; ++f) {
#pragma unroll
        for (int i = 0; i < RB; ++i) {
          const int64_t r = s_row[i];
          if (lane != f * RB + i || r < 0 || g * F + f >= n_enc) continue;
          const int c = cidx[f];
          const int m = p.modes[r * k + c];
          if (!needs_encode(m)) continue;  // only another row of the block needs c
          coef[i * k + c] = encoded_coef(p, m, c, r, t0 + i, acc[f][i]);
        }
      }
    }

    // Coefficients visible to the whole block; with a cluster, gather the ones
    // the other blocks computed (list entry e belongs to rank (e / F) % cs).
    if (cs > 1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
      cg::cluster_group cluster = cg::this_cluster();
      cluster.sync();  // all x reads of hidden and all owned coefficients done
      for (int e = tid; e < n_enc; e += kThreads) {
        const int owner = (e / F) % cs;
        if (owner == q) continue;
        const int c = enc_list[e];
        const float* remote = cluster.map_shared_rank(coef, owner);
#pragma unroll
        for (int i = 0; i < RB; ++i) coef[i * k + c] = remote[i * k + c];
      }
      cluster.sync();  // no block leaves while another still reads its coefficients
#else
      CUDA_KERNEL_ASSERT(cs == 1 && "thread-block clusters need sm_90");
#endif
    } else {
      __syncthreads();
    }
  }

  // Phase 3a: features with a nonzero coefficient in any row (one warp).
  if (warp == 0) {
    int n = 0;
    int row_nz[RB];
#pragma unroll
    for (int i = 0; i < RB; ++i) row_nz[i] = 0;
    for (int64_t base = 0; base < k; base += 32) {
      const int64_t c = base + lane;
      bool nz = false;
      if (c < k) {
#pragma unroll
        for (int i = 0; i < RB; ++i) {
          const bool b = coef[i * k + c] != 0.f;  // NaN counts as nonzero (as on CPU)
          row_nz[i] |= b;
          nz |= b;
        }
      }
      const unsigned mask = __ballot_sync(0xffffffffu, nz);
      if (nz) nz_list[n + __popc(mask & ((1u << lane) - 1u))] = static_cast<int>(c);
      n += __popc(mask);
    }
#pragma unroll
    for (int i = 0; i < RB; ++i) {
      const int any_row = __any_sync(0xffffffffu, row_nz[i]);
      if (lane == 0) s_row_nz[i] = any_row;
    }
    if (lane == 0) s_n_nz = n;
  }
  __syncthreads();
  const int n_nz = s_n_nz;
  if (n_nz == 0) return;

  // Phase 3b: hidden[t] += sum_c coef[t][c] * dec_w[c] over this block's slice
  // of d. When the slice has fewer 16-byte chunks than the block has threads
  // (decode: few rows, a cluster per row), S adjacent lanes share a chunk and
  // split its features, then add their partial sums with warp shuffles: more
  // loads in flight instead of a long chain of dependent ones.
  int row_nz[RB];
#pragma unroll
  for (int i = 0; i < RB; ++i) row_nz[i] = s_row_nz[i];
  const int64_t v_begin = nv * q / cs, v_end = nv * (q + 1) / cs;
  const int64_t nvb = v_end - v_begin;
  int S = 1;
  while (S < kMaxSlices && 2 * S * nvb <= kThreads && 2 * S <= n_nz) S *= 2;
  const int slice = tid & (S - 1);
  const int chunks_per_pass = kThreads / S;
  for (int64_t base = 0; base < nvb; base += chunks_per_pass) {  // same trip count for all lanes
    const int64_t j = base + tid / S;
    const bool active = j < nvb;
    const int64_t v = v_begin + j;
    float acc[RB][VEC];
#pragma unroll
    for (int i = 0; i < RB; ++i)
#pragma unroll
      for (int u = 0; u < VEC; ++u) acc[i][u] = 0.f;
    if (active) {
#pragma unroll 4
      for (int a = slice; a < n_nz; a += S) {
        const int c = nz_list[a];
        float wv[VEC];
        load_f32<T, VEC>(p.dec_w + static_cast<int64_t>(c) * d + v * VEC, wv);
#pragma unroll
        for (int i = 0; i < RB; ++i) {
          const float cf = coef[i * k + c];
          if (RB > 1 && cf == 0.f) continue;  // only this row's active features (as on CPU)
#pragma unroll
          for (int u = 0; u < VEC; ++u) acc[i][u] = fmaf(cf, wv[u], acc[i][u]);
        }
      }
    }
    if (S > 1) {  // warp-uniform; every lane of the warp takes part
#pragma unroll
      for (int i = 0; i < RB; ++i)
#pragma unroll
        for (int u = 0; u < VEC; ++u)
          for (int m = 1; m < S; m <<= 1) acc[i][u] += __shfl_xor_sync(0xffffffffu, acc[i][u], m);
    }
    if (!active || slice != 0) continue;
#pragma unroll
    for (int i = 0; i < RB; ++i) {
      if (!row_nz[i]) continue;
      T* h = p.hidden + (t0 + i) * p.h_stride + v * VEC;
      float hv[VEC];
      load_f32<T, VEC>(h, hv);
#pragma unroll
      for (int u = 0; u < VEC; ++u) hv[u] += acc[i][u];
      store_from_f32<T, VEC>(h, hv);
    }
  }
}

// ------------------------------------------------------------------ host side

// Failure reporting without exceptions: the first failing CUDA call's text.
struct Failure {
  bool failed = false;
  char message[512] = {0};
};

bool cuda_ok(cudaError_t err, const char* what, Failure* f) {
  if (err == cudaSuccess) return true;
  if (!f->failed) {
    f->failed = true;
    std::snprintf(f->message, sizeof(f->message), "%s failed: %s (%s)", what,
                  cudaGetErrorString(err), cudaGetErrorName(err));
  }
  return false;
}

struct DeviceInfo {
  int sms = 0;
  int smem_optin = 0;   // max dynamic + static shared memory per block (opt-in)
  int smem_per_sm = 0;  // shared memory of one multiprocessor
  int major = 0;
};

bool device_info(int dev, DeviceInfo* out, Failure* f) {
  static std::mutex mu;
  static std::unordered_map<int, DeviceInfo> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(dev);
  if (it != cache.end()) {
    *out = it->second;
    return true;
  }
  DeviceInfo info;
  if (!cuda_ok(cudaDeviceGetAttribute(&info.sms, cudaDevAttrMultiProcessorCount, dev),
               "cudaDeviceGetAttribute(MultiProcessorCount)", f) ||
      !cuda_ok(cudaDeviceGetAttribute(&info.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                      dev),
               "cudaDeviceGetAttribute(MaxSharedMemoryPerBlockOptin)", f) ||
      !cuda_ok(cudaDeviceGetAttribute(&info.smem_per_sm,
                                      cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev),
               "cudaDeviceGetAttribute(MaxSharedMemoryPerMultiprocessor)", f) ||
      !cuda_ok(cudaDeviceGetAttribute(&info.major, cudaDevAttrComputeCapabilityMajor, dev),
               "cudaDeviceGetAttribute(ComputeCapabilityMajor)", f))
    return false;
  cache.emplace(dev, info);
  *out = info;
  return true;
}

// One-time per (kernel, device) setup: opt in to all the shared memory the
// device offers (cudaFuncSetAttribute is not a stream operation, but doing it
// once keeps it out of CUDA-graph captures after the first eager call) and
// find out whether the kernel was compiled for sm_90+ (cluster capable).
bool kernel_setup(const void* kernel, int dev, const DeviceInfo& dinfo, bool* cluster_capable,
                  Failure* f) {
  static std::mutex mu;
  static std::unordered_map<const void*, std::unordered_map<int, bool>> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto& per_dev = cache[kernel];
  auto it = per_dev.find(dev);
  if (it != per_dev.end()) {
    *cluster_capable = it->second;
    return true;
  }
  cudaFuncAttributes attr;
  if (!cuda_ok(cudaFuncGetAttributes(&attr, kernel), "cudaFuncGetAttributes", f)) return false;
  const int dyn_max = dinfo.smem_optin - static_cast<int>(attr.sharedSizeBytes);
  if (dyn_max > 48 * 1024 &&
      !cuda_ok(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, dyn_max),
               "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)", f))
    return false;
  // ptxVersion is the virtual architecture the code was compiled for: code
  // JIT-compiled from pre-sm_90 PTX has no cluster path.
  const bool capable = dinfo.major >= 9 && attr.ptxVersion >= 90 && attr.binaryVersion >= 90;
  per_dev.emplace(dev, capable);
  *cluster_capable = capable;
  return true;
}

int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  char* end = nullptr;
  const long x = std::strtol(v, &end, 10);
  return (end != nullptr && *end == '\0') ? static_cast<int>(x) : fallback;
}

struct Plan {
  int rb = 1;
  int cs = 1;
  bool stage_x = false;
  size_t smem = 0;
};

bool plan_launch(int64_t n_rows, int64_t d, int64_t k, int64_t nv, bool vec_ok, bool may_encode,
                 const DeviceInfo& dinfo, bool cluster_capable, Plan* out, Failure* f) {
  Plan plan;
  const int sms = std::max(dinfo.sms, 1);
  const int forced_rb = env_int("SAE_FAST_CUDA_ROWS_PER_BLOCK", 0);
  if (!vec_ok) {
    plan.rb = 1;  // odd d / unaligned rows: correct, not tuned (one kernel per dtype)
  } else if (forced_rb == 1 || forced_rb == 4 || forced_rb == 8) {
    plan.rb = forced_rb;
  } else {
    // The most rows per block that still gives every SM a block: each block
    // reads the k encoder/decoder rows once, so fewer blocks, less L2 traffic.
    plan.rb = n_rows >= 8LL * sms ? 8 : n_rows >= 4LL * sms ? 4 : 1;
  }
  // Static shared memory of the kernel is < 128 bytes; keep a margin.
  const size_t limit = static_cast<size_t>(std::max(dinfo.smem_optin, 48 * 1024)) - 1024;
  plan.stage_x = may_encode;
  while (plan.rb > 1 && smem_bytes(plan.rb, plan.stage_x, d, k) > limit) plan.rb = plan.rb == 8 ? 4 : 1;
  // Unforced, keep at least two blocks (16 warps) per SM: staging RB rows of a
  // wide d in fp32 (8 x 4096 x 4 B = 128 KB) would otherwise leave one block
  // per SM, too few loads in flight for the memory-bound sweep.
  auto blocks_per_sm = [&](int rb) {
    const size_t per_block = smem_bytes(rb, plan.stage_x, d, k) + 1024;  // + reserved
    return dinfo.smem_per_sm > 0 ? static_cast<size_t>(dinfo.smem_per_sm) / per_block : size_t{2};
  };
  const bool rb_forced = vec_ok && (forced_rb == 1 || forced_rb == 4 || forced_rb == 8);
  if (!rb_forced)
    while (plan.rb > 1 && blocks_per_sm(plan.rb) < 2) plan.rb = plan.rb == 8 ? 4 : 1;
  if (smem_bytes(plan.rb, plan.stage_x, d, k) > limit) plan.stage_x = false;
  plan.smem = smem_bytes(plan.rb, plan.stage_x, d, k);
  if (plan.smem > limit) {
    f->failed = true;
    std::snprintf(f->message, sizeof(f->message),
                  "k=%lld features need %zu bytes of shared memory; this device offers %zu",
                  static_cast<long long>(k), plan.smem, limit);
    return false;
  }
  const int forced_cs = env_int("SAE_FAST_CUDA_CLUSTER", -1);
  if (cluster_capable && forced_cs != 0 && forced_cs != 1) {
    if (forced_cs == 2 || forced_cs == 4 || forced_cs == 8) {
      plan.cs = forced_cs;
    } else if (plan.rb == 1 && k * d >= 16384 && plan.smem <= 100 * 1024) {
      // Split each row over a cluster while the grid still fits on the GPU
      // and every block keeps at least one warp's worth of chunks to sweep.
      while (plan.cs < kMaxCluster && n_rows * plan.cs * 2 <= sms && nv >= 32LL * plan.cs * 2)
        plan.cs *= 2;
    }
  }
  *out = plan;
  return true;
}

std::mutex g_cluster_mu;
bool g_cluster_broken = false;  // a cluster launch was refused once: stop trying

template <typename T, int VEC, int RB>
bool launch_kernel(const SteerParams<T>& params, const Plan& plan, int64_t n_groups,
                   cudaStream_t stream, gpu::LaunchResult* res, Failure* f) {
  auto kernel = steer_kernel<T, VEC, RB>;
  SteerParams<T> prm = params;
  int cs = plan.cs;
  for (;;) {
    prm.cluster = cs;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(static_cast<unsigned>(n_groups * cs), 1, 1);
    cfg.blockDim = dim3(kThreads, 1, 1);
    cfg.dynamicSmemBytes = plan.smem;
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    if (cs > 1) {
      attr[0].id = cudaLaunchAttributeClusterDimension;
      attr[0].val.clusterDim.x = static_cast<unsigned>(cs);
      attr[0].val.clusterDim.y = 1;
      attr[0].val.clusterDim.z = 1;
      cfg.attrs = attr;
      cfg.numAttrs = 1;
    } else {
      cfg.attrs = nullptr;
      cfg.numAttrs = 0;
    }
    const cudaError_t err = cudaLaunchKernelEx(&cfg, kernel, prm);
    if (err == cudaSuccess) break;
    if (cs > 1) {
      // A cluster configuration the device cannot schedule is a launch-time
      // (non-sticky) error: clear it and fall back to one block per row group.
      (void)cudaGetLastError();
      res->cluster_refused = true;
      std::snprintf(res->message, sizeof(res->message), "%s", cudaGetErrorString(err));
      {
        std::lock_guard<std::mutex> lock(g_cluster_mu);
        g_cluster_broken = true;
      }
      cs = 1;
      continue;
    }
    return cuda_ok(err, "cudaLaunchKernelEx(steer_kernel)", f);
  }
  return cuda_ok(cudaGetLastError(), "steer_kernel launch", f);
}

template <typename T, int VEC>
bool launch_rb(const SteerParams<T>& params, const Plan& plan, int64_t n_rows,
               cudaStream_t stream, gpu::LaunchResult* res, Failure* f) {
  const int64_t n_groups = (n_rows + plan.rb - 1) / plan.rb;
  if constexpr (VEC == 1) {
    return launch_kernel<T, 1, 1>(params, plan, n_groups, stream, res, f);  // plan.rb is 1
  } else {
    switch (plan.rb) {
      case 1: return launch_kernel<T, VEC, 1>(params, plan, n_groups, stream, res, f);
      case 4: return launch_kernel<T, VEC, 4>(params, plan, n_groups, stream, res, f);
      default: return launch_kernel<T, VEC, 8>(params, plan, n_groups, stream, res, f);
    }
  }
}

// Instantiated kernels: 16-byte loads with RB = 1, 4, 8, and a scalar-load
// fallback with RB = 1 (12 kernels over the three dtypes; compile time).
template <typename T, int VEC>
const void* kernel_for(int rb) {
  if constexpr (VEC == 1) {
    return reinterpret_cast<const void*>(steer_kernel<T, 1, 1>);
  } else {
    switch (rb) {
      case 1: return reinterpret_cast<const void*>(steer_kernel<T, VEC, 1>);
      case 4: return reinterpret_cast<const void*>(steer_kernel<T, VEC, 4>);
      default: return reinterpret_cast<const void*>(steer_kernel<T, VEC, 8>);
    }
  }
}

inline bool aligned16(const void* p) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

template <typename T>
bool run(const gpu::SteerArgs& a, gpu::LaunchResult* res, Failure* f) {
  SteerParams<T> p{};
  p.hidden = static_cast<T*>(a.hidden);
  p.residual = static_cast<const T*>(a.residual);
  p.enc_w = static_cast<const T*>(a.enc_w);
  p.dec_w = static_cast<const T*>(a.dec_w);
  p.enc_b = a.enc_b;
  p.threshold = a.threshold;
  p.max_act = a.max_act;
  p.strengths = a.strengths;
  p.modes = a.modes;
  p.row_index = a.row_index;
  p.kth = a.kth;
  p.h_stride = a.h_stride;
  p.r_stride = a.r_stride;
  p.n_rows = a.n_rows;
  p.d = a.d;
  p.k = a.k;
  p.R = a.R;
  p.activation = a.activation;
  p.idx64 = a.idx64 ? 1 : 0;
  p.scale = a.scale;
  p.lo = a.lo;
  p.hi = a.hi;
  p.cluster = 1;

  constexpr int kVec = 16 / sizeof(T);
  const int64_t n_rows = p.n_rows, d = p.d, k = p.k;
  const bool vec_ok = d % kVec == 0 && p.h_stride % kVec == 0 &&
                      (p.residual == nullptr || p.r_stride % kVec == 0) &&
                      aligned16(p.hidden) && aligned16(p.residual) && aligned16(p.enc_w) &&
                      aligned16(p.dec_w);
  const int dev = a.device;
  DeviceInfo dinfo;
  if (!device_info(dev, &dinfo, f)) return false;
  // The kernels a plan can pick all share the same properties; probe RB=1.
  bool cluster_capable = false;
  if (!kernel_setup(vec_ok ? kernel_for<T, kVec>(1) : kernel_for<T, 1>(1), dev, dinfo,
                    &cluster_capable, f))
    return false;
  {
    std::lock_guard<std::mutex> lock(g_cluster_mu);
    cluster_capable = cluster_capable && !g_cluster_broken;
  }
  const int64_t nv = vec_ok ? d / kVec : d;
  Plan plan;
  if (!plan_launch(n_rows, d, k, nv, vec_ok, p.modes != nullptr, dinfo, cluster_capable, &plan, f))
    return false;
  p.stage_x = plan.stage_x ? 1 : 0;
  p.cluster = plan.cs;
  cudaStream_t stream = static_cast<cudaStream_t>(a.stream);
  bool unused = false;
  if (vec_ok) {
    return kernel_setup(kernel_for<T, kVec>(plan.rb), dev, dinfo, &unused, f) &&
           launch_rb<T, kVec>(p, plan, n_rows, stream, res, f);
  }
  return kernel_setup(kernel_for<T, 1>(plan.rb), dev, dinfo, &unused, f) &&
         launch_rb<T, 1>(p, plan, n_rows, stream, res, f);
}

}  // namespace

namespace gpu {

LaunchResult launch_steer(const SteerArgs& a) {
  LaunchResult res;
  Failure f;
  bool ok = false;
  switch (a.dtype) {
    case DType::kFloat32: ok = run<float>(a, &res, &f); break;
    case DType::kFloat16: ok = run<c10::Half>(a, &res, &f); break;
    case DType::kBFloat16: ok = run<c10::BFloat16>(a, &res, &f); break;
    default:
      f.failed = true;
      std::snprintf(f.message, sizeof(f.message), "unknown dtype code %d", static_cast<int>(a.dtype));
  }
  if (!ok) {
    res.ok = false;
    std::snprintf(res.message, sizeof(res.message), "%s",
                  f.failed ? f.message : "launch failed for an unknown reason");
  }
  return res;
}

}  // namespace gpu
}  // namespace sae_fast
