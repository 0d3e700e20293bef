"""Lloyd-Max quantizers and the shipped codebooks: known answers and fixed-point checks."""
import json
import math

import numpy as np
import pytest
import torch
from scipy import integrate

from qamw_ext import codebooks, lloyd_max

BITS = list(range(4, 13))

# Max (1960), Table I: MSE of the optimal N-level quantizer of N(0, 1).
MAX_1960 = {2: 0.3634, 4: 0.1175, 8: 0.03454, 16: 0.009497}


pytestmark = pytest.mark.usefixtures("one_thread")



def three_digits(x):
    return float(f"{x:.3g}")


@pytest.mark.parametrize("levels", sorted(MAX_1960))
def test_scalar_gaussian_matches_max_1960(levels):
    c, mse = lloyd_max.lloyd_max_scalar(levels, "gaussian")
    assert three_digits(mse) == three_digits(MAX_1960[levels])
    assert mse == pytest.approx(MAX_1960[levels], rel=1e-3)
    # Symmetric levels, each the centroid of its cell.
    np.testing.assert_allclose(c, -c[::-1], atol=1e-10)


def test_scalar_mse_against_numerical_integration():
    for density, pdf, lo in (("gaussian", lambda x: math.exp(-x * x / 2) / math.sqrt(2 * math.pi),
                              -np.inf),
                             ("rayleigh", lambda r: r * math.exp(-r * r / 2), 0.0)):
        c, mse = lloyd_max.lloyd_max_scalar(4, density)
        edges = [lo] + list((c[1:] + c[:-1]) / 2) + [np.inf]
        num = sum(integrate.quad(lambda x, q=q: (x - q) ** 2 * pdf(x), a, b)[0]
                  for a, b, q in zip(edges[:-1], edges[1:], c))
        assert mse == pytest.approx(num, rel=1e-7)


def test_rayleigh_lloyd_max_is_a_fixed_point():
    c, _ = lloyd_max.lloyd_max_scalar(8, "rayleigh")
    edges = np.concatenate([[0.0], (c[1:] + c[:-1]) / 2, [np.inf]])
    p, m1, _ = lloyd_max.Rayleigh.moments(edges[:-1], edges[1:])
    np.testing.assert_allclose(m1 / p, c, atol=1e-10)


def test_quadrature_is_exact_for_moments():
    q = lloyd_max.Quadrature2D(64, 50)
    assert q.mass.sum() == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(q.mass @ q.centroid, [0, 0], atol=1e-12)
    assert q.second.sum() == pytest.approx(2.0, abs=1e-10)   # E|x|^2 = 2


@pytest.mark.parametrize("bits", BITS)
def test_shipped_codebook_is_a_lloyd_fixed_point(bits):
    cb = codebooks.qam_codebook(bits)
    assert cb.shape == (1 << bits, 2) and cb.dtype == torch.float32
    assert torch.isfinite(cb).all() and len(torch.unique(cb, dim=0)) == 1 << bits
    c = cb.double().numpy()
    k = 1 << bits
    spacing = math.sqrt(4 * math.pi / k)       # central cell spacing
    local = spacing * np.exp((c ** 2).sum(1) / 8)  # cells grow like exp(|x|^2 / 8)
    # Exact fixed point of the final training quadrature (up to the fp32 storage).
    final = json.loads(codebooks.metadata()["stages"])[f"qam{bits}"][-1]
    _, mass, m1, _ = lloyd_max.cell_moments(c, lloyd_max.Quadrature2D(k, final))
    move = np.linalg.norm(m1 / mass[:, None] - c, axis=1)
    assert (move / local).max() < 1e-3
    # On an independent, finer quadrature each point is still its cell's centroid up to the
    # quadrature's own error (measured: mean 0.3 %, max < 20 % of the local spacing).
    if bits <= 10:
        _, mass, m1, _ = lloyd_max.cell_moments(c, lloyd_max.Quadrature2D(k, 2 * final))
        move = np.linalg.norm(m1 / mass[:, None] - c, axis=1)
        assert (mass * move).sum() / spacing < 0.01
        assert (move / local).max() < 0.2


def test_shipped_mse_matches_its_metadata():
    for bits in (4, 8):
        cb = codebooks.qam_codebook(bits).double().numpy()
        q = lloyd_max.Quadrature2D(1 << bits, 800)
        assert lloyd_max.mse_2d(cb, q) == pytest.approx(codebooks.codebook_mse(f"qam{bits}"),
                                                        rel=1e-4)


@pytest.mark.parametrize("bits", [7, 8, 11, 12])
def test_bf16_points_are_the_nearest_bf16_values_at_a_small_cost(bits):
    trained = codebooks.qam_codebook(bits)
    points = codebooks.get(f"qam{bits}", "bf16")
    assert torch.equal(points, points.bfloat16().float())
    assert torch.equal(points, points.half().float())
    # Nearest: within half a bf16 unit in the last place (8 significant bits), or 0 below
    # fp16's smallest normal value.
    tiny = trained.abs() < 2.0 ** -14
    assert ((points - trained)[~tiny].abs() <= trained[~tiny].abs() * 2.0 ** -8).all()
    assert (points[tiny] == 0).all() and (points[~tiny] != 0).all()
    q = lloyd_max.Quadrature2D(1 << bits, 50)
    fp32, bf16 = (lloyd_max.mse_2d(c.double().numpy(), q) for c in (trained, points))
    assert bf16 < fp32 * 1.005
    with pytest.raises(ValueError, match="codebook points"):
        codebooks.get(f"qam{bits}", "fp16")


def test_joint_2d_beats_scalar_at_8_bits_per_pair():
    mse = codebooks.codebook_mse("qam8")
    assert mse < MAX_1960[16]
    # Also on a finer quadrature than the one it was trained on.
    fine = lloyd_max.mse_2d(codebooks.qam_codebook(8).double().numpy(),
                            lloyd_max.Quadrature2D(256, 3200))
    assert fine < MAX_1960[16]


def test_about_3_db_per_bit_per_pair_at_high_rate():
    mse = {b: codebooks.codebook_mse(f"qam{b}") for b in BITS}
    for b in range(8, 12):
        db = 10 * math.log10(mse[b] / mse[b + 1])
        assert 2.7 < db < 3.3, (b, db)
    # 6 dB per bit per dimension: two extra bits per pair = one bit per dimension.
    assert 10 * math.log10(mse[8] / mse[10]) == pytest.approx(6.02, abs=0.3)


def test_joint_beats_polar_at_every_rate():
    for b in BITS:
        assert codebooks.codebook_mse(f"qam{b}") < codebooks.codebook_mse(f"polar{b}")
        assert codebooks.polar_codebook(b).shape == (1 << b, 2)


def test_training_is_deterministic_and_reproduces_the_shipped_file():
    a, mse_a, _ = lloyd_max.lloyd_max_2d(16)
    b, mse_b, _ = lloyd_max.lloyd_max_2d(16)
    np.testing.assert_array_equal(a, b)
    assert mse_a == mse_b
    np.testing.assert_allclose(a.astype(np.float32), codebooks.qam_codebook(4).numpy(),
                               atol=1e-6)


def test_fixed_tables():
    nf4 = codebooks.nf4_levels()
    assert nf4.shape == (16,) and nf4[0] == -1 and nf4[-1] == 1 and nf4[7] == 0
    e2m1 = codebooks.e2m1_levels()
    assert e2m1.shape == (16,) and e2m1.max() == 6 and e2m1.min() == -6


@pytest.mark.parametrize("bad", [3, 13, 0, -1, 8.0, "8", None, True])
def test_bad_bit_widths(bad):
    with pytest.raises(ValueError, match="bits"):
        codebooks.qam_codebook(bad)
