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
         methods: str = typer.Option("nf4,int8,int4,gptq", "--methods", help="comma-separated; gptq and awq run at a fast setting (8 x 256 calibration tokens)"),
         max_tokens: int = typer.Option(4096, "--max-tokens", help="held-out tokens each method is scored on")):
    """Quantize the built-in model with nf4, int8, int4 and gptq, evaluate each, print a table, write an HTML report."""
    setup_logging(False)
    from anyquant.demo import run_demo

    run_demo(out, [m.strip() for m in methods.split(",") if m.strip()], max_tokens)
