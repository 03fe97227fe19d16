"""Custom-code fixtures (tests/fixtures): quantize with every method, forward, generate, save,
reload through anyquant.load, stay within a measured bound of the float model; and what plain
transformers + BitsAndBytesConfig defaults do with the same fixture."""

import copy
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import anyquant
from anyquant.model.tree import probe_logits
from anyquant.numerics.inputs import probe_inputs
from tests.fixtures import build_fixture

warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")

METHODS = ["nf4", "int8", "int4"]
# Relative error of the probe logits vs the float model, measured (random weights, seed 0):
#   minicpmv_like: nf4 0.162, int8 0.008, int4 0.065   (vision tower + resampler in float)
#   hyena_like:    nf4 0.024, int8 0.0025, int4 0.022
#   glm4v_like:    nf4 0.135, int8 0.0054, int4 0.0434  (vision tower + GLU projector + head in float)
# nf4 on the two 96-wide language models equals, to the bit, the float model with each layer's
# weight replaced by bitsandbytes' own dequantize_4bit (checked when these were measured).
# Bounds: about 1.5x measured (int8 x2: LLM.int8's dynamic outlier split varies between calls).
BOUND = {
    "minicpmv_like": {"nf4": 0.24, "int8": 0.016, "int4": 0.10},
    "hyena_like": {"nf4": 0.036, "int8": 0.005, "int4": 0.033},
    "glm4v_like": {"nf4": 0.2, "int8": 0.011, "int4": 0.065},
}


@pytest.fixture(scope="module")
def fixture_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fixtures")
    return {name: build_fixture(name, root / name) for name in BOUND}


def _float(path):
    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()


_REFS: dict = {}


def _reference(fixture_dirs, name):
    """(float model, probe inputs, float probe logits), once per fixture."""
    if name not in _REFS:
        m = _float(fixture_dirs[name])
        inputs = probe_inputs(m)
        _REFS[name] = (m, inputs, probe_logits(m, inputs))
    return _REFS[name]


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("name", ["minicpmv_like", "hyena_like", "glm4v_like"])
@pytest.mark.parametrize("method", METHODS)
def test_fixture_quantize_generate_save_reload(fixture_dirs, tmp_path, name, method):
    path = fixture_dirs[name]
    ref_model, inputs, ref = _reference(fixture_dirs, name)

    r = anyquant.quantize(str(path), method, trust_remote_code=True, progress=False)
    out = probe_logits(r.model, inputs)
    assert torch.isfinite(out).all()
    err = _rel(out, ref)
    print(f"{name} {method}: probe logits relative error {err:.4f}")
    assert err < BOUND[name][method]
    assert r.report["probe_logits_relative_error"] < BOUND[name][method]

    gen_kwargs = {k: v for k, v in inputs.items() if k != "input_ids"}
    ids = r.model.generate(inputs["input_ids"][:, :6], max_new_tokens=3, do_sample=False, use_cache=False,
                           **gen_kwargs)
    assert ids.shape == (1, 9)

    saved = anyquant.save(r, tmp_path / "q")
    again = anyquant.load(saved, trust_remote_code=True)
    torch.testing.assert_close(probe_logits(again, inputs), out, rtol=0, atol=1e-5)

    decisions = {d.name: d for d in r.plan.decisions}
    if name == "minicpmv_like":
        d = decisions["resampler.attn.out_proj"]
        assert d.action == "keep" and d.reason_code == "weight_read_outside_forward"
        assert d.reason.startswith("weight read outside its module's forward by resampler.attn")
        assert decisions["resampler.kv_proj"].component == "projector"
        assert decisions["vpm.blocks.0.attn.q_proj"].action == "keep"  # vision tower: float by default
        assert decisions["llm.layers.0.attn.q_proj"].action == "quantize"
        assert decisions["lm_head"].reason_code == "output_head"
    elif name == "glm4v_like":
        assert decisions["transformer.output_layer"].reason_code == "output_head"
        assert decisions["transformer.encoder.layers.0.self_attention.query_key_value"].action == "quantize"
        assert decisions["transformer.encoder.layers.0.self_attention.query_key_value"].shape == [288, 96]
        assert decisions["transformer.vision.transformer.layers.0.self_attention.query_key_value"].reason_code == "vision_tower_float"
        assert decisions["transformer.vision.linear_proj.gate_proj"].reason_code == "projector_float"
        assert decisions["transformer.vision.conv"].action == "keep"
        assert r.model_map.component_roots["vision tower"] == "transformer.vision"
    else:
        # F4: fused Wqkv is one quantized Linear; poles/residues untouched, same tensors, float32.
        wqkv = decisions["blocks.1.Wqkv"]
        assert wqkv.action == "quantize" and wqkv.shape == [192, 64]
        assert type(r.model.blocks[1].Wqkv).__name__ != "Linear"
        for pname in ("poles", "residues"):
            p = getattr(r.model.blocks[0].filter, pname)
            assert p.dtype == torch.float32
            torch.testing.assert_close(p, getattr(ref_model.blocks[0].filter, pname), rtol=0, atol=0)
            assert getattr(again.blocks[0].filter, pname).dtype == torch.float32
        assert ["embedding_layer.weight", "unembed.weight"] in r.model_map.tied
        assert r.model.embedding_layer is r.model.unembed
        assert r.report["probe"]["outside_reads"]["embedding_layer"] == [""]


def test_minicpmv_like_plain_transformers_bnb_fails(fixture_dirs):
    """Stock transformers replaces the resampler's out_proj with a bitsandbytes module; the
    attention then multiplies its packed weight: the F2 error, exactly as reported."""
    path = fixture_dirs["minicpmv_like"]
    for qc, packed in ((BitsAndBytesConfig(load_in_8bit=True), "Char"),
                       (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"), "Byte")):
        m = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, quantization_config=qc)
        with pytest.raises(RuntimeError, match=f"self and mat2 must have the same dtype.*{packed}"):
            m(**_reference(fixture_dirs, "minicpmv_like")[1])


def test_glm4v_like_plain_transformers_bnb_quantizes_head_and_vision(fixture_dirs):
    """Stock transformers finds no lm_head / output embeddings in a ChatGLM-style model, so it
    quantizes the head (`output_layer`) and the whole vision tower and projector too: it runs,
    with silently larger error than anyquant's plan (head, vision and projector in float)."""
    path = fixture_dirs["glm4v_like"]
    _, inputs, ref = _reference(fixture_dirs, "glm4v_like")
    m = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True,
                                             quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    assert type(m.transformer.output_layer).__name__ == "Linear4bit"
    assert type(m.transformer.vision.linear_proj.gate_proj).__name__ == "Linear4bit"
    # On CPUs with AVX512-BF16, bitsandbytes' repacking path crashes on these 96-wide layers
    # ("shape '[192, 1]' is invalid"); compare the plans' numerics on its exact path instead.
    from anyquant.methods.bnb import keep_compute_dtype

    plain = _rel(probe_logits(keep_compute_dtype(m), inputs), ref)
    ours = anyquant.quantize(str(path), "nf4", trust_remote_code=True, progress=False)
    assert ours.report["probe_logits_relative_error"] < plain / 1.5, (plain, ours.report["probe_logits_relative_error"])


def test_hyena_like_plain_transformers_bnb(fixture_dirs):
    """transformers 5.x no longer deep-copies the model nor needs get_output_embeddings in its
    bitsandbytes path, so this fixture loads and runs there (its float32 filter parameters stay
    float32): recorded here so a regression either way is seen. The fixture itself cannot be
    deep-copied (like evo-1), which the older generic path did and anyquant never does."""
    path = fixture_dirs["hyena_like"]
    ref_model, inputs, ref = _reference(fixture_dirs, "hyena_like")
    with pytest.raises(TypeError, match="deep-copied"):
        copy.deepcopy(ref_model)
    m = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True,
                                             quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    assert type(m.blocks[1].Wqkv).__name__ == "Linear8bitLt"
    assert m.blocks[0].filter.poles.dtype == torch.float32
    assert _rel(probe_logits(m, inputs), ref) < 0.05
