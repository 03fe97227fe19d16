"""Content hashes: a source model's fingerprint and single files' sha256.

A source's fingerprint is a sha256 over config.json and the full content of every weight file
transformers loads from it, so that any edit (also one in the middle of a shard) gives another
fingerprint and a calibration resume never reuses blocks made from other weights. Hashing reads
every byte once (about 1 GB/s); each file's hash is cached in the anyquant cache dir under its
absolute path, size and mtime_ns, so later runs on the same unchanged files do not read them again.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

from anyquant.answers import cache_dir

log = logging.getLogger(__name__)

CHUNK = 1 << 22
CACHE_FILE = "file-hashes.json"
CACHE_LIMIT = 4096  # entries kept; entries of files that no longer exist are dropped first
# Pickle files transformers never loads as weights (a Trainer's state saved next to the model).
NOT_WEIGHTS = ("training_args", "optimizer", "scheduler", "rng_state", "scaler")


def file_sha256(path: str | Path) -> str:
    """The hex sha256 of a file's content, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def files_sha256(files: list[Path]) -> dict[Path, str]:
    """Each file's hex sha256, several files at once (reads and hashlib release the GIL, so a
    sharded checkpoint hashes at about one core's rate per shard, up to 8)."""
    files = list(files)
    workers = min(8, os.cpu_count() or 1, len(files))
    if workers < 2:
        return {f: file_sha256(f) for f in files}
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="anyquant-sha256") as pool:
        return dict(zip(files, pool.map(file_sha256, files)))


def _cache_path() -> Path:
    return cache_dir() / CACHE_FILE


def _read_cache() -> dict:
    try:
        data = json.loads(_cache_path().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(entries: dict) -> None:
    if len(entries) > CACHE_LIMIT:
        entries = {k: v for k, v in entries.items() if Path(k).exists()}
        entries = dict(list(entries.items())[-CACHE_LIMIT:])
    target = _cache_path()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".file-hashes-", dir=target.parent)
        with os.fdopen(fd, "w") as fh:
            json.dump(entries, fh)
        os.replace(tmp, target)
    except OSError as e:  # a read-only cache only costs a re-hash next time
        log.debug("cannot write the hash cache %s: %s", target, e)


def cached_file_sha256(files: list[Path]) -> dict[Path, str]:
    """Each file's hex sha256, from the cache where its (absolute path, size, mtime_ns) match."""
    cache = _read_cache()
    out: dict[Path, str] = {}
    missed: dict[Path, os.stat_result] = {}
    for f in files:
        st = f.stat()
        hit = cache.get(str(f.resolve()))
        if isinstance(hit, dict) and hit.get("size") == st.st_size and hit.get("mtime_ns") == st.st_mtime_ns:
            out[f] = str(hit.get("sha256"))
        else:
            missed[f] = st
    for f, digest in files_sha256(list(missed)).items():
        out[f] = digest
        key = str(f.resolve())
        cache.pop(key, None)  # re-inserted last: the most recent entries are the ones kept
        cache[key] = {"size": missed[f].st_size, "mtime_ns": missed[f].st_mtime_ns, "sha256": digest}
    if missed:
        _write_cache(cache)
    return {f: out[f] for f in files}


def index_files(path: Path) -> list[Path]:
    """The sharded checkpoints' index files (model.safetensors.index.json, pytorch_model.bin.index.json)."""
    return sorted(p for p in path.glob("*.index.json") if p.is_file())


def weight_files(path: Path) -> list[Path]:
    """The files transformers reads weights from: the safetensors files where there are any
    (transformers then ignores .bin files), else the pickled .bin / .pt files, leaving out a
    Trainer's own state (training_args.bin, optimizer.pt, ...)."""
    st = sorted(p for p in path.glob("*.safetensors") if p.is_file())
    if st:
        return st
    return sorted(p for p in list(path.glob("*.bin")) + list(path.glob("*.pt"))
                  if p.is_file() and not p.name.startswith(NOT_WEIGHTS))


def source_fingerprint(path: Path) -> str:
    """sha256 over config.json, the index files and the full content of every weight file
    (each file's hash cached by path, size and mtime_ns)."""
    files = [path / "config.json", *index_files(path), *weight_files(path)]
    hashes = cached_file_sha256(files)
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}:{f.stat().st_size}:{hashes[f]}\n".encode())
    return "sha256:" + h.hexdigest()
