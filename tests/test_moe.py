"""Issue 16 item 4: MoE experts are quantized by every method, fused expert tensors included
(transformers' Mixtral and Qwen3-MoE keep them as 3-D parameters, not nn.Linear layers), the
report counts them honestly, and the output says where it loads before anything is quantized.

Bounds are measured on these tiny random builds (float32, CPU) with about 1.3x headroom:
probe logits relative error int4 0.092 / 0.114 (Mixtral / Qwen3-MoE), nf4 0.102 / 0.101;
one MoE block's output on random hidden states, float experts vs quantized: int4 0.157 / 0.153,
hqq 0.155 / 0.153, nf4 0.161 / 0.148, int8 0.0106 / 0.0100."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import anyquant
from anyquant import primitives as P
from anyquant.errors import AnyquantError
from anyquant.eval.stored import stored_sizes
from anyquant.model.tree import probe_logits
from anyquant.planning.plan import FUSED_EXPERTS
from anyquant.planning.summary import summarize

LOGITS_BOUND = {"int4": 0.15, "nf4": 0.15}
BLOCK_BOUND = {"int4": 0.20, "hqq": 0.20, "nf4": 0.21, "int8": 0.014}
EXPERT_TYPE = {"int4": "Int4Experts", "hqq": "Int4Experts", "nf4": "Bnb4Experts", "int8": "Int8Experts"}


def _tiny(config_class: str, **fields):
    """A seeded random causal LM of transformers' own `config_class` with these fields."""
    import transformers

    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(getattr(transformers, config_class)(**fields))


def _mixtral():
    return _tiny("MixtralConfig", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=128, num_local_experts=4, num_experts_per_tok=2)


def _qwen3_moe():
    return _tiny("Qwen3MoeConfig", hidden_size=64, intermediate_size=128, moe_intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128, num_experts=4,
                                   num_experts_per_tok=2, head_dim=16)


def _fused(m) -> dict[str, int]:
    return {n: p.numel() for n, p in m.named_parameters() if ".experts." in n and p.dim() == 3}


@pytest.mark.parametrize("method", ["int4", "nf4"])
@pytest.mark.parametrize("build", [_mixtral, _qwen3_moe])
def test_fused_experts_quantized_counted_and_reloaded(build, method, tmp_path):
    m = build()
    fused = _fused(m)
    assert fused
    plan = anyquant.plan(m, method)
    experts = [d for d in plan.decisions if d.kind == FUSED_EXPERTS]
    assert {d.name for d in experts} == set(fused)
    assert all(d.action == "quantize" and d.method == method for d in experts)
    # said before quantizing: how many, and that stock transformers cannot load them
    assert any("4 of 4 fused MoE expert tensor(s) quantized" in n and "anyquant.load only" in n for n in plan.notes)
    assert f"fused MoE expert tensors: 4 {method}" in "\n".join(summarize(plan))

    float_logits = probe_logits(m, {"input_ids": torch.arange(32).reshape(2, 16)})
    r = anyquant.quantize(m, method, progress=False)
    rep = r.report
    assert rep["fused_experts_float"] == {"tensors": 0, "params": 0}
    assert rep["fused_experts_quantized"] == {"tensors": len(fused), "params": sum(fused.values())}
    for name in fused:
        owner, _, attr = name.rpartition(".")
        assert type(getattr(m.get_submodule(owner), attr)).__name__ == EXPERT_TYPE[method]
        assert not any(n == name for n, _ in m.named_parameters())
    linear_q = sum(d.shape[0] * d.shape[1] for d in r.plan.to_quantize())
    assert rep["params_quantized"] == linear_q + sum(fused.values())
    # honest overall width: the quantized weights at their stored cost, everything else (all float32
    # here) at 32 bits
    total, q = rep["params_total"], rep["params_quantized"]
    assert rep["bits_per_weight_overall"] == pytest.approx(
        (rep["bits_per_quantized_weight_estimate"] * q + 32 * (total - q)) / total, rel=1e-6)
    assert rep["params_quantized_share"] == pytest.approx(q / total)
    assert rep["bits_per_weight_overall"] < 8

    q_logits = probe_logits(m, {"input_ids": torch.arange(32).reshape(2, 16)})
    assert P.relative_error(float_logits, q_logits) < LOGITS_BOUND[method]

    out = anyquant.save(r, tmp_path / method)  # verifies the reload by default
    ver = json.loads((out / "anyquant.json").read_text())["verification"]
    assert ver["anyquant"]["ok"] is True
    assert ver["transformers"]["ok"] is None and "anyquant.load only" in ver["transformers"]["skipped"]
    card = (out / "README.md").read_text()
    assert "4 of 4 fused MoE expert tensors quantized" in card and "anyquant.load only" in card
    keys = _saved_keys(out)
    if method == "int4":  # one compressed-tensors Linear per expert, under the checkpoint's own names
        assert not any(k.startswith(tuple(fused)) for k in keys)
        assert sum(k.endswith("weight_zero_point") and ".experts.0." in k for k in keys) == 2 * 3  # 2 layers
    else:  # bitsandbytes: the quantized experts' own tensors under the fused names
        assert all(f"{n}.weight_packed" in keys for n in fused)
    # what the files store: every quantized weight (experts included) found in the safetensors headers
    stored = stored_sizes(out, json.loads((out / "anyquant.json").read_text())["plan"])
    assert stored["quantized_weights"] == rep["params_quantized"]
    assert 4 < stored["bits_per_weight"] < 5.2
    loaded = anyquant.load(out)
    torch.testing.assert_close(probe_logits(loaded, r.probe_inputs), r.probe_logits, rtol=0, atol=0)


def _saved_keys(out) -> set[str]:
    from safetensors import safe_open

    keys: set[str] = set()
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as sf:
            keys |= set(sf.keys())
    return keys


@pytest.mark.parametrize("build", [_mixtral, _qwen3_moe])
def test_symmetric_int4_experts_load_in_stock_transformers(build, tmp_path):
    """W4A16 (symmetric): transformers' compressed-tensors loader reads the per-expert layout and
    merges it back into fused float experts; the save verified it against the in-memory model
    (measured max |difference| 5.6e-5 Mixtral, 2.3e-5 Qwen3-MoE, logits of magnitude ~0.6)."""
    from transformers import AutoModelForCausalLM

    m = build()
    fused = _fused(m)
    r = anyquant.quantize(m, "W4A16", progress=False)
    assert any("from_pretrained loads them too" in n for n in r.plan.notes)
    assert r.report["fused_experts_quantized"]["params"] == sum(fused.values())
    out = anyquant.save(r, tmp_path / "w4a16")
    ver = json.loads((out / "anyquant.json").read_text())["verification"]
    assert ver["transformers"]["ok"] is True and ver["transformers"]["loads"] is True
    assert "anyquant.load only" not in (out / "README.md").read_text()
    keys = _saved_keys(out)
    assert not any(k.startswith(tuple(fused)) for k in keys)
    assert not any(k.endswith("weight_zero_point") for k in keys)
    stock = AutoModelForCausalLM.from_pretrained(out).eval()
    got = probe_logits(stock, r.probe_inputs)
    assert (got - r.probe_logits).abs().max() < 1e-3 * r.probe_logits.abs().max()
    torch.testing.assert_close(probe_logits(anyquant.load(out), r.probe_inputs), r.probe_logits, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["int4", "hqq", "nf4", "int8"])
@pytest.mark.parametrize("build", [_mixtral, _qwen3_moe])
def test_moe_block_output_close_to_float(build, method):
    """One MoE block (router in float, experts quantized) against its float copy on random hidden
    states: the experts' own numerics, which the tiny model's logits barely show."""
    m = build()
    block_f = copy.deepcopy(m.model.layers[0].mlp)
    anyquant.quantize(m, method, progress=False)
    block_q = m.model.layers[0].mlp
    assert type(block_q.experts.gate_up_proj).__name__ == EXPERT_TYPE[method]
    x = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = block_f(x), block_q(x)
    ref, got = (t[0] if isinstance(t, tuple) else t for t in (ref, got))
    err = P.relative_error(ref, got)
    assert 0 < err < BLOCK_BOUND[method]


def test_keep_override_leaves_experts_float():
    m = _mixtral()
    fused = _fused(m)
    r = anyquant.quantize(m, "int4", progress=False, overrides=[("re:experts\\.down_proj$", "keep")])
    down = {n: v for n, v in fused.items() if n.endswith("down_proj")}
    kept = {d.name: d.reason_code for d in r.plan.kept() if d.kind == FUSED_EXPERTS}
    assert kept == dict.fromkeys(down, "user_keep")
    assert r.report["fused_experts_float"] == {"tensors": len(down), "params": sum(down.values())}
    assert r.report["fused_experts_quantized"]["params"] == sum(fused.values()) - sum(down.values())


def _jetmoe():
    return _tiny("JetMoeConfig", hidden_size=64, num_hidden_layers=2, num_key_value_heads=4, kv_channels=16,
                                 intermediate_size=128, num_local_experts=4, num_experts_per_tok=2, vocab_size=256,
                                 max_position_embeddings=64)


def _ergo():
    return _tiny("ErgoConfig", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                               moe_intermediate_size=64, first_dense_intermediate_size=128, shared_intermediate_size=64,
                               num_experts=4, num_experts_per_tok=2, vocab_size=256, max_position_embeddings=64)


def _inkling():
    return _tiny("InklingTextConfig", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      head_dim=16, swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=16,
                                      rel_extent=64, moe_intermediate_size=32,
                                      intermediate_size=128, n_routed_experts=4, n_shared_experts=2, num_experts_per_tok=2,
                                      vocab_size=256, max_position_embeddings=64)


# how each of these experts classes multiplies its tensors in its own forward (read in transformers'
# modeling code): JetMoE F.linear(x, W[e]) -> [out, in]; Ergo `x @ W[e]` -> [in, out] (and says so,
# is_transposed); Inkling's routed experts F.linear(x, W[e]), its shared experts
# torch.bmm(x, W.transpose(1, 2)) -> [out, in]
OWN_FORWARD = {_jetmoe: {"input_linear.weight": False, "output_linear.weight": False},
               _ergo: {"up_proj": True, "down_proj": True},
               _inkling: {"gate_up_proj": False, "shared_experts.gate_proj": False, "shared_experts.down_proj": False}}


@pytest.mark.parametrize("build", list(OWN_FORWARD), ids=["jetmoe", "ergo", "inkling"])
def test_experts_classes_with_their_own_forward_quantized_and_reloaded(build, tmp_path):
    """Experts classes that are not transformers' eager per-expert loop (JetMoE's
    JetMoeParallelExperts, Ergo's subclass with its own forward, Inkling's shared experts that
    multiply the whole tensor with torch.bmm) are quantized too: the QuantizedExperts stands
    for the tensor in their own forward; the probe saw which dimension is the input one."""
    from anyquant.model.tree import fused_expert_tensors

    m = build()
    fused = fused_expert_tensors(m)
    ids = {"input_ids": torch.arange(24).reshape(2, 12)}
    float_logits = probe_logits(m, ids)
    r = anyquant.quantize(m, "int4", progress=False)
    assert r.report["fused_experts_float"] == {"tensors": 0, "params": 0}
    assert r.report["fused_experts_quantized"]["params"] == sum(fused.values())
    layouts = {d.name: bool(d.options.get("transposed")) for d in r.plan.experts_to_quantize()}
    for suffix, transposed in OWN_FORWARD[build].items():
        hits = [v for n, v in layouts.items() if n.endswith(suffix)]
        assert hits and all(v == transposed for v in hits), (suffix, layouts)
    # measured on these builds: 0.18 (JetMoE), 0.31 (Ergo), 0.013 (Inkling): int4 on 64-wide random weights
    err = P.relative_error(float_logits, probe_logits(m, ids))
    assert 0 < err < 0.4
    out = anyquant.save(r, tmp_path / "int4")  # the save reloads it and compares the probe logits
    ver = json.loads((out / "anyquant.json").read_text())["verification"]
    assert ver["anyquant"]["ok"] is True
    torch.testing.assert_close(probe_logits(anyquant.load(out), ids), probe_logits(m, ids), rtol=0, atol=1e-5)


def test_quantized_experts_stand_for_the_whole_tensor():
    """A QuantizedExperts in torch functions and tensor methods: the dequantized tensor, exactly."""
    from anyquant.runtime.experts import Int8Experts

    w = torch.randn(3, 8, 16, generator=torch.Generator().manual_seed(0))
    q = Int8Experts.quantize(w, torch.float32)
    full = q.dequantized(torch.float32)
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(torch.bmm(x, q.transpose(1, 2)), torch.bmm(x, full.transpose(1, 2)))
    torch.testing.assert_close(x @ q.mT, x @ full.mT)
    torch.testing.assert_close(torch.nn.functional.linear(x[0], q[1]), torch.nn.functional.linear(x[0], full[1]))
    torch.testing.assert_close(q[torch.tensor([2, 0])], full[[2, 0]])
    assert q.shape == w.shape and q.size(1) == 8 and q.ndim == 3
    assert P.relative_error(w, full) < 0.01  # int8 row-wise absmax on Gaussian weights: about 0.005
    with pytest.raises(AttributeError):
        q.no_such_attribute  # noqa: B018


def test_probe_sees_how_experts_are_multiplied():
    """numerics/probe.py follows each fused expert tensor through the views its forward takes up
    to the product that consumes it: which of its last two dimensions is the input one."""
    from torch import nn

    from anyquant.numerics.probe import probe_weight_reads

    class BatchedExperts(nn.Module):  # [experts, in, out], whole: torch.bmm(x, W)
        def __init__(self):
            super().__init__()
            self.up = nn.Parameter(torch.randn(2, 8, 16))
            self.down = nn.Parameter(torch.randn(2, 8, 16))  # [experts, out, in]: x @ W[e].t()

        def forward(self, x):
            h = torch.bmm(x, self.up)
            return torch.stack([h[e] @ self.down[e].t() for e in range(2)])

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = BatchedExperts()

        def forward(self, x):
            return self.experts(x)

    facts = probe_weight_reads(Net(), {"x": torch.randn(2, 3, 8)})
    assert facts.expert_layouts == {"experts.down": "out_in", "experts.up": "in_out"}


def test_llama4_experts_unfused_as_transformers_loaders_expect(tmp_path):
    """Llama 4's experts multiply the whole [experts, in, out] tensor; transformers' bitsandbytes and
    compressed-tensors loaders replace them by one Llama4TextMLP per expert. anyquant does the same
    before planning (same weights, same outputs), so the experts are quantized as Linear layers
    and the outputs load in stock transformers with the in-memory logits."""
    from transformers import AutoModelForCausalLM, Llama4TextConfig

    cfg = Llama4TextConfig(hidden_size=64, intermediate_size=64, intermediate_size_mlp=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=256,
                           num_local_experts=4, max_position_embeddings=64)
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg)
    ids = {"input_ids": torch.arange(24).reshape(2, 12)}
    float_logits = probe_logits(m, ids)
    r = anyquant.quantize(m, "nf4", progress=False)
    assert type(m.model.layers[0].feed_forward.experts).__name__ == "SequentialLlama4TextExperts"
    names = {d.name for d in r.plan.to_quantize()}
    assert {f"model.layers.{i}.feed_forward.experts.{e}.{p}" for i in range(2) for e in range(4)
            for p in ("gate_proj", "up_proj", "down_proj")} <= names
    assert any("replaced by one module per expert" in n for n in r.notes)
    assert 0 < P.relative_error(float_logits, probe_logits(m, ids)) < 0.2  # measured 0.12
    out = anyquant.save(r, tmp_path / "nf4")
    ver = json.loads((out / "anyquant.json").read_text())["verification"]
    assert ver["anyquant"]["ok"] is True and ver["transformers"]["ok"] is True
    # the same for the int4 family's output (compressed-tensors)
    torch.manual_seed(0)
    m2 = AutoModelForCausalLM.from_config(cfg)
    r2 = anyquant.quantize(m2, "W4A16", progress=False)
    out2 = anyquant.save(r2, tmp_path / "w4a16")
    ver2 = json.loads((out2 / "anyquant.json").read_text())["verification"]
    assert ver2["anyquant"]["ok"] is True and ver2["transformers"]["ok"] is True


def test_quantized_experts_are_not_quantized_twice(tmp_path):
    """F5 for experts: an output's quantized experts are found; --requantize dequantizes them
    back into the fused parameter first, and the new method quantizes them again."""
    from anyquant.model.modelmap import build_model_map

    m = _mixtral()
    fused = _fused(m)
    r = anyquant.quantize(m, "int4", progress=False, overrides=[("re:self_attn", "keep")])
    # only the experts are quantized in memory: found by name
    assert any(".experts.gate_up_proj.weight_packed" in t for t in build_model_map(m).quantized_tensors)
    with pytest.raises(AnyquantError, match="already"):
        anyquant.quantize(m, "nf4", progress=False)
    out = anyquant.save(r, tmp_path / "int4")
    with pytest.raises(AnyquantError, match="already quantized"):
        anyquant.quantize(str(out), "nf4", progress=False)
    r2 = anyquant.quantize(str(out), "nf4", progress=False, requantize=True)
    assert r2.report["fused_experts_quantized"]["params"] == sum(fused.values())
    assert {d.name for d in r2.plan.experts_to_quantize()} == set(fused)


def test_transposed_experts_quantized_and_reloaded(tmp_path):
    """GPT-OSS stores experts as [experts, in, out] (`x @ W[e]`, plus 2-D biases that stay
    float): quantized per expert as the [out, in] transpose, kept in anyquant's fused layout,
    which stock transformers cannot read (said in the plan and the manifest)."""
    from transformers import AutoModelForCausalLM, GptOssConfig

    cfg = GptOssConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, vocab_size=128, num_local_experts=4,
                       num_experts_per_tok=2)
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg)
    fused = _fused(m)
    block_f = copy.deepcopy(m.model.layers[0].mlp)
    r = anyquant.quantize(m, "int4", progress=False)
    assert r.report["fused_experts_quantized"]["params"] == sum(fused.values())
    assert all(d.options.get("transposed") for d in r.plan.experts_to_quantize())
    q = m.model.layers[0].mlp.experts.gate_up_proj
    assert q.transposed and list(q.shape) == list(block_f.experts.gate_up_proj.shape)
    x = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = block_f(x), m.model.layers[0].mlp(x)
    ref, got = (t[0] if isinstance(t, tuple) else t for t in (ref, got))
    assert 0 < P.relative_error(ref, got) < BLOCK_BOUND["int4"]
    out = anyquant.save(r, tmp_path / "int4")
    ver = json.loads((out / "anyquant.json").read_text())["verification"]
    assert "anyquant.load only" in ver["transformers"]["skipped"]
    torch.testing.assert_close(probe_logits(anyquant.load(out), r.probe_inputs), r.probe_logits, rtol=0, atol=0)


def test_three_dimensional_parameters_that_are_not_experts_are_not_called_experts():
    """XLNet's relative attention holds 3-D q/k/v/o parameters and BLIP's vision embeddings a 3-D
    class embedding: float parameters in modules without Linears, but no MoE experts."""
    from transformers import AutoModelForCausalLM, XLNetConfig

    from anyquant.model.tree import fused_expert_tensors

    cfg = XLNetConfig(vocab_size=128, d_model=64, n_layer=2, n_head=4, d_inner=128)
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg)
    assert any(p.dim() == 3 for p in m.parameters()), "the fixture must hold 3-D parameters"
    assert fused_expert_tensors(m) == {}
    assert fused_expert_tensors(_mixtral()), "Mixtral's experts are still found"
    r = anyquant.quantize(m, "int4", progress=False)
    assert r.report["fused_experts_float"] == {"tensors": 0, "params": 0}
    assert not any("expert" in n for n in r.plan.notes)
