"""AAAC: activation-aware adaptive codebooks, 4-bit scalar codes.

Weights in groups of `group_size` along the input dimension; each group has a scale and 16
4-bit codes into one of TWO 16-entry codebooks learned per layer; the choice is the sign bit
of the group's scale (a zero scale on codebook 1 is stored as -0.0), so it costs nothing.

Fitting (all vectorised over groups):
  * importance of input channel j: h_j = E[x_j^2] (of the scaled input x / s when channel
    scaling is on); uniform without statistics;
  * start: both codebooks from the base levels (INT4 style: 16 uniform levels in [-1, 1];
    NVFP4 style: the FP4 E2M1 levels); groups split by peakiness (absmax / rms): the more
    peaked half starts on codebook 1, so the two codebooks specialise;
  * rounds of (a) per group, for both codebooks and a grid of clipping ratios, the scale
    absmax * ratio / max|codebook| rounded to its storage format (fp16, or FP8 E4M3 times
    an fp32 tensor scale), the codes against that stored scale, and the pair with the
    lowest h-weighted error; (b) activation-weighted k-means update of each codebook entry:
    c = sum(h s^2 z) / sum(h s^2) over the weights z = w / s coded to it, rounded to the
    nearest bf16 value (codes and choices are then found against the codebooks as stored,
    and the tensor-core GEMV looks entries up as bf16 pairs with no low parts).
With error_feedback=True the fitted scales, choices and codebooks are kept and the codes
are re-rounded GPTQ-style (columns in order, each error pushed onto the later columns
through the Cholesky factor of H^-1, H = X^T X in the scaled coordinates).
Variants: "int4" (group 128, fp16 scales) and "nvfp4" (group 16, E4M3 scales, fp32 tensor
scale). Optional AWQ-style channel scaling (alpha searched on the calibration sample, as in
QAM-W). When group_size does not divide in_features, the largest power of two below it that
does (>= 16) is used; failing that, columns are zero-padded (x is padded at run time).
"""
import math

import torch
import torch.nn.functional as F

from . import ops
from .baselines import (check_flag, check_hessian, check_meta, linear_parts, one_cpu_thread,
                        round_columns_with_feedback, storage_bits, validate_stats)
from .codebooks import E2M1_MAGNITUDES
from .qamw import _alpha_grid, channel_scale_from_stats
from .quantized_linear import QuantizedLinear, any_layer, per_layer, register_codec

VARIANTS = {"int4": (128, torch.float16), "nvfp4": (16, torch.float8_e4m3fn)}
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)   # the final round's clipping grid
ROUND_RATIOS = (1.0, 0.9, 0.8)                      # a coarser one for the earlier rounds
ROUNDS = 4
FP8_MAX = 448.0
CHUNK = 1 << 21  # weights per chunk of the search (bounds memory)


def base_levels(variant):
    if variant == "int4":
        return torch.linspace(-1.0, 1.0, 16)
    mags = torch.tensor(E2M1_MAGNITUDES)
    # 15 distinct E2M1 values; the 16th entry (E2M1's -0) starts at the midpoint of the
    # two smallest magnitudes so that k-means can use it.
    return torch.cat([-mags.flip(0)[:-1], mags, torch.tensor([-0.25])]).sort().values


def choose_group(n, group_size):
    """(group, padded n): group_size if it divides n, else the largest power of two below
    it that divides n (>= 16), else group_size with n padded to a multiple of it."""
    if (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 16
            or group_size > 256 or group_size & (group_size - 1)):
        raise ValueError(f"group_size must be a power of two from 16 to 256, got {group_size!r}")
    g = group_size
    while g >= 16:
        if n % g == 0:
            return g, n
        g //= 2
    return group_size, -(-n // group_size) * group_size


def _store_scale(mag, choice, dtype, tensor_scale):
    """Stored scales (sign bit = codebook choice) and the magnitudes they decode to (fp32,
    tensor scale applied)."""
    if dtype == torch.float16:
        q = mag.clamp(max=65504.0).to(torch.float16)
    else:
        q = (mag / tensor_scale).clamp(max=FP8_MAX).to(torch.float8_e4m3fn)
    dec = q.to(torch.float32) * (1.0 if dtype == torch.float16 else tensor_scale)
    if choice is None:
        return None, dec
    signed = torch.where(choice.bool(), -q.to(torch.float32), q.to(torch.float32))
    # -0.0 survives the cast, so a zero scale still carries its codebook choice.
    return signed.to(dtype), dec


def bf16_values(t):
    """t with each value rounded to the nearest bf16 one (still float32)."""
    return t.bfloat16().float()


class _Fit:
    """Vectorised search and k-means for one layer: wg (m, G, g), h (G, g)."""

    def __init__(self, wg, h, variant, dtype):
        self.wg, self.h, self.dtype = wg, h, dtype
        self.absmax = wg.abs().amax(-1)                                   # (m, G)
        self.books = bf16_values(base_levels(variant).to(wg.device).repeat(2, 1))  # (2, 16)
        self.tensor_scale = 1.0

    def _update_tensor_scale(self):
        if self.dtype == torch.float16:
            return
        peak = float(self.absmax.max()) / float(self.books.abs().amax(1).min())
        self.tensor_scale = peak / FP8_MAX if peak > 0 else 1.0

    def _quantize_with(self, wg, h, absmax, k, ratio):
        book = self.books[k]
        mag = absmax * (ratio / float(book.abs().max()))
        _, s = _store_scale(mag, None, self.dtype, self.tensor_scale)
        z = wg / torch.where(s > 0, s, 1.0).unsqueeze(-1)
        codes = ops.nearest_codeword_1d(z.contiguous(), book)
        err = (h * (wg - book[codes] * s.unsqueeze(-1)).square_()).sum(-1)
        return err, s, codes

    def assign(self, ratios):
        """Best (codebook, clipping ratio) per group: choice, decoded scale, codes."""
        m, G, g = self.wg.shape
        self._update_tensor_scale()
        choice = torch.empty(m, G, dtype=torch.int64, device=self.wg.device)
        scale = torch.empty(m, G, dtype=torch.float32, device=self.wg.device)
        codes = torch.empty(m, G, g, dtype=torch.int32, device=self.wg.device)
        rows = max(1, CHUNK // (G * g))
        for r0 in range(0, m, rows):
            wg, am = self.wg[r0:r0 + rows], self.absmax[r0:r0 + rows]
            best = None
            for k in (0, 1):
                for ratio in ratios:
                    err, s, c = self._quantize_with(wg, self.h, am, k, ratio)
                    if best is None:
                        best = [err, s, c, torch.full_like(err, k, dtype=torch.int64)]
                        continue
                    better = err < best[0]
                    best[0] = torch.where(better, err, best[0])
                    best[1] = torch.where(better, s, best[1])
                    best[2] = torch.where(better.unsqueeze(-1), c, best[2])
                    best[3] = torch.where(better, k, best[3])
            codes[r0:r0 + rows], scale[r0:r0 + rows], choice[r0:r0 + rows] = \
                best[2], best[1], best[3]
        return choice, scale, codes

    def kmeans_update(self, choice, scale, codes):
        """Activation-weighted centroid of every (codebook, entry) cell."""
        s = scale.unsqueeze(-1)
        z = self.wg / torch.where(s > 0, s, 1.0)
        weight = (self.h * s * s).expand_as(z)
        index = (choice.unsqueeze(-1) * 16 + codes.long()).reshape(-1)
        den = torch.bincount(index, weights=weight.reshape(-1).double(), minlength=32)
        num = torch.bincount(index, weights=(weight * z).reshape(-1).double(), minlength=32)
        new = torch.where(den > 0, num / den.clamp(min=1e-300), self.books.reshape(-1).double())
        self.books = bf16_values(new.to(torch.float32).view(2, 16))

    def initial_split(self):
        """Peakier half of the groups -> codebook 1 (a deterministic start for k-means)."""
        rms = self.wg.pow(2).mean(-1).sqrt()
        peak = torch.where(rms > 0, self.absmax / rms.clamp(min=1e-30), 0.0)
        return (peak > peak.median()).to(torch.int64)

    def run(self, rounds=ROUNDS):
        self._update_tensor_scale()
        # Start: codes from the base levels with the plain absmax scale, split by peakiness.
        choice = self.initial_split()
        book = self.books[0]
        mag = self.absmax / float(book.abs().max())
        _, s = _store_scale(mag, None, self.dtype, self.tensor_scale)
        codes = ops.nearest_codeword_1d(
            (self.wg / torch.where(s > 0, s, 1.0).unsqueeze(-1)).contiguous(), book)
        for r in range(rounds):
            self.kmeans_update(choice, s, codes)
            choice, s, codes = self.assign(CLIP_RATIOS if r == rounds - 1 else ROUND_RATIOS)
        return choice, s, codes


def _round_with_feedback(w, scale, choice, books, hessian, g):
    """(m, n) int32 codes of w (m, n) rounded column by column (GPTQ), the group scales and
    codebook choices (m, n / g) of the fit kept, each column's rounding error pushed onto
    the columns not yet rounded in the metric of `hessian` (X^T X of the layer's input)."""
    m, n = w.shape
    codes = torch.empty(m, n, dtype=torch.int32, device=w.device)
    safe = torch.where(scale > 0, scale, 1.0)
    pick = choice.bool()

    def round_column(work, col):
        grp = col // g
        z = (work[:, col] / safe[:, grp]).contiguous()
        c0 = ops.nearest_codeword_1d(z, books[0])
        c1 = ops.nearest_codeword_1d(z, books[1])
        codes[:, col] = torch.where(pick[:, grp], c1, c0)
        value = torch.where(pick[:, grp], books[1][c1.long()], books[0][c0.long()])
        return value * scale[:, grp]

    round_columns_with_feedback(w, hessian, round_column)
    return codes


@register_codec("aaac")
class AAACLinear(QuantizedLinear):
    """AAAC layer. Options: variant ("int4" | "nvfp4"), group_size (default: 128 for int4,
    16 for nvfp4), channel_scaling (bool), alpha ("search" | number | list; used with
    channel_scaling), rounds (k-means rounds, default 4), error_feedback (bool: after the
    fit, round the codes column by column GPTQ-style with the fit's scales, codebook choices
    and codebooks; needs stats.hessian)."""
    per_layer_buffers = ("codebooks", "tensor_scale", "channel_scale")
    per_layer_options = ("alpha", "channel_scaling")

    def __init__(self, in_features, out_features, has_bias, variant="int4", group_size=None,
                 channel_scaling=False, alpha=0.0, sibling_rows=None):
        super().__init__(in_features, out_features, has_bias, sibling_rows)
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {tuple(VARIANTS)}, got {variant!r}")
        self.variant = variant
        default_group, self.scale_dtype = VARIANTS[variant]
        self.group_size, self.padded_in = choose_group(in_features, group_size or default_group)
        self.alpha = per_layer(alpha, self.sibling_rows, float)
        m, n = out_features, self.padded_in
        per_sibling = self.per_sibling
        self.register_buffer("packed", torch.zeros(m, 4 * ((n * 4 + 127) // 128),
                                                   dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(m, n // self.group_size,
                                                   dtype=self.scale_dtype))
        self.register_buffer("codebooks", torch.zeros(*per_sibling, 2, 16, dtype=torch.float32))
        self.register_buffer("tensor_scale", torch.ones(*(per_sibling or (1,)),
                                                        dtype=torch.float32)
                             if variant == "nvfp4" else None)
        self.register_buffer("channel_scale", torch.ones(*per_sibling, n, dtype=torch.float32)
                             if any_layer(channel_scaling) else None)

    def meta(self):
        return {"method": self.method, "in_features": self.in_features,
                "out_features": self.out_features, "bias": self.bias is not None,
                "variant": self.variant, "group_size": self.group_size,
                "channel_scaling": self.channel_scale is not None, "alpha": self.alpha,
                **self.sibling_meta()}

    @classmethod
    def from_meta(cls, meta):
        check_meta(cls, meta)
        return cls(meta["in_features"], meta["out_features"], meta["bias"],
                   variant=meta.get("variant", "int4"), group_size=meta.get("group_size"),
                   channel_scaling=meta.get("channel_scaling", False),
                   alpha=meta.get("alpha", 0.0), sibling_rows=meta.get("sibling_rows"))

    def bits_per_weight(self):
        return storage_bits(self) / (self.out_features * self.in_features)

    # ------------------------------------------------------------ quantization

    @classmethod
    def from_linear(cls, linear, stats=None, variant="int4", group_size=None,
                    channel_scaling=False, alpha="search", rounds=ROUNDS, error_feedback=False):
        w, bias = linear_parts(linear)
        m, n = w.shape
        validate_stats(stats, n)
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {tuple(VARIANTS)}, got {variant!r}")
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise ValueError(f"rounds must be a positive integer, got {rounds!r}")
        check_flag("error_feedback", error_feedback)
        if error_feedback:
            check_hessian(stats, n)
        grid = _alpha_grid(alpha) if channel_scaling and stats is not None else (0.0,)
        best = None
        with one_cpu_thread(w.device):
            for a in grid:
                layer = cls(n, m, bias is not None, variant, group_size, a != 0.0, a).to(w.device)
                layer._fit(w, stats, a, rounds)
                err = layer._output_error(w, stats) if len(grid) > 1 else 0.0
                if best is None or err < best[0]:
                    best = (err, layer)
            layer = best[1]
            if error_feedback:   # alpha chosen by plain rounding; round once more with feedback
                layer._fit(w, stats, layer.alpha, rounds, hessian=stats.hessian.to(w.device))
        if bias is not None:
            layer.bias.copy_(bias)
        return layer

    def _fit(self, w, stats, alpha, rounds, hessian=None):
        m, n, npad, g = self.out_features, self.in_features, self.padded_in, self.group_size
        h = (torch.ones(n, device=w.device) if stats is None
             else stats.mean_sq.to(device=w.device, dtype=torch.float32).clone())
        if alpha != 0.0:
            s = channel_scale_from_stats(stats.mean_abs.to(w.device), alpha)
            w = w * s
            h = h / (s * s)   # importance of the scaled input x / s
            if hessian is not None:
                hessian = hessian / s.unsqueeze(1) / s.unsqueeze(0)
            self.channel_scale.copy_(F.pad(s, (0, npad - n), value=1.0))
        if not (h > 0).any():
            h = torch.ones_like(h)
        if npad != n:
            w, h = F.pad(w, (0, npad - n)), F.pad(h, (0, npad - n))
        fit = _Fit(w.reshape(m, npad // g, g), h.view(npad // g, g), self.variant,
                   self.scale_dtype)
        choice, scale, codes = fit.run(rounds)
        if hessian is not None:
            if npad != n:
                hessian = F.pad(hessian, (0, npad - n, 0, npad - n))
            codes = _round_with_feedback(w, scale, choice, fit.books, hessian, g)
        stored, _ = _store_scale(scale, choice, self.scale_dtype, fit.tensor_scale)
        self.scales.copy_(stored)
        self.codebooks.copy_(fit.books)
        if self.tensor_scale is not None:
            self.tensor_scale.fill_(fit.tensor_scale)
        self.packed.copy_(ops.pack_bits(codes.reshape(m, npad), 4))

    def _output_error(self, w, stats):
        """|X W^T - X What^T|^2 on the calibration sample (else its diagonal proxy)."""
        what = self.dequantize()
        if stats.sample is not None and stats.sample.shape[0] > 0:
            x = stats.sample.to(device=w.device, dtype=torch.float32)
            return float(((x @ (w - what).T) ** 2).sum())
        return float(((w - what) ** 2 * stats.mean_sq.to(w.device)).sum())

    # ------------------------------------------------------------ inference

    def gemv(self, x2d):
        if x2d.shape[-1] != self.in_features:
            raise ValueError(f"x has {x2d.shape[-1]} features, the layer {self.in_features}")
        x = x2d if x2d.dtype in (torch.float32, torch.float16, torch.bfloat16) \
            else x2d.to(torch.float32)
        if self.padded_in != self.in_features:
            x = F.pad(x, (0, self.padded_in - self.in_features))
        y = ops.aaac_gemv(x.contiguous(), self.packed, self.scales, self.codebooks,
                          self.tensor_scale, self.channel_scale, self.group_size,
                          self.sibling_rows)
        return y.to(x2d.dtype)

    def dequantize(self, dtype=torch.float32):
        w = ops.aaac_dequantize(self.packed, self.scales, self.codebooks, self.tensor_scale,
                                self.channel_scale, self.group_size, dtype, self.sibling_rows)
        return w[:, :self.in_features] if self.padded_in != self.in_features else w
