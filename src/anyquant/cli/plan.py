"""`anyquant plan`: the command line over the public API (anyquant.api)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from anyquant.cli.common import (
    SourceArg,
    SymmetricOpt,
    TargetOpt,
    app,
    check_dtype,
    check_model_dir,
    check_patterns,
    check_target,
    console,
    fails_cleanly,
    method_options,
    setup_logging,
)


@app.command()
@fails_cleanly
def plan(source: str = SourceArg, method: str = typer.Option("nf4", "--method", "-m"),
         group_size: Optional[int] = typer.Option(None, "--group-size"),
         symmetric: Optional[bool] = SymmetricOpt,
         target: str = TargetOpt,
         dtype: str = typer.Option("auto", "--dtype"),
         plan_file: Optional[Path] = typer.Option(None, "--plan", help="overrides (JSON)"),
         keep: List[str] = typer.Option([], "--keep", help="module name or re:pattern to keep in float"),
         only: List[str] = typer.Option([], "--only", help="quantize only Linear layers matching this name or re:pattern"),
         include_vision: bool = typer.Option(False, "--include-vision", help="also quantize the vision tower's Linear layers"),
         json_out: bool = typer.Option(False, "--json"),
         trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
         requantize: bool = typer.Option(False, "--requantize"),
         show_all: bool = typer.Option(False, "--all", help="one row per module instead of the grouped summary")):
    """What quantize would do: repeated blocks grouped, exceptions one per line (--all: every module)."""
    method_opts = method_options(method, group_size, symmetric=symmetric)  # before anything heavy: a misspelt method fails fast
    check_dtype(dtype)
    check_target(target)
    check_patterns(keep, only)
    from anyquant.answers import cached_answer, device_signature, file_signature, store_answer

    # an unchanged directory asked the same again: the stored answer, without importing torch (answers.py)
    key = dict(method=method, group_size=group_size, symmetric=symmetric, target=target, dtype=dtype,
               plan=file_signature(plan_file), keep=list(keep), only=list(only), include_vision=include_vision,
               trust_remote_code=trust_remote_code, requantize=requantize, device=device_signature())
    data = cached_answer("plan", source, **key)
    if data is None:
        check_model_dir(source, trust_remote_code)
        setup_logging(False)
        from anyquant.api import plan as make_plan
        from anyquant.formats.io import load_source
        from anyquant.planning.plan import load_overrides
        from anyquant.planning.summary import collapse_notes, summarize

        if plan_file is not None:
            load_overrides(plan_file)

        model, _, _ = load_source(source, trust_remote_code=trust_remote_code, requantize=requantize)
        p = make_plan(model, method, dtype=dtype, plan_file=plan_file, overrides=[(k, "keep") for k in keep],
                      include_vision=include_vision, only=only, target=target, **method_opts)
        data = {"plan": p.to_dict(), "summary": summarize(p), "notes": collapse_notes(p.notes),
                "quantized": len(p.to_quantize()), "kept": len(p.kept())}
        store_answer("plan", source, data, **key)
    if json_out:
        typer.echo(json.dumps(data["plan"], indent=2))
        return
    if not show_all:
        for line in data["summary"]:
            typer.echo(line)
        return
    from rich.table import Table

    t = Table(title=f"plan: {method}")
    for c in ("module", "kind", "component", "action", "method", "dtype", "reason"):
        t.add_column(c)
    for d in data["plan"]["decisions"]:
        t.add_row(d["name"], d["kind"], d["component"], d["action"], d["method"] or "-", str(d["dtype"]), d["reason"])
    con = console()
    con.print(t)
    con.print(f"{data['quantized']} quantized, {data['kept']} kept")
    for n in data["notes"]:
        con.print(f"note: {n}")
