"""`anyquant generate` and runtime.generate.FastDecoder on CPU: greedy tokens equal
`model.generate`'s on the same loaded model (issue 18). The model is a tiny random Llama with
the default model's tokenizer (SmolLM2's vocabulary and chat template)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import anyquant
from anyquant.cli import app
from anyquant.runtime.generate import FastDecoder, plain_generate


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from anyquant.model.default import default_model_dir

    try:
        src = default_model_dir()
    except anyquant.errors.AnyquantError as e:
        pytest.skip(f"default model not installed: {e}")
    cfg = json.loads((src / "config.json").read_text())
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=cfg["vocab_size"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=cfg.get("eos_token_id"), tie_word_embeddings=True)).eval()
    result = anyquant.quantize(model, "int4", progress=False)
    # the tokenizer is saved with the output (files added afterwards fail its integrity check)
    result.tokenizer = AutoTokenizer.from_pretrained(src)
    return anyquant.save(result, tmp_path_factory.mktemp("gen") / "int4")


def _reference(model, ids, n):
    with torch.no_grad():
        seq = model.generate(ids, max_new_tokens=n, do_sample=False, temperature=None, top_p=None, top_k=None,
                             eos_token_id=None, pad_token_id=0)
    return seq[0, ids.shape[1]:].tolist()


def test_static_cache_loop_equals_model_generate(saved):
    model = anyquant.load(saved, device="cpu")
    dec = FastDecoder(model, max_cache_len=64)
    assert dec.mode == "eager static cache" and dec.graph is None
    for seed in (1, 2):   # two prompts through one decoder: the cache and counters are reset
        ids = torch.randint(0, model.config.vocab_size, (1, 5 + seed), generator=torch.Generator().manual_seed(seed))
        got, stats = dec.generate(ids, 12)
        assert got == _reference(model, ids, 12)
        assert stats["new_tokens"] == 12 and stats["decode_tokens_per_s"] > 0
    dec.close()


def test_plain_generate_timing(saved):
    model = anyquant.load(saved, device="cpu")
    ids = torch.randint(0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(3))
    seen = []
    rows, stats = plain_generate(model, ids, 8, on_token=seen.append, eos_token_id=None, pad_token_id=0)
    assert rows[0] == seen == _reference(model, ids, 8)
    assert stats["time_to_first_token_s"] > 0


def test_cli_generate_greedy_equals_model_generate(saved, tmp_path):
    from transformers import AutoTokenizer

    runner = CliRunner()
    res = runner.invoke(app, ["generate", str(saved), "The capital of France is", "--max-new-tokens", "10", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["path"] == "model.generate (dynamic cache)" and "reference" in data["int4_kernels"]
    model = anyquant.load(saved, device="cpu")
    tok = AutoTokenizer.from_pretrained(saved)
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=10, do_sample=False)[0, ids.shape[1]:].tolist()
    assert data["results"][0]["tokens"] == ref

    # --chat streams text, --prompts runs each line; timings are printed
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\n\nwhat is 2 + 2?\n")
    res = runner.invoke(app, ["generate", str(saved), "--prompts", str(prompts), "--chat", "--max-new-tokens", "4"])
    assert res.exit_code == 0, res.output
    assert res.output.count("time to first token") == 2 and "int4 kernel" in res.output


def test_cli_generate_needs_one_prompt_source(saved):
    res = CliRunner().invoke(app, ["generate", str(saved)])
    assert res.exit_code == 2 and "give a prompt or --prompts" in res.output
