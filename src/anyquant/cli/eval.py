"""`anyquant eval`: the command line over the public API (anyquant.api)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from anyquant.cli.common import (
    app,
    check_model_dir,
    console,
    fails_cleanly,
    setup_logging,
)


@app.command("eval")
@fails_cleanly
def eval_cmd(target: str = typer.Argument(..., help="model directory to evaluate (an anyquant output or any model)"),
             baseline: Optional[str] = typer.Option(None, "--baseline", help="float model to compare with (default: the target's source)"),
             text: Optional[Path] = typer.Option(None, "--text", help="UTF-8 text file (default: held-out Wikipedia text)"),
             max_tokens: int = typer.Option(16384, "--max-tokens"),
             json_out: bool = typer.Option(False, "--json"),
             trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
             no_verify: bool = typer.Option(False, "--no-verify", help="skip checking the output's files against the sha256 its anyquant.json recorded")):
    """Perplexity, KL divergence and top-1 agreement against the baseline; bits per weight; size; memory."""
    check_model_dir(target, trust_remote_code)  # before loading: damaged outputs, remote code, file types
    if baseline is not None and baseline != "default" and Path(baseline).exists():
        check_model_dir(baseline, trust_remote_code)
    if text is not None:
        from anyquant.model.files import read_text_file

        read_text_file(text, "--text", "evaluation text")
    setup_logging(False)
    from anyquant.eval.saved import run_eval

    data = run_eval(target, baseline, text, max_tokens, trust_remote_code, progress=not json_out,
                    verify=not no_verify)
    if json_out:
        typer.echo(json.dumps(data, indent=2))
        return
    con = console()
    for k, v in data.items():
        con.print(f"{k:28s} {v}")
