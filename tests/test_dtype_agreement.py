"""One dtype decision (issue 15): `plan` and `quantize` agree on the compute dtype and on every
module's decision, on each simulated device, whatever dtype the checkpoint declares; the
probe-free policy says the same where no probe is needed, and says "float16 not probed" where
it is.

Before, `choose_compute_dtype("auto")` (the probe-free choice) said bfloat16 for a model
declaring float32 on a bfloat16 GPU while `choose_policy` said float32."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import anyquant
from anyquant.numerics.capabilities import ENV, detect_capabilities
from anyquant.numerics.dtype import dtype_name
from anyquant.numerics.policy import NOT_PROBED, choose_policy

DEVICES = {
    "cpu": None,  # the real CPU: no override
    "bf16_gpu": "bf16=1,fp16=1,prefer_float32=0,device_type=cuda,name=bf16-gpu",
    "fp16_gpu": "bf16=0,fp16=1,prefer_float32=0,device_type=cuda,name=fp16-gpu",
}
# (device, declared) -> the compute dtype `auto` must give
EXPECTED = {
    ("cpu", "float32"): "float32", ("cpu", "float16"): "float32", ("cpu", "bfloat16"): "float32",
    ("bf16_gpu", "float32"): "float32", ("bf16_gpu", "float16"): "float16", ("bf16_gpu", "bfloat16"): "bfloat16",
    ("fp16_gpu", "float32"): "float32", ("fp16_gpu", "float16"): "float16", ("fp16_gpu", "bfloat16"): "float16",
}
# plan / quantize (planning.prepare, --target auto, issue 19): on a real CPU a 16-bit source keeps
# its dtype, for the GPU it will run on; `target="cpu"` gives EXPECTED's float32 (checked below).
EXPECTED_AUTO_TARGET = {**EXPECTED, ("cpu", "float16"): "float16", ("cpu", "bfloat16"): "bfloat16"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny Llamas whose config.json declares each dtype (saved in it)."""
    root = tmp_path_factory.mktemp("declared")
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, tie_word_embeddings=False, max_position_embeddings=64)
    out = {}
    for name in ("float32", "float16", "bfloat16"):
        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_config(cfg).to(getattr(torch, name))
        m.save_pretrained(root / name)
        out[name] = root / name
    return out


def _set_device(monkeypatch, device):
    if DEVICES[device] is None:
        monkeypatch.delenv(ENV, raising=False)
    else:
        monkeypatch.setenv(ENV, DEVICES[device])


def _decisions(plan):
    return [(d.name, d.action, d.method, d.dtype, d.reason_code) for d in plan.decisions]


@pytest.mark.parametrize("declared", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("device", list(DEVICES))
def test_plan_and_quantize_agree(models, monkeypatch, device, declared):
    _set_device(monkeypatch, device)
    planned = anyquant.plan(str(models[declared]), "int4")
    done = anyquant.quantize(str(models[declared]), "int4", progress=False, checkpoint_dir=None)
    expected = EXPECTED_AUTO_TARGET[(device, declared)]
    assert planned.compute_dtype == done.plan.compute_dtype == expected, (
        f"{device}, model declaring {declared}: plan says {planned.compute_dtype}, quantize computed in "
        f"{done.plan.compute_dtype}; expected {expected}")
    assert _decisions(planned) == _decisions(done.plan)
    assert {p.dtype for p in done.model.parameters() if p.is_floating_point()} == {getattr(torch, expected)}


@pytest.mark.parametrize("declared", ["float16", "bfloat16"])
def test_target_cpu_keeps_float32(models, monkeypatch, declared):
    _set_device(monkeypatch, "cpu")
    planned = anyquant.plan(str(models[declared]), "int4", target="cpu")
    done = anyquant.quantize(str(models[declared]), "int4", progress=False, checkpoint_dir=None, target="cpu")
    assert planned.compute_dtype == done.plan.compute_dtype == EXPECTED[("cpu", declared)] == "float32"
    assert {p.dtype for p in done.model.parameters() if p.is_floating_point()} == {torch.float32}


@pytest.mark.parametrize("declared", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("device", list(DEVICES))
def test_probe_free_policy_agrees(models, monkeypatch, device, declared):
    """choose_policy without probe inputs (probe=False): the same dtype the probe confirms on these
    well-behaved models; where float16 is the candidate, the reason says it was not probed."""
    _set_device(monkeypatch, device)
    m = AutoModelForCausalLM.from_pretrained(models[declared], dtype="auto")
    caps = detect_capabilities("cpu")
    before = {n: p.dtype for n, p in m.named_parameters()}
    p = choose_policy(m, "auto", caps, probe=False)
    assert dtype_name(p.compute_dtype) == EXPECTED[(device, declared)]
    assert (NOT_PROBED in p.reason) == (p.compute_dtype == torch.float16), p.reason
    assert {n: q.dtype for n, q in m.named_parameters()} == before  # no probe: the model is untouched


def test_declared_overrides_load_dtype(models):
    """transformers rewrites config.dtype to the load dtype; `declared=` gives the checkpoint's."""
    from anyquant.numerics.capabilities import simulated_device

    m = AutoModelForCausalLM.from_pretrained(models["bfloat16"], dtype=torch.float32)
    bf16_gpu = simulated_device(bf16=True)
    assert choose_policy(m, "auto", bf16_gpu, probe=False).compute_dtype == torch.float32  # config says float32 now
    p = choose_policy(m, "auto", bf16_gpu, probe=False, declared="bfloat16")
    assert p.compute_dtype == torch.bfloat16 and p.declared == "bfloat16"


def test_keep_in_fp32_one_parser_two_uses():
    """model/modelmap reads `_keep_in_fp32_modules(_strict)` once: the plan keeps every declared
    module in float (any dtype); the policy's float32 regions follow transformers (the plain list
    under float16 only, the strict one under float16 and bfloat16), relative to the declaring module."""
    from torch import nn

    from anyquant.model.modelmap import build_model_map, declared_fp32_modules

    class Block(nn.Module):
        _keep_in_fp32_modules = ["wo"]
        _keep_in_fp32_modules_strict = ["gate"]

        def __init__(self):
            super().__init__()
            self.wo, self.gate, self.wi = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    root = nn.Module()
    root.block = Block()
    assert build_model_map(root).keep_fp32 == ["block.wo", "block.gate"]
    assert set(declared_fp32_modules(root, torch.float16)) == {"block.wo", "block.gate"}
    assert declared_fp32_modules(root, torch.bfloat16) == {
        "block.gate": "declared by the model (_keep_in_fp32_modules_strict: 'gate')"}
    assert declared_fp32_modules(root, torch.float32) == declared_fp32_modules(root, torch.bfloat16)
