// CPU implementations of the sae_fast steering ops.
//
// One pass per token row: the row of the residual stream (hidden + residual)
// is formed in fp32 chunk by chunk on the stack, the selected features'
// pre-activations are accumulated with LANES independent accumulators (so the
// compiler vectorises without -ffast-math), the per-feature coefficients
// f'_i - f_i are formed, and sum_i coef_i * dec_w[i] is added into hidden in
// fp32 chunks. Nothing is allocated per row (k <= kStackFeatures) and rows
// whose features are all "off" (row 0: padding / unsteered) are skipped.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <vector>

#include "steer_common.h"

namespace sae_fast {
namespace {

constexpr int64_t kChunk = 512;         // fp32 elements of a row held on the stack
constexpr int kLanes = 16;              // independent accumulators per dot product
constexpr int64_t kStackFeatures = 512;  // features per call without a heap buffer

// Rows are processed in groups of kRowTile so each weight element loaded
// from memory feeds kRowTile FMAs (a small GEMM micro-kernel); a group with
// fewer live rows pads with a zero row whose results are discarded.
constexpr int kRowTile = 4;

// acc[r] += dot(x[r][0:n], w[0:n]) for the kRowTile rows of a group.
template <typename T>
inline void dot_rows(const float (*__restrict x)[kChunk], const T* __restrict w, int64_t n,
                     float* __restrict out) {
  float acc[kRowTile][kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const float wv = static_cast<float>(w[j + l]);
      for (int r = 0; r < kRowTile; ++r) acc[r][l] += x[r][j + l] * wv;
    }
  }
  for (int r = 0; r < kRowTile; ++r) {
    float s = 0.f;
    for (int l = 0; l < kLanes; ++l) s += acc[r][l];
    for (int64_t jj = j; jj < n; ++jj) s += x[r][jj] * static_cast<float>(w[jj]);
    out[r] += s;
  }
}

// acc[r][0:n] = sum_e coef[list[e] * kRowTile + r] * table[list[e]][j0:j0+n]
template <typename T>
inline void axpy_rows(float (*__restrict acc)[kChunk], const float* __restrict coef,
                      const int32_t* __restrict list, int64_t n_list, const T* __restrict table,
                      int64_t d, int64_t j0, int64_t n) {
  for (int r = 0; r < kRowTile; ++r) std::fill(acc[r], acc[r] + n, 0.f);
  for (int64_t e = 0; e < n_list; ++e) {
    const int32_t c = list[e];
    const T* __restrict w = table + c * d + j0;
    const float* cf = coef + c * kRowTile;
    for (int64_t j = 0; j < n; ++j) {
      const float wv = static_cast<float>(w[j]);
      for (int r = 0; r < kRowTile; ++r) acc[r][j] += cf[r] * wv;
    }
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
  return std::max<int64_t>(kRowTile,
                           (int64_t{1} << 16) / std::max<int64_t>(1, work_per_row));
}

// Scratch for one group of kRowTile rows; lives on the worker's stack
// (k <= kStackFeatures) or in a per-task heap buffer (larger k).
struct GroupScratch {
  explicit GroupScratch(int64_t k) {
    if (k > kStackFeatures) {
      heap_f.resize(2 * kRowTile * k);
      heap_i.resize(2 * k);
      heap_m.resize(2 * k);
      pre = heap_f.data();
      coef = heap_f.data() + kRowTile * k;
      enc_list = heap_i.data();
      dec_list = heap_i.data() + k;
      enc_mark = heap_m.data();
      dec_mark = heap_m.data() + k;
    }
  }
  float pre_s[kRowTile * kStackFeatures];
  float coef_s[kRowTile * kStackFeatures];
  int32_t list_s[2 * kStackFeatures];
  uint8_t mark_s[2 * kStackFeatures];
  std::vector<float> heap_f;
  std::vector<int32_t> heap_i;
  std::vector<uint8_t> heap_m;
  float* pre = pre_s;    // [c * kRowTile + r]
  float* coef = coef_s;  // [c * kRowTile + r]
  int32_t* enc_list = list_s;
  int32_t* dec_list = list_s + kStackFeatures;
  uint8_t* enc_mark = mark_s;
  uint8_t* dec_mark = mark_s + kStackFeatures;
};

template <typename T, typename idx_t>
void steer_rows(T* hidden, int64_t h_stride, const T* residual, int64_t r_stride,
                const T* enc_w, const float* enc_b, const float* threshold, const T* dec_w,
                const float* max_act, const float* strengths, const int8_t* modes,
                const idx_t* row_index, const float* kth, int64_t T_rows, int64_t d, int64_t k,
                int64_t R, int64_t activation, float scale, float lo, float hi) {
  at::parallel_for(0, T_rows, grain_for(2 * k * d), [&](int64_t begin, int64_t end) {
    GroupScratch sc(k);
    uint8_t* enc_mark = sc.enc_mark;
    uint8_t* dec_mark = sc.dec_mark;
    alignas(64) float xbuf[kRowTile][kChunk];
    alignas(64) float acc[kRowTile][kChunk];
    int64_t t = begin;
    while (t < end) {
      // Gather up to kRowTile live rows (rows whose modes are all off are skipped:
      // exact no-op, hidden is not even rewritten).
      int64_t rows_t[kRowTile], rows_r[kRowTile];
      int nr = 0;
      for (; t < end && nr < kRowTile; ++t) {
        const int64_t r = checked_row(row_index, t, R);
        const int8_t* m = modes + r * k;
        bool live = false;
        for (int64_t c = 0; c < k && !live; ++c) live = m[c] != kOff;
        if (live) rows_t[nr] = t, rows_r[nr] = r, ++nr;
      }
      if (nr == 0) break;
      // Features to encode / decode for this group (union over its rows).
      std::fill(enc_mark, enc_mark + k, 0);
      std::fill(dec_mark, dec_mark + k, 0);
      int64_t n_enc = 0;
      for (int g = 0; g < nr; ++g) {
        const int8_t* m = modes + rows_r[g] * k;
        for (int64_t c = 0; c < k; ++c) {
          if (m[c] == kOff) continue;
          if (m[c] < kOff || m[c] > kAblate) {
            TORCH_CHECK(false, "modes[", rows_r[g], ", ", c, "] = ", static_cast<int>(m[c]),
                        " is not a mode code (0 off, 1 add, 2 set, 3 scale, 4 ablate)");
          }
          if (m[c] != kAdd && !enc_mark[c]) enc_mark[c] = 1, sc.enc_list[n_enc++] = c;
        }
      }
      if (n_enc > 0) {
        for (int64_t e = 0; e < n_enc; ++e) {
          const int32_t c = sc.enc_list[e];
          for (int g = 0; g < kRowTile; ++g) sc.pre[c * kRowTile + g] = enc_b ? enc_b[c] : 0.f;
        }
        for (int64_t j0 = 0; j0 < d; j0 += kChunk) {
          const int64_t n = std::min(kChunk, d - j0);
          for (int g = 0; g < kRowTile; ++g) {
            float* xb = xbuf[g];
            if (g >= nr) {
              std::fill(xb, xb + n, 0.f);
              continue;
            }
            const T* h = hidden + rows_t[g] * h_stride + j0;
            if (residual) {
              const T* res = residual + rows_t[g] * r_stride + j0;
              for (int64_t j = 0; j < n; ++j)
                xb[j] = static_cast<float>(h[j]) + static_cast<float>(res[j]);
            } else {
              for (int64_t j = 0; j < n; ++j) xb[j] = static_cast<float>(h[j]);
            }
          }
          for (int64_t e = 0; e < n_enc; ++e) {
            const int32_t c = sc.enc_list[e];
            dot_rows(xbuf, enc_w + c * d + j0, n, sc.pre + c * kRowTile);
          }
        }
      }
      // Coefficients f'_i - f_i per (row, feature).
      int64_t n_dec = 0;
      for (int64_t c = 0; c < k; ++c)
        for (int g = 0; g < kRowTile; ++g) sc.coef[c * kRowTile + g] = 0.f;
      for (int g = 0; g < nr; ++g) {
        const int8_t* m = modes + rows_r[g] * k;
        const float* s = strengths + rows_r[g] * k;
        const float kth_t = kth ? kth[rows_t[g]] : 0.f;
        for (int64_t c = 0; c < k; ++c) {
          if (m[c] == kOff) continue;
          const float sv = std::min(std::max(s[c], lo), hi) * scale;
          float f = 0.f;
          if (m[c] != kAdd) {
            const float p = sc.pre[c * kRowTile + g];
            if (activation == kThresholdRelu) {
              f = p > (threshold ? threshold[c] : 0.f) ? p : 0.f;
            } else if (activation == kIdentity) {
              f = p;
            } else {
              f = (p >= kth_t && p > 0.f) ? p : 0.f;
            }
          }
          float cf = 0.f;
          switch (m[c]) {
            case kAdd: cf = sv; break;
            case kSet: cf = sv * max_act[c] - f; break;
            case kScale: cf = f * sv - f; break;
            case kAblate: cf = -f; break;
            default: break;
          }
          sc.coef[c * kRowTile + g] = cf;
          if (cf != 0.f && !dec_mark[c]) dec_mark[c] = 1, sc.dec_list[n_dec++] = c;
        }
      }
      if (n_dec == 0) continue;
      // hidden[row] += sum_c coef[row, c] * dec_w[c], in fp32 chunks.
      for (int64_t j0 = 0; j0 < d; j0 += kChunk) {
        const int64_t n = std::min(kChunk, d - j0);
        axpy_rows(acc, sc.coef, sc.dec_list, n_dec, dec_w, d, j0, n);
        for (int g = 0; g < nr; ++g) {
          T* h = hidden + rows_t[g] * h_stride + j0;
          for (int64_t j = 0; j < n; ++j)
            h[j] = static_cast<T>(static_cast<float>(h[j]) + acc[g][j]);
        }
      }
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

// Large batches (prefill): once the live work T * k * d reaches
// gemm_min_work(), a BLAS GEMM on the selected features beats the row kernel
// (crossover measured by benchmarks/cpu_crossover.py);
// temporaries are allocated there, which the decode-sized row path never does.
// SAE_FAST_CPU_GEMM_MIN_WORK overrides the default (read once).
// On an AVX2 EPYC (1 thread, -march=native) the GEMM path, three ATen calls
// into the BLAS, is faster from about T * k * d = 16k multiply-adds (T=1,
// d=576, k=32: 31 vs 58 us; T=1, d=576, k=8: 24 vs 23 us; T=16, d=4096, k=8:
// 155 vs 284 us): the BLAS kernels beat the row kernel's FMA loops.
constexpr int64_t kGemmMinWorkDefault = 16384;

int64_t gemm_min_work() {
  static const int64_t v = [] {
    const char* env = std::getenv("SAE_FAST_CPU_GEMM_MIN_WORK");
    if (env == nullptr || *env == '\0') return kGemmMinWorkDefault;
    char* end = nullptr;
    const long long x = std::strtoll(env, &end, 10);
    TORCH_CHECK(end != nullptr && *end == '\0' && x >= 0, "SAE_FAST_CPU_GEMM_MIN_WORK=", env,
                " is not a non-negative integer");
    return static_cast<int64_t>(x);
  }();
  return v;
}

// Token rows whose table row has any live entry (a mode other than off, or a
// nonzero weight), counted with plain loops: no ATen op, no allocation, so an
// unsteered or mostly unsteered batch costs what the row path costs at any
// T * k (the GEMM path's setup alone is tens of microseconds). Rows of the
// table are checked once each; row_index values are range-checked.
template <typename idx_t, typename E, typename Live>
int64_t count_live_tokens(const idx_t* row_index, int64_t T_rows, const E* table, int64_t k,
                          int64_t R, Live&& is_live) {
  std::vector<int8_t> state(static_cast<size_t>(R), -1);  // -1 unknown, 0 dead, 1 live
  int64_t n = 0;
  for (int64_t t = 0; t < T_rows; ++t) {
    const int64_t r = checked_row(row_index, t, R);
    int8_t& st = state[static_cast<size_t>(r)];
    if (st < 0) {
      st = 0;
      const E* row = table + r * k;
      for (int64_t c = 0; c < k; ++c) {
        if (is_live(row[c], r, c)) st = 1;
      }
    }
    n += st;
  }
  return n;
}

int64_t live_tokens_modes(const at::Tensor& row_index, const at::Tensor& modes) {
  const int64_t k = modes.size(1), R = modes.size(0);
  const int8_t* m = modes.data_ptr<int8_t>();
  auto live = [](int8_t v, int64_t r, int64_t c) {
    if (v < kOff || v > kAblate) {
      TORCH_CHECK(false, "modes[", r, ", ", c, "] = ", static_cast<int>(v),
                  " is not a mode code (0 off, 1 add, 2 set, 3 scale, 4 ablate)");
    }
    return v != kOff;
  };
  if (row_index.scalar_type() == at::kInt)
    return count_live_tokens(row_index.data_ptr<int32_t>(), row_index.size(0), m, k, R, live);
  return count_live_tokens(row_index.data_ptr<int64_t>(), row_index.size(0), m, k, R, live);
}

int64_t live_tokens_weights(const at::Tensor& row_index, const at::Tensor& weights) {
  const int64_t k = weights.size(1), R = weights.size(0);
  const float* w = weights.data_ptr<float>();
  auto live = [](float v, int64_t, int64_t) { return v != 0.f; };
  if (row_index.scalar_type() == at::kInt)
    return count_live_tokens(row_index.data_ptr<int32_t>(), row_index.size(0), w, k, R, live);
  return count_live_tokens(row_index.data_ptr<int64_t>(), row_index.size(0), w, k, R, live);
}

void check_rows_and_modes_values(const at::Tensor& row_index, const at::Tensor* modes, int64_t R) {
  auto mm = at::aminmax(row_index);
  const int64_t lo = std::get<0>(mm).item<int64_t>(), hi = std::get<1>(mm).item<int64_t>();
  if (lo < 0 || hi >= R) {
    const int64_t bad_val = lo < 0 ? lo : hi;
    const int64_t t = (row_index == bad_val).nonzero().select(1, 0)[0].item<int64_t>();
    TORCH_CHECK(false, "row_index[", t, "] = ", bad_val, " is outside [0, ", R,
                ") (rows of strengths/weights)");
  }
  if (modes != nullptr) {
    auto bad = (*modes < 0).logical_or(*modes > kAblate).nonzero();
    if (bad.size(0) > 0) {
      const int64_t r = bad[0][0].item<int64_t>(), c = bad[0][1].item<int64_t>();
      TORCH_CHECK(false, "modes[", r, ", ", c, "] = ", (*modes)[r][c].item<int64_t>(),
                  " is not a mode code (0 off, 1 add, 2 set, 3 scale, 4 ablate)");
    }
  }
}

// Rows of hidden the GEMM paths touch: those whose mask row has any entry set
// (an unsteered batch returns before any arithmetic). `all` spares the
// gathers and the scatter when every row is live (the usual prefill).
struct LiveRows {
  at::Tensor index;  // [n_live] int64
  bool all = false;
  int64_t size() const { return index.size(0); }
  at::Tensor pick(const at::Tensor& t) const { return all ? t : t.index_select(0, index); }
};

LiveRows live_rows(const at::Tensor& any_mask) {
  LiveRows live;
  live.index = any_mask.nonzero().squeeze(1);
  live.all = live.size() == any_mask.size(0);
  return live;
}

// hidden[live] += delta ([n_live, d] fp32) with one rounding; hf_live = the
// live rows of hidden in fp32 (hidden itself when float32 and all rows live).
// Rows outside `live` are never written: bit-identical, -0.0 and NaN included.
void add_live_delta(at::Tensor& hidden, const LiveRows& live, const at::Tensor& hf_live,
                    at::Tensor delta) {
  if (live.all && hidden.scalar_type() == at::kFloat) {
    hidden.add_(delta);
  } else if (live.all) {
    hidden.copy_(delta.add_(hf_live));
  } else {
    hidden.index_copy_(0, live.index, delta.add_(hf_live).to(hidden.scalar_type()));
  }
}

// The GEMM path: pre = x @ enc_w^T for the live rows (one BLAS call), the
// per-feature coefficients formed by a plain loop in place on pre, then
// hidden[live] += coef @ dec_w (one more). Three ATen calls in all when every
// row is live in fp32 (the add of the residual, the two matrix products):
// the per-op dispatch of an elementwise formulation (a dozen ops) used to
// cost more than the products themselves up to T * k of a few thousand.
// Called only after live_tokens_modes, which range-checked row_index and the
// mode codes.
void steer_gemm(at::Tensor& hidden, const c10::optional<at::Tensor>& residual,
                const at::Tensor& enc_w, const c10::optional<at::Tensor>& enc_b,
                const c10::optional<at::Tensor>& threshold, const at::Tensor& dec_w,
                const at::Tensor& max_act, const at::Tensor& strengths, const at::Tensor& modes,
                const at::Tensor& row_index, const c10::optional<at::Tensor>& topk_kth,
                int64_t activation, double scale, double lo, double hi) {
  at::NoGradGuard no_grad;
  const int64_t T_rows = hidden.size(0), k = enc_w.size(0), R = modes.size(0);
  const int8_t* mt = modes.data_ptr<int8_t>();
  std::vector<int8_t> row_live(static_cast<size_t>(R));
  for (int64_t r = 0; r < R; ++r) {
    int8_t any = 0;
    for (int64_t c = 0; c < k; ++c) any |= mt[r * k + c] != kOff;
    row_live[static_cast<size_t>(r)] = any;
  }
  std::vector<int64_t> rows;  // table row of each live token, in token order
  std::vector<int64_t> tokens;  // the live tokens
  rows.reserve(static_cast<size_t>(T_rows));
  tokens.reserve(static_cast<size_t>(T_rows));
  for (int64_t t = 0; t < T_rows; ++t) {
    const int64_t r = row_index.scalar_type() == at::kInt
                          ? static_cast<int64_t>(row_index.data_ptr<int32_t>()[t])
                          : row_index.data_ptr<int64_t>()[t];
    if (row_live[static_cast<size_t>(r)]) {
      rows.push_back(r);
      tokens.push_back(t);
    }
  }
  const int64_t n = static_cast<int64_t>(tokens.size());
  if (n == 0) return;
  LiveRows live;
  live.all = n == T_rows;
  if (!live.all) live.index = at::tensor(tokens, at::TensorOptions().dtype(at::kLong));
  const auto hf = live.pick(hidden).to(at::kFloat);  // hidden itself when float32 and all live
  const auto x = residual.has_value() ? hf.add(live.pick(*residual).to(at::kFloat)) : hf;
  auto pre = at::mm(x, enc_w.to(at::kFloat).t());
  float* P = pre.data_ptr<float>();
  const float* b = enc_b.has_value() ? enc_b->data_ptr<float>() : nullptr;
  const float* thr = threshold.has_value() ? threshold->data_ptr<float>() : nullptr;
  const float* kth = activation == kTopK ? topk_kth->data_ptr<float>() : nullptr;
  const float* ma = max_act.data_ptr<float>();
  const float* st = strengths.data_ptr<float>();
  const float lo_f = static_cast<float>(lo), hi_f = static_cast<float>(hi);
  const float scale_f = static_cast<float>(scale);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t r = rows[static_cast<size_t>(i)];
    float* pi = P + i * k;
    for (int64_t c = 0; c < k; ++c) {
      const float p = b != nullptr ? pi[c] + b[c] : pi[c];
      float f;
      if (activation == kThresholdRelu) {
        f = p > (thr != nullptr ? thr[c] : 0.f) ? p : 0.f;
      } else if (activation == kIdentity) {
        f = p;
      } else {
        f = (p >= kth[tokens[static_cast<size_t>(i)]] && p > 0.f) ? p : 0.f;
      }
      const float s = std::min(std::max(st[r * k + c], lo_f), hi_f) * scale_f;
      switch (mt[r * k + c]) {
        case kAdd: pi[c] = s; break;
        case kSet: pi[c] = s * ma[c] - f; break;
        case kScale: pi[c] = f * s - f; break;
        case kAblate: pi[c] = -f; break;
        default: pi[c] = 0.f;
      }
    }
  }
  const auto dec = dec_w.to(at::kFloat);
  if (live.all && hidden.scalar_type() == at::kFloat) {
    hidden.addmm_(pre, dec);
  } else {
    add_live_delta(hidden, live, hf, pre.mm(dec));
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
  const int64_t d = hidden.size(1), min_work = gemm_min_work();
  if (hidden.size(0) * k * d >= min_work) {
    // The GEMM pays off only for the live rows; few live rows take the row path.
    const int64_t n_live = live_tokens_modes(row_index, modes);
    if (n_live == 0) return;
    if (n_live * k * d >= min_work) {
      steer_gemm(hidden, residual, enc_w, enc_b, threshold, dec_w, max_act, strengths, modes,
                 row_index, topk_kth, activation, scale, min_strength, max_strength);
      return;
    }
  }
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
  const int64_t k = check_clamp_direction_args(hidden, residual, directions, max_act, strengths,
                                               modes, row_index, min_strength, max_strength);
  if (hidden.size(0) == 0 || k == 0) return;
  const int64_t work = hidden.size(0) * k * hidden.size(1), min_work = gemm_min_work();
  const int64_t n_live = work >= min_work ? live_tokens_modes(row_index, modes) : 0;
  if (work >= min_work && n_live == 0) return;
  if (n_live * k * hidden.size(1) >= min_work) {
    steer_gemm(hidden, residual, directions, c10::nullopt, c10::nullopt, directions, max_act,
               strengths, modes, row_index, c10::nullopt, kIdentity, scale, min_strength,
               max_strength);
    return;
  }
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
  const int64_t min_work = gemm_min_work();
  const int64_t n_live = T_rows * k * d >= min_work ? live_tokens_weights(row_index, weights) : 0;
  if (T_rows * k * d >= min_work && n_live == 0) return;
  if (n_live * k * d >= min_work) {
    check_rows_and_modes_values(row_index, nullptr, R);
    at::NoGradGuard no_grad;
    const auto idx_all = row_index.to(at::kLong);
    const LiveRows live = live_rows(weights.ne(0).any(1).index_select(0, idx_all));
    if (live.size() == 0) return;
    const auto w_rows = weights.index_select(0, live.pick(idx_all));
    add_live_delta(hidden, live, live.pick(hidden).to(at::kFloat),
                   w_rows.mm(vectors.to(at::kFloat)));
    return;
  }
  dispatch_types(hidden, row_index, [&](auto type_tag, auto idx_tag) {
    using T = decltype(type_tag);
    using idx_t = decltype(idx_tag);
    T* hid = hidden.data_ptr<T>();
    const int64_t hs = hidden.stride(0);
    const T* vec = vectors.data_ptr<T>();
    const float* w = weights.data_ptr<float>();
    const idx_t* ri = row_index.data_ptr<idx_t>();
    at::parallel_for(0, T_rows, grain_for(k * d), [&](int64_t begin, int64_t end) {
      GroupScratch sc(k);
      int32_t* active = sc.enc_list;
      float* coef = sc.coef;
      alignas(64) float acc[kRowTile][kChunk];
      int64_t t = begin;
      while (t < end) {
        int64_t rows_t[kRowTile];
        int nr = 0;
        std::fill(coef, coef + kRowTile * k, 0.f);
        for (; t < end && nr < kRowTile; ++t) {
          const float* wr = w + checked_row(ri, t, R) * k;
          bool live = false;
          for (int64_t c = 0; c < k; ++c) {
            coef[c * kRowTile + nr] = wr[c];
            live |= wr[c] != 0.f;
          }
          if (live) rows_t[nr++] = t;
        }
        if (nr == 0) break;
        int64_t n_active = 0;
        for (int64_t c = 0; c < k; ++c) {
          bool any = false;
          for (int g = 0; g < nr; ++g) any |= coef[c * kRowTile + g] != 0.f;
          for (int g = nr; g < kRowTile; ++g) coef[c * kRowTile + g] = 0.f;
          if (any) active[n_active++] = static_cast<int32_t>(c);
        }
        for (int64_t j0 = 0; j0 < d; j0 += kChunk) {
          const int64_t n = std::min(kChunk, d - j0);
          axpy_rows(acc, coef, active, n_active, vec, d, j0, n);
          for (int g = 0; g < nr; ++g) {
            T* h = hid + rows_t[g] * hs + j0;
            for (int64_t j = 0; j < n; ++j)
              h[j] = static_cast<T>(static_cast<float>(h[j]) + acc[g][j]);
          }
        }
      }
    });
  });
}

}  // namespace

// The CPU path threshold, for tests that pick shapes on either side of it.
TORCH_LIBRARY_FRAGMENT(sae_fast, m) {
  m.def("cpu_gemm_min_work() -> int", [] { return gemm_min_work(); });
}

TORCH_LIBRARY_IMPL(sae_fast, CPU, m) {
  m.impl("steer_", &steer_cpu);
  m.impl("clamp_direction_", &clamp_direction_cpu);
  m.impl("add_vectors_", &add_vectors_cpu);
}

}  // namespace sae_fast
