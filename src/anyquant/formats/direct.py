"""Loading without the float model: a skeleton on the meta device, every tensor read from the
safetensors files straight to the device it lives on.

    skeleton = empty_model(cls, config, dtype)     # parameters on "meta", buffers real (CPU)
    ... swap planned modules for meta-device Int4Linear ...
    read_into(model, files, key_to_name, devices)  # each tensor read once, to its device

Why buffers are real: a model built with `torch.device("meta")` as the default device gets meta
non-persistent buffers too (rotary `inv_freq`, ...), which are in no checkpoint and would have
to be recomputed per architecture. Building with only the parameters on meta (the way
accelerate's `init_empty_weights()` does by default) runs each module's own `__init__`, so
those buffers hold their real values; they are small.

The files are read with ordinary reads (several threads per chunk; through two reused pinned
staging buffers for a CUDA target) rather than through a memory map: a mapped file's pages count in the process's resident
memory for as long as the map is open, so a mapped load of a 6 GB checkpoint shows 6 GB of
host memory even though every tensor goes to the GPU.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import io
import itertools
import json
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from anyquant.errors import AnyquantError

# safetensors dtype names -> torch dtypes (https://github.com/huggingface/safetensors, format spec)
ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}
STAGING_BYTES = 64 << 20   # host staging buffer for reads to a GPU


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device; buffers stay real."""
    original = nn.Module.register_parameter

    def register_parameter(module, name, param):
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            p = module._parameters[name]
            module._parameters[name] = nn.Parameter(p.detach().to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register_parameter
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def read_header(path: Path) -> tuple[dict, int]:
    """The safetensors header of `path` (name -> {dtype, shape, data_offsets}) and where the data starts."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise AnyquantError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", raw)
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


READ_THREADS = max(1, min(8, os.cpu_count() or 1))   # parallel reads of one chunk
_READ_SLICE = 8 << 20   # a thread's share of a chunk is at least this


@functools.cache
def _staging(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Two pinned host buffers for reads to `device`, kept for the process: while one chunk is
    copied to the GPU (asynchronously) the next is read into the other."""
    return (torch.empty(STAGING_BYTES, dtype=torch.uint8, pin_memory=True),
            torch.empty(STAGING_BYTES, dtype=torch.uint8, pin_memory=True))


@functools.lru_cache(maxsize=1)
def _readers() -> concurrent.futures.ThreadPoolExecutor | None:
    if READ_THREADS < 2 or not hasattr(os, "preadv"):
        return None
    return concurrent.futures.ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="anyquant-read")


def _read_at(f: io.RawIOBase, dest: torch.Tensor, offset: int, path: Path, key: str) -> None:
    """Fill the uint8 CPU tensor `dest` from file offset `offset`, in parallel slices where the
    read is large (a read from the page cache is a memory copy, which one core does at a few GB/s;
    os.preadv releases the GIL)."""
    n = dest.numel()
    if not n:
        return
    view = memoryview(dest.numpy())
    pool = _readers()
    if pool is None:   # one thread (or no os.preadv: not Linux): one sequential read
        f.seek(offset)
        if f.readinto(view) != n:
            raise AnyquantError(f"{path}: truncated while reading {key}")
        return
    fd = f.fileno()

    def read(a: int, b: int) -> None:
        done = a
        while done < b:
            got = os.preadv(fd, [view[done:b]], offset + done)
            if got <= 0:
                raise AnyquantError(f"{path}: truncated while reading {key}")
            done += got

    parts = max(1, min(READ_THREADS, n // _READ_SLICE))
    bounds = [n * i // parts for i in range(parts + 1)]
    if parts == 1:
        read(0, n)
        return
    for job in [pool.submit(read, a, b) for a, b in itertools.pairwise(bounds)]:
        job.result()


def read_tensors(path: Path, wanted: dict[str, tuple[str, torch.device, torch.dtype]],
                 sink: Callable[[str, torch.Tensor], None]) -> None:
    """Read each checkpoint key of `path` named in `wanted` ({key: (model name, device, dtype)})
    onto its device, converted to its dtype, and hand it to sink(model name, tensor).

    A GPU tensor goes through two pinned staging buffers in turn: the copy of one chunk to the
    GPU runs while the next chunk is read, and each chunk is read by several threads."""
    header, start = read_header(path)
    entries = sorted((header[k]["data_offsets"][0], k) for k in wanted if k in header)
    copied: dict[int, torch.cuda.Event] = {}   # staging buffer -> its last copy to the GPU
    with open(path, "rb", buffering=0) as f:
        try:
            for _, key in entries:
                info = header[key]
                name, device, dtype = wanted[key]
                if info["dtype"] not in ST_DTYPES:
                    raise AnyquantError(f"{path}: tensor {key} has dtype {info['dtype']}, which anyquant cannot "
                                        f"read; known: {', '.join(ST_DTYPES)}")
                src_dtype = ST_DTYPES[info["dtype"]]
                b, e = info["data_offsets"]
                nbytes = e - b
                if device.type != "cuda":
                    raw = torch.empty(nbytes, dtype=torch.uint8)
                    _read_at(f, raw, start + b, path, key)
                    raw = raw.to(device) if device.type != "cpu" else raw
                else:
                    raw = torch.empty(nbytes, dtype=torch.uint8, device=device)
                    bufs = _staging(device)
                    done, k = 0, 0
                    while done < nbytes:
                        n = min(STAGING_BYTES, nbytes - done)
                        slot = k % 2
                        if slot in copied:
                            copied[slot].synchronize()   # its previous chunk is on the GPU
                        _read_at(f, bufs[slot][:n], start + b + done, path, key)
                        raw[done:done + n].copy_(bufs[slot][:n], non_blocking=True)
                        ev = copied[slot] = torch.cuda.Event()
                        ev.record(torch.cuda.current_stream(device))
                        done += n
                        k += 1
                t = raw.view(src_dtype).reshape(info["shape"]) if nbytes else torch.empty(
                    info["shape"], dtype=src_dtype, device=device)
                if t.dtype != dtype and t.is_floating_point() and dtype.is_floating_point:
                    t = t.to(dtype)
                sink(name, t)
                del raw, t
        finally:
            for ev in copied.values():   # the staging buffers are reused by the next call
                ev.synchronize()


def assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Put `tensor` in place of the parameter or buffer `name` (a Parameter stays a Parameter)."""
    mod_name, _, leaf = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if leaf in mod._parameters:
        old = mod._parameters[leaf]
        grad = old.requires_grad and tensor.is_floating_point()
        mod._parameters[leaf] = nn.Parameter(tensor, requires_grad=grad)
    elif leaf in mod._buffers:
        mod._buffers[leaf] = tensor
    else:
        raise AnyquantError(f"{type(model).__name__}: no parameter or buffer {name} to load into")


def tie(model: nn.Module, name: str, param: nn.Parameter) -> None:
    """Make parameter `name` the very object `param` (a tied weight)."""
    mod_name, _, leaf = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    mod._parameters[leaf] = param


def tied_groups(model: nn.Module) -> list[list[str]]:
    """Names that share one parameter object (tied weights), each group of two or more."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def device_of(name: str, device_map: dict[str, object]) -> torch.device:
    """The device `device_map` (module prefix -> device, accelerate's form) gives tensor `name`."""
    parts = name.split(".")
    for i in range(len(parts), -1, -1):
        prefix = ".".join(parts[:i])
        if prefix in device_map:
            d = device_map[prefix]
            if d == "disk":
                raise AnyquantError(f"device_map puts {prefix or 'the model'} on disk; anyquant loads to GPUs and "
                                    "the CPU only: give max_memory room on the CPU, or a device_map without 'disk'")
            return torch.device(f"cuda:{d}" if isinstance(d, int) else d)
    raise AnyquantError(f"device_map has no entry for {name}; give one for it or a prefix of it")


def auto_device_map(model: nn.Module) -> dict[str, object]:
    """transformers' device_map="auto" for a meta skeleton: the GPUs present, then the CPU."""
    from transformers.integrations.accelerate import (
        get_balanced_memory,
        infer_auto_device_map,
    )

    no_split = getattr(model, "_no_split_modules", None) or []
    max_memory = get_balanced_memory(model, no_split_module_classes=no_split)
    return infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)


def dispatch(model: nn.Module, device_map: dict[str, object]) -> nn.Module:
    """Hooks that move activations between the devices of `device_map` (accelerate), where it
    names more than one device; the tensors are already in place."""
    devices = set(device_map.values())
    if len(devices) > 1:
        from transformers.integrations.accelerate import dispatch_model

        dispatch_model(model, device_map=device_map)
    model.hf_device_map = dict(device_map)
    return model
