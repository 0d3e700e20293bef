"""Pure-PyTorch reference of every op: the executable specification.

Each function here has the same signature and meaning as its op in `qamw_ext.ops`; the C++
and CUDA kernels are tested against these on random inputs. Weights are built in fp64 so
that a test can measure the kernels' own rounding error.
"""
import math

import torch

from . import hadamard_matrices


def hadamard(x, block_size, signs=None, inverse=False):
    """Orthonormal Hadamard transform of consecutive blocks of `block_size` along the last
    dimension. A block of K * 2^m (K = 1 or a tabulated order, see hadamard_matrices) is
    H_K (x) H_{2^m} / sqrt(block), H_{2^m} the Sylvester matrix. Forward: H (signs * x);
    inverse: signs * (H^T x). Computed in fp64, returned in x's dtype."""
    order, pow2 = hadamard_matrices.split_block(block_size)
    n = x.shape[-1]
    y = x.to(torch.float64)
    if signs is not None and not inverse:
        y = y * signs.to(torch.float64)
    lead = y.shape[:-1]
    y = y.reshape(-1, pow2)
    h = 1
    while h < pow2:
        y = y.view(-1, pow2 // (2 * h), 2, h)
        y = torch.stack((y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]), dim=2)
        h *= 2
    y = y.reshape(-1, order, pow2)
    if order > 1:
        hk = hadamard_matrices.matrix(order).to(device=y.device, dtype=torch.float64)
        y = torch.einsum("ab,rbj->raj", hk.T if inverse else hk, y)
    y = y.reshape(*lead, n) / math.sqrt(block_size)
    if signs is not None and inverse:
        y = y * signs.to(torch.float64)
    return y.to(x.dtype)


def _squared_distances(points, codebook):
    return ((points.unsqueeze(-2) - codebook) ** 2).sum(-1)


def nearest_codeword_2d(points, codebook, chunk=1 << 14):
    """Index (int32) of the codeword nearest each 2-D point, ties to the lowest index.
    points: (..., 2) fp32; codebook: (K, 2) fp32. Brute force over K."""
    flat = points.reshape(-1, 2)
    out = [torch.argmin(_squared_distances(flat[i:i + chunk], codebook), dim=-1)
           for i in range(0, flat.shape[0], chunk)]
    idx = torch.cat(out) if out else torch.empty(0, dtype=torch.int64, device=points.device)
    return idx.to(torch.int32).reshape(points.shape[:-1])


def nearest_codeword_1d(values, codebook, chunk=1 << 14):
    """Index (int32) of the codebook value nearest each value, ties to the lowest index."""
    flat = values.reshape(-1)
    out = [torch.argmin((flat[i:i + chunk, None] - codebook).abs(), dim=-1)
           for i in range(0, flat.shape[0], chunk)]
    idx = torch.cat(out) if out else torch.empty(0, dtype=torch.int64, device=values.device)
    return idx.to(torch.int32).reshape(values.shape)


def packed_words_per_row(count, bits):
    """int32 words per packed row: rows are padded to whole 16-byte vectors."""
    return 4 * ((count * bits + 127) // 128)


def pack_bits(codes, bits):
    """Pack int32 codes (..., count) of `bits` bits into int32 words (..., words): one
    LSB-first bit stream per row, code k at bits [k*bits, (k+1)*bits), zero padded."""
    count = codes.shape[-1]
    words = packed_words_per_row(count, bits)
    if count == 0:
        return codes.new_zeros((*codes.shape[:-1], 0))
    rows = codes.reshape(-1, count).to(torch.int64)
    bit = torch.arange(32, dtype=torch.int64, device=codes.device)
    stream = ((rows.unsqueeze(-1) >> bit[:bits]) & 1).reshape(rows.shape[0], count * bits)
    stream = torch.nn.functional.pad(stream, (0, words * 32 - count * bits))
    value = (stream.view(rows.shape[0], words, 32) << bit).sum(-1)
    value = torch.where(value >= 2**31, value - 2**32, value)  # two's complement int32
    return value.to(torch.int32).reshape(*codes.shape[:-1], words)


def unpack_bits(packed, bits, count):
    """Inverse of pack_bits: (..., words) int32 -> (..., count) int32 codes."""
    words = packed.shape[-1]
    if count == 0:
        return packed.new_zeros((*packed.shape[:-1], 0))
    rows = packed.reshape(-1, words).to(torch.int64) & 0xFFFFFFFF
    bit = torch.arange(32, dtype=torch.int64, device=packed.device)
    stream = ((rows.unsqueeze(-1) >> bit) & 1).reshape(rows.shape[0], words * 32)
    stream = stream[:, :count * bits].reshape(rows.shape[0], count, bits)
    codes = (stream << bit[:bits]).sum(-1)
    return codes.to(torch.int32).reshape(*packed.shape[:-1], count)


def per_row(param, sibling_rows):
    """A per-layer parameter of a fused weight, (siblings, ...), as one per row (m, ...): each
    sibling's for its rows. Without sibling_rows, param itself (it broadcasts)."""
    if sibling_rows is None:
        return param
    return param.repeat_interleave(torch.tensor(sibling_rows, device=param.device), dim=0)


def qamw_dequantize(packed, codebook, row_scale, channel_scale, signs, bits, block_size,
                    in_features, dtype=torch.float32, sibling_rows=None):
    """Dense (m, n) weight of a QAM-W layer: W = diag(row_scale) C H diag(signs) diag(1/s).
    row_scale is (m,) or (m, n / block_size): one scale per row or per row and block.
    sibling_rows (a fused weight): channel_scale is (len(sibling_rows), n), each sibling's
    for its rows."""
    m, n = packed.shape[0], in_features
    codes = unpack_bits(packed, bits, n // 2).to(torch.int64)
    rotated = codebook.to(torch.float64)[codes].reshape(m, n)
    scale = row_scale.to(torch.float64)
    scale = scale[:, None] if scale.dim() == 1 else scale
    segment = n // scale.shape[1]
    rotated = (rotated.view(m, scale.shape[1], segment) * scale.unsqueeze(-1)).reshape(m, n)
    w = hadamard(rotated, block_size, signs, inverse=True)
    if channel_scale is not None:
        w = w / per_row(channel_scale.to(torch.float64), sibling_rows)
    return w.to(dtype)


def qamw_gemv(x, packed, codebook, row_scale, channel_scale, signs, bits, block_size,
              sibling_rows=None):
    """y = x W^T for the QAM-W weight W (see qamw_dequantize), in fp64, returned in x's dtype."""
    w = qamw_dequantize(packed, codebook, row_scale, channel_scale, signs, bits, block_size,
                        x.shape[-1], torch.float64, sibling_rows)
    return (x.to(torch.float64) @ w.T).to(x.dtype)


def decode_scales(scales):
    """(magnitude fp64, codebook choice int64) of AAAC group scales: the sign bit picks the
    codebook (so -0.0 picks codebook 1), the rest is the magnitude."""
    if scales.dtype == torch.float16:
        bits = scales.view(torch.int16).to(torch.int64) & 0xFFFF
        choice = bits >> 15
    elif scales.dtype == torch.float8_e4m3fn:
        bits = scales.view(torch.uint8).to(torch.int64)
        choice = bits >> 7
    else:
        raise ValueError(f"scales must be float16 or float8_e4m3fn, got {scales.dtype}")
    return scales.to(torch.float64).abs(), choice


def aaac_dequantize(packed, scales, codebooks, tensor_scale, channel_scale, group_size,
                    dtype=torch.float32, sibling_rows=None):
    """Dense (m, n) AAAC weight: w = tensor_scale * |scale| * codebooks[sign bit][code],
    divided by channel_scale when given. sibling_rows (a fused weight): codebooks,
    tensor_scale and channel_scale have one per sibling, each for its rows."""
    m, groups = scales.shape
    n = groups * group_size
    codes = unpack_bits(packed, 4, n).to(torch.int64).view(m, groups, group_size)
    magnitude, choice = decode_scales(scales)
    books = codebooks.to(torch.float64)
    if sibling_rows is None:
        table = books[choice]                                   # (m, groups, 16)
    else:
        rows = torch.arange(m, device=packed.device).unsqueeze(1)
        table = per_row(books, sibling_rows)[rows, choice]
    w = torch.gather(table, 2, codes) * magnitude.unsqueeze(-1)
    w = w.reshape(m, n)
    if tensor_scale is not None:
        w = w * per_row(tensor_scale.to(torch.float64).reshape(-1), sibling_rows).reshape(-1, 1)
    if channel_scale is not None:
        w = w / per_row(channel_scale.to(torch.float64), sibling_rows)
    return w.to(dtype)


def aaac_gemv(x, packed, scales, codebooks, tensor_scale, channel_scale, group_size,
              sibling_rows=None):
    w = aaac_dequantize(packed, scales, codebooks, tensor_scale, channel_scale, group_size,
                        torch.float64, sibling_rows)
    return (x.to(torch.float64) @ w.T).to(x.dtype)
