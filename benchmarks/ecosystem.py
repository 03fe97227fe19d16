"""Issue 19's table: per output format of the default model (SmolLM2-135M-Instruct), whether
stock transformers loads it packed and its memory after from_pretrained (and after one
forward), whether vLLM's documented constraints are met (anyquant.formats.vllm) and whether vLLM's own
code accepts it (benchmarks/vllm_check.py, where `make vllm-venv` built its venv), whether a
LoRA forward/backward step runs on it, and its GGUF export: the types written, the weights'
difference from anyquant's, and (where the llama-cpp-python venv exists, `make llama-venv`)
llama.cpp's perplexity of the file against anyquant's of the output on the same token windows
(the first --gguf-windows of the held-out evaluation; benchmarks/gguf_check.py scores all 32).

    PYTHONPATH=src python benchmarks/ecosystem.py [METHOD[:TARGET] ...] [--llama-venv DIR] [--gguf-windows 8]
      ->  benchmarks/results/ecosystem.json"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from gguf_check import run_llama, weight_error_summary  # noqa: E402  (benchmarks/gguf_check.py)

import anyquant  # noqa: E402
from anyquant.calib.text import evaluation_text, token_windows  # noqa: E402
from anyquant.eval.metrics import compare  # noqa: E402
from anyquant.formats.lora import lora_config  # noqa: E402
from anyquant.formats.vllm import vllm_compatible  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "ecosystem.json"


def mb(model) -> float:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return round(total / 2**20, 1)


def gguf_column(out: Path, work: Path, windows: torch.Tensor, llama_py: Path | None) -> dict:
    exp = anyquant.export(out, out=work / f"{out.name}.gguf", progress=False)
    col = {"written": True, "MiB": round(exp.path.stat().st_size / 2**20, 1),
           "weights_vs_anyquant": weight_error_summary(exp.weight_errors)}
    if llama_py is None:
        col["llama_cpp"] = "not run: no llama-cpp-python venv (make llama-venv)"
        return col
    import numpy as np

    np.save(work / "windows.npy", windows.numpy())
    lr = run_llama(llama_py, exp.path, work / "windows.npy", work)
    with torch.no_grad():
        ours = compare(anyquant.load(out, device="cpu"), None, windows, progress=False)["perplexity"]
    col.update({"llama_cpp_loads": True, "llama_cpp_perplexity": lr["perplexity"], "anyquant_perplexity": ours,
                "ratio": lr["perplexity"] / ours, "tokens": lr["tokens"]})
    exp.path.unlink()
    return col


def vllm_column(out: Path, vllm_py: Path | None) -> dict:
    """vLLM's own config parsing, scheme and kernel choice and tensor shapes (benchmarks/vllm_check.py)."""
    if vllm_py is None:
        return {"run": False, "why": "no vLLM venv (make vllm-venv)"}
    proc = subprocess.run([str(vllm_py), str(Path(__file__).parent / "vllm_check.py"), str(out)],
                          capture_output=True, text=True, timeout=1800)
    text = proc.stdout[proc.stdout.find("{"):]
    try:
        got = json.loads(text)
    except ValueError:
        return {"run": False, "why": f"vllm_check.py exit {proc.returncode}: {proc.stderr.strip()[-500:]}"}
    if "problems" in got:
        got["problems"] = got["problems"][:5]
    return {"run": True, **got}


def row(method: str, target: str, work: Path, windows: torch.Tensor, llama_py: Path | None,
        vllm_py: Path | None) -> dict:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    r = anyquant.quantize("default", method, target=target, progress=False)
    out = anyquant.save(r, work / f"{method}-{target}")
    ids = torch.randint(0, 1000, (1, 32), generator=torch.Generator().manual_seed(0))
    stock = AutoModelForCausalLM.from_pretrained(out)
    # transformers 5.x holds compressed-tensors' packed codes as parameters (earlier: buffers)
    tensors = list(stock.named_parameters()) + list(stock.named_buffers())
    packed = any(k.endswith("weight_packed") for k, _ in tensors) or any(
        type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in stock.modules())
    at_load = mb(stock)
    with torch.no_grad():
        stock(ids)
    after_forward = mb(stock)
    del stock
    # fuse=False: adapters name the source's q_proj / v_proj; the fused inference layout merges them (docs/formats.md#lora)
    model = get_peft_model(anyquant.load(out, fuse=False), lora_config(r=8, target_modules=["q_proj", "v_proj"]))
    loss = model(ids, labels=ids).loss
    loss.backward()
    lora_ok = all(p.grad is not None for p in model.parameters() if p.requires_grad)
    del model
    gguf = gguf_column(out, work, windows, llama_py)
    return {"method": method, "target": target, "group_sizes": sorted({d.options.get("group_size") for d in
                                                                      r.plan.to_quantize()} - {None}),
            "compute_dtype": r.plan.compute_dtype,
            "stock_transformers_packed_at_load": packed, "stock_transformers_MiB_at_load": at_load,
            "stock_transformers_MiB_after_first_forward": after_forward,
            "anyquant_load_MiB": mb(anyquant.load(out)),
            "vllm_problems": vllm_compatible(out), "vllm_own_check": vllm_column(out, vllm_py), "lora_step_runs": lora_ok, "gguf": gguf,
            "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("methods", nargs="*", default=["W4A16:cuda", "int4", "nf4"])
    ap.add_argument("--llama-venv", type=Path, default=Path(__file__).resolve().parents[1] / ".venv-llama")
    ap.add_argument("--vllm-venv", type=Path, default=Path(__file__).resolve().parents[1] / ".vllm")
    ap.add_argument("--gguf-windows", type=int, default=8)
    a = ap.parse_args()
    from transformers import AutoTokenizer

    from anyquant.model.default import default_model_dir

    py = a.llama_venv / "bin" / "python"
    llama_py = py if py.exists() else None
    vpy = a.vllm_venv / "bin" / "python"
    vllm_py = vpy if vpy.exists() else None
    windows = token_windows(AutoTokenizer.from_pretrained(default_model_dir()), evaluation_text())[: a.gguf_windows]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for spec in a.methods:
            method, _, target = spec.partition(":")
            rows.append(row(method, target or "auto", Path(d), windows, llama_py, vllm_py))
            print(json.dumps(rows[-1]), flush=True)
            write(rows, windows)  # after every row: a long run stopped midway keeps what it measured


def write(rows: list[dict], windows: torch.Tensor) -> None:
    RESULTS.write_text(json.dumps({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                                   "model": "SmolLM2-135M-Instruct (float32 source)", "device": "cpu",
                                   "rows": rows,
                                   "notes": ["stock transformers 5.25 + compressed-tensors 0.20: symmetric int4 loads "
                                             "packed, then decompresses each layer at its first forward; asymmetric "
                                             "int4 is dequantized at load (dequantize: true)",
                                             "vllm_problems: vLLM's documented constraints "
                                             "(anyquant.formats.vllm.vllm_compatible); vllm_own_check: vLLM's own "
                                             "config parsing, scheme and kernel choice (capability 9.0) and tensor "
                                             "shapes, in its own CPU venv (benchmarks/vllm_check.py); no GPU: "
                                             "nothing was served",
                                             "LoRA: int4 outputs through anyquant.load(DIR, fuse=False) (adapters name "
                                             "q_proj / v_proj), nf4 through transformers + bitsandbytes",
                                             f"gguf: anyquant.export(DIR, to='gguf'); llama.cpp perplexity on the first "
                                             f"{int(windows.shape[0])} evaluation windows of {int(windows.shape[1])} tokens "
                                             "(token ids fed as they are), against anyquant's on the same windows; "
                                             "more windows: benchmarks/results/gguf.json"]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
