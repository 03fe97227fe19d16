"""Issue 16 item 4 (the part done): fused MoE experts are counted honestly and said before quantizing.

Quantizing fused expert tensors is not implemented yet: the plan says so and the report counts
them as float (params_quantized_share, bits_per_weight_overall, fused_experts_float)."""

from __future__ import annotations

import pytest
import torch

import anyquant


def _mixtral():
    from transformers import AutoModelForCausalLM, MixtralConfig

    cfg = MixtralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=128, num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg)


def _qwen3_moe():
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    cfg = Qwen3MoeConfig(hidden_size=64, intermediate_size=128, moe_intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128, num_experts=4,
                         num_experts_per_tok=2, head_dim=16)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg)


@pytest.mark.parametrize("build", [_mixtral, _qwen3_moe])
def test_fused_experts_counted_as_float_and_said_in_the_plan(build):
    m = build()
    fused = sum(p.numel() for n, p in m.named_parameters() if ".experts." in n and p.dim() == 3)
    assert fused > 0
    plan = anyquant.plan(m, "int4")
    assert any("fused MoE expert tensor(s)" in n and "stay in float" in n for n in plan.notes)
    r = anyquant.quantize(m, "int4", progress=False)
    rep = r.report
    assert rep["fused_experts_float"]["params"] == fused
    assert rep["params_quantized"] + fused <= rep["params_total"]
    assert rep["params_quantized_share"] == pytest.approx(rep["params_quantized"] / rep["params_total"])
    assert rep["params_quantized_share"] < 0.5  # the honest number, not 4 bits per weight for the model
    assert rep["bits_per_weight_overall"] > 16  # float32 experts count at 32 bits
