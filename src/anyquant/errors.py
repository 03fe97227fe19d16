"""Errors anyquant raises for bad input. The CLI turns them into one line and exit code 2."""

import contextlib
import signal
import threading


class AnyquantError(Exception):
    """A problem with the user's input (model, path, option) that they can fix.

    The message names the module, file or tensor, the offending values, and the fix.
    """


class AlreadyQuantizedError(AnyquantError):
    """The source holds already-quantized tensors (failure class F5)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (timeout, systemd, docker) while a save runs: unwinds like Ctrl-C, so the save's
    temporary directory is removed; the CLI exits 143."""


@contextlib.contextmanager
def terminate_as_interrupt():
    """SIGTERM raises Terminated inside the block (main thread only: signal handlers live there),
    so a writer's cleanup runs as for Ctrl-C; the previous handler is restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
