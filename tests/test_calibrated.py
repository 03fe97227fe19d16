"""hqq, awq, gptq on tiny random Llamas: save/reload, error vs RTN, guard, resume."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import anyquant
from anyquant.calib import blocks as calib_blocks
from anyquant.calib import runner
from tests.conftest import assert_stock_matches, make_tiny_llama

METHODS = ["hqq", "awq", "gptq"]
CALIB_SEQ = 40  # != the probe's 32 and the test ids' 24, so hooks can tell calibration apart


@pytest.fixture(scope="module")
def outlier_llama(tmp_path_factory):
    """Tiny Llama whose norms give a few input channels large activations, as trained LLMs have:
    that is what AWQ's scaling is for (on a plain random model mean|x| is flat)."""
    path = tmp_path_factory.mktemp("models") / "tiny-llama-outliers"
    make_tiny_llama(path, layers=2)
    m = AutoModelForCausalLM.from_pretrained(path)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in m.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                idx = torch.randperm(norm.weight.numel(), generator=g)[:8]
                norm.weight[idx] *= 20
    m.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def calib():
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, 512, (8, CALIB_SEQ), generator=g)


@pytest.fixture(scope="module")
def saved(outlier_llama, calib, tmp_path_factory):
    root = tmp_path_factory.mktemp("outs")
    out = {}
    for m in METHODS:
        opts = {} if m == "hqq" else {"n_samples": 8, "seq_len": CALIB_SEQ}
        r = anyquant.quantize(str(outlier_llama), m, progress=False, calib=calib, checkpoint_dir=None, **opts)
        out[m] = (r, anyquant.save(r, root / m))
    return out


@pytest.mark.parametrize("method", METHODS)
def test_save_reload_same_logits(saved, method, ids):
    result, path = saved[method]
    ref = result.model(ids).logits
    assert torch.isfinite(ref).all()
    assert result.report["probe_logits_relative_error"] < 0.6  # measured 0.40 (hqq) on this outlier model
    torch.testing.assert_close(anyquant.load(path)(ids).logits, ref, rtol=0, atol=0)
    stock = AutoModelForCausalLM.from_pretrained(path)  # compressed-tensors, no anyquant
    assert_stock_matches(stock, result.model, ids, method)
    m = json.loads((path / "anyquant.json").read_text())
    assert m["method"] == method


@pytest.mark.parametrize("method,factor", [("gptq", 0.7), ("awq", 0.9)])
def test_block_output_error_below_rtn(saved, method, factor):
    """Measured on the calibration data, block by block (the runner's own before/after)."""
    result, _ = saved[method]
    blocks = result.report["calibration"]["blocks"]
    assert len(blocks) == 2
    for b in blocks:
        assert b["output_error"] < factor * b["output_error_rtn"], b


def test_hqq_weight_error_below_rtn(saved, outlier_llama):
    from anyquant import primitives as P

    float_model = AutoModelForCausalLM.from_pretrained(outlier_llama)
    errs = saved["hqq"][0].report["per_layer_weight_error"]
    for name, e in errs.items():
        w = float_model.get_submodule(name).weight.detach()
        assert e <= P.relative_error(w, P.fake_quantize(w, 4, 128)) + 1e-7, name


def test_probe_finds_shared_inputs_and_producers(outlier_llama):
    m = AutoModelForCausalLM.from_pretrained(outlier_llama)
    name, blocks = calib_blocks.find_blocks(m)
    assert name == "model.layers"
    batches = calib_blocks.capture_inputs(m, blocks[0], torch.randint(0, 512, (2, 16)), 2)
    names = [n for n, mod in blocks[0].named_modules() if isinstance(mod, torch.nn.Linear)]
    p = calib_blocks.probe_block(blocks[0], batches[0], names)
    by = {tuple(g): prod for g, prod in zip(p.groups, p.producers)}
    assert by[("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")] == "input_layernorm"
    assert by[("mlp.gate_proj", "mlp.up_proj")] == "post_attention_layernorm"
    assert by[("self_attn.o_proj",)] is None and by[("mlp.down_proj",)] is None


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_guard_nan_activation_falls_back_to_rtn(outlier_llama, calib, ids, method):
    model = AutoModelForCausalLM.from_pretrained(outlier_llama)

    def inject(mod, args, out):
        if out.shape[1] == CALIB_SEQ:  # calibration batches only
            out = out.clone()
            out[0, 0, 0] = float("nan")
            return out

    h = model.model.layers[1].mlp.act_fn.register_forward_hook(inject)
    try:
        r = anyquant.quantize(model, method, progress=False, calib=calib, n_samples=8, seq_len=CALIB_SEQ)
    finally:
        h.remove()
    fbs = r.report["calibration"]["fallbacks"]
    assert [f["layer"] for f in fbs] == ["model.layers.1.mlp.down_proj"]
    assert "non-finite" in fbs[0]["reason"]
    assert any("model.layers.1.mlp.down_proj: fell back to round-to-nearest" in n for n in r.notes)
    assert torch.isfinite(r.model(ids).logits).all()
    for mod in r.model.modules():
        for t in list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False)):
            if t.is_floating_point():
                assert torch.isfinite(t).all()


@pytest.mark.parametrize("extra", [{}, {"tune_steps": 10, "tune_target": "model"}], ids=["plain", "tuned-to-model"])
def test_resume_after_interruption_gives_same_result(tmp_path, calib, ids, monkeypatch, extra):
    """With tune_target="model" the later blocks' targets come from the float model's own
    trajectory, which a resumed run must rebuild from the blocks it loads."""
    src = make_tiny_llama(tmp_path / "src", layers=3, seed=2)
    ck = tmp_path / "ck"
    opts = dict(progress=False, calib=calib, n_samples=8, seq_len=CALIB_SEQ, **extra)
    full = anyquant.quantize(str(src), "gptq", checkpoint_dir=None, **opts)

    real_save = runner.save_block

    def save_then_die(directory, i, block, entry):
        real_save(directory, i, block, entry)
        if i == 0:
            raise KeyboardInterrupt("simulated kill after block 1")

    monkeypatch.setattr(runner, "save_block", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        anyquant.quantize(str(src), "gptq", checkpoint_dir=ck, **opts)
    monkeypatch.setattr(runner, "save_block", real_save)
    again = anyquant.quantize(str(src), "gptq", checkpoint_dir=ck, **opts)
    cal = again.report["calibration"]
    assert cal["resumed_blocks"] == 1
    assert [b["resumed"] for b in cal["blocks"]] == [True, False, False]
    assert any("resumed 1 finished block" in n for n in again.notes)
    torch.testing.assert_close(again.model(ids).logits, full.model(ids).logits, rtol=0, atol=0)
    # a different config, plan or calibration set is a different key: nothing to resume from
    k = runner.checkpoint_key("fp", {"method": "gptq"}, "float32", [], calib)
    assert k != runner.checkpoint_key("fp", {"method": "gptq", "act_order": True}, "float32", [], calib)
    assert k != runner.checkpoint_key("fp", {"method": "gptq"}, "float32", [], calib[:4])
    assert k != runner.checkpoint_key("fp2", {"method": "gptq"}, "float32", [], calib)


def test_gptq_act_order_group_64(tiny_llama, calib, ids):
    for g, act in ((64, True),):
        r = anyquant.quantize(str(tiny_llama), "gptq", progress=False, calib=calib, checkpoint_dir=None,
                              n_samples=8, seq_len=CALIB_SEQ, group_size=g, act_order=act)
        assert {d.options["group_size"] for d in r.plan.to_quantize()} == {g}
        assert torch.isfinite(r.model(ids).logits).all()
        for b in r.report["calibration"]["blocks"]:
            assert b["output_error"] < b["output_error_rtn"]


def test_configs():
    from anyquant.config import MethodConfig, make_config
    from anyquant.errors import AnyquantError

    for m in METHODS:
        c = make_config(m, group_size=64)
        assert MethodConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    assert make_config("gptq").calibrated and make_config("awq").calibrated and not make_config("hqq").calibrated
    with pytest.raises(AnyquantError, match="symmetric"):
        make_config("hqq", symmetric=True)
    with pytest.raises(AnyquantError, match="damp"):
        make_config("gptq", damp=2.0)
    with pytest.raises(AnyquantError, match="refits"):
        make_config("gptq", refits=11)


@pytest.mark.slow
def test_cli_kill9_then_same_command_resumes_and_gives_the_same_output(tmp_path):
    """The issue's scenario, literally: `anyquant quantize --method gptq` killed with SIGKILL after
    its first block's checkpoint, then the same command again: it resumes from the checkpoint and
    writes tensors identical to an uninterrupted run's."""
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    from anyquant.model.default import default_model_dir

    src = make_tiny_llama(tmp_path / "src", hidden=256, inter=512, layers=4, vocab=49152)
    for f in default_model_dir().iterdir():  # a real tokenizer, so the CLI calibrates on real text
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy2(f, src / f.name)

    def command(out):
        return [sys.executable, "-m", "anyquant.cli", "quantize", str(src), "--method", "gptq",
                "--n-samples", "8", "--seq-len", "128", "--out", str(out)]

    env = dict(os.environ, ANYQUANT_CACHE=str(tmp_path / "cache"), PYTHONWARNINGS="ignore")
    checkpoints = tmp_path / "cache" / "calib-checkpoints"
    proc = subprocess.Popen(command(tmp_path / "out"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list(checkpoints.glob("*/block_0000.json")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before its first block's checkpoint could be seen"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = len(list(checkpoints.glob("*/block_*.json")))
    assert 1 <= finished < 4 and not (tmp_path / "out").exists()

    again = subprocess.run(command(tmp_path / "out"), env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert f"resumed {finished} finished block(s)" in again.stdout
    assert not list(checkpoints.glob("*/block_*.json"))  # removed once the run completed

    clean_env = dict(env, ANYQUANT_CACHE=str(tmp_path / "cache-clean"))
    ref = subprocess.run(command(tmp_path / "ref"), env=clean_env, capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr
    got, want = load_file(str(tmp_path / "out" / "model.safetensors")), load_file(str(tmp_path / "ref" / "model.safetensors"))
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_awq_scales_down_proj_through_up_proj_and_keeps_the_block_function(outlier_llama, calib):
    """down_proj reads act(gate) * up, made by no module: the fold target is found by trying the
    block's Linears with as many outputs (up_proj passes; gate_proj cannot: silu is not linear)."""
    from anyquant.config import make_config
    from anyquant.methods.awq import awq_scale_block

    model = AutoModelForCausalLM.from_pretrained(outlier_llama).eval()
    block = model.model.layers[0]
    batches = calib_blocks.capture_inputs(model, block, calib, 8)
    before = calib_blocks.block_outputs(block, batches)
    up_before = block.mlp.up_proj.weight.detach().clone()
    linears = {n: {} for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    ctx = runner.BlockContext(block, "model.layers.0", linears, batches, make_config("awq", group_size=64),
                              torch.float32)
    _, _, scaled = awq_scale_block(ctx, 20)
    assert "mlp.down_proj" in scaled, ctx.notes
    s = scaled["mlp.down_proj"]
    s_in = scaled.get("mlp.up_proj", torch.ones(up_before.shape[1]))  # its own inputs' scale, as gate/up reader
    torch.testing.assert_close(block.mlp.up_proj.weight, up_before * s_in.unsqueeze(0) / s.unsqueeze(1),
                               rtol=1e-5, atol=1e-7)
    # Measured 2e-7 relative (float32 rounding of the folded weights).
    assert calib_blocks.relative_error(before, calib_blocks.block_outputs(block, batches)) < 1e-5
    # This tiny Llama has grouped-query attention (4 heads, 2 kv heads): v_proj has half o_proj's
    # inputs, so o_proj cannot be scaled, and the report says what was tried.
    assert any(n.startswith("self_attn.o_proj: not scaled") and "tried:" in n for n in ctx.notes), ctx.notes


@pytest.mark.parametrize("opts", [{"float_targets": True}, {"refits": 1}])
def test_gptq_options_run_and_beat_rtn_per_block(outlier_llama, calib, ids, opts):
    r = anyquant.quantize(str(outlier_llama), "gptq", progress=False, calib=calib, checkpoint_dir=None,
                          n_samples=8, seq_len=CALIB_SEQ, **opts)
    assert torch.isfinite(r.model(ids).logits).all()
    assert not r.report["calibration"]["fallbacks"]
    for b in r.report["calibration"]["blocks"]:
        assert b["output_error"] < b["output_error_rtn"], b


def test_awq_folds_into_gemma_norms_that_compute_one_plus_weight(calib):
    """Gemma's RMSNorm multiplies by (1 + weight): 1/s goes in as (1 + weight) / s - 1, found by
    trying both forms under the fold check (before, every such group was left unscaled)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from anyquant.config import make_config
    from anyquant.methods.awq import awq_scale_block

    cfg = Gemma3TextConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=32, max_position_embeddings=256)
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(cfg).eval()
    block = model.model.layers[0]
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # a few large channels, as trained models have (AWQ has nothing to do on flat ones)
        for norm in (block.input_layernorm, block.pre_feedforward_layernorm):
            norm.weight[torch.randperm(norm.weight.numel(), generator=g)[:8]] = 19.0
    batches = calib_blocks.capture_inputs(model, block, calib, 8)
    before = calib_blocks.block_outputs(block, batches)
    linears = {n: {} for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    ctx = runner.BlockContext(block, "model.layers.0", linears, batches, make_config("awq", group_size=64),
                              torch.float32)
    _, _, scaled = awq_scale_block(ctx, 20)
    assert {"self_attn.q_proj", "mlp.gate_proj"} <= set(scaled), ctx.notes
    # Measured 4.6e-7 on Gemma-3-270M's first block (float32 rounding of the folded weights).
    assert calib_blocks.relative_error(before, calib_blocks.block_outputs(block, batches)) < 1e-5


@pytest.mark.parametrize("method,extra", [("gptq", {"tune_steps": 5}), ("awq", {})], ids=["gptq+tune", "awq"])
def test_activations_on_disk_change_nothing(tmp_path, monkeypatch, method, extra):
    """Calibration activations spilled to disk (activations="disk"; "auto" chooses it when
    neither the device nor the host has room) give the same output tensor for tensor as kept on
    the device; they were written (every block's inputs and outputs, and the float model's for
    tuning against it) and the files are gone afterwards."""
    from tests.test_stream import make_sharded_llama, tensors

    monkeypatch.setenv("ANYQUANT_CACHE", str(tmp_path / "cache"))
    src = make_sharded_llama(tmp_path / "src", tie=False, dtype=torch.float32, layers=3)
    ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
    written = []
    append = calib_blocks.Activations.append

    def counting(self, t):
        append(self, t)
        if self.home == "disk":
            written.append(self._items[-1])
    monkeypatch.setattr(calib_blocks.Activations, "append", counting)
    outs = {}
    for home in ("device", "disk"):
        r = anyquant.quantize(str(src), method, progress=False, calib=ids, n_samples=8, seq_len=32,
                              checkpoint_dir=None, activations=home, **extra)
        assert r.report["calibration"]["activations"] == home
        anyquant.save(r, tmp_path / home, verify=False)
        outs[home] = tensors(tmp_path / home)
    assert set(outs["device"]) == set(outs["disk"])
    assert all(torch.equal(outs["device"][k], outs["disk"][k]) for k in outs["device"])
    assert len(written) >= 3 * 2   # 3 blocks' inputs and outputs at least (1 batch each)
    import gc
    gc.collect()
    assert not any(f.exists() for f in written)


def test_spill_home_follows_free_memory(monkeypatch):
    """"auto": the device while four sets of activations fit half of what is free, else disk
    (on a CPU, host memory is the device's)."""
    batch = ((torch.zeros(2, 16, 64),), {})
    need = 4 * 2 * 16 * 64 * 4
    monkeypatch.setattr(calib_blocks, "available_memory_bytes", lambda: 2 * need)
    assert calib_blocks.spill_home("auto", [batch]) == "device"
    monkeypatch.setattr(calib_blocks, "available_memory_bytes", lambda: 2 * need - 1)
    assert calib_blocks.spill_home("auto", [batch]) == "disk"
    assert calib_blocks.spill_home("host", [batch]) == "host"
