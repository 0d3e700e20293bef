"""Hadamard matrices of the orders that are not powers of two, for rotations over a whole
dimension such as 576 = 36 x 16 or 1536 = 12 x 128.

A Hadamard block of size B = K * 2^m is H_K (x) H_{2^m} / sqrt(B): value j = a * 2^m + b of
the block mixes with H_K over a and with the Sylvester matrix over b. K is one of ORDERS, so
the odd part of B picks K (B = 4 * odd * 2^(m)); K = 1 is the plain power-of-two block.
Orders built by Paley's constructions from the quadratic residues mod a prime q:
  Paley I  (q = 3 mod 4, K = q + 1): 12, 20, 44, 60;
  Paley II (q = 1 mod 4, K = 2 (q + 1)): 28, 36.
40 = 2 x 20 needs no table of its own: a block of 40 * 2^m is 20 * 2^(m+1).
csrc/hadamard_tables.h holds the same matrices for the kernels (tools/make_hadamard_tables.py
writes it from this module)."""
import functools

import torch

ORDERS = (12, 20, 28, 36, 44, 60)
_PALEY_I = {12: 11, 20: 19, 44: 43, 60: 59}
_PALEY_II = {28: 13, 36: 17}


def _jacobsthal(q):
    """Q[i, j] = chi(j - i), chi the quadratic character mod the prime q."""
    residues = {(i * i) % q for i in range(1, q)}
    chi = [0] + [1 if r in residues else -1 for r in range(1, q)]
    return torch.tensor([[chi[(j - i) % q] for j in range(q)] for i in range(q)],
                        dtype=torch.int64)


@functools.lru_cache(maxsize=None)
def _matrix(order):
    if order in _PALEY_I:
        q = _PALEY_I[order]
        s = torch.zeros(order, order, dtype=torch.int64)
        s[0, 1:] = 1
        s[1:, 0] = -1
        s[1:, 1:] = _jacobsthal(q)
        h = torch.eye(order, dtype=torch.int64) + s
    elif order in _PALEY_II:
        q = _PALEY_II[order]
        c = torch.zeros(q + 1, q + 1, dtype=torch.int64)
        c[0, 1:] = 1
        c[1:, 0] = 1
        c[1:, 1:] = _jacobsthal(q)
        h = (torch.kron(c, torch.tensor([[1, -1], [-1, -1]]))
             + torch.kron(torch.eye(q + 1, dtype=torch.int64), torch.tensor([[1, 1], [1, -1]])))
    else:
        raise ValueError(f"no tabulated Hadamard matrix of order {order}; orders: {ORDERS}")
    return h.to(torch.int8)


def matrix(order):
    """(order, order) int8 matrix of +-1 with H H^T = order * I."""
    return _matrix(order).clone()


def split_block(block):
    """(K, 2^m) with block = K * 2^m, K = 1 or one of ORDERS; ValueError if there is none."""
    if isinstance(block, bool) or not isinstance(block, int) or block < 2:
        raise ValueError(f"a Hadamard block must be an integer >= 2, got {block!r}")
    pow2 = block & -block
    if pow2 == block:
        return 1, block
    for order in ORDERS:
        if block % order == 0 and (block // order) & (block // order - 1) == 0:
            return order, block // order
    raise ValueError(f"block {block} is neither a power of two nor K * 2^m with K in {ORDERS}")

