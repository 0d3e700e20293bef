"""The codecs on synthetic data with known answers, their storage, and bad input."""
import json
import math

import pytest
import torch

import qamw_ext.aaac  # noqa: F401  (registers the codecs)
import qamw_ext.baselines  # noqa: F401
import qamw_ext.qamw  # noqa: F401
from qamw_ext import codebooks, reference
from qamw_ext.quantized_linear import CODECS, LayerStats

CONFIGS = [
    ("rtn", {}), ("nf4", {}),
    ("qamw", {"bits": 8}), ("qamw", {"bits": 5, "per_block_scale": True}),
    ("qamw", {"bits": 11, "codebook": "polar"}), ("qamw_polar", {"bits": 7}),
    ("aaac", {"variant": "int4"}), ("aaac", {"variant": "nvfp4"}),
    ("aaac", {"variant": "int4", "channel_scaling": True, "alpha": 0.5}),
]


pytestmark = pytest.mark.usefixtures("one_thread")



def linear(m, n, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(n, m, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(m, n, generator=g))
        if bias:
            lin.bias.copy_(torch.randn(m, generator=g))
    return lin


def outlier_stats(n, rows=256, seed=1, outliers=0.03, gain=20.0):
    """Activations whose few outlier channels are `gain` times larger than the rest."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.ones(n)
    scale[torch.randperm(n, generator=g)[:max(1, int(outliers * n))]] = gain
    x = torch.randn(rows, n, generator=g) * scale
    return LayerStats(x.abs().mean(0), x.pow(2).mean(0), x[:rows // 2], rows), x


def output_error(lin, q, x):
    return float(((x @ (lin.weight - q.dequantize()).T) ** 2).sum())


# ---------------------------------------------------------------- known answers

@pytest.mark.parametrize("bits", [6, 8, 10])
def test_qamw_mse_on_gaussian_weights_matches_the_codebook(bits):
    lin = linear(128, 1024)
    q = CODECS["qamw"].from_linear(lin, None, bits=bits, row_scale="norm")
    mse = float(((lin.weight - q.dequantize()) ** 2).mean())
    assert mse == pytest.approx(codebooks.codebook_mse(f"qam{bits}"), rel=0.04)
    ls = CODECS["qamw"].from_linear(lin, None, bits=bits, row_scale="ls")
    assert float(((lin.weight - ls.dequantize()) ** 2).mean()) <= mse


def test_new_qamw_layers_hold_bf16_codewords_and_older_metas_fp32_ones():
    """New layers round the codewords to bf16 (the tensor-core GEMV's 4-byte lookups) at a
    weight error within 1 % of the trained points'; a meta without the key (format 4 and
    earlier) rebuilds the trained fp32 points, as those layers were quantized with."""
    lin, x = linear(64, 1024), torch.randn(3, 1024)
    trained = codebooks.qam_codebook(8)
    new = CODECS["qamw"].from_linear(lin, None, bits=8, alpha=0.0)
    assert new.meta()["codebook_points"] == "bf16"
    assert torch.equal(new.codebook, new.codebook.bfloat16().float())
    assert not torch.equal(new.codebook, trained)
    old = CODECS["qamw"].from_linear(lin, None, bits=8, alpha=0.0, codebook_points="fp32")
    assert torch.equal(old.codebook, trained)
    error = [float(((lin.weight - q.dequantize()) ** 2).sum()) for q in (new, old)]
    assert error[0] == pytest.approx(error[1], rel=0.01)
    meta = old.meta()
    del meta["codebook_points"]
    back = CODECS["qamw"].from_meta(meta)
    back.load_state_dict(old.state_dict())
    assert torch.equal(back.codebook, trained)
    assert torch.equal(back(x), old(x))
    with pytest.raises(ValueError, match="codebook points"):
        CODECS["qamw"].from_linear(lin, None, bits=8, codebook_points="fp16")


def test_activation_aware_lowers_output_error_with_outlier_channels():
    lin = linear(128, 512)
    stats, x = outlier_stats(512)
    plain = CODECS["qamw"].from_linear(lin, stats, bits=8, alpha=0.0)
    aware = CODECS["qamw"].from_linear(lin, stats, bits=8, alpha="search")
    assert aware.alpha > 0 and aware.channel_scale is not None
    assert plain.channel_scale is None
    assert output_error(lin, aware, x) < 0.8 * output_error(lin, plain, x)


def test_least_squares_row_scale_never_loses_on_weight_error():
    lin = linear(64, 256, seed=3)
    for bits in (4, 7):
        a = CODECS["qamw"].from_linear(lin, None, bits=bits, row_scale="norm")
        b = CODECS["qamw"].from_linear(lin, None, bits=bits, row_scale="ls")
        err = [((lin.weight - q.dequantize()) ** 2).sum(1) for q in (a, b)]
        assert (err[1] <= err[0] * (1 + 1e-5)).all()


@pytest.mark.parametrize("variant", ["int4", "nvfp4"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aaac_weighted_error_not_above_rtn(variant, seed):
    lin = linear(96, 512, seed=seed)
    stats, _ = outlier_stats(512, seed=seed + 10)
    w = lin.weight.detach()
    rtn = CODECS["rtn"].from_linear(lin, stats)
    q = CODECS["aaac"].from_linear(lin, stats, variant=variant)

    def weighted(layer):
        return float((((w - layer.dequantize()) ** 2) * stats.mean_sq).sum())
    assert weighted(q) <= weighted(rtn)
    # And with heavy-tailed weights, where two codebooks have something to choose between.
    lin.weight.data = torch.distributions.StudentT(3.0).sample((96, 512))
    w = lin.weight.detach()
    rtn = CODECS["rtn"].from_linear(lin, stats)
    q = CODECS["aaac"].from_linear(lin, stats, variant=variant)
    assert weighted(q) <= weighted(rtn)
    _, choice = reference.decode_scales(q.scales)
    assert 0 < choice.float().mean() < 1   # both codebooks in use
    # Codebooks of bf16 values: the tensor-core GEMV's lookups need no low parts.
    assert torch.equal(q.codebooks, q.codebooks.bfloat16().float())


def test_joint_beats_polar_at_equal_bits():
    lin = linear(128, 512)
    for bits in (6, 8, 11):
        joint = CODECS["qamw"].from_linear(lin, None, bits=bits)
        polar = CODECS["qamw_polar"].from_linear(lin, None, bits=bits)
        assert joint.bits_per_weight() == polar.bits_per_weight()
        assert output_error(lin, joint, torch.eye(512)) < output_error(lin, polar, torch.eye(512))


# ---------------------------------------------------------------- extension vs reference

@pytest.mark.parametrize("method,config", CONFIGS)
@pytest.mark.parametrize("n", [256, 576, 100])
def test_round_trip_through_the_ops_matches_the_reference(method, config, n):
    lin = linear(48, n, bias=True)
    stats, _ = outlier_stats(n)
    q = CODECS[method].from_linear(lin, stats, **config)
    w = q.dequantize()
    assert w.shape == (48, n) and w.dtype == torch.float32
    if method.startswith("qamw"):
        ref = reference.qamw_dequantize(q.packed, q.codebook, q.row_scale, q.channel_scale,
                                        q.signs, q.bits, q.block_size, q.padded_in)[:, :n]
    elif method == "aaac":
        ref = reference.aaac_dequantize(q.packed, q.scales, q.codebooks, q.tensor_scale,
                                        q.channel_scale, q.group_size)[:, :n]
    else:
        ref = w
    torch.testing.assert_close(w, ref, atol=1e-5, rtol=1e-5)
    x = torch.randn(5, n)
    torch.testing.assert_close(q.gemv(x), x.double().matmul(ref.double().T).float(),
                               atol=1e-3, rtol=1e-4)
    # forward: fused gemv for few rows, dequantize + matmul for many; both add the bias.
    xs = torch.randn(2, 20, n)
    torch.testing.assert_close(q(xs), xs @ ref.T + lin.bias.detach(), atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(q(xs[:, :3]), xs[:, :3] @ ref.T + lin.bias.detach(),
                               atol=1e-3, rtol=1e-4)
    assert q(x.to(torch.bfloat16)).dtype == torch.bfloat16
    # Relative weight error of a 4..6 bpw code on Gaussian weights stays small.
    assert float(((w - lin.weight) ** 2).mean()) < 0.15


@pytest.mark.parametrize("method,config", CONFIGS)
def test_from_meta_rebuilds_the_same_state_dict(method, config):
    lin = linear(40, 576, bias=True)
    stats, _ = outlier_stats(576)
    q = CODECS[method].from_linear(lin, stats, **config)
    meta = json.loads(json.dumps(q.meta()))
    assert meta["method"] == method
    empty = CODECS[method].from_meta(meta)
    a, b = q.state_dict(), empty.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, k
    empty.load_state_dict(a)
    x = torch.randn(3, 576)
    torch.testing.assert_close(empty(x), q(x))
    assert empty.bits_per_weight() == q.bits_per_weight()


def test_bits_per_weight_counts_every_piece():
    m, n = 64, 1024
    lin = linear(m, n)
    stats, _ = outlier_stats(n)
    q = CODECS["qamw"].from_linear(lin, stats, bits=11, alpha=0.5)
    words = 4 * ((n // 2 * 11 + 127) // 128)
    expect = (m * words * 32 + m * 32 + n * 32 + 64) / (m * n)
    assert q.bits_per_weight() == pytest.approx(expect)
    # The fp32 channel scale costs 32 / out_features bits per weight.
    big = CODECS["qamw"].from_linear(linear(512, n), stats, bits=11, alpha=0.5)
    assert 5.5 < big.bits_per_weight() < 5.6
    q = CODECS["qamw"].from_linear(lin, None, bits=8)
    assert q.bits_per_weight() == pytest.approx(4 + 32 / n + 64 / (m * n))
    a = CODECS["aaac"].from_linear(lin, None, variant="int4")
    assert a.bits_per_weight() == pytest.approx(4 + 16 / 128 + 2 * 16 * 32 / (m * n))
    a = CODECS["aaac"].from_linear(lin, None, variant="nvfp4")
    assert a.bits_per_weight() == pytest.approx(4 + 8 / 16 + (2 * 16 * 32 + 32) / (m * n))
    r = CODECS["rtn"].from_linear(lin, None)
    assert r.bits_per_weight() == pytest.approx(4 + 16 / 128 + 4 / 128)
    assert CODECS["nf4"].from_linear(lin, None).bits_per_weight() == pytest.approx(4.25)


def test_group_and_block_choice_for_awkward_widths():
    a = CODECS["aaac"].from_linear(linear(8, 576), None)
    assert a.group_size == 64 and a.padded_in == 576
    q = CODECS["qamw"].from_linear(linear(8, 576), None, bits=6)
    assert q.block_size == 64 and q.padded_in == 576
    q = CODECS["qamw"].from_linear(linear(8, 99), None, bits=6)
    assert q.padded_in % q.block_size == 0 and q.padded_in >= 99 and q.block_size >= 16
    assert q.dequantize().shape == (8, 99)


@pytest.mark.parametrize("n,block,expect", [(576, "whole", 576), (96, "whole", 96),
                                            (128, "whole", 128), (100, 24, 24),
                                            (576, "largest", 576), (1536, "largest", 1536),
                                            (11008 // 8, "largest", 1376 // 43 * 1),
                                            (2 * 43 * 28, "largest", 56), (98, "largest", 16)])
def test_qamw_whole_dimension_and_tabulated_blocks(n, block, expect):
    lin = linear(12, n)
    q = CODECS["qamw"].from_linear(lin, None, bits=10, block_size=block)
    assert q.block_size == expect
    assert q.padded_in % q.block_size == 0 and q.padded_in - n < q.block_size
    # The stored layer reloads with the same block, and its GEMV matches its dense weight.
    again = CODECS["qamw"].from_meta(q.meta())
    again.load_state_dict(q.state_dict())
    x = torch.randn(3, n)
    w = q.dequantize()
    assert torch.allclose(again.gemv(x), x @ w.T, rtol=1e-4, atol=1e-4)
    rel = ((w - lin.weight) ** 2).sum() / (lin.weight ** 2).sum()
    assert rel < 0.01   # 5 bits per weight: about 30 dB


# ---------------------------------------------------------------- bad input and edge cases

@pytest.mark.parametrize("method,config", CONFIGS)
def test_bad_weights_are_clear_errors(method, config):
    cls = CODECS[method]
    for value, word in ((float("nan"), "NaN"), (float("inf"), "Inf")):
        lin = linear(8, 64)
        lin.weight.data[3, 5] = value
        with pytest.raises(ValueError, match=word):
            cls.from_linear(lin, None, **config)
    with pytest.raises(ValueError, match="empty"):
        cls.from_linear(torch.nn.Linear(0, 4), None, **config)
    with pytest.raises(ValueError, match="empty"):
        cls.from_linear(torch.nn.Linear(4, 0), None, **config)
    stats, _ = outlier_stats(63)
    with pytest.raises(ValueError, match="in_features=64"):
        cls.from_linear(linear(8, 64), stats, **config)


@pytest.mark.parametrize("bits", [3, 13, 0, 16])
def test_qamw_bit_widths_outside_4_to_12(bits):
    with pytest.raises(ValueError, match="bits per pair"):
        CODECS["qamw"].from_linear(linear(8, 64), None, bits=bits)


def test_bad_options():
    lin = linear(8, 64)
    with pytest.raises(ValueError, match="row_scale"):
        CODECS["qamw"].from_linear(lin, None, row_scale="max")
    with pytest.raises(ValueError, match="alpha"):
        CODECS["qamw"].from_linear(lin, None, alpha=-1)
    for block in (52, 3, 0, "half", 65536):
        with pytest.raises(ValueError, match="block_size"):
            CODECS["qamw"].from_linear(lin, None, block_size=block)
    with pytest.raises(ValueError, match="whole.*K \\* 2\\^m"):
        CODECS["qamw"].from_linear(linear(8, 104), None, block_size="whole")
    with pytest.raises(ValueError, match="variant"):
        CODECS["aaac"].from_linear(lin, None, variant="int3")
    with pytest.raises(ValueError, match="group_size"):
        CODECS["aaac"].from_linear(lin, None, group_size=100)
    with pytest.raises(ValueError, match="codebook"):
        CODECS["qamw"].from_linear(lin, None, codebook="hex")
    with pytest.raises(ValueError, match="method"):
        CODECS["qamw"].from_meta({"method": "aaac", "in_features": 64, "out_features": 8,
                                  "bias": False})


@pytest.mark.parametrize("method,config", CONFIGS)
def test_zero_rows_and_zero_channels_give_a_correct_result(method, config):
    lin = linear(16, 256)
    lin.weight.data[[2, 7]] = 0.0
    stats, x = outlier_stats(256)
    dead = torch.zeros(256, dtype=torch.bool)
    dead[[0, 9, 100]] = True               # input channels that are exactly zero
    x[:, dead] = 0
    stats = LayerStats(x.abs().mean(0), x.pow(2).mean(0), x[:128], 256)
    q = CODECS[method].from_linear(lin, stats, **config)
    w = q.dequantize()
    assert torch.isfinite(w).all()
    assert (w[[2, 7]] == 0).all()
    assert float(((w - lin.weight)[~torch.isin(torch.arange(16), torch.tensor([2, 7]))]
                  ** 2).mean()) < 0.15
    zero = torch.nn.Linear(256, 4, bias=False)
    zero.weight.data.zero_()
    assert (CODECS[method].from_linear(zero, stats, **config).dequantize() == 0).all()


def test_aaac_zero_scale_keeps_its_codebook_choice():
    from qamw_ext.aaac import _store_scale
    mag = torch.tensor([0.0, 0.0, 1.5])
    choice = torch.tensor([1, 0, 1])
    for dtype in (torch.float16, torch.float8_e4m3fn):
        stored, _ = _store_scale(mag, choice, dtype, 1.0)
        _, got = reference.decode_scales(stored)
        assert got.tolist() == [1, 0, 1]
