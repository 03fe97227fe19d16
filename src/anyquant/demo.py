"""`anyquant demo` / `make demo`: every method on the built-in model, one table, one report."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from anyquant.calib.text import evaluation_text
from anyquant.eval.memory import dir_size_bytes, track_peak_memory
from anyquant.eval.metrics import CachedLogits, compare, token_windows
from anyquant.eval.report import format_table, write_report
from anyquant.eval.stored import stored_sizes
from anyquant.formats.io import save
from anyquant.model.load import load_model, resolve_source
from anyquant.pipeline import quantize

COLUMNS = [
    ("method", "method"),
    ("bits_per_weight", "bits/weight (stored)"),
    ("perplexity", "perplexity"),
    ("delta_perplexity", "Δ vs float"),
    ("kl_divergence", "KL (nats)"),
    ("top1_agreement", "top-1 agree"),
    ("size_bytes", "size on disk"),
    ("seconds", "time (s)"),
    ("peak_memory_bytes", "peak memory"),
]


def run_demo(out: Path, methods: list[str], max_tokens: int = 8192, source: str = "default",
             progress: bool = True) -> dict[str, Any]:
    from rich.console import Console


    console = Console(stderr=True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    console.print(f"anyquant demo: preparing the default model ({source}) and held-out text")
    src = resolve_source(source)
    float_model, tokenizer, info = load_model(src)
    windows = token_windows(tokenizer, evaluation_text(), max_tokens=max_tokens)
    baseline = CachedLogits(float_model)
    console.print(f"evaluating float on {windows.numel()} tokens")
    base = compare(float_model, None, windows, progress=progress)
    # Fill the baseline cache once; each method then compares against it.
    compare(baseline, None, windows, progress=False)
    float_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    rows: list[dict[str, Any]] = [{
        "method": "float32", "bits_per_weight": 32.0, "perplexity": base["perplexity"],
        "delta_perplexity": 0.0, "kl_divergence": 0.0, "top1_agreement": 1.0,
        "size_bytes": float_bytes, "seconds": None, "peak_memory_bytes": None,
    }]
    per_layer: dict[str, dict[str, float]] = {}
    sizes: dict[str, dict[str, int]] = {}
    for method in methods:
        console.print(f"[bold]{method}[/bold]: quantizing and saving")
        model, _, _ = load_model(src)
        t0 = time.perf_counter()
        with track_peak_memory() as mem:
            result = quantize(model, method, progress=progress)
            result.source = info
            result.tokenizer = tokenizer
            path = save(result, out / method, force=True)
        seconds = time.perf_counter() - t0
        stored = stored_sizes(path, result.plan.to_dict())
        console.print(f"{method}: evaluating")
        metrics = compare(result.model, baseline, windows, progress=progress)
        rows.append({
            "method": method, "bits_per_weight": stored["bits_per_weight"],
            "perplexity": metrics["perplexity"],
            "delta_perplexity": metrics["perplexity"] - base["perplexity"],
            "kl_divergence": metrics["kl_divergence"], "top1_agreement": metrics["top1_agreement"],
            "size_bytes": dir_size_bytes(path), "seconds": seconds, "peak_memory_bytes": mem.peak_bytes,
        })
        per_layer[method] = result.report["per_layer_weight_error"]
        sizes[method] = stored["bytes_by_component"]
        del model, result
    # Wide enough for every column whatever the terminal (CI logs are not terminals).
    Console(width=160).print(format_table(rows, COLUMNS, title=f"anyquant demo: {src.name}, {windows.numel()} held-out Wikipedia tokens"))
    notes = [f"source: {src}", f"evaluation: {windows.shape[0]} windows of {windows.shape[1]} tokens, BOS first; "
             "KL is KL(float || quantized) per predicted token"]
    report = write_report(out / "report.html", f"anyquant demo — {src.name}", rows, COLUMNS,
                          per_layer_error=per_layer, size_by_component=sizes, notes=notes)
    (out / "results.json").write_text(json.dumps({"rows": rows, "tokens": int(windows.numel())}, indent=2, default=float))
    console.print(f"report: {report}")
    return {"rows": rows, "report": str(report)}
