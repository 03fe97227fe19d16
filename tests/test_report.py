"""`anyquant report`: one self-contained, well-formed HTML page whose numbers agree with the output.

Validated with Python's html.parser (strict nesting, no external resources, every section); no
headless browser is installed for it (CI would need one too)."""

from __future__ import annotations

import html.parser
import re
import subprocess
import sys

import pytest

import anyquant
from anyquant.eval.report import (
    EVAL_RECORDS,
    FILES_COMPONENT,
    HEADER_COMPONENT,
    build_report,
    eval_lines,
    format_bytes,
    format_value,
    group_by_block,
    output_size,
    read_eval_record,
    save_eval_record,
)
from anyquant.eval.stored import stored_sizes
from anyquant.formats.manifest import read_manifest

SECTIONS = ("headline", "results", "quality", "per-layer", "size", "samples", "commands", "environment")
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class StrictPage(html.parser.HTMLParser):
    """Every element closed in order, no external resource, the text and section ids collected."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.ids: list[str] = []
        self.text: list[str] = []
        self.images = 0
        self.doctype = False

    def handle_decl(self, decl):
        self.doctype = self.doctype or decl.lower() == "doctype html"

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.append(a["id"])
        for key in ("src", "href", "srcset", "action", "data"):
            v = (a.get(key) or "").strip().lower()
            if v and not v.startswith("data:") and not v.startswith("#"):
                self.errors.append(f"<{tag} {key}={v[:60]}>: an external resource")
        if tag == "img":
            self.images += 1
            if not a.get("alt"):
                self.errors.append("<img> without alt text")
        if tag in ("script", "link", "iframe", "object"):
            self.errors.append(f"<{tag}> in a self-contained report")
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in VOID:
            self.stack.pop()

    def handle_endtag(self, tag):
        if tag in VOID:
            self.errors.append(f"</{tag}>: a void element has no end tag")
        elif not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else 'nothing'}>")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def parse(page: str) -> StrictPage:
    p = StrictPage()
    p.feed(page)
    p.close()
    assert p.doctype, "no <!DOCTYPE html>"
    assert not p.errors, p.errors
    assert not p.stack, f"unclosed: {p.stack}"
    assert not re.search(r"https?://|url\(", page), "a URL in the page: it must open offline"
    return p


@pytest.fixture(scope="module")
def output(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "tiny-int4"
    result = anyquant.quantize(tiny_llama, "int4", group_size=64, progress=False)
    anyquant.save(result, out, command="anyquant quantize tiny --method int4 --group-size 64 --out tiny-int4")
    save_eval_record(out, {"perplexity": 31.234567, "baseline_perplexity": 30.0, "kl_divergence": 0.0123456,
                           "top1_agreement": 0.9345, "tokens": 4095}, "anyquant eval tiny-int4 --report")
    return out


SAMPLES = {"float (source)": ["Paris.", "100 °C", "return n"], "int4 g64": ["Paris <b>", "100 C", "return n & 1"]}


def test_report_is_well_formed_self_contained_and_agrees_with_the_manifest(output):
    path = build_report([output], samples=SAMPLES, commands=["anyquant report tiny-int4"])
    assert path == output / "report.html"
    page = path.read_text(encoding="utf-8")
    p = parse(page)
    text = " ".join(p.text)
    for s in SECTIONS:
        assert s in p.ids, f"section {s} missing"
    assert p.images >= 3  # quality vs bits, per-layer heatmap, size by component

    manifest = read_manifest(output)
    # size: every file of the output but the report's own; the components add up to it
    files = [f for f in output.rglob("*") if f.is_file() and f.name not in ("report.html", "report.md", EVAL_RECORDS)]
    total = sum(f.stat().st_size for f in files)
    size = output_size(output, manifest["plan"])
    assert size["total_bytes"] == total == sum(size["components"].values())
    assert size["components"][HEADER_COMPONENT] > 0 and size["components"][FILES_COMPONENT] > 0
    assert page.count(format_bytes(total)) >= 2  # results table and size table's total
    bits = stored_sizes(output, manifest["plan"])["bits_per_weight"]
    assert format_value("bits_per_weight", bits) in text
    # quality from eval.jsonl, formatted for people
    assert "31.23" in text and "0.0123" in text and "93.45%" in text and "+4.1%" in text
    assert "31.234567" not in text
    # per-layer: module names grouped by block, not indices
    assert "self_attn.q_proj" in text and "mlp.down_proj" in text and "model.layers.1." in text
    # samples escaped, side by side with the float model
    assert "Paris &lt;b&gt;" in page and "Paris <b>" not in page
    # versions, device, date, commands
    for name in ("anyquant", "torch", "transformers", "bitsandbytes"):
        assert name in text
    assert anyquant.__version__ in text
    assert re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", text)
    assert "anyquant quantize tiny --method int4 --group-size 64" in text
    assert "anyquant eval tiny-int4 --report" in text and "anyquant report tiny-int4" in text
    assert "Use int4 g64" in text  # the recommendation: within 5% of float perplexity


def test_comparison_headline_and_recommendation(output, tmp_path):
    import shutil

    other = tmp_path / "copy"
    shutil.copytree(output, other)
    (other / EVAL_RECORDS).unlink()
    save_eval_record(other, {"perplexity": 45.0, "baseline_perplexity": 30.0, "kl_divergence": 0.4,
                             "top1_agreement": 0.6}, None)
    assert read_eval_record(other)["perplexity"] == 45.0
    out = build_report([output, other], tmp_path / "cmp.html", samples=False)
    page = out.read_text()
    parse(page)
    assert f"Use int4 g64 ({output})" in page  # only the first is within 5%
    assert "+50.0%" in page


def test_headline_without_eval_says_how_to_measure(output, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(output, bare)
    (bare / EVAL_RECORDS).unlink()
    out = build_report([bare], samples=False)
    p = parse(out.read_text())
    assert "anyquant eval DIR --report" in " ".join(p.text)


def test_group_by_block():
    errors = {f"model.layers.{i}.{m}": 0.01 * (i + 1) for i in range(3) for m in ("self_attn.q_proj", "mlp.up_proj")}
    errors["lm_head"] = 0.5
    prefix, blocks, rows, grid, outside = group_by_block(errors)
    assert (prefix, blocks, rows) == ("model.layers", [0, 1, 2], ["self_attn.q_proj", "mlp.up_proj"])
    assert grid[("mlp.up_proj", 2)] == pytest.approx(0.03) and outside == {"lm_head": 0.5}


def test_format_bytes():
    assert format_bytes(3 * 2**20) == "3.0 MiB"
    assert format_bytes(3 * 2**30) == "3.00 GiB"


def test_eval_jsonl_keeps_the_output_verifiable(output):
    # eval.jsonl and report.html sit beside the weights: the output must still load verified
    build_report([output], samples=False)
    assert (output / EVAL_RECORDS).exists() and (output / "report.html").exists()
    anyquant.load(output)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "anyquant.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def test_report_cli(output, tmp_path):
    p = _cli("report", output, "--no-samples", "--out", tmp_path / "r.html")
    assert p.returncode == 0, p.stderr
    assert f"report: {tmp_path / 'r.html'}" in p.stdout
    parse((tmp_path / "r.html").read_text())


def test_report_cli_refuses_what_is_not_an_output(tiny_llama, tmp_path):
    p = _cli("report", tiny_llama)
    assert p.returncode == 2 and "no anyquant.json" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    p = _cli("report", tiny_llama, "--out", tmp_path / "r.pdf")
    assert p.returncode == 2 and "Traceback" not in p.stderr


def test_eval_lines_are_formatted_for_people():
    data = {"target": "out/x", "perplexity": 29.206068857604194, "baseline_perplexity": 27.5,
            "kl_divergence": 0.0412345, "top1_agreement": 0.91234, "tokens": 16383,
            "size_on_disk_bytes": 120_123_456, "peak_memory_eval_bytes": 3 * 2**30, "bits_per_weight": 4.1256}
    text = "\n".join(eval_lines(data))
    for want in ("29.21", "27.50", "0.0412", "91.23%", "16,383", "114.6 MiB", "3.00 GiB", "4.13"):
        assert want in text, (want, text)
    assert "29.206068857604194" not in text and "120123456" not in text


def test_quantize_with_report_cli(tiny_llama, tmp_path):
    out = tmp_path / "q"
    p = _cli("quantize", tiny_llama, "--method", "int8", "--out", out, "--report")
    assert p.returncode == 0, p.stderr
    assert f"report: {out / 'report.html'}" in p.stdout and "anyquant eval" in p.stdout
    page = (out / "report.html").read_text()
    text = " ".join(parse(page).text)
    assert "--method int8" in text and "--report" in text  # the exact command, recorded in anyquant.json
    assert "anyquant eval DIR --report" in text  # not evaluated yet: says how
    anyquant.load(out)  # report.html beside the weights leaves the output verifiable
