"""The model pipeline: default text split, calibration, conversion, evaluation, CLI, plots.
Most tests use a tiny random Llama; one uses the real default model."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from qamw_ext import calibration as C
from qamw_ext import data as D
from qamw_ext import evaluate as E
from qamw_ext.cli import main as cli_main
from qamw_ext.convert import (NAMED_CONFIGS, ConfigError, QuantConfig, get_config,
                              quantize_model, quantized_modules, target_linears)
from qamw_ext.quantized_linear import CODECS, GEMV_MAX_ROWS, LayerStats, QuantizedLinear

from conftest_pipeline import default_tokenizer, save_tiny, tiny_model

LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


# ------------------------------------------------------------------ data

def test_default_split_is_disjoint_and_deterministic():
    cal, ev = D.split_articles()
    assert len(cal) > 50 and len(ev) > 15
    assert not {a[0] for a in cal} & {a[0] for a in ev}
    assert not {a[2] for a in cal} & {a[2] for a in ev}
    cal2, ev2 = D.split_articles()
    assert [a[0] for a in ev] == [a[0] for a in ev2]
    assert all("'''" not in a[2] for a in ev)


def test_eval_windows_gptq_protocol():
    ids = torch.arange(1000)
    w = D.eval_windows(ids, 128)
    assert w.shape == (7, 128) and torch.equal(w.reshape(-1), ids[:896])
    assert D.eval_windows(ids, 100, max_tokens=450).shape == (4, 100)
    with pytest.raises(D.DataError):
        D.eval_windows(ids[:10], 128)


def test_calibration_windows_come_from_calibration_text_only():
    tok = default_tokenizer()
    cal = D.default_calibration(tok, tokens=2048, length=256)
    assert cal.shape == (8, 256)
    assert torch.equal(cal, D.default_calibration(tok, tokens=2048, length=256))
    ev = D.default_evaluation(tok)
    assert ev.numel() > 40000
    ev_text = D.JOIN.join(D.default_texts("evaluation"))
    for row in cal[:4]:
        snippet = tok.decode(row[10:60])
        assert snippet not in ev_text


# ------------------------------------------------------------------ calibration


def _hooked_inputs(model, ids, names):
    """The inputs each named linear sees in a plain forward of the whole model."""
    seen = {}
    handles = []
    for n in names:
        def hook(mod, args, n=n):
            seen.setdefault(n, []).append(args[0].detach().reshape(-1, args[0].shape[-1]))
        handles.append(model.get_submodule(n).register_forward_pre_hook(hook))
    with torch.no_grad():
        for b in ids:
            model(input_ids=b[None], use_cache=False)
    for h in handles:
        h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


class _Recorder:
    """A quantize_fn that rounds weights to a coarse grid (in a plain Linear) and records the
    stats it was given."""

    def __init__(self):
        self.stats = {}

    def __call__(self, name, linear, stats):
        self.stats[name] = stats
        new = torch.nn.Linear(linear.in_features, linear.out_features,
                              bias=linear.bias is not None)
        with torch.no_grad():
            new.weight.copy_(torch.round(linear.weight * 8) / 8)
            if linear.bias is not None:
                new.bias.copy_(linear.bias)
        return new


def test_layer_by_layer_stats_see_quantized_earlier_layers():
    model = tiny_model(1)
    ids = torch.randint(0, 49152, (6, 24))
    targets = {f"model.layers.{i}.{n}" for i in range(2) for n in LINEARS}
    rec = _Recorder()
    C.calibrate_and_replace(model, list(torch.split(ids, 2)), rec, targets, sequential=True,
                            sample_rows=32, progress=False)
    assert set(rec.stats) == targets
    # After the run, `model` holds the rounded weights; a plain forward of it therefore shows
    # every linear the inputs that sequential calibration must have measured.
    inputs = _hooked_inputs(model, ids, sorted(targets))
    for name, x in inputs.items():
        st = rec.stats[name]
        assert st.tokens == ids.numel()
        torch.testing.assert_close(st.mean_abs, x.abs().mean(0), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(st.mean_sq, (x * x).mean(0), rtol=1e-4, atol=1e-6)
        assert st.sample.shape == (32, x.shape[1])
        # every sampled row is one of the real input rows
        d = ((st.sample[:, None, :] - x[None]) ** 2).sum(-1).min(dim=1).values
        assert d.max() == 0
    # q/k/v (and gate/up) share one input: one statistics object
    assert rec.stats["model.layers.1.self_attn.q_proj"] is rec.stats["model.layers.1.self_attn.v_proj"]
    assert rec.stats["model.layers.1.mlp.gate_proj"] is rec.stats["model.layers.1.mlp.up_proj"]


def test_stats_accumulator_hessian_and_sample():
    x = torch.randn(100, 8)
    acc = C.StatsAccumulator(8, torch.tensor([3, 50, 99]), hessian=True)
    acc.add(x[:40])
    acc.add(x[40:])
    st = acc.result()
    assert isinstance(st, LayerStats) and st.tokens == 100
    torch.testing.assert_close(st.hessian, x.t() @ x / 100, rtol=1e-5, atol=1e-6)
    assert torch.equal(st.sample, x[[3, 50, 99]])


# ------------------------------------------------------------------ conversion


def test_quantize_model_replaces_every_decoder_linear():
    model = tiny_model(2)
    ids = torch.randint(0, 49152, (1, 20))
    with torch.no_grad():
        ref = model(ids).logits
    cal = torch.randint(0, 49152, (4, 32))
    quantize_model(model, get_config("rtn-int4-g128", calibrate=True, calib_batch=2), cal,
                   progress=False, log=None)
    q = quantized_modules(model)
    assert sorted(q) == sorted(f"model.layers.{i}.{n}" for i in range(2) for n in LINEARS)
    assert isinstance(model.lm_head, torch.nn.Linear)            # not by default
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not any(isinstance(m, torch.nn.Linear) for m in model.model.layers.modules())
    with torch.no_grad():
        out = model(ids).logits
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert model.qamw_report["linears"] == 14
    assert 4.0 < model.qamw_report["bits_per_weight"] < 4.6


def test_lm_head_and_exclude_are_configurable():
    model = tiny_model(3)
    cal = torch.randint(0, 49152, (2, 16))
    cfg = get_config("nf4", include_lm_head=True, exclude=(r"down_proj$",), calibrate=True,
                     calib_batch=1)
    names = target_linears(model, cfg)
    assert "lm_head" in names and not any(n.endswith("down_proj") for n in names)
    quantize_model(model, cfg, cal, progress=False, log=None)
    assert isinstance(model.lm_head, QuantizedLinear)
    assert isinstance(model.model.layers[0].mlp.down_proj, torch.nn.Linear)
    assert model.config.tie_word_embeddings is False
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 49152, (1, 5))).logits).all()


def test_quantized_forward_uses_gemv_for_small_batches(monkeypatch):
    model = tiny_model(4)
    quantize_model(model, "rtn-int4-g128", None, progress=False, log=None)
    layer = model.model.layers[0].mlp.down_proj
    calls = []
    orig_gemv, orig_deq = type(layer).gemv, type(layer).dequantize
    monkeypatch.setattr(type(layer), "gemv", lambda self, x: calls.append("gemv") or
                        orig_gemv(self, x))
    x_small = torch.randn(GEMV_MAX_ROWS, layer.in_features)
    x_big = torch.randn(GEMV_MAX_ROWS + 1, layer.in_features)
    y_small = layer(x_small)
    assert calls == ["gemv"]
    y_big = layer(x_big)
    assert calls == ["gemv"]
    torch.testing.assert_close(y_small, F.linear(x_small, orig_deq(layer)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y_big, F.linear(x_big, orig_deq(layer)), rtol=1e-4, atol=1e-5)


def test_named_configs_resolve_and_unknown_ones_fail():
    expected_bits = {"qamw-3.5": 7, "qamw-4": 8, "qamw-4.5": 9, "qamw-5": 10, "qamw-5.5": 11,
                     "qamw-6": 12}
    for name, bits in expected_bits.items():
        cfg = get_config(name)
        assert cfg.method == "qamw" and cfg.options["bits"] == bits
        assert get_config(name.replace("qamw", "polar")).options["codebook"] == "polar"
    for name in ("aaac-int4", "aaac-int4-awq", "aaac-nvfp4", "aaac-nvfp4-awq", "rtn-int4-g128",
                 "nf4"):
        assert name in NAMED_CONFIGS
        assert get_config(name).method in CODECS
    assert get_config("qamw:bits=9,codebook=polar").options == {"bits": 9, "codebook": "polar"}
    with pytest.raises(ConfigError, match="unknown quantization config"):
        get_config("qamw-7.5")
    with pytest.raises(ConfigError, match="no codec registered"):
        quantize_model(tiny_model(), QuantConfig(method="nope"), None, log=None)
    with pytest.raises(ConfigError, match="rejected options"):
        quantize_model(tiny_model(), get_config("rtn:bogus=1", calibrate=False), None,
                       progress=False, log=None)
    model = tiny_model()
    quantize_model(model, "nf4", None, progress=False, log=None)
    with pytest.raises(ConfigError, match="already quantized"):
        quantize_model(model, "nf4", None, log=None)


# ------------------------------------------------------------------ evaluation


def test_perplexity_and_kl_match_a_direct_computation():
    model = tiny_model(5)
    windows = torch.randint(0, 49152, (3, 33))
    base, ref = E.evaluate_windows(model, windows, keep_logits=True, progress=False)
    with torch.no_grad():
        logits = model(windows).logits[:, :-1]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    assert base["predicted_tokens"] == 3 * 32 and base["tokens"] == 99
    assert math.isclose(base["ppl"], math.exp(nll.item()), rel_tol=1e-5)
    same, _ = E.evaluate_windows(model, windows, reference=ref, progress=False)
    assert abs(same["kl"]) < 1e-5          # only the fp16 storage of the reference
    other = tiny_model(6)
    diff, _ = E.evaluate_windows(other, windows, reference=ref, progress=False)
    with torch.no_grad():
        q = F.log_softmax(other(windows).logits[:, :-1], -1)
    p = F.log_softmax(ref.float(), -1)
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    assert math.isclose(diff["kl"], kl, rel_tol=1e-4)


def test_spearman():
    assert E.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert E.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert E.spearman([1, 2, 3], [1, 1, 2]) == pytest.approx(0.8660254)


def test_targets_are_judged():
    rows = [{"config": "qamw-5.5", "dppl_pct": 0.3, "bpw": 5.5, "kl": 0.001},
            {"config": "qamw-4", "dppl_pct": 2.0, "bpw": 4.05, "kl": 0.01},
            {"config": "polar-4", "dppl_pct": 3.0, "bpw": 4.05, "kl": 0.02},
            {"config": "rtn-int4-g128", "dppl_pct": 2.5, "bpw": 4.17, "kl": 0.015},
            {"config": "aaac-int4", "dppl_pct": 2.8, "bpw": 4.17, "kl": 0.016}]
    t = {x["target"]: x["met"] for x in E.check_targets(rows)}
    assert t["QAM-W 5.5 bpw: dPPL <= 0.5 %"]
    assert t["QAM-W 4 bpw beats RTN INT4 g128 at fewer bits"]
    assert not t["AAAC INT4 g128 beats RTN INT4 g128 at the same bits"]
    assert t["joint QAM-W below polar at 4 bpw"]
    assert t["KL ranks configs like dPPL (Spearman)"]             # same order: rho = 1


# ------------------------------------------------------------------ CLI, end to end


def test_cli_quantize_eval_generate_bench_plot(tmp_path, capsys):
    base = tmp_path / "tiny"
    save_tiny(str(base))
    qdir = tmp_path / "tiny-nf4"
    assert cli_main(["quantize", "--model", str(base), "--config", "nf4", "--out", str(qdir),
                     "--no-progress"]) == 0
    assert (qdir / "model.safetensors").exists() and (qdir / "tokenizer.json").exists()
    prefix = tmp_path / "res" / "q"
    spelled = "rtn:group_size=128,error_feedback=false"   # commas: separated by semicolons
    assert cli_main(["eval", "--model", str(base), "--configs", f"rtn-int4-g128;{spelled}",
                     "--quantized", str(qdir), "--eval-tokens", "512", "--window", "128",
                     "--decode-tokens", "4", "--out", str(prefix), "--no-progress"]) == 0
    res = json.loads((tmp_path / "res" / "q.json").read_text())
    assert [r["config"] for r in res["rows"]] == ["rtn-int4-g128", spelled, "tiny-nf4"]
    assert res["rows"][0]["kl"] == res["rows"][1]["kl"]       # the same quantization
    assert res["protocol"]["tokens"] == 512 and res["protocol"]["window"] == 128
    assert res["protocol"]["predicted_tokens"] == 4 * 127
    for r in res["rows"]:
        assert r["kl"] > 0 and r["bpw"] > 4 and r["total_bytes"] > 0
        assert r["decode_tokens_per_s"] > 0
    assert "machine" in res and "command" in res
    md = (tmp_path / "res" / "q.md").read_text()
    assert "| rtn-int4-g128 |" in md and "ΔPPL" in md
    assert (tmp_path / "res" / "q.png").stat().st_size > 1000
    # a saved model alone: scored against the base model recorded in it
    assert cli_main(["eval", "--model", str(qdir), "--eval-tokens", "256", "--window", "128",
                     "--out", str(tmp_path / "res" / "alone"), "--no-plot",
                     "--no-progress"]) == 0
    alone = json.loads((tmp_path / "res" / "alone.json").read_text())
    assert [r["config"] for r in alone["rows"]] == ["tiny-nf4"]
    assert alone["model"] == str(base)
    capsys.readouterr()
    assert cli_main(["generate", "--model", str(qdir), "--prompt", "Hello",
                     "--max-new-tokens", "3"]) == 0
    assert "tokens/s" in capsys.readouterr().out
    assert cli_main(["bench", "--model", str(base), "--config", "rtn-int4-g128",
                     "--config", "qamw-4@fuse_siblings=true", "--calib-tokens", "256",
                     "--with-full", "--new-tokens", "3", "--rounds", "2", "--no-progress",
                     "--out", str(tmp_path / "res" / "speed")]) == 0
    out = capsys.readouterr().out
    assert out.count(" decode ") == 3
    speed = json.loads((tmp_path / "res" / "speed.json").read_text())
    assert [r["name"] for r in speed["results"]] == ["model as loaded", "rtn-int4-g128",
                                                     "qamw-4@fuse_siblings=true"]
    assert all(r["decode_tokens_per_s"] > 0 and r["new_tokens"] == 3 for r in speed["results"])
    # The median of two rounds is the slower one, and each round's figure is kept.
    assert all(r["rounds"] == 2 and len(r["round_tokens_per_s"]) == 2
               and r["decode_tokens_per_s"] == min(r["round_tokens_per_s"])
               for r in speed["results"])
    assert "rtn-int4-g128" in (tmp_path / "res" / "speed.md").read_text()
    png = tmp_path / "again.png"
    assert cli_main(["plot", "quality", str(tmp_path / "res" / "q.json"), "--out",
                     str(png)]) == 0
    assert png.stat().st_size > 1000


def test_cli_quantize_fuse_siblings(tmp_path, capsys):
    base = tmp_path / "tiny"
    save_tiny(str(base))
    qdir = tmp_path / "tiny-fused"
    assert cli_main(["quantize", "--model", str(base), "--config", "aaac-int4", "--fuse-siblings",
                     "--calib-tokens", "256", "--out", str(qdir), "--no-progress"]) == 0
    q = json.loads((qdir / "config.json").read_text())["quantization_config"]
    assert q["config"]["fuse_siblings"] is True
    assert sorted(q["fused"]) == [f"model.layers.{i}.{n}" for i in (0, 1)
                                  for n in ("mlp.gate_up_proj", "self_attn.q_k_v_proj")]
    capsys.readouterr()
    assert cli_main(["generate", "--model", str(qdir), "--prompt", "Hello",
                     "--max-new-tokens", "3"]) == 0
    assert "tokens/s" in capsys.readouterr().out
    # an unfused checkpoint is fused after loading, with the same greedy tokens
    plain = tmp_path / "tiny-plain"
    assert cli_main(["quantize", "--model", str(base), "--config", "qamw-4",
                     "--calib-tokens", "256", "--out", str(plain), "--no-progress"]) == 0
    texts = []
    for fuse in ([], ["--fuse-siblings"]):
        capsys.readouterr()
        assert cli_main(["generate", "--model", str(plain), "--prompt", "Hello",
                         "--max-new-tokens", "5", *fuse]) == 0
        texts.append(capsys.readouterr().out)
    assert "fused 4 groups of sibling layers" in texts[1]
    generated = [[line for line in t.splitlines() if not line.startswith("[qamw]")]
                 for t in texts]
    assert generated[0] == generated[1] and generated[0][0].strip()


def test_constellation_plot(tmp_path):
    from qamw_ext import codebooks
    from qamw_ext.plots import plot_constellation

    out = tmp_path / "c.png"
    assert cli_main(["plot", "constellation", "--bits", "6", "--out", str(out)]) == 0
    assert out.stat().st_size > 5000
    pts = codebooks.qam_codebook(6)
    assert plot_constellation(str(tmp_path / "p.png"), codebook=pts, bits=6)


def test_cli_bad_inputs(tmp_path, capsys):
    assert cli_main(["eval", "--model", str(tmp_path / "nope"), "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli_main(["generate", "--model", str(tmp_path / "empty"), "--prompt", "x"]) == 2
    assert "no config.json" in capsys.readouterr().err
    from transformers import ViTConfig

    ViTConfig().save_pretrained(tmp_path / "vit")
    assert cli_main(["bench", "--model", str(tmp_path / "vit")]) == 2
    assert "not a causal language model" in capsys.readouterr().err
    out = tmp_path / "never"
    assert cli_main(["quantize", "--model", str(tmp_path / "vit"), "--config", "qamw-9",
                     "--out", str(out)]) == 2
    assert "unknown quantization config" in capsys.readouterr().err
    assert not out.exists()
    assert cli_main(["quantize", "--model", str(tmp_path / "vit"), "--config", "nf4",
                     "--out", str(out)]) == 2
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


# ------------------------------------------------------------------ the real model


def test_default_model_end_to_end(tmp_path):
    """SmolLM2-135M: loads offline, quantizes (data-free RTN: quick), saves, loads back with
    identical logits, and scores a window of the evaluation text."""
    from qamw_ext.checkpoint import load_quantized, save_quantized
    from qamw_ext.models import load_model

    model, tok = load_model()
    assert model.config.num_hidden_layers == 30
    windows = D.eval_windows(D.default_evaluation(tok), 128, 128)
    full, ref = E.evaluate_windows(model, windows, keep_logits=True, progress=False)
    assert 3 < full["ppl"] < 60
    quantize_model(model, "rtn-int4-g128", None, progress=False, log=None)
    assert len(quantized_modules(model)) == 210
    q, _ = E.evaluate_windows(model, windows, reference=ref, progress=False)
    assert full["ppl"] < q["ppl"] < 1.5 * full["ppl"] and 0 < q["kl"] < 0.5
    ids = windows[:, :24]
    with torch.no_grad():
        a = model(ids).logits
    save_quantized(model, str(tmp_path / "rtn"), tok)
    back = load_quantized(str(tmp_path / "rtn"))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, a)
