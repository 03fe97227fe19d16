"""vLLM's own code accepts anyquant's compressed-tensors outputs (benchmarks/vllm_check.py, run in
the venv `make vllm-venv` builds; skipped where it is not built: CI has none)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

import anyquant

ROOT = Path(__file__).resolve().parents[1]


def _vllm_python() -> Path | None:
    py = Path(os.environ.get("ANYQUANT_VLLM_VENV", ROOT / ".vllm")) / "bin" / "python"
    return py if py.exists() else None


pytestmark = pytest.mark.skipif(_vllm_python() is None,
                                reason="vLLM venv not built (make vllm-venv, or ANYQUANT_VLLM_VENV=DIR)")


def _check(out: Path, tmp_path: Path, *args: str) -> tuple[int, dict]:
    report = tmp_path / f"{out.name}.json"
    proc = subprocess.run([str(_vllm_python()), str(ROOT / "benchmarks" / "vllm_check.py"), str(out),
                           "--json", str(report), *args], capture_output=True, text=True, timeout=900)
    assert report.exists(), proc.stderr[-2000:]
    return proc.returncode, json.loads(report.read_text())


@pytest.mark.parametrize("method", ["W4A16", "int4"])
def test_vllm_picks_a_scheme_and_kernel_for_every_layer(tiny_llama, tmp_path, method):
    r = anyquant.quantize(str(tiny_llama), method, target="cuda", progress=False)
    out = anyquant.save(r, tmp_path / method)
    rc, got = _check(out, tmp_path)
    assert rc == 0 and got["ok"], got["problems"]
    n = len(r.plan.to_quantize())
    assert got["layers"] == n and got["schemes"] == {"CompressedTensorsWNA16": n}
    assert sum(got["kernels_by_tensor_parallel"]["1"].values()) == n


def test_vllm_check_fails_on_a_layout_vllm_would_not_load(tiny_llama, tmp_path):
    """The check can fail: a config whose group size disagrees with the stored scales."""
    r = anyquant.quantize(str(tiny_llama), "W4A16", target="cuda", progress=False)
    out = anyquant.save(r, tmp_path / "w4a16")
    config = json.loads((out / "config.json").read_text())
    for group in config["quantization_config"]["config_groups"].values():
        group["weights"]["group_size"] = 32 if group["weights"]["group_size"] != 32 else 64
    (out / "config.json").write_text(json.dumps(config))
    rc, got = _check(out, tmp_path, "--tp", "1")
    assert rc == 1 and not got["ok"]
    assert any("weight_scale: vLLM expects shape" in p for p in got["problems"])
