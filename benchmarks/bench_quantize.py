"""Time quantizing one 4096 x 4096 linear layer, beside one dense 4096^2 matmul.

    python benchmarks/bench_quantize.py [--size 4096] [--bits 11] [--sample 256]
                                        [--methods qamw,aaac,rtn,nf4] [--out FILE.json]

Every codec runs with calibration statistics (an activation sample of --sample rows with a
few outlier channels), QAM-W with its alpha search over 5 values and the least-squares row
scale. The reference time is one (size x size) @ (size x size) fp32 matmul on the same device
(the matmul a layer of that size costs for `size` tokens). Runs on the CPU, and on CUDA when
present. With --out, writes the numbers as JSON (e.g. into benchmarks/results/).
"""
import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import qamw_ext.aaac  # noqa: E402,F401
import qamw_ext.baselines  # noqa: E402,F401
import qamw_ext.qamw  # noqa: E402,F401
from qamw_ext.quantized_linear import CODECS, LayerStats  # noqa: E402

CONFIGS = {
    "qamw": {"bits": 11, "alpha": "search"},
    "qamw_polar": {"bits": 11, "alpha": "search"},
    "aaac": {"variant": "int4"},
    "aaac_nvfp4": {"variant": "nvfp4"},
    "rtn": {},
    "nf4": {},
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeat=1):
    fn()  # warm up (allocations, codebook load, kernels)
    sync(device)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best, out


def run(device, size, sample, methods, bits):
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(size, size, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(size, size, generator=g) / size ** 0.5)
    lin = lin.to(device)
    scale = torch.ones(size)
    scale[torch.randperm(size, generator=g)[:size // 64]] = 10.0
    x = (torch.randn(sample, size, generator=g) * scale).to(device)
    stats = LayerStats(x.abs().mean(0), x.pow(2).mean(0), x, sample)
    a = torch.randn(size, size, device=device)
    t_mm, _ = timed(lambda: a @ a, device, repeat=5)
    print(f"[{device}] dense {size}x{size} @ {size}x{size} fp32 matmul: {t_mm * 1e3:.1f} ms",
          flush=True)
    rows = {"matmul_s": t_mm, "methods": {}}
    for name in methods:
        cfg = dict(CONFIGS[name])
        if "bits" in cfg:
            cfg["bits"] = bits
        method = "aaac" if name.startswith("aaac") else name
        t, q = timed(lambda: CODECS[method].from_linear(lin, stats, **cfg), device)
        err = float(((x @ (lin.weight - q.dequantize()).T) ** 2).sum() /
                    (x @ lin.weight.T).pow(2).sum())
        extra = f" alpha={q.alpha}" if hasattr(q, "alpha") else ""
        print(f"[{device}] {name:11s} {cfg}: {t:7.2f} s = {t / t_mm:7.1f} x matmul, "
              f"{q.bits_per_weight():.3f} bpw, rel. output error {err:.2e}{extra}", flush=True)
        rows["methods"][name] = {"config": cfg, "seconds": t, "ratio_to_matmul": t / t_mm,
                                 "bits_per_weight": q.bits_per_weight(),
                                 "relative_output_error": err,
                                 "alpha": getattr(q, "alpha", None)}
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--bits", type=int, default=11)
    ap.add_argument("--sample", type=int, default=256)
    ap.add_argument("--methods", default="qamw,aaac,rtn,nf4")
    ap.add_argument("--devices", default="cpu,cuda")
    ap.add_argument("--out", default=None, help="write the results as JSON to this file")
    args = ap.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in CONFIGS:
            ap.error(f"unknown method {m!r}; choose from {sorted(CONFIGS)}")
    result = {"size": args.size, "bits": args.bits, "sample_rows": args.sample,
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "cpu": platform.processor() or platform.machine(), "devices": {}}
    for dev in args.devices.split(","):
        if dev == "cuda" and not torch.cuda.is_available():
            print("[cuda] not available: skipped")
            continue
        device = torch.device(dev)
        if device.type == "cuda":
            result["gpu"] = torch.cuda.get_device_name(device)
        result["devices"][dev] = run(device, args.size, args.sample, methods, args.bits)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
