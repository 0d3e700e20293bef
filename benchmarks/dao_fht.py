"""Dao-AILab's fast-hadamard-transform, the reference a fast Walsh-Hadamard kernel is measured
against, built from a checkout of its repository for the visible GPU (its PyPI source archive
holds no CUDA sources). qamw_ext neither ships nor installs it: the GPU benchmark
(bench_ops.py --dao-fht-src DIR) times it beside ops.hadamard when it builds.

    python benchmarks/dao_fht.py SRC   # builds it into build/dao_fht and checks it on two blocks
"""
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD_DIR = os.path.join(REPO, "build", "dao_fht")
# The flags its setup.py passes nvcc; the architecture is the visible GPU's (torch's default).
NVCC_FLAGS = ["-O3", "--use_fast_math", "--expt-relaxed-constexpr", "--expt-extended-lambda",
              "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
              "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
              "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__"]


def load(src, build_dir=BUILD_DIR):
    """hadamard(x, scale): Dao's transform of x's last dimension (a power of two up to 32768),
    times scale. Builds on the first call; later calls with the same sources load the build."""
    from torch.utils import cpp_extension

    sys.path.insert(0, os.path.join(REPO, "tools"))
    from cuda_home import cuda_home

    # Where nvcc on PATH is a wrapper script, torch's guess at CUDA_HOME has no headers.
    home = cuda_home()
    if home:
        os.environ["CUDA_HOME"] = cpp_extension.CUDA_HOME = home
    csrc = os.path.join(os.path.abspath(src), "csrc")
    sources = [os.path.join(csrc, f)
               for f in ("fast_hadamard_transform.cpp", "fast_hadamard_transform_cuda.cu")]
    missing = [s for s in sources if not os.path.exists(s)]
    if missing:
        raise FileNotFoundError(f"{src} is not a fast-hadamard-transform checkout: no {missing[0]}")
    os.makedirs(build_dir, exist_ok=True)
    module = cpp_extension.load(name="fast_hadamard_transform_cuda", sources=sources,
                                 extra_include_paths=[os.path.abspath(src), csrc],
                                 extra_cflags=["-O3"], extra_cuda_cflags=NVCC_FLAGS,
                                 build_directory=build_dir)
    return module.fast_hadamard_transform


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    from scipy.linalg import hadamard as sylvester   # Sylvester order, unnormalised

    hadamard = load(sys.argv[1])
    for block in (128, 4096):
        x = torch.randn(8, block, device="cuda")
        want = x @ torch.from_numpy(sylvester(block)).to(x) * block ** -0.5
        error = (hadamard(x, block ** -0.5) - want).abs().max().item()
        print(f"block {block}: largest difference from the dense product {error:.1e}")
        if not error < 1e-3:
            sys.exit("Dao's transform does not match the dense Sylvester-order product")


if __name__ == "__main__":
    main()
