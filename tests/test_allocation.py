"""Bit allocation by sensitivity, and the non-sequential calibration ablation."""
import itertools

import pytest
import torch

from qamw_ext import allocation as A
from qamw_ext import calibration as C
from qamw_ext.convert import QuantConfig, quantize_model, quantized_modules

from conftest_pipeline import tiny_model
from test_pipeline import LINEARS, _hooked_inputs, _Recorder


def test_allocate_is_optimal_on_small_convex_problems():
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        costs = {}
        for name in "abcd":
            size = float(torch.randint(1, 5, (1,), generator=g)) * 100
            base = float(torch.rand(1, generator=g)) * 10 + 0.1
            costs[name] = {b: (base * 2.0 ** -b, size * b) for b in (3, 4, 5, 6)}
        budget = sum(c[4][1] for c in costs.values()) + 100 * trial % 300
        choice = A.allocate(costs, budget)
        spent = sum(costs[n][b][1] for n, b in choice.items())
        assert spent <= budget
        best = min((sum(costs[n][b][0] for n, b in zip(costs, bs)), bs)
                   for bs in itertools.product((3, 4, 5, 6), repeat=4)
                   if sum(costs[n][b][1] for n, b in zip(costs, bs)) <= budget)
        got = sum(costs[n][b][0] for n, b in choice.items())
        # Greedy on convex costs is optimal up to the last upgrade that no longer fits.
        assert got <= best[0] * 1.6 + 1e-12


def test_allocate_rejects_an_impossible_budget():
    costs = {"a": {4: (1.0, 400.0), 5: (0.5, 500.0)}}
    with pytest.raises(ValueError, match="budget"):
        A.allocate(costs, 300.0)
    assert A.allocate(costs, 450.0) == {"a": 4}
    assert A.allocate(costs, 500.0) == {"a": 5}


def _calibration():
    return torch.randint(0, 49152, (4, 32), generator=torch.Generator().manual_seed(1))


def test_plan_spends_no_bits_on_a_layer_the_loss_does_not_see():
    model = tiny_model(3)
    # With the gate at zero, silu(gate) * up is zero whatever up_proj computes: its outputs
    # have no gradient, so its rounding costs nothing and its bits go to other layers.
    mute = "model.layers.1.mlp.up_proj"
    with torch.no_grad():
        model.get_submodule("model.layers.1.mlp.gate_proj").weight.zero_()
    names = [f"model.layers.{i}.{n}" for i in range(2) for n in LINEARS]
    from qamw_ext.qamw import QAMWLinear

    batches = list(torch.split(_calibration(), 2))
    choice, report = A.plan(model, names, QAMWLinear, {"bits": 8}, batches, sample_rows=64)
    assert set(choice) == set(names)
    assert all(b in report["candidates"] for b in choice.values())
    assert report["bits_per_weight"] <= report["budget_bits_per_weight"] + 1e-9
    assert report["predicted_cost"] <= report["predicted_cost_uniform"]
    # (Rows are stored in whole 128-bit words, so one extra bit per pair can be free.)
    layer = model.get_submodule(mute)
    narrowest = min(report["candidates"])
    assert (QAMWLinear.from_linear(layer, None, bits=choice[mute]).bits_per_weight()
            == QAMWLinear.from_linear(layer, None, bits=narrowest).bits_per_weight())
    assert max(choice.values()) > 8
    # The model itself is left as it was: no gradients, nothing replaced.
    assert not quantized_modules(model)
    assert all(p.grad is None for p in model.parameters())
    again, _ = A.plan(model, names, QAMWLinear, {"bits": 8}, batches, sample_rows=64)
    assert again == choice


def test_quantize_model_with_bit_allocation_stays_within_the_uniform_storage():
    cal = _calibration()
    uniform = quantize_model(tiny_model(4), QuantConfig("qamw", {"bits": 8}), cal,
                             progress=False, log=None)
    model = quantize_model(tiny_model(4), QuantConfig("qamw", {"bits": 8}, bit_allocation=True),
                           cal, progress=False, log=None)
    alloc = model.qamw_report["allocation"]["bits"]
    mods = quantized_modules(model)
    assert {n: m.bits for n, m in mods.items()} == alloc
    assert len(set(alloc.values())) > 1
    assert model.qamw_report["bits_per_weight"] <= uniform.qamw_report["bits_per_weight"] + 1e-9
    # An explicit per-layer option wins over the allocation.
    name = sorted(alloc)[0]
    model = quantize_model(tiny_model(4), QuantConfig("qamw", {"bits": 8}, bit_allocation=True,
                                                      layer_options={name: {"bits": 12}}),
                           cal, progress=False, log=None)
    assert quantized_modules(model)[name].bits == 12


def test_non_sequential_calibration_measures_the_full_precision_model():
    model = tiny_model(5)
    ids = torch.randint(0, 49152, (6, 24))
    targets = {f"model.layers.{i}.{n}" for i in range(2) for n in LINEARS}
    fp_inputs = _hooked_inputs(model, ids, sorted(targets))
    rec = _Recorder()
    C.calibrate_and_replace(model, list(torch.split(ids, 2)), rec, targets, sequential=False,
                            sample_rows=16, progress=False)
    for name, x in fp_inputs.items():
        torch.testing.assert_close(rec.stats[name].mean_sq, (x * x).mean(0), rtol=1e-4,
                                   atol=1e-6)


def test_config_fields_after_an_at_sign():
    from qamw_ext.convert import ConfigError, get_config

    cfg = get_config("qamw-5.5-ef@bit_allocation=true,sequential=false,calib_tokens=4096")
    assert cfg.options == {"bits": 11, "error_feedback": True}
    assert cfg.bit_allocation is True and cfg.sequential is False and cfg.calib_tokens == 4096
    assert cfg.label == "qamw-5.5-ef@bit_allocation=true,sequential=false,calib_tokens=4096"
    assert get_config("qamw:bits=9@seed=3").seed == 3
    assert get_config("qamw-4@exclude=self_attn").exclude == ("self_attn",)
    best = get_config("qamw-4-best")
    assert best.bit_allocation and best.options == {"bits": 8, "error_feedback": True,
                                                    "block_size": "largest"}
    assert not get_config("qamw-4-best@bit_allocation=false").bit_allocation
    for bad in ("qamw-4@colour=red", "qamw-4@sequential", "qamw-4@layer_options=x"):
        with pytest.raises(ConfigError, match="after '@'"):
            get_config(bad)
