"""Answers of read-only commands kept on disk, keyed by everything they depend on, so asking
`anyquant inspect` or `anyquant plan` again about an unchanged model directory answers without importing torch or
transformers (which alone take seconds).

The key is a hash of: the command and its arguments; anyquant's and transformers' versions (read
from package metadata, not imported); and, for every file of the model directory, its name,
size and modification time (config.json, index and tokenizer files, weights, remote code). Any
change to any of them is a miss, which runs the command and stores the new answer. Only local
directories (and `default` once converted) are looked up: a hub id is resolved the slow way.

This module imports nothing heavy: it sits below everything else (architecture: lowest layer).
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import tempfile
from pathlib import Path
from typing import Any

ANSWERS_VERSION = 1


def cache_dir() -> Path:
    """anyquant's cache: converted default model, file hashes, calibration checkpoints, answers."""
    return Path(os.environ.get("ANYQUANT_CACHE", Path.home() / ".cache" / "anyquant"))


def default_model_path() -> Path:
    """Where the converted default model lives (anyquant.model.default converts it there)."""
    return cache_dir() / "models" / "smollm2-135m-instruct"


def _local_dir(source: str) -> Path | None:
    path = default_model_path() if source == "default" else Path(source).expanduser()
    return path.resolve() if (path / "config.json").is_file() else None


def _version(package: str) -> str:
    try:
        return md.version(package)
    except md.PackageNotFoundError:
        return "none"


def answer_key(command: str, source: str, **args: Any) -> str | None:
    """The key of `command` on `source` with `args`; None where the source is not a local model
    directory (nothing is cached for it)."""
    path = _local_dir(source)
    if path is None:
        return None
    h = hashlib.sha256()
    h.update(json.dumps([ANSWERS_VERSION, command, str(path), sorted(args.items()), _version("anyquant"),
                         _version("transformers"), _version("torch")], default=str).encode())
    # the installed code itself (an editable install keeps its version while the code changes)
    here = Path(__file__).parent
    for f in sorted(here.rglob("*.py")):
        h.update(f"{f.relative_to(here)}:{f.stat().st_mtime_ns}\n".encode())
    for f in sorted(path.iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _file(key: str) -> Path:
    return cache_dir() / "answers" / f"{key}.json"


def cached_answer(command: str, source: str, **args: Any) -> Any | None:
    """The stored answer, or None (no local directory, never asked, or anything changed)."""
    if os.environ.get("ANYQUANT_NO_ANSWER_CACHE"):
        return None
    key = answer_key(command, source, **args)
    if key is None:
        return None
    try:
        return json.loads(_file(key).read_text())["answer"]
    except (OSError, ValueError, KeyError):
        return None


def store_answer(command: str, source: str, answer: Any, **args: Any) -> None:
    """Keep `answer` (JSON-serialisable) for the next identical question; a cache that cannot be
    written (read-only home) only costs speed."""
    key = answer_key(command, source, **args)
    if key is None:
        return
    target = _file(key)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".answer-")
        with os.fdopen(fd, "w") as f:
            json.dump({"command": command, "source": source, "answer": answer}, f)
        os.replace(tmp, target)
    except OSError:
        pass


def device_signature() -> str:
    """What a plan depends on of the machine, read without importing torch: the NVIDIA GPUs the
    driver lists and CUDA_VISIBLE_DEVICES (the compute dtype follows the device: a plan made on a
    CPU is not the answer on a GPU)."""
    gpus = Path("/proc/driver/nvidia/gpus")
    listed = sorted(p.name for p in gpus.iterdir()) if gpus.is_dir() else []
    return json.dumps([listed, os.environ.get("CUDA_VISIBLE_DEVICES")])


def file_signature(path: str | Path | None) -> str | None:
    """A file argument's identity for a key: its path and content hash (None: not given)."""
    if path is None:
        return None
    p = Path(path)
    try:
        return f"{p.resolve()}:{hashlib.sha256(p.read_bytes()).hexdigest()}"
    except OSError:
        return f"{p}:unreadable"
