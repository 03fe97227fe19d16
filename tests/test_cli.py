"""CLI: exit 0 on success; exit 2 with one line and no traceback for bad input; nothing written."""

import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file, save_file

from tests.conftest import make_tiny_llama

ANYQUANT = [sys.executable, "-m", "anyquant.cli"]


def run(*args, cwd=None):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([*ANYQUANT, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def assert_bad_input(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_quantize_plan_inspect_ok(tiny_llama, tmp_path):
    out = tmp_path / "q"
    p = run("quantize", tiny_llama, "--method", "int4", "--out", out)
    assert p.returncode == 0, p.stderr
    assert (out / "anyquant.json").exists()
    p = run("plan", tiny_llama, "--method", "nf4", "--json")
    assert p.returncode == 0, p.stderr
    plan = json.loads(p.stdout)
    assert {d["action"] for d in plan["decisions"]} == {"quantize", "keep"}
    p = run("inspect", tiny_llama, "--json")
    assert p.returncode == 0, p.stderr
    data = json.loads(p.stdout)
    assert data["tied"] == [["lm_head.weight", "model.embed_tokens.weight"]]
    assert set(data["estimated_size"]) >= {"nf4", "int8", "int4"}
    assert data["estimated_size"]["nf4"]["bytes"] < data["estimated_size"]["int8"]["bytes"]


def test_missing_path(tmp_path):
    assert_bad_input(run("quantize", tmp_path / "nope", "--method", "nf4", "--out", tmp_path / "o"), "nope", "no such")
    assert not (tmp_path / "o").exists()


def test_not_a_model_dir(tmp_path):
    (tmp_path / "src").mkdir()
    assert_bad_input(run("inspect", tmp_path / "src"), "config.json")


def test_unknown_method(tiny_llama, tmp_path):
    assert_bad_input(run("quantize", tiny_llama, "--method", "int3", "--out", tmp_path / "o"),
                     "int3", "known methods: awq, fp4, gptq, hqq, int4, int8, nf4")
    assert not (tmp_path / "o").exists()


def test_corrupt_safetensors(tmp_path):
    src = make_tiny_llama(tmp_path / "src", hidden=64, inter=128, layers=1)
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert_bad_input(run("quantize", src, "--method", "nf4", "--out", tmp_path / "o"), "model.safetensors", "corrupt")
    assert not (tmp_path / "o").exists()


def test_nan_weights(tmp_path):
    src = make_tiny_llama(tmp_path / "src", hidden=64, inter=128, layers=1)
    sd = load_file(src / "model.safetensors")
    sd["model.layers.0.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    assert_bad_input(run("quantize", src, "--method", "int8", "--out", tmp_path / "o"),
                     "model.layers.0.mlp.up_proj.weight", "NaN")
    assert not (tmp_path / "o").exists()


def test_output_inside_source(tiny_llama):
    before = sorted(p.name for p in tiny_llama.iterdir())
    assert_bad_input(run("quantize", tiny_llama, "--method", "nf4", "--out", tiny_llama / "q"), "inside the source")
    assert sorted(p.name for p in tiny_llama.iterdir()) == before


def test_existing_output_needs_force(tiny_llama, tmp_path):
    (tmp_path / "o").mkdir()
    assert_bad_input(run("quantize", tiny_llama, "--method", "nf4", "--out", tmp_path / "o"), "--force")


def test_uint8_checkpoint_refused(tmp_path):
    """F5: transformers silently loads uint8 Linear weights as floats 0..255; anyquant refuses."""
    from transformers import AutoModelForCausalLM

    src = make_tiny_llama(tmp_path / "src", hidden=64, inter=128, layers=1)
    sd = load_file(src / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    sd[name] = torch.randint(0, 255, sd[name].shape, dtype=torch.uint8)
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    plain = AutoModelForCausalLM.from_pretrained(src)  # the failure: loads without a word
    assert plain.model.layers[0].self_attn.q_proj.weight.max() > 100
    assert_bad_input(run("quantize", src, "--method", "nf4", "--out", tmp_path / "o"), name, "U8", "already quantized")
    assert_bad_input(run("quantize", src, "--method", "nf4", "--out", tmp_path / "o", "--requantize"),
                     "cannot dequantize", name)
    assert not (tmp_path / "o").exists()


def test_group_size_for_wrong_method(tiny_llama, tmp_path):
    assert_bad_input(run("quantize", tiny_llama, "--method", "nf4", "--group-size", "64", "--out", tmp_path / "o"),
                     "--group-size")


def test_eval_json(tiny_llama, tmp_path):
    out = tmp_path / "q"
    assert run("quantize", tiny_llama, "--method", "int8", "--out", out).returncode == 0
    text = tmp_path / "t.txt"
    text.write_text(" ".join(str(i) for i in range(3000)))
    # tiny random models have no tokenizer: use a plain one built from the default? Not offline-safe;
    # so the eval command must say what is missing.
    p = run("eval", out, "--text", text, "--json")
    assert_bad_input(p, "tokenizer")


def test_method_flag_that_does_not_apply(tiny_llama, tmp_path):
    assert_bad_input(run("quantize", tiny_llama, "--method", "int4", "--act-order", "--out", tmp_path / "o"),
                     "--act-order does not apply to int4", "gptq")
    assert_bad_input(run("quantize", tiny_llama, "--method", "nf4", "--group-size", "64", "--out", tmp_path / "o"),
                     "--group-size does not apply to nf4", "awq, gptq, hqq, int4")
    assert_bad_input(run("quantize", tiny_llama, "--method", "awq", "--awq-scales", "--out", tmp_path / "o"),
                     "--awq-scales does not apply to awq", "gptq")
    assert_bad_input(run("quantize", tiny_llama, "--method", "hqq", "--tune-steps", "10", "--out", tmp_path / "o"),
                     "--tune-steps does not apply to hqq", "awq, gptq")
    assert not (tmp_path / "o").exists()


def test_quantize_without_method_runs_the_recommended_method(tmp_path):
    """No --method: the recommended method (config.RECOMMENDED_METHOD), said on stdout and
    recorded in anyquant.json; an option given on the command line still wins."""
    import shutil

    from anyquant.config import RECOMMENDED_METHOD
    from anyquant.model.default import default_model_dir

    src = make_tiny_llama(tmp_path / "src", hidden=256, inter=512, layers=1, vocab=49152)
    for f in default_model_dir().iterdir():  # a real tokenizer: the method calibrates on text
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy2(f, src / f.name)
    out = tmp_path / "q"
    env = dict(os.environ, ANYQUANT_CACHE=str(tmp_path / "cache"), PYTHONWARNINGS="ignore")
    p = subprocess.run([*ANYQUANT, "quantize", str(src), "--out", str(out), "--n-samples", "4", "--seq-len", "16",
                        "--tune-steps", "3", "--no-verify-save"], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "no --method: recommended = gptq" in p.stdout
    cfg = json.loads((out / "anyquant.json").read_text())["config"]
    method, fields = RECOMMENDED_METHOD
    assert cfg["method"] == method and cfg["tune_steps"] == 3
    assert {k: cfg[k] for k in fields if k != "tune_steps"} == {k: v for k, v in fields.items() if k != "tune_steps"}
