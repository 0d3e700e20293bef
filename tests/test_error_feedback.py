"""Error feedback: QAM-W (GPTQ/LDLQ-style rounding in the rotated, scaled coordinates) and
GPTQ on the RTN INT4 format."""
import pytest
import torch

import qamw_ext.qamw  # noqa: F401  (registers the codec)
from qamw_ext import ops
from qamw_ext.convert import get_config
from qamw_ext.baselines import RTNLinear
from qamw_ext.qamw import QAMWLinear
from qamw_ext.quantized_linear import LayerStats

pytestmark = pytest.mark.usefixtures("one_thread")


def correlated_layer(m=48, n=128, rows=2048, seed=0):
    """A linear layer and inputs with a non-diagonal covariance and a few loud channels."""
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(n, m, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(m, n, generator=g))
    mix = torch.eye(n) + 2.0 * torch.randn(n, n, generator=g) / n ** 0.5
    x = torch.randn(rows, n, generator=g) @ mix
    x[:, :4] *= 6.0
    stats = LayerStats(x.abs().mean(0), x.pow(2).mean(0), x[:256], rows, hessian=x.T @ x / rows)
    return lin, stats, x


def output_error(lin, q, x):
    return float(((x @ (lin.weight.detach() - q.dequantize()).T) ** 2).sum())


@pytest.mark.parametrize("opts", [{"bits": 7}, {"bits": 11}, {"bits": 8, "row_scale": "norm"},
                                  {"bits": 8, "per_block_scale": True, "block_size": 32},
                                  {"bits": 8, "alpha": 0.0, "row_scale": "auto"},
                                  {"bits": 8, "ef_search": True}])
def test_error_feedback_lowers_the_output_error(opts):
    lin, stats, x = correlated_layer()
    plain = QAMWLinear.from_linear(lin, stats, **opts)
    ef = QAMWLinear.from_linear(lin, stats, error_feedback=True, **opts)
    assert output_error(lin, ef, x) < 0.8 * output_error(lin, plain, x)
    assert ef.bits_per_weight() == plain.bits_per_weight()
    assert ef.packed.shape == plain.packed.shape and ef.row_scale.shape == plain.row_scale.shape
    codes = ops.unpack_bits(ef.packed, opts["bits"], ef.padded_in // 2)
    assert int(codes.min()) >= 0 and int(codes.max()) < 2 ** opts["bits"]
    assert torch.isfinite(ef.row_scale).all()


def test_padded_width_and_zero_rows():
    lin, stats, x = correlated_layer(m=8, n=99)
    with torch.no_grad():
        lin.weight[3].zero_()
    q = QAMWLinear.from_linear(lin, stats, bits=8, error_feedback=True)
    assert q.padded_in > q.in_features
    assert torch.equal(q.dequantize()[3], torch.zeros(99))
    plain = QAMWLinear.from_linear(lin, stats, bits=8)
    assert output_error(lin, q, x) < output_error(lin, plain, x)


def test_deterministic():
    lin, stats, _ = correlated_layer()
    a = QAMWLinear.from_linear(lin, stats, bits=8, error_feedback=True)
    b = QAMWLinear.from_linear(lin, stats, bits=8, error_feedback=True)
    for k, t in a.state_dict().items():
        assert torch.equal(t, b.state_dict()[k]), k


def test_bad_hessian_is_a_clear_error():
    lin, stats, _ = correlated_layer(n=64)
    with pytest.raises(ValueError, match="hessian"):
        QAMWLinear.from_linear(lin, None, error_feedback=True)
    with pytest.raises(ValueError, match="hessian"):
        QAMWLinear.from_linear(lin, LayerStats(stats.mean_abs, stats.mean_sq, stats.sample, 1),
                               error_feedback=True)
    bad = LayerStats(stats.mean_abs, stats.mean_sq, stats.sample, 1, hessian=torch.eye(32))
    with pytest.raises(ValueError, match=r"shape \(64, 64\)"):
        QAMWLinear.from_linear(lin, bad, error_feedback=True)
    h = stats.hessian.clone()
    h[1, 2] = float("nan")
    bad = LayerStats(stats.mean_abs, stats.mean_sq, stats.sample, 1, hessian=h)
    with pytest.raises(ValueError, match="NaN or Inf"):
        QAMWLinear.from_linear(lin, bad, error_feedback=True)
    with pytest.raises(ValueError, match="error_feedback"):
        QAMWLinear.from_linear(lin, stats, error_feedback="yes")
    with pytest.raises(ValueError, match="ef_search"):
        QAMWLinear.from_linear(lin, stats, error_feedback=True, ef_search=1)


def test_configs_ask_for_the_hessian_only_with_error_feedback():
    assert QAMWLinear.uses_hessian(get_config("qamw-5.5-ef").options)
    assert not QAMWLinear.uses_hessian(get_config("qamw-5.5").options)


@pytest.mark.parametrize("m,n,group", [(48, 128, 128), (37, 200, 64), (16, 300, 128),
                                       (20, 96, 32)])
def test_gptq_lowers_the_output_error_and_keeps_the_format(m, n, group):
    lin, stats, x = correlated_layer(m=m, n=n)
    rtn = RTNLinear.from_linear(lin, None, group_size=group)
    gptq = RTNLinear.from_linear(lin, stats, group_size=group, error_feedback=True)
    assert output_error(lin, gptq, x) < 0.8 * output_error(lin, rtn, x)
    assert gptq.bits_per_weight() == rtn.bits_per_weight()
    for k, t in rtn.state_dict().items():
        assert gptq.state_dict()[k].shape == t.shape, k
    # Every code and zero point is a 4-bit value, and each group's zero point is what its
    # scale implies: the stored model dequantizes through the same path as RTN's.
    codes = ops.unpack_bits(gptq.packed, 4, n)
    assert int(codes.min()) >= 0 and int(codes.max()) <= 15
    assert torch.isfinite(gptq.dequantize()).all()


def test_gptq_equals_rtn_when_the_inputs_are_uncorrelated():
    # With H = I every column's error moves nothing, so GPTQ is round-to-nearest.
    lin, stats, _ = correlated_layer(m=24, n=128)
    eye = LayerStats(stats.mean_abs, stats.mean_sq, stats.sample, 1, hessian=torch.eye(128))
    gptq = RTNLinear.from_linear(lin, eye, group_size=64, error_feedback=True)
    rtn = RTNLinear.from_linear(lin, None, group_size=64)
    for k, t in rtn.state_dict().items():
        assert torch.equal(gptq.state_dict()[k], t), k


def test_gptq_needs_a_hessian():
    lin, stats, _ = correlated_layer(n=64)
    with pytest.raises(ValueError, match="hessian"):
        RTNLinear.from_linear(lin, None, error_feedback=True)
    with pytest.raises(ValueError, match="error_feedback"):
        RTNLinear.from_linear(lin, stats, error_feedback=1)
    assert RTNLinear.uses_hessian(get_config("gptq-int4-g128").options)
    assert not RTNLinear.uses_hessian(get_config("rtn-int4-g128").options)


@pytest.mark.parametrize("opts", [{"variant": "int4"}, {"variant": "nvfp4"},
                                  {"variant": "int4", "channel_scaling": True},
                                  {"variant": "int4", "group_size": 32}])
def test_aaac_error_feedback_lowers_the_output_error(opts):
    from qamw_ext.aaac import AAACLinear

    lin, stats, x = correlated_layer(m=40, n=160)
    plain = AAACLinear.from_linear(lin, stats, **opts)
    ef = AAACLinear.from_linear(lin, stats, error_feedback=True, **opts)
    assert output_error(lin, ef, x) < 0.8 * output_error(lin, plain, x)
    assert ef.bits_per_weight() == plain.bits_per_weight()
    # Only the codes change: the fit's scales (and their codebook choices) are kept.
    assert torch.equal(ef.scales.view(torch.uint8) if ef.scales.dtype == torch.float8_e4m3fn
                       else ef.scales, plain.scales.view(torch.uint8)
                       if plain.scales.dtype == torch.float8_e4m3fn else plain.scales)
    assert torch.equal(ef.codebooks, plain.codebooks)
    assert AAACLinear.uses_hessian(get_config("aaac-int4-ef").options)
    with pytest.raises(ValueError, match="hessian"):
        AAACLinear.from_linear(lin, None, error_feedback=True, **opts)
