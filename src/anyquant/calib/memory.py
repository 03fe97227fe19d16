"""Host memory of a calibrating process (glibc): freed block-sized tensors must go back to the
OS, or the process keeps about one float block per block it has calibrated."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import sys
from typing import Callable, Iterator

# --------------------------------------------------------------------------- memory


def _libc_function(name: str) -> Callable[..., int] | None:
    """A C library function of this process on Linux (glibc: malloc_trim, mallopt), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(None), name)  # musl and others lack malloc_trim
    except (OSError, AttributeError):
        return None


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's initial value


@functools.lru_cache(maxsize=1)
def pin_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold at its initial 128 KiB for the rest of the process.

    glibc raises the threshold to the size of each mmapped chunk freed (up to 32 MiB), so once
    the first replaced float weight is freed, later tensors of block size come from the heap,
    where the int4 blocks that outlive each step sit among freed temporaries and pin their
    pages; `release_freed_memory` then cannot return them, and peak RSS above the loaded model
    grows with depth. With the threshold fixed, large tensors map and unmap their own pages, so
    calibration memory stays one block's work whatever the depth (benchmarks/calib_memory.py;
    measurements in docs/benchmarks.md). Setting it turns off glibc's dynamic adjustment for the whole process (a calibrating
    process), so it is done once. A no-op off glibc."""
    mallopt = _libc_function("mallopt")
    return mallopt is not None and bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


def release_freed_memory() -> None:
    """Give heap pages that freed tensors left behind back to the OS (glibc's malloc_trim).

    After each block its float weights (replaced by Int4Linear) and its temporaries are freed,
    but glibc keeps them: its mmap threshold rises after the first large free, so later
    tensors of a block's sizes come from the heap, which it does not shrink. Without this the
    process keeps about one block's float size per calibrated block although no tensor outlives
    its block; together with `pin_mmap_threshold` (large tensors out of the heap) the overhead
    does not grow with depth (benchmarks/calib_memory.py; docs/benchmarks.md). A no-op off glibc."""
    gc.collect()  # a block's copies can sit in reference cycles (modules, hooks, closures) until the next collection
    trim = _libc_function("malloc_trim")
    if trim is not None:
        trim(0)




_frozen_depth = 0


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Exclude every object alive on entry from the cyclic garbage collector until exit, so that
    `release_freed_memory`'s collection after each block scans only what the block created.

    A full collection visits every object the process holds; with transformers, torch and a
    model's modules loaded that took a quarter of a second per block on a small model, as much
    as the block's quantization (streamed int4 spent most of its extra time over the in-memory
    path there). The cycles a block leaves behind are made while it runs, after entry, so they
    are still collected. Objects alive on entry are still freed by reference counting; only a
    cycle among them waits for the first collection after exit. Nested uses freeze once."""
    global _frozen_depth
    if _frozen_depth == 0:
        gc.collect()
        gc.freeze()
    _frozen_depth += 1
    try:
        yield
    finally:
        _frozen_depth -= 1
        if _frozen_depth == 0:
            gc.unfreeze()
