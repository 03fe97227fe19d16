"""`anyquant inspect`: the command line over the public API (anyquant.api)."""

from __future__ import annotations

import json
from typing import Any

import typer

from anyquant.cli.common import (
    SourceArg,
    app,
    check_model_dir,
    console,
    fails_cleanly,
    setup_logging,
)


@app.command()
@fails_cleanly
def inspect(source: str = SourceArg, json_out: bool = typer.Option(False, "--json"),
            trust_remote_code: bool = typer.Option(False, "--trust-remote-code")):
    """Components, module kinds, parameters and dtypes, tied and already-quantized tensors, size per method."""
    from anyquant.answers import cached_answer, store_answer

    # an unchanged directory asked again: the stored answer, without importing torch (answers.py)
    data = cached_answer("inspect", source, trust_remote_code=trust_remote_code)
    if data is None:
        check_model_dir(source, trust_remote_code)
        setup_logging(False)
        from anyquant.api import inspect as inspect_api

        data = inspect_api(source, trust_remote_code=trust_remote_code)
        store_answer("inspect", source, data, trust_remote_code=trust_remote_code)
    if json_out:
        typer.echo(json.dumps(data, indent=2))
        return
    print_inspect(console(), data)


def print_inspect(console, data: dict[str, Any]) -> None:
    from rich.table import Table

    console.print(f"[bold]{data['source']}[/bold]  ({data['model_type']}, {data['total_params']:,} parameters)")
    t = Table(title="components")
    for c in ("component", "modules by kind", "parameters"):
        t.add_column(c)
    for comp, v in data["components"].items():
        kinds = ", ".join(f"{k}: {n}" for k, n in sorted(v["modules"].items()))
        t.add_row(comp, kinds, f"{v['params']:,}")
    console.print(t)
    console.print("parameter dtypes: " + ", ".join(f"{k}: {n:,}" for k, n in data["param_dtypes"].items()))
    console.print("tied parameters: " + ("; ".join(" = ".join(g) for g in data["tied"]) or "none"))
    if data["quantized_tensors"]:
        console.print(f"[red]already quantized[/red]: {len(data['quantized_tensors'])} tensors, first: {data['quantized_tensors'][0]}")
    else:
        console.print("already-quantized tensors: none")
    if data["estimated_size"]:
        t = Table(title="estimated size")
        t.add_column("method")
        t.add_column("size", justify="right")
        for m, v in data["estimated_size"].items():
            t.add_row(m, f"{v['bytes'] / 2**20:.1f} MiB")
        console.print(t)
