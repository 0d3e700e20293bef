"""Property-based tests (hypothesis) of every op against qamw_ext.reference: random shapes,
dtypes, bit widths, block and group sizes, strides and value ranges, NaN/Inf activations and
empty batches; and invalid inputs of every kind, each of which must raise an error whose
message names the problem. The cases run and invalid inputs tried are counted and printed
at the end of the run (tests/conftest.py). Examples are derandomized (the "ci" profile), so
a failure reproduces; QAMW_FUZZ_SCALE=10 runs ten times as many."""
import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qamw_ext import hadamard_matrices, ops, reference

pytestmark = pytest.mark.usefixtures("one_thread")

FLOATS = [torch.float32, torch.float16, torch.bfloat16]
SCALE = int(os.environ.get("QAMW_FUZZ_SCALE", "1"))


def examples(n):
    return settings(max_examples=n * SCALE)


# ------------------------------------------------------------------ building inputs

def generator(draw):
    return torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))


def relayout(t, how):
    """An equal tensor with other strides: `transposed` (the transpose of a transposed copy),
    `strided` (every other element of a twice-as-wide tensor) or `expanded` (the first row
    repeated through stride 0, which changes the values); else t itself."""
    if how == "transposed" and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if how == "expanded" and t.dim() == 2 and t.shape[0] > 0:
        return t[:1].expand(t.shape)
    if how in ("strided", "transposed") and t.dim() >= 1:
        wide = torch.zeros((*t.shape[:-1], 2 * t.shape[-1]), dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t


LAYOUTS = st.sampled_from(["contiguous", "transposed", "strided"])
X_LAYOUTS = st.sampled_from(["contiguous", "transposed", "strided", "expanded"])
SPECIALS = st.sampled_from([None, None, "nan", "inf", "nan+inf"])


def activations(draw, g, shape, dtype, scale):
    """randn * scale in dtype, with a few NaN / +-Inf entries when drawn."""
    x = torch.randn(shape, generator=g) * scale
    special = draw(SPECIALS)
    if special and x.numel():
        flat = x.view(-1)
        k = 1 + int(torch.randint(0, 3, (), generator=g))
        where = torch.randint(0, flat.numel(), (k,), generator=g)
        if special == "nan":
            flat[where] = float("nan")
        elif special == "inf":
            flat[where] = float("inf") * torch.sign(torch.randn(k, generator=g))
        else:
            flat[where[0]] = float("nan")
            flat[where[-1]] = -float("inf")
    return x.to(dtype)


def batch_shape(draw, limit):
    """Leading dimensions (0 to 3 of them, zeros included) of at most `limit` elements."""
    dims = draw(st.lists(st.integers(0, 12), max_size=2), label="lead")
    if not draw(st.booleans(), label="more dims"):
        return dims
    return [*dims, draw(st.integers(0, limit // max(1, math.prod(dims))), label="last lead")]


def random_signs(g, n):
    return (torch.randint(0, 2, (n,), generator=g) * 2 - 1).to(torch.int8)


def hadamard_block(draw, limit):
    """A valid Hadamard block up to `limit`: 2^e (e >= 1), or, about half the time, K * 2^e
    with K a tabulated order (e >= 0)."""
    order = draw(st.one_of(st.just(1), st.sampled_from(hadamard_matrices.ORDERS)), label="K")
    top = (limit // order).bit_length() - 1
    return order * 2 ** draw(st.integers(1 if order == 1 else 0, top), label="log2 of block / K")


def is_block(v):
    try:
        hadamard_matrices.split_block(v)
    except ValueError:
        return False
    return v <= 32768


# ------------------------------------------------------------------ comparing

def assert_matches_reference(out, ref64, dtype, rel_atol):
    """tests/test_ops.py's rule on the finite entries: error against the fp64 reference under
    twice the error of rounding the reference to `dtype`, plus rel_atol * max |reference|;
    and the same entries non-finite as in the reference rounded to `dtype` (NaN/Inf
    propagate, nothing else becomes NaN)."""
    assert out.dtype == dtype and out.shape == ref64.shape, (out.dtype, out.shape, ref64.shape)
    rounded = ref64.to(dtype)
    finite = torch.isfinite(rounded)
    assert torch.equal(torch.isfinite(out), finite), "NaN/Inf pattern differs from the reference"
    if not finite.any():
        return
    ref, got = ref64[finite], out[finite].double()
    torch_err = (rounded[finite].double() - ref).abs().max().item()
    err = (got - ref).abs().max().item()
    assert err <= 2 * torch_err + rel_atol * ref.abs().max().item() + 1e-30, (err, torch_err)


# ------------------------------------------------------------------ valid inputs

@examples(1000)
@given(st.data())
def test_hadamard(fuzz_counts, data):
    draw = data.draw
    g = generator(draw)
    block = hadamard_block(draw, 32768)
    n = block * draw(st.integers(1, max(1, 4096 // block)), label="blocks")
    lead = draw(st.lists(st.integers(0, max(0, min(5, 8192 // n))), max_size=2), label="lead")
    dtype = draw(st.sampled_from(FLOATS))
    x = activations(draw, g, (*lead, n), dtype, draw(st.sampled_from([1e-3, 1.0, 100.0])))
    x = relayout(x, draw(LAYOUTS))
    signs = random_signs(g, n) if draw(st.booleans(), label="signs") else None
    inverse = draw(st.booleans(), label="inverse")
    out = ops.hadamard(x, block, signs, inverse)
    assert_matches_reference(out, reference.hadamard(x.double(), block, signs, inverse), dtype,
                             1e-5)
    fuzz_counts["hadamard"] += 1


def codebook_2d(draw, g, K):
    kind = draw(st.sampled_from(["random", "duplicates", "lattice", "collinear", "constant"]))
    if kind == "lattice":   # small integers: exact arithmetic, so exact ties at midpoints
        side = math.ceil(math.sqrt(K))
        grid = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1)
        cb = (grid.reshape(-1, 2)[torch.randperm(side * side, generator=g)[:K]] - side // 2).float()
    else:
        cb = torch.randn(K, 2, generator=g) * draw(st.sampled_from([1e-3, 1.0, 300.0]))
        if kind == "duplicates":
            cb[torch.randint(0, K, (K // 2,), generator=g)] = cb[torch.randint(0, K, (K // 2,), generator=g)]
        elif kind == "collinear":
            cb[:, 1] = cb[0, 1]
        elif kind == "constant":
            cb[:] = cb[0]
    return kind, cb


@examples(600)
@given(st.data())
def test_nearest_codeword_2d(fuzz_counts, data):
    draw = data.draw
    g = generator(draw)
    K = draw(st.integers(1, 4096), label="K")
    kind, codebook = codebook_2d(draw, g, K)
    lead = batch_shape(draw, min(3000, 2_000_000 // K))
    count = math.prod(lead)
    spread = codebook.abs().max().item() * 1.5 + 1e-3
    points = (torch.rand(count, 2, generator=g) * 2 - 1) * spread
    if kind == "lattice":   # points on the lattice and halfway between
        points = torch.round(points * 2) / 2
    hits = min(count, 5)
    points[:hits] = codebook[torch.randint(0, K, (hits,), generator=g)]
    special = draw(SPECIALS)
    if special and count:
        points[-1, 0] = float("nan") if "nan" in special else float("inf")
    points = relayout(points.reshape(*lead, 2), draw(LAYOUTS))
    idx = ops.nearest_codeword_2d(points, codebook)
    assert idx.dtype == torch.int32 and idx.shape == tuple(lead)
    flat, idx = points.reshape(-1, 2), idx.reshape(-1)
    assert ((idx >= 0) & (idx < K)).all()
    ref = reference.nearest_codeword_2d(flat, codebook)
    finite = torch.isfinite(flat).all(-1)
    assert (idx[~finite] == 0).all()          # no codeword is nearer than another to NaN/Inf
    if kind == "lattice":
        assert torch.equal(idx, ref)          # exact ties go to the lowest index
    d = ((flat[finite, None, :].double() - codebook.double()) ** 2).sum(-1)
    chosen = d.gather(1, idx[finite].long()[:, None]).squeeze(1)
    assert torch.allclose(chosen, d.min(1).values, rtol=1e-5, atol=1e-12)
    fuzz_counts["nearest_codeword_2d"] += 1


@examples(600)
@given(st.data())
def test_nearest_codeword_1d(fuzz_counts, data):
    draw = data.draw
    g = generator(draw)
    K = draw(st.integers(1, 65536 if draw(st.booleans(), label="large K") else 300), label="K")
    kind = draw(st.sampled_from(["random", "integers", "constant"]))
    if kind == "integers":    # exact arithmetic: ties at half-integers go to the lowest index
        codebook = torch.randint(-20, 21, (K,), generator=g).float()
    else:
        codebook = torch.randn(K, generator=g) * draw(st.sampled_from([1e-3, 1.0, 300.0]))
        if kind == "constant":
            codebook[:] = codebook[0]
    lead = batch_shape(draw, min(5000, 4_000_000 // K))
    spread = codebook.abs().max().item() * 1.5 + 1e-3
    values = activations(draw, g, tuple(lead), torch.float32, spread)
    if kind == "integers":
        values = torch.round(values * 2) / 2
    values = relayout(values, draw(LAYOUTS))
    idx = ops.nearest_codeword_1d(values, codebook)
    assert idx.dtype == torch.int32 and idx.shape == values.shape
    flat, idx = values.reshape(-1), idx.reshape(-1)
    finite = torch.isfinite(flat)
    assert (idx[~finite] == 0).all()
    d = (flat[finite, None] - codebook).abs()
    assert torch.equal(d.gather(1, idx[finite].long()[:, None]).squeeze(1), d.min(1).values)
    if kind == "integers":
        assert torch.equal(idx, reference.nearest_codeword_1d(flat, codebook))
    fuzz_counts["nearest_codeword_1d"] += 1


@examples(1200)
@given(st.data())
def test_pack_unpack(fuzz_counts, data):
    draw = data.draw
    g = generator(draw)
    bits = draw(st.integers(1, 16), label="bits")
    count = draw(st.integers(0, 300), label="count")
    lead = draw(st.lists(st.integers(0, 4), max_size=2), label="lead")
    shape = (*lead, count)
    fill = draw(st.sampled_from(["random", "max", "zero"]))
    codes = torch.randint(0, 2**bits, shape, generator=g, dtype=torch.int32)
    if fill != "random":
        codes.fill_(2**bits - 1 if fill == "max" else 0)
    codes = relayout(codes, draw(LAYOUTS))
    packed = ops.pack_bits(codes, bits)
    assert torch.equal(packed, reference.pack_bits(codes, bits))
    assert torch.equal(ops.unpack_bits(relayout(packed, draw(LAYOUTS)), bits, count), codes)
    # Any words unpack, padding bits set or not.
    noise = torch.randint(-2**31, 2**31, packed.shape, generator=g, dtype=torch.int64).to(torch.int32)
    assert torch.equal(ops.unpack_bits(noise, bits, count), reference.unpack_bits(noise, bits, count))
    fuzz_counts["pack_bits/unpack_bits"] += 1


def sibling_rows(draw, m):
    """None (a plain weight), or for m >= 2 the row counts of 2 to 4 fused siblings."""
    if m < 2 or not draw(st.booleans(), label="fused siblings"):
        return None
    count = draw(st.integers(2, min(4, m)), label="siblings")
    cuts = sorted(draw(st.lists(st.integers(1, m - 1), min_size=count - 1,
                                max_size=count - 1, unique=True), label="cuts"))
    return [b - a for a, b in zip([0, *cuts], [*cuts, m])]


def per_sibling(rows):
    """The leading shape of a per-layer parameter: one per sibling, or none."""
    return (len(rows),) if rows else ()


@examples(1200)
@given(st.data())
def test_qamw(fuzz_counts, data):
    draw = data.draw
    g = generator(draw)
    bits = draw(st.integers(4, 12), label="bits")
    block = hadamard_block(draw, 2048)
    n = block * draw(st.integers(1, max(1, 2048 // block)), label="blocks")
    m = draw(st.integers(0, 24), label="m")
    batch = draw(st.integers(0, 17), label="batch")
    codes = torch.randint(0, 2**bits, (m, n // 2), generator=g, dtype=torch.int32)
    packed = relayout(reference.pack_bits(codes, bits), draw(LAYOUTS))
    codebook = torch.randn(2**bits, 2, generator=g) * draw(st.sampled_from([1e-2, 1.0, 10.0]))
    per_block = draw(st.booleans(), label="per-block row scales")
    row_scale = relayout(torch.rand((m, n // block) if per_block else (m,), generator=g) + 0.1,
                         draw(LAYOUTS))
    rows = sibling_rows(draw, m)
    channel = (torch.rand(*per_sibling(rows), n, generator=g) + 0.5
               if draw(st.booleans(), label="channel") else None)
    signs = random_signs(g, n) if draw(st.booleans(), label="signs") else None
    w = (packed, codebook, row_scale, channel, signs, bits, block)
    ref_w = reference.qamw_dequantize(*w, n, torch.float64, rows)

    out_dtype = draw(st.sampled_from(FLOATS))
    assert_matches_reference(ops.qamw_dequantize(*w, n, out_dtype, rows), ref_w, out_dtype,
                             1e-5)
    dtype = draw(st.sampled_from(FLOATS))
    x = activations(draw, g, (batch, n), dtype, draw(st.sampled_from([1e-3, 1.0, 30.0])))
    x = relayout(x, draw(X_LAYOUTS))
    assert_matches_reference(ops.qamw_gemv(x, *w, rows), x.double() @ ref_w.T, dtype, 2e-4)
    fuzz_counts["qamw_gemv/qamw_dequantize"] += 1


def aaac_scales(draw, g, m, groups, dtype):
    """Group scales of random sign (the codebook choice) and magnitude, with +-0, the
    dtype's subnormals and large values, and NaN/Inf scales when drawn."""
    magnitude = draw(st.sampled_from(["normal", "tiny", "large"]))
    size = {"normal": 1.0, "tiny": 1e-6 if dtype == torch.float16 else 3e-3,
            "large": 100.0 if dtype == torch.float16 else 400.0}[magnitude]
    s = torch.randn(m, groups, generator=g) * size
    if s.numel():
        s.view(-1)[0] = -0.0 if draw(st.booleans()) else 0.0
        special = draw(st.sampled_from([None, None, None, "nan", "inf"]))
        if special:
            s.view(-1)[-1] = float(special) if dtype == torch.float16 else float("nan")
    return s.to(dtype)


@examples(1200)
@given(st.data())
def test_aaac(fuzz_counts, data):
    draw = data.draw
    g = generator(draw)
    group = 2 ** draw(st.integers(4, 8), label="log2 group")
    groups = draw(st.integers(1, max(1, 1024 // group)), label="groups")
    n, m = group * groups, draw(st.integers(0, 20), label="m")
    batch = draw(st.integers(0, 17), label="batch")
    scale_dtype = draw(st.sampled_from([torch.float16, torch.float8_e4m3fn]))
    codes = torch.randint(0, 16, (m, n), generator=g, dtype=torch.int32)
    packed = relayout(reference.pack_bits(codes, 4), draw(LAYOUTS))
    scales = relayout(aaac_scales(draw, g, m, groups, scale_dtype), draw(LAYOUTS))
    rows = sibling_rows(draw, m)
    codebooks = torch.randn(*per_sibling(rows), 2, 16, generator=g)
    tensor_scale = draw(st.sampled_from([None, (1,), ()]))
    if tensor_scale is not None:
        tensor_scale = torch.rand(per_sibling(rows) or tensor_scale, generator=g) + 0.1
    channel = (torch.rand(*per_sibling(rows), n, generator=g) + 0.5
               if draw(st.booleans(), label="channel") else None)
    w = (packed, scales, codebooks, tensor_scale, channel, group)
    ref_w = reference.aaac_dequantize(*w, torch.float64, rows)

    out_dtype = draw(st.sampled_from(FLOATS))
    assert_matches_reference(ops.aaac_dequantize(*w, out_dtype, rows), ref_w, out_dtype, 1e-5)
    dtype = draw(st.sampled_from(FLOATS))
    x = relayout(activations(draw, g, (batch, n), dtype, draw(st.sampled_from([1e-3, 1.0]))),
                 draw(X_LAYOUTS))
    assert_matches_reference(ops.aaac_gemv(x, *w, rows), x.double() @ ref_w.T, dtype, 2e-4)
    fuzz_counts["aaac_gemv/aaac_dequantize"] += 1


# ------------------------------------------------------------------ invalid inputs
# Each case builds one invalid call (the rest of its arguments valid) and the pattern its
# error message must match. Every op raises RuntimeError (TORCH_CHECK); ValueError is
# accepted too. A crash here would take the whole pytest process down.

NOT_POW2 = st.integers(-2**40, 2**40).filter(lambda v: v <= 0 or v & (v - 1))
# Neither 2^e nor K * 2^e up to 32768 (qamw_ext.hadamard_matrices): 0, 3, 52, 12 * 2^16 ...
NOT_A_BLOCK = st.one_of(NOT_POW2, st.sampled_from([52, 104, 2**16 * 12])).filter(
    lambda v: not is_block(v))
BAD_FLOATS = st.sampled_from([torch.float64, torch.int32, torch.int64, torch.int8, torch.uint8,
                              torch.bool, torch.complex64])
BAD_BITS = st.one_of(st.integers(-2**62, 0), st.integers(17, 2**62))


def zeros(shape, dtype=torch.float32):
    return torch.zeros(shape, dtype=dtype)


def invalid_hadamard(draw):
    x, signs = torch.randn(3, 64), torch.ones(64, dtype=torch.int8)
    kind = draw(st.sampled_from(["x dtype", "x 0-d", "block not a valid size",
                                 "block out of range", "block does not divide", "signs shape",
                                 "signs dtype"]))
    if kind == "x dtype":
        return kind, lambda: ops.hadamard(zeros((3, 64), draw(BAD_FLOATS)), 16), \
            "x must be float32, float16 or bfloat16"
    if kind == "x 0-d":
        return kind, lambda: ops.hadamard(torch.tensor(1.0), 2), "at least one dimension"
    if kind == "block not a valid size":
        block = draw(NOT_A_BLOCK)
        return kind, lambda: ops.hadamard(x, block), \
            r"power of two from 2 to 32768, or K \* 2\^m up to 32768 with K one of 12, 20"
    if kind == "block out of range":
        block = draw(st.sampled_from([1, 65536, 2**20, 2**62]))
        return kind, lambda: ops.hadamard(torch.randn(1, 2 ** 16), block), \
            "power of two from 2 to 32768"
    if kind == "block does not divide":
        block = hadamard_block(draw, 1024)
        n = block // 2 * draw(st.sampled_from([1, 3, 5]))
        return kind, lambda: ops.hadamard(torch.randn(2, n), block), "does not divide"
    if kind == "signs shape":
        bad = draw(st.sampled_from([(63,), (65,), (0,), (1, 64), (2, 64)]))
        return kind, lambda: ops.hadamard(x, 16, zeros(bad, torch.int8)), "signs must have shape"
    return kind, lambda: ops.hadamard(x, 16, signs.to(draw(st.sampled_from(
        [torch.float32, torch.int32, torch.bool, torch.uint8])))), "signs must be Char"


def invalid_nearest(draw):
    kind = draw(st.sampled_from(["2d points dtype", "2d codebook dtype", "2d points shape",
                                 "2d codebook shape", "2d codebook not finite",
                                 "1d values dtype", "1d codebook dtype", "1d codebook shape",
                                 "1d codebook not finite"]))
    pts, cb2, vals, cb1 = torch.randn(10, 2), torch.randn(16, 2), torch.randn(10), torch.randn(16)
    bad_value = draw(st.sampled_from([float("nan"), float("inf"), -float("inf")]))
    other = draw(st.sampled_from([torch.float64, torch.float16, torch.bfloat16, torch.int32]))
    if kind == "2d points dtype":
        return kind, lambda: ops.nearest_codeword_2d(pts.to(other), cb2), "points must be Float"
    if kind == "2d codebook dtype":
        return kind, lambda: ops.nearest_codeword_2d(pts, cb2.to(other)), "codebook must be Float"
    if kind == "2d points shape":
        bad = draw(st.sampled_from([(), (10,), (10, 1), (10, 3), (4, 2, 5)]))
        return kind, lambda: ops.nearest_codeword_2d(zeros(bad), cb2), r"points must have shape \(\.\.\., 2\)"
    if kind == "2d codebook shape":
        bad = draw(st.sampled_from([(0, 2), (4097, 2), (16,), (16, 3), (16, 1), (2, 8, 2)]))
        return kind, lambda: ops.nearest_codeword_2d(pts, zeros(bad)), r"codebook must have shape \(K, 2\)"
    if kind == "2d codebook not finite":
        cb2[draw(st.integers(0, 15)), draw(st.integers(0, 1))] = bad_value
        return kind, lambda: ops.nearest_codeword_2d(pts, cb2), "codebook must be finite"
    if kind == "1d values dtype":
        return kind, lambda: ops.nearest_codeword_1d(vals.to(other), cb1), "values must be Float"
    if kind == "1d codebook dtype":
        return kind, lambda: ops.nearest_codeword_1d(vals, cb1.to(other)), "codebook must be Float"
    if kind == "1d codebook shape":
        bad = draw(st.sampled_from([(0,), (65537,), (16, 1), (4, 4), ()]))
        return kind, lambda: ops.nearest_codeword_1d(vals, zeros(bad)), r"codebook must have shape \(K,\)"
    cb1[draw(st.integers(0, 15))] = bad_value
    return kind, lambda: ops.nearest_codeword_1d(vals, cb1), "codebook must be finite"


def invalid_bitpack(draw):
    kind = draw(st.sampled_from(["pack bits", "pack dtype", "pack codes out of range",
                                 "pack 0-d", "pack too large", "pack row too long",
                                 "unpack bits", "unpack dtype", "unpack words", "unpack count",
                                 "unpack 0-d"]))
    bits = draw(st.integers(1, 16))
    codes = torch.randint(0, 2**bits, (3, 37), dtype=torch.int32)
    packed = ops.pack_bits(codes, bits)
    if kind == "pack bits":
        bad = draw(BAD_BITS)
        return kind, lambda: ops.pack_bits(codes, bad), "bits must be from 1 to 16"
    if kind == "pack dtype":
        dt = draw(st.sampled_from([torch.int64, torch.int16, torch.uint8, torch.float32]))
        return kind, lambda: ops.pack_bits(codes.to(dt), bits), "codes must be Int"
    if kind == "pack codes out of range":
        codes.view(-1)[draw(st.integers(0, codes.numel() - 1))] = draw(st.one_of(
            st.integers(-2**31, -1), st.integers(2**bits, 2**31 - 1)))
        return kind, lambda: ops.pack_bits(codes, bits), r"codes must lie in \[0, 2\^"
    if kind == "pack 0-d":
        return kind, lambda: ops.pack_bits(torch.tensor(1, dtype=torch.int32), bits), \
            "at least one dimension"
    if kind == "pack too large":    # 2^45 rows: their packed words exceed any address space
        huge = zeros((1, 1), torch.int32).expand(2**45, 1)
        return kind, lambda: ops.pack_bits(huge, bits), "allocate"
    if kind == "pack row too long":
        huge = zeros((1, 1), torch.int32).expand(1, 2**50)
        return kind, lambda: ops.pack_bits(huge, bits), "too long"
    if kind == "unpack bits":
        bad = draw(BAD_BITS)
        return kind, lambda: ops.unpack_bits(packed, bad, 37), "bits must be from 1 to 16"
    if kind == "unpack dtype":
        dt = draw(st.sampled_from([torch.int64, torch.int16, torch.float32]))
        return kind, lambda: ops.unpack_bits(packed.to(dt), bits, 37), "packed must be Int"
    if kind == "unpack words":
        count = draw(st.integers(0, 2000).filter(
            lambda c: reference.packed_words_per_row(c, bits) != packed.shape[-1]))
        return kind, lambda: ops.unpack_bits(packed, bits, count), r"must hold \d+ int32 words"
    if kind == "unpack count":
        count = draw(st.one_of(st.integers(-2**62, -1), st.integers(2**40 + 1, 2**62)))
        return kind, lambda: ops.unpack_bits(zeros((0, 0), torch.int32), bits, count), \
            r"count must be from 0 to 2\^40"
    return kind, lambda: ops.unpack_bits(torch.tensor(0, dtype=torch.int32), bits, 0), \
        "at least one dimension"


def qamw_parts(bits=8, m=6, n=64, block=32):
    codes = torch.randint(0, 2**bits, (m, n // 2), dtype=torch.int32)
    return dict(packed=ops.pack_bits(codes, bits), codebook=torch.randn(2**bits, 2),
                row_scale=torch.rand(m) + 0.5, channel_scale=torch.rand(n) + 0.5,
                signs=torch.ones(n, dtype=torch.int8), bits=bits, block_size=block)


def invalid_qamw(draw):
    kind = draw(st.sampled_from(["bits", "in_features", "block not a valid size",
                                 "block does not divide", "packed dtype", "packed dims",
                                 "packed words", "codebook size", "codebook dtype",
                                 "row_scale shape", "row_scale dtype", "channel_scale",
                                 "signs", "x dtype", "x dims", "x features", "out dtype"]))
    gemv = draw(st.booleans(), label="gemv")
    w, n, x, dtype = qamw_parts(), 64, torch.randn(3, 64), torch.float32
    message = None
    if kind == "bits":
        w["bits"] = draw(st.one_of(st.integers(-2**62, 3), st.integers(13, 2**62)))
        message = "bits must be from 4 to 12"
    elif kind == "in_features":
        n = draw(st.one_of(st.integers(-2**62, 1), st.integers(2**40 + 1, 2**62),
                           st.integers(1, 10**6).map(lambda v: 2 * v + 1)))
        if gemv:
            n = min(max(n, 1), 4097) | 1    # an odd width for x
            x = torch.randn(2, n)
        message = r"(x.shape\[1\]|in_features) must be even, from 2 to 2\^40"
    elif kind == "block not a valid size":
        w["block_size"] = draw(NOT_A_BLOCK)
        message = "power of two from 2 to 32768, or K"
    elif kind == "block does not divide":
        w["block_size"] = 128
        message = "does not divide"
    elif kind == "packed dtype":
        w["packed"] = w["packed"].to(draw(st.sampled_from([torch.int64, torch.float32, torch.int16])))
        message = "packed must be Int"
    elif kind == "packed dims":
        w["packed"] = w["packed"].reshape(draw(st.sampled_from([(-1,), (1, 6, -1), (2, 3, -1)])))
        message = r"packed must have shape \(out_features, words\)"
    elif kind == "packed words":
        extra = draw(st.sampled_from([-4, -1, 1, 4]))
        w["packed"] = zeros((6, w["packed"].shape[1] + extra), torch.int32)
        message = r"packed must have \d+ int32 words per row"
    elif kind == "codebook size":
        w["codebook"] = torch.randn(draw(st.sampled_from([1, 255, 257, 512, 4096])), 2)
        message = r"codebook must have shape \(2\^bits, 2\)"
    elif kind == "codebook dtype":
        w["codebook"] = w["codebook"].to(draw(st.sampled_from([torch.float64, torch.float16])))
        message = "codebook must be Float"
    elif kind == "row_scale shape":
        w["row_scale"] = torch.rand(draw(st.sampled_from([(5,), (7,), (6, 3), (6, 1, 2), (), (1, 6)])))
        message = "row_scale must have shape"
    elif kind == "row_scale dtype":
        w["row_scale"] = w["row_scale"].to(draw(st.sampled_from([torch.float64, torch.float16])))
        message = "row_scale must be Float"
    elif kind == "channel_scale":
        bad = draw(st.sampled_from([(63,), (128,), (1, 64), "dtype"]))
        w["channel_scale"] = w["channel_scale"].double() if bad == "dtype" else torch.rand(bad)
        message = "channel_scale must (be Float|have shape)"
    elif kind == "signs":
        bad = draw(st.sampled_from([(63,), (32,), (2, 64), "dtype"]))
        w["signs"] = w["signs"].float() if bad == "dtype" else zeros(bad, torch.int8)
        message = "signs must (be Char|have shape)"
    elif kind == "x dtype":
        gemv, x = True, zeros((3, 64), draw(BAD_FLOATS))
        message = "x must be float32, float16 or bfloat16"
    elif kind == "x dims":
        gemv, x = True, torch.randn(draw(st.sampled_from([(64,), (1, 3, 64)])))
        message = r"x must have shape \(batch, in_features\)"
    elif kind == "x features":
        gemv, x = True, torch.randn(2, draw(st.sampled_from([32, 96, 128])))
        message = r"packed must have \d+ int32 words per row for x.shape\[1\] = "
    else:
        gemv, dtype = False, draw(BAD_FLOATS)
        message = "dtype must be float32, float16 or bfloat16"
    args = (w["packed"], w["codebook"], w["row_scale"], w["channel_scale"], w["signs"],
            w["bits"], w["block_size"])
    if gemv:
        return kind, lambda: ops.qamw_gemv(x, *args), message
    return kind, lambda: ops.qamw_dequantize(*args, n, dtype), message


def invalid_aaac(draw):
    kind = draw(st.sampled_from(["group_size", "packed dtype", "packed dims", "packed words",
                                 "scales shape", "scales dtype", "no groups", "huge groups",
                                 "codebooks", "tensor_scale", "channel_scale", "x dtype",
                                 "x dims", "x features", "out dtype"]))
    gemv = draw(st.booleans(), label="gemv")
    m, n, group = 5, 64, 16
    w = dict(packed=ops.pack_bits(torch.randint(0, 16, (m, n), dtype=torch.int32), 4),
             scales=torch.rand(m, n // group).half(), codebooks=torch.randn(2, 16),
             tensor_scale=torch.tensor([0.5]), channel_scale=torch.rand(n) + 0.5)
    x, dtype = torch.randn(2, n), torch.float32
    if kind == "group_size":
        group = draw(st.one_of(NOT_POW2, st.sampled_from([1, 2, 8, 512, 1024])))
        message = "group_size must be a power of two from 16 to 256"
    elif kind == "packed dtype":
        w["packed"] = w["packed"].to(draw(st.sampled_from([torch.int64, torch.uint8])))
        message = "packed must be Int"
    elif kind == "packed dims":
        w["packed"] = w["packed"].reshape(-1)
        message = r"packed must have shape \(out_features, words\)"
    elif kind == "packed words":
        w["packed"] = zeros((m, draw(st.sampled_from([0, 4, 12, 16]))), torch.int32)
        message = r"packed must have 8 int32 words per row"
    elif kind == "scales shape":
        w["scales"] = torch.rand(draw(st.sampled_from([(4, 4), (6, 4), (20,), (5, 4, 1)]))).half()
        message = r"scales must have shape \(out_features, in_features / group_size\)"
    elif kind == "scales dtype":
        w["scales"] = w["scales"].to(draw(st.sampled_from(
            [torch.float32, torch.bfloat16, torch.float8_e5m2, torch.int16])))
        message = "scales must be float16 or float8_e4m3fn"
    elif kind == "no groups":
        w["scales"] = zeros((m, 0), torch.float16)
        message = r"in_features = scales.shape\[1\] \* group_size must be from 1 to 2\^40"
    elif kind == "huge groups":   # a stride-0 view: n = 2^60 * group would overflow int64
        w["scales"] = zeros((m, 1), torch.float16).expand(m, 2**60)
        message = r"in_features = scales.shape\[1\] \* group_size must be from 1 to 2\^40"
    elif kind == "codebooks":
        bad = draw(st.sampled_from([(3, 16), (2, 15), (32,), (1, 16), "dtype"]))
        w["codebooks"] = w["codebooks"].half() if bad == "dtype" else torch.randn(bad)
        message = "codebooks must (be Float|have shape)"
    elif kind == "tensor_scale":
        bad = draw(st.sampled_from([(2,), (0,), (1, 2), "dtype"]))
        w["tensor_scale"] = w["tensor_scale"].double() if bad == "dtype" else torch.rand(bad)
        message = "tensor_scale must (be Float|hold one value)"
    elif kind == "channel_scale":
        bad = draw(st.sampled_from([(63,), (65,), (1, 64), "dtype"]))
        w["channel_scale"] = w["channel_scale"].half() if bad == "dtype" else torch.rand(bad)
        message = "channel_scale must (be Float|have shape)"
    elif kind == "x dtype":
        gemv, x = True, zeros((2, n), draw(BAD_FLOATS))
        message = "x must be float32, float16 or bfloat16"
    elif kind == "x dims":
        gemv, x = True, torch.randn(draw(st.sampled_from([(n,), (1, 2, n)])))
        message = r"x must have shape \(batch, in_features\)"
    elif kind == "x features":
        gemv, x = True, torch.randn(2, draw(st.sampled_from([0, 16, 63, 65, 128])))
        message = r"x has \d+ features but the weight has 64"
    else:
        gemv, dtype = False, draw(BAD_FLOATS)
        message = "dtype must be float32, float16 or bfloat16"
    args = (w["packed"], w["scales"], w["codebooks"], w["tensor_scale"], w["channel_scale"], group)
    if gemv:
        return kind, lambda: ops.aaac_gemv(x, *args), message
    return kind, lambda: ops.aaac_dequantize(*args, dtype), message


@pytest.mark.parametrize("family", [invalid_hadamard, invalid_nearest, invalid_bitpack,
                                    invalid_qamw, invalid_aaac], ids=lambda f: f.__name__)
def test_invalid_inputs_raise_clear_errors(fuzz_counts, family):
    @examples(1000)
    @given(st.data())
    def run(data):
        kind, call, message = family(data.draw)
        with pytest.raises((RuntimeError, ValueError), match=message):
            call()
        fuzz_counts[f"invalid {family.__name__[8:]}: {kind}"] += 1

    run()
