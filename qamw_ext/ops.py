"""The extension's ops, one function each, with fake (meta) implementations so that
`torch.compile(fullgraph=True)` traces them. Argument checks live in the C++ wrappers;
`qamw_ext.reference` holds a pure-PyTorch version of each op with the same signature."""
import torch

from . import _C  # noqa: F401  (registers torch.ops.qamw_ext)

_ops = torch.ops.qamw_ext


def hadamard(x, block_size, signs=None, inverse=False):
    """Orthonormal block Hadamard transform of x's last dimension in blocks of `block_size`
    dividing it: a power of two from 2 to 32768 (Walsh-Hadamard, Sylvester order), or
    K * 2^m up to 32768 with K in hadamard_matrices.ORDERS (12, 20, 28, 36, 44, 60), whose
    matrix is H_K (x) H_{2^m} / sqrt(block_size) (576 = 36 * 16, 1536 = 12 * 128).
    Forward: H (signs * x); inverse: signs * (H^T x) (H_K is not symmetric for every K).
    signs: optional int8 vector of +-1. fp32, fp16 or bf16."""
    return _ops.hadamard(x, block_size, signs, inverse)


def nearest_codeword_2d(points, codebook):
    """int32 index of the nearest codeword (ties: lowest index) for fp32 points (..., 2)
    in an fp32 codebook (K, 2), K <= 4096."""
    return _ops.nearest_codeword_2d(points, codebook)


def nearest_codeword_1d(values, codebook):
    """int32 index of the nearest value (ties: lowest index) in an fp32 codebook (K,)."""
    return _ops.nearest_codeword_1d(values, codebook)


def pack_bits(codes, bits):
    """Pack int32 codes (..., count) in [0, 2^bits) into int32 words (see csrc/kernels.h
    for the layout)."""
    return _ops.pack_bits(codes, bits)


def unpack_bits(packed, bits, count):
    return _ops.unpack_bits(packed, bits, count)


def qamw_gemv(x, packed, codebook, row_scale, channel_scale, signs, bits, block_size,
              sibling_rows=None):
    """y = x W^T for a QAM-W weight (see qamw_dequantize), x of shape (batch, n): the
    activation is rotated once (H of `hadamard`), never the weight. On CUDA with fp16 / bf16
    activations the kernel holds the codewords in fp16 (at most 2^-11 relative change, the
    output's own rounding), so codebook entries must lie within fp16's range.
    sibling_rows: a fused weight (qamw_ext.fusion), the row counts of the up to 4 layers it
    holds; channel_scale then has one row per layer, (len(sibling_rows), n), and each layer's
    rows compute exactly what its own weight would, in one launch."""
    return _ops.qamw_gemv(x, packed, codebook, row_scale, channel_scale, signs, bits, block_size,
                          sibling_rows)


def qamw_dequantize(packed, codebook, row_scale, channel_scale, signs, bits, block_size,
                    in_features, dtype=torch.float32, sibling_rows=None):
    """Dense weight W = diag(row_scale) C H diag(signs) diag(1 / channel_scale), H the block
    Hadamard matrix of `hadamard` with blocks of block_size (2^m or K * 2^m dividing
    in_features); row_scale is (m,) or (m, in_features / block_size). sibling_rows: as in
    qamw_gemv."""
    return _ops.qamw_dequantize(packed, codebook, row_scale, channel_scale, signs, bits,
                                block_size, in_features, dtype, sibling_rows)


def aaac_gemv(x, packed, scales, codebooks, tensor_scale, channel_scale, group_size,
              sibling_rows=None):
    """y = x W^T for an AAAC weight (see aaac_dequantize), x of shape (batch, n).
    sibling_rows: a fused weight, as in qamw_gemv; codebooks (len(sibling_rows), 2, 16),
    tensor_scale and channel_scale then have one per layer as well."""
    return _ops.aaac_gemv(x, packed, scales, codebooks, tensor_scale, channel_scale, group_size,
                          sibling_rows)


def aaac_dequantize(packed, scales, codebooks, tensor_scale, channel_scale, group_size,
                    dtype=torch.float32, sibling_rows=None):
    """Dense weight w = tensor_scale * |scale| * codebooks[sign bit of scale][code] / s.
    sibling_rows: as in aaac_gemv."""
    return _ops.aaac_dequantize(packed, scales, codebooks, tensor_scale, channel_scale,
                                group_size, dtype, sibling_rows)


def _words(count, bits):
    return 4 * ((count * bits + 127) // 128)


@torch.library.register_fake("qamw_ext::hadamard")
def _(x, block_size, signs=None, inverse=False):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("qamw_ext::nearest_codeword_2d")
def _(points, codebook):
    return points.new_empty(points.shape[:-1], dtype=torch.int32)


@torch.library.register_fake("qamw_ext::nearest_codeword_1d")
def _(values, codebook):
    return values.new_empty(values.shape, dtype=torch.int32)


@torch.library.register_fake("qamw_ext::pack_bits")
def _(codes, bits):
    return codes.new_empty((*codes.shape[:-1], _words(codes.shape[-1], bits)))


@torch.library.register_fake("qamw_ext::unpack_bits")
def _(packed, bits, count):
    return packed.new_empty((*packed.shape[:-1], count))


@torch.library.register_fake("qamw_ext::qamw_gemv")
def _(x, packed, codebook, row_scale, channel_scale, signs, bits, block_size, sibling_rows=None):
    return x.new_empty((x.shape[0], packed.shape[0]))


@torch.library.register_fake("qamw_ext::qamw_dequantize")
def _(packed, codebook, row_scale, channel_scale, signs, bits, block_size, in_features, dtype,
      sibling_rows=None):
    return packed.new_empty((packed.shape[0], in_features), dtype=dtype)


@torch.library.register_fake("qamw_ext::aaac_gemv")
def _(x, packed, scales, codebooks, tensor_scale, channel_scale, group_size, sibling_rows=None):
    return x.new_empty((x.shape[0], packed.shape[0]))


@torch.library.register_fake("qamw_ext::aaac_dequantize")
def _(packed, scales, codebooks, tensor_scale, channel_scale, group_size, dtype,
      sibling_rows=None):
    return packed.new_empty((packed.shape[0], scales.shape[1] * group_size), dtype=dtype)
