"""Every op against the pure-PyTorch reference, on CPU and (when present) CUDA: fresh random
inputs, odd sizes, every bit width and block size, outputs poisoned first, plus opcheck,
torch.compile and the error messages of bad input."""
import pytest
import torch

import qamw_ext
from qamw_ext import ops, reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FLOATS = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def poison_allocations():
    """Fill freshly allocated memory with garbage so an unwritten output cannot pass."""
    torch.manual_seed(1234)
    fill = torch.empty(1 << 20).fill_(float("nan"))
    del fill
    yield


def assert_matches_reference(out, ref64, dtype, atol):
    """The rule from Dao-AILab: the kernel's error against an fp64 reference is under twice
    the error PyTorch itself makes rounding to the same dtype, plus a small atol."""
    assert out.dtype == dtype
    assert torch.isfinite(out.float()).all()
    torch_err = (ref64.to(dtype).double() - ref64).abs().max().item()
    err = (out.double().cpu() - ref64.cpu()).abs().max().item()
    assert err <= 2 * torch_err + atol, (err, torch_err)


def random_signs(n, device):
    return (torch.randint(0, 2, (n,), device=device) * 2 - 1).to(torch.int8)


def check_hadamard_both_ways(x, block, signs, dtype):
    """Forward and inverse, without and with signs, against the reference."""
    for s in (None, signs):
        for inverse in (False, True):
            out = ops.hadamard(x, block, s, inverse)
            ref = reference.hadamard(x.double(), block, s, inverse)
            assert_matches_reference(out, ref, dtype, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("block", [2, 8, 64, 256, 2048, 32768])
def test_hadamard_matches_reference(device, dtype, block):
    rows = 3 if block < 32768 else 1
    n = block * (3 if block <= 256 else 1)
    x = torch.randn(rows, 5 if block < 2048 else 1, n, device=device).to(dtype)
    check_hadamard_both_ways(x, block, random_signs(n, device), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block", [16384, 32768])
def test_hadamard_many_large_blocks_match_one_at_a_time(device, dtype, block):
    """More 2^14 / 2^15 blocks than a GPU has SMs (its persistent CTAs each stage their next
    block's input while they transform one) give every row what a call on that row alone
    gives, and match the reference."""
    rows = 300
    x = torch.randn(rows, block, device=device).to(dtype)
    signs = random_signs(block, device)
    for inverse in (False, True):
        out = ops.hadamard(x, block, signs, inverse)
        alone = torch.cat([ops.hadamard(x[r:r + 1], block, signs, inverse) for r in range(rows)])
        assert torch.equal(out, alone)
        ref = reference.hadamard(x[-2:].double(), block, signs, inverse)
        assert_matches_reference(out[-2:], ref, dtype, atol=1e-5)


# Blocks of K * 2^m (qamw_ext.hadamard_matrices): 12 * 1, 12 * 2, 44 * 1, 20 * 4, 28 * 2, 60 * 8,
# 36 * 16 = 576, 12 * 128 = 1536 and the largest, 60 * 512.
K_BLOCKS = [12, 24, 44, 80, 56, 480, 576, 1536, 30720]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("block", K_BLOCKS)
def test_hadamard_k_blocks_match_reference(device, dtype, block):
    rows, n = (7, 3 * block) if block <= 1536 else (1, block)   # an odd number of rows
    x = torch.randn(rows, n, device=device).to(dtype)
    check_hadamard_both_ways(x, block, random_signs(n, device), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block", [12, 80, 576, 1536])
def test_hadamard_k_blocks_inverse_is_identity(device, block):
    x = torch.randn(5, 2 * block, device=device)
    signs = random_signs(2 * block, device)
    y = ops.hadamard(x, block, signs)
    torch.testing.assert_close(ops.hadamard(y, block, signs, inverse=True), x, atol=1e-5, rtol=1e-5)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5)  # orthonormal


def test_hadamard_tables_header_is_up_to_date():
    """csrc/hadamard_tables.h is what tools/make_hadamard_tables.py writes from
    qamw_ext.hadamard_matrices."""
    import importlib.util
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("make_hadamard_tables",
                                                  root / "tools" / "make_hadamard_tables.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert (root / "csrc" / "hadamard_tables.h").read_text() == tool.render()


@pytest.mark.parametrize("device", DEVICES)
def test_hadamard_inverse_and_noncontiguous(device):
    x = torch.randn(64, 48, device=device).T  # non-contiguous (48, 64)
    signs = random_signs(64, device)
    y = ops.hadamard(x, 16, signs)
    torch.testing.assert_close(ops.hadamard(y, 16, signs, inverse=True), x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y, reference.hadamard(x.contiguous(), 16, signs))
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5)  # orthonormal


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("K", [1, 3, 16, 128, 2048, 4096])
def test_nearest_codeword_2d_is_exact(device, K):
    codebook = torch.randn(K, 2, device=device)
    points = torch.randn(20011, 2, device=device) * 1.7   # some fall outside the grid
    points[:7] = codebook[torch.randint(0, K, (7,))]       # exact hits
    points[7] = float("nan")
    idx = ops.nearest_codeword_2d(points, codebook)
    assert idx.dtype == torch.int32 and idx.shape == (20011,)
    assert ((idx >= 0) & (idx < K)).all()
    d = ((points[8:, None, :].double() - codebook.double()) ** 2).sum(-1)
    chosen = d.gather(1, idx[8:].long()[:, None]).squeeze(1)
    assert torch.allclose(chosen, d.min(1).values, rtol=1e-5, atol=1e-9)
    agree = (idx == reference.nearest_codeword_2d(points, codebook)).float().mean()
    assert agree > 0.999


@pytest.mark.parametrize("device", DEVICES)
def test_nearest_codeword_ties_go_to_lowest_index(device):
    codebook = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [1.0, 0.0], [0.0, 5.0]], device=device)
    points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 9.0]], device=device).repeat(50, 1)
    assert ops.nearest_codeword_2d(points, codebook).tolist() == [0, 0, 3] * 50
    scalar = torch.tensor([2.0, -1.0, 1.0, 2.0], device=device)
    values = torch.tensor([0.0, 1.5, 2.0, 9.0, -5.0], device=device)
    assert ops.nearest_codeword_1d(values, scalar).tolist() == [1, 0, 0, 0, 1]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("K", [2, 16, 1000])
def test_nearest_codeword_1d_matches_reference(device, K):
    codebook = torch.randn(K, device=device)
    values = torch.randn(3, 1001, device=device) * 2
    idx = ops.nearest_codeword_1d(values, codebook)
    d = (values[..., None] - codebook).abs()
    chosen = d.gather(-1, idx.long()[..., None]).squeeze(-1)
    assert torch.equal(chosen, d.min(-1).values)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", range(1, 17))
def test_pack_unpack_round_trip(device, bits):
    for shape in [(1, 1), (7, 53), (2, 3, 129), (4, 0)]:
        codes = torch.randint(0, 2**bits, shape, dtype=torch.int32, device=device)
        packed = ops.pack_bits(codes, bits)
        assert packed.shape[-1] == reference.packed_words_per_row(shape[-1], bits)
        assert torch.equal(packed.cpu(), reference.pack_bits(codes.cpu(), bits))
        assert torch.equal(ops.unpack_bits(packed, bits, shape[-1]), codes)


def qamw_weight(m, n, bits, block, per_block, device, channel=True):
    codes = torch.randint(0, 2**bits, (m, n // 2), dtype=torch.int32, device=device)
    packed = ops.pack_bits(codes, bits)
    codebook = torch.randn(2**bits, 2, device=device)
    shape = (m, n // block) if per_block else (m,)
    row_scale = torch.rand(shape, device=device) + 0.5
    channel_scale = torch.rand(n, device=device) + 0.5 if channel else None
    return packed, codebook, row_scale, channel_scale, random_signs(n, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [4, 7, 8, 11, 12])
@pytest.mark.parametrize("m,n,block,per_block", [(1, 2, 2, False), (37, 96, 32, True),
                                                 (130, 576, 64, False), (64, 1024, 1024, True),
                                                 # blocks of K * 2^m
                                                 (37, 576, 576, False), (29, 1152, 576, True),
                                                 (19, 3072, 1536, True), (70, 1536, 1536, False),
                                                 (9, 72, 12, True), (11, 160, 80, True),
                                                 (5, 960, 480, False)])
def test_qamw_dequantize_and_gemv(device, bits, m, n, block, per_block):
    w = qamw_weight(m, n, bits, block, per_block, device)
    ref_w = reference.qamw_dequantize(*w, bits, block, n, torch.float64)
    for dtype in FLOATS:
        dense = ops.qamw_dequantize(*w, bits, block, n, dtype)
        assert_matches_reference(dense, ref_w, dtype, atol=1e-5)
        for batch in [1, 3, 16, 17]:
            x = torch.randn(batch, n, device=device).to(dtype)
            ref_y = x.double() @ ref_w.T
            out = ops.qamw_gemv(x, *w, bits, block)
            assert_matches_reference(out, ref_y, dtype, atol=2e-4 * ref_y.abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float8_e4m3fn])
@pytest.mark.parametrize("m,n,group", [(1, 16, 16), (33, 192, 64), (70, 512, 128), (5, 256, 256)])
def test_aaac_dequantize_and_gemv(device, scale_dtype, m, n, group):
    codes = torch.randint(0, 16, (m, n), dtype=torch.int32, device=device)
    packed = ops.pack_bits(codes, 4)
    scales = torch.randn(m, n // group, device=device).to(scale_dtype)
    scales[0, 0] = -0.0  # a zero scale still carries its codebook choice
    codebooks = torch.randn(2, 16, device=device)
    for tensor_scale, channel in [(None, None),
                                  (torch.tensor([0.3], device=device), torch.rand(n, device=device) + 0.5)]:
        w = (packed, scales, codebooks, tensor_scale, channel)
        ref_w = reference.aaac_dequantize(*w, group, torch.float64)
        for dtype in FLOATS:
            assert_matches_reference(ops.aaac_dequantize(*w, group, dtype), ref_w, dtype, atol=1e-5)
            for batch in [1, 4, 17]:
                x = torch.randn(batch, n, device=device).to(dtype)
                ref_y = x.double() @ ref_w.T
                out = ops.aaac_gemv(x, *w, group)
                assert_matches_reference(out, ref_y, dtype, atol=2e-4 * ref_y.abs().max().item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the two kernel families are CUDA's")
@pytest.mark.parametrize("setting", ["0", "1", "1-alone", "0-once", "1-once"])
def test_cuda_gemv_kernel_families_match_reference(monkeypatch, setting):
    """QAMW_GEMV_MMA=0 puts every batch on the CUDA-core GEMVs, =1 every batch on the
    tensor-core ones (weights they serve: per-row or 1024-block scales, AAAC groups of 128):
    both match the reference, at batch 1 too. Blocks of 128 and groups of 16 put their scales
    into the tensor cores' A operand; AAAC without channel scales reads bf16 activations in
    place. At batch 1, QAM-W with blocks of 128 and 256 (8 runs of whole blocks) runs in
    clusters of 4 CTAs on sm_90, or each CTA alone (1-alone: QAMW_GEMV_CLUSTER=0), or after a
    kernel of its own rotated the activation once (-once: QAMW_GEMV_ROTATE_ONCE=1)."""
    monkeypatch.setenv("QAMW_GEMV_MMA", setting[0])
    if setting.endswith("alone"):
        monkeypatch.setenv("QAMW_GEMV_CLUSTER", "0")
    if setting.endswith("once"):
        monkeypatch.setenv("QAMW_GEMV_ROTATE_ONCE", "1")
    for per_block, block in [(False, 1024), (True, 1024), (True, 128), (False, 256)]:
        w = qamw_weight(70, 2048, 8, block, per_block, "cuda")
        ref_w = reference.qamw_dequantize(*w, 8, block, 2048, torch.float64)
        for dtype in FLOATS:
            for batch in [1, 5, 16]:
                x = torch.randn(batch, 2048, device="cuda").to(dtype)
                ref_y = x.double() @ ref_w.T
                out = ops.qamw_gemv(x, *w, 8, block)
                assert_matches_reference(out, ref_y, dtype, atol=2e-4 * ref_y.abs().max().item())
    codes = torch.randint(0, 16, (37, 1024), dtype=torch.int32, device="cuda")
    for group in [128, 16]:
        scales = torch.randn(37, 1024 // group, device="cuda").half()
        for channel_scale in [torch.rand(1024, device="cuda") + 0.5, None]:
            w = (ops.pack_bits(codes, 4), scales, torch.randn(2, 16, device="cuda"),
                 torch.tensor([0.3], device="cuda"), channel_scale)
            ref_w = reference.aaac_dequantize(*w, group, torch.float64)
            for dtype in FLOATS:
                for batch in [1, 3, 16]:
                    x = torch.randn(batch, 1024, device="cuda").to(dtype)
                    ref_y = x.double() @ ref_w.T
                    out = ops.aaac_gemv(x, *w, group)
                    assert_matches_reference(out, ref_y, dtype,
                                             atol=2e-4 * ref_y.abs().max().item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs")
def test_cuda_ops_capture_into_a_graph_after_one_call():
    """After one call, a GEMV or Hadamard launch asks the runtime nothing (its kernel's facts
    are remembered), so it captures into a CUDA graph in the strict (global) error mode, and
    the replay on new values of the captured input gives the eager result."""
    codes = torch.randint(0, 16, (300, 2048), dtype=torch.int32, device="cuda")
    aaac = (ops.pack_bits(codes, 4), torch.randn(300, 16, device="cuda").half(),
            torch.randn(2, 16, device="cuda"), torch.tensor([0.7], device="cuda"), None)
    qamw8 = qamw_weight(300, 2048, 8, 256, False, "cuda")
    qamw11 = qamw_weight(300, 2048, 11, 1024, True, "cuda")
    cases = [(lambda x: ops.qamw_gemv(x, *qamw8, 8, 256), 1),   # clusters on sm_90
             (lambda x: ops.qamw_gemv(x, *qamw11, 11, 1024), 1),
             (lambda x: ops.qamw_gemv(x, *qamw8, 8, 256), 5),
             (lambda x: ops.aaac_gemv(x, *aaac, 128), 1),
             (lambda x: ops.hadamard(x, 2048), 4),
             (lambda x: ops.hadamard(x.repeat(1, 8), 16384), 3)]
    for op, batch in cases:
        x = torch.randn(batch, 2048, device="cuda", dtype=torch.bfloat16)
        op(x)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="global"):
            out = op(x)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, op(x), rtol=0, atol=0)


# Fused weights: the rows of 2 to 4 layers, each with its own per-layer parameters. Odd row
# counts (a sibling's last rows share a lane's pair or a CTA's step with the next one's), a
# sibling of one row, and both GEMV paths: the activation rotated in shared memory and (n of
# 24576 at batch 16) in the workspace, once per sibling.
SIBLINGS = [([5, 3], 96, 32), ([1, 30, 7], 576, 576), ([64, 16, 16], 1024, 1024),
            ([3, 1, 2, 9], 160, 80), ([40, 24], 24576, 1024)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [4, 11])
@pytest.mark.parametrize("rows,n,block", SIBLINGS)
def test_qamw_fused_siblings_compute_each_layer(device, bits, rows, n, block):
    """Each sibling's rows of a fused weight equal its own layer's output: the same codes,
    its own channel scale, in one call."""
    layers = [qamw_weight(m, n, bits, block, bits == 4, device) for m in rows]
    packed, codebook = torch.cat([w[0] for w in layers]), layers[0][1]
    row_scale = torch.cat([w[2] for w in layers])
    signs = layers[0][4]
    # each sibling its own channel scale, or none at all (one rotated activation for all)
    for channel in (torch.stack([w[3] for w in layers]), None):
        fused = (packed, codebook, row_scale, channel, signs, bits, block)
        ref_w = reference.qamw_dequantize(*fused, n, torch.float64, rows)
        own = torch.cat([reference.qamw_dequantize(
            w[0], codebook, w[2], None if channel is None else w[3], signs, bits, block, n,
            torch.float64) for w in layers])
        torch.testing.assert_close(ref_w, own, rtol=0, atol=0)
        for dtype in FLOATS:
            dense = ops.qamw_dequantize(*fused, n, dtype, rows)
            assert_matches_reference(dense, ref_w, dtype, atol=1e-5)
            for batch in [1, 3, 16]:
                x = torch.randn(batch, n, device=device).to(dtype)
                ref_y = x.double() @ ref_w.T
                out = ops.qamw_gemv(x, *fused, rows)
                assert_matches_reference(out, ref_y, dtype,
                                         atol=2e-4 * ref_y.abs().max().item())
                # exactly what each layer's own GEMV gives, for every row
                parts = [ops.qamw_gemv(x, w[0], codebook, w[2], None if channel is None
                                       else w[3], signs, bits, block) for w in layers]
                assert torch.equal(out, torch.cat(parts, dim=1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float8_e4m3fn])
@pytest.mark.parametrize("rows,n,group", [([5, 3], 64, 16), ([1, 30, 7], 512, 128),
                                          ([3, 1, 2, 9], 256, 64), ([40, 24], 24576, 128)])
def test_aaac_fused_siblings_compute_each_layer(device, scale_dtype, rows, n, group):
    m, s = sum(rows), len(rows)
    packed = ops.pack_bits(torch.randint(0, 16, (m, n), dtype=torch.int32, device=device), 4)
    scales = torch.randn(m, n // group, device=device).to(scale_dtype)
    codebooks = torch.randn(s, 2, 16, device=device)
    for tensor_scale, channel in [(None, None),
                                  (torch.rand(s, device=device) + 0.1,
                                   torch.rand(s, n, device=device) + 0.5)]:
        fused = (packed, scales, codebooks, tensor_scale, channel, group)
        ref_w = reference.aaac_dequantize(*fused, torch.float64, rows)
        own = []
        for i, count in enumerate(rows):
            r = slice(sum(rows[:i]), sum(rows[:i]) + count)
            own.append(reference.aaac_dequantize(
                packed[r], scales[r], codebooks[i],
                None if tensor_scale is None else tensor_scale[i:i + 1],
                None if channel is None else channel[i], group, torch.float64))
        torch.testing.assert_close(ref_w, torch.cat(own), rtol=0, atol=0)
        for dtype in FLOATS:
            assert_matches_reference(ops.aaac_dequantize(*fused, dtype, rows), ref_w, dtype,
                                     atol=1e-5)
            for batch in [1, 4, 16]:
                x = torch.randn(batch, n, device=device).to(dtype)
                ref_y = x.double() @ ref_w.T
                out = ops.aaac_gemv(x, *fused, rows)
                assert_matches_reference(out, ref_y, dtype, atol=2e-4 * ref_y.abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
def test_nan_activations_propagate(device):
    w = qamw_weight(8, 64, 8, 64, False, device)
    x = torch.randn(2, 64, device=device)
    x[1, 3] = float("nan")
    y = ops.qamw_gemv(x, *w, 8, 64)
    assert torch.isfinite(y[0]).all() and torch.isnan(y[1]).all()


def test_opcheck_every_op():
    w = qamw_weight(16, 64, 7, 32, True, "cpu")
    x = torch.randn(3, 64)
    codes = torch.randint(0, 16, (8, 64), dtype=torch.int32)
    aaac = (ops.pack_bits(codes, 4), torch.randn(8, 4).half(), torch.randn(2, 16), None, None)
    samples = {
        "hadamard": (torch.randn(4, 64), 16, random_signs(64, "cpu"), True),
        "nearest_codeword_2d": (torch.randn(100, 2), torch.randn(64, 2)),
        "nearest_codeword_1d": (torch.randn(100), torch.randn(16)),
        "pack_bits": (codes, 4),
        "unpack_bits": (ops.pack_bits(codes, 4), 4, 64),
        "qamw_gemv": (x, *w, 7, 32),
        "qamw_dequantize": (*w, 7, 32, 64, torch.float16),
        "aaac_gemv": (x, *aaac, 16),
        "aaac_dequantize": (*aaac, 16, torch.bfloat16),
    }
    fused_w = (w[0], w[1], w[2], torch.rand(2, 64) + 0.5, w[4])
    fused_aaac = (aaac[0], aaac[1], torch.randn(2, 2, 16), None, torch.rand(2, 64) + 0.5)
    fused = {"qamw_gemv": (x, *fused_w, 7, 32, [10, 6]),
             "qamw_dequantize": (*fused_w, 7, 32, 64, torch.float16, [10, 6]),
             "aaac_gemv": (x, *fused_aaac, 16, [3, 5]),
             "aaac_dequantize": (*fused_aaac, 16, torch.float32, [3, 5])}
    for name, args in [*samples.items(), *fused.items()]:
        torch.library.opcheck(getattr(torch.ops.qamw_ext, name).default, args)


def test_torch_compile_fullgraph():
    w = qamw_weight(32, 128, 8, 64, False, "cpu")

    def layer(x):
        y = ops.qamw_gemv(x, *w, 8, 64)
        return ops.hadamard(y, 32) * 2

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 128)
    torch.testing.assert_close(compiled(x), layer(x))


def test_bad_input_gives_clear_errors():
    x = torch.randn(2, 64)
    w = qamw_weight(8, 64, 8, 64, False, "cpu")
    cases = [
        (lambda: ops.hadamard(x.int(), 16), "float32, float16 or bfloat16"),
        (lambda: ops.hadamard(x, 12), "block_size 12 does not divide the last dimension 64"),
        (lambda: ops.hadamard(torch.randn(2, 36), 24), "does not divide"),
        (lambda: ops.hadamard(torch.randn(2, 104), 52), r"power of two from 2 to 32768, or K \* 2\^m"),
        (lambda: ops.hadamard(x, 0), "power of two from 2 to 32768, or K"),
        (lambda: ops.hadamard(torch.randn(2, 36), 3), "K one of 12, 20, 28, 36, 44, 60"),
        (lambda: ops.hadamard(torch.randn(1, 61440), 61440), "up to 32768"),
        (lambda: ops.qamw_gemv(torch.randn(2, 104), *qamw_weight(8, 104, 8, 104, False, "cpu"), 8, 52),
         "power of two from 2 to 32768, or K"),
        (lambda: ops.hadamard(x, 128), "does not divide"),
        (lambda: ops.hadamard(x, 16, torch.ones(64)), "signs must be Char"),
        (lambda: ops.hadamard(x, 16, torch.ones(32, dtype=torch.int8)), "signs must have shape"),
        (lambda: ops.nearest_codeword_2d(torch.randn(5, 3), torch.randn(4, 2)), "points must have shape"),
        (lambda: ops.nearest_codeword_2d(torch.randn(5, 2), torch.randn(5000, 2)), "K <= 4096"),
        (lambda: ops.nearest_codeword_2d(torch.randn(5, 2).double(), torch.randn(4, 2)), "points must be Float"),
        (lambda: ops.pack_bits(torch.tensor([[0, 16]], dtype=torch.int32), 4), "codes must lie in"),
        (lambda: ops.pack_bits(torch.tensor([[-1]], dtype=torch.int32), 4), "codes must lie in"),
        (lambda: ops.pack_bits(torch.zeros(1, 4, dtype=torch.int32), 17), "bits must be"),
        (lambda: ops.unpack_bits(torch.zeros(1, 3, dtype=torch.int32), 4, 8), "must hold 4"),
        (lambda: ops.qamw_gemv(torch.randn(2, 32), *w, 8, 64), "does not divide"),
        (lambda: ops.qamw_gemv(x, *w, 7, 64), "codebook must have shape"),
        (lambda: ops.qamw_gemv(x, *w, 12, 64), "packed must have"),
        (lambda: ops.qamw_gemv(x, *w, 3, 64), "bits must be from 4 to 12"),
        (lambda: ops.qamw_gemv(x, w[0], torch.randn(128, 2), *w[2:], 8, 64), "codebook must have shape"),
        (lambda: ops.qamw_gemv(x, w[0], w[1], torch.rand(7), *w[3:], 8, 64), "row_scale must have shape"),
        (lambda: ops.qamw_gemv(x, *w[:3], torch.rand(63), w[4], 8, 64), "channel_scale must have shape"),
        (lambda: ops.aaac_gemv(x, ops.pack_bits(torch.zeros(4, 64, dtype=torch.int32), 4),
                               torch.ones(4, 4), torch.randn(2, 16), None, None, 16), "float16 or float8"),
        (lambda: ops.aaac_gemv(x, ops.pack_bits(torch.zeros(4, 64, dtype=torch.int32), 4),
                               torch.ones(4, 2).half(), torch.randn(2, 16), None, None, 24), "group_size"),
        (lambda: ops.aaac_gemv(x, ops.pack_bits(torch.zeros(4, 64, dtype=torch.int32), 4),
                               torch.ones(4, 4).half(), torch.randn(3, 16), None, None, 16), "codebooks must"),
        # fused weights: row counts, and one per-layer parameter per sibling
        (lambda: ops.qamw_gemv(x, *w, 8, 64, [5, 4]), r"sibling_rows \[5, 4\] add up to 9 but the weight has 8"),
        (lambda: ops.qamw_gemv(x, *w, 8, 64, [0, 8]), "sibling_rows must be positive"),
        (lambda: ops.qamw_gemv(x, *w, 8, 64, [1, 1, 1, 1, 4]), "sibling_rows must list 1 to 4"),
        (lambda: ops.qamw_gemv(x, *w, 8, 64, [4, 4]), r"channel_scale must have shape \[2, 64\] \(one per sibling\)"),
        (lambda: ops.qamw_gemv(x, *w[:3], torch.rand(3, 64), w[4], 8, 64, [4, 4]), "channel_scale must have shape"),
        (lambda: ops.aaac_gemv(x, ops.pack_bits(torch.zeros(4, 64, dtype=torch.int32), 4),
                               torch.ones(4, 4).half(), torch.randn(2, 16), None, None, 16, [2, 2]),
         r"codebooks must have shape \[2, 2, 16\] \(one per sibling\)"),
        (lambda: ops.aaac_gemv(x, ops.pack_bits(torch.zeros(4, 64, dtype=torch.int32), 4),
                               torch.ones(4, 4).half(), torch.randn(2, 2, 16), torch.ones(1), None,
                               16, [2, 2]), "tensor_scale must hold one value per sibling"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call()


def test_public_api_exports_every_op():
    for name in ["hadamard", "nearest_codeword_2d", "nearest_codeword_1d", "pack_bits",
                 "unpack_bits", "qamw_gemv", "qamw_dequantize", "aaac_gemv", "aaac_dequantize"]:
        assert getattr(qamw_ext, name) is getattr(ops, name)


def test_reference_computes_on_its_inputs_device():
    """The reference builds its helper tensors (bit weights, H_K) on the inputs' device, so the
    GPU tests can compare against it: on the meta device any CPU tensor would raise."""
    meta = torch.device("meta")
    n, bits = 576, 7
    assert reference.hadamard(torch.empty(3, n, device=meta), n).device == meta
    codes = torch.empty(4, n // 2, dtype=torch.int32, device=meta)
    packed = reference.pack_bits(codes, bits)
    assert reference.unpack_bits(packed, bits, n // 2).device == meta
    w = reference.qamw_dequantize(packed, torch.empty(1 << bits, 2, device=meta),
                                  torch.empty(4, device=meta), torch.empty(n, device=meta),
                                  torch.empty(n, dtype=torch.int8, device=meta), bits, n, n)
    assert w.device == meta
    for nearest, points, book in [(reference.nearest_codeword_2d, (0, 2), (16, 2)),
                                  (reference.nearest_codeword_1d, (0,), (16,))]:
        assert nearest(torch.empty(points, device=meta),
                       torch.empty(book, device=meta)).device == meta
