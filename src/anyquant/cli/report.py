"""`anyquant report`: the command line over anyquant.eval.report."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from anyquant.cli.common import app, fails_cleanly, setup_logging
from anyquant.errors import AnyquantError


@app.command()
@fails_cleanly
def report(dirs: List[Path] = typer.Argument(..., help="anyquant output directories (one: its report; several: a comparison)"),
           out: Optional[Path] = typer.Option(None, "--out", "-o", help="HTML file to write (default: DIR/report.html, "
                                              "or report.html in the outputs' common parent)"),
           samples: bool = typer.Option(True, "--samples/--no-samples", help="greedy generations of each output and the float model (loads each)"),
           max_new_tokens: int = typer.Option(16, "--max-new-tokens", help="tokens generated per sample prompt"),
           no_verify: bool = typer.Option(False, "--no-verify", help="skip checking the outputs' files against their sha256")):
    """One self-contained HTML page: headline and recommendation, quality vs bits, per-layer error by
    block, size by component, sample generations, versions, device, date and commands."""
    for d in dirs:
        if not (d / "anyquant.json").is_file():
            raise AnyquantError(f"{d}: no anyquant.json there; `anyquant report` reads outputs of "
                                "`anyquant quantize`: pass such a directory")
    if out is not None and out.suffix.lower() not in (".html", ".htm"):
        raise AnyquantError(f"--out {out}: a report is an HTML page; pass a path ending in .html")
    if max_new_tokens < 1:
        raise AnyquantError(f"--max-new-tokens {max_new_tokens}: must be 1 or more")
    setup_logging(False)
    from anyquant.eval.report import build_report, command_line

    path = build_report(dirs, out, samples=samples, max_new_tokens=max_new_tokens,
                        commands=[command_line()], verify=not no_verify)
    typer.echo(f"report: {path}")
