// Python module mae_fast._C. The ops themselves register with the dispatcher
// (TORCH_LIBRARY in their own files); this file only gives Python a module to import
// and reports how the extension was built.
#include <torch/extension.h>

#include <cstdint>
#include <vector>

namespace mae_fast {
std::vector<int64_t> philox_block_for_test(std::vector<int64_t> ctr, std::vector<int64_t> key);  // masking.cpp
}

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
  m.def("_philox4x32_10", &mae_fast::philox_block_for_test,
        "Philox4x32-10 of a 4-word counter and 2-word key (the masking engine's generator; for tests)");
  m.def("cuda_compiled", &cuda_compiled, "True when the extension was built with its CUDA sources");
}
