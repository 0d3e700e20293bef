"""Evaluation: perplexity (GPTQ protocol), paired KL(full || quantized) per token, decode speed,
and the quality table over configs (JSON + markdown + plot).

Perplexity, GPTQ protocol: the evaluation texts are joined with blank lines and tokenized
once; the token stream is cut into non-overlapping windows of `window` tokens (the tail that
does not fill a window is dropped); every window is scored independently and the perplexity
is exp(mean NLL) over all predicted positions (window - 1 per window). Reported: window,
windows, tokens (= windows * window) and predicted tokens.

Paired KL: the full-precision model's logits on the same windows are kept (fp16, on the CPU)
and KL(P_full || P_quant) is averaged over the same predicted positions."""
import copy
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time

import torch
import torch.nn.functional as F


def _bar(it, desc, progress, total=None):
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, total=total, disable=not progress, leave=False)


class materialized:
    """Within the block, every QuantizedLinear computes large batches with a dense weight
    dequantized once instead of on every call. The arithmetic is exactly that of
    QuantizedLinear.forward's large-batch path (dequantize, then F.linear), so logits are
    unchanged; small batches still take the codec's GEMV."""

    def __init__(self, model):
        self.model = model
        self.patched = []

    def __enter__(self):
        from .quantized_linear import GEMV_MAX_ROWS, QuantizedLinear

        for mod in self.model.modules():
            if not isinstance(mod, QuantizedLinear):
                continue
            cache = {}

            def forward(x, mod=mod, cache=cache, orig=mod.forward):
                shape = x.shape
                x2d = x.reshape(-1, mod.in_features)
                if x2d.shape[0] <= GEMV_MAX_ROWS:
                    return orig(x)
                if x.dtype not in cache:
                    cache[x.dtype] = mod.dequantize(x.dtype)
                bias = None if mod.bias is None else mod.bias.to(x.dtype)
                y = F.linear(x2d, cache[x.dtype], bias)
                return y.reshape(*shape[:-1], mod.out_features)
            mod.forward = forward
            self.patched.append(mod)
        return self.model

    def __exit__(self, *exc):
        for mod in self.patched:
            del mod.forward
        self.patched = []
        return False


@torch.no_grad()
def evaluate_windows(model, windows, reference=None, keep_logits=False, progress=True,
                     desc="eval"):
    """windows: (count, window) int64 token ids. reference: the fp16 logits of the full
    model from an earlier call with keep_logits=True (for KL). Returns (metrics, logits or
    None)."""
    model.eval()
    device = next(model.parameters()).device
    count, window = windows.shape
    nll_sum, kl_sum, n = 0.0, 0.0, 0
    kept = [] if keep_logits else None
    t0 = time.time()
    with materialized(model):
        for i in _bar(range(count), desc, progress):
            nll_sum, kl_sum, n = _score_window(model, windows[i:i + 1].to(device), i, reference,
                                               kept, nll_sum, kl_sum, n)
    seconds = time.time() - t0

    nll = nll_sum / n
    out = {"ppl": math.exp(nll), "nll": nll, "window": window, "windows": count,
           "tokens": count * window, "predicted_tokens": n, "seconds": seconds,
           "eval_tokens_per_s": count * window / seconds}
    if reference is not None:
        out["kl"] = kl_sum / n
    return out, (torch.stack(kept) if keep_logits else None)


def _score_window(model, ids, i, reference, kept, nll_sum, kl_sum, n):
    device = ids.device
    logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
    target = ids[0, 1:]
    lp = F.log_softmax(logits, dim=-1)
    nll_sum += -lp.gather(1, target[:, None]).sum().item()
    n += target.numel()
    if reference is not None:
        ref_lp = F.log_softmax(reference[i].to(device).float(), dim=-1)
        kl_sum += (ref_lp.exp() * (ref_lp - lp)).sum().item()
    if kept is not None:
        kept.append(logits.to(torch.float16).cpu())
    return nll_sum, kl_sum, n


def perplexity(model, windows, progress=True):
    return evaluate_windows(model, windows, progress=progress)[0]


@torch.no_grad()
def decode_speed(model, tokenizer, new_tokens=64, prompt=None, warmup=8, batch=1):
    """Greedy decoding tokens/s with the KV cache (batch 1 by default: the GEMV path)."""
    prompt = prompt or "The history of the printing press begins"
    device = next(model.parameters()).device
    ids = tokenizer([prompt] * batch, return_tensors="pt").input_ids.to(device)
    kw = dict(do_sample=False, pad_token_id=tokenizer.eos_token_id, use_cache=True)
    model.generate(ids, max_new_tokens=warmup, min_new_tokens=warmup, **kw)
    t = time.time()
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
    dt = time.time() - t
    generated = out.shape[1] - ids.shape[1]
    return {"decode_tokens_per_s": generated * batch / dt, "new_tokens": generated,
            "batch": batch, "seconds": dt}


def spearman(xs, ys):
    """Spearman rank correlation (average ranks for ties)."""
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r
    if len(xs) < 2:
        return float("nan")
    rx, ry = ranks(xs), ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    return cov / math.sqrt(vx * vy) if vx > 0 and vy > 0 else float("nan")


def machine_info():
    info = {"platform": platform.platform(), "python": sys.version.split()[0],
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "cuda": torch.cuda.is_available()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except Exception:
        pass
    try:
        from . import __version__
        info["qamw_ext"] = __version__
    except Exception:
        pass
    try:
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here,
                                            capture_output=True, text=True,
                                            timeout=5).stdout.strip() or None
    except Exception:
        pass
    try:
        with open("/proc/loadavg") as f:
            info["loadavg_at_start"] = f.read().split()[:3]
    except OSError:
        pass
    return info


def family(row):
    """The codec family a config belongs to (one plot line each)."""
    method, opts = row["method"], row.get("options", {})
    if method in ("qamw", "qamw_polar"):
        if method == "qamw_polar" or opts.get("codebook") == "polar":
            return "QAM-W polar"
        if opts.get("alpha") == 0.0:
            return "QAM-W (no act. scaling)"
        return "QAM-W"
    if method == "aaac":
        fmt = str(opts.get("variant", "int4")).upper()
        return f"AAAC {fmt}" + (" + ch. scaling" if opts.get("channel_scaling") else "")
    return {"rtn": "RTN INT4", "nf4": "NF4"}.get(method, method)


def check_targets(rows):
    """The issue's targets, judged on the rows present (missing configs: 'not run')."""
    by = {r["config"]: r for r in rows}
    out = []

    def add(name, ok, detail):
        out.append({"target": name, "met": ok, "detail": detail})

    q55 = by.get("qamw-5.5")
    if q55:
        add("QAM-W 5.5 bpw: dPPL <= 0.5 %", abs(q55["dppl_pct"]) <= 0.5,
            f"dPPL {q55['dppl_pct']:+.3f} %")
    rtn, q4 = by.get("rtn-int4-g128"), by.get("qamw-4")
    if rtn and q4:
        add("QAM-W 4 bpw beats RTN INT4 g128 at fewer bits",
            q4["dppl_pct"] < rtn["dppl_pct"] and q4["bpw"] < rtn["bpw"],
            f"QAM-W {q4['dppl_pct']:+.3f} % at {q4['bpw']:.3f} bpw vs RTN "
            f"{rtn['dppl_pct']:+.3f} % at {rtn['bpw']:.3f} bpw")
    a4 = by.get("aaac-int4")
    if rtn and a4:
        add("AAAC INT4 g128 beats RTN INT4 g128 at the same bits",
            a4["dppl_pct"] < rtn["dppl_pct"] and abs(a4["bpw"] - rtn["bpw"]) < 0.05,
            f"AAAC {a4['dppl_pct']:+.3f} % at {a4['bpw']:.3f} bpw vs RTN "
            f"{rtn['dppl_pct']:+.3f} % at {rtn['bpw']:.3f} bpw")
    for name, r in sorted(by.items()):
        if name.startswith("polar-"):
            j = by.get("qamw-" + name[len("polar-"):])
            if j:
                add(f"joint QAM-W below polar at {name[len('polar-'):]} bpw",
                    j["dppl_pct"] < r["dppl_pct"],
                    f"joint {j['dppl_pct']:+.3f} % vs polar {r['dppl_pct']:+.3f} %")
    with_kl = [r for r in rows if r.get("kl") is not None]
    if len(with_kl) >= 3:
        rho = spearman([r["dppl_pct"] for r in with_kl], [r["kl"] for r in with_kl])
        add("KL ranks configs like dPPL (Spearman)", rho >= 0.9, f"Spearman rho = {rho:.3f}")
    return out


def quality_table(configs, model_path=None, eval_tokens=32768, window=1024, calib_tokens=None,
                  decode_tokens=0, save_dir=None, progress=True, log=print, on_row=None):
    """Quantize the model with each config and measure it against the full model.

    Returns a dict: base metrics, rows (one per config), settings, Spearman, targets."""
    from . import data as D
    from .convert import get_config, model_storage, quantize_model
    from .models import load_model

    from .convert import codec_class

    t_start = time.time()
    for spec in configs:   # refuse an unknown config before any expensive work
        if not _is_saved(spec):
            codec_class(get_config(spec).method)
    base, tok = load_model(model_path)
    if any(True for _ in _quantized(base)):
        raise ValueError("the base model for a quality table must be a full-precision model")
    eval_ids = D.default_evaluation(tok)
    windows = D.eval_windows(eval_ids, window, eval_tokens)
    log(f"[qamw] evaluation: {windows.shape[0]} windows x {window} tokens = {windows.numel()} "
        f"tokens (of {eval_ids.numel()} in the evaluation split)")
    base_metrics, ref = evaluate_windows(base, windows, keep_logits=True, progress=progress,
                                         desc="eval full")
    base_metrics.update(model_storage(base))
    if decode_tokens:
        base_metrics.update(decode_speed(base, tok, decode_tokens))
    log(f"[qamw] full model: PPL {base_metrics['ppl']:.4f} "
        f"({base_metrics['eval_tokens_per_s']:.0f} tok/s)")
    calib = {}
    rows = []
    for spec in configs:
        if _is_saved(spec):
            from .checkpoint import load_quantized

            t = time.time()
            model = load_quantized(spec, device=next(base.parameters()).device)
            cfg = getattr(model, "qamw_config", None) or get_config("rtn")
            rows.append(_row(model, cfg, os.path.basename(os.path.normpath(spec)), None,
                             windows, ref, base_metrics, tok, decode_tokens, progress, log))
            rows[-1]["loaded_from"] = os.path.abspath(spec)
            del model
            continue
        cfg = get_config(spec, calib_tokens=calib_tokens)
        cal = None
        if cfg.calibrate:
            key = (cfg.calib_tokens, cfg.calib_length, cfg.seed)
            if key not in calib:
                calib[key] = D.default_calibration(tok, tokens=cfg.calib_tokens,
                                                   length=cfg.calib_length, seed=cfg.seed)
            cal = calib[key]
        model = copy.deepcopy(base)
        t = time.time()
        quantize_model(model, cfg, cal, progress=progress, log=None)
        qseconds = time.time() - t
        row = _row(model, cfg, cfg.label, qseconds, windows, ref, base_metrics, tok,
                   decode_tokens, progress, log)
        if save_dir:
            from .checkpoint import save_quantized

            row["saved_to"] = save_quantized(model, os.path.join(save_dir, cfg.label), tok,
                                             overwrite=True)
        rows.append(row)
        del model
        if on_row is not None:
            on_row(_result(model_path, windows, eval_ids, base_metrics, rows, t_start))
    return _result(model_path, windows, eval_ids, base_metrics, rows, t_start)


def _result(model_path, windows, eval_ids, base_metrics, rows, t_start):
    from .models import model_label

    window = int(windows.shape[1])
    with_kl = [r for r in rows if r.get("kl") is not None]
    rho = spearman([r["dppl_pct"] for r in with_kl], [r["kl"] for r in with_kl]) \
        if len(with_kl) >= 2 else None
    return {
        "model": model_label(model_path),
        "protocol": {"perplexity": "GPTQ: texts joined with blank lines, tokenized once, "
                                   "non-overlapping windows, exp(mean NLL) over predicted "
                                   "positions", "kl": "KL(full || quantized) per predicted "
                                   "token, natural log", "window": window,
                     "windows": int(windows.shape[0]), "tokens": int(windows.numel()),
                     "predicted_tokens": base_metrics["predicted_tokens"],
                     "eval_split_tokens": int(eval_ids.numel()),
                     "data": "gensim enwiki test articles, evaluation split (article k, "
                             "page-id order, k % 4 == 1)"},
        "base": base_metrics, "rows": rows, "spearman_dppl_kl": rho,
        "targets": check_targets(rows),
        "seconds": time.time() - t_start,
        "machine": machine_info(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
    }


def _is_saved(spec):
    if not isinstance(spec, str) or not os.path.isdir(spec):
        return False
    from .models import is_quantized_dir

    return is_quantized_dir(spec)


def _row(model, cfg, label, qseconds, windows, ref, base_metrics, tok, decode_tokens, progress,
         log):
    from .convert import model_storage, quantized_modules

    metrics, _ = evaluate_windows(model, windows, reference=ref, progress=progress,
                                  desc=f"eval {label}")
    qm = quantized_modules(model)
    numel = sum(m.in_features * m.out_features for m in qm.values())
    bpw = sum(m.bits_per_weight() * m.in_features * m.out_features for m in qm.values()) / numel
    row = {"config": label, "method": cfg.method, "options": cfg.options, "family": None,
           "bpw": bpw, "quant_seconds": qseconds, "ppl": metrics["ppl"], "nll": metrics["nll"],
           "dppl_pct": 100.0 * (metrics["ppl"] / base_metrics["ppl"] - 1.0),
           "kl": metrics["kl"], "eval_seconds": metrics["seconds"], "linears": len(qm),
           "calib_tokens": cfg.calib_tokens if cfg.calibrate else 0,
           "quant_config": cfg.to_dict()}
    row["family"] = family(row)
    allocation = getattr(model, "qamw_report", {}).get("allocation")
    if allocation is not None:
        row["allocation"] = allocation
    row.update(model_storage(model))
    if decode_tokens:
        row.update(decode_speed(model, tok, decode_tokens))
    qs = "loaded" if qseconds is None else f"quantize {qseconds:.1f} s"
    log(f"[qamw] {label:18s} {row['bpw']:.3f} bpw  PPL {row['ppl']:.4f}  "
        f"dPPL {row['dppl_pct']:+.3f} %  KL {row['kl']:.5f}  {qs}")
    return row


def _quantized(model):
    from .quantized_linear import QuantizedLinear

    return (m for m in model.modules() if isinstance(m, QuantizedLinear))


def markdown_table(result):
    p = result["protocol"]
    b = result["base"]
    lines = [f"## Quality on {result['model']}", "",
             f"Perplexity: GPTQ protocol, {p['windows']} windows x {p['window']} tokens = "
             f"{p['tokens']} tokens ({p['predicted_tokens']} predicted). Full model PPL "
             f"{b['ppl']:.4f}, {b['total_bytes'] / 1e6:.1f} MB.", "",
             "| config | codec | bits/weight | size MB | PPL | ΔPPL % | KL | quantize s |"
             + (" decode tok/s |" if "decode_tokens_per_s" in b else ""),
             "|---|---|---:|---:|---:|---:|---:|---:|"
             + ("---:|" if "decode_tokens_per_s" in b else "")]
    for r in result["rows"]:
        line = (f"| {r['config']} | {r['family']} | {r['bpw']:.3f} | "
                f"{r['total_bytes'] / 1e6:.1f} | {r['ppl']:.4f} | {r['dppl_pct']:+.3f} | "
                f"{r['kl']:.5f} | "
                f"{'loaded' if r['quant_seconds'] is None else format(r['quant_seconds'], '.1f')} |")
        if "decode_tokens_per_s" in b:
            line += f" {r.get('decode_tokens_per_s', float('nan')):.1f} |"
        lines.append(line)
    if "decode_tokens_per_s" in b:
        lines.append(f"| full model | fp32 | 32 | {b['total_bytes'] / 1e6:.1f} | "
                     f"{b['ppl']:.4f} | 0 | 0 | - | {b['decode_tokens_per_s']:.1f} |")
    rho = result.get("spearman_dppl_kl")
    lines += ["", f"Spearman(ΔPPL, KL) over configs: "
                  f"{'n/a' if rho is None or rho != rho else f'{rho:.3f}'}", ""]
    if result.get("targets"):
        lines += ["| target | met | detail |", "|---|---|---|"]
        for t in result["targets"]:
            lines.append(f"| {t['target']} | {'yes' if t['met'] else 'NO'} | {t['detail']} |")
        lines.append("")
    size = ("Size: every tensor as stored (quantized linears plus the fp32 embedding, norms "
            "and any linear left unquantized). ")
    lines += [size + f"Command: `{result['command']}`; {result['seconds'] / 60:.1f} min on "
              f"{result['machine'].get('cpu', '?')} ({result['machine'].get('threads')} "
              f"threads), {result['date']}.", ""]
    return "\n".join(lines)


def write_results(result, out_prefix, plot=True):
    """<prefix>.json, <prefix>.md and (plot=True) <prefix>.png. Returns the paths."""
    os.makedirs(os.path.dirname(os.path.abspath(out_prefix)) or ".", exist_ok=True)
    paths = {}
    for ext, text in (("json", json.dumps(result, indent=2, sort_keys=True, default=str) + "\n"),
                      ("md", markdown_table(result))):
        path = f"{out_prefix}.{ext}"
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
        paths[ext] = path
    if plot:
        from .plots import plot_quality

        paths["png"] = plot_quality(result, f"{out_prefix}.png")
    return paths
