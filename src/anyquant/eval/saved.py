"""`anyquant eval`: a saved model against its float baseline."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from anyquant.errors import AnyquantError
from anyquant.eval.memory import dir_size_bytes, track_peak_memory
from anyquant.eval.metrics import evaluate
from anyquant.eval.stored import stored_sizes
from anyquant.formats.io import load_quantized
from anyquant.formats.manifest import read_manifest
from anyquant.model.load import load_model, load_tokenizer, resolve_source


def load_any(path: str, trust_remote_code: bool):
    """An anyquant output through anyquant.load; any other model directory through transformers."""

    p = resolve_source(path)
    manifest = read_manifest(p)
    if manifest is not None:
        return load_quantized(p, trust_remote_code=trust_remote_code), load_tokenizer(p, trust_remote_code), manifest
    model, tok, _ = load_model(p, trust_remote_code=trust_remote_code, refuse_quantized=False)
    return model, tok, None


def run_eval(target: str, baseline: str | None, text_file: Path | None, max_tokens: int,
             trust_remote_code: bool, progress: bool = True) -> dict[str, Any]:

    with track_peak_memory() as mem:
        model, tok, manifest = load_any(target, trust_remote_code)
    if baseline is None and manifest is not None:
        baseline = manifest["source"]["path"]
    base_model = None
    if baseline is not None:
        if not Path(baseline).exists() and baseline != "default":
            raise AnyquantError(f"--baseline {baseline}: no such directory (the target's source moved? pass --baseline)")
        base_model, base_tok, _ = load_any(baseline, trust_remote_code)
        tok = tok or base_tok
    if tok is None:
        raise AnyquantError(f"{target}: no tokenizer files found; copy the tokenizer into it or pass --baseline with one")
    text = None
    if text_file is not None:
        if not text_file.exists():
            raise AnyquantError(f"--text {text_file}: no such file")
        text = text_file.read_text(encoding="utf-8", errors="replace")
    t0 = time.perf_counter()
    with track_peak_memory() as run_mem:
        metrics = evaluate(model, base_model, text, tokenizer=tok, max_tokens=max_tokens, progress=progress)
    data: dict[str, Any] = {"target": str(target), "baseline": baseline, **metrics,
                            "eval_seconds": round(time.perf_counter() - t0, 2),
                            "size_on_disk_bytes": dir_size_bytes(target),
                            "peak_memory_load_bytes": mem.peak_bytes,
                            "peak_memory_eval_bytes": run_mem.peak_bytes}
    if manifest is not None:
        sizes = stored_sizes(target, manifest["plan"])
        data["bits_per_weight"] = sizes["bits_per_weight"]
        data["method"] = manifest["method"]
    return data
