"""Scalar baselines with the QuantizedLinear interface: round-to-nearest INT4 and NF4.

Both keep 4-bit codes packed with `ops.pack_bits`. Their `gemv` is dequantize + F.linear:
they exist to be compared against, not to be fast (the extension has no fused kernel
for them).

`rtn`: asymmetric INT4, groups of `group_size` (default 128) along the input dimension,
    w = (q - zero) * scale with fp16 scales and 4-bit zero points; the range always
    includes 0 (as in GPTQ's quantizer), so a constant group is exact.
`rtn` with error_feedback=True is GPTQ (Frantar et al., 2022) on the same format: the
    columns are rounded left to right, each group's scale and zero point fixed from the
    weights as they stand when rounding reaches the group, and each column's rounding error
    pushed onto the columns not yet rounded through the Cholesky factor of H^-1 (H = X^T X
    from calibration, damped by 1 % of its mean diagonal). Named config "gptq-int4-g128".
`nf4`: NormalFloat4 (QLoRA's 16 levels) with one fp16 absmax scale per group of
    `group_size` (default 64).

When the group size does not divide in_features the last group of each row is shorter:
its codes are stored for the real columns only, so nothing is spent on padding.

This module also holds the input checks and storage accounting shared by every codec.
"""
import math

import torch
import torch.nn.functional as F

from . import ops
from .codebooks import nf4_levels
from .quantized_linear import LayerStats, QuantizedLinear, register_codec

SEED_BITS = 64  # a stored 64-bit seed, e.g. QAM-W's sign seed
EF_DAMP = 0.01    # error feedback: damping of H, a fraction of its mean diagonal
EF_BLOCK = 128    # error feedback: columns per lazy update


# ---------------------------------------------------------------- shared checks and helpers

def validate_weight(weight):
    """The fp32 (m, n) copy of a linear weight, or ValueError naming what is wrong."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D tensor, got "
                         f"{getattr(weight, 'shape', type(weight))}")
    if not weight.is_floating_point():
        raise ValueError(f"weight must be floating point, got {weight.dtype}")
    m, n = weight.shape
    if m == 0 or n == 0:
        raise ValueError(f"weight is empty (shape {tuple(weight.shape)}): nothing to quantize")
    w = weight.detach().to(torch.float32)
    if not torch.isfinite(w).all():
        bad = (~torch.isfinite(w)).sum().item()
        raise ValueError(f"weight has {bad} NaN or Inf entries; quantization needs finite weights")
    return w.contiguous()


def validate_stats(stats, n):
    """Check LayerStats against in_features n (None is allowed: no calibration)."""
    if stats is None:
        return None
    if not isinstance(stats, LayerStats):
        raise ValueError(f"stats must be LayerStats or None, got {type(stats).__name__}")
    for name in ("mean_abs", "mean_sq"):
        t = getattr(stats, name)
        if t is None or t.dim() != 1 or t.shape[0] != n:
            raise ValueError(f"stats.{name} must have shape ({n},) to match in_features={n}, "
                             f"got {None if t is None else tuple(t.shape)}")
        if not torch.isfinite(t).all() or (t < 0).any():
            raise ValueError(f"stats.{name} must be finite and non-negative")
    s = stats.sample
    if s is not None and (s.dim() != 2 or s.shape[1] != n):
        raise ValueError(f"stats.sample must have shape (rows, {n}) to match in_features={n}, "
                         f"got {tuple(s.shape)}")
    if s is not None and not torch.isfinite(s).all():
        raise ValueError("stats.sample has NaN or Inf entries")
    return stats


def linear_parts(linear):
    """(validated fp32 weight, bias or None) of an nn.Linear-like module."""
    weight = getattr(linear, "weight", None)
    if weight is None:
        raise ValueError(f"expected a linear layer with a weight, got {type(linear).__name__}")
    w = validate_weight(weight)
    bias = getattr(linear, "bias", None)
    return w, (None if bias is None else bias.detach().to(torch.float32).clone())


def storage_bits(module, extra_bits=0):
    """Bits held by the module's persistent buffers (bias excluded) plus extra_bits: the
    exact storage of a quantized layer, padding included."""
    names = set(module.state_dict().keys())
    total = extra_bits
    for name, buf in module.named_buffers():
        if name == "bias" or name not in names or buf is None:
            continue
        total += buf.numel() * buf.element_size() * 8
    return total


def check_hessian(stats, n):
    """Raise unless stats carries a finite (n, n) hessian (needed by error feedback)."""
    h = None if stats is None else stats.hessian
    if h is None:
        raise ValueError("error_feedback needs calibration statistics with a hessian "
                         "(X^T X / N): calibrate with hessian=True")
    if h.dim() != 2 or tuple(h.shape) != (n, n):
        raise ValueError(f"stats.hessian must have shape ({n}, {n}) to match in_features={n}, "
                         f"got {tuple(h.shape)}")
    if not torch.isfinite(h).all():
        raise ValueError("stats.hessian has NaN or Inf entries")


def check_flag(name, value):
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


class one_cpu_thread:
    """Torch on one thread for the block: quantizing a layer runs many small ops (thousands
    in the error-feedback pair loop), and on a busy machine waking a second thread for each
    costs up to 40x the work itself."""

    def __init__(self, device):
        self.active = torch.device(device).type == "cpu"

    def __enter__(self):
        if self.active:
            self.before = torch.get_num_threads()
            torch.set_num_threads(1)

    def __exit__(self, *exc):
        if self.active:
            torch.set_num_threads(self.before)


def inverse_hessian_factor(h, damp=EF_DAMP):
    """Upper Cholesky factor U (fp64) of (H + damp * mean(diag H) * I)^-1: row i of U,
    divided by U_ii, is how rounding column i moves the columns after it (GPTQ)."""
    h = h.to(torch.float64)
    mean_diag = h.diagonal().mean()
    h = h + (damp * mean_diag if mean_diag > 0 else 1.0) * torch.eye(
        h.shape[0], dtype=h.dtype, device=h.device)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


def round_columns_with_feedback(w, h, round_column, block=EF_BLOCK):
    """GPTQ's loop: the columns of a copy of w (m, n) rounded left to right, each column's
    rounding error pushed onto the columns not yet rounded through the factor of
    inverse_hessian_factor(h), lazily in blocks of `block` columns. round_column(work, col)
    rounds column col of the working copy (whose columns up to the end of the current block
    are up to date) and returns its rounded values (m,); it records the codes itself."""
    n = w.shape[1]
    u = inverse_hessian_factor(h).to(torch.float32)
    w = w.clone()
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        blk = w[:, i1:i2]
        err = torch.empty_like(blk)
        for j in range(i2 - i1):
            col = i1 + j
            e = (blk[:, j] - round_column(w, col)) / u[col, col]
            blk[:, j + 1:] -= e.unsqueeze(1) * u[col, col + 1:i2]
            err[:, j] = e
        w[:, i2:] -= err @ u[i1:i2, i2:]


def check_meta(cls, meta):
    if meta.get("method") != cls.method:
        raise ValueError(f"meta is for method {meta.get('method')!r}, not {cls.method!r}")
    for key in ("in_features", "out_features", "bias"):
        if key not in meta:
            raise ValueError(f"meta lacks {key!r}")


def _check_group(group_size):
    if not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size must be an integer >= 2, got {group_size!r}")


def _grouped(w, group_size):
    """(m, groups, group_size) view of w, the last partial group padded by repeating each
    row's last value (that changes neither min, max nor absmax of the group)."""
    m, n = w.shape
    groups = math.ceil(n / group_size)
    pad = groups * group_size - n
    if pad:
        w = torch.cat([w, w[:, -1:].expand(m, pad)], dim=1)
    return w.view(m, groups, group_size)


class _Scalar4Bit(QuantizedLinear):
    """4-bit codes, one code per weight, packed per row with ops.pack_bits."""
    default_group = None

    def __init__(self, in_features, out_features, has_bias, group_size):
        super().__init__(in_features, out_features, has_bias)
        _check_group(group_size)
        self.group_size = group_size
        self.groups = math.ceil(in_features / group_size)
        words = 4 * ((in_features * 4 + 127) // 128)
        self.register_buffer("packed", torch.zeros(out_features, words, dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(out_features, self.groups, dtype=torch.float16))

    @classmethod
    def from_meta(cls, meta):
        check_meta(cls, meta)
        return cls(meta["in_features"], meta["out_features"], meta["bias"],
                   meta.get("group_size", cls.default_group))

    def meta(self):
        return {"method": self.method, "in_features": self.in_features,
                "out_features": self.out_features, "bias": self.bias is not None,
                "group_size": self.group_size}

    def _codes(self):
        """(m, groups, group_size) int64 codes, the padded tail codes set to 0."""
        m, n, g = self.out_features, self.in_features, self.group_size
        codes = ops.unpack_bits(self.packed, 4, n).to(torch.int64)
        pad = self.groups * g - n
        if pad:
            codes = F.pad(codes, (0, pad))
        return codes.view(m, self.groups, g)

    def gemv(self, x2d):
        # No fused kernel for the baselines: dequantize, then a dense matmul.
        return F.linear(x2d, self.dequantize(x2d.dtype))

    def bits_per_weight(self):
        return storage_bits(self) / (self.out_features * self.in_features)


# ---------------------------------------------------------------- RTN INT4 (asymmetric)

def _asym_int4(wg):
    """(fp16 scale, fp32 zero point in [0, 15]) of asymmetric INT4 groups wg (..., g); the
    range always includes 0."""
    lo = wg.amin(-1).clamp(max=0)
    hi = wg.amax(-1).clamp(min=0)
    flat = (hi - lo) == 0
    lo, hi = torch.where(flat, -1.0, lo), torch.where(flat, 1.0, hi)
    # Codes are rounded against the scale as it will be stored (fp16).
    scale = ((hi - lo) / 15).to(torch.float16).clamp(min=torch.finfo(torch.float16).tiny)
    zero = torch.round(-lo / scale.to(torch.float32)).clamp(0, 15)
    return scale, zero


def _round_int4(w, scale, zero):
    """int32 codes of w (..., g) for scale and zero of shape (...)."""
    s = scale.to(torch.float32).unsqueeze(-1)
    return torch.round(w / s + zero.unsqueeze(-1)).clamp(0, 15).to(torch.int32)


def _gptq(w, h, group_size):
    """GPTQ rounding of w (m, n) to asymmetric INT4 groups: (codes (m, n) int32, scales
    (m, groups) fp16, zeros (m, groups) fp32)."""
    m, n = w.shape
    groups = math.ceil(n / group_size)
    codes = torch.empty(m, n, dtype=torch.int32, device=w.device)
    scales = torch.empty(m, groups, dtype=torch.float16, device=w.device)
    zeros = torch.empty(m, groups, dtype=torch.float32, device=w.device)
    group = {}

    def round_column(work, col):
        if col % group_size == 0:
            g = col // group_size
            scales[:, g], zeros[:, g] = _asym_int4(work[:, col:min(col + group_size, n)])
            group["s"], group["z"] = scales[:, g].to(torch.float32), zeros[:, g]
        s, z = group["s"], group["z"]
        q = torch.round(work[:, col] / s + z).clamp(0, 15)
        codes[:, col] = q.to(torch.int32)
        return (q - z) * s

    # Lazy blocks hold whole groups, so a group's columns are up to date when it starts.
    round_columns_with_feedback(w, h, round_column,
                                block=group_size * max(1, EF_BLOCK // group_size))
    return codes, scales, zeros


@register_codec("rtn")
class RTNLinear(_Scalar4Bit):
    """Round-to-nearest asymmetric INT4, fp16 scale and 4-bit zero point per group.
    Options: group_size (default 128)."""
    default_group = 128

    def __init__(self, in_features, out_features, has_bias, group_size=128):
        super().__init__(in_features, out_features, has_bias, group_size)
        # Zero points: one flat 4-bit stream for the whole layer (no per-row padding).
        zwords = 4 * ((out_features * self.groups * 4 + 127) // 128)
        self.register_buffer("zeros", torch.zeros(1, zwords, dtype=torch.int32))

    @classmethod
    def from_linear(cls, linear, stats=None, group_size=128, error_feedback=False):
        w, bias = linear_parts(linear)
        m, n = w.shape
        validate_stats(stats, n)
        check_flag("error_feedback", error_feedback)
        layer = cls(n, m, bias is not None, group_size)
        if error_feedback:
            check_hessian(stats, n)
            with one_cpu_thread(w.device):
                codes, scale, zero = _gptq(w, stats.hessian.to(w.device), group_size)
        else:
            wg = _grouped(w, group_size)
            scale, zero = _asym_int4(wg)
            codes = _round_int4(wg, scale, zero).reshape(m, -1)[:, :n].contiguous()
        layer.packed.copy_(ops.pack_bits(codes, 4))
        layer.scales.copy_(scale)
        layer.zeros.copy_(ops.pack_bits(zero.to(torch.int32).reshape(1, -1), 4))
        if bias is not None:
            layer.bias.copy_(bias)
        return layer

    def dequantize(self, dtype=torch.float32):
        m, n = self.out_features, self.in_features
        zero = ops.unpack_bits(self.zeros, 4, m * self.groups).view(m, self.groups, 1)
        w = (self._codes() - zero).to(torch.float32) * self.scales.to(torch.float32).unsqueeze(-1)
        return w.reshape(m, -1)[:, :n].to(dtype)


# ---------------------------------------------------------------- NF4

@register_codec("nf4")
class NF4Linear(_Scalar4Bit):
    """NormalFloat4 levels times an fp16 absmax scale per group. Options: group_size
    (default 64)."""
    default_group = 64

    def __init__(self, in_features, out_features, has_bias, group_size=64):
        super().__init__(in_features, out_features, has_bias, group_size)
        self.register_buffer("levels", nf4_levels(), persistent=False)

    @classmethod
    def from_linear(cls, linear, stats=None, group_size=64):
        w, bias = linear_parts(linear)
        m, n = w.shape
        validate_stats(stats, n)
        layer = cls(n, m, bias is not None, group_size)
        wg = _grouped(w, group_size)
        absmax = wg.abs().amax(-1)
        scale = absmax.to(torch.float16)
        # A zero group has scale 0; divide by 1 there (its codes then pick the level 0).
        s = torch.where(scale == 0, 1.0, scale.to(torch.float32))
        codes = ops.nearest_codeword_1d((wg / s.unsqueeze(-1)).contiguous(), layer.levels)
        codes = codes.reshape(m, -1)[:, :n].contiguous()
        layer.packed.copy_(ops.pack_bits(codes, 4))
        layer.scales.copy_(scale)
        if bias is not None:
            layer.bias.copy_(bias)
        return layer

    def dequantize(self, dtype=torch.float32):
        m, n = self.out_features, self.in_features
        levels = self.levels.to(self.packed.device)
        w = levels[self._codes()] * self.scales.to(torch.float32).unsqueeze(-1)
        return w.reshape(m, -1)[:, :n].to(dtype)
