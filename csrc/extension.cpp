// The Python module of internvl3_engine._C. Kernels register themselves as torch operators in the
// `internvl3_engine_C` namespace (TORCH_LIBRARY_FRAGMENT in each op folder); this file only reports how
// the extension was built.
#include <torch/extension.h>

#ifndef INTERNVL3_ENGINE_CUDA_ARCHS
#define INTERNVL3_ENGINE_CUDA_ARCHS ""
#endif

namespace {

bool compiled_with_cuda() {
#ifdef INTERNVL3_ENGINE_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "internvl3_engine compiled kernels (C++ CPU kernels, and CUDA kernels in a CUDA build)";
  m.def("compiled_with_cuda", &compiled_with_cuda, "True when the CUDA kernels were compiled in");
  m.def("cuda_archs", [] { return std::string(INTERNVL3_ENGINE_CUDA_ARCHS); }, "GPU architectures compiled for");
}
