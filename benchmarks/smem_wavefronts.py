"""Shared-memory wavefronts of the GEMV kernels' data-dependent loads, by simulation: the
figures behind the GPU predictions in benchmarks/NOTES.md, reproducible without a GPU.

Model: 32 banks of 4 bytes. A warp's 4-byte loads are served all at once, its 8-byte loads a
half-warp (16 lanes) at a time and a 16-byte load a quarter-warp at a time; within one such group, lanes that read the same
word share it (broadcast) and each bank serves one distinct word per wavefront, so the group
costs max over banks of the distinct words it must deliver.

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


def activation_wavefronts(group_lanes, pair_bytes):
    """QAM-W (8-byte pairs, chunks of 128 pairs + 1 padding pair) or AAAC (16-byte vectors,
    chunks of 36 floats): lane `sub` of each row reads chunk `sub`, same offset j = 0."""
    words = []
    for lane in range(32):
        sub = lane % group_lanes
        if pair_bytes == 8:
            base = 2 * (sub * 129)                       # float index of pair 0 of chunk sub
            words.append([base, base + 1])
        else:
            base = sub * 36
            words.append([base, base + 1, base + 2, base + 3])
    return wavefronts(words, 16 if pair_bytes == 8 else 8)


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
    print("activation load, wavefronts per warp:")
    for g in (8, 16, 32):
        print(f"  G = {g:>2}: QAM-W {activation_wavefronts(g, 8)}, AAAC {activation_wavefronts(g, 16)}")


if __name__ == "__main__":
    main()
