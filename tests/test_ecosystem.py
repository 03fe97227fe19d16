"""Outputs the rest of the ecosystem can use (issue 19): --version, scheme aliases, per-module
overrides, hub ids, the dtype kept, vLLM's constraints, packed int4 in stock transformers,
LoRA on top, model cards, GGUF export."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import anyquant
from anyquant.config import make_config, resolve_method
from anyquant.errors import AnyquantError
from tests.test_cli import assert_bad_input, run

warnings.filterwarnings("ignore")


# --- 1. --version, scheme aliases, per-module overrides ---------------------------------------

def test_version_flag():
    proc = run("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"anyquant {anyquant.__version__}"


def test_scheme_aliases_map_to_methods():
    assert resolve_method("W4A16") == ("int4", {"symmetric": True})
    assert resolve_method("w8a16") == ("int8", {})
    cfg = make_config("W4A16", group_size=64)
    assert cfg.method == "int4" and cfg.symmetric and cfg.group_size == 64
    assert make_config("W4A16_ASYM").symmetric is False
    assert make_config("W8A16").method == "int8"
    assert make_config("W4A16", symmetric=False).symmetric is False  # an explicit option wins
    with pytest.raises(AnyquantError, match="scheme aliases: W4A16"):
        make_config("W4A8")


def test_unknown_method_lists_aliases(tiny_llama, tmp_path):
    proc = run("quantize", tiny_llama, "-m", "W3A16", "-o", tmp_path / "o")
    assert_bad_input(proc, "unknown method", "W4A16 (= int4, symmetric)", "W8A16 (= int8)")


def test_alias_quantizes_through_api(tiny_llama):
    r = anyquant.quantize(str(tiny_llama), "W4A16", progress=False)
    assert r.config.method == "int4" and r.config.symmetric
    assert r.plan.method == "int4"


def _plan_file(tmp_path, overrides) -> str:
    p = tmp_path / "plan.json"
    p.write_text(json.dumps({"overrides": overrides}))
    return str(p)


def test_override_sets_group_size_per_module(tiny_llama, tmp_path):
    f = _plan_file(tmp_path, {"re:down_proj": {"method": "int4", "group_size": 64}})
    p = anyquant.plan(str(tiny_llama), "W4A16", plan_file=f)
    sizes = {d.name: d.options["group_size"] for d in p.to_quantize()}
    assert sizes["model.layers.0.mlp.down_proj"] == 64
    assert sizes["model.layers.0.mlp.up_proj"] == 128
    assert any("group sizes [64, 128]" in n for n in p.notes)


def test_override_mixed_group_sizes_asymmetric_refused(tiny_llama, tmp_path):
    f = _plan_file(tmp_path, {"re:down_proj": {"group_size": 64}})
    with pytest.raises(AnyquantError, match="mixed group sizes need a symmetric scheme"):
        anyquant.plan(str(tiny_llama), "int4", plan_file=f)


def test_override_other_format_refused(tiny_llama, tmp_path):
    f = _plan_file(tmp_path, {"re:down_proj": {"method": "nf4"}})
    proc = run("plan", tiny_llama, "-m", "int4", "--plan", f)
    assert_bad_input(proc, "nf4 writes bitsandbytes", "int4 writes compressed-tensors", "one output holds one format")


def test_override_same_format_other_method_refused(tiny_llama, tmp_path):
    f = _plan_file(tmp_path, {"re:down_proj": "hqq"})
    with pytest.raises(AnyquantError, match="one run quantizes with one method"):
        anyquant.plan(str(tiny_llama), "int4", plan_file=f)


def test_override_bad_keys_and_group_size(tiny_llama, tmp_path):
    with pytest.raises(AnyquantError, match="takes method, group_size"):
        anyquant.plan(str(tiny_llama), "int4", plan_file=_plan_file(tmp_path, {"re:down_proj": {"bits": 3}}))
    with pytest.raises(AnyquantError, match="positive multiple of 8"):
        anyquant.plan(str(tiny_llama), "int4", plan_file=_plan_file(tmp_path, {"re:down_proj": {"group_size": 12}}))
    with pytest.raises(AnyquantError, match="does not divide"):
        anyquant.plan(str(tiny_llama), "W4A16", plan_file=_plan_file(tmp_path, {"re:down_proj": {"group_size": 48}}))
    with pytest.raises(AnyquantError, match="group_size applies to int4-family"):
        anyquant.plan(str(tiny_llama), "nf4", plan_file=_plan_file(tmp_path, {"re:down_proj": {"group_size": 64}}))


# --- 2. SOURCE as a Hugging Face hub id ----------------------------------------------------------

def _hub_cache(tmp_path, tiny_llama, repo="acme/tiny-llama", rev="0123456789abcdef0123456789abcdef01234567"):
    """The layout huggingface_hub writes: blobs named by hash, snapshot files linking to them,
    refs/main naming the snapshot's revision."""
    import hashlib
    import os

    root = tmp_path / "hub"
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    snap = repo_dir / "snapshots" / rev
    (repo_dir / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(rev)
    for f in tiny_llama.iterdir():
        data = f.read_bytes()
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snap), snap / f.name)
    return root, snap


def test_hub_id_resolved_from_cache(tiny_llama, tmp_path, monkeypatch):
    from anyquant.model.load import resolve_source

    root, snap = _hub_cache(tmp_path, tiny_llama)
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    assert resolve_source("acme/tiny-llama") == snap
    r = anyquant.quantize("acme/tiny-llama", "int4", progress=False)
    out = anyquant.save(r, tmp_path / "out")
    assert anyquant.load(out) is not None
    proc = run("plan", "acme/tiny-llama", "-m", "nf4", cwd=tmp_path)  # the CLI goes the same way
    assert proc.returncode == 0, proc.stderr


def test_hub_id_offline_and_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AnyquantError, match="not in the Hugging Face cache .* HF_HUB_OFFLINE is set"):
        anyquant.plan("acme/nothing-here", "nf4")


def test_hub_id_downloaded_when_online(tiny_llama, tmp_path, monkeypatch):
    """Online, a cache miss downloads (simulated: the test machine reaches no hub)."""
    import huggingface_hub

    from anyquant.model.load import resolve_source

    calls = []
    real = huggingface_hub.snapshot_download

    def fake(**kw):
        calls.append(kw)
        if kw.get("local_files_only"):
            return real(**kw)
        _hub_cache(tmp_path, tiny_llama, repo=kw["repo_id"])
        return real(**{**kw, "local_files_only": True})

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.chdir(tmp_path)
    path = resolve_source("acme/fresh")
    assert (path / "config.json").is_file()
    assert [c.get("local_files_only", False) for c in calls] == [True, False]
    assert "*.gguf" in calls[1]["ignore_patterns"]


# --- 3. the source's dtype kept; compute dtype for the target device ------------------------------

@pytest.fixture(scope="module")
def tiny_bf16(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from tests.conftest import make_tiny_llama

    base = make_tiny_llama(tmp_path_factory.mktemp("m") / "f32")
    out = tmp_path_factory.mktemp("m") / "bf16"
    AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).save_pretrained(out)
    return out


def _stored_dtypes(out) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        return {k: str(f.get_slice(k).get_dtype()) for k in f.keys()}


def test_bf16_source_on_cpu_keeps_bf16(tiny_bf16, tmp_path):
    proc = run("quantize", tiny_bf16, "-m", "nf4", "-o", tmp_path / "nf4")
    assert proc.returncode == 0, proc.stderr
    assert "compute dtype bfloat16" in proc.stdout and "source's bfloat16 is kept" in proc.stdout, proc.stdout
    cfg = json.loads((tmp_path / "nf4" / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16"
    assert cfg["quantization_config"]["bnb_4bit_compute_dtype"] == "bfloat16"
    dt = _stored_dtypes(tmp_path / "nf4")
    assert dt["model.embed_tokens.weight"] == "BF16" and dt["model.norm.weight"] == "BF16"
    m = json.loads((tmp_path / "nf4" / "anyquant.json").read_text())
    assert m["plan"]["compute_dtype"] == "bfloat16"


def test_target_cpu_computes_in_float32(tiny_bf16):
    r = anyquant.quantize(str(tiny_bf16), "int4", target="cpu", progress=False)
    assert r.plan.compute_dtype == "float32"
    r = anyquant.quantize(str(tiny_bf16), "int4", progress=False)
    assert r.plan.compute_dtype == "bfloat16"
    assert r.model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert any("source's bfloat16 is kept" in n for n in r.notes)


def test_target_cuda_on_float32_source_and_bad_target(tiny_llama, tmp_path):
    p = anyquant.plan(str(tiny_llama), "nf4", target="cuda")
    assert p.compute_dtype == "float32"  # the model declares float32: auto keeps it, on a GPU too
    assert any("--target cuda" in n for n in p.notes)
    assert_bad_input(run("quantize", tiny_llama, "-m", "nf4", "--target", "tpu", "-o", tmp_path / "o"),
                     "--target tpu", "auto, cpu, cuda")


def test_doctor_says_when_it_changes_the_users_dtype(tiny_llama):
    from anyquant.diagnosis import print_report

    data = anyquant.doctor(str(tiny_llama), {"load_in_4bit": True, "bnb_4bit_compute_dtype": "float16"})
    assert data["bnb_config"]["bnb_4bit_compute_dtype"] == "float32"
    assert data["changes"] and "your float16 becomes float32" in data["changes"][0]
    lines: list[str] = []
    print_report(data, lines.append)
    assert any("changes your settings" in line for line in lines)
    assert any(line.strip().startswith("changed: bnb_4bit_compute_dtype") for line in lines)


# --- 4. vLLM-servable int4 outputs ---------------------------------------------------------------

def test_group_size_prefers_vllm_sizes():
    from anyquant.methods.rtn import fit_group_size

    assert fit_group_size([576, 1536], 128) == 64  # was 96: vLLM's kernels take -1, 32, 64, 128
    assert fit_group_size(4096, 128) == 128
    assert fit_group_size(576, 96) == 96  # asked for explicitly: honoured (and the plan says vLLM refuses it)
    assert fit_group_size(96, 128) == 32


def test_vllm_compatible(tiny_llama_576, tiny_bf16, tmp_path):
    from anyquant.formats.vllm import vllm_compatible

    r = anyquant.quantize(str(tiny_llama_576), "int4", progress=False)
    assert {d.options["group_size"] for d in r.plan.to_quantize()} == {64}
    out = anyquant.save(r, tmp_path / "f32")
    assert vllm_compatible(out) == []  # a float32 source: vLLM's dtype=auto serves it in 16 bits
    r = anyquant.quantize(str(tiny_bf16), "W4A16", progress=False)
    assert vllm_compatible(anyquant.save(r, tmp_path / "bf16")) == []
    r = anyquant.quantize(str(tiny_bf16), "int4", progress=False)  # asymmetric: zero points vLLM reads
    assert vllm_compatible(anyquant.save(r, tmp_path / "bf16-asym")) == []
    r = anyquant.quantize(str(tiny_llama_576), "int4", group_size=96, progress=False)
    assert any("vLLM refuses it" in n for n in r.plan.notes)
    problems = vllm_compatible(anyquant.save(r, tmp_path / "g96"))
    assert any("group size 96" in p for p in problems)
    r = anyquant.quantize(str(tiny_bf16), "nf4", progress=False)
    assert vllm_compatible(anyquant.save(r, tmp_path / "nf4")) == []


# --- 5. packed int4 in stock transformers ----------------------------------------------------------

def _bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def test_symmetric_int4_loads_packed_in_stock_transformers(tiny_llama, tmp_path, ids):
    """Symmetric (W4A16): transformers + compressed-tensors keep the packed weights (4-bit in
    memory). Asymmetric: transformers (5.x, compressed-tensors 0.20) builds the zero point
    unpacked [out, groups] and refuses the packed [out/8, groups] tensor (size mismatch), so
    those outputs ask it to dequantize at load ("dequantize": true) and hold float weights.
    Packed holds until the first forward: transformers 5.25 with compressed-tensors 0.20 then
    decompresses each layer in place ("dequantize=False leaves them compressed and lets
    compressed-tensors decompress them on the first forward pass", its quantizer's docstring)."""
    from transformers import AutoModelForCausalLM

    r = anyquant.quantize(str(tiny_llama), "W4A16", progress=False)
    out = anyquant.save(r, tmp_path / "sym")
    assert "dequantize" not in json.loads((out / "config.json").read_text())["quantization_config"]
    packed = AutoModelForCausalLM.from_pretrained(out)
    layer = packed.model.layers[0].mlp.down_proj
    assert layer.weight_packed.dtype == torch.int32 and not hasattr(layer, "weight_zero_point")
    at_load = _bytes(packed)
    r = anyquant.quantize(str(tiny_llama), "int4", progress=False)
    dense = AutoModelForCausalLM.from_pretrained(anyquant.save(r, tmp_path / "asym"))
    assert at_load < 0.3 * _bytes(dense)  # measured on this tiny Llama: 1.19 MB against 5.25 MB
    ref = anyquant.load(out)
    torch.testing.assert_close(packed(ids).logits, ref(ids).logits, rtol=0, atol=1e-5)
    assert _bytes(packed) > 0.9 * _bytes(dense)  # decompressed by its first forward (see above)


# --- 7. model card ---------------------------------------------------------------------------------

def test_every_output_has_a_model_card(tiny_llama, tmp_path):
    for method in ("nf4", "int4"):
        r = anyquant.quantize(str(tiny_llama), method, progress=False)
        out = anyquant.save(r, tmp_path / method)
        card = (out / "README.md").read_text()
        assert f"with **{method}**" in card
        assert "probe logits relative error" in card and f"{r.report['probe_logits_relative_error']:.4f}" in card
        assert "anyquant.load(" in card and "AutoModelForCausalLM.from_pretrained(" in card and "vllm serve" in card
        assert "14 Linear layers quantized" in card
        anyquant.load(out)  # the card is sealed with the other files: verification passes


# --- 6. LoRA (peft) on top of the outputs ---------------------------------------------------------

@pytest.mark.parametrize("method", ["int4", "nf4"])
def test_lora_step_and_adapter_reload(method, tiny_llama, tmp_path, ids):
    pytest.importorskip("peft")
    from peft import get_peft_model

    from anyquant.formats.lora import load_adapter, lora_config

    r = anyquant.quantize(str(tiny_llama), method, progress=False)
    out = anyquant.save(r, tmp_path / method)
    model = get_peft_model(anyquant.load(out, fuse=False), lora_config(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                            init_lora_weights=False))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.SGD(trainable, lr=1e-2)
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)
    opt.step()
    model.eval()
    with torch.no_grad():
        want = model(ids).logits
    model.save_pretrained(tmp_path / "adapter")
    again = load_adapter(anyquant.load(out, fuse=False), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, want, rtol=0, atol=1e-5)
    if method == "int4":
        with pytest.raises(AnyquantError, match="would requantize"):
            again.merge_and_unload()
