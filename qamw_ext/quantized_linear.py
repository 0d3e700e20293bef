"""The base class of every quantized linear layer, and the registry of codecs.

A codec is a subclass of QuantizedLinear registered under a method name. It keeps its
quantized weight as buffers (so state_dict, .to(device) and safetensors just work) and
provides the small-batch fused GEMV and a dequantize-to-dense for large batches."""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

CODECS = {}

# Activation rows at or below this use the fused GEMV; above it, dequantize + matmul.
GEMV_MAX_ROWS = 16
# The most layers one fused layer holds (csrc/kernels.h, kMaxSiblings).
MAX_SIBLINGS = 4


def check_sibling_rows(sibling_rows, out_features):
    """A fused layer's sibling_rows as a list: 2 to MAX_SIBLINGS positive row counts adding
    up to out_features. None (a plain layer) stays None."""
    if sibling_rows is None:
        return None
    rows = list(sibling_rows) if isinstance(sibling_rows, (list, tuple)) else None
    if (rows is None or not 2 <= len(rows) <= MAX_SIBLINGS or sum(rows) != out_features
            or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in rows)):
        raise ValueError(f"sibling_rows must be 2 to {MAX_SIBLINGS} positive row counts adding "
                         f"up to out_features = {out_features}, got {sibling_rows!r}")
    return rows


def per_layer(value, sibling_rows, kind):
    """An option of a plain layer as `kind`, or of a fused one the list of its siblings'."""
    if sibling_rows is None:
        return kind(value)
    values = value if isinstance(value, (list, tuple)) else [value] * len(sibling_rows)
    if len(values) != len(sibling_rows):
        raise ValueError(f"expected one value per sibling ({len(sibling_rows)}), got {value!r}")
    return [kind(v) for v in values]


def any_layer(flag):
    """A flag of a plain layer, or whether any sibling of a fused one has it."""
    return any(flag) if isinstance(flag, (list, tuple)) else bool(flag)


def register_codec(method):
    def wrap(cls):
        cls.method = method
        CODECS[method] = cls
        return cls
    return wrap


@dataclass
class LayerStats:
    """Calibration statistics of one linear layer's input, over N calibration tokens.

    mean_abs, mean_sq: (in_features,) fp32, E|x_j| and E[x_j^2];
    sample: (rows, in_features) fp32, a subsample of input rows, to measure output error;
    hessian: optional (in_features, in_features) fp32, X^T X / N, for error feedback."""
    mean_abs: torch.Tensor
    mean_sq: torch.Tensor
    sample: torch.Tensor
    tokens: int
    hessian: Optional[torch.Tensor] = None


class QuantizedLinear(torch.nn.Module):
    """Subclasses implement: from_linear (classmethod), from_meta (classmethod),
    meta, gemv, dequantize, bits_per_weight."""
    method = None

    def __init__(self, in_features, out_features, has_bias, sibling_rows=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        # A fused layer (`fuse`): its siblings' row counts; None for a plain layer.
        self.sibling_rows = check_sibling_rows(sibling_rows, out_features)
        self.register_buffer("bias", torch.zeros(out_features) if has_bias else None)

    @property
    def per_sibling(self):
        """The leading shape of a per-layer buffer: (siblings,) for a fused layer, else ()."""
        return (len(self.sibling_rows),) if self.sibling_rows else ()

    def sibling_meta(self):
        """The meta entry of a fused layer's sibling_rows (none for a plain layer)."""
        return {"sibling_rows": self.sibling_rows} if self.sibling_rows else {}

    @classmethod
    def from_linear(cls, linear, stats, **config):
        """Quantize a torch.nn.Linear given its LayerStats (or None) and codec options."""
        raise NotImplementedError

    # Buffers the codec keeps one of per layer (a channel scale, codebooks), not one row per
    # output row. A fused layer (`fuse`) holds one per sibling, stacked, and its kernels give
    # each sibling's rows its own. Empty: rows are quantized independently of each other.
    per_layer_buffers = ()
    # Options that may differ between fused siblings (each one's own search result).
    per_layer_options = ()

    @classmethod
    def from_siblings(cls, linears, stats, **config):
        """One layer of the rows of `linears`, which read the same input (q/k/v; gate/up;
        see qamw_ext.fusion), computing exactly what they would as layers of their own:
        each is quantized on its own and the layers fused (`fuse`). A codec without
        per-layer buffers quantizes their concatenation, which is the same."""
        if not cls.per_layer_buffers:
            from .fusion import concatenated_linear

            return cls.from_linear(concatenated_linear(linears), stats, **config)
        return cls.fuse([cls.from_linear(lin, stats, **config) for lin in linears])

    @classmethod
    def fuse(cls, layers):
        """One layer of the rows of `layers` (this codec, the same input and options): rows
        concatenated, per_layer_buffers stacked with meta["sibling_rows"] their row counts."""
        if not cls.per_layer_buffers:
            raise ValueError(f"{cls.method} layers have no per-layer buffers to stack: fuse them "
                             "at conversion (fuse_siblings=True), which quantizes their "
                             "concatenation")
        if not 2 <= len(layers) <= MAX_SIBLINGS:
            raise ValueError(f"a fused layer holds 2 to {MAX_SIBLINGS} layers, got {len(layers)}")
        metas = [layer.meta() for layer in layers]
        varying = {"out_features", "bias", *cls.per_layer_options}
        for meta in metas[1:]:
            differ = sorted(k for k in meta.keys() | metas[0].keys()
                            if k not in varying and meta.get(k) != metas[0].get(k))
            if differ:
                raise ValueError(f"cannot fuse {cls.method} layers whose {differ} differ")
        meta = dict(metas[0], out_features=sum(m["out_features"] for m in metas),
                    bias=any(m["bias"] for m in metas),
                    sibling_rows=[m["out_features"] for m in metas])
        for key in cls.per_layer_options:
            meta[key] = [m[key] for m in metas]
        fused = cls.from_meta(meta).to(layers[0].packed.device)
        with torch.no_grad():
            for name, buf in fused.named_buffers(recurse=False):
                if name in fused._non_persistent_buffers_set:
                    continue   # constants rebuilt from the (shared) options
                parts = [getattr(layer, name) for layer in layers]
                if name in cls.per_layer_buffers:
                    # a sibling without the buffer (it chose no channel scale): ones, which
                    # scale nothing
                    buf.copy_(torch.stack([p.view_as(buf[0]) if p is not None else
                                           torch.ones_like(buf[0]) for p in parts]))
                else:
                    buf.copy_(torch.cat([p if p is not None else
                                         buf.new_zeros(layer.out_features, *buf.shape[1:])
                                         for p, layer in zip(parts, layers)]))
        return fused

    @staticmethod
    def uses_hessian(options):
        """Whether from_linear with these options needs stats.hessian (asked by convert):
        every codec that rounds with error feedback takes the option `error_feedback`."""
        return bool(options.get("error_feedback", False))

    @classmethod
    def from_meta(cls, meta):
        """An instance with buffers of the right names, shapes and dtypes, to load into."""
        raise NotImplementedError

    def meta(self):
        """A JSON-able dict (with "method", "in_features", "out_features", "bias" and the
        codec's options) from which from_meta rebuilds the layer's structure."""
        raise NotImplementedError

    def gemv(self, x2d):
        """x2d: (rows <= GEMV_MAX_ROWS, in_features) -> (rows, out_features), without bias."""
        raise NotImplementedError

    def dequantize(self, dtype=torch.float32):
        """The dense (out_features, in_features) weight."""
        raise NotImplementedError

    def bits_per_weight(self):
        """Exact storage of the layer (codes and every piece of side information, bias
        excluded) divided by out_features * in_features."""
        raise NotImplementedError

    def forward(self, x):
        shape = x.shape
        x2d = x.reshape(-1, self.in_features)
        if x2d.shape[0] <= GEMV_MAX_ROWS:
            y = self.gemv(x2d)
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
        else:
            bias = None if self.bias is None else self.bias.to(x.dtype)
            y = F.linear(x2d, self.dequantize(x.dtype), bias)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"method={self.method}, bits_per_weight={self.bits_per_weight():.3f}")
