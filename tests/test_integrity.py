"""Issue 17, part A: nothing read wrong in silence. A source is read completely or refused, its
fingerprint covers every byte, a resume reuses only intact blocks of the same source, an output
vouches for its files and eval scores it against the model it was made from.

Each fault is built here on tiny models; each case asserts the exit code (2) or AnyquantError,
the one line naming the file or tensor and the fix, and the disk state afterwards: the source
byte-identical, the output complete or absent."""

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import anyquant
from anyquant.calib import checkpoint as calib_checkpoint
from anyquant.calib import runner
from anyquant.errors import AlreadyQuantizedError, AnyquantError
from anyquant.model import integrity
from anyquant.model.load import fingerprint, load_model
from tests.conftest import make_tiny_llama

ANYQUANT = [sys.executable, "-m", "anyquant.cli"]
SMALL = dict(hidden=64, inter=128, layers=1)


def run(*args, cwd=None, env=None):
    env = dict(os.environ, PYTHONWARNINGS="ignore", **(env or {}))
    return subprocess.run([*ANYQUANT, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def one_line(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def snapshot(directory):
    """Every file's sha256, to show a directory byte-identical afterwards."""
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def no_output(parent, name="o"):
    return not (parent / name).exists() and not list(parent.glob(f".{name}.tmp-*"))


def add_tokenizer(path):
    """A word-level tokenizer for the numbers 0..499 (no model hub needed)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{str(i): i + 1 for i in range(500)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]").save_pretrained(path)
    return path


def number_text(tmp_path):
    f = tmp_path / "numbers.txt"
    g = torch.Generator().manual_seed(3)
    f.write_text(" ".join(str(int(i)) for i in torch.randint(0, 500, (3000,), generator=g)))
    return f


# --------------------------------------------------------------------------- 1. complete or refused


def test_tensor_missing_from_checkpoint_is_refused(tmp_path):
    src = make_tiny_llama(tmp_path / "src", **SMALL)
    sd = load_file(src / "model.safetensors")
    del sd["model.layers.0.mlp.up_proj.weight"]  # transformers would fill it with random values
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    before = snapshot(src)
    one_line(run("quantize", src, "--method", "int8", "--out", tmp_path / "o"),
             "model.layers.0.mlp.up_proj.weight", "lacks", "re-download or re-save")
    assert snapshot(src) == before and no_output(tmp_path)


def test_tensor_the_model_has_no_place_for_is_refused(tmp_path):
    src = make_tiny_llama(tmp_path / "src", **SMALL)
    sd = load_file(src / "model.safetensors")
    sd["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(8, 8)
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(AnyquantError, match=r"model\.layers\.0\.mlp\.extra_proj\.weight.*config\.json"):
        load_model(src)


@pytest.mark.parametrize("kind", ["llama-tied", "llama-untied", "gpt2", "qwen2", "opt"])
def test_healthy_checkpoints_have_no_missing_keys(tmp_path, kind):
    """Tied embeddings, recomputed buffers (rotary inv_freq, GPT-2's causal mask) and classes
    with ignorable keys are not gaps."""
    import transformers
    from transformers import AutoModelForCausalLM

    if kind.startswith("llama"):
        path = make_tiny_llama(tmp_path / kind, tie=kind == "llama-tied", **SMALL)
    else:
        cfg = {"gpt2": transformers.GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=128, n_positions=64,
                                               bos_token_id=0, eos_token_id=0),
               "qwen2": transformers.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=128),
               "opt": transformers.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=1, num_attention_heads=4,
                                             vocab_size=128, word_embed_proj_dim=64)}[kind]
        path = tmp_path / kind
        AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    model, _, info = load_model(path)
    assert info.fingerprint.startswith("sha256:") and not info.quantized_tensors


def _as_bin(src, name, dtype=torch.uint8, shards=1):
    """The tiny model's safetensors as pytorch_model.bin (sharded with an index when shards > 1),
    one weight replaced by integer values and no quantization_config."""
    sd = load_file(src / "model.safetensors")
    (src / "model.safetensors").unlink()
    sd[name] = torch.randint(0, 127, sd[name].shape, dtype=dtype)
    if shards == 1:
        torch.save(sd, src / "pytorch_model.bin")
        return
    keys = sorted(sd)
    files = [f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin" for i in range(shards)]
    weight_map = {k: files[i % shards] for i, k in enumerate(keys)}
    for f in files:
        torch.save({k: sd[k] for k in keys if weight_map[k] == f}, src / f)
    (src / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_uint8_weights_in_pytorch_model_bin_are_refused(tmp_path):
    src = make_tiny_llama(tmp_path / "src", **SMALL)
    name = "model.layers.0.self_attn.q_proj.weight"
    _as_bin(src, name)
    before = snapshot(src)
    one_line(run("quantize", src, "--method", "nf4", "--out", tmp_path / "o"),
             name, "U8", "pytorch_model.bin", "already quantized", "--requantize")
    assert snapshot(src) == before and no_output(tmp_path)


@pytest.mark.parametrize("suffix", [".bin", ".pt"])
def test_int8_weights_in_sharded_or_pt_files_are_refused(tmp_path, suffix):
    src = make_tiny_llama(tmp_path / "src", **SMALL)
    name = "model.layers.0.mlp.down_proj.weight"
    if suffix == ".bin":
        _as_bin(src, name, torch.int8, shards=2)
    else:
        sd = load_file(src / "model.safetensors")
        (src / "model.safetensors").unlink()
        sd[name] = sd[name].to(torch.int8)
        torch.save(sd, src / "weights.pt")
    with pytest.raises(AlreadyQuantizedError, match=rf"{name} \(I8, in [\w.-]+{suffix}\)"):
        load_model(src)


def test_missing_shard_is_named(tmp_path):
    src = make_tiny_llama(tmp_path / "src", **SMALL)
    _as_bin(src, "model.norm.weight", torch.float32, shards=2)
    (src / "pytorch_model-00002-of-00002.bin").unlink()
    before = snapshot(src)
    one_line(run("quantize", src, "--method", "int8", "--out", tmp_path / "o"),
             "pytorch_model-00002-of-00002.bin", "missing", "pytorch_model.bin.index.json")
    assert snapshot(src) == before and no_output(tmp_path)


def test_float_pytorch_model_bin_still_loads(tmp_path):
    src = make_tiny_llama(tmp_path / "src", **SMALL)
    _as_bin(src, "model.norm.weight", torch.float32)
    model, _, info = load_model(src)
    assert not info.quantized_tensors and model.model.norm.weight.dtype == torch.float32


class _Payload:
    """Unpickled, it would create the file named in `target`."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-pickle"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, legacy):
    import pickle

    src = make_tiny_llama(tmp_path / "src", **SMALL)
    sd = load_file(src / "model.safetensors")
    (src / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    state = {**sd, "model.norm.weight": _Payload(str(marker))}
    if legacy:
        (src / "pytorch_model.bin").write_bytes(pickle.dumps(state))
    else:
        torch.save(state, src / "pytorch_model.bin")
    before = snapshot(src)
    line = one_line(run("quantize", src, "--method", "int8", "--out", tmp_path / "o"),
                    "pytorch_model.bin", "refused", "not a plain tensor file", "safetensors")
    assert legacy or "io.open" in line  # the global it would have called
    assert not marker.exists()
    assert snapshot(src) == before and no_output(tmp_path)


# --------------------------------------------------------------------------- 2. fingerprint, resume


def test_fingerprint_covers_every_byte_and_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("ANYQUANT_CACHE", str(tmp_path / "cache"))
    src = make_tiny_llama(tmp_path / "src", **SMALL)
    calls = []
    real = integrity.file_sha256
    monkeypatch.setattr(integrity, "file_sha256", lambda p: calls.append(p) or real(p))
    first = fingerprint(src)
    assert len(calls) == 2  # config.json and model.safetensors
    assert fingerprint(src) == first and len(calls) == 2  # the second run reads nothing
    f = src / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte in the middle, same size (old fingerprint: head and tail only)
    st = f.stat()
    f.write_bytes(bytes(data))
    assert f.stat().st_size == st.st_size
    assert fingerprint(src) != first


CALIB = dict(progress=False, n_samples=8, seq_len=40)


@pytest.fixture(scope="module")
def calib_ids():
    return torch.randint(0, 512, (8, 40), generator=torch.Generator().manual_seed(0))


def _killed_after(monkeypatch, src, ck, calib_ids, block):
    real_save = runner.save_block

    def save_then_die(directory, i, b, entry):
        real_save(directory, i, b, entry)
        if i == block:
            raise KeyboardInterrupt(f"simulated kill after block {block}")

    monkeypatch.setattr(runner, "save_block", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        anyquant.quantize(str(src), "gptq", checkpoint_dir=ck, calib=calib_ids, **CALIB)
    monkeypatch.setattr(runner, "save_block", real_save)


def test_resume_after_source_edit_reuses_no_block(tmp_path, monkeypatch, calib_ids):
    monkeypatch.setenv("ANYQUANT_CACHE", str(tmp_path / "cache"))
    src = make_tiny_llama(tmp_path / "src", hidden=64, inter=128, layers=2, seed=2)
    ck = tmp_path / "ck"
    _killed_after(monkeypatch, src, ck, calib_ids, block=0)
    # edit a layer-0 weight in place: same size, head and tail of the file unchanged
    sd = load_file(src / "model.safetensors")
    sd["model.layers.0.mlp.up_proj.weight"] = -sd["model.layers.0.mlp.up_proj.weight"]
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    again = anyquant.quantize(str(src), "gptq", checkpoint_dir=ck, calib=calib_ids, **CALIB)
    assert again.report["calibration"]["resumed_blocks"] == 0
    fresh = anyquant.quantize(str(src), "gptq", checkpoint_dir=None, calib=calib_ids, **CALIB)
    ids = calib_ids[:2, :24]
    torch.testing.assert_close(again.model(ids).logits, fresh.model(ids).logits, rtol=0, atol=0)


def test_damaged_block_checkpoint_is_recomputed_with_a_note(tmp_path, monkeypatch, calib_ids):
    monkeypatch.setenv("ANYQUANT_CACHE", str(tmp_path / "cache"))
    src = make_tiny_llama(tmp_path / "src", hidden=64, inter=128, layers=2, seed=2)
    ck = tmp_path / "ck"
    full = anyquant.quantize(str(src), "gptq", checkpoint_dir=None, calib=calib_ids, **CALIB)
    _killed_after(monkeypatch, src, ck, calib_ids, block=1)
    (block0,) = ck.glob("*/block_0000.safetensors")
    block0.write_bytes(block0.read_bytes()[: block0.stat().st_size // 2])  # truncated
    again = anyquant.quantize(str(src), "gptq", checkpoint_dir=ck, calib=calib_ids, **CALIB)
    cal = again.report["calibration"]
    assert [b["resumed"] for b in cal["blocks"]] == [False, True]
    assert any("block_0000.safetensors" in n and "damaged" in n and "recomputed" in n for n in again.notes)
    ids = calib_ids[:2, :24]
    torch.testing.assert_close(again.model(ids).logits, full.model(ids).logits, rtol=0, atol=0)


def test_checkpoint_without_checksum_or_corrupt_json_is_recomputed(tmp_path, monkeypatch, calib_ids):
    src = make_tiny_llama(tmp_path / "src", hidden=64, inter=128, layers=2, seed=2)
    ck = tmp_path / "ck"
    _killed_after(monkeypatch, src, ck, calib_ids, block=1)
    (meta0,) = ck.glob("*/block_0000.json")
    entry = json.loads(meta0.read_text())
    del entry[calib_checkpoint.CHECKSUM_KEY]
    meta0.write_text(json.dumps(entry))
    (meta1,) = ck.glob("*/block_0001.json")
    meta1.write_text("{ not json")
    again = anyquant.quantize(str(src), "gptq", checkpoint_dir=ck, calib=calib_ids, **CALIB)
    assert again.report["calibration"]["resumed_blocks"] == 0
    assert sum("damaged" in n for n in again.notes) == 2


def test_unusable_checkpoint_folder_is_named(tmp_path, monkeypatch, calib_ids):
    src = make_tiny_llama(tmp_path / "src", hidden=64, inter=128, layers=2, seed=2)
    ck = tmp_path / "ck"
    _killed_after(monkeypatch, src, ck, calib_ids, block=0)
    (meta0,) = ck.glob("*/block_0000.json")
    folder = meta0.parent
    meta0.unlink()
    meta0.mkdir()  # a directory where the block's entry should be
    with pytest.raises(AnyquantError, match=rf"checkpoint folder {folder} is unusable.*delete that folder"):
        anyquant.quantize(str(src), "gptq", checkpoint_dir=ck, calib=calib_ids, **CALIB)


# --------------------------------------------------------------------------- 3. output integrity


@pytest.fixture
def saved(tmp_path, monkeypatch):
    """A tiny Llama with a tokenizer quantized (int4, RTN) from a relative path, and its output."""
    monkeypatch.setenv("ANYQUANT_CACHE", str(tmp_path / "cache"))
    src = add_tokenizer(make_tiny_llama(tmp_path / "work" / "src", **SMALL))
    monkeypatch.chdir(tmp_path / "work")
    r = anyquant.quantize("src", "int4", progress=False)
    out = anyquant.save(r, tmp_path / "out")
    monkeypatch.chdir(tmp_path)
    return src, out


def test_manifest_records_absolute_source_fingerprint_and_file_hashes(saved):
    src, out = saved
    m = json.loads((out / "anyquant.json").read_text())
    assert m["source"]["path"] == str(src.resolve())
    assert m["source"]["fingerprint"] == fingerprint(src)
    files = sorted(p.name for p in out.iterdir() if p.name != "anyquant.json")
    assert sorted(m["files"]) == files and "model.safetensors" in files
    for name, digest in m["files"].items():
        assert digest == "sha256:" + hashlib.sha256((out / name).read_bytes()).hexdigest()
    assert m["manifest_sha256"].startswith("sha256:")
    anyquant.load(out)  # verifies


def test_changed_output_file_is_named_on_load(saved):
    _, out = saved
    f = out / "model.safetensors"
    sd = load_file(f)
    key = next(k for k in sd if k.endswith("weight_scale"))
    sd[key] = sd[key] * 1000  # scales x1000: loads fine, computes garbage
    save_file(sd, f, metadata={"format": "pt"})
    before = snapshot(out)
    with pytest.raises(AnyquantError, match=r"model\.safetensors changed since it was saved \(sha256 .*--no-verify"):
        anyquant.load(out)
    assert anyquant.load(out, verify=False) is not None
    assert snapshot(out) == before


def test_edited_method_name_in_manifest_is_caught(saved):
    _, out = saved
    m = json.loads((out / "anyquant.json").read_text())
    m["method"] = "gptq"
    (out / "anyquant.json").write_text(json.dumps(m, indent=2))
    with pytest.raises(AnyquantError, match=r"anyquant\.json changed since it was saved"):
        anyquant.load(out)


def test_missing_or_added_output_file_is_named(saved):
    _, out = saved
    (out / "extra.py").write_text("import os\n")
    with pytest.raises(AnyquantError, match=r"extra\.py was added after the output was saved"):
        anyquant.load(out)
    (out / "extra.py").unlink()
    (out / "config.json").unlink()
    with pytest.raises(AnyquantError, match=r"config\.json is missing"):
        anyquant.load(out)


def test_old_output_without_hashes_loads_with_a_warning(saved, caplog):
    _, out = saved
    m = json.loads((out / "anyquant.json").read_text())
    del m["files"], m["manifest_sha256"]
    (out / "anyquant.json").write_text(json.dumps(m))
    with caplog.at_level(logging.WARNING):
        anyquant.load(out)
    assert any("no file hashes" in r.getMessage() for r in caplog.records)


def test_invalid_manifest_is_one_line(saved):
    _, out = saved
    (out / "anyquant.json").write_text("[1, 2")
    with pytest.raises(AnyquantError, match=r"anyquant\.json: not a readable anyquant manifest"):
        anyquant.load(out)


# --------------------------------------------------------------------------- 4. eval, the right model


def test_eval_cli_names_the_changed_file_and_no_verify_skips(saved, tmp_path):
    _, out = saved
    text = number_text(tmp_path)
    f = out / "model.safetensors"
    save_file(load_file(f), f, metadata={"format": "pt", "edited": "yes"})  # same tensors, other bytes
    before = snapshot(out)
    one_line(run("eval", out, "--text", text, "--max-tokens", "256", "--json"),
             "model.safetensors changed since it was saved", "--no-verify")
    p = run("eval", out, "--text", text, "--max-tokens", "256", "--json", "--no-verify")
    assert p.returncode == 0, p.stderr
    assert snapshot(out) == before


def test_eval_uses_the_absolute_source_from_any_directory(saved, tmp_path):
    src, out = saved
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "src").mkdir()  # a same-named directory here must not be taken for the source
    p = run("eval", out, "--text", number_text(tmp_path), "--max-tokens", "256", "--json", cwd=elsewhere)
    assert p.returncode == 0, p.stderr
    data = json.loads(p.stdout)
    assert data["baseline"] == str(src.resolve())
    assert data["top1_agreement"] > 0.5


def test_eval_refuses_a_source_that_is_another_model_now(saved, tmp_path):
    src, out = saved
    shutil.rmtree(src)
    add_tokenizer(make_tiny_llama(src, seed=7, **SMALL))  # same path, other weights
    before = snapshot(src), snapshot(out)
    text = number_text(tmp_path)
    line = one_line(run("eval", out, "--text", text, "--max-tokens", "256", "--json"),
                    f"the source at {src.resolve()} is not the model {out} was made from", "pass --baseline PATH")
    assert "--baseline src" not in line
    # told explicitly, eval scores against the given model
    p = run("eval", out, "--baseline", src, "--text", text, "--max-tokens", "256", "--json")
    assert p.returncode == 0, p.stderr
    assert (snapshot(src), snapshot(out)) == before


def test_eval_with_source_gone_does_not_blame_an_unpassed_baseline(saved, tmp_path):
    src, out = saved
    shutil.move(src, tmp_path / "moved")
    line = one_line(run("eval", out, "--text", number_text(tmp_path), "--max-tokens", "256"),
                    str(src.resolve()), "is not there", "pass --baseline PATH")
    assert not line.startswith("anyquant: error: --baseline")


def test_files_hashed_together_match_one_by_one(tmp_path):
    """files_sha256 hashes several files at once (threads): the same digests as one at a time."""
    from anyquant.model.integrity import file_sha256, files_sha256

    files = []
    for i in range(5):
        f = tmp_path / f"part-{i}.bin"
        f.write_bytes(bytes(range(256)) * (1000 * (i + 1)) + bytes([i]))
        files.append(f)
    together = files_sha256(files)
    assert list(together) == files
    assert together == {f: file_sha256(f) for f in files}
    assert len(set(together.values())) == len(files)
