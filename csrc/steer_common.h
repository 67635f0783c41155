// Shared by the CPU and CUDA implementations of the steering ops: the
// integer codes (mirrors sae_fast/ops/codes.py) and the argument checks, so
// both devices reject bad input with the same messages.
#pragma once

#include <torch/all.h>

#include "steer_codes.h"

namespace sae_fast {

inline void check_row_major(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, name, " must be 2-D [rows, d], got shape ", t.sizes());
  TORCH_CHECK(t.stride(1) == 1, name, " must have a contiguous last dimension, got strides ",
              t.strides());
}

inline void check_vec(const at::Tensor& t, const char* name, int64_t k) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == k, name, " must have shape [", k, "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

inline void check_same_device(const at::Tensor& ref, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but hidden is on ",
              ref.device());
}

inline void check_hidden(const at::Tensor& hidden, const c10::optional<at::Tensor>& residual) {
  check_row_major(hidden, "hidden");
  auto st = hidden.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "hidden must be float32, float16 or bfloat16, got ", st);
  if (residual.has_value()) {
    const auto& r = residual.value();
    check_row_major(r, "residual");
    TORCH_CHECK(r.sizes() == hidden.sizes(), "residual shape ", r.sizes(),
                " must equal hidden shape ", hidden.sizes());
    TORCH_CHECK(r.scalar_type() == st, "residual dtype ", r.scalar_type(),
                " must equal hidden dtype ", st);
    check_same_device(hidden, r, "residual");
  }
}

// Checks a feature table [k, d] against hidden (same dtype, same d).
inline void check_table(const at::Tensor& hidden, const at::Tensor& w, const char* name) {
  TORCH_CHECK(w.dim() == 2 && w.size(1) == hidden.size(1), name, " must have shape [k, ",
              hidden.size(1), "], got ", w.sizes());
  TORCH_CHECK(w.scalar_type() == hidden.scalar_type(), name, " dtype ", w.scalar_type(),
              " must equal hidden dtype ", hidden.scalar_type());
  TORCH_CHECK(w.is_contiguous(), name, " must be contiguous");
  check_same_device(hidden, w, name);
}

inline void check_rows(const at::Tensor& hidden, const at::Tensor& strengths,
                       const at::Tensor& row_index, int64_t k, const char* strengths_name) {
  TORCH_CHECK(strengths.dim() == 2 && strengths.size(1) == k && strengths.size(0) >= 1,
              strengths_name, " must have shape [R >= 1, ", k, "], got ", strengths.sizes());
  TORCH_CHECK(strengths.scalar_type() == at::kFloat, strengths_name, " must be float32, got ",
              strengths.scalar_type());
  TORCH_CHECK(strengths.is_contiguous(), strengths_name, " must be contiguous");
  check_same_device(hidden, strengths, strengths_name);
  TORCH_CHECK(row_index.dim() == 1 && row_index.size(0) == hidden.size(0),
              "row_index must have shape [", hidden.size(0), "] (one entry per hidden row), got ",
              row_index.sizes());
  TORCH_CHECK(row_index.scalar_type() == at::kInt || row_index.scalar_type() == at::kLong,
              "row_index must be int32 or int64, got ", row_index.scalar_type());
  TORCH_CHECK(row_index.is_contiguous(), "row_index must be contiguous");
  check_same_device(hidden, row_index, "row_index");
}

inline void check_modes(const at::Tensor& hidden, const at::Tensor& modes,
                        const at::Tensor& strengths) {
  TORCH_CHECK(modes.sizes() == strengths.sizes(), "modes shape ", modes.sizes(),
              " must equal strengths shape ", strengths.sizes());
  TORCH_CHECK(modes.scalar_type() == at::kChar, "modes must be int8, got ", modes.scalar_type());
  TORCH_CHECK(modes.is_contiguous(), "modes must be contiguous");
  check_same_device(hidden, modes, "modes");
}

// Full argument check of steer_; returns k.
inline int64_t check_steer_args(const at::Tensor& hidden, const c10::optional<at::Tensor>& residual,
                                const at::Tensor& enc_w, const at::Tensor& enc_b,
                                const at::Tensor& threshold, const at::Tensor& dec_w,
                                const at::Tensor& max_act, const at::Tensor& strengths,
                                const at::Tensor& modes, const at::Tensor& row_index,
                                const c10::optional<at::Tensor>& topk_kth, int64_t activation,
                                double min_strength, double max_strength) {
  check_hidden(hidden, residual);
  check_table(hidden, enc_w, "enc_w");
  const int64_t k = enc_w.size(0);
  check_table(hidden, dec_w, "dec_w");
  TORCH_CHECK(dec_w.size(0) == k, "dec_w has ", dec_w.size(0), " rows but enc_w has ", k);
  check_vec(enc_b, "enc_b", k);
  check_vec(threshold, "threshold", k);
  check_vec(max_act, "max_act", k);
  check_same_device(hidden, enc_b, "enc_b");
  check_same_device(hidden, threshold, "threshold");
  check_same_device(hidden, max_act, "max_act");
  check_rows(hidden, strengths, row_index, k, "strengths");
  check_modes(hidden, modes, strengths);
  TORCH_CHECK(activation == kThresholdRelu || activation == kIdentity || activation == kTopK,
              "activation must be 0 (threshold_relu), 1 (identity) or 2 (topk), got ", activation);
  if (activation == kTopK) {
    TORCH_CHECK(topk_kth.has_value(), "activation=2 (topk) needs topk_kth [T]");
    const auto& kth = topk_kth.value();
    TORCH_CHECK(kth.dim() == 1 && kth.size(0) == hidden.size(0) &&
                    kth.scalar_type() == at::kFloat && kth.is_contiguous(),
                "topk_kth must be a contiguous float32 [", hidden.size(0), "], got ", kth.sizes(),
                " ", kth.scalar_type());
    check_same_device(hidden, kth, "topk_kth");
  }
  TORCH_CHECK(min_strength <= max_strength, "min_strength (", min_strength,
              ") must be <= max_strength (", max_strength, ")");
  return k;
}

// Full argument check of clamp_direction_; returns k.
inline int64_t check_clamp_direction_args(const at::Tensor& hidden,
                                          const c10::optional<at::Tensor>& residual,
                                          const at::Tensor& directions, const at::Tensor& max_act,
                                          const at::Tensor& strengths, const at::Tensor& modes,
                                          const at::Tensor& row_index, double min_strength,
                                          double max_strength) {
  check_hidden(hidden, residual);
  check_table(hidden, directions, "directions");
  const int64_t k = directions.size(0);
  check_vec(max_act, "max_act", k);
  check_same_device(hidden, max_act, "max_act");
  check_rows(hidden, strengths, row_index, k, "strengths");
  check_modes(hidden, modes, strengths);
  TORCH_CHECK(min_strength <= max_strength, "min_strength (", min_strength,
              ") must be <= max_strength (", max_strength, ")");
  return k;
}

// Full argument check of add_vectors_; returns k.
inline int64_t check_add_vectors_args(const at::Tensor& hidden, const at::Tensor& vectors,
                                      const at::Tensor& weights, const at::Tensor& row_index) {
  check_hidden(hidden, c10::nullopt);
  check_table(hidden, vectors, "vectors");
  const int64_t k = vectors.size(0);
  check_rows(hidden, weights, row_index, k, "weights");
  return k;
}

}  // namespace sae_fast
