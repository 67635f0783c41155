// Torch-facing side of the CUDA steering ops: argument checks (the same
// messages as the CPU path, steer_common.h), the device guard and current
// stream, and the dispatcher registration. The kernels and their launch
// planning live in steer_cuda.cu behind the plain interface of steer_cuda.h.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>

#include "cuda/steer_cuda.h"
#include "steer_common.h"

namespace sae_fast {
namespace {

void check_cuda_k(int64_t k) {
  TORCH_CHECK(k <= kMaxFeaturesCuda, "the CUDA steering kernels take at most ", kMaxFeaturesCuda,
              " features per call, got k=", k);
}

gpu::DType dtype_of(const at::Tensor& hidden) {
  switch (hidden.scalar_type()) {
    case at::kFloat: return gpu::DType::kFloat32;
    case at::kHalf: return gpu::DType::kFloat16;
    case at::kBFloat16: return gpu::DType::kBFloat16;
    default: TORCH_CHECK(false, "unsupported hidden dtype ", hidden.scalar_type());
  }
}

gpu::SteerArgs base_args(at::Tensor& hidden, const c10::optional<at::Tensor>& residual,
                          const at::Tensor& strengths, const at::Tensor& row_index, int64_t k) {
  gpu::SteerArgs a;
  a.hidden = hidden.data_ptr();
  a.h_stride = hidden.stride(0);
  if (residual.has_value()) {
    a.residual = residual->data_ptr();
    a.r_stride = residual->stride(0);
  }
  a.strengths = strengths.data_ptr<float>();
  a.row_index = row_index.data_ptr();
  a.idx64 = row_index.scalar_type() == at::kLong;
  a.n_rows = hidden.size(0);
  a.d = hidden.size(1);
  a.k = k;
  a.R = strengths.size(0);
  a.activation = static_cast<int>(kIdentity);
  a.lo = -INFINITY;
  a.hi = INFINITY;
  a.dtype = dtype_of(hidden);
  a.device = hidden.get_device();
  a.stream = c10::cuda::getCurrentCUDAStream(a.device).stream();
  return a;
}

void launch(const gpu::SteerArgs& a) {
  const gpu::LaunchResult r = gpu::launch_steer(a);
  if (r.cluster_refused) {
    TORCH_WARN_ONCE("sae_fast CUDA: a thread-block cluster launch was refused (", r.message,
                    "); using one block per row group from now on");
  }
  TORCH_CHECK(r.ok, "sae_fast CUDA: ", r.message);
}

void steer_cuda(at::Tensor& hidden, const c10::optional<at::Tensor>& residual,
                const at::Tensor& enc_w, const at::Tensor& enc_b, const at::Tensor& threshold,
                const at::Tensor& dec_w, const at::Tensor& max_act, const at::Tensor& strengths,
                const at::Tensor& modes, const at::Tensor& row_index,
                const c10::optional<at::Tensor>& topk_kth, int64_t activation, double scale,
                double min_strength, double max_strength) {
  const int64_t k = check_steer_args(hidden, residual, enc_w, enc_b, threshold, dec_w, max_act,
                                     strengths, modes, row_index, topk_kth, activation,
                                     min_strength, max_strength);
  check_cuda_k(k);
  if (hidden.size(0) == 0 || k == 0) return;
  const c10::cuda::CUDAGuard guard(hidden.device());
  gpu::SteerArgs a = base_args(hidden, residual, strengths, row_index, k);
  a.enc_w = enc_w.data_ptr();
  a.dec_w = dec_w.data_ptr();
  a.enc_b = enc_b.data_ptr<float>();
  a.threshold = threshold.data_ptr<float>();
  a.max_act = max_act.data_ptr<float>();
  a.modes = modes.data_ptr<int8_t>();
  a.kth = activation == kTopK ? topk_kth->data_ptr<float>() : nullptr;
  a.activation = static_cast<int>(activation);
  a.scale = static_cast<float>(scale);
  a.lo = static_cast<float>(min_strength);
  a.hi = static_cast<float>(max_strength);
  launch(a);
}

void clamp_direction_cuda(at::Tensor& hidden, const c10::optional<at::Tensor>& residual,
                          const at::Tensor& directions, const at::Tensor& max_act,
                          const at::Tensor& strengths, const at::Tensor& modes,
                          const at::Tensor& row_index, double scale, double min_strength,
                          double max_strength) {
  const int64_t k = check_clamp_direction_args(hidden, residual, directions, max_act, strengths,
                                               modes, row_index, min_strength, max_strength);
  check_cuda_k(k);
  if (hidden.size(0) == 0 || k == 0) return;
  const c10::cuda::CUDAGuard guard(hidden.device());
  gpu::SteerArgs a = base_args(hidden, residual, strengths, row_index, k);
  a.enc_w = directions.data_ptr();
  a.dec_w = a.enc_w;
  a.max_act = max_act.data_ptr<float>();
  a.modes = modes.data_ptr<int8_t>();
  a.activation = static_cast<int>(kIdentity);
  a.scale = static_cast<float>(scale);
  a.lo = static_cast<float>(min_strength);
  a.hi = static_cast<float>(max_strength);
  launch(a);
}

void add_vectors_cuda(at::Tensor& hidden, const at::Tensor& vectors, const at::Tensor& weights,
                      const at::Tensor& row_index) {
  const int64_t k = check_add_vectors_args(hidden, vectors, weights, row_index);
  check_cuda_k(k);
  if (hidden.size(0) == 0 || k == 0) return;
  const c10::cuda::CUDAGuard guard(hidden.device());
  gpu::SteerArgs a = base_args(hidden, c10::nullopt, weights, row_index, k);
  a.dec_w = vectors.data_ptr();  // enc_w and modes stay null: weights are the coefficients
  launch(a);
}

}  // namespace

TORCH_LIBRARY_IMPL(sae_fast, CUDA, m) {
  m.impl("steer_", &steer_cuda);
  m.impl("clamp_direction_", &clamp_direction_cuda);
  m.impl("add_vectors_", &add_vectors_cuda);
}

}  // namespace sae_fast
