"""Architectures the sweep (benchmarks/sweep.py) found broken, each a few seconds:

- GPT-2's transformers `Conv1D` (transposed weight) quantizes; anyquant.load and stock
  transformers `from_pretrained` of the nf4 / int8 output give the in-memory model's logits;
- int4 reload goes through transformers' own loading, so the weight conversions it applies at
  load (Mixtral's per-expert weights fused into one tensor, GPT-NeoX's legacy `embed_out`) apply.
"""

import warnings

import pytest
import torch

import anyquant

warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _tiny(tmp_path, config):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    src = tmp_path / "float"
    model.save_pretrained(src)
    ids = torch.randint(0, config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    return src, ids, _logits(model, ids)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    from transformers import GPT2Config

    return _tiny(tmp_path_factory.mktemp("gpt2"), GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256,
                                                            n_positions=64))


@pytest.mark.parametrize("method", ["nf4", "int8", "int4"])
def test_gpt2_conv1d_quantize_save_reload(gpt2, tmp_path, method):
    from transformers import AutoModelForCausalLM

    src, ids, ref = gpt2
    r = anyquant.quantize(str(src), method, progress=False)
    quantized = {d.name for d in r.plan.to_quantize()}
    assert "transformer.h.0.attn.c_attn" in quantized and "transformer.h.1.mlp.c_proj" in quantized
    mem = _logits(r.model, ids)
    assert _rel(mem, ref) < {"nf4": 0.3, "int8": 0.05, "int4": 0.3}[method]
    out = anyquant.save(r, tmp_path / method)
    assert torch.allclose(_logits(anyquant.load(out), ids), mem, atol=1e-4, rtol=1e-4)
    if method != "int4":  # stock transformers reads the bitsandbytes checkpoint (Conv1D layout included)
        from anyquant.methods.bnb import keep_compute_dtype

        stock = keep_compute_dtype(AutoModelForCausalLM.from_pretrained(out).eval())
        assert torch.allclose(_logits(stock, ids), mem, atol=1e-4, rtol=1e-4)


def test_mixtral_int4_reload_applies_expert_fusion(tmp_path):
    from transformers import MixtralConfig

    src, ids, ref = _tiny(tmp_path, MixtralConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=256, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64))
    r = anyquant.quantize(str(src), "int4", progress=False)
    mem = _logits(r.model, ids)
    out = anyquant.save(r, tmp_path / "int4")
    loaded = anyquant.load(out)   # q/k/v fused (the default inference layout)
    assert torch.allclose(_logits(loaded, ids), mem, atol=1e-4, rtol=1e-4)
    from anyquant.runtime.int4_linear import Int4Linear

    saved_layout = anyquant.load(out, fuse=False)   # one Int4Linear per planned module
    assert torch.allclose(_logits(saved_layout, ids), mem, atol=1e-4, rtol=1e-4)
    assert sum(isinstance(m, Int4Linear) for m in saved_layout.modules()) == len(r.plan.to_quantize())


def test_gpt_neox_int4_reload_applies_key_renaming(tmp_path):
    from transformers import GPTNeoXConfig

    src, ids, ref = _tiny(tmp_path, GPTNeoXConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=256,
        max_position_embeddings=64, tie_word_embeddings=False))
    r = anyquant.quantize(str(src), "int4", progress=False)
    mem = _logits(r.model, ids)
    out = anyquant.save(r, tmp_path / "int4")
    assert torch.allclose(_logits(anyquant.load(out), ids), mem, atol=1e-4, rtol=1e-4)


def test_llama4_router_kept_and_experts_in_transformers_bitsandbytes_layout(tmp_path):
    """Llama 4's router is an nn.Linear subclass returning (scores, logits): kept in float, and in
    the checkpoint's skip list. Its fused experts are rebuilt one Llama4TextMLP per expert, as
    transformers' bitsandbytes loader does (runtime/experts.py unfuse_for_loader), so the nf4
    output loads in both loaders with the in-memory logits (before: the save's check refused it)."""
    import json

    from transformers import Llama4TextConfig

    src, ids, ref = _tiny(tmp_path, Llama4TextConfig(
        hidden_size=64, intermediate_size=64, intermediate_size_mlp=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=256, num_local_experts=4,
        max_position_embeddings=64))
    r = anyquant.quantize(str(src), "nf4", progress=False)
    kept = {d.name: d.reason_code for d in r.plan.kept()}
    assert kept["model.layers.0.feed_forward.router"] == "not_linear"
    assert "model.layers.0.feed_forward.experts.3.down_proj" in {d.name for d in r.plan.to_quantize()}
    out = anyquant.save(r, tmp_path / "nf4")
    ver = json.loads((out / "anyquant.json").read_text())["verification"]
    assert ver["transformers"]["ok"] is True
    skip = json.loads((out / "config.json").read_text())["quantization_config"]["llm_int8_skip_modules"]
    assert "model.layers.0.feed_forward.router" in skip
    assert torch.allclose(_logits(anyquant.load(out), ids), _logits(r.model, ids), atol=1e-4, rtol=1e-4)


def test_exaone_outputs_reload_under_its_own_type(tmp_path):
    """EXAONE loads as LlamaForCausalLM; its config must stay ExaoneConfig (model_type "exaone"),
    or the output is saved as "llama" and its checkpoint names (`transformer.h.0.mlp.c_proj.*`,
    EXAONE's own) are read back by nobody's renamings: int4 lacked its tensors, nf4 / int8 had
    transformers initialise the 4-/8-bit weights ("normal_kernel_cpu not implemented for 'Byte'")."""
    import json

    from transformers import AutoConfig

    src, ids, ref = _tiny(tmp_path, AutoConfig.for_model(
        "exaone", hidden_size=64, num_layers=2, num_attention_heads=4, num_key_value_heads=4, intermediate_size=128,
        vocab_size=256, max_position_embeddings=64))
    for method in ("int4", "nf4"):
        r = anyquant.quantize(str(src), method, progress=False)
        mem = _logits(r.model, ids)
        out = anyquant.save(r, tmp_path / method)
        assert json.loads((out / "config.json").read_text())["model_type"] == "exaone"
        ver = json.loads((out / "anyquant.json").read_text())["verification"]
        assert ver["transformers"]["ok"] is True
        assert torch.allclose(_logits(anyquant.load(out), ids), mem, atol=1e-4, rtol=1e-4)


def test_laguna_nf4_shared_experts_keep_their_quantization_state(tmp_path):
    """Laguna's checkpoint names its shared experts `mlp.shared_expert.` (renamed to
    `mlp.shared_experts.` at load, by a pattern whose dots are regex wildcards). Saved in the loaded
    layout, `mlp.shared_experts.down_proj.weight.absmax` was renamed again on reload to
    `mlp.shared_experts..down_proj...` and the Linear4bit lost its quantization state ("quant_state
    is required"). The save must recognise that reverting the renaming is a plain rename of the
    quantized tensors (formats/hf.py checkpoint_key_renamer: the type's whole mapping) and write
    the original layout."""
    import json

    from transformers import AutoConfig

    src, ids, ref = _tiny(tmp_path, AutoConfig.for_model(
        "laguna", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        moe_intermediate_size=64, intermediate_size=128, num_experts=4, num_experts_per_tok=2, vocab_size=256,
        max_position_embeddings=64))
    r = anyquant.quantize(str(src), "nf4", progress=False)
    assert "model.layers.1.mlp.shared_experts.down_proj" in {d.name for d in r.plan.to_quantize()}
    assert r.report["fused_experts_quantized"]["tensors"] == 2
    out = anyquant.save(r, tmp_path / "nf4")
    assert json.loads((out / "anyquant.json").read_text())["verification"]["anyquant"]["ok"] is True
    assert torch.allclose(_logits(anyquant.load(out), ids), _logits(r.model, ids), atol=1e-4, rtol=1e-4)


def test_int8_takes_inputs_of_any_rank():
    """bitsandbytes' LLM.int8 on CPU mishandles 4-D inputs (MLA projections: deepseek_v3,
    minicpm3): anyquant's int8 layers fold the leading dimensions, same numbers as 2-D."""
    from anyquant.config import Int8Config
    from anyquant.methods.bnb import BnBInt8

    torch.manual_seed(0)
    q = BnBInt8().quantize_linear(torch.nn.Linear(64, 32), {}, Int8Config(), torch.float32).eval()
    x = torch.randn(1, 3, 5, 64)
    with torch.no_grad():
        y = q(x)
        flat = q(x.reshape(-1, 64))
    assert y.shape == (1, 3, 5, 32)
    torch.testing.assert_close(y.reshape(-1, 32), flat, rtol=0, atol=0)


def test_linear_subclass_kept_for_bitsandbytes_quantized_for_int4():
    """transformers' bitsandbytes loader converts only nn.Linear and Conv1D: a quantized subclass
    (Falcon's FalconLinear) would be saved but never loaded again."""
    from transformers import LlamaConfig, LlamaForCausalLM

    class MyLinear(torch.nn.Linear):
        pass

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128)
    torch.manual_seed(0)
    m = LlamaForCausalLM(cfg).eval()
    old = m.model.layers[0].mlp.up_proj
    new = MyLinear(old.in_features, old.out_features, bias=False)
    new.weight.data.copy_(old.weight.data)
    m.model.layers[0].mlp.up_proj = new
    for method in ("nf4", "int8"):
        d = anyquant.plan(m, method).get("model.layers.0.mlp.up_proj")
        assert d.action == "keep" and d.reason_code == "format_unsupported" and "MyLinear" in d.reason
    d = anyquant.plan(m, "int4", group_size=32).get("model.layers.0.mlp.up_proj")
    assert d.action == "quantize"


def test_inkling2_head_converted_at_load_kept_for_bitsandbytes(tmp_path):
    """Inkling2 pads `lm_head.weight` to the vocabulary at load (a WeightConverter); its head is
    narrower than the vocabulary, so it is not recognised as the head and was quantized. In the
    bitsandbytes formats the converter would pad the packed weight and drop its quantization
    state ("quant_state is required", "'Parameter' object has no attribute 'CB'"): the plan keeps
    it (not_reloadable, a safety code) and the output reloads with the in-memory logits."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        "inkling2_text", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=16, rel_extent=64,
        moe_intermediate_size=32, intermediate_size=128, n_routed_experts=4, num_experts_per_tok=2,
        vocab_size=256, unpadded_vocab_size=240, max_position_embeddings=64)
    src, ids, ref = _tiny(tmp_path, cfg)
    r = anyquant.quantize(str(src), "int8", progress=False)
    assert r.plan.get("lm_head").reason_code == "not_reloadable"
    mem = _logits(r.model, ids)
    out = anyquant.save(r, tmp_path / "int8")
    assert torch.allclose(_logits(anyquant.load(out), ids), mem, atol=1e-4, rtol=1e-4)
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg)
    assert anyquant.plan(m, "nf4").get("lm_head").reason_code == "not_reloadable"
    with pytest.raises(anyquant.errors.AnyquantError, match="must stay in float"):
        anyquant.plan(m, "nf4", overrides=[("lm_head", "quantize")])
    assert anyquant.plan(m, "int4").get("lm_head").action == "quantize"  # anyquant's loader maps it
