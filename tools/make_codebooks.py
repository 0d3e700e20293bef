"""Train the shipped codebooks and write qamw_ext/data/codebooks.safetensors.

    python tools/make_codebooks.py [--out PATH] [--bits 4 5 ... 12] [--threads 1]

Deterministic: no random numbers are used (see qamw_ext/lloyd_max.py); two runs give the
same file up to the last float bit of the nearest-codeword op. Takes a few minutes on 2 cores
(most of it for b = 11 and 12).

File format (safetensors):
  tensors
    "qam{b}"    float32 (2^b, 2), b = 4..12: Lloyd-Max codebook of the unit circular
                Gaussian N(0, I2) (QAM-W's joint 2-D codebook), row k = codeword k = the
                2-D point that code k decodes to;
    "polar{b}"  float32 (2^b, 2), b = 4..12: polar codebook, A Lloyd-Max Rayleigh
                amplitudes x P uniform phases (k + 1/2) 2 pi / P, A * P = 2^b; row
                a * P + p is amplitude a, phase p;
    "gaussian_lloyd_max_{L}"  float32 (L,), L = 2, 4, ..., 64: scalar Lloyd-Max levels
                of N(0, 1), ascending.
  metadata (all values are strings, as safetensors requires)
    "format"          "qamw_ext.codebooks/1"
    "mse_per_dim"     JSON {name: MSE per dimension} for every 2-D codebook, measured on
                      the training quadrature (exact for that quadrature's partition)
    "polar_split"     JSON {"polar{b}": [A, P]}
    "stages"          JSON {"qam{b}": [sectors per codeword of each training stage]}
    "scalar_mse"      JSON {"gaussian_lloyd_max_{L}": exact MSE}
    "generator"       "tools/make_codebooks.py"
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from qamw_ext import lloyd_max  # noqa: E402

DEFAULT_OUT = os.path.join(ROOT, "qamw_ext", "data", "codebooks.safetensors")


def stages_for(bits):
    # The finest stage costs ~sectors_per_codeword * 2^b work per iteration and needs the
    # most iterations; finer stages lower the MSE by ~1 % from 200 to 800 sectors per
    # codeword at b = 8 and by ~0.4 % at b = 12, so the large codebooks stop earlier to keep
    # the run to a few minutes on 2 cores.
    if bits <= 8:
        return (50, 200, 800)
    if bits <= 10:
        return (50, 200, 400)
    return (50, 200)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--bits", type=int, nargs="*", default=list(range(4, 13)))
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a busy machine OpenMP threads spin "
                         "against other jobs and run many times slower)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    tensors, mse, split, stages, scalar = {}, {}, {}, {}, {}
    for levels in (2, 4, 8, 16, 32, 64):
        c, d = lloyd_max.lloyd_max_scalar(levels, "gaussian")
        tensors[f"gaussian_lloyd_max_{levels}"] = torch.tensor(c, dtype=torch.float32)
        scalar[f"gaussian_lloyd_max_{levels}"] = d
    for b in args.bits:
        t = time.time()
        k = 1 << b
        c, d, quad = lloyd_max.lloyd_max_2d(k, stages=stages_for(b))
        tensors[f"qam{b}"] = torch.tensor(c, dtype=torch.float32)
        mse[f"qam{b}"] = d
        stages[f"qam{b}"] = list(stages_for(b))
        pc, pd, (a, p) = lloyd_max.polar_codebook(b, quad)
        tensors[f"polar{b}"] = torch.tensor(pc, dtype=torch.float32)
        mse[f"polar{b}"] = pd
        split[f"polar{b}"] = [a, p]
        print(f"b={b:2d}: qam mse/dim {d:.6g} ({10 * np.log10(d):.2f} dB), "
              f"polar {a}x{p} mse/dim {pd:.6g}   [{time.time() - t:.1f}s]", flush=True)
    meta = {"format": "qamw_ext.codebooks/1", "mse_per_dim": json.dumps(mse),
            "polar_split": json.dumps(split), "stages": json.dumps(stages),
            "scalar_mse": json.dumps(scalar), "generator": "tools/make_codebooks.py"}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, args.out, metadata=meta)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
