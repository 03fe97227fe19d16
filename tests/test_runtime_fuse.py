"""fuse_projections on a tiny random Llama (CPU): the fused model computes what the unfused does.

Bounds from measurement (CPU, float32, 2026-11-24): the fused Int4Linear dequantizes to exactly
the concatenated weights, so the only difference is the matmul's summation order in a wider
matrix; max |logits difference| measured exactly 0 on logits of size ~1 (int4 and float
models, with and without bias, 3 seeds). ATOL = 1e-4 leaves room for other BLAS builds; a
wrong slice or zero point would feed a projection another's outputs (differences of order 1).
"""

from __future__ import annotations

import copy

import pytest
import torch

from anyquant.runtime.fuse import FusedSlice, fuse_projections
from anyquant.runtime.int4_linear import Int4Linear

ATOL = 1e-4


def tiny_llama(seed=0, bias=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=64,
                      attention_bias=bias, mlp_bias=bias, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    return model


def quantize(model, group=32):
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    if child.bias is not None:
                        with torch.no_grad():
                            child.bias.normal_(0, 0.1)
                    setattr(parent, name, Int4Linear.from_float(child, group_size=group))
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("int4", [True, False])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_model_matches_unfused(int4, bias):
    model = tiny_llama(bias=bias)
    if int4:
        quantize(model)
    ids = torch.randint(0, 256, (2, 9))
    ref = logits(model, ids)
    fused = copy.deepcopy(model)
    names = fuse_projections(fused)
    assert names == [f"model.layers.{i}.{n}" for i in range(2) for n in ("self_attn.qkv_proj", "mlp.gate_up_proj")]
    attn = fused.model.layers[0].self_attn
    assert isinstance(attn.q_proj, FusedSlice) and isinstance(attn.v_proj, FusedSlice)
    assert type(attn.qkv_proj) is (Int4Linear if int4 else torch.nn.Linear)
    assert attn.qkv_proj.out_features == 128 + 64 + 64
    assert fused.model.layers[1].mlp.gate_up_proj.out_features == 512
    out = logits(fused, ids)
    assert (out - ref).abs().max().item() < ATOL
    assert ref.abs().max().item() > 0.1
    # a fresh input, and the slices' own path (a call on a tensor the parent did not see)
    ids2 = torch.randint(0, 256, (1, 5))
    assert (logits(fused, ids2) - logits(model, ids2)).abs().max().item() < ATOL
    x = torch.randn(3, 128)
    q_ref = model.model.layers[0].self_attn.k_proj(x)
    assert (attn.k_proj(x) - q_ref).abs().max().item() < ATOL
    # nothing of the forward stays held
    assert all(slot.x is None for _, _, slot in attn._anyquant_fused)


def test_fuse_skips_mismatched_groups():
    model = quantize(tiny_llama())
    attn = model.model.layers[0].self_attn
    attn.v_proj = Int4Linear.from_float(torch.nn.Linear(128, 64, bias=False), group_size=64)  # other group size
    names = fuse_projections(model)
    assert "model.layers.0.self_attn.qkv_proj" not in names
    assert "model.layers.1.self_attn.qkv_proj" in names and "model.layers.0.mlp.gate_up_proj" in names
    assert not isinstance(attn.q_proj, FusedSlice)


def test_int4_copy_gets_its_own_op_handle():
    from anyquant.runtime import ops

    m = Int4Linear.from_float(torch.nn.Linear(64, 16, bias=False), group_size=32)
    c = copy.deepcopy(m)
    assert c._op_handle != m._op_handle and ops.lookup(c._op_handle) is c
    x = torch.randn(2, 64)
    torch.testing.assert_close(torch.ops.anyquant.int4_linear(x, c._op_handle, 16), m(x))


def test_fused_int4_model_traces_under_torch_compile():
    """One graph, no breaks (the slots, the class swap and the int4 operator all trace)."""
    model = quantize(tiny_llama())
    fuse_projections(model)
    ids = torch.randint(0, 256, (1, 6))
    ref = logits(model, ids)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True, dynamic=False)
    out = logits(compiled, ids)
    torch._dynamo.reset()
    assert (out - ref).abs().max().item() < ATOL
