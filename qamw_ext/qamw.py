"""QAM-W: 2-D Lloyd-Max (QAM-like) coding of rotated weight pairs.

For a weight W (m x n) and calibration statistics of its input x:
  1. channel scale s_j = (mean |x_j|)^alpha, normalised to geometric mean 1 (channels that
     are exactly zero get the smallest positive scale, so nothing is divided by 0);
     W' = W diag(s), and at run time x' = x / s;
  2. R = block Hadamard (block B) after seeded +-1 signs; V = W' R^T (each row rotated).
     B is a power of two, or with block_size="whole" the whole input dimension when it is
     K * 2^m with K a tabulated Hadamard order (576 = 36 * 16, 1536 = 12 * 128): one rotation
     then spreads every column's energy over the entire row (see hadamard_matrices);
  3. each row (or each row block) of V is normalised to unit variance, i.e. ~N(0, 1)
     coordinates, and adjacent pairs (2k, 2k+1) are coded by the nearest of the 2^b points
     of one shared 2-D codebook (ops.nearest_codeword_2d), codes packed by ops.pack_bits;
  4. the row scale is the norm / sqrt(n) ("norm") or the least-squares scale
     <v, c> / <c, c> ("ls", the default: it never has a larger weight error, and in our
     measurements a lower output error on almost every layer), or per layer the one with the
     lower output error ("auto").
alpha is searched per layer over a grid, minimising |X W^T - X What^T|^2 on the calibration
sample (stats.sample; without a sample, the diagonal proxy sum_j E[x_j^2] |W_:j - What_:j|^2).
Fused siblings (from_siblings: q/k/v or gate/up as one layer) are quantized each on its
own, then stacked: the fused layer keeps one channel scale per sibling (sibling_rows), and
its GEMV computes exactly what the separate layers would, in one launch.

Error feedback (error_feedback=True; needs stats.hessian, H = X^T X / N): rounding each pair
to its nearest codeword ignores how the input channels correlate. With it, the pairs are
rounded in order, GPTQ/LDLQ style, and each pair's rounding error is pushed onto the columns
not yet rounded so that the output error |X W^T - X What^T|^2 (not the weight error) is
minimised. Since y = V R (x / s), the metric in the coordinates where V is coded is
H_rot = R S^-1 H S^-1 R^T (two block Hadamards of the scaled H). With U the upper Cholesky
factor of the damped H_rot^-1 (damping 1 % of its mean diagonal), pair p's error
E_p = (v_p - vhat_p) U_pp^-1 (m x 2) updates the later columns by -E_p U_p,later, in lazy
blocks of columns. Each row's (or row block's) scale is fixed from its norm before rounding;
the "ls" row scale is then refit by least squares in the H_rot metric. alpha is chosen with
plain rounding (cheap), then the layer is rounded once more with error feedback at that alpha
(ef_search=True: every alpha of the grid is rounded with error feedback, ~3x the time).
Named configs: "qamw-<bpw>-ef". The statistics come from sequential calibration, so H of a
layer is measured on the outputs of the already-quantized layers before it.

When n has no power-of-two factor of at least 16, the columns are zero-padded to a multiple
of a block and x is zero-padded at run time (the padding is counted in bits_per_weight).

Registered codecs: "qamw" (codebook="qam" by default, or "polar") and "qamw_polar" (the polar
codebook: Rayleigh Lloyd-Max amplitudes x uniform phases, same bits per pair).
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

from . import codebooks as cbs
from . import hadamard_matrices, ops
from .baselines import (EF_BLOCK, SEED_BITS, check_flag, check_hessian, check_meta,
                        inverse_hessian_factor, linear_parts, one_cpu_thread, storage_bits,
                        validate_stats)
from .quantized_linear import QuantizedLinear, any_layer, per_layer, register_codec

ALPHA_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
ROW_SCALES = ("ls", "norm", "auto")
MAX_BLOCK = 1024
MIN_BLOCK = 16
MAX_WHOLE = 32768   # the kernels' largest Hadamard block


def _kernel_block(block):
    """Whether the kernels take this Hadamard block: 2^m or K * 2^m up to MAX_WHOLE."""
    try:
        hadamard_matrices.split_block(block)
    except ValueError:
        return False
    return block <= MAX_WHOLE


def choose_block(n, block_size=None):
    """(block, padded n). block_size: None (automatic), "whole" (one Hadamard over all n
    columns; n must be 2^m or K * 2^m with K a tabulated order, see hadamard_matrices),
    "largest" (the largest such block dividing n: the whole dimension where it can be, and
    automatic when that is below 16), or a block of that form, the columns zero-padded to a
    multiple of it. Automatic: min(1024, largest power of 2 dividing n); when that is below
    16 (or n is odd), pad n to a multiple of the largest block (<= 1024) that costs at most
    n/32 padding columns, else of 16."""
    if block_size == "whole":
        if not _kernel_block(n):
            raise ValueError(f"block_size='whole' needs in_features = 2^m or K * 2^m with K in "
                             f"{hadamard_matrices.ORDERS}, up to {MAX_WHOLE}, got {n}")
        return n, n
    if block_size == "largest":
        block = _largest_block(n)
        if block >= MIN_BLOCK:
            return block, n
        block_size = None
    if block_size is not None:
        if not _kernel_block(block_size):
            raise ValueError(f"block_size must be None, 'whole', 'largest', or 2^m or K * 2^m "
                             f"(K in {hadamard_matrices.ORDERS}) from 2 to {MAX_WHOLE}, "
                             f"got {block_size!r}")
        return block_size, -(-n // block_size) * block_size
    block = min(MAX_BLOCK, n & -n)
    if block >= MIN_BLOCK:
        return block, n
    block = MIN_BLOCK
    b = MAX_BLOCK
    while b > MIN_BLOCK:
        if -(-n // b) * b - n <= n / 32:
            block = b
            break
        b //= 2
    return block, -(-n // block) * block


def _largest_block(n):
    """The largest block 2^m or K * 2^m (K tabulated) up to MAX_WHOLE that divides n."""
    best = 0
    for order in (1,) + hadamard_matrices.ORDERS:
        if n % order:
            continue
        pow2 = (n // order) & -(n // order)
        while order * pow2 > MAX_WHOLE:
            pow2 //= 2
        if order * pow2 >= 2:
            best = max(best, order * pow2)
    return best


def seeded_signs(seed, n):
    """int8 (n,) +-1 signs from a 64-bit seed (splitmix64 of seed + j: the same on every
    platform and torch version)."""
    with np.errstate(over="ignore"):
        z = (np.uint64(seed) + np.arange(1, n + 1, dtype=np.uint64)
             * np.uint64(0x9E3779B97F4A7C15))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return torch.from_numpy(np.where(z >> np.uint64(63), -1, 1).astype(np.int8))


def channel_scale_from_stats(mean_abs, alpha):
    """(n,) fp32 s = mean_abs^alpha, geometric mean 1; exact-zero channels get the smallest
    positive scale (never 0, so x / s is finite)."""
    a = mean_abs.to(torch.float32)
    pos = a > 0
    if not pos.any():
        return torch.ones_like(a)
    a = torch.where(pos, a, a[pos].min())
    s = a.pow(alpha)
    return s / torch.exp(torch.log(s).mean())


def _alpha_grid(alpha):
    if alpha == "search":
        return ALPHA_GRID
    if isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
        if not math.isfinite(alpha) or alpha < 0:
            raise ValueError(f"alpha must be finite and >= 0, got {alpha!r}")
        return (float(alpha),)
    if isinstance(alpha, (list, tuple)) and alpha and all(
            isinstance(a, (int, float)) and not isinstance(a, bool) and a >= 0 for a in alpha):
        return tuple(float(a) for a in alpha)
    raise ValueError(f"alpha must be 'search', a number >= 0 or a list of them, got {alpha!r}")


class _Candidate:
    """One quantization of the layer (for one alpha): codes, scales and its output error."""
    __slots__ = ("alpha", "codes", "row_scale", "channel_scale", "error", "row_mode")


def _feedback_matrix(hrot):
    """G = blockdiag(U_pp)^-1 U with U the upper Cholesky factor of the damped H_rot^-1:
    rounding pair p with difference d (m x 2) moves the later columns by -d G[p, later]."""
    npad = hrot.shape[0]
    u = inverse_hessian_factor(hrot)
    up = u.view(npad // 2, 2, npad // 2, 2)
    diag = up.diagonal(dim1=0, dim2=2).permute(2, 0, 1)                  # (npad/2, 2, 2)
    g = torch.einsum("pab,pbn->pan", torch.linalg.inv(diag), u.view(npad // 2, 2, npad))
    return g.reshape(npad, npad).to(hrot.dtype)


def _weighted_ls_scale(v, chat, hrot):
    """(m, groups) scales a minimising (V - a Chat) H_rot (V - a Chat)^T row by row, jointly
    over a row's groups (a tiny ridge keeps the systems regular)."""
    m, groups, gw = chat.shape
    t = torch.einsum("igb,gbk->igk", chat, hrot.view(groups, gw, -1))      # (m, groups, npad)
    gram = (t.view(m, groups, groups, gw) * chat.unsqueeze(1)).sum(-1)      # (m, groups, groups)
    rhs = (t * v.unsqueeze(1)).sum(-1)                                      # (m, groups)
    eye = torch.eye(groups, dtype=gram.dtype, device=gram.device)
    ridge = 1e-9 * gram.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-30)
    return torch.linalg.solve(gram + ridge.view(m, 1, 1) * eye, rhs)


@register_codec("qamw")
class QAMWLinear(QuantizedLinear):
    """QAM-W layer. Options (JSON-able keyword args of from_linear):
    bits (4..12, bits per pair; default 11 = 5.5 bits per weight), codebook ("qam" | "polar"),
    block_size (None = automatic, "whole", "largest", or a block 2^m or K * 2^m), alpha
    ("search" | number | list), row_scale ("ls" | "norm" | "auto"), per_block_scale (bool:
    one row scale per Hadamard block), seed (int, the sign seed), error_feedback (bool:
    round with error feedback; needs stats.hessian), ef_search (bool: with error feedback,
    round every alpha of the grid with it instead of choosing alpha by plain rounding),
    codebook_points ("bf16" | "fp32": the codewords rounded to bf16, the default, or as
    trained; checkpoints without the key hold "fp32").
    A fused layer (sibling_rows) has one channel scale per sibling and their alphas."""
    default_codebook = "qam"
    per_layer_buffers = ("channel_scale",)
    per_layer_options = ("alpha", "channel_scaling")

    def __init__(self, in_features, out_features, has_bias, bits=11, codebook=None,
                 block_size=None, per_block_scale=False, seed=0, channel_scaling=False,
                 alpha=0.0, row_scale="ls", sibling_rows=None, codebook_points="bf16"):
        super().__init__(in_features, out_features, has_bias, sibling_rows)
        codebook = codebook or self.default_codebook
        self.bits = cbs.check_bits(bits)
        self.codebook_kind = codebook
        self.codebook_id = cbs.codebook_id(codebook, bits)
        self.codebook_points = codebook_points
        self.block_size, self.padded_in = choose_block(in_features, block_size)
        self.per_block_scale = bool(per_block_scale)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
            raise ValueError(f"seed must be an integer in [0, 2^64), got {seed!r}")
        self.seed = seed
        self.alpha = per_layer(alpha, self.sibling_rows, float)
        self.row_scale_mode = row_scale
        m, n = out_features, self.padded_in
        words = 4 * ((n // 2 * bits + 127) // 128)
        self.register_buffer("packed", torch.zeros(m, words, dtype=torch.int32))
        shape = (m, n // self.block_size) if self.per_block_scale else (m,)
        self.register_buffer("row_scale", torch.zeros(shape, dtype=torch.float32))
        self.register_buffer("channel_scale", torch.ones(*self.per_sibling, n, dtype=torch.float32)
                             if any_layer(channel_scaling) else None)
        # Global constants and seed-derived data: rebuilt, not stored per layer.
        self.register_buffer("codebook", cbs.get(self.codebook_id, codebook_points),
                             persistent=False)
        self.register_buffer("signs", seeded_signs(seed, n), persistent=False)

    # ------------------------------------------------------------ structure

    def meta(self):
        return {"method": self.method, "in_features": self.in_features,
                "out_features": self.out_features, "bias": self.bias is not None,
                "bits": self.bits, "codebook": self.codebook_kind,
                "codebook_points": self.codebook_points,
                "block_size": self.block_size, "per_block_scale": self.per_block_scale,
                "seed": self.seed, "channel_scaling": self.channel_scale is not None,
                "alpha": self.alpha, "row_scale": self.row_scale_mode,
                **self.sibling_meta()}

    @classmethod
    def from_meta(cls, meta):
        check_meta(cls, meta)
        return cls(meta["in_features"], meta["out_features"], meta["bias"],
                   bits=meta["bits"], codebook=meta.get("codebook"),
                   block_size=meta["block_size"],
                   per_block_scale=meta.get("per_block_scale", False),
                   seed=meta.get("seed", 0), channel_scaling=meta.get("channel_scaling", False),
                   alpha=meta.get("alpha", 0.0), row_scale=meta.get("row_scale", "ls"),
                   sibling_rows=meta.get("sibling_rows"),
                   codebook_points=meta.get("codebook_points", "fp32"))

    def bits_per_weight(self):
        # The sign vector is regenerated from the stored 64-bit seed; the codebook is a
        # global constant named by its id.
        return storage_bits(self, SEED_BITS) / (self.out_features * self.in_features)

    # ------------------------------------------------------------ quantization

    @classmethod
    def from_linear(cls, linear, stats=None, bits=11, codebook=None, block_size=None,
                    alpha="search", row_scale="ls", per_block_scale=False, seed=0,
                    error_feedback=False, ef_search=False, codebook_points="bf16"):
        w, bias = linear_parts(linear)
        m, n = w.shape
        cbs.check_bits(bits)
        if row_scale not in ROW_SCALES:
            raise ValueError(f"row_scale must be one of {ROW_SCALES}, got {row_scale!r}")
        grid = _alpha_grid(alpha)
        validate_stats(stats, n)
        check_flag("error_feedback", error_feedback)
        if error_feedback:
            check_hessian(stats, n)
        if stats is None:
            grid = (0.0,)  # no activation statistics: no channel scale
        check_flag("ef_search", ef_search)
        dev = w.device
        probe = cls(n, m, bias is not None, bits, codebook, block_size, per_block_scale, seed,
                    codebook_points=codebook_points)
        probe = probe.to(dev)
        search_h = stats.hessian if error_feedback and ef_search else None
        best = None
        with one_cpu_thread(dev):
            for a in grid:
                cand = probe._quantize(w, stats, a, row_scale, measure=len(grid) > 1 or
                                       row_scale == "auto", hessian=search_h)
                if best is None or cand.error < best.error:
                    best = cand
            if error_feedback and not ef_search:
                best = probe._quantize(w, stats, best.alpha, row_scale,
                                       measure=row_scale == "auto", hessian=stats.hessian)
        layer = cls(n, m, bias is not None, bits, codebook, block_size, per_block_scale, seed,
                    channel_scaling=best.channel_scale is not None, alpha=best.alpha,
                    row_scale=row_scale, codebook_points=codebook_points).to(dev)
        layer.packed.copy_(ops.pack_bits(best.codes, bits))
        layer.row_scale.copy_(best.row_scale)
        if best.channel_scale is not None:
            layer.channel_scale.copy_(best.channel_scale)
        if bias is not None:
            layer.bias.copy_(bias)
        return layer

    def _rotate(self, x):
        """R x along the last dim (x zero-padded to the padded width)."""
        pad = self.padded_in - x.shape[-1]
        if pad:
            x = F.pad(x, (0, pad))
        return ops.hadamard(x.contiguous(), self.block_size, self.signs)

    def _quantize(self, w, stats, alpha, row_mode, measure, hessian=None):
        """One candidate at this alpha: nearest-codeword rounding, or with `hessian` (the
        (n, n) X^T X / N) rounding with error feedback and the row scale refit in its metric."""
        m, n, npad, blk = self.out_features, self.in_features, self.padded_in, self.block_size
        s = None
        if alpha != 0.0:
            s = channel_scale_from_stats(stats.mean_abs.to(w.device), alpha)
        v = self._rotate(w * s if s is not None else w)               # (m, npad)
        groups = npad // blk if self.per_block_scale else 1
        vg = v.view(m, groups, npad // groups)
        norm = vg.norm(dim=-1, keepdim=True)                           # (m, groups, 1)
        scale_norm = (norm / math.sqrt(npad // groups)).squeeze(-1)    # (m, groups)
        if hessian is None:
            unit = vg * (math.sqrt(npad // groups) / torch.where(norm > 0, norm, 1.0))
            codes = ops.nearest_codeword_2d(unit.reshape(m, npad // 2, 2), self.codebook)
            chat = self.codebook[codes.long()].view(m, groups, npad // groups)
            cc = (chat * chat).sum(-1)
            scale_ls = torch.where(cc > 0, (vg * chat).sum(-1) / torch.where(cc > 0, cc, 1.0),
                                   0.0)
        else:
            hrot = self._rotated_hessian(hessian.to(w.device), s)
            codes = self._round_with_feedback(v, scale_norm, hrot)
            chat = self.codebook[codes.long()].view(m, groups, npad // groups)
            scale_ls = _weighted_ls_scale(v, chat, hrot)
        options = {"norm": [scale_norm], "ls": [scale_ls], "auto": [scale_ls, scale_norm]}
        best = None
        for scale in options[row_mode]:
            err = self._output_error(w, v, chat, scale, s, stats) if measure else 0.0
            if best is None or err < best[0]:
                best = (err, scale)
        cand = _Candidate()
        cand.alpha, cand.codes, cand.channel_scale, cand.error = alpha, codes, None, best[0]
        cand.row_scale = best[1].reshape(m, groups) if self.per_block_scale else best[1].view(m)
        cand.row_mode = row_mode
        if s is not None:
            cand.channel_scale = F.pad(s, (0, npad - n), value=1.0)
        return cand

    def _rotated_hessian(self, h, s):
        """H_rot = R S^-1 H S^-1 R^T (npad x npad, fp32): the output-error metric for V."""
        n, npad = self.in_features, self.padded_in
        h = h.to(torch.float32)
        if s is not None:
            h = h / s.unsqueeze(1) / s.unsqueeze(0)
        if npad > n:
            h = F.pad(h, (0, npad - n, 0, npad - n))
        h = ops.hadamard(h.contiguous(), self.block_size, self.signs)        # H R^T
        h = ops.hadamard(h.t().contiguous(), self.block_size, self.signs)    # R H R^T
        return (h + h.t()) / 2

    def _round_with_feedback(self, v, scale, hrot):
        """(m, npad/2) codes of V rounded pair by pair, each pair's error pushed onto the
        later columns (block LDL / GPTQ with 2-column blocks). scale: (m, groups) row scales,
        fixed during rounding."""
        m, npad = v.shape
        sc = scale.repeat_interleave(npad // scale.shape[1], dim=1)           # (m, npad)
        inv_sc = torch.where(sc > 0, 1.0 / torch.where(sc > 0, sc, 1.0), 1.0)
        g = _feedback_matrix(hrot)
        work = v.clone()
        codes = torch.empty(m, npad // 2, dtype=torch.int32, device=v.device)
        for i1 in range(0, npad, EF_BLOCK):
            i2 = min(i1 + EF_BLOCK, npad)
            blk = work[:, i1:i2]
            diff = torch.empty_like(blk)
            for j in range(0, i2 - i1, 2):
                c = slice(i1 + j, i1 + j + 2)
                target = (blk[:, j:j + 2] * inv_sc[:, c]).contiguous().view(m, 1, 2)
                code = ops.nearest_codeword_2d(target, self.codebook).view(m)
                codes[:, (i1 + j) // 2] = code
                d = blk[:, j:j + 2] - self.codebook[code.long()] * sc[:, c]
                diff[:, j:j + 2] = d
                blk[:, j + 2:] -= d @ g[c, i1 + j + 2:i2]
            work[:, i2:] -= diff @ g[i1:i2, i2:]
        return codes

    def _output_error(self, w, v, chat, scale, s, stats):
        """|X W^T - X What^T|^2 on the calibration sample, computed in the rotated domain:
        X What^T = (R (X / s)) Vhat^T. Without a sample: sum_j E[x_j^2] (W - What)_ij^2
        (also computed in the rotated domain when no channel scale is used)."""
        m, npad = v.shape
        vhat = (chat * scale.unsqueeze(-1)).view(m, npad)
        sample = None if stats is None else stats.sample
        if sample is not None and sample.shape[0] > 0:
            x = sample.to(device=w.device, dtype=torch.float32)
            xr = self._rotate(x / s if s is not None else x)
            diff = x @ w.T - xr @ vhat.T
            err = (diff * diff).sum()
        elif stats is None:
            err = ((v - vhat) ** 2).sum()
        else:
            # Diagonal proxy in the original domain (needs the inverse rotation).
            what = ops.hadamard(vhat.contiguous(), self.block_size, self.signs,
                                True)[:, :w.shape[1]]
            if s is not None:
                what = what / s
            mean_sq = stats.mean_sq.to(w.device)
            err = ((w - what) ** 2 * mean_sq).sum()
        return float(err)

    # ------------------------------------------------------------ inference

    def _activation(self, x2d):
        if x2d.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            x2d = x2d.to(torch.float32)
        pad = self.padded_in - x2d.shape[-1]
        return F.pad(x2d, (0, pad)) if pad else x2d

    def gemv(self, x2d):
        if x2d.shape[-1] != self.in_features:
            raise ValueError(f"x has {x2d.shape[-1]} features, the layer {self.in_features}")
        y = ops.qamw_gemv(self._activation(x2d).contiguous(), self.packed, self.codebook,
                          self.row_scale, self.channel_scale, self.signs, self.bits,
                          self.block_size, self.sibling_rows)
        return y.to(x2d.dtype)

    def dequantize(self, dtype=torch.float32):
        w = ops.qamw_dequantize(self.packed, self.codebook, self.row_scale, self.channel_scale,
                                self.signs, self.bits, self.block_size, self.padded_in, dtype,
                                self.sibling_rows)
        return w[:, :self.in_features] if self.padded_in != self.in_features else w


@register_codec("qamw_polar")
class QAMWPolarLinear(QAMWLinear):
    """QAM-W with the polar codebook (Rayleigh Lloyd-Max amplitude x uniform phase)."""
    default_codebook = "polar"
