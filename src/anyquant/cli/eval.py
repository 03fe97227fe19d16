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
from anyquant.errors import AnyquantError


@app.command("eval")
@fails_cleanly
def eval_cmd(target: str = typer.Argument(..., help="model directory to evaluate (an anyquant output or any model)"),
             baseline: Optional[str] = typer.Option(None, "--baseline", help="float model to compare with (default: the target's source)"),
             text: Optional[Path] = typer.Option(None, "--text", help="UTF-8 text file (default: held-out Wikipedia text)"),
             max_tokens: int = typer.Option(16384, "--max-tokens"),
             json_out: bool = typer.Option(False, "--json"),
             trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
             no_verify: bool = typer.Option(False, "--no-verify", help="skip checking the output's files against the sha256 its anyquant.json recorded"),
             report: bool = typer.Option(False, "--report", help="also keep this result in TARGET/eval.jsonl and write TARGET/report.html (an anyquant output only)")):
    """Perplexity, KL divergence and top-1 agreement against the baseline; bits per weight; size; memory."""
    check_model_dir(target, trust_remote_code)  # before loading: damaged outputs, remote code, file types
    if baseline is not None and baseline != "default" and Path(baseline).exists():
        check_model_dir(baseline, trust_remote_code)
    if text is not None:
        from anyquant.model.files import read_text_file

        read_text_file(text, "--text", "evaluation text")
    is_output = (Path(target) / "anyquant.json").is_file()
    if report and not is_output:
        raise AnyquantError(f"--report: {target} is not an anyquant output (no anyquant.json); "
                            "reports are made of outputs of `anyquant quantize`")
    setup_logging(False)
    from anyquant.eval.report import (
        build_report,
        command_line,
        eval_lines,
        save_eval_record,
    )
    from anyquant.eval.saved import run_eval

    data = run_eval(target, baseline, text, max_tokens, trust_remote_code, progress=not json_out,
                    verify=not no_verify)
    saved = None
    if report:  # kept beside the output (eval.jsonl) for `anyquant report`; a plain eval writes nothing
        saved = save_eval_record(target, data, command_line())
    if json_out:
        typer.echo(json.dumps(data, indent=2))
    else:
        con = console()
        for line in eval_lines(data):
            con.print(line, highlight=False)
        if saved is not None:
            con.print(f"{'saved to':28s} {saved}", highlight=False)
    if report:
        path = build_report([Path(target)], verify=not no_verify)
        typer.echo(f"report: {path}", err=json_out)

