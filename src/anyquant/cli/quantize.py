"""`anyquant quantize`: the command line over the public API (anyquant.api)."""

from __future__ import annotations

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
    fails_cleanly,
    method_options,
    setup_logging,
)
from anyquant.errors import AnyquantError


@app.command()
@fails_cleanly
def quantize(source: str = SourceArg,
             method: Optional[str] = typer.Option(
                 None, "--method", "-m",
                 help="nf4, fp4, int8, int4, hqq, awq, gptq, a scheme alias (W4A16, ...) or recommended; "
                      "default: recommended (gptq, symmetric, group size 64, block-output tuning)"),
             out: Path = typer.Option(..., "--out", "-o", help="output directory (written atomically)"),
             group_size: Optional[int] = typer.Option(None, "--group-size"),
             symmetric: Optional[bool] = SymmetricOpt,
             target: str = TargetOpt,
             dtype: str = typer.Option("auto", "--dtype", help="auto|bfloat16|float16|float32"),
             plan_file: Optional[Path] = typer.Option(None, "--plan", help="overrides (JSON)"),
             keep: List[str] = typer.Option([], "--keep", help="module name or re:pattern to keep in float"),
             only: List[str] = typer.Option([], "--only", help="quantize only Linear layers matching this name or re:pattern"),
             include_vision: bool = typer.Option(False, "--include-vision", help="also quantize the vision tower's Linear layers"),
             trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
             requantize: bool = typer.Option(False, "--requantize", help="dequantize an already-quantized source first"),
             calib: Optional[Path] = typer.Option(None, "--calib", help="calibration text file for awq/gptq (default: the bundled news corpus)"),
             tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="awq/gptq: the directory of the tokenizer for calibration text, where SOURCE has none it can load"),
             n_samples: Optional[int] = typer.Option(None, "--n-samples", help="awq/gptq: calibration sequences"),
             seq_len: Optional[int] = typer.Option(None, "--seq-len", help="awq/gptq: tokens per calibration sequence"),
             act_order: Optional[bool] = typer.Option(None, "--act-order/--no-act-order", help="gptq: columns in order of decreasing Hessian diagonal"),
             awq_scales: Optional[bool] = typer.Option(None, "--awq-scales/--no-awq-scales", help="gptq: AWQ's activation-aware scales first (better, about 2x slower)"),
             tune_steps: Optional[int] = typer.Option(None, "--tune-steps", help="awq/gptq: block-output tuning steps per block after the method (0: off)"),
             tune_target: Optional[str] = typer.Option(None, "--tune-target", help="awq/gptq tuning toward: model (the float model's output of each block) or block (the float block's, on the same inputs)"),
             force: bool = typer.Option(False, "--force", help="replace an existing output directory"),
             verify_save: bool = typer.Option(True, "--verify-save/--no-verify-save", help="reload the written output (anyquant and stock transformers) and compare its probe logits with the in-memory model's before putting it in place"),
             report: bool = typer.Option(False, "--report", help="also write OUT/report.html (headline, per-layer error, size, sample generations)"),
             stream: Optional[bool] = typer.Option(None, "--stream/--no-stream", help="read the model block by block from its safetensors files and write the output shard by shard (models larger than memory); default: stream when the checkpoint's weights exceed --max-memory or 80% of the memory available"),
             max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="streamed output: largest safetensors shard (e.g. 5GB, 500MB)"),
             max_memory: Optional[str] = typer.Option(None, "--max-memory", help="host memory budget (e.g. 20GB): streaming is chosen when the checkpoint exceeds it, and refused when two blocks do not fit it"),
             verbose: bool = typer.Option(False, "--verbose", "-v")):
    """Quantize SOURCE with METHOD (default: the recommended 4-bit method) and write a loadable
    model directory to OUT."""
    from anyquant.config import RECOMMENDED, recommended_text

    if method is None:
        method = RECOMMENDED
        typer.echo(f"note: no --method: {RECOMMENDED} = {recommended_text()}")
    opts = method_options(method, group_size, symmetric=symmetric, n_samples=n_samples, seq_len=seq_len, act_order=act_order,
                          awq_scales=awq_scales, tune_steps=tune_steps, tune_target=tune_target)
    check_dtype(dtype)
    check_target(target)
    check_patterns(keep, only)
    setup_logging(verbose)
    from anyquant.api import quantize as run
    from anyquant.api import save
    from anyquant.config import make_config
    from anyquant.eval.report import build_report, command_line
    from anyquant.formats.io import check_output_dir, clean_leftovers
    from anyquant.model.files import (
        estimate_output_bytes,
        max_positions,
        read_text_file,
    )
    from anyquant.planning.plan import load_overrides
    from anyquant.planning.summary import collapse_notes

    # preflight: everything that can be refused is refused before the slow part
    src, config = check_model_dir(source, trust_remote_code)
    bits = make_config(method, **opts).bits or 16
    if seq_len is not None:
        positions = max_positions(config)
        if positions is not None and seq_len > positions:
            raise AnyquantError(f"--seq-len {seq_len}: the model ({src}) has max_position_embeddings {positions}; "
                                f"pass --seq-len {positions} or less")
    if plan_file is not None:
        load_overrides(plan_file)
    if calib is not None:
        read_text_file(calib, "--calib", "calibration text")
    for n in clean_leftovers(out):
        typer.echo(f"note: {n}", err=False)
    check_output_dir(out, src, force, estimated_bytes=estimate_output_bytes(src, bits))
    from anyquant.formats.shards import parse_size
    from anyquant.stream import should_stream

    parse_size(max_shard_size)
    if max_memory is not None:
        parse_size(max_memory)
    if stream is None:
        stream, why = should_stream(src, max_memory)
        if stream:
            typer.echo(f"note: streaming block by block: {why} (--no-stream loads it whole)")
    if stream and requantize:
        raise AnyquantError("--stream with --requantize: streamed quantization does not dequantize a quantized "
                            "source; drop --stream (or --requantize)")
    ov = [(k, "keep") for k in keep]
    common = dict(dtype=dtype, plan=plan_file, overrides=ov, only=only, include_vision=include_vision,
                  trust_remote_code=trust_remote_code, calib=calib, tokenizer=tokenizer, target=target, **opts)
    if stream:
        from anyquant.api import quantize_to_disk

        result = quantize_to_disk(src, method, out, force=force, max_shard_size=max_shard_size,
                                  max_memory=max_memory, verify=verify_save, command=command_line(), **common)
        path = result.output
    else:
        result = run(src, method, requantize=requantize, **common)
        path = save(result, out, force=force, verify=verify_save, command=command_line())
    r = result.report
    typer.echo(
        f"{method}: quantized {r['modules_quantized']} modules ({r['params_quantized_share']:.0%} of the parameters), "
        f"kept {r['modules_kept']}; "
        f"probe logits error {_error_text(r['probe_logits_relative_error'])}; wrote {path}"
    )
    typer.echo(f"compute dtype {result.plan.compute_dtype} (--target {target}): "
               f"{result.report['dtype_policy']['reason']}")
    for n in collapse_notes(result.notes + result.plan.notes):
        typer.echo(f"note: {n}")
    if report:
        del result  # the report loads the output and the source one at a time
        typer.echo(f"report: {build_report([path])} (quality not measured yet: `anyquant eval {path} --report` adds it)")


def _error_text(error) -> str:
    return "not measured" if error is None else f"{error:.4f}"
