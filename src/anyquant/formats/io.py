"""save() and load(): whole outputs or nothing, readable by stock transformers.

A save goes into a temporary sibling directory, renamed into place once every file is written,
so a crash or Ctrl-C never leaves a half-written output where a user expects a model.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from anyquant.errors import AnyquantError
from anyquant.formats.hf_config import (
    bnb_quantization_config,
    compressed_tensors_config,
)
from anyquant.formats.manifest import (
    MANIFEST,
    build_manifest,
    read_manifest,
    write_manifest,
)
from anyquant.methods import handler_for
from anyquant.methods.bnb import pin_bnb_modules
from anyquant.model.load import load_model, model_classes, resolve_source
from anyquant.model.modelmap import linear_features, quantized_linear_types
from anyquant.model.tree import set_submodule
from anyquant.numerics.dtype import DTYPES
from anyquant.planning import Plan
from anyquant.runtime.int4_linear import Int4Linear

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

            qc = bnb_quantization_config(result.plan, compute_dtype)
            qc["llm_int8_skip_modules"] = _float_linear_names(model, qc.get("llm_int8_skip_modules") or [])
        else:

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


def _float_linear_names(model: nn.Module, skip: list[str]) -> list[str]:
    """`skip` plus every module left in float that transformers' bitsandbytes loader could
    still turn into a quantized one, whatever the plan's kind for it: an nn.Linear subclass kept
    because its forward is not a plain linear map (Llama 4's router), and fused expert weights
    (a 3-D parameter: transformers may unfuse them into Linear layers to quantize). Unlisted,
    transformers builds quantized modules there and finds no quantized weights for them."""

    qtypes = quantized_linear_types()
    out = list(skip)
    for name, mod in model.named_modules():
        if not name or name in out or isinstance(mod, qtypes):
            continue
        # (a skip entry covers the whole subtree: never one holding Linear layers to load quantized)
        fused = not isinstance(mod, (nn.modules.conv._ConvNd, nn.Embedding)) and any(
            p.dim() >= 3 and p.is_floating_point() for p in mod.parameters(recurse=False)) and not any(
            isinstance(c, nn.Linear) for c in mod.modules())
        if isinstance(mod, nn.Linear) or fused:
            out.append(name)
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
    rename = _checkpoint_key_renamer(model)
    return {rename(k) for k in reverted} != set(probe)


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
        for auto in _model_classes(AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)):
            try:
                model = auto.from_pretrained(directory, trust_remote_code=trust_remote_code).eval()
            except ValueError:
                continue

            return pin_bnb_modules(model)
        raise AnyquantError(f"{directory}: transformers could not load this bitsandbytes checkpoint")
    return _load_int4(directory, manifest, trust_remote_code)


def _load_int4(directory: Path, manifest: dict[str, Any], trust_remote_code: bool) -> nn.Module:
    """transformers loads the float tensors (with the weight conversions it applies at load: fused
    MoE experts, renamed legacy keys, ...), then each planned module becomes an Int4Linear filled
    from the checkpoint's packed tensors, whose keys go through the same renamings."""
    from safetensors import safe_open
    from transformers import AutoConfig


    config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plan = Plan.from_dict(manifest["plan"])
    dtype = DTYPES[plan.compute_dtype]
    model, info = _from_pretrained_float(directory, config, dtype, trust_remote_code)
    symmetric = bool(plan.config.get("symmetric", False))
    todo = plan.to_quantize()
    for d in todo:
        try:
            mod = model.get_submodule(d.name)
        except AttributeError as e:
            raise AnyquantError(f"{directory}: the plan quantizes {d.name}, which the rebuilt model lacks") from e
        feats = linear_features(mod)
        if feats is None:
            raise AnyquantError(f"{directory}: the plan quantizes {d.name}, but the rebuilt model has a "
                                f"{type(mod).__name__} there, not a linear layer")
        in_f, out_f = feats
        q = Int4Linear(in_f, out_f, int(d.options.get("group_size", plan.config["group_size"])),
                       getattr(mod, "bias", None) is not None, symmetric, dtype)
        set_submodule(model, d.name, q)
    wanted = {f"{d.name}.{k}" for d in todo for k, _ in
              list(model.get_submodule(d.name).named_buffers(recurse=False))
              + list(model.get_submodule(d.name).named_parameters(recurse=False))}
    rename = _checkpoint_key_renamer(model)
    found: dict[str, torch.Tensor] = {}
    placed: set[str] = set()  # what transformers called these keys (its report renames them)
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():
                name = key if key in wanted else rename(key)
                if name in wanted:
                    found[name] = sf.get_tensor(key)
                    placed.update((key, rename(key)))
    lacking = sorted(wanted - set(found))
    if lacking:
        raise AnyquantError(f"{directory}: checkpoint lacks the int4 tensors {lacking[:5]}")
    # What transformers could not place: only the int4 tensors (placed above) may be left over,
    # and only the planned modules' float weights may be missing.
    replaced = {f"{d.name}.{p}" for d in todo for p in ("weight", "bias")}
    unexpected = sorted(k for k in info.get("unexpected_keys", ()) if k not in wanted and k not in placed)
    if unexpected:
        raise AnyquantError(f"{directory}: checkpoint tensors the model has no place for: {unexpected[:5]}")
    missing = sorted(k for k in info.get("missing_keys", ()) if k not in replaced)
    if missing:
        raise AnyquantError(f"{directory}: checkpoint lacks tensors: {missing[:5]}")
    state = model.state_dict()
    for name, t in found.items():
        if state[name].shape != t.shape:
            raise AnyquantError(f"{directory}: {name} has shape {tuple(t.shape)} in the checkpoint, "
                                f"{tuple(state[name].shape)} in the model")
        state[name].copy_(t.to(state[name].dtype))
    return model.eval()


def _checkpoint_key_renamer(model: nn.Module):
    """checkpoint key -> model key, through the renamings transformers applied when it loaded
    `model` (converters, which merge tensors, never match the int4 buffers)."""
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    renamings = [t for t in (getattr(model, "_weight_conversions", None) or []) if isinstance(t, WeightRenaming)]
    meta = dict.fromkeys(model.state_dict().keys(), True)
    prefix = getattr(model, "base_model_prefix", None) or None

    def rename(key: str) -> str:
        return rename_source_key(key, renamings, [], prefix, meta)[0]

    return rename


def _drop_load_report(record: logging.LogRecord) -> bool:
    return "LOAD REPORT" not in str(record.msg)


def _from_pretrained_float(directory: Path, config, dtype: torch.dtype, trust_remote_code: bool):
    """The checkpoint's float tensors through transformers' own loading; the class named in
    config.architectures first (the auto classes can map a type to another head).
    Returns (model, transformers' loading info)."""
    kwargs = {"config": config, "dtype": dtype, "trust_remote_code": trust_remote_code, "output_loading_info": True}
    last: Exception | None = None
    # transformers' load report would list every quantized layer's weight as missing and its
    # int4 tensors as unexpected: true, expected, and checked by the caller instead.
    # (A filter, not a level: transformers runs extra checks when its logger's level is above WARNING.)
    report_logs = [logging.getLogger(n) for n in ("transformers.modeling_utils", "transformers.utils.loading_report")]
    for cls in _model_classes(config):
        try:
            for lg in report_logs:
                lg.addFilter(_drop_load_report)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model, info = cls.from_pretrained(directory, **kwargs)
            return model, info
        except ValueError as e:  # this auto class does not know the config type
            last = e
        finally:
            for lg in report_logs:
                lg.removeFilter(_drop_load_report)
    raise AnyquantError(f"cannot build a model for config type {config.model_type}: {last}")


def _model_classes(config) -> list[Any]:

    return model_classes(getattr(config, "architectures", None))


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
