"""Streamed quantization (anyquant.quantize_to_disk, `anyquant quantize --stream`): the output of
a block-by-block run from a sharded checkpoint equals, tensor for tensor, what the in-memory path
writes; one block is in memory at a time; shards, index, atomic output, resume, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import anyquant
from anyquant.errors import AnyquantError
from anyquant.formats import lazy as lazy_mod
from anyquant.formats.shards import ShardWriter, parse_size
from anyquant.stream import quantize_to_disk

CALIBRATED = {"gptq", "awq"}


def make_sharded_llama(path: Path, *, tie: bool, dtype: torch.dtype, layers: int = 2, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=128, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).to(dtype).save_pretrained(path, max_shard_size="100KB")
    assert (path / "model.safetensors.index.json").is_file()  # the source itself is sharded
    return path


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), "pt") as s:
            for k in s.keys():
                out[k] = s.get_tensor(k)
    return out


def options(method: str) -> dict:
    if method in CALIBRATED:
        return {"calib": torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1)),
                "n_samples": 4, "seq_len": 32, "checkpoint_dir": None}
    return {}


# every method; tied and untied embeddings, float32 and bfloat16 sources among them
CASES = [("int4", False, torch.float32), ("nf4", True, torch.bfloat16), ("int8", False, torch.float32),
         ("fp4", True, torch.float32), ("hqq", False, torch.bfloat16), ("gptq", True, torch.bfloat16),
         ("awq", False, torch.float32)]


@pytest.mark.parametrize("method,tie,dtype", CASES, ids=[c[0] for c in CASES])
def test_streamed_output_equals_in_memory(tmp_path, method, tie, dtype):
    src = make_sharded_llama(tmp_path / "src", tie=tie, dtype=dtype)
    if torch.cuda.is_available():
        # quantize_to_disk computes on the GPU where there is one: the in-memory side too, since
        # bitsandbytes' CPU and CUDA kernels may round a nested absmax code differently
        from transformers import AutoModelForCausalLM

        source = AutoModelForCausalLM.from_pretrained(src, dtype=dtype).to("cuda")
    else:
        source = str(src)
    r = anyquant.quantize(source, method, progress=False, **options(method))
    anyquant.save(r, tmp_path / "mem", verify=False)
    s = quantize_to_disk(src, method, tmp_path / "st", max_shard_size="40KB", progress=False, **options(method))
    assert s.output == (tmp_path / "st").resolve()
    a, b = tensors(tmp_path / "mem"), tensors(tmp_path / "st")
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k
    ca, cb = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("mem", "st"))
    assert ca["quantization_config"] == cb["quantization_config"] and ca == cb
    ma, mb = (json.loads((tmp_path / d / "anyquant.json").read_text()) for d in ("mem", "st"))
    assert ma["plan"] == mb["plan"]
    # verified by reloading (the output fits memory here), as save() verifies
    assert mb["verification"]["anyquant"]["ok"]
    assert mb["metrics"]["probe_logits_relative_error"] is not None
    assert len(mb["metrics"]["stream"]["shards"]) > 1
    assert mb["metrics"]["per_layer_weight_error"].keys() == ma["metrics"]["per_layer_weight_error"].keys()


@pytest.mark.parametrize("method", ["nf4", "gptq"])
def test_one_block_in_memory_at_a_time(tmp_path, monkeypatch, method):
    src = make_sharded_llama(tmp_path / "src", tie=False, dtype=torch.float32, layers=4)
    seen: list[int] = []
    original = lazy_mod.LazyModel.materialise

    def counting(self, params):
        original(self, params)
        with torch._C.DisableTorchFunction():  # unseen by the weight-read probe, as materialise itself
            blocks = [u for u in self.units if u.block and any(not p.is_meta for p in u.params.values())]
        seen.append(len(blocks))

    monkeypatch.setattr(lazy_mod.LazyModel, "materialise", counting)
    quantize_to_disk(src, method, tmp_path / "out", progress=False, **options(method))
    assert seen and max(seen) == 1


def test_shard_writer_round_trip_and_index(tmp_path):
    w = ShardWriter(tmp_path, max_shard_size=300)
    ts = {"a": torch.arange(50, dtype=torch.float32), "b": torch.ones(3, 4, dtype=torch.bfloat16),
          "c": torch.tensor(7, dtype=torch.int32), "d": torch.zeros(0, 5), "e": torch.arange(90, dtype=torch.uint8)}
    w.add(dict(list(ts.items())[:2]))
    w.add(dict(list(ts.items())[2:]))
    names = w.close()
    assert len(names) == 2 and names[0] == "model-00001-of-00002.safetensors"
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(ts)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in ts.values())
    got = tensors(tmp_path)
    for k, t in ts.items():
        assert got[k].dtype == t.dtype and torch.equal(got[k], t), k
    assert not list(tmp_path.glob(".shard-*"))
    # the data written once, after the room left for the header (which safetensors reads with its padding)
    first = [k for k, f in index["weight_map"].items() if f == names[0]]
    assert (tmp_path / names[0]).stat().st_size == w.header_room + sum(ts[k].numel() * ts[k].element_size()
                                                                        for k in first)
    # a header larger than its room: written in front of a copy of the data
    (tmp_path / "big").mkdir()
    wb = ShardWriter(tmp_path / "big", max_shard_size=10**6)
    wb.header_room = 64
    many = {f"tensor.{i}": torch.full((3,), i, dtype=torch.float32) for i in range(20)}
    wb.add(many)
    assert wb.close() == ["model.safetensors"]
    back = tensors(tmp_path / "big")
    assert set(back) == set(many) and all(torch.equal(back[k], many[k]) for k in many)
    (tmp_path / "x").mkdir()
    w2 = ShardWriter(tmp_path / "x", max_shard_size=300)
    with pytest.raises(AnyquantError, match="written twice"):
        w2.add({"a": ts["a"]})
        w2.add({"a": ts["a"]})
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30
    with pytest.raises(AnyquantError, match="max shard size"):
        parse_size("lots")


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    src = make_sharded_llama(tmp_path / "src", tie=False, dtype=torch.float32)
    calls = []
    original = ShardWriter.add

    def failing(self, t):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device", str(self.directory))
        original(self, t)

    monkeypatch.setattr(ShardWriter, "add", failing)
    with pytest.raises(AnyquantError, match="nothing was written there"):
        quantize_to_disk(src, "int4", tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_calibration_resumes_after_interruption(tmp_path, monkeypatch):
    from anyquant import stream

    src = make_sharded_llama(tmp_path / "src", tie=False, dtype=torch.float32, layers=3)
    opts = {**options("gptq"), "checkpoint_dir": tmp_path / "ck"}
    full = quantize_to_disk(src, "gptq", tmp_path / "full", progress=False, **{**opts, "checkpoint_dir": None})
    original = stream._Emitter.emit

    def dies_at_block_2(self, unit):
        if unit.name == "model.layers.2":
            raise KeyboardInterrupt
        original(self, unit)

    monkeypatch.setattr(stream._Emitter, "emit", dies_at_block_2)
    with pytest.raises(KeyboardInterrupt):
        quantize_to_disk(src, "gptq", tmp_path / "out", progress=False, **opts)
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(stream._Emitter, "emit", original)
    again = quantize_to_disk(src, "gptq", tmp_path / "out", progress=False, **opts)
    assert again.report["calibration"]["resumed_blocks"] == 3   # all three blocks were checkpointed before the kill
    a, b = tensors(full.output), tensors(again.output)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_max_memory_too_small_refused(tmp_path):
    src = make_sharded_llama(tmp_path / "src", tie=False, dtype=torch.float32)
    with pytest.raises(AnyquantError, match="two of .* largest units"):
        quantize_to_disk(src, "int4", tmp_path / "out", max_memory=1000, progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_stream(tmp_path):
    src = make_sharded_llama(tmp_path / "src", tie=True, dtype=torch.float32)
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "anyquant.cli", "quantize", str(src), "--method", "int4", "--out",
                           str(tmp_path / "out"), "--stream", "--max-shard-size", "50KB"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "streamed from" in proc.stdout and (tmp_path / "out" / "model.safetensors.index.json").is_file()
    bad = subprocess.run([sys.executable, "-m", "anyquant.cli", "quantize", str(src), "--method", "int4", "--out",
                          str(tmp_path / "o2"), "--stream", "--max-shard-size", "huge"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and "max shard size" in bad.stderr


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_checkpoint_read_twice(tmp_path, dtype):
    """A streamed forward reads the whole checkpoint: one forward runs the weight-read probe and
    the dtype policy's boundary check together, the quantize pass reads it again. The float probe
    logits come from the probe's forward, and the policy's second check is skipped, when the
    source is already in the compute dtype (it used to read the checkpoint five times)."""
    src = make_sharded_llama(tmp_path / "src", tie=False, dtype=dtype)
    size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    r = quantize_to_disk(src, "int4", tmp_path / "out", progress=False)
    assert 1.5 * size < r.report["stream"]["source_bytes_read"] <= 2 * size


def test_frozen_heap_collects_what_the_block_leaves():
    """frozen_heap: collections inside it skip what was alive on entry but still free the cycles
    made inside; nested uses freeze once and the last exit unfreezes."""
    import gc
    import weakref

    from anyquant.calib.memory import frozen_heap

    class Node:
        pass

    assert gc.get_freeze_count() == 0
    with frozen_heap():
        frozen = gc.get_freeze_count()
        assert frozen > 0
        with frozen_heap():
            assert gc.get_freeze_count() == frozen
            a, b = Node(), Node()
            a.other, b.other = b, a
            gone = weakref.ref(a)
            del a, b
            gc.collect()
            assert gone() is None
        assert gc.get_freeze_count() == frozen
    assert gc.get_freeze_count() == 0


def test_calibration_capture_reads_the_embedding_once(tmp_path):
    """Capturing the first block's inputs runs one forward per calibration batch (4 here); the
    embedding and the first block stay read across them instead of being read per batch, so a
    streamed gptq run reads the checkpoint about twice (the probe forward, then each unit once
    more), not four times as before."""
    src = make_sharded_llama(tmp_path / "src", tie=False, dtype=torch.float32)
    size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    opts = {**options("gptq"), "calib": torch.randint(0, 256, (32, 16), generator=torch.Generator().manual_seed(1)),
            "n_samples": 32, "seq_len": 16}
    r = quantize_to_disk(src, "gptq", tmp_path / "out", progress=False, **opts)
    assert r.report["stream"]["source_bytes_read"] <= 2.2 * size
