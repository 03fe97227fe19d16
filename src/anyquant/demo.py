"""`anyquant demo` / `make demo`: the methods on the built-in model, one table, one report."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from anyquant.calib.text import evaluation_text
from anyquant.eval.memory import track_peak_memory
from anyquant.eval.metrics import CachedLogits, compare, token_windows
from anyquant.eval.report import (
    PROMPTS,
    build_report,
    command_line,
    format_table,
    generate_samples,
    output_size,
    save_eval_record,
    source_size,
)
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

# The default set: the bitsandbytes formats, plain int4, and gptq at a fast setting (8 calibration
# sequences of 256 tokens, no tuning) so the table shows the best method within the demo's budget.
DEFAULT_METHODS = "nf4,int8,int4,gptq"
FAST_OPTIONS: dict[str, dict[str, Any]] = {
    "gptq": {"n_samples": 8, "seq_len": 256, "tune_steps": 0},
    "awq": {"n_samples": 8, "seq_len": 256, "tune_steps": 0},
}
DEFAULT_MAX_TOKENS = 4096


def run_demo(out: Path, methods: list[str], max_tokens: int = DEFAULT_MAX_TOKENS, source: str = "default",
             progress: bool = True) -> dict[str, Any]:
    from rich.console import Console

    console = Console(stderr=True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    console.print(f"anyquant demo: preparing the default model ({source}) and held-out text")
    src = resolve_source(source)
    float_model, tokenizer, info = load_model(src)
    windows = token_windows(tokenizer, evaluation_text(), max_tokens=max_tokens)
    console.print(f"evaluating float on {windows.numel()} tokens")
    # One float pass: the cache keeps its logits, and every method is compared against them.
    baseline = CachedLogits(float_model)
    base = compare(baseline, None, windows, progress=progress)
    samples = {"float (source)": generate_samples(float_model, tokenizer, PROMPTS)}
    float_size = source_size(src)["total_bytes"]
    rows: list[dict[str, Any]] = [{
        "method": "float (source)", "bits_per_weight": None, "perplexity": base["perplexity"],
        "delta_perplexity": 0.0, "kl_divergence": 0.0, "top1_agreement": 1.0,
        "size_bytes": float_size, "seconds": None, "peak_memory_bytes": None,
    }]
    dirs: list[Path] = []
    command = command_line()
    for method in methods:
        options = FAST_OPTIONS.get(method, {})
        shown = "".join(f" --{k.replace('_', '-')} {v}" for k, v in options.items())
        console.print(f"[bold]{method}[/bold]{shown}: quantizing and saving")
        t0 = time.perf_counter()
        with track_peak_memory() as mem:
            result = quantize(src, method, progress=progress, **options)
            result.source = info
            result.tokenizer = tokenizer
            path = save(result, out / method, force=True, extra_metrics={
                "per_layer_weight_error": result.report["per_layer_weight_error"],
                "command": f"{command}  # {method}{shown}"})
        seconds = time.perf_counter() - t0
        console.print(f"{method}: evaluating")
        metrics = compare(result.model, baseline, windows, progress=progress)
        size = output_size(path, result.plan.to_dict())
        save_eval_record(path, {"target": str(path), "baseline": str(src), **metrics, "method": method,
                                "bits_per_weight": size["bits_per_weight"]}, command)
        samples[method] = generate_samples(result.model, tokenizer, PROMPTS)
        rows.append({
            "method": method, "bits_per_weight": size["bits_per_weight"],
            "perplexity": metrics["perplexity"],
            "delta_perplexity": metrics["perplexity"] - base["perplexity"],
            "kl_divergence": metrics["kl_divergence"], "top1_agreement": metrics["top1_agreement"],
            "size_bytes": size["total_bytes"], "seconds": seconds, "peak_memory_bytes": mem.peak_bytes,
        })
        dirs.append(path)
        del result
    # Wide enough for every column whatever the terminal (CI logs are not terminals).
    Console(width=160).print(format_table(rows, COLUMNS, title=f"anyquant demo: {src.name}, {windows.numel()} held-out Wikipedia tokens"))
    notes = [f"source: {src}", f"evaluation: {windows.shape[0]} windows of {windows.shape[1]} tokens of held-out "
             "Wikipedia text, BOS first; KL is KL(float || quantized) per predicted token",
             f"demo time: {time.perf_counter() - t_start:.0f} s"]
    report = build_report(dirs, out / "report.html", samples=samples, commands=[command], notes=notes)
    (out / "results.json").write_text(json.dumps({"rows": rows, "tokens": int(windows.numel())}, indent=2, default=float))
    console.print(f"report: {report}")
    return {"rows": rows, "report": str(report)}
