"""Issue 16: what is saved is what was verified; float32 regions survive save and reload."""

from __future__ import annotations

import json

import pytest
import torch

import anyquant
from anyquant.errors import AnyquantError
from anyquant.model.tree import probe_logits
from tests.fixtures_numerics import make_overflow_llama

ENV = "ANYQUANT_DEVICE_CAPS"


@pytest.fixture(scope="module")
def overflow_dir(tmp_path_factory):
    return make_overflow_llama(tmp_path_factory.mktemp("verify") / "overflow-llama")


def test_save_verifies_reload_and_records_it(tiny_llama, tmp_path):
    r = anyquant.quantize(str(tiny_llama), "int4", progress=False)
    assert r.probe_inputs is not None and r.probe_logits is not None
    out = anyquant.save(r, tmp_path / "out")
    v = json.loads((out / "anyquant.json").read_text())["verification"]
    assert v["anyquant"]["ok"] and v["anyquant"]["max_abs_diff"] == 0.0
    assert v["transformers"]["loads"] and v["transformers"]["ok"]
    anyquant.load(out)  # the manifest's own hash still holds after the verification was recorded


def test_mismatch_is_an_error_and_nothing_is_left(tiny_llama, tmp_path):
    r = anyquant.quantize(str(tiny_llama), "int4", progress=False)
    r.probe_logits = r.probe_logits + 1.0  # the saved model is no longer what was verified
    with pytest.raises(AnyquantError, match=r"max \|difference\| 1 at logits\[0, "):
        anyquant.save(r, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    out = anyquant.save(r, tmp_path / "out", verify=False)  # the escape
    assert "verification" not in json.loads((out / "anyquant.json").read_text())


@pytest.mark.parametrize("method", ["nf4", "int8", "int4"])
def test_float32_region_survives_save_and_reload(overflow_dir, tmp_path, monkeypatch, method):
    monkeypatch.setenv(ENV, "bf16=0,fp16=1,prefer_float32=0")
    r = anyquant.quantize(str(overflow_dir), method, progress=False)
    assert r.report["compute_dtype"] == "float16"
    assert list(r.report["dtype_policy"]["float32_modules"]) == ["model.layers.1.mlp"]
    assert any("stock transformers' from_pretrained cannot" in n for n in r.plan.notes)  # said before quantizing
    out = anyquant.save(r, tmp_path / method)
    man = json.loads((out / "anyquant.json").read_text())
    assert list(man["float32_regions"]) == ["model.layers.1.mlp"]
    assert man["verification"]["anyquant"]["ok"]
    assert "cannot be reproduced by stock transformers" in man["verification"]["transformers"]["skipped"]
    loaded = anyquant.load(out)
    down = loaded.model.layers[1].mlp.down_proj  # computes in float32, as in memory
    assert (down.weight_scale.dtype if method == "int4" else getattr(down, "compute_dtype", torch.float32)) \
        == torch.float32
    got = probe_logits(loaded, r.probe_inputs)
    assert torch.isfinite(got).all()
    assert (got - r.probe_logits).abs().max() <= 2e-2 * max(1.0, float(r.probe_logits.abs().max()))
    # stock transformers: the documented refusal is true (it computes the region in float16)
    from transformers import AutoModelForCausalLM

    stock = AutoModelForCausalLM.from_pretrained(out)
    assert not torch.isfinite(probe_logits(stock, r.probe_inputs)).all()
