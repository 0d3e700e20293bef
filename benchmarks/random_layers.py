"""Quantized layers with random codes and scales of the right shapes and dtypes, for speed
benchmarks: the kernels' speed does not depend on the values, and quantizing the weights of a
7B model on the CPU would take hours. Layers are built through `from_meta`, the path a
checkpoint load takes, so their buffers are exactly those of a quantized model."""
import sys

import torch

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])  # run from a checkout
from qamw_ext.convert import codec_class  # noqa: E402

# Benchmark name -> the codec's meta options. QAM-W layers carry a channel scale, as the
# named qamw-* configs give every layer whose searched alpha is not 0, and bf16 codewords, as
# every new layer does.
_QAMW = {"method": "qamw", "block_size": None, "channel_scaling": True, "codebook_points": "bf16"}
CODECS = {
    "qamw-3.5": dict(_QAMW, bits=7),
    "qamw-4": dict(_QAMW, bits=8),
    "qamw-5.5": dict(_QAMW, bits=11),
    "aaac-int4": {"method": "aaac", "variant": "int4"},
    "aaac-nvfp4": {"method": "aaac", "variant": "nvfp4"},
}
# Scales are drawn around this so that the layers' outputs keep the size of a dense layer
# initialised with std 0.02 (activations then stay finite through a whole random model).
WEIGHT_STD = 0.02


def random_bytes_as(tensor, generator):
    """Fill an integer tensor with uniformly random bits (every code of every width valid)."""
    raw = torch.randint(0, 256, (tensor.numel() * tensor.element_size(),), dtype=torch.uint8,
                        device=tensor.device, generator=generator)
    tensor.copy_(raw.view(tensor.dtype).view(tensor.shape))


def random_layer(codec, in_features, out_features, device, generator=None):
    """A layer of codec `codec` (a key of CODECS) with random codes and plausible scales."""
    meta = dict(CODECS[codec], in_features=in_features, out_features=out_features, bias=False)
    layer = codec_class(meta["method"]).from_meta(meta).to(device)
    random_bytes_as(layer.packed, generator)
    if meta["method"] == "qamw":
        layer.row_scale.uniform_(0.5 * WEIGHT_STD, 1.5 * WEIGHT_STD, generator=generator)
    else:
        mag = torch.empty(layer.scales.shape, device=device).uniform_(
            0.5 * WEIGHT_STD, 1.5 * WEIGHT_STD, generator=generator)
        choice = torch.rand(mag.shape, device=device, generator=generator) < 0.5
        layer.scales.copy_(torch.where(choice, -mag, mag).to(layer.scales.dtype))
        # bf16 values, as learned codebooks are (aaac.py)
        layer.codebooks.normal_(generator=generator)
        layer.codebooks.copy_(layer.codebooks.bfloat16())
    if layer.channel_scale is not None:
        layer.channel_scale.uniform_(0.5, 2.0, generator=generator)
    return layer


def random_fused_layer(codec, in_features, sibling_rows, device, generator=None):
    """One layer of random siblings of these row counts, as a conversion with
    fuse_siblings=True gives: each sibling's own channel scale (AAAC: codebooks) stacked."""
    layers = [random_layer(codec, in_features, rows, device, generator) for rows in sibling_rows]
    return type(layers[0]).fuse(layers)


def buffer_bytes(module):
    """Bytes of every buffer and parameter of a module: what one GEMV call reads of its weight
    (codes, scales, codebook, signs, channel scale; or the dense weight)."""
    return sum(t.numel() * t.element_size()
               for t in list(module.buffers()) + list(module.parameters()))
