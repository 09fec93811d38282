"""Build mae_fast._C (the masking engine) with torch.utils.cpp_extension.

The C++ sources in csrc/ are always compiled; the .cu sources are added (as a
CUDAExtension) when the installed torch has CUDA and nvcc is found. Without CUDA the
build succeeds with a CPU-only extension. Arch list: TORCH_CUDA_ARCH_LIST, default
"8.0;9.0". Build with `pip install --no-build-isolation -e .`.
"""
import glob
import os

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as e:  # pragma: no cover - build environment error
    raise SystemExit(
        "mae_fast needs torch installed to build its extension. Install torch first, then "
        "`pip install --no-build-isolation -e .` (build isolation would fetch another torch)."
    ) from e


def _extension():
    cpp = sorted(glob.glob("csrc/*.cpp"))
    cu = sorted(glob.glob("csrc/*.cu"))
    # No -std flag: torch's BuildExtension adds the C++ standard of the installed torch (C++20 for
    # 2.13 and 2.14; torch 2.14's headers refuse older standards), so each torch builds with its own.
    cxx = ["-O3"]
    with_cuda = (
        bool(cu)
        and torch.version.cuda is not None
        and CUDA_HOME is not None
        and os.environ.get("MAE_FAST_NO_CUDA", "0") != "1"
    )
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        return CUDAExtension(
            "mae_fast._C",
            cpp + cu,
            define_macros=[("MAE_FAST_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
        )
    return CppExtension("mae_fast._C", cpp, extra_compile_args={"cxx": cxx})


# kernels/ is reached as mae_fast.kernels through the symlink mae_fast/kernels -> ../kernels, the same in a
# plain checkout, an editable install and a wheel (which holds the files themselves). It has no __init__.py, so
# that from the repository root it cannot shadow an installed top-level `kernels` package (kernels/README.md):
# find_packages skips such a folder, so it is named here.
setup(
    packages=find_packages(include=["mae_fast", "mae_fast.*"]) + ["mae_fast.kernels"],
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
