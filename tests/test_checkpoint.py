"""Save and load: safetensors + quantization_config, exact logits after loading, atomic
writes, and clear refusals of truncated, tampered or foreign checkpoints."""
import json
import os
import pathlib

import pytest
import torch
from safetensors.torch import load_file, save_file

from qamw_ext import checkpoint as CK
from qamw_ext.checkpoint import CheckpointError, load_quantized, save_quantized
from qamw_ext.convert import get_config, quantize_model

from conftest_pipeline import tiny_model

IDS = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(0))


def _quantized(config="nf4", seed=0, **kw):
    model = tiny_model(seed, **kw)
    cfg = get_config(config, calib_batch=2)
    cal = torch.randint(0, 49152, (4, 32), generator=torch.Generator().manual_seed(1)) \
        if cfg.calibrate else None
    quantize_model(model, cfg, cal, progress=False, log=None)
    return model


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("config", ["rtn-int4-g128", "nf4", "qamw-4", "polar-3.5",
                                    "aaac-int4", "aaac-nvfp4-awq"])
def test_roundtrip_reproduces_logits_exactly(tmp_path, config):
    model = _quantized(config)
    ref = _logits(model)
    small = _logits(model, IDS[:1, :8])          # the GEMV path too
    out = save_quantized(model, str(tmp_path / "q"))
    files = sorted(os.listdir(out))
    assert "model.safetensors" in files and "config.json" in files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    back = load_quantized(out)
    assert torch.equal(_logits(back), ref)
    assert torch.equal(_logits(back, IDS[:1, :8]), small)
    assert back.qamw_config.label == config
    q = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "qamw_ext" and q["format_version"] == CK.FORMAT_VERSION
    assert len(q["modules"]) == 14


@pytest.mark.parametrize("config", ["qamw-4", "aaac-int4"])
def test_fused_siblings_roundtrip(tmp_path, config):
    model = _quantized(f"{config}@fuse_siblings=true")
    ref, small = _logits(model), _logits(model, IDS[:1, :8])
    save_quantized(model, str(tmp_path / "q"))
    q = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert q["format_version"] == CK.FORMAT_VERSION
    assert q["fused"]["model.layers.1.mlp.gate_up_proj"] == [
        "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]
    assert len(q["fused"]) == 4 and len(q["modules"]) == 8
    assert all(len(q["modules"][name]["sibling_rows"]) == len(sib)
               for name, sib in q["fused"].items())
    back = load_quantized(str(tmp_path / "q"))
    assert type(back.model.layers[0].self_attn.k_proj).__name__ == "FusedSlice"
    assert torch.equal(_logits(back), ref)
    assert torch.equal(_logits(back, IDS[:1, :8]), small)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "q"))
    assert torch.equal(_logits(hf), ref)


def test_fused_map_is_checked(tmp_path):
    model = _quantized("qamw-4@fuse_siblings=true")
    path = pathlib.Path(save_quantized(model, str(tmp_path / "q")))
    good = json.loads((path / "config.json").read_text())["quantization_config"]
    tensors = load_file(str(path / "model.safetensors"))
    qkv = "model.layers.0.self_attn.q_k_v_proj"

    def refused(match, **fused_changes):
        _rewrite(path, tensors, good["modules"], {**good["fused"], **fused_changes})
        with pytest.raises(CheckpointError, match=match):
            load_quantized(str(path))

    sib = good["fused"][qkv]
    # the siblings' rows moved between them: each would get another's channel scale
    rows = good["modules"][qkv]["sibling_rows"]
    moved = {**good["modules"], qkv: {**good["modules"][qkv],
                                      "sibling_rows": [rows[0] - 1, rows[1] + 1, *rows[2:]]}}
    _rewrite(path, tensors, moved, good["fused"])
    with pytest.raises(CheckpointError, match="meta gives its siblings"):
        load_quantized(str(path))
    refused("name does not follow", **{qkv: sib[:2]})            # a sibling left out
    refused("name does not follow", **{qkv: [sib[1], sib[0], sib[2]]})
    refused("not all children", **{qkv: [sib[0], "model.layers.0.mlp.up_proj", sib[2]]})
    refused("fused is malformed", **{qkv: "q_proj"})
    refused("fused is malformed", **{"model.layers.0.self_attn.o_k_proj": sib})
    # config.json's map edited without the weights file's copy
    _rewrite(path, tensors, good["modules"], good["fused"])
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"]["fused"].pop(qkv)
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="do not match those stored with the weights"):
        load_quantized(str(path))


def test_format_2_is_still_read(tmp_path, monkeypatch):
    model = _quantized("qamw-4")
    monkeypatch.setattr(CK, "FORMAT_VERSION", 2)
    save_quantized(model, str(tmp_path / "q"))
    monkeypatch.undo()
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["quantization_config"]["format_version"] == 2
    assert torch.equal(_logits(load_quantized(str(tmp_path / "q"))), _logits(model))


def test_format_3_fused_layers_are_still_read(tmp_path, monkeypatch):
    """Format 3's fused layers held one channel scale for all siblings: plain layers of their
    rows, with no sibling_rows."""
    from qamw_ext.fusion import concatenated_linear, fuse_siblings
    from qamw_ext.qamw import QAMWLinear

    model = tiny_model(0)
    dense = tiny_model(0)
    for i in range(2):
        names = ["q_proj", "k_proj", "v_proj"]
        attn, ref = model.model.layers[i].self_attn, dense.model.layers[i].self_attn
        shared = QAMWLinear.from_linear(
            concatenated_linear([getattr(ref, n) for n in names]), None, bits=8)
        fuse_siblings(attn, names, shared)
    model.qamw_config = get_config("qamw:bits=8", fuse_siblings=True)
    monkeypatch.setattr(CK, "FORMAT_VERSION", 3)
    save_quantized(model, str(tmp_path / "q"))
    monkeypatch.undo()
    q = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert q["format_version"] == 3 and len(q["fused"]) == 2
    back = load_quantized(str(tmp_path / "q"))
    assert back.model.layers[1].self_attn.q_k_v_proj.sibling_rows is None
    assert torch.equal(_logits(back), _logits(model))


def test_format_4_qamw_layers_keep_their_fp32_codewords(tmp_path, monkeypatch):
    """Format 4 had no codebook_points: its QAM-W layers were quantized with the trained fp32
    codewords, and are read with them, to the same logits."""
    from qamw_ext.qamw import QAMWLinear

    model = _quantized("qamw:bits=8,codebook_points=fp32")
    meta = QAMWLinear.meta
    monkeypatch.setattr(QAMWLinear, "meta", lambda self: {
        k: v for k, v in meta(self).items() if k != "codebook_points"})
    monkeypatch.setattr(CK, "FORMAT_VERSION", 4)
    save_quantized(model, str(tmp_path / "q"))
    monkeypatch.undo()
    q = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert q["format_version"] == 4
    assert all("codebook_points" not in m for m in q["modules"].values())
    back = load_quantized(str(tmp_path / "q"))
    layers = [m for m in back.modules() if isinstance(m, QAMWLinear)]
    assert layers and all(m.codebook_points == "fp32" for m in layers)
    assert torch.equal(_logits(back), _logits(model))


def test_from_pretrained_after_import(tmp_path):
    from transformers import AutoModelForCausalLM

    import qamw_ext.checkpoint  # noqa: F401  (registers the quantizer)

    model = _quantized("qamw-5.5")
    ref = _logits(model)
    save_quantized(model, str(tmp_path / "q"))
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "q"))
    assert type(hf.model.layers[1].mlp.down_proj).__name__ == "QAMWLinear"
    assert torch.equal(_logits(hf), ref)


def test_lm_head_quantized_roundtrip(tmp_path):
    model = tiny_model(3)
    quantize_model(model, get_config("rtn-int4-g128", include_lm_head=True), None,
                   progress=False, log=None)
    ref = _logits(model)
    save_quantized(model, str(tmp_path / "q"))
    back = load_quantized(str(tmp_path / "q"))
    assert torch.equal(_logits(back), ref)
    assert type(back.lm_head).__name__ == "RTNLinear"


def test_save_refuses_and_is_atomic(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="no quantized layers"):
        save_quantized(tiny_model(), str(tmp_path / "x"))
    model = _quantized()
    save_quantized(model, str(tmp_path / "q"))
    with pytest.raises(CheckpointError, match="already exists"):
        save_quantized(model, str(tmp_path / "q"))

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr("safetensors.torch.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_quantized(model, str(tmp_path / "new"))
    with pytest.raises(OSError, match="disk full"):
        save_quantized(model, str(tmp_path / "q"), overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["q"]      # no half-written directory, no temp
    monkeypatch.undo()
    assert torch.equal(_logits(load_quantized(str(tmp_path / "q"))), _logits(model))


def test_save_removes_what_killed_saves_left_behind(tmp_path):
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".q.tmp-{dead.pid}-abc"
    live = tmp_path / f".q.tmp-{os.getppid()}-def"     # a save still running elsewhere
    old = tmp_path / f".q.old-{dead.pid}-ghi"          # may be the only copy of a model
    other = tmp_path / f".r.tmp-{dead.pid}-jkl"        # another target's
    for d in (stale, live, old, other):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
    save_quantized(_quantized(), str(tmp_path / "q"))
    assert not stale.exists()
    assert live.exists() and old.exists() and other.exists()
    assert (tmp_path / "q" / "config.json").exists()


def _saved(tmp_path):
    model = _quantized("rtn-int4-g128")
    path = pathlib.Path(save_quantized(model, str(tmp_path / "q")))
    return model, path


def _rewrite(path, tensors, modules=None, fused=None):
    """Re-save the weights (and layer descriptions) with a matching hash, as a careful
    forger would."""
    w = path / "model.safetensors"
    cfg = json.loads((path / "config.json").read_text())
    if modules is not None:
        cfg["quantization_config"]["modules"] = modules
    if fused is not None:
        cfg["quantization_config"]["fused"] = fused
    save_file(tensors, str(w), metadata={
        "format": "pt", "quant_method": "qamw_ext", "format_version": str(CK.FORMAT_VERSION),
        "qamw_modules": json.dumps(cfg["quantization_config"]["modules"], sort_keys=True),
        "qamw_fused": json.dumps(cfg["quantization_config"].get("fused", {}), sort_keys=True)})
    cfg["quantization_config"]["weights_sha256"] = CK._sha256(str(w))
    (path / "config.json").write_text(json.dumps(cfg))


def test_truncated_or_modified_weights_are_refused(tmp_path):
    _, path = _saved(tmp_path)
    w = path / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or was modified"):
        load_quantized(str(path))
    flipped = bytearray(data)
    flipped[-100] ^= 0xFF
    w.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="truncated or was modified"):
        load_quantized(str(path))


def test_wrong_names_shapes_dtypes_are_refused(tmp_path):
    _, path = _saved(tmp_path)
    good = load_file(str(path / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj.scales"

    t = dict(good)
    t[name] = t[name].to(torch.float32)
    _rewrite(path, t)
    with pytest.raises(CheckpointError, match="down_proj.scales: file has float32"):
        load_quantized(str(path))

    t = dict(good)
    t[name] = t[name][:32].contiguous()
    _rewrite(path, t)
    with pytest.raises(CheckpointError, match="down_proj.scales"):
        load_quantized(str(path))

    t = dict(good)
    del t[name]
    t["model.layers.0.mlp.down_proj.extra"] = torch.zeros(3)
    _rewrite(path, t)
    with pytest.raises(CheckpointError, match="(?s)missing tensors.*unexpected tensors"):
        load_quantized(str(path))


def test_bad_config_is_refused(tmp_path):
    _, path = _saved(tmp_path)
    cfg_path = path / "config.json"
    good = json.loads(cfg_path.read_text())

    def with_q(**changes):
        cfg = json.loads(json.dumps(good))
        cfg["quantization_config"].update(changes)
        cfg_path.write_text(json.dumps(cfg))

    with_q(format_version=99)
    with pytest.raises(CheckpointError, match="format version 99 is not supported"):
        load_quantized(str(path))
    mods = dict(good["quantization_config"]["modules"])
    mods["model.layers.0.mlp.up_proj"] = dict(mods["model.layers.0.mlp.up_proj"],
                                              method="zip")
    tensors = load_file(str(path / "model.safetensors"))
    cfg_path.write_text(json.dumps(good))
    _rewrite(path, tensors, mods)
    with pytest.raises(CheckpointError, match="no codec registered for method 'zip'"):
        load_quantized(str(path))
    mods = dict(good["quantization_config"]["modules"])
    mods["model.layers.0.mlp.up_proj"] = dict(mods["model.layers.0.mlp.up_proj"],
                                              group_size=64)   # same shapes, other meaning
    _rewrite(path, tensors, good["quantization_config"]["modules"])
    with_q(modules=mods, weights_sha256=json.loads(cfg_path.read_text())[
        "quantization_config"]["weights_sha256"])
    with pytest.raises(CheckpointError, match="do not match those stored with the weights"):
        load_quantized(str(path))
    mods = dict(good["quantization_config"]["modules"])
    mods["model.layers.7.mlp.up_proj"] = mods["model.layers.0.mlp.up_proj"]
    _rewrite(path, tensors, mods)
    with pytest.raises(CheckpointError, match="does not have"):
        load_quantized(str(path))
    cfg = dict(good)
    del cfg["quantization_config"]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="not a qamw_ext checkpoint"):
        load_quantized(str(path))
    cfg_path.write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_quantized(str(path))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_quantized(str(tmp_path / "nowhere"))


def test_no_pickle_in_the_pipeline():
    root = pathlib.Path(__file__).resolve().parents[1] / "qamw_ext"
    for name in ("checkpoint.py", "models.py", "convert.py", "calibration.py", "evaluate.py",
                 "cli.py", "data.py", "plots.py"):
        src = (root / name).read_text()
        assert "import pickle" not in src and "torch.load(" not in src, name


def _tensor_offsets(path):
    """{name: absolute byte offset of its data} of a safetensors file."""
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    return {k: 8 + size + v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


def test_interrupted_save_keeps_the_old_model(tmp_path, monkeypatch):
    model, path = _saved(tmp_path)
    ref = _logits(model)
    other = _quantized("rtn-int4-g128", seed=5)

    def interrupt(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(CK, "_exchange", interrupt)           # at the very last step
    with pytest.raises(KeyboardInterrupt):
        save_quantized(other, str(path), overwrite=True)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["q"]
    assert torch.equal(_logits(load_quantized(str(path))), ref)

    save_quantized(other, str(path), overwrite=True)           # a completed overwrite
    assert sorted(os.listdir(tmp_path)) == ["q"]
    assert torch.equal(_logits(load_quantized(str(path))), _logits(other))


KILL_DURING_SAVE = """
import os, signal, sys
import safetensors.torch
from qamw_ext.checkpoint import load_quantized, save_quantized

model = load_quantized(sys.argv[1])
def half_then_die(tensors, filename, metadata=None):
    with open(filename, "wb") as f:
        f.write(b"x" * 1000)
        f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
safetensors.torch.save_file = half_then_die
save_quantized(model, sys.argv[2], overwrite=True)
"""


def test_killed_save_leaves_nothing_loadable(tmp_path):
    import subprocess
    import sys

    model, path = _saved(tmp_path)
    ref = _logits(model)
    for target in (path, tmp_path / "new"):
        proc = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, str(path), str(target)],
                              capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert not (tmp_path / "new").exists()
    assert torch.equal(_logits(load_quantized(str(path))), ref)   # the old model, whole
    leftovers = [p for p in tmp_path.iterdir() if p.name != "q"]
    assert leftovers and all(p.name.startswith((".q.tmp-", ".new.tmp-")) for p in leftovers)
    for p in leftovers:                                            # half-written: refused
        with pytest.raises(CheckpointError, match="has no config.json"):
            load_quantized(str(p))


def test_damage_is_located(tmp_path):
    _, path = _saved(tmp_path)
    w = path / "model.safetensors"
    good = w.read_bytes()
    name = "model.layers.1.self_attn.o_proj.packed"
    flipped = bytearray(good)
    flipped[_tensor_offsets(w)[name] + 3] ^= 0x10
    w.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match=rf"differ from their checksums: \['{name}'\]"):
        load_quantized(str(path))
    for damaged in (good[:len(good) // 3], good[:5], b"", b"\xff" + good[1:]):
        w.write_bytes(damaged)                                     # truncated, or header size
        with pytest.raises(CheckpointError, match="truncated or was modified.*header or size"):
            load_quantized(str(path))
    w.unlink()
    with pytest.raises(CheckpointError, match="has no model.safetensors"):
        load_quantized(str(path))


def test_missing_tensor_and_per_tensor_checksums(tmp_path):
    _, path = _saved(tmp_path)
    good = load_file(str(path / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.packed"
    t = dict(good)
    del t[name]
    _rewrite(path, t)
    with pytest.raises(CheckpointError, match=rf"missing tensors: \['{name}'\]"):
        load_quantized(str(path))
    t = dict(good)
    t[name] = t[name] ^ 1           # same shape and dtype, other codes, file hash redone
    _rewrite(path, t)
    with pytest.raises(CheckpointError, match=f"{name}: its bytes do not match the SHA-256"):
        load_quantized(str(path))


FOREIGN = [
    (lambda c: c.pop("quantization_config"), "not a qamw_ext checkpoint"),
    (lambda c: c.update(quantization_config={"quant_method": "gptq", "bits": 4}),
     "not a qamw_ext checkpoint"),
    (lambda c: c["quantization_config"].pop("format_version"), "format version None is not supported"),
    (lambda c: c["quantization_config"].update(format_version=1), "format version 1 is not supported"),
    (lambda c: c["quantization_config"].update(format_version="2"), "format version '2' is not supported"),
    (lambda c: c["quantization_config"].update(tensors=[]), "tensors is malformed"),
    (lambda c: c["quantization_config"]["tensors"].update(
        {k: v[:2] for k, v in c["quantization_config"]["tensors"].items()}), "tensors is malformed"),
    (lambda c: c["quantization_config"].update(weights_sha256=12), "is not a SHA-256"),
    (lambda c: c["quantization_config"].update(modules=[]), "modules is empty or malformed"),
    (lambda c: c.pop("model_type"), "no model_type"),
    (lambda c: c.update(model_type="no-such-model"), "cannot build a causal LM"),
    (lambda c: c.update(model_type="bert"), "lists module .* which this model architecture does not have"),
]


def test_foreign_config_files_are_refused(tmp_path):
    _, path = _saved(tmp_path)
    cfg_path = path / "config.json"
    good = cfg_path.read_text()
    for change, message in FOREIGN:
        cfg = json.loads(good)
        change(cfg)
        cfg_path.write_text(json.dumps(cfg))
        with pytest.raises(CheckpointError, match=message):
            load_quantized(str(path))
    for raw, message in [(b"[1, 2]", "not a JSON object"), (b"", "not valid JSON"),
                         (b"\xff\xfe{\x00", "not valid JSON"), (good.encode()[:200], "not valid JSON")]:
        cfg_path.write_bytes(raw)
        with pytest.raises(CheckpointError, match=message):
            load_quantized(str(path))
    tiny_model().save_pretrained(str(tmp_path / "plain"))   # a plain, unquantized model
    with pytest.raises(CheckpointError, match="not a qamw_ext checkpoint"):
        load_quantized(str(tmp_path / "plain"))
