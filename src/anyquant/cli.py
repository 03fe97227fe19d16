"""Command line: inspect | plan | quantize | eval | doctor | demo. Bad input: one line on stderr, exit 2."""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path
from typing import Callable, List, Optional

import typer

from anyquant.errors import AnyquantError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Quantize Hugging Face models to 8 and 4 bits, safely, and measure what it cost.")


def _fails_cleanly(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except AnyquantError as e:
            typer.echo(f"anyquant: error: {e}", err=True)
            raise typer.Exit(2)
        except KeyboardInterrupt:
            typer.echo("anyquant: interrupted; nothing was written", err=True)
            raise typer.Exit(130)
    return wrapper


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="anyquant: %(levelname)s: %(message)s")
    import warnings

    import transformers

    # bitsandbytes' int8 CPU path says this on every matmul; it is expected (LLM.int8 computes
    # in float16 by design) and drowns the output.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _console():
    from rich.console import Console

    return Console()


SourceArg = typer.Argument(..., help="local model directory (transformers format), or `default`")


@app.command()
@_fails_cleanly
def inspect(source: str = SourceArg, json_out: bool = typer.Option(False, "--json"),
            trust_remote_code: bool = typer.Option(False, "--trust-remote-code")):
    """Components, module kinds, parameters and dtypes, tied and already-quantized tensors, size per method."""
    _setup_logging(False)
    from anyquant.inspect_cmd import inspect_source

    data = inspect_source(source, trust_remote_code)
    if json_out:
        typer.echo(json.dumps(data, indent=2))
        return
    from anyquant.inspect_cmd import print_inspect

    print_inspect(_console(), data)


@app.command()
@_fails_cleanly
def plan(source: str = SourceArg, method: str = typer.Option("nf4", "--method", "-m"),
         group_size: Optional[int] = typer.Option(None, "--group-size"),
         dtype: str = typer.Option("auto", "--dtype"),
         plan_file: Optional[Path] = typer.Option(None, "--plan", help="overrides (JSON)"),
         keep: List[str] = typer.Option([], "--keep", help="module name or re:pattern to keep in float"),
         only: List[str] = typer.Option([], "--only", help="quantize only Linear layers matching this name or re:pattern"),
         include_vision: bool = typer.Option(False, "--include-vision", help="also quantize the vision tower's Linear layers"),
         json_out: bool = typer.Option(False, "--json"),
         trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
         requantize: bool = typer.Option(False, "--requantize")):
    """One row per module: action, method, dtype, reason."""
    _setup_logging(False)
    from anyquant.config import make_config
    from anyquant.model.load import load_model
    from anyquant.model.modelmap import build_model_map
    from anyquant.numerics.dtype import choose_compute_dtype, dtype_name
    from anyquant.plan import build_plan
    from anyquant.plan.plan import load_overrides

    cfg = make_config(method, **_method_options(method, group_size))
    model, _, _ = load_model(source, trust_remote_code=trust_remote_code, requantize=requantize)
    ov = (load_overrides(plan_file) if plan_file else []) + [(k, "keep") for k in keep]
    from anyquant.numerics.probe import run_probe
    from anyquant.pipeline import probe_inputs

    facts, _, probe_notes = run_probe(model, probe_inputs(model))
    p = build_plan(build_model_map(model), cfg, dtype_name(choose_compute_dtype(dtype)), ov, facts,
                   include_vision=include_vision, only=only)
    p.notes = probe_notes + p.notes
    if json_out:
        typer.echo(json.dumps(p.to_dict(), indent=2))
        return
    from rich.table import Table

    t = Table(title=f"plan: {method}")
    for c in ("module", "kind", "component", "action", "method", "dtype", "reason"):
        t.add_column(c)
    for d in p.decisions:
        t.add_row(d.name, d.kind, d.component, d.action, d.method or "-", d.dtype, d.reason)
    con = _console()
    con.print(t)
    con.print(f"{len(p.to_quantize())} quantized, {len(p.kept())} kept")
    for n in p.notes:
        con.print(f"note: {n}")


def _method_options(method: str, group_size: Optional[int], **given) -> dict:
    """The method's config fields set on the command line; a flag the method does not take is
    refused by name, with the methods that take it."""
    import dataclasses

    from anyquant.config import config_class, known_methods

    given = {"group_size": group_size, **given}
    fields = {f.name for f in dataclasses.fields(config_class(method))}
    for name, value in given.items():
        if value is not None and name not in fields:
            takers = [m for m in known_methods() if name in {f.name for f in dataclasses.fields(config_class(m))}]
            flag = "--" + name.replace("_", "-")
            raise AnyquantError(f"{flag} does not apply to {method} (it applies to: {', '.join(takers)})")
    return {k: v for k, v in given.items() if v is not None}


@app.command()
@_fails_cleanly
def quantize(source: str = SourceArg, method: str = typer.Option(..., "--method", "-m"),
             out: Path = typer.Option(..., "--out", "-o", help="output directory (written atomically)"),
             group_size: Optional[int] = typer.Option(None, "--group-size"),
             dtype: str = typer.Option("auto", "--dtype", help="auto|bfloat16|float16|float32"),
             plan_file: Optional[Path] = typer.Option(None, "--plan", help="overrides (JSON)"),
             keep: List[str] = typer.Option([], "--keep", help="module name or re:pattern to keep in float"),
             only: List[str] = typer.Option([], "--only", help="quantize only Linear layers matching this name or re:pattern"),
             include_vision: bool = typer.Option(False, "--include-vision", help="also quantize the vision tower's Linear layers"),
             trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
             requantize: bool = typer.Option(False, "--requantize", help="dequantize an already-quantized source first"),
             calib: Optional[Path] = typer.Option(None, "--calib", help="calibration text file for awq/gptq (default: the bundled news corpus)"),
             n_samples: Optional[int] = typer.Option(None, "--n-samples", help="awq/gptq: calibration sequences"),
             seq_len: Optional[int] = typer.Option(None, "--seq-len", help="awq/gptq: tokens per calibration sequence"),
             act_order: Optional[bool] = typer.Option(None, "--act-order/--no-act-order", help="gptq: columns in order of decreasing Hessian diagonal"),
             awq_scales: Optional[bool] = typer.Option(None, "--awq-scales/--no-awq-scales", help="gptq: AWQ's activation-aware scales first (better, about 2x slower)"),
             tune_steps: Optional[int] = typer.Option(None, "--tune-steps", help="awq/gptq: block-output tuning steps per block after the method (0: off)"),
             tune_target: Optional[str] = typer.Option(None, "--tune-target", help="awq/gptq tuning toward: model (the float model's output of each block) or block (the float block's, on the same inputs)"),
             force: bool = typer.Option(False, "--force", help="replace an existing output directory"),
             verbose: bool = typer.Option(False, "--verbose", "-v")):
    """Quantize SOURCE with METHOD and write a loadable model directory to OUT."""
    _setup_logging(verbose)
    from anyquant.formats.io import check_output_dir, save
    from anyquant.model.load import resolve_source
    from anyquant.pipeline import quantize as run

    src = resolve_source(source)
    check_output_dir(out, src, force)  # fail before the slow part
    ov = [(k, "keep") for k in keep]
    result = run(src, method, dtype=dtype, plan=plan_file, overrides=ov, only=only, include_vision=include_vision,
                 trust_remote_code=trust_remote_code, requantize=requantize, calib=calib,
                 **_method_options(method, group_size, n_samples=n_samples, seq_len=seq_len, act_order=act_order,
                                  awq_scales=awq_scales, tune_steps=tune_steps,
                                  tune_target=tune_target))
    path = save(result, out, force=force)
    r = result.report
    typer.echo(
        f"{method}: quantized {r['modules_quantized']} modules, kept {r['modules_kept']}; "
        f"probe logits error {r['probe_logits_relative_error']:.4f}; wrote {path}"
    )
    for n in result.notes + result.plan.notes:
        typer.echo(f"note: {n}")


@app.command("eval")
@_fails_cleanly
def eval_cmd(target: str = typer.Argument(..., help="model directory to evaluate (an anyquant output or any model)"),
             baseline: Optional[str] = typer.Option(None, "--baseline", help="float model to compare with (default: the target's source)"),
             text: Optional[Path] = typer.Option(None, "--text", help="UTF-8 text file (default: held-out Wikipedia text)"),
             max_tokens: int = typer.Option(16384, "--max-tokens"),
             json_out: bool = typer.Option(False, "--json"),
             trust_remote_code: bool = typer.Option(False, "--trust-remote-code")):
    """Perplexity, KL divergence and top-1 agreement against the baseline; bits per weight; size; memory."""
    _setup_logging(False)
    from anyquant.eval_cmd import run_eval

    data = run_eval(target, baseline, text, max_tokens, trust_remote_code, progress=not json_out)
    if json_out:
        typer.echo(json.dumps(data, indent=2))
        return
    con = _console()
    for k, v in data.items():
        con.print(f"{k:28s} {v}")


@app.command()
@_fails_cleanly
def demo(out: Path = typer.Option(Path("out/demo"), "--out"),
         methods: str = typer.Option("nf4,fp4,int8,int4", "--methods"),
         max_tokens: int = typer.Option(8192, "--max-tokens")):
    """Quantize the built-in model with every method, evaluate each, print a table, write an HTML report."""
    _setup_logging(False)
    from anyquant.demo import run_demo

    run_demo(out, [m.strip() for m in methods.split(",") if m.strip()], max_tokens)


@app.command()
@_fails_cleanly
def doctor(source: str = SourceArg,
           bnb_config: Optional[Path] = typer.Option(None, "--bnb-config", help="your BitsAndBytesConfig as JSON (may add \"dtype\")"),
           trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
           json_out: bool = typer.Option(False, "--json")):
    """Predict which failure (F1-F5) a transformers + bitsandbytes config hits here; print a corrected config."""
    _setup_logging(False)
    from anyquant.doctor import diagnose, print_report, read_bnb_config

    data = diagnose(source, read_bnb_config(bnb_config), trust_remote_code=trust_remote_code)
    if json_out:
        typer.echo(json.dumps(data, indent=2))
        return
    print_report(data, typer.echo)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
