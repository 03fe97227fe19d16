"""Block-output tuning (calib.tune) after gptq / awq: lowers the block's output error, and what
is saved is what was scored."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import anyquant
from anyquant import primitives as P
from anyquant.calib.blocks import relative_error
from anyquant.calib.tune import _TunableInt4, select_for_tuning, split_rows, token_error
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
    # The fit itself, judged on the sequences it trained on (tune_holdout=0): a random tiny
    # model's 8 random sequences do not generalise to held-out ones (see the test below).
    tuned = anyquant.quantize(str(tiny_llama), method, tune_steps=40, tune_target=target, tune_holdout=0, **opts)
    blocks = tuned.report["calibration"]["blocks"]
    for i, b in enumerate(blocks):
        t = b["tune"]
        # Measured on this model, per-token error: every block improves by 10-25%.
        assert t["kept"] and t["judged_on"] == "all sequences", t
        assert t["token_error_after"] < 0.95 * t["token_error_before"], t
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
    for bad in ({"tune_target": "float"}, {"tune_steps": -1}, {"tune_lr": 0.0}, {"tune_sequences": 0},
                {"tune_loss": "mse"}, {"tune_holdout": 0.9}, {"tune_blocks": 0.0}):
        with pytest.raises(AnyquantError, match="tune"):
            make_config("gptq", **bad)


def test_heldout_sequences_decide_what_is_kept(tiny_llama, calib):
    """A tuned block is kept only where its per-token error on the held-out sequences fell;
    otherwise the block is exactly the method's (same output error as without tuning)."""
    opts = dict(progress=False, calib=calib, checkpoint_dir=None, n_samples=8, seq_len=CALIB_SEQ)
    plain = anyquant.quantize(str(tiny_llama), "gptq", tune_target="block", **opts)
    tuned = anyquant.quantize(str(tiny_llama), "gptq", tune_steps=40, tune_target="block", **opts)
    for b, p in zip(tuned.report["calibration"]["blocks"], plain.report["calibration"]["blocks"]):
        t = b["tune"]
        assert t["judged_on"] == "held-out sequences"
        assert t["kept"] == (t["token_error_after"] < t["token_error_before"]), t
        if not t["kept"]:
            assert b["output_error"] == p["output_error"]
        break  # later blocks see different inputs in the two runs once block 0 was kept


def test_split_rows_holds_out_every_fourth_sequence():
    batches = [((torch.zeros(8, 3, 2),), {}), ((torch.zeros(8, 3, 2),), {})]
    train, held = split_rows(batches, 0.25)
    assert [h.tolist() for h in held] == [[3, 7], [3, 7]]
    assert [t.tolist() for t in train] == [[0, 1, 2, 4, 5, 6], [0, 1, 2, 4, 5, 6]]
    train, held = split_rows(batches[:1], 0.0)
    assert held[0].numel() == 0 and train[0].tolist() == list(range(8))
    # 3 sequences: none can be held out and still leave 2 to train on
    train, held = split_rows([((torch.zeros(3, 3, 2),), {})], 0.25)
    assert held[0].numel() == 0 and train[0].numel() == 3


def test_token_error_weighs_every_token_alike():
    """Against a per-token loop in float64; unmoved when one position's target and output are
    both 1024x larger (a BOS-like massive activation), which the plain relative error is not."""
    g = torch.Generator().manual_seed(3)
    t = [torch.randn(2, 5, 16, generator=g) for _ in range(2)]
    o = [x + 0.1 * torch.randn(x.shape, generator=g) for x in t]
    ref = []
    for x, y in zip(t, o):
        for i in range(x.shape[0]):
            for j in range(x.shape[1]):
                ref.append(float(((y[i, j].double() - x[i, j].double()) ** 2).sum() / (x[i, j].double() ** 2).sum()))
    assert token_error(t, o) == pytest.approx((sum(ref) / len(ref)) ** 0.5, rel=1e-12)
    big_t, big_o = [x.clone() for x in t], [x.clone() for x in o]
    big_t[0][0, 0] *= 1024  # a power of two: exact in float32
    big_o[0][0, 0] *= 1024
    assert token_error(big_t, big_o) == pytest.approx(token_error(t, o), rel=1e-12)
    # exact at that massive position: one token's error gone, and the plain relative error, which
    # weighs positions by their norm, sees almost nothing else (measured: 0.004x of before)
    big_o[0][0, 0] = big_t[0][0, 0]
    assert token_error(big_t, big_o) == pytest.approx(((sum(ref) - ref[0]) / len(ref)) ** 0.5, rel=1e-12)
    assert relative_error(big_t, big_o) < 0.05 * relative_error(t, o)
    rows = [torch.tensor([1]), torch.tensor([], dtype=torch.long)]
    only = [r for k, r in enumerate(ref) if k // 5 == 1]
    assert token_error(t, o, rows) == pytest.approx((sum(only) / len(only)) ** 0.5, rel=1e-12)


def test_recommended_method_resolves_and_options_still_win():
    from anyquant.config import RECOMMENDED_METHOD, make_config, resolve_method
    from anyquant.errors import AnyquantError

    method, fields = RECOMMENDED_METHOD
    assert resolve_method(None) == (method, fields) == resolve_method("Recommended")
    cfg = make_config("recommended", n_samples=8)
    assert cfg.method == method and cfg.n_samples == 8
    assert all(getattr(cfg, k) == v for k, v in fields.items())
    assert make_config("recommended", tune_steps=5).tune_steps == 5
    # the plain method keeps its own defaults (no tuning)
    assert make_config(method).tune_steps == 0
    with pytest.raises(AnyquantError, match="recommended"):
        make_config("recomended-typo")


def test_select_for_tuning_takes_the_largest_errors_so_far():
    assert all(select_for_tuning(e, [0.5, 0.9], 1.0) for e in (0.0, 1.0))
    assert select_for_tuning(0.1, [], 0.25)  # the first block: nothing to compare with
    assert not select_for_tuning(0.1, [0.3], 0.5) and select_for_tuning(0.4, [0.3], 0.5)
    # 4 blocks at share 0.5: tuned when at most one earlier block had a larger error
    assert select_for_tuning(0.2, [0.1, 0.3, 0.15], 0.5) and not select_for_tuning(0.2, [0.25, 0.3, 0.1], 0.5)


def test_tune_blocks_tunes_only_the_selected_blocks(calib, tmp_path):
    from tests.conftest import make_tiny_llama

    src = make_tiny_llama(tmp_path / "src", layers=4, seed=3)
    r = anyquant.quantize(str(src), "gptq", progress=False, calib=calib, checkpoint_dir=None, n_samples=8,
                          seq_len=CALIB_SEQ, tune_steps=10, tune_blocks=0.5)
    entries = [b["tune"] for b in r.report["calibration"]["blocks"]]
    errors = [t["error_after_method"] for t in entries]
    for i, t in enumerate(entries):
        assert (t["steps"] == 10) == select_for_tuning(errors[i], errors[:i], 0.5), entries
        assert (t["steps"] == 0) == ("skipped" in t)
    # measured on this model: the blocks' own errors 0.086, 0.035, 0.019, 0.013; only block 0 tuned
    assert entries[0]["steps"] == 10 and any(t["steps"] == 0 for t in entries)
