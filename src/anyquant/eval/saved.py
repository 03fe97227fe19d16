"""`anyquant eval`: a saved model against its float baseline."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from anyquant.errors import AnyquantError
from anyquant.eval.memory import dir_size_bytes, track_peak_memory
from anyquant.eval.metrics import evaluate
from anyquant.eval.stored import stored_sizes
from anyquant.formats.io import load_quantized
from anyquant.formats.manifest import FINGERPRINT_SCOPE, MANIFEST, read_manifest
from anyquant.model.files import read_text_file
from anyquant.model.load import fingerprint, load_model, load_tokenizer, resolve_source

log = logging.getLogger(__name__)


def load_any(path: str, trust_remote_code: bool, verify: bool = True):
    """An anyquant output through anyquant.load (its files verified unless verify=False); any
    other model directory through transformers. Returns (model, tokenizer, manifest or None)."""

    p = resolve_source(path)
    manifest = read_manifest(p)
    if manifest is not None:
        model = load_quantized(p, trust_remote_code=trust_remote_code, verify=verify)
        return model, load_tokenizer(p, trust_remote_code), manifest
    model, tok, _ = load_model(p, trust_remote_code=trust_remote_code, refuse_quantized=False)
    return model, tok, None


def recorded_source(target: str, manifest: dict[str, Any]) -> str | None:
    """The float model an output was made from, by the absolute path and content fingerprint
    its manifest recorded: refused when it is gone or is no longer the same model, so that an
    output is never scored against another model that happens to sit at that path."""
    source = manifest.get("source") or {}
    path = source.get("path")
    if path is None:
        return None
    if path != "default" and not Path(path).is_dir():
        where = "" if Path(path).is_absolute() else " (recorded relative to where quantize ran)"
        raise AnyquantError(f"{target}: the source it was made from, {path}{where}, is not there; "
                            "pass --baseline PATH to that float model")
    recorded = source.get("fingerprint")
    if source.get("fingerprint_scope") != FINGERPRINT_SCOPE or not recorded:
        log.warning("%s: its %s records no content fingerprint of the source (saved by an older "
                    "anyquant); cannot check that %s is still that model", target, MANIFEST, path)
        return path
    now = fingerprint(resolve_source(path))
    if now != recorded:
        raise AnyquantError(
            f"the source at {Path(path)} is not the model {target} was made from (its fingerprint is "
            f"{now[7:19]}..., the output recorded {str(recorded)[7:19]}...); pass --baseline PATH "
            "to the model it was made from")
    return path


def run_eval(target: str, baseline: str | None, text_file: Path | None, max_tokens: int,
             trust_remote_code: bool, progress: bool = True, verify: bool = True) -> dict[str, Any]:
    """Evaluate a saved model against `baseline`, by default the source its manifest recorded
    (checked by path and fingerprint). `verify`: check the output's files against their sha256."""

    with track_peak_memory() as mem:
        model, tok, manifest = load_any(target, trust_remote_code, verify)
    if baseline is None and manifest is not None:
        baseline = recorded_source(target, manifest)
    elif baseline is not None:
        if not Path(baseline).exists() and baseline != "default":
            raise AnyquantError(f"--baseline {baseline}: no such directory; pass the float model's directory")
        _note_other_baseline(target, baseline, manifest)
    base_model = None
    if baseline is not None:
        base_model, base_tok, _ = load_any(baseline, trust_remote_code, verify)
        tok = tok or base_tok
    if tok is None:
        raise AnyquantError(f"{target}: no tokenizer files found; copy the tokenizer into it or pass --baseline with one")
    text = None
    if text_file is not None:
        text = read_text_file(text_file, "--text", "evaluation text")
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


def _note_other_baseline(target: str, baseline: str, manifest: dict[str, Any] | None) -> None:
    source = (manifest or {}).get("source") or {}
    if source.get("fingerprint_scope") != FINGERPRINT_SCOPE or not source.get("fingerprint"):
        return
    if fingerprint(resolve_source(baseline)) != source["fingerprint"]:
        log.warning("--baseline %s is not the model %s was made from (%s); scoring against it as asked",
                    baseline, target, source.get("path"))
