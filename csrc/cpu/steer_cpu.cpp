// CPU implementations of the sae_fast steering ops.
//
// One pass per token row: the row of the residual stream (hidden + residual)
// is formed in fp32 chunk by chunk on the stack, the selected features'
// pre-activations are accumulated with LANES independent accumulators (so the
// compiler vectorises without -ffast-math), the per-feature coefficients
// f'_i - f_i are formed, and sum_i coef_i * dec_w[i] is added into hidden in
// fp32 chunks. Nothing is allocated per row (k <= kStackFeatures) and rows
// whose features are all "off" (row 0: padding / unsteered) are skipped.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "steer_common.h"

namespace sae_fast {
namespace {

constexpr int64_t kChunk = 512;         // fp32 elements of a row held on the stack
constexpr int kLanes = 16;              // independent accumulators per dot product
constexpr int64_t kStackFeatures = 512;  // features per call without a heap buffer

template <typename T>
inline float dot_chunk(const float* __restrict x, const T* __restrict w, int64_t n) {
  float acc[kLanes] = {0.f};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) acc[l] += x[j + l] * static_cast<float>(w[j + l]);
  }
  float s = 0.f;
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  for (; j < n; ++j) s += x[j] * static_cast<float>(w[j]);
  return s;
}

template <typename T>
inline void axpy_chunk(float* __restrict acc, float a, const T* __restrict w, int64_t n) {
  for (int64_t j = 0; j < n; ++j) acc[j] += a * static_cast<float>(w[j]);
}

// hidden[row] += sum_c coef[c] * table[c]   (only the listed features)
template <typename T>
inline void add_rows(T* __restrict h, const T* __restrict table, int64_t d, const float* coef,
                     const int32_t* active, int64_t n_active) {
  float acc[kChunk];
  for (int64_t j0 = 0; j0 < d; j0 += kChunk) {
    const int64_t n = std::min(kChunk, d - j0);
    std::fill(acc, acc + n, 0.f);
    for (int64_t a = 0; a < n_active; ++a) {
      const int32_t c = active[a];
      axpy_chunk(acc, coef[c], table + c * d + j0, n);
    }
    for (int64_t j = 0; j < n; ++j) h[j0 + j] = static_cast<T>(static_cast<float>(h[j0 + j]) + acc[j]);
  }
}

template <typename idx_t>
inline int64_t checked_row(const idx_t* row_index, int64_t t, int64_t R) {
  const int64_t r = static_cast<int64_t>(row_index[t]);
  TORCH_CHECK(r >= 0 && r < R, "row_index[", t, "] = ", r, " is outside [0, ", R,
              ") (rows of strengths/weights)");
  return r;
}

inline int64_t grain_for(int64_t work_per_row) {
  return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, work_per_row));
}

template <typename T, typename idx_t>
void steer_rows(T* hidden, int64_t h_stride, const T* residual, int64_t r_stride,
                const T* enc_w, const float* enc_b, const float* threshold, const T* dec_w,
                const float* max_act, const float* strengths, const int8_t* modes,
                const idx_t* row_index, const float* kth, int64_t T_rows, int64_t d, int64_t k,
                int64_t R, int64_t activation, float scale, float lo, float hi) {
  at::parallel_for(0, T_rows, grain_for(2 * k * d), [&](int64_t begin, int64_t end) {
    float pre_stack[kStackFeatures], coef_stack[kStackFeatures];
    int32_t enc_stack[kStackFeatures], act_stack[kStackFeatures];
    std::vector<float> pre_heap, coef_heap;
    std::vector<int32_t> enc_heap, act_heap;
    float *pre = pre_stack, *coef = coef_stack;
    int32_t *enc_list = enc_stack, *act_list = act_stack;
    if (k > kStackFeatures) {
      pre_heap.resize(k), coef_heap.resize(k), enc_heap.resize(k), act_heap.resize(k);
      pre = pre_heap.data(), coef = coef_heap.data();
      enc_list = enc_heap.data(), act_list = act_heap.data();
    }
    float xbuf[kChunk];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r = checked_row(row_index, t, R);
      const int8_t* m = modes + r * k;
      const float* s = strengths + r * k;
      int64_t n_enc = 0, n_act = 0;
      for (int64_t c = 0; c < k; ++c) {
        if (m[c] == kOff) continue;
        act_list[n_act++] = static_cast<int32_t>(c);
        if (m[c] != kAdd) enc_list[n_enc++] = static_cast<int32_t>(c);
      }
      if (n_act == 0) continue;  // exact no-op row
      T* h = hidden + t * h_stride;
      if (n_enc > 0) {
        const T* res = residual ? residual + t * r_stride : nullptr;
        for (int64_t e = 0; e < n_enc; ++e) pre[enc_list[e]] = enc_b ? enc_b[enc_list[e]] : 0.f;
        for (int64_t j0 = 0; j0 < d; j0 += kChunk) {
          const int64_t n = std::min(kChunk, d - j0);
          if (res) {
            for (int64_t j = 0; j < n; ++j)
              xbuf[j] = static_cast<float>(h[j0 + j]) + static_cast<float>(res[j0 + j]);
          } else {
            for (int64_t j = 0; j < n; ++j) xbuf[j] = static_cast<float>(h[j0 + j]);
          }
          for (int64_t e = 0; e < n_enc; ++e) {
            const int32_t c = enc_list[e];
            pre[c] += dot_chunk(xbuf, enc_w + c * d + j0, n);
          }
        }
      }
      const float kth_t = kth ? kth[t] : 0.f;
      int64_t n_nonzero = 0;
      for (int64_t a = 0; a < n_act; ++a) {
        const int32_t c = act_list[a];
        const float sc = std::min(std::max(s[c], lo), hi) * scale;
        float f = 0.f;
        if (m[c] != kAdd) {
          const float p = pre[c];
          if (activation == kThresholdRelu) {
            f = p > (threshold ? threshold[c] : 0.f) ? p : 0.f;
          } else if (activation == kIdentity) {
            f = p;
          } else {
            f = (p >= kth_t && p > 0.f) ? p : 0.f;
          }
        }
        float cf;
        switch (m[c]) {
          case kAdd: cf = sc; break;
          case kSet: cf = sc * max_act[c] - f; break;
          case kScale: cf = f * sc - f; break;
          case kAblate: cf = -f; break;
          default:
            TORCH_CHECK(false, "modes[", r, ", ", c, "] = ", static_cast<int>(m[c]),
                        " is not a mode code (0 off, 1 add, 2 set, 3 scale, 4 ablate)");
        }
        coef[c] = cf;
        if (cf != 0.f) act_list[n_nonzero++] = c;
      }
      if (n_nonzero > 0) add_rows(h, dec_w, d, coef, act_list, n_nonzero);
    }
  });
}

template <typename Fn>
void dispatch_types(const at::Tensor& hidden, const at::Tensor& row_index, Fn&& fn) {
  auto with_idx = [&](auto type_tag) {
    using T = decltype(type_tag);
    if (row_index.scalar_type() == at::kInt) {
      fn(T{}, int32_t{});
    } else {
      fn(T{}, int64_t{});
    }
  };
  switch (hidden.scalar_type()) {
    case at::kFloat: with_idx(float{}); break;
    case at::kHalf: with_idx(c10::Half{}); break;
    case at::kBFloat16: with_idx(c10::BFloat16{}); break;
    default: TORCH_CHECK(false, "unsupported hidden dtype ", hidden.scalar_type());
  }
}

void steer_cpu(at::Tensor& hidden, const c10::optional<at::Tensor>& residual,
               const at::Tensor& enc_w, const at::Tensor& enc_b, const at::Tensor& threshold,
               const at::Tensor& dec_w, const at::Tensor& max_act, const at::Tensor& strengths,
               const at::Tensor& modes, const at::Tensor& row_index,
               const c10::optional<at::Tensor>& topk_kth, int64_t activation, double scale,
               double min_strength, double max_strength) {
  const int64_t k = check_steer_args(hidden, residual, enc_w, enc_b, threshold, dec_w, max_act,
                                     strengths, modes, row_index, topk_kth, activation,
                                     min_strength, max_strength);
  if (hidden.size(0) == 0 || k == 0) return;
  dispatch_types(hidden, row_index, [&](auto type_tag, auto idx_tag) {
    using T = decltype(type_tag);
    using idx_t = decltype(idx_tag);
    steer_rows<T, idx_t>(
        hidden.data_ptr<T>(), hidden.stride(0),
        residual.has_value() ? residual->data_ptr<T>() : nullptr,
        residual.has_value() ? residual->stride(0) : 0, enc_w.data_ptr<T>(),
        enc_b.data_ptr<float>(), threshold.data_ptr<float>(), dec_w.data_ptr<T>(),
        max_act.data_ptr<float>(), strengths.data_ptr<float>(), modes.data_ptr<int8_t>(),
        row_index.data_ptr<idx_t>(),
        activation == kTopK ? topk_kth->data_ptr<float>() : nullptr, hidden.size(0),
        hidden.size(1), k, strengths.size(0), activation, static_cast<float>(scale),
        static_cast<float>(min_strength), static_cast<float>(max_strength));
  });
}

void clamp_direction_cpu(at::Tensor& hidden, const c10::optional<at::Tensor>& residual,
                         const at::Tensor& directions, const at::Tensor& max_act,
                         const at::Tensor& strengths, const at::Tensor& modes,
                         const at::Tensor& row_index, double scale, double min_strength,
                         double max_strength) {
  check_hidden(hidden, residual);
  check_table(hidden, directions, "directions");
  const int64_t k = directions.size(0);
  check_vec(max_act, "max_act", k);
  check_rows(hidden, strengths, row_index, k, "strengths");
  check_modes(hidden, modes, strengths);
  TORCH_CHECK(min_strength <= max_strength, "min_strength (", min_strength,
              ") must be <= max_strength (", max_strength, ")");
  if (hidden.size(0) == 0 || k == 0) return;
  dispatch_types(hidden, row_index, [&](auto type_tag, auto idx_tag) {
    using T = decltype(type_tag);
    using idx_t = decltype(idx_tag);
    steer_rows<T, idx_t>(
        hidden.data_ptr<T>(), hidden.stride(0),
        residual.has_value() ? residual->data_ptr<T>() : nullptr,
        residual.has_value() ? residual->stride(0) : 0, directions.data_ptr<T>(), nullptr,
        nullptr, directions.data_ptr<T>(), max_act.data_ptr<float>(),
        strengths.data_ptr<float>(), modes.data_ptr<int8_t>(), row_index.data_ptr<idx_t>(),
        nullptr, hidden.size(0), hidden.size(1), k, strengths.size(0), kIdentity,
        static_cast<float>(scale), static_cast<float>(min_strength),
        static_cast<float>(max_strength));
  });
}

void add_vectors_cpu(at::Tensor& hidden, const at::Tensor& vectors, const at::Tensor& weights,
                     const at::Tensor& row_index) {
  const int64_t k = check_add_vectors_args(hidden, vectors, weights, row_index);
  const int64_t T_rows = hidden.size(0), d = hidden.size(1), R = weights.size(0);
  if (T_rows == 0 || k == 0) return;
  dispatch_types(hidden, row_index, [&](auto type_tag, auto idx_tag) {
    using T = decltype(type_tag);
    using idx_t = decltype(idx_tag);
    T* hid = hidden.data_ptr<T>();
    const int64_t hs = hidden.stride(0);
    const T* vec = vectors.data_ptr<T>();
    const float* w = weights.data_ptr<float>();
    const idx_t* ri = row_index.data_ptr<idx_t>();
    at::parallel_for(0, T_rows, grain_for(k * d), [&](int64_t begin, int64_t end) {
      std::vector<int32_t> heap;
      int32_t stack[kStackFeatures];
      int32_t* active = stack;
      if (k > kStackFeatures) heap.resize(k), active = heap.data();
      for (int64_t t = begin; t < end; ++t) {
        const int64_t r = checked_row(ri, t, R);
        const float* wr = w + r * k;
        int64_t n_active = 0;
        for (int64_t c = 0; c < k; ++c)
          if (wr[c] != 0.f) active[n_active++] = static_cast<int32_t>(c);
        if (n_active > 0) add_rows(hid + t * hs, vec, d, wr, active, n_active);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(sae_fast, CPU, m) {
  m.impl("steer_", &steer_cpu);
  m.impl("clamp_direction_", &clamp_direction_cpu);
  m.impl("add_vectors_", &add_vectors_cpu);
}

}  // namespace sae_fast
