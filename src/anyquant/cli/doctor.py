"""`anyquant doctor`: the command line over the public API (anyquant.api)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from anyquant.cli.common import (
    SourceArg,
    app,
    fails_cleanly,
    setup_logging,
)


@app.command()
@fails_cleanly
def doctor(source: str = SourceArg,
           bnb_config: Optional[Path] = typer.Option(None, "--bnb-config", help="your BitsAndBytesConfig as JSON (may add \"dtype\")"),
           trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
           json_out: bool = typer.Option(False, "--json")):
    """Predict which failure (F1-F5) a transformers + bitsandbytes config hits here; print a corrected config."""
    setup_logging(False)
    from anyquant.api import doctor as diagnose
    from anyquant.diagnosis import print_report, read_bnb_config

    data = diagnose(source, read_bnb_config(bnb_config), trust_remote_code=trust_remote_code)
    if json_out:
        typer.echo(json.dumps(data, indent=2))
        return
    print_report(data, typer.echo)
