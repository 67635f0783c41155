// Schemas of every sae_fast op. Implementations register per device in
// csrc/cpu/ and csrc/cuda/; the fake (meta) implementations live in
// sae_fast/ops/__init__.py (`_noop_fake`). All ops mutate `hidden` in place and return nothing,
// so they are safe inside CUDA graphs and torch.compile'd regions.
#include <Python.h>
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
  // Which device backends this build carries (for dispatch and diagnostics).
  m.def("build_info() -> str", &build_info);
}

// `import sae_fast._C` loads this library, which runs the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, 0, nullptr};
  return PyModule_Create(&module_def);
}
