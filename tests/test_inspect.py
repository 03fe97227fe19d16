"""`inspect` of a float source reads config.json and the safetensors headers only (a meta-device
skeleton), and says exactly what a full load would say."""

from __future__ import annotations

import pytest
import torch

import anyquant.inspection as inspection
from anyquant.formats.io import load_source
from anyquant.model.load import all_finite
from anyquant.model.modelmap import build_model_map


def _full_load_summary(path) -> dict:
    model, _, _ = load_source(str(path), refuse_quantized=False)
    mmap = build_model_map(model)
    data = mmap.summary()
    dtypes: dict[str, int] = {}
    for p in {id(p): p for p in model.parameters()}.values():
        k = str(p.dtype).replace("torch.", "")
        dtypes[k] = dtypes.get(k, 0) + p.numel()
    data["param_dtypes"] = dtypes
    data["estimated_size"] = inspection.size_estimates(model, mmap)
    return data


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_float_source_inspected_without_reading_weights(tmp_path, monkeypatch, dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, tie_word_embeddings=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).to(dtype).save_pretrained(tmp_path)
    expected = _full_load_summary(tmp_path)

    def no_load(*a, **k):
        raise AssertionError("inspect loaded the weights of a float source")

    monkeypatch.setattr(inspection, "load_source", no_load)
    got = inspection.inspect_source(str(tmp_path))
    for key, value in expected.items():
        assert got[key] == value, key
    assert got["param_dtypes"] == {str(dtype).replace("torch.", ""): expected["total_params"]}


def test_quantized_source_is_loaded_to_show_its_modules(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    import anyquant

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128)
    torch.manual_seed(0)
    r = anyquant.quantize(AutoModelForCausalLM.from_config(cfg), "int4", progress=False)
    anyquant.save(r, tmp_path / "out", verify=False)
    got = inspection.inspect_source(str(tmp_path / "out"))
    assert got["quantized_tensors"], "an int4 output's packed weights are listed"
    assert got["estimated_size"] == {}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_all_finite_finds_every_inf_and_nan(dtype):
    x = torch.randn(64, 96).to(dtype)
    assert all_finite(x)
    x[0, 0] = torch.finfo(dtype).max
    x[1, 1] = torch.finfo(dtype).tiny / 2  # subnormal: finite
    assert all_finite(x)
    for bad in (float("inf"), float("-inf"), float("nan")):
        y = x.clone()
        y[5, 17] = bad
        assert not all_finite(y), (dtype, bad)
        assert not all_finite(y[:, 10:]), "a non-contiguous view goes through torch.isfinite"
