"""save() and load(): whole outputs or nothing, readable by stock transformers.

A save goes into a temporary sibling directory, renamed into place once every file is written,
so a crash or Ctrl-C never leaves a half-written output where a user expects a model.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from anyquant.errors import AnyquantError
from anyquant.formats.hf import checkpoint_key_renamer
from anyquant.formats.manifest import (
    MANIFEST,
    build_manifest,
    read_manifest,
    write_manifest,
)
from anyquant.formats.registry import format_for
from anyquant.methods import handler_for
from anyquant.model.load import load_model, resolve_source
from anyquant.model.modelmap import quantized_linear_types
from anyquant.numerics.dtype import DTYPES

log = logging.getLogger(__name__)


def check_output_dir(out: Path, source: Path | None, force: bool) -> None:
    out = out.expanduser().resolve()
    if source is not None:
        src = Path(source).expanduser().resolve()
        if out == src or src in out.parents:
            raise AnyquantError(
                f"output directory {out} is inside the source model {src}; choose a directory outside it "
                "(the source is never modified)"
            )
        if out in src.parents:
            raise AnyquantError(f"output directory {out} contains the source model {src}; choose another")
    if out.exists() and not force:
        raise AnyquantError(f"output directory {out} already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise AnyquantError(f"output path {out} is a file; choose a directory")


def save(result, out_dir: str | Path, *, force: bool = False, extra_metrics: dict[str, Any] | None = None) -> Path:
    out = Path(out_dir).expanduser()
    check_output_dir(out, result.source.path, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    handler = handler_for(result.config.method)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model = result.model
        compute_dtype = DTYPES[result.plan.compute_dtype]
        qc = format_for(handler.format).quantization_config(model, result.plan, compute_dtype)
        _save_pretrained_with(model, tmp, qc)
        if result.tokenizer is not None:
            result.tokenizer.save_pretrained(tmp)
        elif result.source.path is not None:
            _copy_tokenizer_files(Path(result.source.path), tmp)
        if result.source.path is not None:
            _copy_remote_code(Path(result.source.path), tmp)
        manifest = build_manifest(result, handler.format)
        if extra_metrics:
            manifest["metrics"].update(extra_metrics)
        write_manifest(tmp, manifest)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _save_pretrained_with(model: nn.Module, directory: Path, quantization_config: dict[str, Any]) -> None:
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "save_pretrained"):
        raise AnyquantError(
            f"{type(model).__name__} is not a transformers model (no config / save_pretrained); "
            "use anyquant.quantize on it in memory, or load it from a model directory"
        )
    had = getattr(config, "quantization_config", None)
    config.quantization_config = quantization_config
    kwargs: dict[str, Any] = {}
    if _reverting_merges_quantized(model):
        # transformers saves in the checkpoint's original layout by undoing its load-time
        # conversions; one that merges or splits tensors (Molmo2's fused att_proj) would mix
        # packed int4 / 4-bit tensors with their shapes and scales. Saved as loaded instead:
        # transformers loads that layout as it is.
        kwargs["save_original_format"] = False
        log.info("%s: saved in transformers' loaded layout (its conversion would merge quantized tensors)",
                 type(model).__name__)
    try:
        model.save_pretrained(directory, safe_serialization=True, **kwargs)
    finally:
        if had is None:
            del config.quantization_config
        else:
            config.quantization_config = had


def _reverting_merges_quantized(model: nn.Module) -> bool:
    """Would save_pretrained's reverse weight conversion touch a quantized module's tensors with
    anything but a rename that loading undoes (a merge, split or transpose; a one-way rename)?"""

    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers without load-time conversions
        return False
    qtypes = quantized_linear_types()
    probe: dict[str, torch.Tensor] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, qtypes):
            for k, t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
                if t is not None:
                    probe[f"{name}.{k}"] = torch.empty(tuple(t.shape), dtype=t.dtype, device="meta")
    if not probe:
        return False
    try:
        reverted = revert_weight_conversion(model, dict(probe))
    except Exception:  # noqa: BLE001 — a conversion that cannot even run on these tensors merges them
        return True
    if len(reverted) != len(probe):
        return True
    if sorted(tuple(t.shape) for t in reverted.values()) != sorted(tuple(t.shape) for t in probe.values()):
        return True
    # A rename written for a float checkpoint's own names (Inkling2: `sconv.weight_proj` ->
    # `sconv.weight_proj.weight`) need not map the quantized tensors' saved names back.
    rename = checkpoint_key_renamer(model)
    return {rename(k) for k in reverted} != set(probe)


def _copy_tokenizer_files(src: Path, dst: Path) -> None:
    for f in src.iterdir():
        if f.is_file() and (f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template", "preprocessor", "processor"))):
            shutil.copy2(f, dst / f.name)


def _copy_remote_code(src: Path, dst: Path) -> None:
    for f in src.glob("*.py"):
        if not (dst / f.name).exists():
            shutil.copy2(f, dst / f.name)


def load_quantized(directory: str | Path, *, trust_remote_code: bool = False, device=None, device_map=None,
                   fuse: bool = False) -> nn.Module:
    """Load an anyquant output. bitsandbytes outputs go through transformers as they are;
    int4 outputs are rebuilt with anyquant's Int4Linear (any device, no compressed-tensors needed).
    device / device_map / fuse: see Format.load (default: the CPU, unfused)."""

    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise AnyquantError(f"{directory}: no such model directory")
    manifest = read_manifest(directory)
    if manifest is None:
        raise AnyquantError(f"{directory}: no {MANIFEST}: not an anyquant output (load it with transformers)")
    return format_for(manifest.get("format", "compressed-tensors")).load(
        directory, manifest, trust_remote_code, device=device, device_map=device_map, fuse=fuse)


def load_source(source: str | Path, **kwargs: Any):
    """model.load.load_model for any source, an anyquant output included (built by
    load_quantized; with requantize=True it is then dequantized). Returns (model, tokenizer, SourceInfo)."""
    path = resolve_source(source)
    loader = None
    if (path / MANIFEST).is_file():
        trc = kwargs.get("trust_remote_code", False)

        def loader(p: Path) -> nn.Module:
            return load_quantized(p, trust_remote_code=trc)
    return load_model(path, loader=loader, **kwargs)
