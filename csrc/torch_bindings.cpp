// Schemas of every sae_fast op. Implementations register per device in
// csrc/cpu/ and csrc/cuda/; the fake (meta) implementations live in
// sae_fast/ops/__init__.py (`_noop_fake`). All ops mutate their first tensor (`hidden`, or
// count_'s counter) in place and return nothing, so they are safe inside CUDA graphs and
// torch.compile'd regions.
#include <Python.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>

static std::string build_info() {
#ifdef SAE_FAST_WITH_CUDA
  return "cpu,cuda";
#else
  return "cpu";
#endif
}

TORCH_LIBRARY(sae_fast, m) {
  m.def(
      "steer_(Tensor(a!) hidden, Tensor? residual, Tensor enc_w, Tensor enc_b, "
      "Tensor threshold, Tensor dec_w, Tensor max_act, Tensor strengths, Tensor modes, "
      "Tensor row_index, Tensor? topk_kth, int activation, float scale, float min_strength, "
      "float max_strength) -> ()");
  m.def(
      "clamp_direction_(Tensor(a!) hidden, Tensor? residual, Tensor directions, "
      "Tensor max_act, Tensor strengths, Tensor modes, Tensor row_index, float scale, "
      "float min_strength, float max_strength) -> ()");
  m.def("add_vectors_(Tensor(a!) hidden, Tensor vectors, Tensor weights, Tensor row_index) -> ()");
  // counter += 1 as one opaque call (the steering slots' "the op ran" counters). Inlined
  // into an Inductor CPU kernel, a scalar read-modify-write can run once per OpenMP thread
  // (a graph compiled while torch saw one thread, run with more: dynamic threads); an
  // extern op call runs once per graph execution.
  m.def("count_(Tensor(a!) counter) -> ()");
  // Which device backends this build carries (for dispatch and diagnostics).
  m.def("build_info() -> str", &build_info);
}

// Any device: the increment is the tensor's own add_ (a kernel launch on CUDA, so a
// captured CUDA graph replays it).
TORCH_LIBRARY_IMPL(sae_fast, CompositeExplicitAutograd, m) {
  m.impl("count_", [](at::Tensor& counter) { counter.add_(1); });
}

// `import sae_fast._C` loads this library, which runs the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, 0, nullptr};
  return PyModule_Create(&module_def);
}
