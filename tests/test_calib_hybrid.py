"""Issue 16 item 5: calibrated methods reach hybrid stacks and remote-code VLMs."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest
import torch

import anyquant
from anyquant.calib.blocks import find_blocks
from anyquant.errors import AnyquantError
from tests.fixtures import build_fixture


def _word_tokenizer(path, vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from anyquant.calib.text import calibration_text

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w, _ in Counter(calibration_text()[:50_000].split()).most_common(vocab_size - 3):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(path)
    return path


def _jamba():
    from transformers import AutoModelForCausalLM, JambaConfig

    cfg = JambaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, num_experts=4, num_experts_per_tok=2,
                      expert_layer_period=2, expert_layer_offset=1, attn_layer_period=2, attn_layer_offset=1,
                      mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=8)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg)


def test_find_blocks_accepts_a_heterogeneous_stack_holding_the_planned_linears():
    m = _jamba()
    assert len({type(b) for b in m.model.layers}) == 2  # attention and Mamba decoder layers
    name, blocks = find_blocks(m, prefer=["model.layers.0.mamba.in_proj", "model.layers.1.self_attn.q_proj"])
    assert name == "model.layers" and len(blocks) == 4


def test_gptq_on_jamba_calibrates_every_block():
    m = _jamba()
    r = anyquant.quantize(m, "gptq", progress=False, calib=torch.randint(0, 128, (4, 32)), n_samples=4, seq_len=32)
    blocks = [b["block"] for b in r.report["calibration"]["blocks"]]
    assert blocks == [f"model.layers.{i}" for i in range(4)]
    assert all(b["linears"] > 0 for b in r.report["calibration"]["blocks"])
    assert torch.isfinite(r.probe_logits).all() and r.report["probe_logits_relative_error"] < 0.5


def test_gptq_on_striped_hyena_like(tmp_path):
    src = build_fixture("hyena_like", tmp_path / "hyena")
    r = anyquant.quantize(str(src), "gptq", trust_remote_code=True, progress=False,
                          calib=torch.randint(0, 64, (4, 32)), n_samples=4, seq_len=32)
    blocks = r.report["calibration"]["blocks"]
    assert [b["block"] for b in blocks] == ["blocks.0", "blocks.1"] and all(b["linears"] for b in blocks)
    assert not r.report["calibration"]["outside_blocks"]
    out = anyquant.save(r, tmp_path / "out")  # verified on reload
    assert json.loads((out / "anyquant.json").read_text())["verification"]["anyquant"]["ok"]


def test_gptq_remote_code_vlm_from_the_cli_with_a_tokenizer(tmp_path):
    src = build_fixture("minicpmv_like", tmp_path / "minicpmv")
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    tok = _word_tokenizer(tmp_path / "tok", vocab)
    calib = tmp_path / "calib.txt"
    from anyquant.calib.text import calibration_text

    calib.write_text(calibration_text()[:20_000])
    base = [sys.executable, "-m", "anyquant.cli", "quantize", str(src), "-m", "gptq", "--trust-remote-code",
            "--calib", str(calib), "--n-samples", "4", "--seq-len", "32"]
    p = subprocess.run(base + ["--out", str(tmp_path / "no-tok")], capture_output=True, text=True)
    assert p.returncode != 0 and "--tokenizer DIR" in p.stderr + p.stdout  # says how to give one
    p = subprocess.run(base + ["--tokenizer", str(tok), "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    man = json.loads((tmp_path / "out" / "anyquant.json").read_text())
    blocks = [b["block"] for b in man["metrics"]["calibration"]["blocks"]]
    # the language model's stack is the decoder, never the vision tower's identically typed blocks
    assert blocks and all(b.startswith("llm.layers.") for b in blocks)
    assert man["verification"]["anyquant"]["ok"]


def test_tokenizer_dir_without_tokenizer_is_refused(tmp_path, tiny_llama):
    with pytest.raises(AnyquantError, match="--tokenizer .*no tokenizer files"):
        anyquant.quantize(str(tiny_llama), "gptq", tokenizer=tmp_path, progress=False)
