"""Sibling fusion: q/k/v and gate/up quantized as one layer, run once per input, each sibling
served its rows; never a stale output, and the conversion's refusals."""
import pytest
import torch

from qamw_ext.convert import ConfigError, get_config, quantize_model
from qamw_ext.evaluate import materialized
from qamw_ext.fusion import (FusedSlice, concatenated_linear, fuse_siblings, fused_groups,
                             fused_name, sibling_outputs)
from qamw_ext.quantized_linear import QuantizedLinear

from conftest_pipeline import tiny_model

CAL = torch.randint(0, 49152, (4, 32), generator=torch.Generator().manual_seed(1))
IDS = torch.randint(0, 49152, (1, 20), generator=torch.Generator().manual_seed(2))


def _quantized(config, **fields):
    model = tiny_model(0)
    quantize_model(model, get_config(config, calib_batch=2, **fields), CAL, progress=False,
                   log=None)
    return model


class Counted(torch.nn.Module):
    """A dense layer that counts its calls."""

    def __init__(self, linear):
        super().__init__()
        self.linear, self.calls = linear, 0
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x):
        self.calls += 1
        return self.linear(x)


def _fused_dense(seed=0):
    g = torch.Generator().manual_seed(seed)
    parent = torch.nn.Module()
    for name, rows in (("q_proj", 12), ("k_proj", 5), ("v_proj", 5)):
        lin = torch.nn.Linear(16, rows, bias=name != "k_proj")
        with torch.no_grad():
            lin.weight.copy_(torch.randn(rows, 16, generator=g))
            if lin.bias is not None:
                lin.bias.copy_(torch.randn(rows, generator=g))
        setattr(parent, name, lin)
    olds = [parent.q_proj, parent.k_proj, parent.v_proj]
    layer = Counted(concatenated_linear(olds))
    assert fuse_siblings(parent, ["q_proj", "k_proj", "v_proj"], layer) == "q_k_v_proj"
    return parent, olds, layer


def test_names():
    assert fused_name(["q_proj", "k_proj", "v_proj"]) == "q_k_v_proj"
    assert fused_name(["gate_proj", "up_proj"]) == "gate_up_proj"
    assert fused_name(["wq", "wk"]) == "wq_wk"


def test_one_call_per_input_and_each_sibling_its_rows():
    parent, olds, layer = _fused_dense()
    x = torch.randn(3, 16)
    outs = [parent.q_proj(x), parent.k_proj(x), parent.v_proj(x)]
    assert layer.calls == 1
    for out, old in zip(outs, olds):
        torch.testing.assert_close(out, old(x))     # bias of the unbiased k_proj stays 0
    assert parent.q_k_v_proj is layer and layer.linear.bias[12:17].eq(0).all()
    # every sibling served: nothing held, the next input runs the layer again
    assert layer_state_is_clear(parent)
    y = torch.randn(3, 16)
    torch.testing.assert_close(parent.v_proj(y), olds[2](y))
    assert layer.calls == 2
    # the functional form: one call, the same rows
    before = layer.calls
    for out, old in zip(sibling_outputs(parent, ["q_proj", "k_proj", "v_proj"], y), olds):
        torch.testing.assert_close(out, old(y))
    assert layer.calls == before + 1
    # not all the siblings (or out of order): one call each, still right
    k, q = sibling_outputs(parent, ["k_proj", "q_proj"], y)
    torch.testing.assert_close(k, olds[1](y))
    torch.testing.assert_close(q, olds[0](y))


def layer_state_is_clear(parent):
    group = parent.q_proj.group
    return group.input is None and group.outputs is None


def test_never_a_stale_output():
    parent, olds, layer = _fused_dense(1)
    x, y = torch.randn(2, 16), torch.randn(2, 16)
    parent.q_proj(x)
    torch.testing.assert_close(parent.k_proj(y), olds[1](y))      # another input
    parent.q_proj(x)
    x.mul_(-3.0)                                                   # changed in place
    torch.testing.assert_close(parent.k_proj(x), olds[1](x))
    parent.q_proj(x)
    torch.testing.assert_close(parent.q_proj(x), olds[0](x))      # asked twice
    z = torch.randn(2, 16)
    parent.q_proj(z)
    del z                                                          # freed: its address may
    w = torch.randn(2, 16)                                         # be reused by w
    torch.testing.assert_close(parent.k_proj(w), olds[1](w))
    with torch.inference_mode():                                   # no version counter
        v = torch.randn(2, 16)
        torch.testing.assert_close(parent.v_proj(v), olds[2](v))


def test_fuse_refuses_mismatched_layers():
    parent = torch.nn.Module()
    parent.a, parent.b = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
    with pytest.raises(ValueError, match="cannot fuse"):
        fuse_siblings(parent, ["a", "b"], torch.nn.Linear(8, 9))
    with pytest.raises(ValueError, match="cannot fuse"):
        fuse_siblings(parent, ["a", "b"], torch.nn.Linear(7, 8))


@pytest.mark.parametrize("config", ["qamw-4", "aaac-int4"])
def test_conversion_fuses_qkv_and_gate_up(config):
    model = _quantized(config, fuse_siblings=True)
    groups = fused_groups(model)
    assert sorted(groups) == [f"model.layers.{i}.{n}" for i in (0, 1)
                              for n in ("mlp.gate_up_proj", "self_attn.q_k_v_proj")]
    quantized = {n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert len(quantized) == 8 and set(groups) <= quantized
    assert set(model.qamw_report["layers"]) == quantized
    # the fused layer's rows are the siblings' weights, quantized from their shared input
    dense = tiny_model(0)
    for name, siblings in groups.items():
        fused = model.get_submodule(name)
        want = torch.cat([dense.get_submodule(s).weight for s in siblings])
        got = fused.dequantize(torch.float32)
        assert got.shape == want.shape
        err = (got - want).norm() / want.norm()
        assert 0 < err < 0.2, (name, err)
    # a forward runs each fused layer once, GEMV path and large-batch path alike
    calls = {}
    for name in groups:
        fused = model.get_submodule(name)
        fused.register_forward_hook(lambda m, a, o, name=name: calls.update(
            {name: calls.get(name, 0) + 1}))
    with torch.no_grad():
        small = model(IDS[:, :4]).logits
        assert all(c == 1 for c in calls.values()) and len(calls) == 4
        big = model(IDS).logits
        with materialized(model):
            assert torch.equal(model(IDS).logits, big)
            assert torch.equal(model(IDS[:, :4]).logits, small)
    assert torch.isfinite(big).all()


@pytest.mark.parametrize("config", ["qamw-4", "aaac-int4-awq", "aaac-nvfp4-awq"])
def test_fusion_changes_nothing(config):
    """Each sibling is quantized as its own layer and keeps its own channel scale (AAAC: its
    codebooks and tensor scale too) inside the fused layer, so the fused model is the unfused
    model, bit for bit, on the GEMV path and the large-batch path: any difference would be
    the fusion's own (the wrong input's statistics, rows or scales out of order, a stale
    sibling output)."""
    outs, models = [], []
    for fuse in (False, True):
        model = _quantized(config, fuse_siblings=fuse)
        with torch.no_grad():
            outs.append((model(IDS).logits, model(IDS[:, :3]).logits))
        models.append(model)
    unfused, fused = models
    assert len(fused_groups(fused)) == 4
    for name, siblings in fused_groups(fused).items():
        layer = fused.get_submodule(name)
        assert layer.sibling_rows == [unfused.get_submodule(s).out_features for s in siblings]
        assert layer.alpha == [unfused.get_submodule(s).alpha for s in siblings]
    # the siblings chose different channel scales: one shared scale would not do
    assert any(len(set(fused.get_submodule(n).alpha)) > 1 for n in fused_groups(fused))
    # the same storage, give or take a shared seed and the ones a sibling that chose no
    # channel scale (alpha 0) holds in the fused layer's stack
    for name, siblings in fused_groups(fused).items():
        layer, olds = fused.get_submodule(name), [unfused.get_submodule(s) for s in siblings]
        own = sum(m.bits_per_weight() * m.in_features * m.out_features for m in olds)
        ones = 32 * layer.padded_in * sum(m.channel_scale is None for m in olds)
        bits = layer.bits_per_weight() * layer.in_features * layer.out_features
        assert own - 64 * len(olds) <= bits <= own + ones
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_fuse_needs_the_same_options():
    from qamw_ext.qamw import QAMWLinear

    lins = [torch.nn.Linear(64, 8) for _ in range(5)]
    layers = [QAMWLinear.from_linear(lin, None, bits=8) for lin in lins]
    fused = QAMWLinear.fuse(layers[:3])
    x = torch.randn(2, 64)
    assert torch.equal(fused(x), torch.cat([layer(x) for layer in layers[:3]], dim=1))
    with pytest.raises(ValueError, match=r"whose \['bits'\] differ"):
        QAMWLinear.fuse([layers[0], QAMWLinear.from_linear(lins[1], None, bits=9)])
    with pytest.raises(ValueError, match="holds 2 to 4 layers, got 5"):
        QAMWLinear.fuse(layers)


@pytest.mark.parametrize("config", ["qamw-4", "aaac-nvfp4-awq", "rtn-int4-g128"])
def test_fuse_quantized_after_conversion(tmp_path, config):
    """An unfused quantized model fused afterwards (one forward finds the siblings) computes
    what it did, and saves and loads as a fused model. rtn has no per-layer buffers to
    stack: its siblings fuse at conversion only, and are left as they are."""
    from qamw_ext.checkpoint import load_quantized, save_quantized
    from qamw_ext.fusion import fuse_quantized

    model = _quantized(config)
    with torch.no_grad():
        want = (model(IDS).logits, model(IDS[:, :3]).logits)
    fused, skipped = fuse_quantized(model)
    if config.startswith("rtn"):
        assert fused == {} and len(skipped) == 4
        assert all("fuse them at conversion" in why for why in skipped.values())
        return
    assert not skipped and fused == fused_groups(model) and len(fused) == 4
    assert fused["model.layers.0.self_attn.q_k_v_proj"] == [
        f"model.layers.0.self_attn.{n}_proj" for n in "qkv"]
    assert fuse_quantized(model) == ({}, {})    # nothing left to fuse
    with torch.no_grad():
        got = (model(IDS).logits, model(IDS[:, :3]).logits)
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    assert model.qamw_config.fuse_siblings
    back = load_quantized(save_quantized(model, str(tmp_path / "q")))
    assert fused_groups(back) == fused
    with torch.no_grad():
        assert torch.equal(back(IDS).logits, want[0])


def test_fuse_quantized_leaves_differing_siblings(tmp_path):
    from qamw_ext.fusion import fuse_quantized

    cfg = get_config("qamw-4", calib_batch=2)
    cfg.layer_options = {"model.layers.1.self_attn.k_proj": {"bits": 9}}
    model = tiny_model(0)
    quantize_model(model, cfg, CAL, progress=False, log=None)
    fused, skipped = fuse_quantized(model)
    assert len(fused) == 3 and list(skipped) == [
        ", ".join(f"model.layers.1.self_attn.{n}_proj" for n in "qkv")]
    assert "['bits'] differ" in skipped[list(skipped)[0]]


def test_sibling_outputs_compiles():
    parent, olds, _ = _fused_dense(2)
    step = torch.compile(lambda x: sibling_outputs(parent, ["q_proj", "k_proj", "v_proj"], x),
                         fullgraph=True, backend="eager")
    x = torch.randn(1, 16)
    for out, old in zip(step(x), olds):
        torch.testing.assert_close(out, old(x))


def test_bit_allocation_gives_fused_siblings_one_width():
    from qamw_ext.convert import QuantConfig

    uniform = _quantized("qamw-4")
    model = quantize_model(tiny_model(0), QuantConfig("qamw", {"bits": 8}, bit_allocation=True,
                                                      fuse_siblings=True, calib_batch=2),
                           CAL, progress=False, log=None)
    alloc = model.qamw_report["allocation"]
    assert sorted(map(sorted, alloc["fused_groups"])) == sorted(
        sorted(sib) for sib in fused_groups(model).values())
    for name, siblings in fused_groups(model).items():
        assert {alloc["bits"][s] for s in siblings} == {model.get_submodule(name).bits}
    assert len(set(alloc["bits"].values())) > 1
    # within the budget: the uniform width's storage with a channel scale on every linear
    # (a fused layer holds one per sibling, ones where a sibling chose none)
    assert model.qamw_report["bits_per_weight"] <= alloc["budget_bits_per_weight"] + 1e-9
    assert alloc["budget_bits_per_weight"] >= uniform.qamw_report["bits_per_weight"]


def test_conversion_refusals():
    with pytest.raises(ConfigError, match="needs a calibrating config"):
        quantize_model(tiny_model(0), get_config("rtn-int4-g128", fuse_siblings=True), None,
                       progress=False, log=None)
    cfg = get_config("qamw-4", calib_batch=2, fuse_siblings=True)
    cfg.layer_options = {"model.layers.0.self_attn.k_proj": {"bits": 9}}
    with pytest.raises(ConfigError, match="layer_options differ between the fused siblings"):
        quantize_model(tiny_model(0), cfg, CAL, progress=False, log=None)
    # the same options on every sibling are fine
    cfg.layer_options = {f"model.layers.0.self_attn.{n}_proj": {"bits": 9} for n in "qkv"}
    model = quantize_model(tiny_model(0), cfg, CAL, progress=False, log=None)
    assert model.model.layers[0].self_attn.q_k_v_proj.bits == 9
    assert isinstance(model.model.layers[0].self_attn.v_proj, FusedSlice)
