"""Shared-memory wavefronts of the GEMV kernels' data-dependent loads, by simulation: the
figures behind the GPU predictions in benchmarks/NOTES.md, reproducible without a GPU.

Model: 32 banks of 4 bytes. A warp's 4-byte loads are served all at once, its 8-byte loads a
half-warp (16 lanes) at a time and a 16-byte load a quarter-warp at a time; within one such group, lanes that read the same
word share it (broadcast) and each bank serves one distinct word per wavefront, so the group
costs max over banks of the distinct words it must deliver.

Staging and rotation (rotation_wavefronts): the stores of stage_activation and the passes of
fwht_shared over one padded activation row, per CTA; every CTA of a QAM-W GEMV does this.

QAM-W codeword loads: lane l reads entry code_l (uniformly random) of copy l % copies, at index
code * copies + l % copies: a float2 for fp32 activations, a half2 for fp16 / bf16 ones. AAAC activation loads: lanes of a row read consecutive
16-byte vectors (36 floats apart per chunk), and the 32 / G rows of a warp read the same ones.

    python benchmarks/smem_wavefronts.py [--trials 20000]
"""
import argparse

import numpy as np

BANKS = 32


def wavefronts(word_addresses, group):
    """Wavefronts of one warp load: word_addresses[lane] is the list of 4-byte words lane reads."""
    total = 0
    for start in range(0, 32, group):
        per_bank = {}
        for lane in range(start, start + group):
            for word in word_addresses[lane]:
                per_bank.setdefault(word % BANKS, set()).add(word)
        total += max(len(words) for words in per_bank.values())
    return total


def codebook_wavefronts(bits, copies, trials, rng, entry_bytes=8):
    """Mean wavefronts of a warp's codeword load: float2 (entry_bytes 8) or half2 (4) entries."""
    words = entry_bytes // 4
    counts = []
    for _ in range(trials):
        codes = rng.integers(0, 1 << bits, size=32)
        index = codes * copies + np.arange(32) % copies   # entry index
        counts.append(wavefronts([[words * i + w for w in range(words)] for i in index],
                                 16 if words == 2 else 32))
    return float(np.mean(counts))


def activation_wavefronts(group_lanes, pair_bytes, unit=128):
    """QAM-W (8-byte pairs, units of `unit` pairs + 1 padding pair: 128 for batches > 1, 64 at
    batch 1, where a lane decodes two rows) or AAAC (16-byte vectors, chunks of 36 floats):
    lane `sub` of each row (pair of rows) reads unit `sub`, same offset j = 0."""
    words = []
    for lane in range(32):
        sub = lane % group_lanes
        if pair_bytes == 8:
            base = 2 * (sub * (unit + 1))                # float index of pair 0 of unit sub
            words.append([base, base + 1])
        else:
            base = sub * 36
            words.append([base, base + 1, base + 2, base + 3])
    return wavefronts(words, 16 if pair_bytes == 8 else 8)


def padded_index(j, shift=7):
    """The QAM-W kernel's rotated-activation layout: two padding floats after every 2^shift,
    a unit of pairs: 64 pairs at batch 1 (v3), 128 for larger batches and in v2."""
    return j + 2 * (j >> shift)


def padded_index_v2(j):
    return padded_index(j, 8)


def plain_index(j):
    """The dequantize and rotate kernels' tiles: no padding."""
    return j


def staging_wavefronts(n, swizzled, index=padded_index):
    """Stores of stage_activation for one row of n values (the padded layout unless `index`
    says otherwise): lane t of a warp stores piece t (8 values) as 4 float2, in order or
    rotated by lane / 4."""
    total = 0
    for p0 in range(0, n // 8, 32):
        for i in range(4):
            words = []
            for lane in range(32):
                k = (i + lane // 4) % 4 if swizzled else i
                a = index(8 * (p0 + lane)) + 2 * k
                words.append([a, a + 1])
            total += wavefronts(words, 16)
    return total


def fwht_wavefronts(n, block, first_bit, index=padded_index):
    """Loads and stores of fwht_shared over one row of n values (padded unless `index` says
    otherwise), blocks of `block`, index bits first_bit.. of each block: 8 values a thread,
    3 bits a pass."""
    lb = block.bit_length() - 1
    total, lh = 0, first_bit
    while lh < lb:
        r = min(3, lb - lh)
        for g0 in range(0, n >> r, 32):
            for i in range(1 << r):
                words = []
                for q in range(g0, g0 + 32):
                    base = ((q >> lh) << (lh + r)) | (q & ((1 << lh) - 1))
                    words.append([index(base + (i << lh))])
                total += 2 * wavefronts(words, 32)
        lh += r
    return total


def rotation_wavefronts(n, block, version):
    """Shared-memory wavefronts a QAM-W GEMV CTA spends staging and rotating one activation row
    of n values: "v2" stages in order and transforms every bit in shared memory; "v3" does bits
    0-2 in registers and 3-4 with shuffles (not counted here: 16 per warp and 256 values) while
    staging, with rotated stores."""
    if version == "v2":
        return (staging_wavefronts(n, False, padded_index_v2)
                + fwht_wavefronts(n, block, 0, padded_index_v2))
    staged = min(5, block.bit_length() - 1)
    return staging_wavefronts(n, True) + fwht_wavefronts(n, block, staged)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20000)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    copies = (1, 2, 4, 8, 16, 32)
    for name, entry_bytes in (("float2", 8), ("half2", 4)):
        print(f"QAM-W {name} codeword load, wavefronts per warp (mean over random codes):")
        print("bits  " + "  ".join(f"{c:>2} copies" for c in copies))
        for bits in (7, 8, 11, 12):
            row = [codebook_wavefronts(bits, c, args.trials, rng, entry_bytes) for c in copies]
            print(f"{bits:>4}  " + "  ".join(f"{v:9.2f}" for v in row))
    print("staging and rotating one activation row (block 1024), wavefronts per CTA:")
    for n in (4096, 8192, 14336):
        print(f"  n = {n:>5}: v2 {rotation_wavefronts(n, 1024, 'v2'):>6}, "
              f"v3 {rotation_wavefronts(n, 1024, 'v3'):>5}")
    print("activation load, wavefronts per warp:")
    for g in (8, 16, 32):
        print(f"  G = {g:>2}: QAM-W {activation_wavefronts(g, 8)} (batch 1: "
              f"{activation_wavefronts(g, 8, unit=64)}, for two codes), "
              f"AAAC {activation_wavefronts(g, 16)} (batch 1: for two rows)")


if __name__ == "__main__":
    main()
