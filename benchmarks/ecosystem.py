"""Issue 19's table: per output format of the default model (SmolLM2-135M-Instruct), whether
stock transformers loads it packed and its memory after from_pretrained (and after one
forward), whether vLLM's documented constraints are met (anyquant.formats.vllm), whether a
LoRA forward/backward step runs on it, and GGUF export (not implemented: see the notes).

    PYTHONPATH=src python benchmarks/ecosystem.py  ->  benchmarks/results/ecosystem.json"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
import anyquant  # noqa: E402
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


def row(method: str, target: str, work: Path) -> dict:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    r = anyquant.quantize("default", method, target=target, progress=False)
    out = anyquant.save(r, work / f"{method}-{target}")
    ids = torch.randint(0, 1000, (1, 32), generator=torch.Generator().manual_seed(0))
    stock = AutoModelForCausalLM.from_pretrained(out)
    packed = any(k.endswith("weight_packed") for k, _ in stock.named_buffers()) or any(
        type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in stock.modules())
    at_load = mb(stock)
    with torch.no_grad():
        stock(ids)
    after_forward = mb(stock)
    del stock
    model = get_peft_model(anyquant.load(out), lora_config(r=8, target_modules=["q_proj", "v_proj"]))
    loss = model(ids, labels=ids).loss
    loss.backward()
    lora_ok = all(p.grad is not None for p in model.parameters() if p.requires_grad)
    return {"method": method, "target": target, "group_sizes": sorted({d.options.get("group_size") for d in
                                                                      r.plan.to_quantize()} - {None}),
            "compute_dtype": r.plan.compute_dtype,
            "stock_transformers_packed_at_load": packed, "stock_transformers_MiB_at_load": at_load,
            "stock_transformers_MiB_after_first_forward": after_forward,
            "anyquant_load_MiB": mb(anyquant.load(out)),
            "vllm_problems": vllm_compatible(out), "lora_step_runs": lora_ok, "gguf": "not implemented",
            "seconds": round(time.perf_counter() - t0, 1)}


def main(methods: list[str]) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for spec in methods:
            method, _, target = spec.partition(":")
            rows.append(row(method, target or "auto", Path(d)))
            print(json.dumps(rows[-1]))
    RESULTS.write_text(json.dumps({"model": "SmolLM2-135M-Instruct (float32 source)", "device": "cpu",
                                   "rows": rows,
                                   "notes": ["stock transformers 5.25 + compressed-tensors 0.20: symmetric int4 loads "
                                             "packed, then decompresses each layer at its first forward; asymmetric "
                                             "int4 is dequantized at load (dequantize: true)",
                                             "vLLM itself is not installed (needs a GPU): constraints checked against "
                                             "its documentation by anyquant.formats.vllm.vllm_compatible",
                                             "GGUF export (item 8) not implemented"]}, indent=2) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:] or ["W4A16:cuda", "int4", "nf4"])
