"""Input files checked before anything opens them: text files are UTF-8 text, weight files and
config.json are regular files holding what transformers expects, every shard is present.

A FIFO or a device given where a file is expected would block the first read forever, a
directory fails deep inside transformers with a traceback, and a binary file read with
errors="replace" calibrates on garbage: each is refused here, in one line that names the file,
the problem and the fix, before any long work starts."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import torch

from anyquant.errors import AnyquantError
from anyquant.model.load import model_classes

# config.json fields that transformers' strict config classes require to be integers.
INT_FIELDS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "vocab_size", "max_position_embeddings", "head_dim",
)
SUB_CONFIGS = ("text_config", "vision_config", "language_config")


def file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def check_regular_file(path: Path, what: str) -> None:
    """`path` exists and is a regular file (stat only: nothing is opened, so a FIFO cannot block)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise AnyquantError(f"{what} {path}: no such file") from None
    except OSError as e:
        raise AnyquantError(f"{what} {path}: cannot read it ({e.strerror})") from None
    if not stat.S_ISREG(mode):
        raise AnyquantError(f"{what} {path}: is {file_kind(mode)}, not a file; give a regular file")


def read_text_file(path: str | Path, what: str, purpose: str) -> str:
    """The contents of a UTF-8 text file; a directory, FIFO, binary or empty file is refused.

    `what` names the option (`--calib`), `purpose` what the text is for (`calibration text`)."""
    path = Path(path).expanduser()
    check_regular_file(path, what)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise AnyquantError(f"{what} {path}: cannot read it ({e.strerror})") from None
    if b"\x00" in data[:65536]:
        raise AnyquantError(f"{what} {path}: is a binary file (NUL bytes), not UTF-8 {purpose}; give a text file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise AnyquantError(
            f"{what} {path}: not UTF-8 {purpose} (byte 0x{data[e.start]:02x} at offset {e.start}); "
            "convert it to UTF-8 or give another file") from None
    if not text.strip():
        raise AnyquantError(f"{what} {path}: the {purpose} is empty; give a file with text in it")
    return text


def read_json_file(path: Path, what: str) -> Any:
    """A JSON file's contents; not a regular file, not UTF-8 or not JSON: one line naming it."""
    check_regular_file(path, what)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise AnyquantError(f"{what} {path}: binary, not a JSON text file (byte 0x{e.object[e.start]:02x} "
                            f"at offset {e.start}); give a JSON file") from None
    except json.JSONDecodeError as e:
        raise AnyquantError(f"{what} {path}: not valid JSON ({e}); fix or re-create it") from None
    except OSError as e:
        raise AnyquantError(f"{what} {path}: cannot read it ({e.strerror})") from None


def read_config(model_dir: Path) -> dict[str, Any]:
    """config.json as a dict whose size fields are integers (transformers would raise a
    validation traceback on `"hidden_size": "abc"`, and an AttributeError on a JSON list)."""
    f = model_dir / "config.json"
    config = read_json_file(f, "config")
    if not isinstance(config, dict):
        raise AnyquantError(f"{f}: holds a JSON {type(config).__name__}, not an object of config fields; "
                            "re-save the model with save_pretrained")
    for where, sub in [("", config)] + [(f"{k}.", config[k]) for k in SUB_CONFIGS if isinstance(config.get(k), dict)]:
        for k in INT_FIELDS:
            v = sub.get(k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise AnyquantError(f"{f}: {where}{k} is {v!r} ({type(v).__name__}); it must be an integer; "
                                    "fix config.json or re-save the model")
    return config


def max_positions(config: dict[str, Any]) -> int | None:
    """The model's max_position_embeddings (its text model's, for a vision-language model)."""
    for sub in [config] + [config[k] for k in SUB_CONFIGS if isinstance(config.get(k), dict)]:
        v = sub.get("max_position_embeddings")
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def check_weight_files(model_dir: Path) -> list[Path]:
    """Every weight file is a regular file (a FIFO named *.safetensors would hang the loader),
    and every shard a sharded checkpoint's index names is present."""
    files = []
    for pattern in ("*.safetensors", "*.bin", "*.pt", "*.index.json"):
        for f in sorted(model_dir.glob(pattern)):
            check_regular_file(f, "weight file")
            files.append(f)
    for index in sorted(model_dir.glob("*.index.json")):
        data = read_json_file(index, "shard index")
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict):
            raise AnyquantError(f"{index}: no weight_map object; re-save the model")
        for shard in sorted(set(map(str, weight_map.values()))):
            f = model_dir / shard
            if not f.exists():
                n = sum(1 for v in weight_map.values() if v == shard)
                raise AnyquantError(f"{index} names shard {shard} ({n} tensors), which is missing from "
                                    f"{model_dir}; download or copy the missing shard")
            check_regular_file(f, "weight file")
    return files


def check_safetensors_headers(model_dir: Path) -> dict[str, tuple[str, list[int]]]:
    """name -> (file name, shape) from every safetensors header; a truncated or corrupt file
    is refused in one line naming it."""
    from safetensors import SafetensorError, safe_open

    shapes: dict[str, tuple[str, list[int]]] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        check_regular_file(f, "weight file")
        try:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    shapes[name] = (f.name, list(st.get_slice(name).get_shape()))
        except (SafetensorError, OSError, ValueError) as e:
            raise AnyquantError(f"{f}: corrupt, truncated or unreadable safetensors file ({e}); "
                                "re-download or re-save it") from None
    return shapes


def check_remote_code(model_dir: Path, config: dict[str, Any], trust_remote_code: bool) -> None:
    if config.get("auto_map") and not trust_remote_code:
        raise AnyquantError(f"{model_dir}: config.json names custom modeling code (auto_map); pass "
                            "--trust-remote-code to run it, after reading that code")


def check_model_type(model_dir: Path, config: dict[str, Any]) -> None:
    """A model_type this transformers knows (or custom code named by auto_map): one line, not
    transformers' multi-line message."""
    model_type = config.get("model_type")
    if config.get("auto_map") or model_type is None:
        return
    import transformers
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise AnyquantError(f"{model_dir / 'config.json'}: model_type {model_type!r} is not known to transformers "
                            f"{transformers.__version__}; upgrade transformers, or fix model_type")


def check_shapes(model_dir: Path, config: dict[str, Any], shapes: dict[str, tuple[str, list[int]]]) -> None:
    """Each checkpoint tensor whose name the model (built from config.json on the meta device,
    no memory) also has holds the shape the model expects; transformers would otherwise stop
    with a multi-line report and a traceback. Checkpoints with quantized tensors are skipped:
    their packed shapes differ by design."""
    if config.get("auto_map") or config.get("quantization_config") or not shapes:
        return
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(model_dir)
    except Exception as e:  # noqa: BLE001 — transformers' own config validation; reported in one line
        raise AnyquantError(f"{model_dir / 'config.json'}: transformers rejects it "
                            f"({' '.join(str(e).split())[:300]}); fix config.json") from None
    model = None
    for cls in model_classes(config.get("architectures")):
        try:
            with torch.device("meta"):
                model = cls.from_config(cfg) if hasattr(cls, "from_config") else cls(cfg)
            break
        except Exception:  # noqa: BLE001 — a class that does not take this config; try the next
            continue
    if model is None:
        return
    expected = {k: list(v.shape) for k, v in model.state_dict().items()}
    for name, (fname, shape) in shapes.items():
        if name in expected and expected[name] != shape and len(shape) == len(expected[name]):
            raise AnyquantError(f"{model_dir / fname}: tensor {name} has shape {shape}, but config.json makes it "
                                f"{expected[name]}; the weights and config.json do not belong together "
                                "(re-save the model, or fix config.json)")


def check_source(model_dir: Path, trust_remote_code: bool = False, *, shapes: bool = True) -> dict[str, Any]:
    """Everything above for a model directory, before it is loaded; returns its config."""
    config = read_config(model_dir)
    check_remote_code(model_dir, config, trust_remote_code)
    check_weight_files(model_dir)
    headers = check_safetensors_headers(model_dir)
    check_model_type(model_dir, config)
    if shapes:
        check_shapes(model_dir, config, headers)
    return config


def estimate_output_bytes(model_dir: Path, bits: int) -> int:
    """About what an output at `bits` bits per weight takes: the source's weight bytes x bits/16
    (an upper bound for a 16-bit source's quantized layers), plus its other files (tokenizer)."""
    total = 0
    for f in model_dir.iterdir():
        if f.is_file():
            size = f.stat().st_size
            total += size * bits // 16 if f.suffix in (".safetensors", ".bin", ".pt") else size
    return total
