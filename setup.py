"""Builds qamw_ext._C: a CUDA extension when the CUDA build of torch and nvcc are present,
a CPU-only one otherwise (set QAMW_FORCE_CPU=1 to skip CUDA)."""
import glob
import os
import sys

from setuptools import find_packages, setup
from torch.utils import cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "tools"))
from cuda_home import cuda_home  # noqa: E402


def want_cuda():
    import torch

    if os.environ.get("QAMW_FORCE_CPU") == "1" or torch.version.cuda is None:
        return False
    home = cuda_home()
    return home is not None and os.path.exists(os.path.join(home, "bin", "nvcc"))


def no_gather_flags():
    """Flags that keep the compiler from vectorising table lookups into hardware gathers,
    which are slower than scalar loads on the CPUs measured (csrc/cpu/common.h): the first
    one this compiler accepts (GCC 14 spells it -mno-gather), or none."""
    import subprocess
    import tempfile

    cxx = os.environ.get("CXX", "c++")
    for flag in ("-mno-gather",
                 "-mtune-ctrl=^use_gather_2parts,^use_gather_4parts,^use_gather"):
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "probe.cpp")
            with open(src, "w") as f:
                f.write("int main() { return 0; }\n")
            probe = subprocess.run([cxx, flag, "-Werror", "-c", src, "-o", os.path.join(tmp, "probe.o")],
                                   capture_output=True)
        if probe.returncode == 0:
            return [flag]
    return []


def extension():
    cpp_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # The extension is built from source on the machine that runs it, so tune for it
    # (QAMW_PORTABLE=1 builds for any x86-64).
    arch = "-march=x86-64" if os.environ.get("QAMW_PORTABLE") == "1" else "-march=native"
    cxx_flags = ["-O3", "-DNDEBUG", "-fopenmp", arch] + no_gather_flags()
    include_dirs = [os.path.join(HERE, "csrc")]
    if not want_cuda():
        return cpp_extension.CppExtension(
            "qamw_ext._C", cpp_sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"])
    home = cuda_home()
    os.environ["CUDA_HOME"] = home
    cpp_extension.CUDA_HOME = home
    import torch

    if not torch.cuda.is_available():
        # No GPU to query: build for Hopper (set TORCH_CUDA_ARCH_LIST for others).
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    # cuBLAS and friends' headers ship inside the nvidia wheels, not this toolkit.
    import site

    for root in site.getsitepackages():
        candidate = os.path.join(root, "nvidia", "cu13", "include")
        if os.path.isdir(candidate):
            include_dirs.append(candidate)
    return cpp_extension.CUDAExtension(
        "qamw_ext._C", cpp_sources + sorted(glob.glob("csrc/cuda/*.cu")),
        include_dirs=include_dirs,
        define_macros=[("QAMW_WITH_CUDA", "1")],
        extra_compile_args={
            "cxx": cxx_flags,
            # --split-compile: the GEMVs' dozens of unrolled template kernels are optimised
            # on every core (same code; qamw.cu's 4.8 min become 3.5 on 2 cores).
            "nvcc": ["-O3", "-DNDEBUG", "--use_fast_math", "-lineinfo",
                     "--expt-relaxed-constexpr", "--split-compile=0"],
        },
        extra_link_args=["-fopenmp"])


setup(
    name="qamw_ext",
    version="0.1.0",
    description="QAM-W and AAAC weight quantization for LLMs: CUDA/C++ kernels and a thin Python layer",
    packages=find_packages(include=["qamw_ext", "qamw_ext.*"]),
    package_data={"qamw_ext": ["data/*.safetensors"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    entry_points={"console_scripts": ["qamw = qamw_ext.cli:main"]},
    python_requires=">=3.10",
)
