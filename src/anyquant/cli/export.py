"""`anyquant export`: an anyquant output in another runtime's format (GGUF for llama.cpp), over
the public API (anyquant.api)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from anyquant.cli.common import app, console, fails_cleanly, setup_logging
from anyquant.config import GGUF_TYPES
from anyquant.errors import AnyquantError

FORMATS = ("gguf",)


@app.command()
@fails_cleanly
def export(directory: Path = typer.Argument(..., help="an anyquant output directory (from `anyquant quantize`)"),
           to: str = typer.Option(..., "--to", help="target format: gguf (llama.cpp)"),
           out: Optional[Path] = typer.Option(None, "--out", "-o", help="file to write (default: DIR.gguf beside DIR)"),
           gguf_type: Optional[str] = typer.Option(None, "--type", help="GGUF type for every quantized Linear "
                                                   f"({', '.join(GGUF_TYPES)}; default: the method's own, "
                                                   "docs/formats.md#gguf)"),
           force: bool = typer.Option(False, "--force", help="replace an existing file"),
           no_verify: bool = typer.Option(False, "--no-verify", help="skip checking the output's files against "
                                          "the sha256 its anyquant.json recorded")):
    """Write the output as one GGUF file for llama.cpp: int4-family codes as Q4_1 / Q4_0 and int8 as
    Q8_0 (copied, nearly lossless), nf4 / fp4 re-quantized to Q5_1; the weight error is printed."""
    if to not in FORMATS:
        raise AnyquantError(f"--to {to}: expected one of {', '.join(FORMATS)}")
    if gguf_type is not None and gguf_type not in GGUF_TYPES:
        raise AnyquantError(f"--type {gguf_type}: expected one of {', '.join(GGUF_TYPES)} (the types gguf's Python "
                            "quantizer writes; Q4_K and the other k-quants it only reads)")
    if not (directory / "anyquant.json").is_file():
        raise AnyquantError(f"{directory}: no anyquant.json there; export takes an output of `anyquant quantize`")
    target = out if out is not None else directory.resolve().with_name(directory.resolve().name + ".gguf")
    if target.suffix != ".gguf":
        raise AnyquantError(f"--out {target}: a GGUF file name ends in .gguf")
    if target.exists() and not force:
        raise AnyquantError(f"{target} exists; pass --force to replace it")
    setup_logging(False)
    from anyquant.api import export as export_api

    result = export_api(directory, to=to, out=target, gguf_type=gguf_type, force=force, verify=not no_verify)
    con = console()
    types: dict[str, int] = {}
    for t in result.tensor_types.values():
        types[t] = types.get(t, 0) + 1
    errs = list(result.weight_errors.values())
    con.print(f"{'written':24s} {result.path} ({result.path.stat().st_size / 2**20:.1f} MiB)", highlight=False)
    con.print(f"{'tensors':24s} " + ", ".join(f"{n} {t}" for t, n in sorted(types.items())), highlight=False)
    if errs:
        how = sorted({e["how"] for e in errs})
        con.print(f"{'quantized weights':24s} {len(errs)} as {', '.join(sorted({e['type'] for e in errs}))} "
                  f"({', '.join(how)})", highlight=False)
        con.print(f"{'max error vs anyquant':24s} {max(e['max_abs_error_rel'] for e in errs):.2e} of a weight's "
                  f"largest magnitude; RMS {max(e['rms_error_rel'] for e in errs):.2e} (worst layer)", highlight=False)
    for n in result.notes:
        con.print(f"{'note':24s} {n}", highlight=False)
