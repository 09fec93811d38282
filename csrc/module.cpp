// Python module mae_fast._C. The ops themselves register with the dispatcher
// (TORCH_LIBRARY in their own files); this file only gives Python a module to import
// and reports how the extension was built.
#include <torch/extension.h>

namespace {
bool cuda_compiled() {
#ifdef MAE_FAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mae_fast native extension (masking engine)";
  m.def("cuda_compiled", &cuda_compiled, "True when the extension was built with its CUDA sources");
}
