"""One GEMV of each codec at the shapes of benchmarks/NOTES.md (batch 1 unless --batches),
for Nsight Compute: scripts/gpu_check.sh runs it under `ncu` to count the kernels'
shared-memory wavefronts (l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld) against the
predictions of benchmarks/smem_wavefronts.py, and for their stall reasons. Each layer is called
twice; the second call is the one to read.

    ncu --metrics ... -k regex:gemv_kernel python benchmarks/profile_gemv.py
    QAMW_GEMV_MMA=1 ncu ... -k regex:gemv_mma python benchmarks/profile_gemv.py \
        --batches 1,16 --codecs qamw-4   # the tensor-core QAM-W kernel
    python benchmarks/profile_gemv.py --smoke --device cpu   # the same calls, tiny, on the CPU
"""
import argparse
import sys

import torch

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])  # run from a checkout
from random_layers import random_layer  # noqa: E402

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]   # (out_features, in_features)
SMOKE_SHAPES = [(64, 256)]
CODECS = ["qamw-3.5", "qamw-4", "qamw-5.5", "aaac-int4", "aaac-nvfp4"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes")
    parser.add_argument("--batches", default="1", help="comma-separated activation rows")
    parser.add_argument("--codecs", default=",".join(CODECS), help="comma-separated codecs")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    codecs = args.codecs.split(",")
    unknown = sorted(set(codecs) - set(CODECS))
    if unknown:
        parser.error(f"unknown codecs {unknown}; choose from {CODECS}")
    generator = torch.Generator(device=args.device).manual_seed(0)
    calls = []
    for out_features, in_features in SMOKE_SHAPES if args.smoke else SHAPES:
        for codec in codecs:
            layer = random_layer(codec, in_features, out_features, args.device, generator)
            for batch in batches:
                x = torch.randn(batch, in_features, device=args.device, dtype=torch.bfloat16,
                                generator=generator)
                with torch.no_grad():
                    for _ in range(2):
                        y = layer(x)
                if args.device == "cuda":
                    torch.cuda.synchronize()
                name = f"{codec} {out_features}x{in_features} batch {batch}"
                if not torch.isfinite(y).all():
                    raise SystemExit(f"{name}: non-finite output")
                calls.append(name)
                print(f"{name} (second call is the one to read)")
    return calls


if __name__ == "__main__":
    main()
