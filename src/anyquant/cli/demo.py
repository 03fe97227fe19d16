"""`anyquant demo`: the command line over the public API (anyquant.api)."""

from __future__ import annotations

from pathlib import Path

import typer

from anyquant.cli.common import (
    app,
    fails_cleanly,
    setup_logging,
)


@app.command()
@fails_cleanly
def demo(out: Path = typer.Option(Path("out/demo"), "--out"),
         methods: str = typer.Option("nf4,fp4,int8,int4", "--methods"),
         max_tokens: int = typer.Option(8192, "--max-tokens")):
    """Quantize the built-in model with every method, evaluate each, print a table, write an HTML report."""
    setup_logging(False)
    from anyquant.demo import run_demo

    run_demo(out, [m.strip() for m in methods.split(",") if m.strip()], max_tokens)
