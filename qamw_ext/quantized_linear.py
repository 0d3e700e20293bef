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

    def __init__(self, in_features, out_features, has_bias):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("bias", torch.zeros(out_features) if has_bias else None)

    @classmethod
    def from_linear(cls, linear, stats, **config):
        """Quantize a torch.nn.Linear given its LayerStats (or None) and codec options."""
        raise NotImplementedError

    # Whether from_linear searches a per-layer choice (a channel scale) by output error and
    # takes _row_groups, so that each fused sibling counts as the separate layer would.
    searches_per_layer = False

    @classmethod
    def from_siblings(cls, linears, stats, **config):
        """One layer of the rows of `linears`, which read the same input (q/k/v; gate/up;
        see qamw_ext.fusion), quantized together as their concatenation."""
        from .fusion import concatenated_linear

        if cls.searches_per_layer:
            config["_row_groups"] = [lin.out_features for lin in linears]
        return cls.from_linear(concatenated_linear(linears), stats, **config)

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
