"""Speed of the ops against PyTorch baselines measured in the same run, on the CPU (and on
CUDA when present). Prints a table of times and ratios; --out writes it as JSON.

    python benchmarks/bench_ops.py [--device cpu|cuda] [--out benchmarks/results/ops_cpu.json]
"""
import argparse
import json
import platform
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])  # run from a checkout
from qamw_ext import codebooks, hadamard_matrices, ops  # noqa: E402
from qamw_ext.evaluate import machine_info  # noqa: E402


def timeit(fn, device, min_time=0.3):
    """Median seconds per call after warm-up (CUDA timed with events)."""
    for _ in range(3):
        fn()
    times = []
    start_all = time.perf_counter()
    while time.perf_counter() - start_all < min_time or len(times) < 5:
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def hadamard_matrix(block, device):
    """M with ops.hadamard(x, block) = x @ M on one block: the transpose of
    H_K (x) Sylvester(2^m) / sqrt(block)."""
    order, pow2 = hadamard_matrices.split_block(block)
    h = torch.ones(1, 1)
    while h.shape[0] < pow2:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    if order > 1:
        h = torch.kron(hadamard_matrices.matrix(order).float().T.contiguous(), h)
    return (h / block ** 0.5).to(device)


def bench_hadamard(device, rows):
    out = []
    # The last two are blocks of K * 2^m: 576 = 36 * 16 and 1536 = 12 * 128.
    for block, n in [(128, 4096), (1024, 4096), (4096, 4096), (576, 4608), (1536, 4608)]:
        x = torch.randn(rows, n, device=device)
        h = hadamard_matrix(block, device)
        t_op = timeit(lambda: ops.hadamard(x, block), device)
        t_mm = timeit(lambda: (x.view(-1, block) @ h).view(rows, n), device)
        t_clone = timeit(lambda: x.clone(), device)
        out.append(dict(op="hadamard", shape=[rows, n], block=block, ms=t_op * 1e3,
                        dense_matmul_ms=t_mm * 1e3, clone_ms=t_clone * 1e3,
                        speedup_vs_matmul=t_mm / t_op, time_vs_clone=t_op / t_clone))
    return out


def bench_nearest(device, count):
    out = []
    for bits in [8, 11]:
        codebook = codebooks.qam_codebook(bits).to(device)
        points = torch.randn(count, 2, device=device)
        t_op = timeit(lambda: ops.nearest_codeword_2d(points, codebook), device)
        sub = points[: count // 16]   # brute force is slow: time a slice and scale
        t_bf = timeit(lambda: torch.cdist(sub, codebook).argmin(1), device) * 16
        out.append(dict(op="nearest_codeword_2d", points=count, K=2 ** bits, ms=t_op * 1e3,
                        mpoints_per_s=count / t_op / 1e6, brute_force_ms=t_bf * 1e3,
                        speedup_vs_brute_force=t_bf / t_op))
    return out


def bench_gemv(device, m, n, dtype):
    from qamw_ext.aaac import AAACLinear
    from qamw_ext.qamw import QAMWLinear

    out = []
    weight = torch.randn(m, n) / n ** 0.5
    dense = weight.to(device, dtype)
    linear = torch.nn.Linear(n, m, bias=False)
    linear.weight.data = weight
    layers = {f"qamw bits={b}": QAMWLinear.from_linear(linear, None, bits=b, alpha=0.0)
              for b in (7, 8, 11)}
    layers["aaac int4"] = AAACLinear.from_linear(linear, None, variant="int4")
    layers["aaac nvfp4"] = AAACLinear.from_linear(linear, None, variant="nvfp4")
    for batch in [1, 2, 4, 16]:
        x = torch.randn(batch, n, device=device, dtype=dtype)
        t_dense = timeit(lambda: torch.nn.functional.linear(x, dense), device)
        for name, layer in layers.items():
            layer = layer.to(device)
            t = timeit(lambda: layer.gemv(x), device)
            out.append(dict(op="gemv", codec=name, shape=[m, n], batch=batch, dtype=str(dtype),
                            bits_per_weight=layer.bits_per_weight(), ms=t * 1e3,
                            dense_linear_ms=t_dense * 1e3, speedup_vs_dense=t_dense / t))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out")
    args = parser.parse_args()
    device = args.device
    gemv_dtype = torch.float32 if device == "cpu" else torch.bfloat16
    results = (bench_hadamard(device, 64 if device == "cpu" else 16384)
               + bench_nearest(device, 1 << 22)
               + bench_gemv(device, 4096, 4096, gemv_dtype))
    for r in results:
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}))
    if args.out:
        record = dict(command=" ".join([sys.executable.split("/")[-1]] + sys.argv),
                      date=time.strftime("%Y-%m-%d"), torch=torch.__version__,
                      device=torch.cuda.get_device_name() if device == "cuda" else machine_info().get("cpu", platform.machine()),
                      threads=torch.get_num_threads(), results=results)
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
