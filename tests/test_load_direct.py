"""int4 outputs load without their float model (issue 18): a meta-device skeleton, Int4Linear
built directly, every tensor read from the files to its device; fused q/k/v and gate/up by
default. Compared with the loader that builds the float model through transformers first."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import anyquant
from anyquant.formats import compressed
from anyquant.formats.manifest import read_manifest
from anyquant.runtime.int4_linear import Int4Linear


def _tiny(family: str):
    import transformers

    torch.manual_seed(0)
    common = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)
    if family == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, tie_word_embeddings=True)).eval()
    if family == "qwen2":   # q/k/v with biases, untied head
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, tie_word_embeddings=False)).eval()
    if family == "gemma":   # tied head, scaled embeddings, its own rotary and norms
        return transformers.GemmaForCausalLM(transformers.GemmaConfig(**common, head_dim=32)).eval()
    raise ValueError(family)


@pytest.fixture(scope="module", params=["llama", "qwen2", "gemma"])
def saved(request, tmp_path_factory):
    model = _tiny(request.param)
    r = anyquant.quantize(model, "int4", progress=False)
    return anyquant.save(r, tmp_path_factory.mktemp(request.param) / "int4")


def _no_float_load(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the float model was built (load_int4_float)")
    monkeypatch.setattr(compressed, "load_int4_float", refuse)


def test_direct_load_equals_the_float_loader(saved, monkeypatch):
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(1))
    old = compressed.load_int4_float(saved, read_manifest(saved), False)
    _no_float_load(monkeypatch)
    new = anyquant.load(saved, device="cpu", fuse=False)
    assert any(isinstance(m, Int4Linear) for m in new.modules())
    assert not any(t.is_meta for t in list(new.parameters()) + list(new.buffers()))
    # non-persistent buffers (rotary inv_freq) computed as in the float model
    old_bufs, new_bufs = dict(old.named_buffers()), dict(new.named_buffers())
    assert old_bufs.keys() == new_bufs.keys()
    for k in old_bufs:
        assert torch.equal(old_bufs[k], new_bufs[k]), k
    if old.config.tie_word_embeddings and not isinstance(old.lm_head, Int4Linear):
        assert new.lm_head.weight is new.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(new(ids).logits, old(ids).logits, rtol=0, atol=0)


def test_fused_by_default_and_equal_to_unfused(saved, monkeypatch):
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(2))
    _no_float_load(monkeypatch)
    unfused = anyquant.load(saved, device="cpu", fuse=False)
    fused = anyquant.load(saved, device="cpu")
    attn = fused.model.layers[0].self_attn
    assert isinstance(attn.qkv_proj, Int4Linear) and isinstance(fused.model.layers[0].mlp.gate_up_proj, Int4Linear)
    with torch.no_grad():
        torch.testing.assert_close(fused(ids).logits, unfused(ids).logits, rtol=1e-5, atol=1e-5)


def test_device_map_auto_on_cpu(saved, monkeypatch):
    ids = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(3))
    _no_float_load(monkeypatch)
    a = anyquant.load(saved, device="cpu", fuse=False)
    b = anyquant.load(saved, device_map="auto" if not torch.cuda.is_available() else {"": "cpu"}, fuse=False)
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, b(ids).logits, rtol=0, atol=0)


# A ~55M-parameter Llama in float32 (about 220 MB); its int4 output is about 36 MB.
_BIG = dict(vocab_size=2048, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)


def test_load_peak_memory_below_the_float_model(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**_BIG)).eval()
    float_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert float_bytes > 200e6
    out = anyquant.save(anyquant.quantize(model, "int4", group_size=128, progress=False), tmp_path / "int4")
    del model
    # a fresh interpreter; a first load does the one-time imports, the second is measured
    code = textwrap.dedent(f"""
        import json, sys
        import torch, transformers
        from transformers import LlamaForCausalLM
        import anyquant
        from anyquant.formats import compressed
        from anyquant.eval.memory import track_peak_memory
        def refuse(*a, **k):
            raise AssertionError("the float model was built")
        compressed.load_int4_float = refuse
        anyquant.load({str(out)!r}, device="cpu")
        with track_peak_memory(0.002) as peak:
            m = anyquant.load({str(out)!r}, device="cpu")
        print(json.dumps({{"peak": peak.peak_bytes, "params": sum(t.numel() for t in m.state_dict().values())}}))
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    # measured: the int4 model's own size (~17% of the float model; the float loader needs
    # the float model's 100% and more)
    assert got["peak"] < 0.5 * float_bytes, (got, float_bytes)
