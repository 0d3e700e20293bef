"""One batch-1 GEMV of each codec at the shapes of benchmarks/NOTES.md, for Nsight Compute:
scripts/gpu_check.sh runs it under `ncu` to count the kernels' shared-memory wavefronts
(l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld) against the predictions of
benchmarks/smem_wavefronts.py. Each layer is called twice; the second call is the one to read.

    ncu --metrics ... -k regex:gemv_kernel python benchmarks/profile_gemv.py
    python benchmarks/profile_gemv.py --smoke --device cpu   # the same calls, tiny, on the CPU
"""
import argparse
import sys

import torch

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])  # run from a checkout
from random_layers import random_layer  # noqa: E402

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]   # (out_features, in_features)
SMOKE_SHAPES = [(64, 256)]
CODECS = ["qamw-3.5", "qamw-4", "qamw-5.5", "aaac-int4"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes")
    args = parser.parse_args(argv)
    generator = torch.Generator(device=args.device).manual_seed(0)
    calls = []
    for out_features, in_features in SMOKE_SHAPES if args.smoke else SHAPES:
        x = torch.randn(1, in_features, device=args.device, dtype=torch.bfloat16,
                        generator=generator)
        for codec in CODECS:
            layer = random_layer(codec, in_features, out_features, args.device, generator)
            with torch.no_grad():
                for _ in range(2):
                    y = layer(x)
            if args.device == "cuda":
                torch.cuda.synchronize()
            if not torch.isfinite(y).all():
                raise SystemExit(f"{codec} {out_features}x{in_features}: non-finite output")
            calls.append(f"{codec} {out_features}x{in_features}")
            print(f"{codec:>9} {out_features:>5} x {in_features:<5} (second call is the one to read)")
    return calls


if __name__ == "__main__":
    main()
