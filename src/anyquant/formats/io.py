"""save() and load(): whole outputs or nothing, readable by stock transformers.

A save goes into a temporary sibling directory, renamed into place once every file is written,
so a crash or Ctrl-C never leaves a half-written output where a user expects a model.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from anyquant.errors import AnyquantError
from anyquant.formats.manifest import MANIFEST, build_manifest, read_manifest, write_manifest
from anyquant.methods.registry import handler_for, set_submodule
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
        if handler.format == "bitsandbytes":
            from anyquant.formats.hf_config import bnb_quantization_config

            qc = bnb_quantization_config(result.plan, compute_dtype)
        else:
            from anyquant.formats.hf_config import compressed_tensors_config

            qc = compressed_tensors_config(result.plan)
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
    try:
        model.save_pretrained(directory, safe_serialization=True)
    finally:
        if had is None:
            del config.quantization_config
        else:
            config.quantization_config = had


def _copy_tokenizer_files(src: Path, dst: Path) -> None:
    for f in src.iterdir():
        if f.is_file() and (f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template", "preprocessor", "processor"))):
            shutil.copy2(f, dst / f.name)


def _copy_remote_code(src: Path, dst: Path) -> None:
    for f in src.glob("*.py"):
        if not (dst / f.name).exists():
            shutil.copy2(f, dst / f.name)


def load_quantized(directory: str | Path, *, trust_remote_code: bool = False) -> nn.Module:
    """Load an anyquant output. bitsandbytes outputs go through transformers as they are;
    int4 outputs are rebuilt with anyquant's Int4Linear (any device, no compressed-tensors needed)."""
    from transformers import AutoConfig

    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise AnyquantError(f"{directory}: no such model directory")
    manifest = read_manifest(directory)
    if manifest is None:
        raise AnyquantError(f"{directory}: no {MANIFEST}: not an anyquant output (load it with transformers)")
    if manifest.get("format") == "bitsandbytes":
        from anyquant.model.load import _auto_classes

        for auto in _auto_classes():
            try:
                model = auto.from_pretrained(directory, trust_remote_code=trust_remote_code).eval()
            except ValueError:
                continue
            from anyquant.methods.bnb import keep_compute_dtype

            return keep_compute_dtype(model)
        raise AnyquantError(f"{directory}: transformers could not load this bitsandbytes checkpoint")
    return _load_int4(directory, manifest, trust_remote_code)


def _load_int4(directory: Path, manifest: dict[str, Any], trust_remote_code: bool) -> nn.Module:
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from anyquant.plan import Plan
    from anyquant.runtime.int4_linear import Int4Linear

    config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plan = Plan.from_dict(manifest["plan"])
    dtype = DTYPES[plan.compute_dtype]
    model = _from_config(config, dtype, trust_remote_code)
    symmetric = bool(plan.config.get("symmetric", False))
    for d in plan.to_quantize():
        lin = model.get_submodule(d.name)
        q = Int4Linear(lin.in_features, lin.out_features, int(d.options.get("group_size", plan.config["group_size"])),
                       lin.bias is not None, symmetric, dtype)
        set_submodule(model, d.name, q)
    state: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise AnyquantError(f"{directory}: checkpoint tensors the model has no place for: {unexpected[:5]}")
    tied = _tied_names(model)
    really_missing = [k for k in missing if k not in tied]
    if really_missing:
        raise AnyquantError(f"{directory}: checkpoint lacks tensors: {really_missing[:5]}")
    return model.eval()


def _tied_names(model: nn.Module) -> set[str]:
    """Parameter names that share storage with another name (saved once, under one of them)."""
    from collections import defaultdict

    owners: dict[int, list[str]] = defaultdict(list)
    for mname, mod in model.named_modules(remove_duplicate=False):
        for pname, p in mod.named_parameters(recurse=False):
            owners[id(p)].append(f"{mname}.{pname}" if mname else pname)
    return {n for v in owners.values() if len(v) > 1 for n in v}


def _from_config(config, dtype: torch.dtype, trust_remote_code: bool) -> nn.Module:
    from anyquant.model.load import _auto_classes

    last: Exception | None = None
    for auto in _auto_classes():
        try:
            return auto.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        except ValueError as e:
            last = e
    raise AnyquantError(f"cannot build a model for config type {config.model_type}: {last}")
