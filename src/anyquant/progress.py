"""The one progress bar: rich on a terminal, periodic log lines when stderr is redirected.

Both go to stderr, which keeps stdout clean for --json and tables. A run redirected to a file
(a batch job, `2> log`) cannot show a bar, but must not be silent either: it gets one line every
`every` seconds with the percentage, the rate and the time left.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from typing import Callable, Iterator

log = logging.getLogger(__name__)


class _CurrentStderr(logging.StreamHandler):
    """A handler writing to whatever sys.stderr is at emit time (pytest and callers replace it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _progress_logger() -> logging.Logger:
    # The CLI sets the root level to WARNING unless --verbose; progress is not a warning, so it
    # has its own handler (once; a caller's own handler on this logger takes precedence).
    if not log.handlers:
        h = _CurrentStderr()
        h.setFormatter(logging.Formatter("anyquant: %(message)s"))
        log.addHandler(h)
        log.setLevel(logging.INFO)
        log.propagate = False
    return log


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class _LogProgress:
    """advance(n) that writes a line when `every` seconds have passed since the last one, and at the end."""

    def __init__(self, description: str, total: int, unit: str | None, every: float) -> None:
        self.description, self.total, self.unit, self.every = description, total, unit, every
        self.done = 0
        self.start = self.last = time.monotonic()
        self.logger = _progress_logger()

    def __call__(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.done >= self.total or now - self.last >= self.every:
            self.last = now
            self.logger.info("%s", self.line(now))

    def line(self, now: float) -> str:
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        unit = f" {self.unit}" if self.unit else ""
        pct = 100.0 * self.done / self.total
        text = f"{self.description}: {self.done}/{self.total}{unit} ({pct:.0f}%), {rate:.3g}{unit or ' it'}/s"
        if self.done >= self.total:
            return f"{text}, done in {_duration(elapsed)}"
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        return f"{text}, ETA {_duration(eta) if eta != float('inf') else 'unknown'}"


@contextlib.contextmanager
def progress_bar(description: str, total: int, enabled: bool = True, *, unit: str | None = None,
                 remaining: bool = False, every: float = 10.0) -> Iterator[Callable[[int], None]]:
    """Yields advance(n=1). `unit` names what is counted ("windows"); `remaining=True` shows the
    time left instead of the time elapsed on the rich bar; `every`: seconds between log lines
    when stderr is not a terminal."""
    if not enabled or total <= 0:
        yield lambda n=1: None
        return
    if not sys.stderr.isatty():
        yield _LogProgress(description, total, unit, every)
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
    if unit:
        columns.append(TextColumn(unit))
    columns.append(TimeRemainingColumn() if remaining else TimeElapsedColumn())
    with Progress(*columns, console=Console(file=sys.stderr), transient=True) as p:
        task = p.add_task(description, total=total)
        yield lambda n=1: p.advance(task, n)
