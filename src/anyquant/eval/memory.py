"""Memory measurement: process peak, the peak of one block of code, and size on disk."""

from __future__ import annotations

import contextlib
import os
import pathlib
import resource
import sys
import threading
from dataclasses import dataclass
from typing import Iterator, Optional

from anyquant.errors import AnyquantError

_SAMPLE_INTERVAL_S = 0.020
_STATM = "/proc/self/statm"


def peak_rss_bytes() -> int:
    """Peak resident set size of this process since it started, in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def _current_rss_bytes() -> Optional[int]:
    try:
        with open(_STATM, "rb") as f:
            resident_pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


@dataclass
class PeakMemory:
    """Filled in when the ``track_peak_memory`` block exits.

    peak_bytes: highest RSS seen during the block minus RSS at its start (>= 0).
    cuda_peak_bytes: torch.cuda.max_memory_allocated() over the block (absolute, counting
      tensors that were already allocated, e.g. the weights), or None without CUDA.
    """

    peak_bytes: int = 0
    baseline_rss_bytes: int = 0
    cuda_peak_bytes: Optional[int] = None
    sampled: bool = True  # False where /proc is missing and peak_bytes is a coarse upper bound


@contextlib.contextmanager
def track_peak_memory(interval_s: float = _SAMPLE_INTERVAL_S) -> Iterator[PeakMemory]:
    """Measure the peak memory of the enclosed block.

    ru_maxrss only ever grows over the life of a process, so after the first big allocation it
    cannot see a later block's peak; instead a daemon thread samples /proc/self/statm every
    ``interval_s``. Allocations shorter than the interval can be missed: this measures
    sustained working sets (a model, a block's activations), not transient spikes.
    """
    result = PeakMemory()
    cuda = _cuda_module()
    if cuda is not None:
        cuda.synchronize()
        cuda.reset_peak_memory_stats()

    start = _current_rss_bytes()
    if start is None:
        # No /proc (macOS): fall back to the monotone peak; only growth past the old peak shows.
        result.sampled = False
        start_peak = peak_rss_bytes()
        try:
            yield result
        finally:
            result.peak_bytes = max(0, peak_rss_bytes() - start_peak)
            _finish_cuda(result, cuda)
        return

    result.baseline_rss_bytes = start
    highest = [start]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(interval_s):
            rss = _current_rss_bytes()
            if rss is not None and rss > highest[0]:
                highest[0] = rss

    thread = threading.Thread(target=sample, name="anyquant-memory-sampler", daemon=True)
    thread.start()
    try:
        yield result
    finally:
        # Sample at exit too: whatever the block still holds counts even if it took < interval.
        end = _current_rss_bytes()
        stop.set()
        thread.join()
        if end is not None:
            highest[0] = max(highest[0], end)
        result.peak_bytes = max(0, highest[0] - start)
        _finish_cuda(result, cuda)


def _cuda_module():
    # Only consult torch if the caller already imported it: measuring memory should not cost a
    # 1-2 s torch import (and its own RSS) for code that never touches torch.
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        return torch.cuda if torch.cuda.is_available() else None
    except Exception:  # a broken CUDA driver must not break a measurement
        return None


def _finish_cuda(result: PeakMemory, cuda) -> None:
    if cuda is not None:
        cuda.synchronize()
        result.cuda_peak_bytes = int(cuda.max_memory_allocated())


def dir_size_bytes(path: "str | os.PathLike[str]") -> int:
    """Total size of the regular files under ``path`` (or of ``path`` itself if a file).

    Symlinks are not followed, so a checkpoint that links to a shared cache is not counted
    twice or as its target's size.
    """
    root = pathlib.Path(path)
    if not root.exists():
        raise AnyquantError(f"{root}: no such file or directory; pass the directory the model was saved to")
    if root.is_file():
        return root.stat().st_size
    total = 0
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            file = pathlib.Path(dirpath) / name
            if not file.is_symlink():
                total += file.stat().st_size
    return total
