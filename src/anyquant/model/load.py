"""Load a source model and refuse what cannot be quantized safely, before any weight changes.

Checks run on the files first (cheap, and transformers would hide some problems: it silently
loads a uint8 checkpoint into float Linear layers as values 0..255), then on the loaded model.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open

from anyquant.errors import AlreadyQuantizedError, AnyquantError
from anyquant.model.default import default_model_dir
from anyquant.model.dequant import dequantize_modules

log = logging.getLogger(__name__)

FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
QUANTIZED_SUFFIXES = (
    ".weight_packed", ".weight_scale", ".weight_zero_point", ".SCB", ".absmax",
    ".quant_map", ".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4",
    ".nested_absmax", ".qweight", ".qzeros", ".scales", ".g_idx",
)


@dataclass
class SourceInfo:
    path: Path | None
    config: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""
    quantized_tensors: list[str] = field(default_factory=list)
    quantization_config: dict[str, Any] | None = None


def resolve_source(source: str | Path) -> Path:
    if str(source) == "default":

        return default_model_dir()
    path = Path(source).expanduser()
    if not path.exists():
        raise AnyquantError(f"{path}: no such file or directory (give a local model directory, or `default`)")
    if not path.is_dir():
        raise AnyquantError(f"{path}: is a file, not a model directory (expected a directory with config.json)")
    if not (path / "config.json").exists():
        raise AnyquantError(
            f"{path}: not a model directory: no config.json (expected a transformers model saved "
            "with save_pretrained)"
        )
    return path


def _weight_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    if not files and not list(path.glob("*.bin")) and not list(path.glob("*.pt")):
        raise AnyquantError(f"{path}: holds config.json but no weights (*.safetensors or *.bin)")
    return files


def fingerprint(path: Path) -> str:
    """sha256 over config.json and, for each weight file, its name, size and first and last MiB.

    Hashing every byte of a multi-GB checkpoint would cost more than quantizing it; size plus
    head and tail catch every realistic change (re-save, re-shard, other dtype)."""
    h = hashlib.sha256()
    h.update((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            if size > (2 << 20):
                fh.seek(-(1 << 20), 2)
                h.update(fh.read(1 << 20))
    return "sha256:" + h.hexdigest()


def inspect_files(path: Path) -> SourceInfo:
    """Read config and safetensors headers: corrupt files and quantized tensors, no weights loaded."""
    try:
        config = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise AnyquantError(f"{path / 'config.json'}: not valid JSON ({e}); re-save the model") from e
    info = SourceInfo(path=path, config=config)
    qc = config.get("quantization_config") or _sub_config_value(config, "quantization_config")
    if qc:
        info.quantization_config = qc
    for f in _weight_files(path):
        try:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    dtype = st.get_slice(name).get_dtype()
                    if name.endswith(QUANTIZED_SUFFIXES) or (
                        name.endswith(".weight") and dtype not in FLOAT_DTYPES
                    ):
                        info.quantized_tensors.append(f"{name} ({dtype}, in {f.name})")
        except (SafetensorError, OSError, ValueError) as e:
            raise AnyquantError(f"{f}: corrupt or unreadable safetensors file ({e}); re-download or re-save it") from e
    info.fingerprint = fingerprint(path)
    return info


def _sub_config_value(config: dict, key: str) -> Any:
    for v in config.values():
        if isinstance(v, dict) and v.get(key):
            return v[key]
    return None


def refuse_if_quantized(info: SourceInfo) -> None:
    """F5: never quantize what is already quantized without being told to."""
    if info.quantization_config:
        method = info.quantization_config.get("quant_method", "unknown")
        first = info.quantized_tensors[0] if info.quantized_tensors else "(see config.json)"
        raise AlreadyQuantizedError(
            f"{info.path}: already quantized ({method} quantization_config; first quantized tensor "
            f"{first}); pass --requantize to dequantize it first and quantize again"
        )
    if info.quantized_tensors:
        raise AlreadyQuantizedError(
            f"{info.path}: already quantized: tensor {info.quantized_tensors[0]} is not a float "
            "weight (transformers would silently load it as float values); pass --requantize "
            "to dequantize it first, if its scales are in the checkpoint"
        )


def _auto_classes():
    from transformers import (
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
    )

    return (AutoModelForCausalLM, AutoModelForImageTextToText, AutoModel)


def model_classes(architectures: list[str] | None) -> list[Any]:
    """The transformers classes named in config.architectures (what was saved), then the auto
    classes: AutoModelForCausalLM maps some VLM types to their text-only class (llama4, mllama,
    qwen3_5), which would drop the vision tower."""
    import transformers

    classes: list[Any] = []
    for arch in architectures or []:
        cls = getattr(transformers, arch, None)
        if isinstance(cls, type) and hasattr(cls, "from_pretrained"):
            classes.append(cls)
    return classes + list(_auto_classes())


def load_model(
    source: str | Path,
    *,
    trust_remote_code: bool = False,
    requantize: bool = False,
    dtype: torch.dtype | None = None,
    refuse_quantized: bool = True,
    loader: Callable[[Path], torch.nn.Module] | None = None,
) -> tuple[torch.nn.Module, Any, SourceInfo]:
    """Load a model directory (or `default`), returning (model, tokenizer or None, SourceInfo).

    Refuses already-quantized sources unless `requantize`; then dequantizes and records it.
    `loader` builds the model instead of transformers' auto classes (formats.io.load_source
    passes anyquant's own loader for an anyquant output)."""
    path = resolve_source(source)
    info = inspect_files(path)
    if refuse_quantized and not requantize:
        refuse_if_quantized(info)
    if info.config.get("auto_map") and not trust_remote_code:
        raise AnyquantError(
            f"{path}: the model's config.json names custom modeling code (auto_map); "
            "pass --trust-remote-code to run it, after reading that code"
        )
    if requantize and refuse_quantized and info.quantized_tensors and not info.quantization_config:
        raise AnyquantError(
            f"{path}: cannot dequantize {info.quantized_tensors[0]}: the checkpoint has integer "
            "weights but no quantization_config saying how to turn them back into floats; "
            "re-export the float model instead"
        )
    model = _from_pretrained(path, info, trust_remote_code, dtype, requantize, loader)
    check_finite(model)
    tokenizer = load_tokenizer(path, trust_remote_code)
    return model, tokenizer, info


def _from_pretrained(path, info, trust_remote_code, dtype, requantize, loader=None):
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = dtype
    else:
        kwargs["dtype"] = "auto"
    qc = info.quantization_config
    if requantize and qc and qc.get("quant_method") == "compressed-tensors":
        from transformers import CompressedTensorsConfig

        kwargs["quantization_config"] = CompressedTensorsConfig(run_compressed=False)
    if loader is not None:
        model = loader(path)
    else:
        last_error: Exception | None = None
        model = None
        for auto in model_classes(info.config.get("architectures")):
            try:
                model = auto.from_pretrained(path, **kwargs)
                break
            except ValueError as e:  # this auto class does not know the config type
                last_error = e
        if model is None:
            raise AnyquantError(f"{path}: transformers cannot load this model ({last_error})")
    model.eval()
    _own_weights(model)
    if requantize and qc:
        model = dequantize_modules(model)
        log.warning("%s was already quantized (%s); dequantized before quantizing again", path, qc.get("quant_method"))
    return model


@torch.no_grad()
def _own_weights(model: torch.nn.Module) -> None:
    """Copy CPU weights out of the safetensors file mapping into the process's own memory.

    transformers maps each weight file and leaves tensors as views into that mapping, which
    lives as long as any one of them does (the tied embedding, for instance). Quantizing
    replaces the float weights, but their pages stay mapped and resident, so the process kept
    the whole float model for its whole life and block-by-block calibration grew by about a
    float block per block (benchmarks/calib_memory.py). Once copied, a replaced weight is
    really freed. Copies go one tensor at a time: the transient extra is one tensor, plus the
    file's pages, which the kernel can drop at any time."""
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type == "cpu" and not t.is_meta:
            t.data = t.data.clone()

    gc.collect()  # drop the last views, so the mapping goes now rather than at some later collection




def load_tokenizer(path: Path, trust_remote_code: bool):
    from transformers import AutoTokenizer

    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        log.warning("%s: tokenizer present but not loadable (%s); continuing without one", path, e)
        return None


def check_finite(model: torch.nn.Module) -> None:
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if p.is_floating_point() and p.device.type != "meta" and not torch.isfinite(p).all():
            bad = (~torch.isfinite(p)).sum().item()
            raise AnyquantError(
                f"tensor {name} holds {bad} NaN/inf value(s); the source model is broken — "
                "fix or re-export its weights before quantizing"
            )
