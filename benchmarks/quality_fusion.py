"""What sibling fusion (fuse_siblings=True: q/k/v and gate/up one layer each) and a quantized
lm_head cost in quality on the default model, beside the unfused configs, all on the same
calibration set and evaluation windows. Fusion keeps each sibling's own channel scale, so its
rows must equal the unfused ones exactly; lm_head at 4 and at 5.5 bpw (11 bits a pair, which
a config name cannot spell: layer_options); QAM-W at a second sign seed, since the seed alone
moves a 4 bpw ΔPPL by several points.

    python benchmarks/quality_fusion.py            # writes benchmarks/results/quality_fusion.*
"""
import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from qamw_ext.convert import get_config  # noqa: E402
from quality import record_table  # noqa: E402

HEAD = "qamw-4@fuse_siblings=true,include_lm_head=true"


def configs():
    head_55 = get_config(HEAD)
    head_55.layer_options = {"lm_head": {"bits": 11}}
    head_55.name = HEAD + " (lm_head 11 bits a pair)"
    return ["qamw-4", "qamw-4@fuse_siblings=true", "qamw:bits=8,seed=1", HEAD, head_55,
            "aaac-int4", "aaac-int4@fuse_siblings=true"]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--eval-tokens", type=int, default=32768)
    p.add_argument("--name", default="quality_fusion")
    p.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    args = p.parse_args()
    record_table(configs(), os.path.join(args.out_dir, args.name),
                 "python benchmarks/quality_fusion.py " + " ".join(sys.argv[1:]),
                 eval_tokens=args.eval_tokens, progress=False)


if __name__ == "__main__":
    main()
