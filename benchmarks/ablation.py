"""The ablation table of QAM-W's quality levers, from quality.py results.

Reads result JSON files written by benchmarks/quality.py (same model, calibration set and
evaluation windows: the script refuses files whose full-model perplexity differs), reads
which levers each QAM-W row had on from its recorded config, and writes a markdown table
(rows grouped by bits per pair) plus, for every lever, each pair of rows that differ in that
lever alone:

  error feedback     options error_feedback (GPTQ/LDLQ rounding in the rotated domain)
  whole-dim rotation options block_size "whole" or "largest" (one Hadamard over all input
                     columns; on the default model's 576 and 1536 the two are the same)
  bit allocation     config bit_allocation (bits per layer from measured sensitivity)
  sequential         config sequential (statistics from the quantized earlier layers)

    python benchmarks/ablation.py benchmarks/results/quality_*.json \\
        --out benchmarks/results/quality_ablation.md
"""
import argparse
import json
import os
import sys

LEVERS = (("error feedback", lambda o, q: bool(o.get("error_feedback", False))),
          ("whole-dim rotation", lambda o, q: o.get("block_size") in ("whole", "largest")),
          ("bit allocation", lambda o, q: bool(q.get("bit_allocation", False))),
          ("sequential", lambda o, q: bool(q.get("sequential", True))))
# Options that make a row something other than a lever combination of plain QAM-W.
OTHER = ("codebook", "alpha", "per_block_scale", "row_scale", "ef_search", "seed")


def qamw_rows(paths):
    rows, base = [], None
    for path in paths:
        with open(path) as f:
            result = json.load(f)
        ppl = round(result["base"]["ppl"], 4)
        if base is None:
            base = ppl
        elif ppl != base:
            sys.exit(f"{path}: full-model PPL {ppl} differs from {base}: not the same protocol")
        for r in result["rows"]:
            opts, qc = r.get("options", {}), r.get("quant_config", {})
            if r.get("method") != "qamw" or any(k in opts for k in OTHER):
                continue
            if qc.get("calib_tokens", 8192) != 8192:
                continue
            levers = tuple(f(opts, qc) for _, f in LEVERS)
            rows.append({"bits": opts.get("bits", 11), "levers": levers, "config": r["config"],
                         "bpw": r["bpw"], "dppl": r["dppl_pct"], "kl": r["kl"],
                         "seconds": r["quant_seconds"], "source": os.path.basename(path)})
    # The latest measurement of a lever combination wins (files in the order given).
    latest = {}
    for r in rows:
        latest[(r["bits"], r["levers"])] = r
    return sorted(latest.values(), key=lambda r: (-r["bits"], r["levers"])), base


def table(rows, base):
    names = [n for n, _ in LEVERS]
    out = [f"## QAM-W quality levers on SmolLM2-135M-Instruct (full model PPL {base})", "",
           "| bits/pair | " + " | ".join(names) + " | bits/weight | ΔPPL % | KL | quantize s "
           "| config | source |",
           "|---:|" + ":-:|" * len(names) + "---:|---:|---:|---:|---|---|"]
    for r in rows:
        marks = " | ".join("on" if v else "off" for v in r["levers"])
        out.append(f"| {r['bits']} | {marks} | {r['bpw']:.3f} | {r['dppl']:+.3f} | "
                   f"{r['kl']:.5f} | {r['seconds']:.0f} | `{r['config']}` | {r['source']} |")
    out += ["", "### Each lever alone (rows that differ in that lever only)", "",
            "| lever | bits/pair | other levers on | ΔPPL off → on | KL off → on |",
            "|---|---:|---|---|---|"]
    index = {(r["bits"], r["levers"]): r for r in rows}
    for i, name in enumerate(names):
        for (bits, levers), on in sorted(index.items(), key=lambda kv: (-kv[0][0], kv[0][1])):
            if not levers[i]:
                continue
            off = index.get((bits, levers[:i] + (False,) + levers[i + 1:]))
            if off is None:
                continue
            others = ", ".join(n for j, n in enumerate(names) if j != i and levers[j]) or "none"
            out.append(f"| {name} | {bits} | {others} | {off['dppl']:+.3f} → {on['dppl']:+.3f} "
                       f"| {off['kl']:.5f} → {on['kl']:.5f} |")
    return "\n".join(out) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", help="quality.py result JSON files")
    p.add_argument("--out", default=None, help="write the markdown here (default: print)")
    args = p.parse_args()
    rows, base = qamw_rows(args.results)
    md = table(rows, base)
    md += ("\nCommand: `python benchmarks/ablation.py " + " ".join(sys.argv[1:]) + "`\n")
    if args.out:
        with open(args.out, "w") as f:
            f.write(md)
    print(md)


if __name__ == "__main__":
    main()
