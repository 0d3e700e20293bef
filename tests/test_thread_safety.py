"""The CPU ops called from several Python threads at once give exactly the results of
serial calls (the ops release the GIL; the 2-D codeword search shares a cache of grids)."""
import concurrent.futures
import random

import pytest
import torch

from qamw_ext import ops

pytestmark = pytest.mark.usefixtures("one_thread")


def _jobs():
    g = torch.Generator().manual_seed(0)
    jobs = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = torch.randn(7, 384, generator=g).to(dtype)
        signs = (torch.randint(0, 2, (384,), generator=g) * 2 - 1).to(torch.int8)
        jobs.append(lambda x=x, s=signs: ops.hadamard(x, 128, s))
    # More distinct codebooks than the grid cache holds, so entries are evicted while in use.
    for k in range(12):
        cb = torch.randn(64 * (k + 1), 2, generator=g)
        pts = torch.randn(4000, 2, generator=g) * 1.5
        jobs.append(lambda p=pts, c=cb: ops.nearest_codeword_2d(p, c))
    for k in range(3):
        cb, vals = torch.randn(15 + k, generator=g), torch.randn(3000, generator=g)
        jobs.append(lambda v=vals, c=cb: ops.nearest_codeword_1d(v, c))
    for bits in (3, 11, 16):
        codes = torch.randint(0, 2**bits, (9, 301), generator=g, dtype=torch.int32)
        jobs.append(lambda c=codes, b=bits: ops.unpack_bits(ops.pack_bits(c, b), b, 301))
    for bits, per_block in ((5, False), (8, True), (11, True)):
        m, n, block = 33, 256, 64
        codes = torch.randint(0, 2**bits, (m, n // 2), generator=g, dtype=torch.int32)
        w = (ops.pack_bits(codes, bits), torch.randn(2**bits, 2, generator=g),
             torch.rand((m, n // block) if per_block else (m,), generator=g) + 0.5,
             torch.rand(n, generator=g) + 0.5,
             (torch.randint(0, 2, (n,), generator=g) * 2 - 1).to(torch.int8), bits, block)
        x = torch.randn(3, n, generator=g)
        jobs.append(lambda x=x, w=w: ops.qamw_gemv(x, *w))
        jobs.append(lambda w=w, n=n: ops.qamw_dequantize(*w, n, torch.bfloat16))
    for scale_dtype, group in ((torch.float16, 128), (torch.float8_e4m3fn, 16)):
        m, n = 29, 256
        codes = torch.randint(0, 16, (m, n), generator=g, dtype=torch.int32)
        w = (ops.pack_bits(codes, 4), torch.randn(m, n // group, generator=g).to(scale_dtype),
             torch.randn(2, 16, generator=g), torch.tensor([0.7]), torch.rand(n, generator=g) + 0.5,
             group)
        x = torch.randn(5, n, generator=g).half()
        jobs.append(lambda x=x, w=w: ops.aaac_gemv(x, *w))
        jobs.append(lambda w=w: ops.aaac_dequantize(*w, torch.float16))
    return jobs


def test_ops_from_many_threads_match_serial_results():
    jobs = _jobs()
    serial = [job() for job in jobs]
    order = [i for i in range(len(jobs)) for _ in range(6)]
    random.Random(0).shuffle(order)
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda i: (i, jobs[i]()), order))
    assert len(results) == len(order)
    for i, out in results:
        assert out.dtype == serial[i].dtype and torch.equal(out, serial[i]), i
