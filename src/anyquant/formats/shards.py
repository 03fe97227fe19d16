"""Safetensors shards written as tensors arrive, with transformers' file names and index.

    writer = ShardWriter(directory, max_shard_size="5GB")
    writer.add({"model.layers.0.mlp.up_proj.weight": t, ...})   # bytes go to disk now
    writer.close()    # model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json

Why not safetensors' own writer: `save_file` takes the whole shard as one dict in memory and
writes the header (which lists every tensor's offsets) first. A streamed quantization has one
block in memory at a time, so each tensor's bytes are written as they come after room left for
the header at the start of the shard's file, and the header goes into that room when the shard
is full, padded with spaces to fill it (the format allows trailing spaces in the header): the
data is written once. A header larger than the room (a shard of tens of thousands of tensors)
is written in front of a copy of the data instead. The layout is the format's: an 8-byte
little-endian header length, the JSON header padded with spaces to a multiple of 8, then the
tensors back to back in offset order (safetensors' format documentation); files are read back
with safetensors in the tests.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from pathlib import Path

import torch

from anyquant.errors import AnyquantError
from anyquant.formats.direct import ST_DTYPES

ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes of `size`: an int, or "5GB" / "500MB" / "2GiB" (transformers' max_shard_size forms)."""
    if isinstance(size, int):
        if size <= 0:
            raise AnyquantError(f"max shard size {size}: must be positive")
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)\s*", str(size).upper())
    if not m:
        raise AnyquantError(f"max shard size {size!r}: expected bytes or a size like 5GB, 500MB, 2GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


class ShardWriter:
    """Append tensors to shards of at most `max_shard_size` bytes (a tensor larger than that
    gets a shard of its own, as in transformers)."""

    def __init__(self, directory: Path, max_shard_size: int | str = "5GB", metadata: dict[str, str] | None = None):
        self.directory = Path(directory)
        self.limit = parse_size(max_shard_size)
        self.metadata = {"format": "pt", **(metadata or {})}
        self.shards: list[tuple[Path, dict]] = []   # finished: (temporary file, header)
        self.total = 0
        self._data = None
        self._header: dict = {}
        self._size = 0
        self._names: set[str] = set()
        # room for the header at the start of each shard: about 150 bytes a tensor, so 1 MiB
        # holds some 7,000 tensors; smaller for small shards (a multiple of 8: data stays aligned)
        self.header_room = min(1 << 20, max(4096, self.limit // 64)) // 8 * 8

    def _open(self) -> None:
        path = self.directory / f".shard-{len(self.shards) + 1:05d}.data"
        self._data = open(path, "wb")
        self._data.seek(self.header_room)
        self._data_path = path
        self._header = {}
        self._size = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            if name in self._names:
                raise AnyquantError(f"shard writer: tensor {name} written twice")
            if t.dtype not in ST_NAMES:
                raise AnyquantError(f"shard writer: tensor {name} has dtype {t.dtype}, which safetensors cannot store")
            self._names.add(name)
            t = t.detach()
            nbytes = t.numel() * t.element_size()
            if self._data is not None and self._size and self._size + nbytes > self.limit:
                self._finish()
            if self._data is None:
                self._open()
            raw = t.reshape(-1).contiguous().cpu().view(torch.uint8) if nbytes else torch.empty(0, dtype=torch.uint8)
            self._data.write(raw.numpy())   # the tensor's own bytes: no copy
            self._header[name] = {"dtype": ST_NAMES[t.dtype], "shape": list(t.shape),
                                  "data_offsets": [self._size, self._size + nbytes]}
            self._size += nbytes
            self.total += nbytes

    def _finish(self) -> None:
        self._data.close()
        self.shards.append((self._data_path, self._header))
        self._data = None

    def close(self) -> list[str]:
        """Write the shards under their final names (and the index where there are several);
        returns the file names."""
        if self._data is not None:
            self._finish()
        if not self.shards:
            raise AnyquantError("shard writer: no tensors were written")
        n = len(self.shards)
        names = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map: dict[str, str] = {}
        for (data_path, header), fname in zip(self.shards, names):
            head = json.dumps({"__metadata__": self.metadata, **header}, separators=(",", ":")).encode()
            if 8 + len(head) <= self.header_room:   # into the room left for it: no copy
                head += b" " * (self.header_room - 8 - len(head))
                with open(data_path, "r+b") as f:
                    f.write(struct.pack("<Q", len(head)))
                    f.write(head)
                os.replace(data_path, self.directory / fname)
            else:
                head += b" " * (-len(head) % 8)
                with open(self.directory / fname, "wb") as out, open(data_path, "rb") as data:
                    out.write(struct.pack("<Q", len(head)))
                    out.write(head)
                    data.seek(self.header_room)
                    shutil.copyfileobj(data, out, 16 << 20)
                os.unlink(data_path)
            weight_map.update(dict.fromkeys(header, fname))
        if n > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.directory / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return names

    def abort(self) -> None:
        if self._data is not None:
            self._data.close()
            self._data = None
