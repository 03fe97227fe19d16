"""Planner: the probe (F2), structure from identity (F4), _keep_in_fp32_modules, --only and
overrides, VLM components from config sub-configs and structure."""

import json
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import anyquant
from anyquant.errors import AnyquantError
from anyquant.numerics.probe import probe_weight_reads

warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")


class Block(nn.Module):
    """A transformer-ish block whose parent-level code reads child weights directly."""

    def __init__(self, d=64):
        super().__init__()
        self.mha = nn.MultiheadAttention(d, 4, batch_first=True)
        self.gate = nn.Linear(d, 4, bias=False)  # a router the block multiplies itself
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.meta = nn.Linear(d, d)  # only its dtype is read outside its forward: still a read

    def forward(self, x):
        x = x.to(self.meta.weight.dtype)
        a, _ = self.mha(x, x, x, need_weights=False)
        w = torch.softmax(F.linear(x, self.gate.weight), -1).mean(-1, keepdim=True)
        return x + a + w * self.down(F.gelu(self.up(x))) + self.meta(x)


class Toy(nn.Module):
    """Embedding used as output head by `x @ weight.t()`; no config methods, only `config.vocab_size`."""

    def __init__(self, vocab=100, d=64):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab, model_type="toy")
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([Block(d), Block(d)])

    def forward(self, input_ids):
        x = self.emb(input_ids)
        for b in self.blocks:
            x = b(x)
        return x @ self.emb.weight.t()


def test_probe_finds_outside_reads_without_names():
    torch.manual_seed(0)
    m = Toy().eval()
    facts = probe_weight_reads(m, {"input_ids": torch.randint(0, 100, (1, 8))})
    assert facts.outside_reads == {
        "blocks.0.gate": ["blocks.0"], "blocks.0.mha.out_proj": ["blocks.0.mha"],
        "blocks.1.gate": ["blocks.1"], "blocks.1.mha.out_proj": ["blocks.1.mha"],
        "blocks.0.meta": ["blocks.0"], "blocks.1.meta": ["blocks.1"],
        "emb": [""],
    }  # blocks.*.meta: a dtype read counts (it would read int8 after quantization)
    assert not any(h for h in m._forward_hooks.values()) and not m.blocks[0]._forward_pre_hooks  # hooks removed


@pytest.mark.parametrize("method", ["int8", "nf4", "int4"])
def test_plan_keeps_outside_read_linears_and_quantized_model_runs(method):
    torch.manual_seed(0)
    m = Toy().eval()
    ids = torch.randint(0, 100, (2, 8))
    ref = m(ids)
    r = anyquant.quantize(m, method, progress=False)
    d = {x.name: x for x in r.plan.decisions}
    for i in (0, 1):
        out = d[f"blocks.{i}.mha.out_proj"]
        assert out.action == "keep" and out.reason_code == "weight_read_outside_forward"
        assert out.reason.startswith(f"weight read outside its module's forward by blocks.{i}.mha")
        assert d[f"blocks.{i}.gate"].reason.startswith(f"weight read outside its module's forward by blocks.{i}")
        assert d[f"blocks.{i}.meta"].reason_code == "weight_read_outside_forward"
        assert d[f"blocks.{i}.up"].action == d[f"blocks.{i}.down"].action == "quantize"
    q = m(ids)
    assert torch.isfinite(q).all()
    err = ((q - ref).norm() / ref.norm()).item()
    assert err < {"int8": 0.002, "nf4": 0.015, "int4": 0.01}[method], err  # measured 0.0006, 0.0073, 0.0052


def test_safety_keep_cannot_be_overridden_by_exact_name():
    m = Toy().eval()
    with pytest.raises(AnyquantError, match="must stay in float: weight read outside"):
        anyquant.plan(m, "int8", overrides=[("blocks.0.mha.out_proj", "int8")])
    p = anyquant.plan(m, "int8", overrides=[("re:out_proj", "int8")])  # broad pattern: skipped
    assert p.get("blocks.0.mha.out_proj").action == "keep"


def _tiny_llama(**kw):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True, **kw)
    return AutoModelForCausalLM.from_config(cfg).eval()


def test_keep_in_fp32_modules_honoured():
    m = _tiny_llama()
    m._keep_in_fp32_modules = ["down_proj"]
    p = anyquant.plan(m, "nf4")
    d = p.get("model.layers.1.mlp.down_proj")
    assert d.action == "keep" and d.reason_code == "keep_in_fp32_modules" and "'down_proj'" in d.reason
    assert p.get("model.layers.1.mlp.up_proj").action == "quantize"
    assert p.get("lm_head").reason_code == "output_head" and "tied to model.embed_tokens.weight" in p.get("lm_head").reason


def test_only_restricts_and_precedence():
    m = _tiny_llama()
    p = anyquant.plan(m, "int8", only=["re:self_attn\\.q_proj$"])
    q = {d.name for d in p.to_quantize()}
    assert q == {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"}
    d = p.get("model.layers.0.mlp.up_proj")
    assert d.action == "keep" and d.reason == "not selected by --only"
    # later wins: --only, then overrides (plan file, then --keep)
    p = anyquant.plan(m, "int8", only=["re:q_proj$"],
                      overrides=[("model.layers.0.mlp.up_proj", "int8"), ("model.layers.1.self_attn.q_proj", "keep")])
    assert {d.name for d in p.to_quantize()} == {"model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj"}
    with pytest.raises(AnyquantError, match="'layers.0.mlp.up_proj' matches no module.*closest"):
        anyquant.plan(m, "int8", only=["layers.0.mlp.up_proj"])


def test_vlm_components_from_config_and_structure():
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    torch.manual_seed(0)
    v = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         image_size=28, patch_size=14)
    t = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=300)
    m = LlavaForConditionalGeneration(LlavaConfig(vision_config=v, text_config=t, image_token_index=299)).eval()
    mm = anyquant.inspect(m)
    assert mm.component_roots == {"vision tower": "model.vision_tower", "language model": "model.language_model"}
    comp = {n: i.component for n, i in mm.modules.items()}
    assert comp["model.vision_tower.encoder.layers.0.mlp.fc1"] == "vision tower"
    assert comp["model.multi_modal_projector.linear_1"] == "projector"
    assert comp["model.language_model.layers.0.mlp.up_proj"] == "language model"
    assert comp["lm_head"] == "head"
    p = anyquant.plan(m, "int8")
    assert p.get("model.vision_tower.encoder.layers.0.self_attn.q_proj").action == "keep"
    # issue 16: the probe builds LLaVA's image placeholder tokens from the config: images probed
    assert not any("probed text-only" in n for n in p.notes)
    p = anyquant.plan(m, "int8", include_vision=True)
    assert p.get("model.vision_tower.encoder.layers.0.self_attn.q_proj").action == "quantize"
    assert p.get("model.vision_tower.embeddings.patch_embedding").action == "keep"  # never convs
    assert p.get("model.multi_modal_projector.linear_1").action == "keep"


def test_cli_plan_include_vision_only_on_remote_code_fixture(tmp_path):
    from typer.testing import CliRunner

    from anyquant.cli import app
    from tests.fixtures import build_fixture

    path = build_fixture("minicpmv_like", tmp_path / "mv")
    p = CliRunner().invoke(app, ["plan", str(path), "--method", "int8", "--json", "--trust-remote-code",
                                 "--include-vision", "--only", "re:^(vpm|resampler)\\."])
    assert p.exit_code == 0, p.output
    d = {x["name"]: x for x in json.loads(p.stdout)["decisions"]}
    assert d["vpm.blocks.0.attn.q_proj"]["action"] == "quantize"
    assert d["vpm.patch_embed"]["action"] == "keep"
    assert d["resampler.attn.out_proj"]["reason_code"] == "weight_read_outside_forward"
    assert d["resampler.kv_proj"]["reason_code"] == "projector_float"
    assert d["llm.layers.0.attn.q_proj"]["reason"] == "not selected by --only"


def test_conv1d_is_linear_like_and_quantized_as_its_linear():
    """transformers' Conv1D (GPT-2): kind linear, features from its transposed weight; the
    quantize step replaces it by the nn.Linear it equals before quantizing."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    from anyquant.model.modelmap import LINEAR, as_linear, build_model_map

    c = Conv1D(48, 32)  # nf=48 outputs, nx=32 inputs: weight [32, 48]
    x = torch.randn(3, 32)
    lin = as_linear(c)
    assert isinstance(lin, nn.Linear) and (lin.in_features, lin.out_features) == (32, 48)
    assert torch.equal(lin(x), c(x)) or torch.allclose(lin(x), c(x), atol=1e-6)

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=128, n_positions=64)).eval()
    mm = build_model_map(model)
    attn = mm.modules["transformer.h.0.attn.c_attn"]
    assert attn.kind == LINEAR and (attn.in_features, attn.out_features) == (64, 192)
    r = anyquant.quantize(model, "int4", progress=False)
    names = {d.name for d in r.plan.to_quantize()}
    assert {"transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"} <= names
    assert r.report["probe_logits_relative_error"] < 0.2


def test_linear_subclass_kind_follows_what_its_forward_computes():
    """An nn.Linear subclass is linear-like only if its own forward computes x @ W.T + b
    (Falcon's FalconLinear); one returning something else (Llama 4's router returns a tuple)
    stays in float, since a quantized Linear in its place would change what it returns."""
    from anyquant.model.modelmap import LINEAR, OTHER, module_kind

    class SameMath(nn.Linear):
        def forward(self, x):
            return x @ self.weight.T + self.bias

    class Router(nn.Linear):
        def forward(self, x):
            logits = super().forward(x)
            return torch.sigmoid(logits), logits

    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    assert module_kind(nn.Linear(8, 4)) == LINEAR
    assert module_kind(SameMath(8, 4)) == LINEAR
    assert module_kind(Router(8, 4)) == OTHER
    assert module_kind(Scaled(8, 4)) == OTHER


@pytest.mark.parametrize("case", ["vision_table_with_vocab_rows", "token_table_with_extra_rows"])
def test_vlm_token_embedding_found_despite_lookalikes(case):
    """The token embedding decides where the language model is. A vision position table can
    have `vocab_size` rows (LFM2-VL: 256 patch positions) and a token table can have more rows
    than `vocab_size` (Molmo2's additional tokens); neither may hand the language model to the
    vision tower."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    torch.manual_seed(0)
    # 28 px / 14 px patches = 4 positions + CLS = 5 rows in the vision position table
    v = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         image_size=28, patch_size=14)
    vocab = 5 if case == "vision_table_with_vocab_rows" else 300
    t = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=vocab)
    m = LlavaForConditionalGeneration(LlavaConfig(vision_config=v, text_config=t, image_token_index=vocab - 1)).eval()
    if case == "token_table_with_extra_rows":
        m.config.text_config.vocab_size = 256  # the config counts fewer tokens than the table holds
    mm = anyquant.inspect(m)
    assert mm.component_roots == {"vision tower": "model.vision_tower", "language model": "model.language_model"}
    assert mm.modules["model.language_model.layers.0.mlp.up_proj"].component == "language model"
