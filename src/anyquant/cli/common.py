"""What every command shares: the typer app, one-line errors (exit 2), logging, the console,
and method options checked against the method's config before anything heavy is imported."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
import warnings
from typing import Callable, Optional

import typer

from anyquant.errors import AnyquantError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Quantize Hugging Face models to 8 and 4 bits, safely, and measure what it cost.")


def fails_cleanly(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except AnyquantError as e:
            typer.echo(f"anyquant: error: {e}", err=True)
            raise typer.Exit(2)
        except KeyboardInterrupt:
            typer.echo("anyquant: interrupted; nothing was written", err=True)
            raise typer.Exit(130)
    return wrapper


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="anyquant: %(levelname)s: %(message)s")
    import transformers

    # bitsandbytes' int8 CPU path says this on every matmul; it is expected (LLM.int8 computes
    # in float16 by design) and drowns the output.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def console():
    from rich.console import Console

    return Console()


SourceArg = typer.Argument(..., help="local model directory (transformers format), or `default`")


def method_options(method: str, group_size: Optional[int], **given) -> dict:
    """The method's config fields set on the command line; a flag the method does not take is
    refused by name, with the methods that take it."""
    from anyquant.config import config_class, known_methods

    given = {"group_size": group_size, **given}
    fields = {f.name for f in dataclasses.fields(config_class(method))}
    for name, value in given.items():
        if value is not None and name not in fields:
            takers = [m for m in known_methods() if name in {f.name for f in dataclasses.fields(config_class(m))}]
            flag = "--" + name.replace("_", "-")
            raise AnyquantError(f"{flag} does not apply to {method} (it applies to: {', '.join(takers)})")
    return {k: v for k, v in given.items() if v is not None}


def check_dtype(dtype: str) -> None:
    """--dtype checked before anything heavy is imported; the closest valid value is named."""
    valid = ("auto", "bfloat16", "float16", "float32")
    if dtype not in valid:
        close = difflib.get_close_matches(dtype, valid, n=1, cutoff=0.3)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise AnyquantError(f"--dtype {dtype}: expected one of {', '.join(valid)}{hint}")
