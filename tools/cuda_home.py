"""The CUDA toolkit root for building extensions against torch: setup.py's and
benchmarks/dao_fht.py's. torch guesses it from the `nvcc` first on PATH, which may be a wrapper
script that execs the real one (then torch's guess has no headers)."""
import os
import shutil


def cuda_home():
    """CUDA_HOME if set, else the root of the toolkit whose nvcc the one on PATH runs, or None
    when there is no nvcc."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    real = os.path.realpath(nvcc)
    with open(real, "rb") as f:
        head = f.read(4096)
    if head.startswith(b"#!"):  # a wrapper: find the path it execs
        for token in head.decode(errors="ignore").split():
            if token.endswith("/nvcc") and os.path.exists(token):
                real = os.path.realpath(token)
                break
    return os.path.dirname(os.path.dirname(real))
