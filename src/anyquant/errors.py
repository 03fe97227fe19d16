"""Errors anyquant raises for bad input. The CLI turns them into one line and exit code 2."""


class AnyquantError(Exception):
    """A problem with the user's input (model, path, option) that they can fix.

    The message names the module, file or tensor, the offending values, and the fix.
    """


class AlreadyQuantizedError(AnyquantError):
    """The source holds already-quantized tensors (failure class F5)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (timeout, systemd, docker) while a save runs: unwinds like Ctrl-C, so the save's
    temporary directory is removed; the CLI exits 143."""
