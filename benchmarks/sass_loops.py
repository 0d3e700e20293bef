"""Static instruction counts of the compiled GEMV kernels' main loops, from their SASS.

For each kernel whose (mangled) name matches --kernel, the innermost loops that hold --op (HMMA:
the tensor-core GEMVs' k-block loops; FFMA: the CUDA-core ones' runs of codes) are found from
the backward branches, and the size and instruction mix of each are printed: the per-iteration
counts behind the NOTES' instructions per code, measured on the compiled code instead of
estimated. Needs no GPU, only cuobjdump (CUDA toolkit, or `pip install nvidia-cuda-cuobjdump`) and an object or
library built for the GPU in question:

    python benchmarks/sass_loops.py build/temp.*/csrc/cuda/qamw_mma.o \
        --kernel 'qamw_gemv_mma_kernelILi8ELi1ELi16E'
"""
import argparse
import collections
import glob
import os
import re
import shutil
import subprocess
import sys


def cuobjdump():
    """The cuobjdump on PATH, in CUDA_HOME, or in the nvidia-cuda-cuobjdump wheel."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    candidates = [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump")]
    try:
        import nvidia
        for root in nvidia.__path__:
            candidates += glob.glob(os.path.join(root, "*", "bin", "cuobjdump"))
    except ImportError:
        pass
    for path in candidates:
        if os.access(path, os.X_OK):
            return path
    sys.exit("cuobjdump not found: install the CUDA toolkit or `pip install "
             "nvidia-cuda-cuobjdump`")


def functions(sass):
    """(mangled name, [(address, instruction text)]) of each function in cuobjdump's output."""
    for part in re.split(r"\n\s*Function : ", sass)[1:]:
        name = part.split("\n", 1)[0].strip()
        code = [(int(a, 16), text.strip())
                for a, text in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", part)]
        yield name, code


def opcode(text):
    """The opcode of an instruction without its predicate and modifiers (HMMA, LDS, ...)."""
    return re.sub(r"^@!?U?P[T0-9]+\s+", "", text).split()[0].split(".")[0]


def main_loops(code, op):
    """(first, last) index of each innermost loop holding `op`, in address order: a loop (a
    backward branch to its head; of several to one head, the last) that holds no other such
    loop. A kernel compiled with two k-block loops (for two kinds of codebook) has two."""
    index = {address: i for i, (address, _) in enumerate(code)}
    ends = {}
    for i, (address, text) in enumerate(code):
        target = re.search(r"\bBRA\b.*?(0x[0-9a-f]+)", text)
        if target and int(target.group(1), 16) <= address:
            j = index.get(int(target.group(1), 16))
            if j is not None:
                ends[j] = max(ends.get(j, i), i)
    holding = [(j, i) for j, i in ends.items()
               if any(opcode(text) == op for _, text in code[j:i + 1])]
    return sorted(loop for loop in holding
                  if not any(other != loop and loop[0] <= other[0] and other[1] <= loop[1]
                             for other in holding))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("binary", help="object file, cubin or shared library with sm_XX code")
    parser.add_argument("--kernel", default="gemv", help="regex on the mangled kernel names")
    parser.add_argument("--op", default="HMMA", help="opcode whose loop is the main loop")
    parser.add_argument("--top", type=int, default=12, help="opcodes listed per loop")
    args = parser.parse_args(argv)
    sass = subprocess.run([cuobjdump(), "-sass", args.binary], check=True, capture_output=True,
                          text=True).stdout
    rows = 0
    for name, code in functions(sass):
        if not re.search(args.kernel, name):
            continue
        rows += 1
        loops = main_loops(code, args.op)
        if not loops:
            print(f"{name}: {len(code)} instructions, no loop with {args.op}")
            continue
        for k, (j, i) in enumerate(loops):
            mix = collections.Counter(opcode(text) for _, text in code[j:i + 1])
            print(f"{name}: {len(code)} instructions; loop {k + 1} of {len(loops)}: "
                  f"{i - j + 1} ({16 * (i - j + 1)} bytes): "
                  + ", ".join(f"{o} {n}" for o, n in mix.most_common(args.top)))
    if rows == 0:
        sys.exit(f"no kernel matches {args.kernel!r}")


if __name__ == "__main__":
    main()
