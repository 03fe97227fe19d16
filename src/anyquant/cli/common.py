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

from anyquant.errors import AnyquantError, Terminated

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Quantize Hugging Face models to 8 and 4 bits, safely, and measure what it cost.")


def _print_version(value: bool) -> None:
    if value:
        from anyquant import __version__

        typer.echo(f"anyquant {__version__}")
        raise typer.Exit(0)


@app.callback()
def main_options(version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                              help="print anyquant's version and exit")) -> None:
    """Quantize Hugging Face models to 8 and 4 bits, safely, and measure what it cost."""


def fails_cleanly(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except AnyquantError as e:
            # one line, whatever the message quotes (transformers' reports span several)
            typer.echo("anyquant: error: " + " ".join(str(e).split()), err=True)
            raise typer.Exit(2)
        except Terminated:
            typer.echo("anyquant: terminated (SIGTERM); the output was not written, its temporary folder removed",
                       err=True)
            raise typer.Exit(143)
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


SourceArg = typer.Argument(..., help="local model directory (transformers format), a Hugging Face hub id "
                           "(org/name, resolved through the local Hugging Face cache), or `default`")
SymmetricOpt = typer.Option(None, "--symmetric/--asymmetric",
                            help="int4-family: symmetric grid (no zero points; loads packed in stock transformers) "
                                 "or asymmetric (the default; dequantized by stock transformers at load)")


def method_options(method: str, group_size: Optional[int], **given) -> dict:
    """The method's config fields set on the command line; a flag the method does not take is
    refused by name, with the methods that take it."""
    from anyquant.config import config_class, known_methods

    given = {"group_size": group_size, **given}
    config_class(method)  # an unknown method answers first, with the known names and scheme aliases
    fields = {f.name for f in dataclasses.fields(config_class(method))}
    for name, value in given.items():
        if value is not None and name not in fields:
            takers = [m for m in known_methods() if name in {f.name for f in dataclasses.fields(config_class(m))}]
            flag = "--" + name.replace("_", "-")
            raise AnyquantError(f"{flag} does not apply to {method} (it applies to: {', '.join(takers)})")
    return {k: v for k, v in given.items() if v is not None}


TargetOpt = typer.Option("auto", "--target",
                         help="auto|cpu|cuda: the device the output will run on; its compute dtype, and the dtype "
                              "of everything not quantized, follow it (auto: this device; on a CPU, a bfloat16 or "
                              "float16 source keeps its dtype)")


def check_target(target: str) -> None:
    valid = ("auto", "cpu", "cuda")
    if target not in valid:
        raise AnyquantError(f"--target {target}: expected one of {', '.join(valid)} (the device the output will run on)")


def check_dtype(dtype: str) -> None:
    """--dtype checked before anything heavy is imported; the closest valid value is named."""
    valid = ("auto", "bfloat16", "float16", "float32")
    if dtype not in valid:
        close = difflib.get_close_matches(dtype, valid, n=1, cutoff=0.3)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise AnyquantError(f"--dtype {dtype}: expected one of {', '.join(valid)}{hint}")


def check_model_dir(source: str, trust_remote_code: bool, *, shapes: bool = True):
    """A model directory's files checked before it is loaded (config fields, shard index,
    weight file types and headers, remote code, an anyquant output's manifest); returns
    (path, config)."""
    from anyquant.model.files import check_source, read_json_file
    from anyquant.model.load import resolve_source

    path = resolve_source(source)
    manifest = path / "anyquant.json"
    if manifest.exists():
        data = read_json_file(manifest, "manifest")
        if not isinstance(data, dict) or not data.get("method"):
            raise AnyquantError(f"manifest {manifest}: empty or not an anyquant manifest (no method); the output is "
                                "damaged: quantize again into a new directory")
        shapes = False
    return path, check_source(path, trust_remote_code, shapes=shapes)


def check_patterns(keep, only) -> None:
    from anyquant.patterns import check_pattern

    for p in keep:
        check_pattern(p, "--keep")
    for p in only:
        check_pattern(p, "--only")
