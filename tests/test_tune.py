"""Block-output tuning (calib.tune) after gptq / awq: lowers the block's output error, and what
is saved is what was scored."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import anyquant
from anyquant import primitives as P
from anyquant.calib.tune import _TunableInt4
from anyquant.runtime.int4_linear import Int4Linear
from tests.conftest import assert_stock_matches

CALIB_SEQ = 40


@pytest.fixture(scope="module")
def calib():
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, 512, (8, CALIB_SEQ), generator=g)


def test_tunable_at_start_is_the_int4_layer():
    """With multipliers 1 and offsets 0 the differentiable weight is the stored one, exactly."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 192, generator=g)
    lin = torch.nn.Linear(192, 48)
    lin.weight.data.copy_(w)
    q = Int4Linear.from_float(lin, 64, dtype=torch.float32)
    t = _TunableInt4(q, rounding=True)
    torch.testing.assert_close(t.weight(), q.dequantized_weight(), rtol=0, atol=0)
    x = torch.randn(3, 192, generator=g)
    torch.testing.assert_close(t(x), q(x), rtol=1e-6, atol=1e-6)
    frozen = t.frozen(torch.float32)
    assert torch.equal(frozen.codes(), q.codes()) and torch.equal(frozen.weight_scale, q.weight_scale)


def test_tunable_rounding_moves_codes_at_most_one_step():
    lin = torch.nn.Linear(64, 8)
    q = Int4Linear.from_float(lin, 32, dtype=torch.float32)
    t = _TunableInt4(q, rounding=True)
    with torch.no_grad():
        t.offset.fill_(0.9)  # every code one step up, clamped at the top of the range
    moved = t.frozen(torch.float32).codes().int()
    qmin, qmax = P.qrange(4)
    assert torch.equal(moved, (q.codes().int() + 1).clamp(qmin, qmax))


@pytest.mark.parametrize("method,target", [("gptq", "block"), ("awq", "block"), ("gptq", "model")])
def test_tuning_lowers_block_error_and_saves_what_it_scored(tiny_llama, calib, ids, tmp_path, method, target):
    opts = dict(progress=False, calib=calib, checkpoint_dir=None, n_samples=8, seq_len=CALIB_SEQ)
    plain = anyquant.quantize(str(tiny_llama), method, **opts)
    tuned = anyquant.quantize(str(tiny_llama), method, tune_steps=40, tune_target=target, **opts)
    blocks = tuned.report["calibration"]["blocks"]
    for i, b in enumerate(blocks):
        t = b["tune"]
        # Measured on this model: gptq 0.081 -> 0.063 (block 0); every block improves by 10-25%.
        assert t["kept"] and t["output_error_after"] < 0.95 * t["output_error_before"], t
        if target == "block" or i == 0:  # block 0's inputs are the float model's either way
            assert b["output_error"] == pytest.approx(t["output_error_after"], rel=1e-6)
    # the first block sees the same inputs either way: the tuned one ends lower than the plain one
    assert blocks[0]["output_error"] < plain.report["calibration"]["blocks"][0]["output_error"]
    path = anyquant.save(tuned, tmp_path / method)
    torch.testing.assert_close(anyquant.load(path)(ids).logits, tuned.model(ids).logits, rtol=0, atol=0)
    assert_stock_matches(AutoModelForCausalLM.from_pretrained(path), tuned.model, ids, method)


def test_tune_options_are_checked():
    from anyquant.config import make_config
    from anyquant.errors import AnyquantError

    assert make_config("awq").tune_steps == 0 and make_config("gptq").tune_target == "model"
    for bad in ({"tune_target": "float"}, {"tune_steps": -1}, {"tune_lr": 0.0}, {"tune_sequences": 0}):
        with pytest.raises(AnyquantError, match="tune"):
            make_config("gptq", **bad)
