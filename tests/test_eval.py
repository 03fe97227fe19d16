"""Evaluation: text sources, quality metrics, memory tracking, report."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch

from anyquant.calib.text import calibration_text, evaluation_text, gensim_test_data_dir
from anyquant.errors import AnyquantError
from anyquant.eval.memory import dir_size_bytes
from anyquant.eval.metrics import compare, perplexity, token_windows
from anyquant.eval.report import (
    format_table,
    format_value,
    write_markdown,
    write_report,
)

# ---------------------------------------------------------------- text


def test_texts_are_real_clean_and_disjoint():
    ev = evaluation_text()
    cal = calibration_text()
    assert len(cal) > 100_000
    assert len(ev) > 2_000_000
    for leftover in ("{{", "}}", "[[", "]]", "<ref", "&lt;", "'''"):
        assert leftover not in ev, leftover
    # Disjointness: no 200-char window of one source appears in the other.
    for text, other in ((ev, cal), (cal, ev)):
        for frac in (0.1, 0.3, 0.5, 0.7, 0.9):
            start = int(len(text) * frac)
            assert text[start : start + 200] not in other
    assert evaluation_text() is ev  # cached


def test_missing_gensim_names_the_fix(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(AnyquantError, match="pip install --no-deps gensim"):
        gensim_test_data_dir()


# ---------------------------------------------------------------- token windows


class FakeTokenizer:
    """Whitespace tokenizer with HF's encode() signature: one id per word, ids from 10."""

    def __init__(self, bos_token_id=1):
        self.bos_token_id = bos_token_id
        self.calls = []

    def encode(self, text, add_special_tokens=True, **kwargs):
        self.calls.append(len(text))
        ids = [10 + (sum(map(ord, w)) % 200) for w in text.split()]
        return ([self.bos_token_id] if add_special_tokens and self.bos_token_id is not None else []) + ids


def test_token_windows_shapes_bos_and_determinism():
    text = " ".join(f"w{i}" for i in range(5000))
    tok = FakeTokenizer(bos_token_id=1)
    w = token_windows(tok, text, max_tokens=1000, window=100)
    # 99 text tokens per row after BOS; 1000 // 99 = 10 full rows, remainder dropped.
    assert w.shape == (10, 100) and w.dtype == torch.long
    assert (w[:, 0] == 1).all() and (w[:, 1:] != 1).all()
    reference = FakeTokenizer().encode(text, add_special_tokens=False)
    assert w[:, 1:].reshape(-1).tolist() == reference[: 10 * 99]
    assert torch.equal(w, token_windows(tok, text, max_tokens=1000, window=100))
    # A long text is tokenized only as far as needed.
    assert max(tok.calls) < len(text)

    no_bos = token_windows(FakeTokenizer(bos_token_id=None), text, max_tokens=1000, window=100)
    assert no_bos.shape == (10, 100)
    assert no_bos.reshape(-1).tolist() == reference[:1000]
    off = token_windows(tok, text, max_tokens=1000, window=100, bos=False)
    assert torch.equal(off, no_bos)

    short = token_windows(tok, "a b c d e", window=100)
    assert short.shape == (1, 6)  # the only window is kept even though partial
    with pytest.raises(AnyquantError):
        token_windows(tok, "   ", window=100)


# ---------------------------------------------------------------- compare


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=128,
    )
    model = LlamaForCausalLM(cfg).eval()
    windows = torch.randint(0, 256, (5, 33), generator=torch.Generator().manual_seed(1))
    return model, windows


def test_compare_against_itself(tiny_llama):
    model, windows = tiny_llama
    res = compare(model, model, windows, batch_size=2, progress=False)
    assert res["tokens"] == 5 * 32
    assert res["kl_divergence"] < 1e-6
    assert res["top1_agreement"] == 1.0
    assert res["perplexity"] == res["baseline_perplexity"]

    # A distinct but identical copy goes through the two-model path.
    twin = copy.deepcopy(model)
    res2 = compare(twin, model, windows, batch_size=2, progress=False)
    assert res2["kl_divergence"] < 1e-6 and res2["top1_agreement"] == 1.0
    assert res2["perplexity"] == pytest.approx(res["perplexity"], rel=1e-6)


def test_compare_perturbed_and_reference_perplexity(tiny_llama):
    model, windows = tiny_llama
    perturbed = copy.deepcopy(model)
    torch.manual_seed(2)
    with torch.no_grad():
        for p in perturbed.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    res = compare(perturbed, model, windows, batch_size=3, progress=True)
    assert res["kl_divergence"] > 1e-4
    assert 0.0 <= res["top1_agreement"] < 1.0

    # Independent reference: whole batch at once, float64 cross-entropy.
    def reference_ppl(m):
        with torch.no_grad():
            logits = m(input_ids=windows).logits.double()
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)
        )
        return math.exp(nll.item())

    assert res["perplexity"] == pytest.approx(reference_ppl(perturbed), rel=1e-5)
    assert res["baseline_perplexity"] == pytest.approx(reference_ppl(model), rel=1e-5)
    assert perplexity(model, windows, progress=False) == pytest.approx(reference_ppl(model), rel=1e-5)

    alone = compare(perturbed, None, windows, progress=False)
    assert alone["baseline_perplexity"] is None and alone["kl_divergence"] is None
    assert alone["top1_agreement"] is None
    assert alone["perplexity"] == pytest.approx(res["perplexity"], rel=1e-9)


def test_compare_upcasts_half_precision_logits(tiny_llama):
    model, windows = tiny_llama
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    res = compare(bf16, model, windows, progress=False)
    assert all(math.isfinite(res[k]) for k in ("perplexity", "kl_divergence", "top1_agreement"))
    assert res["kl_divergence"] < 0.05
    assert not model.training  # eval mode restored as it was


# ---------------------------------------------------------------- memory


_PEAK_SCRIPT = """
import time, torch
from anyquant.eval.memory import track_peak_memory, peak_rss_bytes
with track_peak_memory() as mem:
    big = torch.ones(50_000_000, dtype=torch.float32)  # 200 MB, pages touched
del big
# Freed before the block ends: only the sampler thread can have seen it. The sleep spans
# several 20 ms sampling intervals so the test does not race the sampler.
with track_peak_memory() as transient:
    big = torch.ones(50_000_000, dtype=torch.float32)
    time.sleep(0.3)
    del big
print(mem.peak_bytes, transient.peak_bytes, mem.cuda_peak_bytes is None or mem.cuda_peak_bytes >= 0, peak_rss_bytes())
"""


def test_track_peak_memory_sees_a_block_allocation():
    # A fresh process: RSS is a process-wide number, and after other tests the allocator may
    # serve 200 MB from pages it already holds, which no RSS-based tracker can see.
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    block, transient, cuda_ok, peak = out.stdout.split()
    assert int(block) > 150e6
    assert int(transient) > 150e6
    assert cuda_ok == "True"
    assert int(peak) > 150e6


def test_dir_size_bytes(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"x" * 1000)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.bin").write_bytes(b"y" * 24)
    assert dir_size_bytes(tmp_path) == 1024
    assert dir_size_bytes(tmp_path / "a.bin") == 1000
    with pytest.raises(AnyquantError, match="missing"):
        dir_size_bytes(tmp_path / "missing")


# ---------------------------------------------------------------- report

COLUMNS = [
    ("method", "method"),
    ("bits_per_weight", "bits/weight"),
    ("perplexity", "perplexity"),
    ("kl_divergence", "KL"),
    ("top1_agreement", "top-1"),
    ("size_bytes", "size"),
]
ROWS = [
    {"method": "float", "bits_per_weight": 32.0, "perplexity": 27.123, "kl_divergence": None,
     "top1_agreement": None, "size_bytes": 538_000_000},
    {"method": "nf4 <b>&", "bits_per_weight": 4.13, "perplexity": 29.4567, "kl_divergence": 0.041234,
     "top1_agreement": 0.9123, "size_bytes": 120 * 2**20},
]


def test_write_report_html_and_markdown(tmp_path):
    per_layer = {
        "int8": {f"model.layers.{i}.mlp.down_proj": 1e-3 * (i + 1) for i in range(6)},
        "nf4 <b>&": {f"model.layers.{i}.mlp.down_proj": 0.05 + 0.01 * i for i in range(6)},
    }
    sizes = {
        "float": {"language model (float)": 500 * 2**20, "embeddings": 30 * 2**20, "head": 30 * 2**20},
        "nf4 <b>&": {"language model (quantized)": 70 * 2**20, "embeddings": 30 * 2**20, "head": 30 * 2**20},
    }
    out = write_report(tmp_path / "r" / "report.html", "Eval <SmolLM2>", ROWS, COLUMNS, per_layer, sizes,
                       notes=["text: enwiki & lee"])
    page = out.read_text()
    assert out == tmp_path / "r" / "report.html"
    for value in ("29.46", "0.0412", "91.23%", "120.0 MiB", "4.13", "27.12"):
        assert value in page
    assert len(re.findall(r'<img [^>]*src="data:image/png;base64,[A-Za-z0-9+/=]{100,}"', page)) == 2
    assert "nf4 &lt;b&gt;&amp;" in page and "<b>&" not in page  # escaped
    assert "Eval &lt;SmolLM2&gt;" in page and "enwiki &amp; lee" in page

    md = (tmp_path / "r" / "report.md").read_text()
    assert "| method | bits/weight | perplexity | KL | top-1 | size |" in md
    assert "29.46" in md and "91.23%" in md and "—" in md
    assert not list((tmp_path / "r").glob(".*tmp"))  # no temp files left behind


def test_report_without_plots_and_table_formatting(tmp_path):
    out = write_report(tmp_path / "plain.html", "t", ROWS, COLUMNS, None, None)
    assert "data:image/png" not in out.read_text()
    md = write_markdown(tmp_path / "t.md", [{"method": "a|b", "perplexity": 1.0}], [("method", "m"), ("perplexity", "p")])
    assert "a\\|b" in md.read_text()

    table = format_table(ROWS, COLUMNS)
    assert table.row_count == 2 and len(table.columns) == 6
    assert format_value("perplexity", 29.4567) == "29.46"
    assert format_value("kl_divergence", 0.041234) == "0.0412"
    assert format_value("size_bytes", 3 * 2**20) == "3.0 MiB"
    assert format_value("top1_agreement", 0.5) == "50.00%"
    assert format_value("perplexity", float("nan")) == "nan"
