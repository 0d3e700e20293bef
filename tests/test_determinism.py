"""Quantization is deterministic: the same model, calibration data and config give
bit-identical codes and side information on the same machine."""
import pytest
import torch

from qamw_ext.convert import get_config, quantize_model, quantized_modules

from conftest_pipeline import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _quantized_state(config):
    model = tiny_model(11)
    cfg = get_config(config, calib_batch=2)
    cal = torch.randint(0, 49152, (4, 32), generator=torch.Generator().manual_seed(3))
    quantize_model(model, cfg, cal if cfg.calibrate else None, progress=False, log=None)
    modules = quantized_modules(model)
    assert modules
    return {name: (m.meta(), {k: v.clone() for k, v in m.state_dict().items()})
            for name, m in modules.items()}


def _bytes(t):
    return t.contiguous().reshape(-1).view(torch.uint8)


@pytest.mark.parametrize("config", ["qamw-4", "qamw-5.5", "aaac-int4", "aaac-nvfp4-awq"])
def test_quantization_is_bit_identical(config):
    first, second = _quantized_state(config), _quantized_state(config)
    assert first.keys() == second.keys()
    for name, (meta, tensors) in first.items():
        meta2, tensors2 = second[name]
        assert meta == meta2, name
        assert tensors.keys() == tensors2.keys(), name
        for key, t in tensors.items():
            assert t.dtype == tensors2[key].dtype and t.shape == tensors2[key].shape
            assert torch.equal(_bytes(t), _bytes(tensors2[key])), f"{name}.{key} differs"
