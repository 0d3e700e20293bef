"""The shipped codebooks, loaded by id and cached.

The 2-D QAM-W codebooks (Lloyd-Max for N(0, I2), 2^b points, b = 4..12) and the polar ones
(Rayleigh Lloyd-Max amplitude x uniform phase) live in `data/codebooks.safetensors`, written
by `tools/make_codebooks.py` (whose docstring documents the format). A codebook id is a
string such as "qam8" or "polar11"; layers store the id, not the points.

NF4 and FP4 E2M1 levels are fixed constants and defined here.
"""
import functools
import os

import torch

DATA_FILE = os.path.join(os.path.dirname(__file__), "data", "codebooks.safetensors")
MIN_BITS, MAX_BITS = 4, 12
KINDS = ("qam", "polar")
POINTS = ("fp32", "bf16")  # the precision of a layer's codewords (get)
FP16_NORMAL_MIN = 2.0 ** -14

# QLoRA's NormalFloat4 levels (bitsandbytes' table), ascending, exact 0 at index 7.
_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]

# FP4 E2M1 magnitudes; the 16 signed codes are -6 .. -0, +0 .. 6.
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def nf4_levels():
    """(16,) fp32 NF4 levels in [-1, 1]."""
    return torch.tensor(_NF4, dtype=torch.float32)


def e2m1_levels():
    """(16,) fp32 distinct-valued FP4 E2M1 grid: -6..-0.5, 0, 0.5..6 (15 values) plus one
    extra 0 so that the table has 16 entries (E2M1 has +0 and -0)."""
    mags = torch.tensor(E2M1_MAGNITUDES, dtype=torch.float32)
    return torch.cat([-mags.flip(0)[:-1], mags, torch.zeros(1)]).sort().values


def check_bits(bits):
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits per pair must be an integer from {MIN_BITS} to {MAX_BITS}, "
                         f"got {bits!r}")
    return bits


def codebook_id(kind, bits):
    if kind not in KINDS:
        raise ValueError(f"codebook must be one of {KINDS}, got {kind!r}")
    return f"{kind}{check_bits(bits)}"


@functools.lru_cache(maxsize=None)
def _load_all():
    if not os.path.exists(DATA_FILE):
        raise FileNotFoundError(f"{DATA_FILE} is missing: run tools/make_codebooks.py")
    from safetensors import safe_open
    out, meta = {}, {}
    with safe_open(DATA_FILE, framework="pt") as f:
        meta = dict(f.metadata() or {})
        for name in f.keys():
            out[name] = f.get_tensor(name)
    return out, meta


def metadata():
    """The data file's metadata dict (format version, training settings, MSEs)."""
    return dict(_load_all()[1])


def get(cid, points="fp32"):
    """(2^b, 2) fp32 codebook for an id such as "qam11" or "polar8" (a fresh copy).

    points="bf16" rounds each coordinate to the nearest bf16 value, and to 0 below 2^-14 (an
    axis' neighbourhood, where fp16 would lose bits), as new QAM-W layers hold them: bf16 and
    fp16 then hold every codeword exactly, and the GEMVs look up 4-byte codewords with no low
    parts (half the bytes, and on tensor cores half the mmas, of fp32 points). The MSE grows by
    about 0.01 % at 8 bits per pair, 0.1 % at 11 and 0.2 % at 12 (N(0, I2), nearest codewords
    of the rounded points)."""
    if points not in POINTS:
        raise ValueError(f"codebook points must be one of {POINTS}, got {points!r}")
    tensors = _load_all()[0]
    if cid not in tensors:
        raise ValueError(f"unknown codebook id {cid!r}; shipped: {sorted(tensors)}")
    points_fp32 = tensors[cid].clone()
    if points == "fp32":
        return points_fp32
    rounded = points_fp32.bfloat16().float()
    return torch.where(rounded.abs() < FP16_NORMAL_MIN, 0.0, rounded)


def qam_codebook(bits):
    """(2^bits, 2) fp32 Lloyd-Max codebook of N(0, I2)."""
    return get(codebook_id("qam", bits))


def polar_codebook(bits):
    """(2^bits, 2) fp32 polar codebook: Rayleigh Lloyd-Max amplitudes x uniform phases."""
    return get(codebook_id("polar", bits))


def codebook_mse(cid):
    """Trained MSE per dimension of a shipped codebook (from the file's metadata)."""
    import json
    return json.loads(metadata()["mse_per_dim"])[cid]
