"""runtime.attention on CPU: the registered attention function falls back to transformers' sdpa
(identical logits), and the fp32 reference of the decode kernel matches torch's attention math.
The CUDA kernel itself is tested in tests/test_runtime_gpu.py."""

from __future__ import annotations

import math

import torch

from anyquant.runtime import attention


def _tiny(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=128, max_position_embeddings=64,
                      tie_word_embeddings=False, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()


def test_cpu_model_falls_back_to_sdpa_exactly():
    model = _tiny()
    ids = torch.randint(0, 256, (1, 7))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        prev = attention.use_decode_attention(model)
        assert prev == "sdpa" and model.config._attn_implementation == attention.NAME
        out = model(input_ids=ids).logits
        last = model(input_ids=ids[:, :1]).logits       # one token: still sdpa on CPU
    assert torch.equal(out, ref)
    assert torch.isfinite(last).all()


def test_reference_matches_attention_math():
    g = torch.Generator().manual_seed(0)
    hq, hkv, L, d = 8, 2, 37, 128
    q = torch.randn(1, hq, 1, d, generator=g)
    k = torch.randn(1, hkv, L, d, generator=g)
    v = torch.randn(1, hkv, L, d, generator=g)
    mask = torch.zeros(1, 1, 1, L, dtype=torch.bool)
    mask[..., :29] = True
    want = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double().repeat_interleave(hq // hkv, 1), v.double().repeat_interleave(hq // hkv, 1),
        attn_mask=mask, scale=1 / math.sqrt(d)).transpose(1, 2)
    got = attention.reference(q, k, v, mask, 1 / math.sqrt(d))
    assert got.shape == (1, 1, hq, d)
    assert torch.allclose(got.double(), want, atol=1e-5)
    # the operator on CPU tensors is the reference
    assert torch.equal(torch.ops.anyquant.decode_attention(q, k, v, mask, 1 / math.sqrt(d)), got)
    assert not attention.decode_ok(q, k, v, mask)      # CPU: sdpa runs
