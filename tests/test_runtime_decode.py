"""runtime.decode on CPU: a StaticCache whose layers share one position counter decodes exactly
as transformers' own (same logits, same cache), and greedy_token is torch.argmax."""

from __future__ import annotations

import torch

from anyquant.runtime.decode import greedy_token, share_position_counter


def _tiny(layers=3):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=256, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=64,
                      tie_word_embeddings=False, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()


def _decode(model, shared: bool, steps=6):
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=32)
    counter = share_position_counter(cache, "cpu") if shared else None
    if shared:
        assert counter is not None
    prompt = torch.arange(5).view(1, 5) * 7 % 512
    logits, toks = [], []
    with torch.no_grad():
        out = model(input_ids=prompt, past_key_values=cache, use_cache=True,
                    position_ids=torch.arange(5).view(1, -1))
        tok = greedy_token(out.logits)
        for i in range(steps):
            p = 5 + i
            out = model(input_ids=tok, past_key_values=cache, use_cache=True, position_ids=torch.tensor([[p]]))
            logits.append(out.logits)
            tok = greedy_token(out.logits)
            toks.append(int(tok))
    return torch.cat(logits, 1), toks, cache, counter


def test_shared_counter_decodes_identically():
    model = _tiny()
    ref, ref_toks, ref_cache, _ = _decode(model, False)
    got, toks, cache, counter = _decode(model, True)
    assert toks == ref_toks
    assert torch.equal(got, ref)
    assert int(counter) == 5 + 6
    assert all(layer.cumulative_length is counter for layer in cache.layers)
    assert int(cache.get_seq_length()) == int(ref_cache.get_seq_length()) == 11
    for a, b in zip(cache.layers, ref_cache.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    cache.reset()
    assert int(counter) == 0


def test_shared_counter_declines_initialized_caches():
    from transformers import StaticCache

    model = _tiny(2)
    cache = StaticCache(config=model.config, max_cache_len=16)
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2]]), past_key_values=cache, use_cache=True)
    before = [layer.cumulative_length for layer in cache.layers]
    assert share_position_counter(cache, "cpu") is None
    assert [layer.cumulative_length for layer in cache.layers] == before


def test_greedy_token_is_argmax():
    g = torch.Generator().manual_seed(0)
    for v in (128256, 32000, 512, 1000, 97):
        logits = torch.randn(2, 3, v, generator=g).to(torch.bfloat16)     # bf16: many ties
        logits[1, -1, v // 3] = logits[1, -1, v // 2] = 50.0                # a tie at the maximum
        want = logits[:, -1:].argmax(-1)
        assert torch.equal(greedy_token(logits), want), v
