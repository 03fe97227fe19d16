"""Numerics guard: device capabilities, the dtype policy (F1, F3), consistency, `anyquant doctor`."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from anyquant.errors import AnyquantError
from anyquant.numerics.capabilities import (
    ENV,
    detect_capabilities,
    simulate,
    simulated_device,
)
from anyquant.numerics.casts import check_consistency
from anyquant.numerics.policy import choose_policy
from tests.fixtures_numerics import make_overflow_llama

NO_BF16 = simulated_device(bf16=False)
WITH_BF16 = simulated_device(bf16=True)


@pytest.fixture(scope="module")
def overflow_dir(tmp_path_factory):
    return make_overflow_llama(tmp_path_factory.mktemp("numerics") / "overflow-llama")


@pytest.fixture(scope="module")
def escape_dir(tmp_path_factory):
    return make_overflow_llama(tmp_path_factory.mktemp("numerics") / "escape-llama", escape=True)


@pytest.fixture
def ids():
    return {"input_ids": torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(0))}


def load(path, dtype=torch.float32, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw).eval()


@torch.no_grad()
def finite(model, ids):
    return bool(torch.isfinite(model(**ids).logits).all())


def test_capabilities(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    cpu = detect_capabilities("cpu")
    assert cpu.device_type == "cpu" and cpu.prefer_float32 and not cpu.simulated
    assert not NO_BF16.supports(torch.bfloat16) and NO_BF16.supports(torch.float16)
    assert simulate(cpu, "bf16=0,prefer_float32=0").bf16 is False
    monkeypatch.setenv(ENV, "bf16=0,prefer_float32=false")
    caps = detect_capabilities("cpu")
    assert caps.simulated and not caps.bf16 and not caps.prefer_float32
    monkeypatch.setenv(ENV, "bogus=1")
    with pytest.raises(AnyquantError, match="bf16"):
        detect_capabilities("cpu")


def test_fixture_overflows_in_plain_transformers_float16(overflow_dir, ids):
    assert not finite(load(overflow_dir, torch.float16), ids)  # what users of plain transformers get
    assert finite(load(overflow_dir, torch.bfloat16), ids)
    assert finite(load(overflow_dir, torch.float32), ids)


def test_auto_picks_bfloat16_where_supported(overflow_dir, ids):
    m = load(overflow_dir, "auto")  # declared bfloat16
    p = choose_policy(m, "auto", WITH_BF16, ids)
    assert p.compute_dtype == torch.bfloat16 and not p.fp32_modules
    p.apply(m)
    assert finite(m, ids)
    assert choose_policy(load(overflow_dir, "auto"), "auto", detect_capabilities("cpu") if not os.environ.get(ENV)
                         else simulate(detect_capabilities("cpu"), {"prefer_float32": True}), ids).compute_dtype == torch.float32


def test_no_bf16_keeps_overflowing_module_in_float32(overflow_dir, ids):
    m = load(overflow_dir, "auto")
    p = choose_policy(m, "auto", NO_BF16, ids)
    assert p.compute_dtype == torch.float16
    assert list(p.fp32_modules) == ["model.layers.1.mlp"]
    assert p.overflow[0]["module"] == "model.layers.1.mlp.down_proj" and p.overflow[0]["absmax"] > 65504
    assert "model.layers.1.mlp" in p.reason and "65504" in p.reason
    assert p.dtype_for("model.layers.1.mlp.down_proj") == torch.float32
    assert p.dtype_for("model.layers.0.mlp.down_proj") == torch.float16
    p.apply(m)
    assert m.model.layers[1].mlp.down_proj.weight.dtype == torch.float32
    assert m.model.layers[0].mlp.down_proj.weight.dtype == torch.float16
    assert finite(m, ids)
    assert check_consistency(m, ids) == []
    # explicit float16: honoured because the policy can contain the overflow (and says where)
    p16 = choose_policy(load(overflow_dir), "float16", NO_BF16, ids)
    assert p16.compute_dtype == torch.float16 and "model.layers.1.mlp" in p16.fp32_modules
    with pytest.raises(AnyquantError, match="no native bfloat16"):
        choose_policy(load(overflow_dir), "bfloat16", NO_BF16, ids)


def test_uncontainable_overflow_refused_or_float32(escape_dir, ids):
    with pytest.raises(AnyquantError) as e:
        choose_policy(load(escape_dir), "float16", NO_BF16, ids)
    msg = str(e.value)
    assert "float16 refused" in msg and "model.layers.1.mlp.down_proj" in msg and "e+05" in msg
    p = choose_policy(load(escape_dir, "auto"), "auto", NO_BF16, ids)
    assert p.compute_dtype == torch.float32 and p.overflow


def test_consistency_check_names_module(overflow_dir, ids):
    m = load(overflow_dir)
    m.model.layers[0].post_attention_layernorm.weight.data = m.model.layers[0].post_attention_layernorm.weight.data.half()
    mism = check_consistency(m, ids)
    assert [x["module"] for x in mism] == ["model.layers.0.post_attention_layernorm"]
    assert mism[0]["params"] == {"weight": "float16"} and mism[0]["inputs"] == ["float32"]
    m.model.layers[0].mlp.up_proj.half()  # a real dtype error inside the forward
    with pytest.raises(AnyquantError, match=r"model\.layers\.0\.mlp\.up_proj"):
        check_consistency(m, ids)


def test_pipeline_nf4_without_bf16(overflow_dir, monkeypatch):
    from anyquant.pipeline import quantize

    monkeypatch.setenv(ENV, "bf16=0,prefer_float32=0")
    r = quantize(overflow_dir, "nf4", progress=False)
    dp = r.report["dtype_policy"]
    assert dp["compute_dtype"] == "float16" and list(dp["float32_modules"]) == ["model.layers.1.mlp"]
    assert dp["consistency_mismatches"] == [] and dp["device"]["simulated"]
    q = r.model.model.layers[1].mlp.down_proj
    assert type(q).__name__ == "Linear4bit" and q.compute_dtype == torch.float32
    monkeypatch.setenv(ENV, "bf16=1,prefer_float32=0")
    r = quantize(overflow_dir, "nf4", progress=False)
    assert r.report["dtype_policy"]["compute_dtype"] == "bfloat16" and not r.report["dtype_policy"]["float32_modules"]


def test_doctor_json_f3_and_fixed_config_runs(overflow_dir, tmp_path, ids):
    from transformers import BitsAndBytesConfig

    naive = {"load_in_4bit": True, "bnb_4bit_compute_dtype": "float16", "bnb_4bit_quant_type": "nf4",
             "llm_int8_skip_modules": ["mlp.gate"]}
    cfg = tmp_path / "bnb.json"
    cfg.write_text(json.dumps({**naive, "dtype": "float16"}))
    env = dict(os.environ, PYTHONWARNINGS="ignore", **{ENV: "bf16=1,prefer_float32=0"})
    p = subprocess.run([sys.executable, "-m", "anyquant.cli", "doctor", str(overflow_dir), "--bnb-config", str(cfg),
                        "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    data = json.loads(p.stdout)
    by_class = {f["class"]: f for f in data["findings"]}
    assert by_class["F3"]["module"] == "model.layers.1.mlp" and "65504" in by_class["F3"]["message"]
    assert by_class["F4"]["module"] == "mlp.gate" and "gate_proj" in by_class["F4"]["message"]
    fixed = data["bnb_config"]
    assert fixed["bnb_4bit_compute_dtype"] == "bfloat16" and data["from_pretrained"] == {"dtype": "bfloat16"}
    assert "model.layers.1.mlp.gate_proj" in fixed["llm_int8_skip_modules"] and "lm_head" in fixed["llm_int8_skip_modules"]
    assert "anyquant quantize" in data["anyquant_command"]

    good = load(overflow_dir, getattr(torch, data["from_pretrained"]["dtype"]), quantization_config=BitsAndBytesConfig(**fixed))
    assert type(good.model.layers[1].mlp.down_proj).__name__ == "Linear4bit"
    assert type(good.model.layers[1].mlp.gate_proj).__name__ == "Linear"  # the skip entry now matches
    assert finite(good, ids)
    bad = load(overflow_dir, torch.float16, quantization_config=BitsAndBytesConfig(**naive))
    assert type(bad.model.layers[1].mlp.gate_proj).__name__ == "Linear4bit"  # 'mlp.gate' was ignored
    assert not finite(bad, ids)


def test_doctor_no_bf16_and_already_quantized(overflow_dir, tmp_path, ids):
    from transformers import BitsAndBytesConfig

    from anyquant.diagnosis import diagnose

    d = diagnose(overflow_dir, {"load_in_4bit": True, "bnb_4bit_compute_dtype": "bfloat16"}, capabilities=NO_BF16)
    # bf16 compute, and the declared bfloat16 that transformers' dtype="auto" loads, on a device without it
    assert {f["class"] for f in d["findings"]} == {"F1"} and any("dtype=bfloat16" in f["message"] for f in d["findings"])
    assert d["bnb_config"]["bnb_4bit_compute_dtype"] == "float32"  # fp16 would overflow (F3)
    BitsAndBytesConfig(**d["bnb_config"])
    d = diagnose(overflow_dir, {"load_in_4bit": True}, capabilities=WITH_BF16)
    assert d["findings"] == [] and d["bnb_config"]["bnb_4bit_compute_dtype"] == "bfloat16"

    q = tmp_path / "q"
    shutil.copytree(overflow_dir, q)
    save_file({"model.layers.0.mlp.up_proj.weight": torch.zeros(4, 4, dtype=torch.uint8)}, str(q / "extra.safetensors"))
    d = diagnose(q, {"load_in_4bit": True}, capabilities=WITH_BF16)
    assert d["findings"][0]["class"] == "F5" and "already quantized" in d["findings"][0]["message"]
    BitsAndBytesConfig(**d["bnb_config"])


@pytest.fixture(scope="module")
def glm_dir(tmp_path_factory):
    from tests.fixtures_numerics import make_glm4v_like

    return make_glm4v_like(tmp_path_factory.mktemp("numerics") / "glm4v-like")


@pytest.mark.parametrize("caps", ["bf16=0,prefer_float32=0", "bf16=1,prefer_float32=0"])
def test_glm4v_like_remote_cast_never_a_dtype_error(glm_dir, monkeypatch, caps):
    from anyquant.pipeline import quantize

    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    px = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    dt = torch.float16 if "bf16=0" in caps else torch.bfloat16
    if dt == torch.float16:  # plain transformers: the GLM-4V error
        with pytest.raises(RuntimeError, match=r"Input type \(c10::BFloat16\) and bias type \(c10::Half\)"):
            load(glm_dir, dt, trust_remote_code=True)(input_ids=ids, pixel_values=px.to(dt))
    monkeypatch.setenv(ENV, caps)
    r = quantize(glm_dir, "nf4", trust_remote_code=True, progress=False)
    dp = r.report["dtype_policy"]
    assert dp["compute_dtype"] == str(dt).replace("torch.", "") and dp["consistency_mismatches"] == []
    if dt == torch.float16:
        assert "vision.patch_embed.proj" in dp["boundary_casts"]
    with torch.no_grad():
        out = r.model(input_ids=ids, pixel_values=px.to(dt)).logits
    assert torch.isfinite(out).all() and type(r.model.model.layers[0].up).__name__ == "Linear4bit"


def test_doctor_names_remote_code_cast(glm_dir):
    from anyquant.diagnosis import diagnose

    d = diagnose(glm_dir, {"load_in_4bit": True, "bnb_4bit_compute_dtype": "float16", "dtype": "float16"},
                 trust_remote_code=True, capabilities=NO_BF16)
    f1 = [f for f in d["findings"] if f["class"] == "F1"]
    assert any(f["module"] == "Vision" and "modeling_glm4vlike.py" in f["message"] for f in f1)  # static
    assert any(f["module"] == "vision.patch_embed.proj" and "BFloat16" in f["message"] for f in f1)  # measured
    assert d["bnb_config"]["bnb_4bit_compute_dtype"] == "float16"  # no bf16 here, no overflow
    assert any("patch that line" in n for n in d["notes"])
    d = diagnose(glm_dir, {"load_in_4bit": True, "bnb_4bit_compute_dtype": "float16", "dtype": "float16"},
                 trust_remote_code=True, capabilities=WITH_BF16)
    assert d["bnb_config"]["bnb_4bit_compute_dtype"] == "bfloat16" and d["from_pretrained"] == {"dtype": "bfloat16"}


# ------------------------------------------------------------------ review gaps (issue 4)


class _Cfg:
    def __init__(self, dtype=None):
        self.dtype = dtype


class ExpSoftmax(torch.nn.Module):
    """Remote-code style attention with a hand-written softmax (no max subtraction): the scores
    (~15) stay inside the module; exp(15) = 3.3e6 is inf in float16, and inf / inf is NaN.
    In float32 every module input and output stays below 10."""

    def __init__(self, d):
        super().__init__()
        self.q = torch.nn.Linear(d, d, bias=False)
        self.k = torch.nn.Linear(d, d, bias=False)

    def forward(self, x):
        s = self.q(x) @ self.k(x).transpose(-1, -2)
        e = torch.exp(s)
        return (e / e.sum(-1, keepdim=True)) @ x


class ExpModel(torch.nn.Module):
    def __init__(self, d=16, dtype=None):
        super().__init__()
        self.config = _Cfg(dtype)
        self.inp = torch.nn.Linear(d, d)
        self.attn = ExpSoftmax(d)
        self.out = torch.nn.Linear(d, d)
        with torch.no_grad():
            self.inp.weight.copy_(torch.eye(d))
            self.inp.bias.zero_()
            self.attn.q.weight.copy_(torch.eye(d) * 2.0)
            self.attn.k.weight.copy_(torch.eye(d) * 2.0)

    def forward(self, x):
        return self.out(self.attn(self.inp(x)))


def _exp_inputs():
    x = torch.zeros(1, 4, 16)
    x[0, :, 0] = 2.0  # q.k = (2*2)^2 ... = 16 on the diagonal direction
    return {"x": x}


def test_float16_run_catches_overflow_inside_a_module():
    from anyquant.numerics.ranges import probe_ranges

    m, inputs = ExpModel(), _exp_inputs()
    ranges = probe_ranges(m, inputs)
    assert max(r.out_absmax for r in ranges.values()) < 65504 * 0.5  # the float32 boundaries never show it
    with torch.no_grad():
        assert not torch.isfinite(ExpModel().half()(x=inputs["x"].half())).all()  # but float16 is NaN
    p = choose_policy(m, "auto", NO_BF16, inputs)
    assert p.compute_dtype == torch.float16 and list(p.fp32_modules) == ["attn"]
    assert "nan" in p.fp32_modules["attn"] and "float16" in p.fp32_modules["attn"]
    assert any(v["module"] == "attn" and v["float16"] == "nan" for v in p.overflow)
    p.apply(m)
    assert m.attn.q.weight.dtype == torch.float32 and m.out.weight.dtype == torch.float16
    with torch.no_grad():
        assert torch.isfinite(m(x=inputs["x"].half())).all()
    assert {e["module"] for e in p.to_dict()["dtype_exceptions"]} == {"attn.q", "attn.k"}
    assert choose_policy(ExpModel(), "auto", WITH_BF16, _exp_inputs()).compute_dtype == torch.bfloat16


def test_declared_dtype_respected(overflow_dir, ids):
    # declared float32: auto keeps it, also where bfloat16 is available; an explicit dtype still wins
    p = choose_policy(ExpModel(dtype=torch.float32), "auto", WITH_BF16, _exp_inputs())
    assert p.compute_dtype == torch.float32 and "declares float32" in p.reason and p.declared == "float32"
    assert choose_policy(ExpModel(dtype=torch.float32), "bfloat16", WITH_BF16).compute_dtype == torch.bfloat16
    # declared bfloat16: bfloat16 where available, never float16
    p = choose_policy(load(overflow_dir, "auto"), "auto", WITH_BF16, ids)
    assert p.compute_dtype == torch.bfloat16 and p.to_dict()["declared_dtype"] == "bfloat16"
    # declared float16: kept where safe; where it overflows, bfloat16 if the device has it
    p = choose_policy(ExpModel(d=16, dtype=torch.float16), "auto", WITH_BF16,
                      {"x": torch.full((1, 4, 16), 0.1)})
    assert p.compute_dtype == torch.float16 and "declares float16" in p.reason
    p = choose_policy(load(overflow_dir, torch.float16), "auto", WITH_BF16, ids)
    assert p.compute_dtype == torch.bfloat16 and "model.layers.1.mlp" in p.reason and not p.fp32_modules


def test_keep_in_fp32_modules_transformers_semantics():
    m = ExpModel()
    m._keep_in_fp32_modules = ["out"]
    assert "out" not in choose_policy(m, "bfloat16", WITH_BF16).fp32_modules  # non-strict: float16 only
    p = choose_policy(m, "float16", NO_BF16, {"x": torch.full((1, 4, 16), 0.1)})
    assert "_keep_in_fp32_modules" in p.fp32_modules["out"]
    m2 = ExpModel()
    m2.attn._keep_in_fp32_modules_strict = ["k"]  # declared by a submodule: applies below it
    p = choose_policy(m2, "bfloat16", WITH_BF16)
    assert list(p.fp32_modules) == ["attn.k"]
    p.apply(m2)
    ex = p.to_dict()["dtype_exceptions"]
    assert ex == [{"module": "attn.k", "type": "Linear", "dtype": "float32", "parameters": ["weight"],
                   "reason": "declared by the model (_keep_in_fp32_modules_strict: 'k')"}]


def test_float32_poles_in_a_bfloat16_checkpoint_stay_float32(tmp_path, monkeypatch):
    """evo-1 keeps its filters' poles/residues in float32 while the rest is bfloat16; transformers
    rounds them to bfloat16 on load. The policy keeps their module in float32, restores the stored
    values, and lists it under dtype_exceptions."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from anyquant.pipeline import quantize
    from tests.fixtures import build_fixture

    src = build_fixture("hyena_like", tmp_path / "hy")
    m = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, trust_remote_code=True)
    m.to(torch.bfloat16)
    for b in m.blocks:
        if hasattr(b, "filter"):
            b.filter.poles.data = b.filter.poles.data.float()
            b.filter.residues.data = b.filter.residues.data.float()
    mixed = tmp_path / "hy-mixed"
    m.save_pretrained(mixed)
    for f in src.glob("*.py"):
        shutil.copy2(f, mixed / f.name)
    with safe_open(str(mixed / "model.safetensors"), framework="pt") as fh:
        poles = fh.get_tensor("blocks.0.filter.poles")
    assert poles.dtype == torch.float32
    monkeypatch.setenv(ENV, "bf16=1,prefer_float32=0")
    r = quantize(mixed, "nf4", trust_remote_code=True, progress=False)
    dp = r.report["dtype_policy"]
    assert dp["compute_dtype"] == "bfloat16" and dp["declared_dtype"] == "bfloat16"
    ex = {e["module"]: e for e in dp["dtype_exceptions"]}
    assert ex["blocks.0.filter"]["dtype"] == "float32" and "poles" in ex["blocks.0.filter"]["reason"]
    assert sorted(ex["blocks.0.filter"]["parameters"]) == ["D", "poles", "residues"]
    assert torch.equal(r.model.blocks[0].filter.poles.data, poles)  # the stored values, not bf16-rounded ones
    assert r.model.blocks[0].out_filter_dense.weight.dtype != torch.float32
    assert dp["consistency_mismatches"] == []


@pytest.fixture(scope="module")
def internvl_dir(tmp_path_factory):
    from tests.fixtures_numerics import make_internvl_like

    return make_internvl_like(tmp_path_factory.mktemp("numerics") / "internvl-like")


def test_internvl_like_overflow(internvl_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    from anyquant.pipeline import quantize

    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    px = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    region = "language_model.model.layers.1.mlp"

    def logits(model, dt):
        with torch.no_grad():
            return model(input_ids=ids, pixel_values=px.to(dt)).logits

    # plain transformers: float16 gives NaN/inf logits (bfloat16 and float32 are finite)
    for dt, ok in ((torch.float16, False), (torch.bfloat16, True), (torch.float32, True)):
        plain = AutoModelForCausalLM.from_pretrained(internvl_dir, dtype=dt, trust_remote_code=True).eval()
        assert bool(torch.isfinite(logits(plain, dt)).all()) is ok
    monkeypatch.setenv(ENV, "bf16=0,prefer_float32=0")  # a T4/V100
    r = quantize(internvl_dir, "nf4", dtype="auto", trust_remote_code=True, progress=False)
    dp = r.report["dtype_policy"]
    assert dp["compute_dtype"] == "float16" and list(dp["float32_modules"]) == [region]
    assert dp["overflow"][0]["module"] == f"{region}.down_proj" and dp["overflow"][0]["absmax"] > 65504
    assert region in dp["reason"] and "e+05" in dp["reason"] and "65504" in dp["reason"]
    assert {e["module"] for e in dp["dtype_exceptions"]} == {f"{region}.{n}" for n in ("gate_proj", "up_proj", "down_proj")}
    assert dp["consistency_mismatches"] == []
    assert type(r.model.language_model.model.layers[1].mlp.down_proj).__name__ == "Linear4bit"
    assert torch.isfinite(logits(r.model, torch.float16)).all()
    monkeypatch.setenv(ENV, "bf16=1,prefer_float32=0")
    r = quantize(internvl_dir, "nf4", dtype="auto", trust_remote_code=True, progress=False)
    dp = r.report["dtype_policy"]
    assert dp["compute_dtype"] == "bfloat16" and not dp["float32_modules"] and not dp["dtype_exceptions"]
    assert torch.isfinite(logits(r.model, torch.bfloat16)).all()


def test_policy_keeps_complex_buffers():
    """nn.Module.to(dtype) casts complex buffers to the real dtype, dropping the imaginary part
    (Llama 4's vision rotary `freqs_ci`): the dtype policy keeps them as they are, as
    transformers' loading does, so the in-memory model and its reload compute the same."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128)
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg)
    freqs = torch.polar(torch.ones(4, 8), torch.randn(4, 8, generator=torch.Generator().manual_seed(0)))
    m.model.register_buffer("freqs_ci", freqs, persistent=False)
    policy = choose_policy(m, "float32", None, {"input_ids": torch.arange(8).reshape(1, 8)})
    policy.apply(m)
    assert m.model.freqs_ci.dtype == torch.complex64
    torch.testing.assert_close(m.model.freqs_ci, freqs, rtol=0, atol=0)


def test_policy_keeps_computed_float32_buffers(tmp_path):
    """Rotary `inv_freq` is computed by the model's code in float32 and not saved: a model loaded
    in bfloat16 computes with it in float32, and so does the quantized model reloaded. The dtype
    policy used to cast it to bfloat16 with the rest, so calibration and the report's float
    logits ran a model whose later positions rotate differently from the one loaded. Cast to
    the compute dtype, the policy's model must give stock transformers' logits exactly."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=512)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path, safe_serialization=True)
    stock = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    ours = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert stock.model.rotary_emb.inv_freq.dtype == torch.float32   # what a bfloat16 load keeps
    ids = {"input_ids": torch.randint(0, 128, (1, 400), generator=torch.Generator().manual_seed(1))}
    policy = choose_policy(ours, "bfloat16", None, ids)
    policy.apply(ours, ids)
    assert ours.model.rotary_emb.inv_freq.dtype == torch.float32
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters())
    with torch.no_grad():
        assert torch.equal(stock(**ids).logits, ours(**ids).logits)
        # the cast this guards against changes the logits (so the check above can fail)
        ours.model.rotary_emb.inv_freq.data = ours.model.rotary_emb.inv_freq.to(torch.bfloat16).float()
        assert not torch.equal(stock(**ids).logits, ours(**ids).logits)


def test_apply_policy_reuses_the_probe_forward():
    """A model already in the compute dtype is the model the probe ran: apply_policy returns the
    probe's logits without another forward, and they equal a fresh forward's bit for bit. A model
    the policy casts gets its own forward."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from anyquant.config import make_config
    from anyquant.model.tree import probe_logits
    from anyquant.planning.prepare import apply_policy, prepare

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128)
    for dtype, requested, reused in ((torch.float32, "float32", True), (torch.float32, "bfloat16", False)):
        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_config(cfg).to(dtype).eval()
        forwards = []
        h = m.register_forward_pre_hook(lambda *a: forwards.append(1))
        prep = prepare(m, make_config("int4"), dtype=requested)
        assert len(forwards) == 1   # the weight-read probe and the policy's boundary check in one
        forwards.clear()
        logits = apply_policy(prep, m, prep.inputs)
        h.remove()
        assert (logits is prep.facts.logits) == reused
        assert len(forwards) == (0 if reused else 2)   # else: the boundary check, then the logits
        assert torch.equal(logits, probe_logits(m, prep.inputs))
