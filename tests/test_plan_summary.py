"""`anyquant plan` at 80 columns: repeated blocks grouped, exceptions one per line, notes collapsed."""

from __future__ import annotations

from anyquant.planning.plan import KEEP, QUANTIZE, Decision, Plan
from anyquant.planning.summary import collapse_notes, summarize


def _lin(name, action=QUANTIZE, g=64, code="quantize"):
    return Decision(name, "linear", "language model", action, "int4" if action == QUANTIZE else None, "float32",
                    code, "why", {"group_size": g} if action == QUANTIZE else {}, [64, 64])


def test_blocks_grouped_and_exceptions_listed():
    ds = [_lin(f"model.layers.{i}.{p}") for i in range(30) for p in ("q_proj", "k_proj", "mlp.down_proj")]
    ds[5] = _lin("model.layers.1.mlp.down_proj", KEEP, code="weight_read_outside_forward")
    ds.append(_lin("lm_head", KEEP, code="output_head"))
    ds.append(Decision("model.norm", "norm", "language model", KEEP, None, "float32", "not_linear", "norm"))
    lines = summarize(Plan("int4", {"group_size": 64}, "float32", ds, ["a.b: not scaled: x"] * 3))
    assert "model.layers.0–29 × 3 Linears: int4 g64" in lines
    assert any(line.startswith("  model.layers.1.mlp.down_proj: keep (weight_read_outside_forward)") for line in lines)
    assert any(line.startswith("  lm_head: keep (output_head)") for line in lines)
    assert "not quantized (not Linear layers): norm 1" in lines
    assert "89 quantized, 3 kept" in lines
    assert max(len(line) for line in lines if not line.startswith("  ")) <= 80
    assert [line for line in lines if line.startswith("note:")] == ["note: a.b: not scaled: x (×3)"]


def test_collapse_notes_counts_same_reason_for_different_modules():
    notes = [f"model.layers.{i}.mlp.up_proj/model.layers.{i}.mlp.gate_proj: not scaled: no producer" for i in range(30)]
    notes.append("int4: group size 96 instead of 128")
    out = collapse_notes(notes)
    assert out == ["model.layers.0.mlp.up_proj/model.layers.0.mlp.gate_proj and 29 more: not scaled: no producer",
                   "int4: group size 96 instead of 128"]
