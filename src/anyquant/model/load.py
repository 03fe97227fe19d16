"""Load a source model and refuse what cannot be quantized safely, before any weight changes.

Checks run on the files first (cheap, and transformers would hide some problems: it silently
loads a uint8 checkpoint into float Linear layers as values 0..255), then on the loaded model.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open

from anyquant.errors import AlreadyQuantizedError, AnyquantError
from anyquant.model.default import default_model_dir
from anyquant.model.dequant import dequantize_modules
from anyquant.model.integrity import index_files, source_fingerprint, weight_files

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


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
# Files a transformers load never needs: other runtimes' formats, original (non-HF) checkpoints.
HUB_IGNORE = ["*.gguf", "*.onnx", "*.onnx_data", "*.msgpack", "*.h5", "*.ot", "*.tflite", "*.mlmodel",
              "original/*", "onnx/*", "coreml/*"]


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def resolve_hub_id(source: str) -> Path:
    """A Hugging Face hub id (`org/name`, optionally `@revision`) as a local snapshot directory:
    the local Hugging Face cache first (`HF_HUB_CACHE` / `HF_HOME` honoured, read now, not at
    import), then a download unless `HF_HUB_OFFLINE` is set."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo_id, _, revision = source.partition("@")
    cache = os.environ.get("HF_HUB_CACHE") or (
        str(Path(os.environ["HF_HOME"]) / "hub") if os.environ.get("HF_HOME") else None)
    kwargs = {"repo_id": repo_id, "revision": revision or None, "cache_dir": cache}
    try:
        path = huggingface_hub.snapshot_download(**kwargs, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        path = None
    if path is None:
        where = cache or huggingface_hub.constants.HF_HUB_CACHE
        if hub_offline():
            raise AnyquantError(
                f"{source}: not a local directory, and the hub model {repo_id} is not in the Hugging Face cache "
                f"({where}) while HF_HUB_OFFLINE is set; download it where a network exists "
                f"(`hf download {repo_id}`) or unset HF_HUB_OFFLINE")
        try:
            path = huggingface_hub.snapshot_download(**kwargs, ignore_patterns=HUB_IGNORE)
        except Exception as e:  # noqa: BLE001 — no network, gated or unknown repo: all one answer
            raise AnyquantError(
                f"{source}: not a local directory, not in the Hugging Face cache ({where}), and downloading "
                f"{repo_id} failed ({type(e).__name__}: {' '.join(str(e).split())[:200]}); check the id and the "
                "network (gated models need `hf auth login`), or give a local model directory") from None
        log.info("%s: downloaded to %s", source, path)
    else:
        log.info("%s: found in the Hugging Face cache: %s", source, path)
    return Path(path)


def resolve_source(source: str | Path) -> Path:
    if str(source) == "default":

        return default_model_dir()
    path = Path(source).expanduser()
    if not path.exists() and isinstance(source, str) and HUB_ID.match(source):
        path = resolve_hub_id(source)
    if not path.exists():
        raise AnyquantError(f"{path}: no such file or directory (give a local model directory, a Hugging Face "
                            "hub id such as org/name, or `default`)")
    if not path.is_dir():
        raise AnyquantError(f"{path}: is a file, not a model directory (expected a directory with config.json)")
    if not (path / "config.json").exists():
        raise AnyquantError(
            f"{path}: not a model directory: no config.json (expected a transformers model saved "
            "with save_pretrained)"
        )
    return path


def _weight_files(path: Path) -> list[Path]:
    files = weight_files(path)
    if not files:
        raise AnyquantError(f"{path}: holds config.json but no weights (*.safetensors or *.bin)")
    return files


def fingerprint(path: Path) -> str:
    """sha256 over config.json and the full content of every weight file (model.integrity:
    each file's hash is cached by path, size and mtime_ns, so an unchanged source is read once)."""
    return source_fingerprint(path)


def inspect_files(path: Path, *, with_fingerprint: bool = True) -> SourceInfo:
    """Read config, safetensors headers and pickled state dicts (weights_only): corrupt or
    unsafe files, missing shards and quantized tensors, before transformers sees any of them.
    `with_fingerprint=False`: the caller hashes the weights itself (model.integrity), e.g. in the
    background while it works."""
    try:
        config = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise AnyquantError(f"{path / 'config.json'}: not valid JSON ({e}); re-save the model") from e
    if not isinstance(config, dict):
        raise AnyquantError(f"{path / 'config.json'}: holds a {type(config).__name__}, not a JSON object; re-save the model")
    info = SourceInfo(path=path, config=config)
    qc = config.get("quantization_config") or _sub_config_value(config, "quantization_config")
    if qc:
        info.quantization_config = qc
    files = _weight_files(path)
    _check_shards(path, files)
    for f in files:
        tensors = _safetensors_dtypes(f) if f.suffix == ".safetensors" else _pickle_dtypes(f)
        for name, dtype, is_float in tensors:
            if name.endswith(QUANTIZED_SUFFIXES) or (name.endswith(".weight") and not is_float):
                info.quantized_tensors.append(f"{name} ({dtype}, in {f.name})")
    if with_fingerprint:
        info.fingerprint = fingerprint(path)
    return info


def _check_shards(path: Path, files: list[Path]) -> None:
    """Every shard a sharded checkpoint's index names is there (transformers would fail late, or
    with a traceback)."""
    names = {f.name for f in files}
    for index in index_files(path):
        kind = ".safetensors" if ".safetensors" in index.name else ".bin"
        if not any(f.suffix == kind for f in files):
            continue  # an index of the format transformers does not read here
        try:
            weight_map = json.loads(index.read_text()).get("weight_map", {})
        except (ValueError, OSError, AttributeError) as e:
            raise AnyquantError(f"{index}: not a valid shard index ({e}); re-save the model") from e
        if not isinstance(weight_map, dict):
            raise AnyquantError(f"{index}: its weight_map is not a JSON object; re-save the model")
        lacking = sorted({str(v) for v in weight_map.values()} - names)
        if lacking:
            raise AnyquantError(f"{path}: shard {lacking[0]} named in {index.name} is missing "
                                f"({len(lacking)} of {len(set(weight_map.values()))} shards); re-download it")


def checkpoint_float_dtype(path: Path) -> torch.dtype:
    """The float dtype holding most of a checkpoint's elements (safetensors headers only;
    float32 for pickled checkpoints, which have no header to read)."""
    counts: dict[str, int] = {}
    for f in weight_files(path):
        if f.suffix != ".safetensors":
            continue
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                sl = st.get_slice(name)
                dtype = sl.get_dtype()
                if dtype in FLOAT_DTYPES:
                    counts[dtype] = counts.get(dtype, 0) + math.prod(sl.get_shape())
    names = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    best = max(counts, key=counts.get, default="F32")
    return names.get(best, torch.float32)


def _safetensors_dtypes(f: Path) -> list[tuple[str, str, bool]]:
    try:
        with safe_open(str(f), framework="pt") as st:
            out = []
            for name in st.keys():
                dtype = st.get_slice(name).get_dtype()
                out.append((name, dtype, dtype in FLOAT_DTYPES))
            return out
    except (SafetensorError, OSError, ValueError) as e:
        raise AnyquantError(f"{f}: corrupt or unreadable safetensors file ({e}); re-download or re-save it") from e


def _pickle_dtypes(f: Path) -> list[tuple[str, str, bool]]:
    """A pickled state dict read with torch.load(weights_only=True): tensors and plain
    containers only, so a file that would run code when unpickled is refused, never run."""
    try:
        try:
            state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            state = torch.load(f, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as e:
        raise AnyquantError(
            f"{f}: refused: not a plain tensor file ({_unpickle_reason(e)}); unpickling it could run "
            "code, so it is never loaded: re-save it as safetensors where you trust its origin") from e
    except Exception as e:  # noqa: BLE001 — torch.load's errors for a damaged file have no common type
        raise AnyquantError(f"{f}: corrupt or unreadable PyTorch file ({type(e).__name__}: "
                            f"{_first_line(str(e))}); re-download or re-save it") from e
    out: list[tuple[str, str, bool]] = []
    _walk_tensors(state, "", out)
    del state
    return out


def _walk_tensors(obj: Any, prefix: str, out: list[tuple[str, str, bool]]) -> None:
    if isinstance(obj, torch.Tensor):
        out.append((prefix, _DTYPE_NAMES.get(obj.dtype, str(obj.dtype)), obj.is_floating_point()))
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _walk_tensors(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _walk_tensors(v, f"{prefix}.{i}" if prefix else str(i), out)


_DTYPE_NAMES = {torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
                torch.bool: "BOOL", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                torch.float64: "F64"}


def _unpickle_reason(e: Exception) -> str:
    text = str(e)
    marker = "WeightsUnpickler error:"
    if marker in text:
        return _first_line(text.split(marker, 1)[1]).split(" Please use")[0].strip()
    return "torch.load(weights_only=True) failed"


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return (lines[0] if lines else "")[:200]


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


def _config_of_type(path: Path, info: SourceInfo, trust_remote_code: bool):
    """The config of the checkpoint's model_type through AutoConfig, or None where its type is
    unknown to transformers (remote code not trusted, a type of a newer version)."""
    from transformers import AutoConfig

    if not info.config.get("model_type"):
        return None
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 — the class then reads config.json itself, as before
        return None


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
        loading: dict[str, Any] = {}
        own_config = _config_of_type(path, info, trust_remote_code)
        for auto in model_classes(info.config.get("architectures")):
            extra = {}
            cc = getattr(auto, "config_class", None)
            if own_config is not None and isinstance(cc, type) and getattr(cc, "model_type", None) != own_config.model_type:
                # a class shared by several types (EXAONE loads as LlamaForCausalLM): the config
                # keeps its own type's class, or it would be saved as the class's type ("llama")
                # and the output's checkpoint names (EXAONE's `transformer.h.*`) read back by
                # nobody's renamings
                extra["config"] = own_config
            try:
                model, loading = auto.from_pretrained(path, output_loading_info=True, **kwargs, **extra)
                break
            except ValueError as e:  # this auto class does not know the config type
                last_error = e
            except RuntimeError as e:
                if "mismatched_sizes" not in str(e):
                    raise
                raise AnyquantError(f"{path}: a checkpoint tensor's shape does not match config.json "
                                    f"(transformers: {_first_line(str(e))}); re-save the model or fix its "
                                    "config.json") from e
        if model is None:
            raise AnyquantError(f"{path}: transformers cannot load this model ({last_error})")
        check_loading_info(path, loading)
    model.eval()
    _own_weights(model)
    if requantize and qc:
        model = dequantize_modules(model)
        log.warning("%s was already quantized (%s); dequantized before quantizing again", path, qc.get("quant_method"))
    return model


def check_loading_info(path: Path, loading: dict[str, Any]) -> None:
    """A source is read completely or refused: transformers fills a tensor the checkpoint lacks
    with random values (its load report is a log line) and drops tensors it has no place for.
    Its report leaves out what it rightly recomputes or re-ties (non-persistent buffers such as
    rotary inv_freq, tied output embeddings) and the keys the model class declares ignorable."""
    missing = sorted(loading.get("missing_keys") or ())
    unexpected = sorted(loading.get("unexpected_keys") or ())
    mismatched = sorted(str(k[0]) if isinstance(k, (tuple, list)) else str(k)
                        for k in loading.get("mismatched_keys") or ())
    if missing:
        raise AnyquantError(
            f"{path}: the checkpoint lacks {len(missing)} tensor(s) the model needs ({_names(missing)}); "
            "transformers would fill them with random values: re-download or re-save the model")
    if mismatched:
        raise AnyquantError(f"{path}: checkpoint tensor(s) {_names(mismatched)} do not have the shape the "
                            "model's config.json gives; re-save the model or fix its config.json")
    if unexpected:
        raise AnyquantError(
            f"{path}: the checkpoint holds {len(unexpected)} tensor(s) the model has no place for "
            f"({_names(unexpected)}); transformers would drop them: check that config.json "
            "(architectures, model_type) belongs to these weights")


def _names(keys: list[str], n: int = 3) -> str:
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


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




TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "processor_config.json", "preprocessor_config.json")


def load_tokenizer(path: Path, trust_remote_code: bool, *, required: bool = False):
    """The directory's tokenizer: AutoTokenizer (remote code with trust_remote_code), else the
    tokenizer of its AutoProcessor (VLMs whose tokenizer is only reachable through their
    processor). None where the directory has none; `required=True` raises, saying why."""
    from transformers import AutoTokenizer

    path = Path(path).expanduser()
    if not any((path / f).exists() for f in TOKENIZER_FILES):
        if required:
            raise AnyquantError(f"--tokenizer {path}: no tokenizer files there ({', '.join(TOKENIZER_FILES[:3])}); "
                                "give the directory of the model's tokenizer")
        return None
    errors = []
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 — remote tokenizer code fails in many ways; the processor may still work
        errors.append(f"AutoTokenizer: {type(e).__name__}: {str(e)[:200]}")
    try:
        from transformers import AutoProcessor

        proc = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
        tok = getattr(proc, "tokenizer", None)
        if tok is not None:
            return tok
        errors.append(f"AutoProcessor: {type(proc).__name__} has no tokenizer")
    except Exception as e:  # noqa: BLE001 — as above
        errors.append(f"AutoProcessor: {type(e).__name__}: {str(e)[:200]}")
    hint = "" if trust_remote_code else " (remote-code tokenizers need --trust-remote-code)"
    if required:
        raise AnyquantError(f"--tokenizer {path}: not loadable{hint}: {'; '.join(errors)}")
    log.warning("%s: tokenizer present but not loadable%s (%s); continuing without one", path, hint, "; ".join(errors))
    return None


def check_finite(model: torch.nn.Module) -> None:
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if p.is_floating_point() and p.device.type != "meta" and not all_finite(p):
            bad = (~torch.isfinite(p)).sum().item()
            raise AnyquantError(
                f"tensor {name} holds {bad} NaN/inf value(s); the source model is broken — "
                "fix or re-export its weights before quantizing"
            )


# exponent bits of each float format, read as the same-width integer: all ones means inf or NaN
_EXPONENT_MASK = {torch.bfloat16: (torch.int16, 0x7F80), torch.float16: (torch.int16, 0x7C00),
                  torch.float32: (torch.int32, 0x7F800000)}


def all_finite(t: torch.Tensor) -> bool:
    """torch.isfinite(t).all() at memory speed on a CPU (its float path is several times slower,
    16-bit floats most): a float is inf or NaN exactly when its exponent bits are all ones."""
    spec = _EXPONENT_MASK.get(t.dtype)
    if spec is None or t.device.type != "cpu" or not t.is_contiguous():
        return bool(torch.isfinite(t).all())
    int_dtype, mask = spec
    bits = t.view(int_dtype)
    return not bool(((bits & mask) == mask).any())
