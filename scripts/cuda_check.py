"""`make cuda-check`: compile every csrc/*.cu to an sm_90 object with nvcc (no linking).

Uses the installed torch's headers, so CUDA code is type-checked against the same ATen API
the extension builds with, on machines that have nvcc but no GPU. Objects go to
build/cuda-check/. Exit status 1 if any file fails.
"""
import glob
import os
import shutil
import subprocess
import sys
import sysconfig

import torch
from torch.utils.cpp_extension import include_paths


def find_nvcc():
    nvcc = shutil.which("nvcc")
    if nvcc:
        return nvcc
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    cand = os.path.join(home, "bin", "nvcc")
    return cand if os.path.exists(cand) else None


def _generated_headers(out_dir: str) -> str:
    """Headers a CUDA build of torch generates but a CPU wheel lacks, written if torch has none.

    c10/cuda/impl/cuda_cmake_macros.h only says c10_cuda is a shared library.
    """
    inc = os.path.join(out_dir, "include")
    rel = os.path.join("c10", "cuda", "impl", "cuda_cmake_macros.h")
    if not any(os.path.exists(os.path.join(p, rel)) for p in include_paths()):
        os.makedirs(os.path.join(inc, os.path.dirname(rel)), exist_ok=True)
        with open(os.path.join(inc, rel), "w") as f:
            f.write("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    return inc


def main() -> int:
    nvcc = find_nvcc()
    if nvcc is None:
        print("cuda-check: nvcc not found", file=sys.stderr)
        return 1
    sources = sorted(glob.glob("csrc/*.cu"))
    if not sources:
        print("cuda-check: no .cu files in csrc/")
        return 0
    out_dir = os.path.join("build", "cuda-check")
    os.makedirs(out_dir, exist_ok=True)
    incs = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}", "-Icsrc"]
    incs.append(f"-I{_generated_headers(out_dir)}")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    flags = [
        "-c", "-std=c++20", "-O2", "-arch=sm_90", "--expt-relaxed-constexpr",
        "-DMAE_FAST_WITH_CUDA=1", "-DTORCH_EXTENSION_NAME=_C", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        "-Xcompiler", "-fPIC",
    ]
    failed = []
    for src in sources:
        obj = os.path.join(out_dir, os.path.basename(src) + ".o")
        cmd = [nvcc, *flags, *incs, src, "-o", obj]
        res = subprocess.run(cmd, capture_output=True, text=True)
        status = "ok" if res.returncode == 0 else "FAILED"
        print(f"cuda-check: {src} -> {obj}: {status}")
        if res.returncode != 0:
            print(res.stdout + res.stderr, file=sys.stderr)
            failed.append(src)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
