"""Speed of the ops against PyTorch baselines measured in the same run. Prints every figure;
--out writes them as JSON (and, for the GPU suite, a markdown table beside it).

    python benchmarks/bench_ops.py [--out benchmarks/results/ops_cpu.json]   # CPU, 4096 x 4096
    python benchmarks/bench_ops.py --device cuda --out DIR/ops_cuda.json     # the GPU suite
    python benchmarks/bench_ops.py --smoke [--device cpu|cuda] --out F.json  # GPU suite, tiny

The GPU suite (benchmarks/NOTES.md has its byte counts and predictions): the device-to-device
copy bandwidth; the QAM-W (3.5, 4, 5.5 bpw) and AAAC (int4 g128, nvfp4 g16) GEMV at batches
1-16 on four Llama-sized shapes, fp16 and bf16, against F.linear with fp16/bf16 weights; the
block Hadamard transform against torch.clone on 64 MiB; the nearest-codeword search. Every
GEMV counts the bytes of its codes, scales, codebook, signs, activation and output, and calls
rotate among enough weight copies (> 4x L2) that the L2 cache cannot hold them. On CUDA each
figure is one CUDA graph of `calls` calls replayed `repeats` times between events (the cost a
decode step captured in a graph pays, without Python's dispatch), median over replays; if a
capture fails the calls run eagerly and the row says so. --smoke runs the same code with tiny
shapes (on the CPU: wall clock), to check the logic without a GPU.
"""
import argparse
import contextlib
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
from functools import partial

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run from a checkout
from qamw_ext import codebooks, hadamard_matrices, ops  # noqa: E402
from qamw_ext.evaluate import machine_info  # noqa: E402
from random_layers import WEIGHT_STD, buffer_bytes, random_layer  # noqa: E402

MiB = 1 << 20
GEMV_CODECS = ("qamw-3.5", "qamw-4", "qamw-5.5", "aaac-int4", "aaac-nvfp4")
# Codecs with a tensor-core GEMV (AAAC's needs groups of 128 and more: not NVFP4's 16).
MMA_CODECS = ("qamw-3.5", "qamw-4", "qamw-5.5", "aaac-int4", "aaac-nvfp4")
# Codecs whose GEMVs decode bf16 codewords faster (tensor cores: no low parts; QAM-W on CUDA
# cores at batch 1: half2 lookups for fp16 too), timed also with codewords that are not bf16
# values (fp32_codewords).
BF16_CODEWORD_CODECS = ("qamw-3.5", "qamw-4", "qamw-5.5", "aaac-int4")
# The batch from which a codec's GEMV takes tensor cores by default (mma_wanted's `from` in
# csrc/cuda: NVFP4's groups of 16 put the scales into A, which costs more per weight; QAM-W at
# 8 bits was faster on them at batch 1 too).
MMA_FROM_BATCH = {"aaac-nvfp4": 4, "qamw-4": 1}
FULL = dict(gemv_shapes=[(4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192)],
            batches=[1, 2, 4, 8, 16], dtypes=[torch.bfloat16, torch.float16],
            hadamard_blocks=[2 ** k for k in range(7, 16)] + [576, 1536],
            hadamard_bytes=64 * MiB, copy_bytes=512 * MiB, rotation_bytes=256 * MiB,
            max_copies=64, calls=64, repeats=15, nearest_points=1 << 22)
SMOKE = dict(gemv_shapes=[(256, 512), (512, 256)], batches=[1, 4],
             dtypes=[torch.bfloat16, torch.float16], hadamard_blocks=[128, 1024, 576],
             hadamard_bytes=MiB // 4, copy_bytes=4 * MiB, rotation_bytes=MiB, max_copies=8,
             calls=4, repeats=3, nearest_points=1 << 12)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# A row of the Hadamard benchmark holds whole blocks and at least this many values.
HADAMARD_MIN_ROW = 4096


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


def cpu_rotation_bytes():
    """Bytes of weight copies a CPU GEMV rotates over: twice the last-level cache, at least
    64 MiB, so that every call streams its weight from memory, as a model's layers do."""
    try:
        l3 = os.sysconf("SC_LEVEL3_CACHE_SIZE")
    except (ValueError, OSError):
        l3 = 0
    return max(64 * MiB, 2 * l3)


def cycle_calls(fn, args):
    """A callable that calls fn on the next of args at each call."""
    following = itertools.cycle(args)
    return lambda: fn(next(following))


def bench_gemv(device, m, n, dtype):
    import copy

    from qamw_ext.aaac import AAACLinear
    from qamw_ext.qamw import QAMWLinear

    out = []
    weight = torch.randn(m, n) / n ** 0.5
    linear = torch.nn.Linear(n, m, bias=False)
    linear.weight.data = weight
    layers = {f"qamw bits={b}": QAMWLinear.from_linear(linear, None, bits=b, alpha=0.0)
              for b in (7, 8, 11)}
    layers["aaac int4"] = AAACLinear.from_linear(linear, None, variant="int4")
    layers["aaac nvfp4"] = AAACLinear.from_linear(linear, None, variant="nvfp4")
    # Calls rotate over copies so that no weight sits in the cache between its calls.
    rotation = dict(rotation_bytes=cpu_rotation_bytes(), max_copies=64)
    dense = [weight.to(device, dtype)]
    dense += [torch.randn_like(dense[0]) for _ in range(copies_for(nbytes(dense[0]),
                                                                   rotation) - 1)]
    copies = {}
    for name, layer in layers.items():
        layer = layer.to(device)
        copies[name] = [layer] + [copy.deepcopy(layer) for _ in
                                  range(copies_for(buffer_bytes(layer), rotation) - 1)]
    for batch in [1, 2, 4, 16]:
        x = torch.randn(batch, n, device=device, dtype=dtype)
        linear = cycle_calls(lambda w: torch.nn.functional.linear(x, w), dense)
        for name, layer_copies in copies.items():
            gemv = cycle_calls(lambda layer: layer.gemv(x), layer_copies)
            t_dense, t, ratio = paired_times(linear, gemv, device)
            out.append(dict(op="gemv", codec=name, shape=[m, n], batch=batch, dtype=str(dtype),
                            bits_per_weight=layer_copies[0].bits_per_weight(), ms=t * 1e3,
                            copies=len(layer_copies), dense_linear_ms=t_dense * 1e3,
                            dense_copies=len(dense), speedup_vs_dense=ratio))
    return out


def paired_times(baseline, fn, device, rounds=5):
    """(median seconds of baseline, of fn, median of their per-round ratio) over rounds that
    time each in turn: a shared host's speed drifts between figures taken one after the other,
    and a ratio of two taken side by side drifts least."""
    pairs = [(timeit(baseline, device, min_time=0.06), timeit(fn, device, min_time=0.06))
             for _ in range(rounds)]
    return (statistics.median(b for b, _ in pairs), statistics.median(f for _, f in pairs),
            statistics.median(b / f for b, f in pairs))


def print_row(r):
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}),
          flush=True)


def cpu_main(args):
    """The CPU benchmark of benchmarks/results/ops_cpu.json (fp32, 4096 x 4096; the GEMVs
    rotate over weight copies of twice the last-level cache, cpu_rotation_bytes)."""
    results = (bench_hadamard("cpu", 64) + bench_nearest("cpu", 1 << 22)
               + bench_gemv("cpu", 4096, 4096, torch.float32))
    for r in results:
        print_row(r)
    if args.out:
        record = dict(command=command_line(__file__, args.argv), date=time.strftime("%Y-%m-%d"),
                      torch=torch.__version__, device=machine_info().get("cpu", platform.machine()),
                      threads=torch.get_num_threads(), results=results)
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)


# ------------------------------------------------------------------ the GPU suite

def command_line(script, argv):
    """The command that ran `script` with argv, the script's path relative to the checkout."""
    path = os.path.relpath(os.path.abspath(script), REPO)
    return " ".join([os.path.basename(sys.executable), path] + argv)


def time_calls(fns, device, calls, repeats):
    """(median seconds per call, how it was timed) of `calls` calls cycling through fns."""
    calls = len(fns) * max(1, -(-calls // len(fns)))   # every copy equally often

    def run_all():
        for i in range(calls):
            fns[i % len(fns)]()

    if device != "cuda":
        run_all()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run_all()
            times.append(time.perf_counter() - start)
        return statistics.median(times) / calls, "wall clock"
    # Warm-up on a side stream before capture (lazy kernel loading, cuBLAS workspaces).
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run_all()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    timing, replay = "cuda graph", run_all
    try:
        graph = torch.cuda.CUDAGraph()
        # relaxed: the launchers' attribute and occupancy queries are not stream work.
        with torch.cuda.graph(graph, capture_error_mode="relaxed"):
            run_all()
        replay = graph.replay
    except Exception as e:  # the eager loop still gives a figure; the row records why
        timing = f"eager ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
        torch.cuda.synchronize()
    replay()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(repeats)]
    for start, end in events:
        start.record()
        replay()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events) / 1e3 / calls, timing


@contextlib.contextmanager
def environment(name, value):
    """Within it, os.environ[name] is value; the kernels' launchers read their switches at each
    launch, so also a graph captured within keeps them."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before


@contextlib.contextmanager
def fp32_codewords(layers):
    """Within it, the layers' codewords are not bf16 values, and the GEMVs look them up in 8
    bytes ((high, low) pairs on tensor cores, float2 on CUDA cores): QAM-W layers hold the
    trained fp32 codewords (as format-4 checkpoints do), AAAC layers their codebooks times
    1 + 2^-12 (as layers learned before bf16 ones)."""
    name = "codebook" if hasattr(layers[0], "codebook_id") else "codebooks"
    held = [getattr(layer, name) for layer in layers]
    for layer, books in zip(layers, held):
        setattr(layer, name, codebooks.get(layer.codebook_id, "fp32").to(books.device)
                if name == "codebook" else books * (1 + 2.0 ** -12))
    try:
        yield
    finally:
        for layer, books in zip(layers, held):
            setattr(layer, name, books)


def plain_launches():
    """The GEMV kernels launched without programmatic dependent launch (QAMW_PDL=0), for the
    figures with and without."""
    return environment("QAMW_PDL", "0")


def other_gemv_kernel(codec, batch):
    """The GEMV kernel family that is not the codec's default at this batch (QAMW_GEMV_MMA):
    tensor cores below MMA_FROM_BATCH (2 unless listed), CUDA cores from it; its name and the
    switch."""
    if batch < MMA_FROM_BATCH.get(codec, 2):
        return "tensor cores", environment("QAMW_GEMV_MMA", "1")
    return "CUDA cores", environment("QAMW_GEMV_MMA", "0")


def copies_for(nbytes, s):
    """Copies of an operand of nbytes that together exceed the rotation size."""
    return max(2, min(s["max_copies"], math.ceil(s["rotation_bytes"] / nbytes)))


def nbytes(t):
    return t.numel() * t.element_size()


def bench_copy(device, s):
    src = torch.empty(s["copy_bytes"], dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    sec, timing = time_calls([partial(dst.copy_, src)], device, max(2, s["calls"] // 8),
                             s["repeats"])
    moved = 2 * nbytes(src)   # read + write
    return dict(op="copy", size_bytes=nbytes(src), bytes=moved, ms=sec * 1e3,
                gbps=moved / sec / 1e9, timing=timing)


class GemvWeights:
    """Per shape: weight copies for the rotation, built on first use and kept."""

    def __init__(self, device, s, generator):
        self.device, self.s, self.generator, self.cache = device, s, generator, {}

    def get(self, shape):
        if shape not in self.cache:
            m, n = shape
            w = {}
            for codec in GEMV_CODECS:
                first = random_layer(codec, n, m, self.device, self.generator)
                w[codec] = [first] + [random_layer(codec, n, m, self.device, self.generator)
                                      for _ in range(copies_for(buffer_bytes(first), self.s) - 1)]
            for dtype in self.s["dtypes"]:
                copies = copies_for(m * n * torch.finfo(dtype).bits // 8, self.s)
                w[dtype] = [torch.empty(m, n, dtype=dtype, device=self.device)
                            .normal_(0.0, WEIGHT_STD, generator=self.generator)
                            for _ in range(copies)]
            self.cache[shape] = w
        return self.cache[shape]


def bench_gemv_suite(weights, shape, dtype, batch, device, s, copy_gbps):
    """One row per codec at this shape, dtype and batch, each against F.linear's time."""
    m, n = shape
    w = weights.get(shape)
    x = torch.randn(batch, n, device=device, dtype=dtype)
    io_bytes = nbytes(x) + batch * m * x.element_size()
    dense = w[dtype]
    t_dense, dense_timing = time_calls([partial(F.linear, x, d) for d in dense], device,
                                       s["calls"], s["repeats"])
    dense_bytes = nbytes(dense[0]) + io_bytes
    rows = []
    for codec in GEMV_CODECS:
        layers = w[codec]
        calls = [partial(layer.gemv, x) for layer in layers]
        t, timing = time_calls(calls, device, s["calls"], s["repeats"])
        pdl = {}
        if batch == 1:   # each call's launch overlapping the one before, or not
            with plain_launches():
                t_plain, _ = time_calls(calls, device, s["calls"], s["repeats"])
            pdl = dict(no_pdl_ms=t_plain * 1e3, pdl_speedup=t_plain / t)
        if codec in MMA_CODECS:   # the other kernel family, side by side
            name, switch = other_gemv_kernel(codec, batch)
            with switch:
                t_other, _ = time_calls(calls, device, s["calls"], s["repeats"])
            pdl.update(other_kernel=name, other_kernel_ms=t_other * 1e3,
                       other_kernel_speedup_vs_dense=t_dense / t_other)
            if codec in BF16_CODEWORD_CODECS and (batch > 1 or codec.startswith("qamw")):
                # The default kernel again, with codewords that are not bf16 values.
                with fp32_codewords(layers):
                    t_fp32, _ = time_calls(calls, device, s["calls"], s["repeats"])
                pdl.update(fp32_codewords_ms=t_fp32 * 1e3, bf16_codewords_speedup=t_fp32 / t)
            if batch == 1 and codec.startswith("qamw"):
                # Tensor cores with each CTA rotating the whole activation, and with the
                # activation rotated once by a kernel of its own, beside the default clusters
                # of CTAs that split the rotation.
                mma_ms = (t if name == "CUDA cores" else t_other) * 1e3
                with environment("QAMW_GEMV_MMA", "1"), environment("QAMW_GEMV_CLUSTER", "0"):
                    t_alone, _ = time_calls(calls, device, s["calls"], s["repeats"])
                with environment("QAMW_GEMV_MMA", "1"), environment("QAMW_GEMV_ROTATE_ONCE", "1"):
                    t_once, _ = time_calls(calls, device, s["calls"], s["repeats"])
                pdl.update(mma_cluster_ms=mma_ms, mma_alone_ms=t_alone * 1e3,
                           cluster_speedup=t_alone * 1e3 / mma_ms,
                           mma_rotate_once_ms=t_once * 1e3,
                           cluster_vs_rotate_once=t_once * 1e3 / mma_ms)
        moved = buffer_bytes(layers[0]) + io_bytes
        rows.append(dict(op="gemv", codec=codec, bits_per_weight=layers[0].bits_per_weight(),
                         shape=[m, n], batch=batch, dtype=str(dtype), copies=len(layers),
                         bytes=moved, ms=t * 1e3, gbps=moved / t / 1e9,
                         frac_of_copy=moved / t / 1e9 / copy_gbps, timing=timing,
                         dense_linear_ms=t_dense * 1e3, dense_bytes=dense_bytes,
                         dense_copies=len(dense), dense_gbps=dense_bytes / t_dense / 1e9,
                         dense_frac_of_copy=dense_bytes / t_dense / 1e9 / copy_gbps,
                         dense_timing=dense_timing, speedup_vs_dense=t_dense / t, **pdl))
    return rows


def dao_hadamard_transform(src):
    """Dao-AILab's transform (benchmarks/dao_fht.py) built from the checkout src, or where
    none is given the installed package, for comparison; with neither, or when it does not
    build, None and the reason."""
    try:
        if src:
            import dao_fht
            return dao_fht.load(src), None
        from fast_hadamard_transform import hadamard_transform
        return hadamard_transform, None
    except Exception as e:
        return None, f"{type(e).__name__}: {e}"[-300:]


def bench_hadamard_suite(dtype, block, device, s, copy_gbps, dao):
    """ops.hadamard on ~hadamard_bytes of input against torch.clone of the same tensors."""
    n = block * -(-HADAMARD_MIN_ROW // block)
    rows = max(1, s["hadamard_bytes"] // (n * torch.finfo(dtype).bits // 8))
    first = torch.randn(rows, n, device=device, dtype=dtype)
    xs = [first] + [torch.randn_like(first) for _ in range(copies_for(nbytes(first), s) - 1)]
    t_op, timing = time_calls([partial(ops.hadamard, x, block) for x in xs], device,
                              s["calls"], s["repeats"])
    t_clone, clone_timing = time_calls([x.clone for x in xs], device, s["calls"], s["repeats"])
    moved = 2 * nbytes(first)   # read + write, as the clone
    row = dict(op="hadamard", dtype=str(dtype), block=block, shape=[rows, n], copies=len(xs),
               bytes=moved, ms=t_op * 1e3, clone_ms=t_clone * 1e3, time_vs_clone=t_op / t_clone,
               gbps=moved / t_op / 1e9, frac_of_copy=moved / t_op / 1e9 / copy_gbps,
               timing=timing, clone_timing=clone_timing)
    if dao is not None and block & (block - 1) == 0:
        try:
            t_dao, _ = time_calls([partial(dao, x.view(-1, block), block ** -0.5) for x in xs],
                                  device, s["calls"], s["repeats"])
            # The same transform: its largest difference from ours, relative to the largest
            # output (a few 16-bit roundings; anything near 1 means another order or scale).
            ours = ops.hadamard(first, block).float()
            theirs = dao(first.view(-1, block), block ** -0.5).view_as(first).float()
            row.update(dao_fht_ms=t_dao * 1e3, time_vs_dao_fht=t_op / t_dao,
                       dao_fht_difference=((theirs - ours).abs().max() / ours.abs().max()).item())
        except Exception as e:
            row["dao_fht_error"] = f"{type(e).__name__}: {e}"[:200]
    return row


def short_dtype(name):
    return name.replace("torch.", "").replace("bfloat16", "bf16").replace("float16", "fp16")


def row_label(r):
    if r["op"] == "gemv":
        m, n = r["shape"]
        return f"{r['codec']} {m}x{n} {short_dtype(r['dtype'])} b{r['batch']}"
    return f"block {r['block']} {short_dtype(r['dtype'])}"


def check_targets(results):
    """The speed issue's targets, each with how many rows meet it and the ones that miss."""
    gemv = [r for r in results if r["op"] == "gemv"]
    first = [r for r in gemv if r["batch"] == 1]
    pow2 = [r for r in results if r["op"] == "hadamard" and r["block"] & (r["block"] - 1) == 0]
    specs = [
        ("GEMV batch 1 at >= 80% of copy bandwidth", first, "frac_of_copy", ">=", 0.8),
        ("QAM-W 5.5 bpw batch 1 >= 2.5x F.linear",
         [r for r in first if r["codec"] == "qamw-5.5"], "speedup_vs_dense", ">=", 2.5),
        ("QAM-W 4 bpw batch 1 >= 3.3x F.linear",
         [r for r in first if r["codec"] == "qamw-4"], "speedup_vs_dense", ">=", 3.3),
        ("AAAC batch 1 >= 3.3x F.linear",
         [r for r in first if r["codec"].startswith("aaac")], "speedup_vs_dense", ">=", 3.3),
        ("GEMV batches 2-16 faster than F.linear (cuBLAS)",
         [r for r in gemv if r["batch"] > 1], "speedup_vs_dense", ">", 1.0),
        ("Hadamard 2^7..2^15 within 1.2x of clone", pow2, "time_vs_clone", "<=", 1.2),
    ]
    out = []
    for name, rows, key, rel, bound in specs:
        ok = {">=": lambda v: v >= bound, ">": lambda v: v > bound, "<=": lambda v: v <= bound}[rel]
        misses = [f"{row_label(r)}: {r[key]:.2f}" for r in rows if not ok(r[key])]
        out.append(dict(target=name, key=key, bound=f"{rel} {bound}", met=len(rows) - len(misses),
                        of=len(rows), misses=misses))
    return out


def md_table(header, rows):
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows] + [""]


def markdown(record):
    """The suite's tables: batch-1 GEMV, larger batches, Hadamard, nearest codeword, targets."""
    copy = record["copy"]
    res = record["results"]
    gemv = [r for r in res if r["op"] == "gemv"]
    dtypes = list(dict.fromkeys(r["dtype"] for r in gemv))
    lines = [f"# Op benchmarks on {record['device']}", "",
             f"{record['date']}, torch {record['torch']} (CUDA {record['cuda']}); "
             f"`{record['command']}`.", "",
             f"Device-to-device copy: **{copy['gbps']:.0f} GB/s** (copy of "
             f"{copy['size_bytes'] // MiB} MiB, read + write counted). % of copy = bytes of "
             "codes, scales, codebook, signs, activation and output / time / copy bandwidth; "
             f"weights rotate over >= {record['settings']['rotation_bytes'] // MiB} MiB of copies. "
             f"Times per call, median of {record['settings']['repeats']} replays of "
             f"{record['settings']['calls']}+ calls; timed by "
             f"{', '.join(sorted(set(r['timing'] for r in res if 'timing' in r))) or '-'}.", ""]
    first = [r for r in gemv if r["batch"] == 1]
    if first:
        lines += ["## GEMV, batch 1", ""]
        header = ["shape (out x in)", "codec", "bpw"]
        for d in dtypes:
            header += [f"{short_dtype(d)} us", f"{short_dtype(d)} % copy",
                       f"{short_dtype(d)} x F.linear"]
        rows = []
        for shape in dict.fromkeys(tuple(r["shape"]) for r in first):
            at = [r for r in first if tuple(r["shape"]) == shape]
            dense = ["F.linear", "16"]
            for d in dtypes:
                r = next((r for r in at if r["dtype"] == d), None)
                dense += ([f"{r['dense_linear_ms'] * 1e3:.1f}",
                           f"{100 * r['dense_frac_of_copy']:.0f}%", "1.00x"] if r else ["", "", ""])
            rows.append([f"{shape[0]} x {shape[1]}"] + dense)
            for codec in dict.fromkeys(r["codec"] for r in at):
                cells = [f"{shape[0]} x {shape[1]}", codec]
                bpw = next(r["bits_per_weight"] for r in at if r["codec"] == codec)
                cells.append(f"{bpw:.2f}")
                for d in dtypes:
                    r = next((r for r in at if r["codec"] == codec and r["dtype"] == d), None)
                    cells += ([f"{r['ms'] * 1e3:.1f}", f"{100 * r['frac_of_copy']:.0f}%",
                               f"{r['speedup_vs_dense']:.2f}x"] if r else ["", "", ""])
                rows.append(cells)
        lines += md_table(header, rows)
    overlapped = [r for r in first if "no_pdl_ms" in r]
    if overlapped:
        lines += ["## GEMV, batch 1, with and without programmatic dependent launch", "",
                  "The same calls back to back, each launch overlapping the previous kernel's "
                  "tail (the default on sm_90+), or not (QAMW_PDL=0).", ""]
        lines += md_table(["shape", "codec", "dtype", "us", "us without PDL", "gain"],
                          [[f"{r['shape'][0]} x {r['shape'][1]}", r["codec"],
                            short_dtype(r["dtype"]), f"{r['ms'] * 1e3:.1f}",
                            f"{r['no_pdl_ms'] * 1e3:.1f}", f"{r['pdl_speedup']:.2f}x"]
                           for r in overlapped])
    more = [r for r in gemv if r["batch"] > 1]
    if more:
        batches = sorted(set(r["batch"] for r in more))
        lines += ["## GEMV, batches > 1: speed-up over F.linear (cuBLAS) at the same dtype", ""]
        rows = []
        for key in dict.fromkeys((tuple(r["shape"]), r["codec"], r["dtype"]) for r in more):
            cells = [f"{key[0][0]} x {key[0][1]}", key[1], short_dtype(key[2])]
            for b in batches:
                r = next((r for r in more if (tuple(r["shape"]), r["codec"], r["dtype"]) == key
                          and r["batch"] == b), None)
                cells.append(f"{r['speedup_vs_dense']:.2f}x" if r else "")
            rows.append(cells)
        lines += md_table(["shape", "codec", "dtype"] + [f"batch {b}" for b in batches], rows)
    other = [r for r in gemv if "other_kernel" in r]
    if other:
        lines += ["## GEMV: tensor-core and CUDA-core kernels", "",
                  "The default kernel (tensor cores from batch 2, from batch 1 for QAM-W 4 bpw "
                  "and from batch 4 for AAAC NVFP4; CUDA cores below) and the other family "
                  "(QAMW_GEMV_MMA=1 or 0), each as a multiple of F.linear's speed.",
                  ""]
        lines += md_table(["shape", "codec", "dtype", "batch", "default x F.linear", "other",
                           "other x F.linear"],
                          [[f"{r['shape'][0]} x {r['shape'][1]}", r["codec"],
                            short_dtype(r["dtype"]), r["batch"], f"{r['speedup_vs_dense']:.2f}x",
                            r["other_kernel"], f"{r['other_kernel_speedup_vs_dense']:.2f}x"]
                           for r in other])
    rounded = [r for r in gemv if "fp32_codewords_ms" in r]
    if rounded:
        lines += ["## GEMV: codewords of bf16 values or not (default kernels)", "",
                  "New layers hold bf16 codewords. On tensor cores a lookup of 4 bytes then "
                  "fills one register of the mma's A and a k-block takes half the mmas; on CUDA "
                  "cores at batch 1 an fp16 activation's codewords are looked up as half2 (4 "
                  "bytes) instead of float2. Other codewords (QAM-W's trained fp32 ones, as "
                  "format-4 checkpoints hold; AAAC codebooks times 1 + 2^-12) take 8 bytes. "
                  "Gains are the fp32 codewords' time against the bf16 ones'.", ""]
        lines += md_table(["shape", "codec", "dtype", "batch", "kernel", "bf16 us", "fp32 us",
                           "gain"],
                          [[f"{r['shape'][0]} x {r['shape'][1]}", r["codec"],
                            short_dtype(r["dtype"]), r["batch"],
                            "CUDA cores" if r["other_kernel"] == "tensor cores"
                            else "tensor cores", f"{r['ms'] * 1e3:.1f}",
                            f"{r['fp32_codewords_ms'] * 1e3:.1f}",
                            f"{r['bf16_codewords_speedup']:.2f}x"] for r in rounded])
    clustered = [r for r in gemv if "mma_cluster_ms" in r]
    if clustered:
        lines += ["## QAM-W GEMV, batch 1, tensor cores: where the activation is rotated", "",
                  "A cluster of 4 CTAs (2 for weights of 2-3 runs of whole Hadamard blocks, or "
                  "where 4 would add a wave) shares 128 rows and splits their k-blocks, each CTA "
                  "rotating only its share of the activation (the default on sm_90+); or each "
                  "CTA rotates the whole activation for its 32 rows (QAMW_GEMV_CLUSTER=0); or a "
                  "kernel of its own rotates it once, to global memory, before the GEMV "
                  "(QAMW_GEMV_ROTATE_ONCE=1: two launches). Weights that one Hadamard block "
                  "spans run alone in the first two. Gains are the clusters' time against each.",
                  ""]
        lines += md_table(["shape", "codec", "dtype", "clusters us", "alone us", "gain",
                           "rotated once us", "gain"],
                          [[f"{r['shape'][0]} x {r['shape'][1]}", r["codec"],
                            short_dtype(r["dtype"]), f"{r['mma_cluster_ms'] * 1e3:.1f}",
                            f"{r['mma_alone_ms'] * 1e3:.1f}", f"{r['cluster_speedup']:.2f}x",
                            f"{r['mma_rotate_once_ms'] * 1e3:.1f}",
                            f"{r['cluster_vs_rotate_once']:.2f}x"]
                           for r in clustered])
    had = [r for r in res if r["op"] == "hadamard"]
    if had:
        lines += ["## Block Hadamard transform against torch.clone", ""]
        rows = [[short_dtype(r["dtype"]), r["block"], f"{r['shape'][0]} x {r['shape'][1]}",
                 f"{r['ms'] * 1e3:.1f}", f"{r['clone_ms'] * 1e3:.1f}", f"{r['time_vs_clone']:.2f}x",
                 f"{100 * r['frac_of_copy']:.0f}%",
                 f"{r['dao_fht_ms'] * 1e3:.1f}" if "dao_fht_ms" in r else "-",
                 f"{r['time_vs_dao_fht']:.2f}x" if "dao_fht_ms" in r else "-"] for r in had]
        lines += md_table(["dtype", "block", "rows x n", "us", "clone us", "time / clone",
                           "% copy", "Dao FHT us", "time / Dao"], rows)
        if record.get("dao_fht_error"):
            lines += [f"Dao's fast-hadamard-transform: {record['dao_fht_error']}", ""]
    near = [r for r in res if r["op"] == "nearest_codeword_2d"]
    if near:
        lines += ["## Nearest codeword (2-D)", ""]
        lines += md_table(["K", "points", "M points/s", "x brute force"],
                          [[r["K"], r["points"], f"{r['mpoints_per_s']:.0f}",
                            f"{r['speedup_vs_brute_force']:.0f}x"] for r in near])
    lines += ["## Targets", ""]
    lines += md_table(["target", "met", "misses"],
                      [[t["target"], f"{t['met']} / {t['of']}", "; ".join(t["misses"][:6]) +
                        (f"; ... {len(t['misses']) - 6} more" if len(t["misses"]) > 6 else "")]
                       for t in record["targets"]])
    return "\n".join(lines)


def suite_main(args):
    """The GPU suite (or, with --smoke, the same code on tiny shapes)."""
    device = args.device
    s = dict(SMOKE if args.smoke else FULL)
    if args.dtypes:
        s["dtypes"] = [DTYPES[d] for d in args.dtypes.split(",")]
    if args.hadamard_blocks:
        s["hadamard_blocks"] = ([] if args.hadamard_blocks == "none" else
                                [int(b) for b in args.hadamard_blocks.split(",")])
    l2 = 0
    if device == "cuda":
        l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0)
        if not args.smoke:
            s["rotation_bytes"] = max(s["rotation_bytes"], 5 * l2)
    generator = torch.Generator(device).manual_seed(0)
    record = dict(command=command_line(__file__, args.argv),
                  date=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  torch=torch.__version__, cuda=torch.version.cuda,
                  device=(torch.cuda.get_device_name() if device == "cuda"
                          else machine_info().get("cpu", platform.machine())),
                  l2_cache_bytes=l2, smoke=args.smoke, machine=machine_info(),
                  settings={k: [str(d) for d in v] if k == "dtypes" else v for k, v in s.items()},
                  copy=None, results=[], targets=[])

    def save(rows=()):
        for r in rows:
            print_row(r)
        record["results"] += rows
        record["targets"] = check_targets(record["results"])
        if args.out:   # after every group, so that a time limit keeps what was measured
            with open(args.out, "w") as f:
                json.dump(record, f, indent=1)
            with open(args.out.removesuffix(".json") + ".md", "w") as f:
                f.write(markdown(record) + "\n")

    record["copy"] = bench_copy(device, s)
    copy_gbps = record["copy"]["gbps"]
    print_row(record["copy"])
    save()
    weights = GemvWeights(device, s, generator)
    # Batch 1 first (the headline figures), then the Hadamard transform, then larger batches.
    for shape in s["gemv_shapes"]:
        for dtype in s["dtypes"]:
            save(bench_gemv_suite(weights, shape, dtype, 1, device, s, copy_gbps))
    dao, record["dao_fht_error"] = dao_hadamard_transform(args.dao_fht_src)
    record["dao_fast_hadamard_transform"] = dao is not None
    for dtype in s["dtypes"]:
        for block in s["hadamard_blocks"]:
            save([bench_hadamard_suite(dtype, block, device, s, copy_gbps, dao)])
    for shape in s["gemv_shapes"]:
        for dtype in s["dtypes"]:
            for batch in s["batches"][1:]:
                save(bench_gemv_suite(weights, shape, dtype, batch, device, s, copy_gbps))
    del weights
    save(bench_nearest(device, s["nearest_points"]))
    for t in record["targets"]:
        print(f"target: {t['target']}: {t['met']} / {t['of']}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--smoke", action="store_true",
                        help="the GPU suite with tiny shapes (checks the logic on the CPU)")
    parser.add_argument("--out")
    parser.add_argument("--dao-fht-src", metavar="DIR",
                        help="a checkout of Dao-AILab/fast-hadamard-transform: build it and time "
                             "its transform beside ops.hadamard")
    parser.add_argument("--dtypes", help="activation dtypes of the GPU suite, e.g. bf16 or "
                        "bf16,fp16 (the default)")
    parser.add_argument("--hadamard-blocks", metavar="LIST",
                        help="Hadamard blocks of the GPU suite, e.g. 128,1024, or none")
    args = parser.parse_args(argv)
    if args.dtypes and not set(args.dtypes.split(",")) <= DTYPES.keys():
        parser.error(f"--dtypes takes {', '.join(DTYPES)}, got {args.dtypes}")
    args.argv = sys.argv[1:] if argv is None else list(argv)
    if args.device == "cpu" and not args.smoke:
        cpu_main(args)
    else:
        suite_main(args)


if __name__ == "__main__":
    main()
