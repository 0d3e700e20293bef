"""The quality table on the default model (or --model): every config quantized with the same
calibration set, scored on the same evaluation windows against the full model.

Writes benchmarks/results/<name>.json (every figure, the configs, the command, the machine),
<name>.md (the table and the targets) and <name>.png (ΔPPL against bits per weight). The
files are rewritten after every config, so an interrupted run still leaves its rows.

    python benchmarks/quality.py                       # the recorded run (32768 eval tokens)
    python benchmarks/quality.py --eval-tokens 8192 --name quick
"""
import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from qamw_ext.evaluate import markdown_table, quality_table, write_results  # noqa: E402

FULL = ["rtn-int4-g128", "nf4", "aaac-int4", "aaac-int4-awq", "aaac-nvfp4",
        "qamw-3.5", "polar-3.5", "qamw-4", "polar-4", "qamw-4-noscale", "qamw-4.5", "qamw-5",
        "qamw-5.5", "polar-5.5", "qamw-6"]


def record_table(configs, prefix, command, **table_options):
    """Run quality_table on `configs` and write PREFIX.json/.md/.png, rewritten after every
    config (marked incomplete until the last) so that an interrupted run keeps its rows."""
    def checkpoint_rows(partial):
        partial["command"], partial["complete"] = command, False
        write_results(partial, prefix)

    result = quality_table(configs, on_row=checkpoint_rows, **table_options)
    result["command"] = command
    result["complete"] = True
    paths = write_results(result, prefix)
    print(markdown_table(result))
    print("wrote", ", ".join(paths.values()))
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--configs", default=",".join(FULL),
                   help="config names separated by commas, or by semicolons when a config "
                        "has options of its own ('qamw:bits=11,block_size=whole;qamw-4')")
    p.add_argument("--eval-tokens", type=int, default=32768)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--calib-tokens", type=int, default=None)
    p.add_argument("--decode-tokens", type=int, default=0)
    p.add_argument("--name", default="quality_smollm2_135m")
    p.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    sep = ";" if ";" in args.configs else ","
    record_table([c for c in args.configs.split(sep) if c],
                 os.path.join(args.out_dir, args.name),
                 "python benchmarks/quality.py " + " ".join(
                     sys.argv[1:] if argv is None else argv),
                 model_path=args.model, eval_tokens=args.eval_tokens, window=args.window,
                 calib_tokens=args.calib_tokens, decode_tokens=args.decode_tokens,
                 progress=not args.no_progress)


if __name__ == "__main__":
    main()
