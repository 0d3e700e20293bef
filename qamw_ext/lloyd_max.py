"""Lloyd-Max quantizers, trained deterministically (no random samples anywhere).

Scalar: for the standard Gaussian and the unit Rayleigh density (the amplitude of N(0, I2)),
with every cell's probability, first and second moment in closed form (erf / exp), so the
Lloyd iteration and the MSE are exact up to float64 rounding.

2-D: for the unit circular Gaussian N(0, I2), on a fixed quadrature of annular sectors whose
probability, centroid and second moment are exact. The sectors are finer where codewords are
denser (their size follows the asymptotically optimal point density, proportional to
f(x)^(1/2) = exp(-|x|^2 / 4)), about `cells_per_point` sectors per codeword. A codeword's cell
is the union of the sectors whose centroid is nearest to it, so the Lloyd iteration runs on a
discrete measure and stops at an exact fixed point of that measure (no assignment changes).
The MSE includes each sector's own spread, so it is exact for the final partition.
"""
import math

import numpy as np
from scipy.special import erf

SQRT2 = math.sqrt(2.0)
SQRT2PI = math.sqrt(2.0 * math.pi)


# ---------------------------------------------------------------- scalar densities

def _phi(x):
    with np.errstate(over="ignore", invalid="ignore"):
        return np.where(np.isfinite(x), np.exp(-0.5 * np.square(x)) / SQRT2PI, 0.0)


def _Phi(x):
    return 0.5 * (1.0 + erf(x / SQRT2))


class Gaussian:
    """Standard normal: probability, first and second moment of [a, b] in closed form."""
    name = "gaussian"
    support = (-np.inf, np.inf)

    @staticmethod
    def moments(a, b):
        p = _Phi(b) - _Phi(a)
        m1 = _phi(a) - _phi(b)
        # integral of x^2 phi = Phi(x) - x phi(x); x phi(x) -> 0 at +-inf
        with np.errstate(invalid="ignore"):
            xa = np.where(np.isfinite(a), a * _phi(a), 0.0)
            xb = np.where(np.isfinite(b), b * _phi(b), 0.0)
        m2 = p - (xb - xa)
        return p, m1, m2

    @staticmethod
    def quantile(q):
        from scipy.special import ndtri
        return ndtri(q)


class Rayleigh:
    """Unit Rayleigh f(r) = r exp(-r^2/2), r >= 0 (the radius of N(0, I2))."""
    name = "rayleigh"
    support = (0.0, np.inf)

    @staticmethod
    def _antiderivatives(r):
        finite = np.isfinite(r)
        e = np.where(finite, np.exp(-0.5 * np.square(np.where(finite, r, 0.0))), 0.0)
        rr = np.where(finite, r, 0.0)
        cdf = 1.0 - e
        m1 = -rr * e + SQRT2PI * _Phi(r)        # d/dr = r^2 exp(-r^2/2)
        m2 = -(np.square(rr) + 2.0) * e         # d/dr = r^3 exp(-r^2/2)
        return cdf, m1, m2

    @classmethod
    def moments(cls, a, b):
        ca, ma, sa = cls._antiderivatives(np.asarray(a, dtype=np.float64))
        cb, mb, sb = cls._antiderivatives(np.asarray(b, dtype=np.float64))
        return cb - ca, mb - ma, sb - sa

    @staticmethod
    def quantile(q):
        return np.sqrt(-2.0 * np.log1p(-q))


DENSITIES = {"gaussian": Gaussian, "rayleigh": Rayleigh}


def scalar_mse(levels, density):
    """Exact MSE of nearest-level quantization of `density` with sorted `levels`."""
    d = DENSITIES[density] if isinstance(density, str) else density
    levels = np.asarray(levels, dtype=np.float64)
    edges = np.concatenate([[d.support[0]], 0.5 * (levels[1:] + levels[:-1]), [d.support[1]]])
    p, m1, m2 = d.moments(edges[:-1], edges[1:])
    return float(np.sum(m2 - 2.0 * levels * m1 + np.square(levels) * p))


def lloyd_max_scalar(levels, density="gaussian", tol=1e-13, max_iter=200000):
    """(levels, mse) of the Lloyd-Max quantizer with `levels` levels for a density
    ("gaussian" or "rayleigh"), started from the density's quantiles at (i + 1/2) / L and
    iterated until no level moves by more than tol."""
    d = DENSITIES[density] if isinstance(density, str) else density
    if not isinstance(levels, int) or levels < 1:
        raise ValueError(f"levels must be a positive integer, got {levels!r}")
    c = d.quantile((np.arange(levels) + 0.5) / levels)
    for _ in range(max_iter):
        edges = np.concatenate([[d.support[0]], 0.5 * (c[1:] + c[:-1]), [d.support[1]]])
        p, m1, _ = d.moments(edges[:-1], edges[1:])
        new = m1 / p
        # Over-relaxation (step 1.8) reaches the same fixed point far faster for many levels.
        step = new + 0.8 * (new - c)
        if not np.all(np.diff(step) > 0):
            step = new
        done = np.max(np.abs(new - c)) < tol
        c = new if done else step
        if done:
            break
    return c, scalar_mse(c, d)


# ---------------------------------------------------------------- 2-D quadrature of N(0, I2)

class Quadrature2D:
    """Annular sectors covering the disc of radius r_max (the rest of the plane, of mass
    exp(-r_max^2/2), is the outermost ring, unbounded). Arrays (float64): mass (N,),
    centroid (N, 2), second moment E|x|^2 restricted to each sector (N,)."""

    def __init__(self, points, cells_per_point=200, r_max=7.0):
        # Radial step ~ h0 * exp(r^2/8): uniform in u(r) = sqrt(2 pi) erf(r / (2 sqrt 2)).
        h0 = math.sqrt(4.0 * math.pi / (cells_per_point * points))
        u_max = SQRT2PI * math.erf(r_max / (2 * SQRT2))
        rings = max(4, int(math.ceil(u_max / h0)))
        from scipy.special import erfinv
        u = np.linspace(0.0, u_max, rings + 1)
        r = 2 * SQRT2 * erfinv(np.clip(u / SQRT2PI, 0.0, 1.0))
        r[-1] = np.inf
        r0, r1 = r[:-1], r[1:]
        rmid = np.where(np.isfinite(r1), 0.5 * (r0 + r1), r0 + 1.0)
        step = h0 * np.exp(np.square(rmid) / 8.0)
        sectors = np.maximum(8, np.ceil(2 * math.pi * rmid / step)).astype(np.int64)
        # A multiple of 4 sectors per ring keeps the measure symmetric under 90-degree
        # rotations and puts sector edges on the axes.
        sectors = (sectors + 3) // 4 * 4
        p, m1, m2 = Rayleigh.moments(r0, r1)
        ring = np.repeat(np.arange(rings), sectors)
        first = np.repeat(np.cumsum(sectors) - sectors, sectors)
        k = np.arange(ring.size) - first
        dth = 2 * math.pi / sectors[ring]
        t0 = k * dth
        t1 = t0 + dth
        mean_cos = (np.sin(t1) - np.sin(t0)) / dth
        mean_sin = (np.cos(t0) - np.cos(t1)) / dth
        n = sectors[ring]
        self.mass = p[ring] / n
        mean_r = m1[ring] / p[ring]
        self.centroid = np.stack([mean_r * mean_cos, mean_r * mean_sin], axis=1)
        self.second = m2[ring] / n            # integral of |x|^2 over the sector
        self.size = self.mass.size
        self._points32 = None

    def points32(self):
        """The sector centroids as an fp32 torch tensor (cached), for the nearest search."""
        if self._points32 is None:
            import torch
            self._points32 = torch.from_numpy(self.centroid.astype(np.float32))
        return self._points32


def _torch_nearest(points, codebook):
    """Nearest codeword through the extension's op when it loads, else the reference.
    points: fp32 torch tensor (N, 2); codebook: float64 numpy (K, 2)."""
    import torch
    try:
        from . import ops
        fn = ops.nearest_codeword_2d
    except Exception:  # the extension is not built: the pure-PyTorch reference is exact too
        from . import reference
        fn = reference.nearest_codeword_2d
    idx = fn(points, torch.from_numpy(codebook.astype(np.float32)))
    return idx.numpy().astype(np.int64)


def cell_moments(codebook, quad):
    """(assignment, mass, first moment, second moment) of each codeword's cell."""
    k = codebook.shape[0]
    idx = _torch_nearest(quad.points32(), codebook)
    mass = np.bincount(idx, weights=quad.mass, minlength=k)
    m1 = np.stack([np.bincount(idx, weights=quad.mass * quad.centroid[:, d], minlength=k)
                   for d in range(2)], axis=1)
    m2 = np.bincount(idx, weights=quad.second, minlength=k)
    return idx, mass, m1, m2


def mse_2d(codebook, quad):
    """MSE per dimension of nearest-codeword quantization of N(0, I2) (on the quadrature)."""
    _, mass, m1, m2 = cell_moments(codebook, quad)
    total = np.sum(m2 - 2 * np.sum(codebook * m1, axis=1) + mass * np.sum(codebook**2, axis=1))
    return float(total) / 2.0


def hex_init(points):
    """Deterministic start: the `points` hexagonal-lattice points nearest the origin, warped
    radially so their density follows exp(-|x|^2 / 4) (the optimal point density)."""
    side = int(math.ceil(math.sqrt(points))) + 4
    i, j = np.meshgrid(np.arange(-side, side + 1), np.arange(-side, side + 1), indexing="ij")
    x = (i + 0.5 * j).ravel().astype(np.float64)
    y = (j * math.sqrt(3) / 2).ravel()
    r2 = x * x + y * y
    ang = np.arctan2(y, x)
    order = np.lexsort((np.round(ang, 9), np.round(r2, 9)))[:points]
    x, y, r2 = x[order], y[order], r2[order]
    # A uniform disc holding `points` lattice points has area points * sqrt(3)/2.
    area = points * math.sqrt(3) / 2
    q = np.clip(math.pi * r2 / area, 0, None) * points / (points + 1.0)
    q = np.minimum(q, points / (points + 1.0))
    r_new = np.sqrt(-4.0 * np.log1p(-q))
    scale = np.where(r2 > 0, r_new / np.sqrt(np.where(r2 > 0, r2, 1.0)), 0.0)
    return np.stack([x * scale, y * scale], axis=1)


def lloyd_max_2d(points, init=None, stages=(50, 200, 800), max_iter=2000, relax=1.5,
                 tol=1e-7, verbose=False):
    """(codebook (K, 2) float64, mse per dimension, quadrature) of the Lloyd-Max quantizer
    of N(0, I2) with K = `points` codewords.

    Lloyd on a discrete measure stops as soon as its partition stops changing, which on a
    coarse quadrature is long before the continuous problem has converged; so the iteration
    runs on quadratures of `stages` sectors per codeword, coarse to fine, each stage until
    its partition is stable (an exact fixed point of that measure) or no codeword moves by
    more than tol x the central cell spacing. `relax` > 1 over-relaxes the steps (the same
    fixed points, reached faster); the last steps of every stage are plain Lloyd steps."""
    spacing = math.sqrt(4 * math.pi / points)
    c = hex_init(points) if init is None else np.asarray(init, dtype=np.float64).copy()
    quad = None
    for cpp in stages:
        quad = Quadrature2D(points, cpp)
        prev = None
        for it in range(1, max_iter + 1):
            idx, mass, m1, _ = cell_moments(c, quad)
            empty = mass <= 0
            new = np.where(empty[:, None], c, m1 / np.where(empty, 1.0, mass)[:, None])
            move = np.max(np.abs(new - c)) / spacing
            if (prev is not None and np.array_equal(idx, prev)) or move < tol:
                c = new
                break
            c = c + (relax if move > 1e-3 else 1.0) * (new - c)
            prev = idx
            if verbose and it % 100 == 0:
                print(f"  K={points} cpp={cpp} it={it} move={move:.2e}", flush=True)
        if verbose:
            print(f"  K={points} cpp={cpp}: {it} iterations, mse {mse_2d(c, quad):.7g}",
                  flush=True)
    return c, mse_2d(c, quad), quad


def polar_codebook(bits, quad=None):
    """(codebook (2^bits, 2), mse per dimension, (amplitudes, phases)) of the best polar
    product quantizer: A Rayleigh Lloyd-Max amplitudes x P uniform phases, A * P = 2^bits,
    the split (A, P) chosen by the lowest 2-D nearest-codeword MSE. A <= 2^ceil(b/2): with
    more amplitudes than phases the outer rings are far too sparse (the best split has
    P = 2 to 4 A at every b)."""
    k = 1 << bits
    quad = quad or Quadrature2D(k, 50)
    best = None
    for a_bits in range(0, (bits + 1) // 2 + 1):
        amps, _ = lloyd_max_scalar(1 << a_bits, "rayleigh", tol=1e-11)
        phases = 1 << (bits - a_bits)
        theta = (np.arange(phases) + 0.5) * 2 * math.pi / phases
        cb = np.stack([(amps[:, None] * np.cos(theta)).ravel(),
                       (amps[:, None] * np.sin(theta)).ravel()], axis=1)
        mse = mse_2d(cb, quad)
        if best is None or mse < best[1]:
            best = (cb, mse, (1 << a_bits, phases))
    return best
