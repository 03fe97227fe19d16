"""Evaluation report: one self-contained HTML file with plots, a Markdown twin, a console table.

The HTML embeds its PNGs as base64 so it can be mailed, attached to an issue or opened from
a CI artifact without the files around it going missing.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import html
import importlib.metadata
import io
import json
import logging
import math
import numbers
import os
import pathlib
import platform
import re
import shlex
import sys
import tempfile
from typing import Any, Iterable, Mapping, Optional, Sequence

from anyquant.errors import AnyquantError
from anyquant.eval.stored import stored_sizes
from anyquant.formats.io import load_quantized
from anyquant.formats.manifest import MANIFEST, read_manifest
from anyquant.model.load import load_model, load_tokenizer, resolve_source

log = logging.getLogger(__name__)

Columns = Sequence[tuple[str, str]]
Rows = Sequence[Mapping[str, Any]]

_MISSING = "—"


def format_value(key: str, value: Any) -> str:
    """Format one cell, choosing precision from the column key.

    Keys follow the metric names the evaluator writes: ``*perplexity*`` 2 decimals, ``*kl*``
    4 decimals, ``*bytes*`` MiB with 1 decimal, ``*agreement*``/``*fraction*`` as a percentage.
    """
    if value is None:
        return _MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    # numbers.Real, not (int, float): numpy scalars from metric code must format as numbers.
    if not isinstance(value, numbers.Real):
        return str(value)
    if not math.isfinite(value):
        return str(value)  # nan / inf must stay visible, never be formatted into a number
    k = key.lower()
    if "bytes" in k:
        return format_bytes(value)
    if "perplexity" in k or k == "ppl" or k.endswith("_ppl"):
        return f"{value:,.2f}"
    if "kl" in k.split("_") or k.startswith("kl"):
        return f"{value:.4f}"
    if "agreement" in k or "fraction" in k or k.endswith("_frac"):
        return f"{value * 100:.2f}%"
    if "bits" in k:
        return f"{value:.2f}"
    if isinstance(value, numbers.Integral):
        return f"{int(value):,}"
    return f"{float(value):.4g}"


def format_bytes(n: float) -> str:
    """Bytes for people: MiB with 1 decimal, GiB with 2 from 1 GiB up."""
    if abs(n) >= 2**30:
        return f"{n / 2**30:,.2f} GiB"
    return f"{n / 2**20:,.1f} MiB"


def _is_numeric_column(key: str, rows: Rows) -> bool:
    values = [r.get(key) for r in rows if r.get(key) is not None]
    return bool(values) and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in values)


def format_table(rows: Rows, columns: Columns, title: Optional[str] = None):
    """A rich Table of ``rows`` in ``columns`` order, for console printing."""
    from rich.table import Table

    table = Table(title=title)
    for key, header in columns:
        table.add_column(header, justify="right" if _is_numeric_column(key, rows) else "left")
    for row in rows:
        table.add_row(*(format_value(key, row.get(key)) for key, _ in columns))
    return table


def _markdown(rows: Rows, columns: Columns) -> str:
    def cell(text: str) -> str:
        # Markdown renders inline HTML, so a method named "<b>" would vanish without escaping.
        text = text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")
        return text.replace("<", "&lt;").replace(">", "&gt;")

    lines = [
        "| " + " | ".join(cell(h) for _, h in columns) + " |",
        "|" + "|".join("---:" if _is_numeric_column(k, rows) else "---" for k, _ in columns) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(cell(format_value(k, row.get(k))) for k, _ in columns) + " |")
    return "\n".join(lines) + "\n"


def _atomic_write(path: pathlib.Path, text: str) -> None:
    # A report that a crashed run left half-written looks like a real one; rename is atomic.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_markdown(
    path: "str | os.PathLike[str]",
    rows: Rows,
    columns: Columns,
    title: Optional[str] = None,
    notes: Iterable[str] = (),
) -> pathlib.Path:
    """Write the table as GitHub Markdown to ``path`` (optionally under a title, notes after)."""
    path = pathlib.Path(path)
    text = (f"# {title}\n\n" if title else "") + _markdown(rows, columns)
    notes = [str(n) for n in notes]
    if notes:
        text += "\n" + "".join(f"- {n}\n" for n in notes)
    _atomic_write(path, text)
    return path


def _png_base64(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _new_figure(width: float, height: float):
    # Figure() without pyplot: no global backend switch, no GUI, no figure leaked into
    # pyplot's registry when many reports are written in one process; savefig renders with Agg.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _plot_per_layer_error(per_layer_error: Mapping[str, Mapping[str, float]]) -> Optional[str]:
    # One x axis for all methods: module order of first appearance, so the same layer lines up
    # across methods even if one method kept some modules in float.
    order: dict[str, int] = {}
    for errors in per_layer_error.values():
        for name in errors:
            order.setdefault(name, len(order))
    if not order:
        return None
    fig = _new_figure(10, 4.5)
    ax = fig.add_subplot()
    plotted = False
    for method, errors in per_layer_error.items():
        # Log scale cannot show 0 (a module kept in float) or non-finite values: skip them.
        points = sorted(
            (order[name], float(err))
            for name, err in errors.items()
            if err is not None and math.isfinite(float(err)) and float(err) > 0
        )
        if not points:
            continue
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", markersize=3, linewidth=1, label=str(method))
        plotted = True
    if not plotted:
        return None
    ax.set_yscale("log")
    ax.set_xlabel("layer index (module order)")
    ax.set_ylabel("relative weight error ‖W−Ŵ‖/‖W‖")
    ax.set_title("Per-layer relative weight error")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    return _png_base64(fig)


def _plot_size_by_component(size_by_component: Mapping[str, Mapping[str, int]]) -> Optional[str]:
    methods = list(size_by_component)
    components: list[str] = []
    for sizes in size_by_component.values():
        for comp in sizes:
            if comp not in components:
                components.append(comp)
    if not methods or not components:
        return None
    # The language model dominates size and is what quantization shrinks: stack it at the
    # bottom (quantized or float alike) so the bars compare at a glance; others keep their order.
    components.sort(key=lambda c: 0 if "language model" in c.lower() else 1)
    fig = _new_figure(max(5.0, 1.2 * len(methods) + 3), 4.5)
    ax = fig.add_subplot()
    bottoms = [0.0] * len(methods)
    for comp in components:
        heights = [float(size_by_component[m].get(comp, 0) or 0) / 2**20 for m in methods]
        ax.bar(methods, heights, bottom=bottoms, label=comp)
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    for i, total in enumerate(bottoms):
        ax.annotate(f"{total:,.1f}", (i, total), ha="center", va="bottom", fontsize="small")
    ax.margins(y=0.12)  # headroom for the totals printed above the bars
    ax.set_ylabel("size on disk (MiB)")
    ax.set_title("Size on disk by component")
    ax.legend(fontsize="small")
    ax.tick_params(axis="x", labelrotation=20)
    return _png_base64(fig)


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1100px; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 10px; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; display: block; margin: 1em 0; }
"""


def _html_table(rows: Rows, columns: Columns) -> str:
    numeric = {k: _is_numeric_column(k, rows) for k, _ in columns}
    head = "".join(f"<th>{html.escape(str(h))}</th>" for _, h in columns)
    body = []
    for row in rows:
        cells = "".join(
            ('<td class="num">' if numeric[k] else "<td>") + html.escape(format_value(k, row.get(k))) + "</td>"
            for k, _ in columns
        )
        body.append(f"<tr>{cells}</tr>")
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(body) + "\n</tbody>\n</table>"


def write_report(
    path: "str | os.PathLike[str]",
    title: str,
    rows: Rows,
    columns: Columns,
    per_layer_error: Optional[Mapping[str, Mapping[str, float]]] = None,
    size_by_component: Optional[Mapping[str, Mapping[str, int]]] = None,
    notes: Iterable[str] = (),
) -> pathlib.Path:
    """Write a self-contained HTML report to ``path`` and its table as Markdown beside it.

    rows: one dict per method; columns: ``(key, header)`` pairs giving the table's order.
    per_layer_error: ``{method: {module_name: relative_error}}`` → log-scale line plot.
    size_by_component: ``{method: {component: bytes}}`` → stacked bar chart.
    Returns the HTML path; the Markdown is at ``path.with_suffix(".md")``.
    """
    path = pathlib.Path(path)
    if path.suffix.lower() == ".md":
        raise AnyquantError(
            f"write_report: {path} ends in .md, which is where the Markdown twin goes; pass a .html path"
        )
    rows = list(rows)
    columns = list(columns)

    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head><body>",
        f"<h1>{html.escape(title)}</h1>",
        _html_table(rows, columns),
    ]
    plots = [
        ("Per-layer relative weight error", per_layer_error and _plot_per_layer_error(per_layer_error)),
        ("Size on disk by component", size_by_component and _plot_size_by_component(size_by_component)),
    ]
    for caption, png in plots:
        if png:
            parts.append(f"<h2>{html.escape(caption)}</h2>")
            parts.append(f'<img alt="{html.escape(caption, quote=True)}" src="data:image/png;base64,{png}">')
    notes = [str(n) for n in notes]
    if notes:
        parts.append("<h2>Notes</h2>\n<ul>")
        parts.extend(f"<li>{html.escape(n)}</li>" for n in notes)
        parts.append("</ul>")
    parts.append("</body></html>\n")

    write_markdown(path.with_suffix(".md"), rows, columns, title=title, notes=notes)
    _atomic_write(path, "\n".join(parts))
    return path


# ---------------------------------------------------------------- run reports
# `anyquant report DIR [DIR...]`, `quantize --report`, `eval --report` and the demo: one page per
# run or comparison, read from what the outputs hold (anyquant.json, eval.jsonl).

EVAL_RECORDS = "eval.jsonl"  # one JSON record per `anyquant eval` of an output, newest last
# .jsonl, not .json: verify_output refuses .json files added after save (loading might use them).
REPORT_FILES = frozenset({"report.html", "report.md", EVAL_RECORDS})
VERSIONED = ("anyquant", "torch", "transformers", "bitsandbytes")
PROMPTS = ("The capital of France is", "Water boils at a temperature of",
           "def fibonacci(n):")
ACCEPTABLE_PPL_INCREASE = 0.05  # the recommendation's bar: perplexity at most 5% above float
HEADER_COMPONENT = "safetensors headers"
FILES_COMPONENT = "tokenizer, config & anyquant.json"

RUN_COLUMNS = [
    ("label", "method"),
    ("bits_per_weight", "bits/weight (stored)"),
    ("perplexity", "perplexity"),
    ("delta_perplexity", "Δ perplexity"),
    ("kl_divergence", "KL (nats)"),
    ("top1_agreement", "top-1 agree"),
    ("size_bytes", "size on disk"),
    ("quantize_seconds", "quantize time (s)"),
]


EVAL_LABELS = {
    "baseline_perplexity": "baseline perplexity", "kl_divergence": "KL divergence (nats/token)",
    "top1_agreement": "top-1 agreement", "tokens": "tokens scored", "eval_seconds": "eval time (s)",
    "size_on_disk_bytes": "size on disk", "peak_memory_load_bytes": "peak memory (load)",
    "peak_memory_eval_bytes": "peak memory (eval)", "bits_per_weight": "bits per weight (stored)",
}


def eval_lines(data: Mapping[str, Any]) -> list[str]:
    """`anyquant eval`'s result as aligned lines for people (perplexity 2 decimals, sizes in MiB/GiB)."""
    return [f"{EVAL_LABELS.get(k, k):28s} {format_value(k, v)}" for k, v in data.items()]


def environment() -> dict[str, Any]:
    """Versions of anyquant and the libraries that decide its numbers, the device and the date."""
    versions = {}
    for name in VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    device = f"{platform.machine()} CPU, {os.cpu_count()} cores"
    torch = sys.modules.get("torch")  # only asked if already imported: the report never imports it
    if torch is not None and torch.cuda.is_available():
        device += f"; GPU {torch.cuda.get_device_name(0)}"
    return {"versions": versions, "device": device, "platform": platform.platform(),
            "python": platform.python_version(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def command_line() -> str:
    """This process's command as the user typed it (`anyquant ...`)."""
    prog = pathlib.Path(sys.argv[0]).name if sys.argv else "anyquant"
    if prog in ("__main__.py", "-m", "-c", ""):
        prog = "anyquant"
    return shlex.join([prog, *sys.argv[1:]])


def save_eval_record(directory: "str | os.PathLike[str]", data: Mapping[str, Any], command: Optional[str] = None) -> pathlib.Path:
    """Append one `anyquant eval` result to DIR/eval.jsonl (read by the report)."""
    path = pathlib.Path(directory) / EVAL_RECORDS
    record = {**data, "command": command, "date": environment()["date"]}
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=str) + "\n")
    except OSError as e:
        raise AnyquantError(f"writing {path} failed: {e.strerror or e}; make {path.parent} writable "
                            "or evaluate without --report") from None
    return path


def read_eval_record(directory: "str | os.PathLike[str]") -> Optional[dict[str, Any]]:
    """The newest record of DIR/eval.jsonl, or None; a damaged line is skipped with a warning."""
    path = pathlib.Path(directory) / EVAL_RECORDS
    if not path.is_file():
        return None
    newest = None
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            log.warning("%s line %d is not JSON; skipped (re-run anyquant eval to replace it)", path, n)
            continue
        if isinstance(rec, dict):
            newest = rec
    return newest


def output_size(directory: "str | os.PathLike[str]", plan_dict: Mapping[str, Any]) -> dict[str, Any]:
    """An output's size by component, adding up exactly to its total: the tensors per component
    (stored_sizes), the safetensors headers, and every other file of the output (tokenizer,
    config, anyquant.json). Reports and eval records written beside them are not counted."""
    directory = pathlib.Path(directory)
    stored = stored_sizes(directory, dict(plan_dict))
    components = {k: int(v) for k, v in stored["bytes_by_component"].items()}
    weights = other = 0
    for f in sorted(directory.rglob("*")):
        if not f.is_file() or f.relative_to(directory).as_posix() in REPORT_FILES:
            continue
        if f.suffix == ".safetensors":
            weights += f.stat().st_size
        else:
            other += f.stat().st_size
    components[HEADER_COMPONENT] = weights - sum(components.values())
    components[FILES_COMPONENT] = other
    return {"components": components, "total_bytes": weights + other,
            "bits_per_weight": stored["bits_per_weight"]}


def source_size(directory: "str | os.PathLike[str]") -> dict[str, Any]:
    """The float model's size on disk: its weight files and everything else."""
    directory = pathlib.Path(directory)
    weights = other = 0
    for f in sorted(directory.rglob("*")):
        if f.is_file() and not f.is_symlink():
            if f.suffix in (".safetensors", ".bin", ".pt"):
                weights += f.stat().st_size
            else:
                other += f.stat().st_size
    return {"components": {"weights (float)": weights, "tokenizer & config": other},
            "total_bytes": weights + other}


def _config_label(method: str, config: Mapping[str, Any]) -> str:
    parts = [method]
    if config.get("group_size"):
        parts.append(f"g{config['group_size']}")
    if method in ("awq", "gptq") and config.get("n_samples"):
        parts.append(f"{config['n_samples']}×{config.get('seq_len')}")
    if config.get("tune_steps"):
        parts.append(f"tune {config['tune_steps']}")
    return " ".join(parts)


def _reconstructed_command(run: Mapping[str, Any]) -> str:
    cfg = run["config"]
    args = ["anyquant", "quantize", run["source"] or "SOURCE", "--method", run["method"]]
    if cfg.get("group_size"):
        args += ["--group-size", str(cfg["group_size"])]
    if run["method"] in ("awq", "gptq"):
        for key in ("n_samples", "seq_len", "tune_steps"):
            if cfg.get(key) is not None:
                args += ["--" + key.replace("_", "-"), str(cfg[key])]
    return shlex.join(args + ["--out", str(run["dir"])])


def collect_run(directory: "str | os.PathLike[str]") -> dict[str, Any]:
    """What the report needs from one output: its manifest, size by component, newest eval."""
    directory = pathlib.Path(directory)
    manifest = read_manifest(directory)
    if manifest is None:
        raise AnyquantError(f"{directory}: no {MANIFEST} there; `anyquant report` reads outputs of "
                            "`anyquant quantize`: pass such a directory")
    for key in ("method", "plan"):
        if key not in manifest:
            raise AnyquantError(f"{directory / MANIFEST}: has no {key!r}; the output is damaged or from an "
                                "older anyquant: quantize again")
    metrics = manifest.get("metrics") or {}
    config = manifest.get("config") or {}
    run: dict[str, Any] = {
        "dir": str(directory), "method": manifest["method"], "config": config,
        "label": _config_label(manifest["method"], config),
        "source": (manifest.get("source") or {}).get("path"),
        "created": manifest.get("created"), "anyquant_version": manifest.get("anyquant_version"),
        "metrics": metrics, "per_layer": metrics.get("per_layer_weight_error") or {},
        "size": output_size(directory, manifest["plan"]), "eval": read_eval_record(directory),
    }
    run["command"] = metrics.get("command")
    return run


def _row(run: Mapping[str, Any]) -> dict[str, Any]:
    ev = run.get("eval") or {}
    ppl, base = ev.get("perplexity"), ev.get("baseline_perplexity")
    return {
        "label": run["label"], "bits_per_weight": run["size"]["bits_per_weight"], "perplexity": ppl,
        "delta_perplexity": (ppl - base) if ppl is not None and base is not None else None,
        "kl_divergence": ev.get("kl_divergence"), "top1_agreement": ev.get("top1_agreement"),
        "size_bytes": run["size"]["total_bytes"], "quantize_seconds": run["metrics"].get("quantize_seconds"),
    }


def _float_row(runs: Sequence[Mapping[str, Any]], source: Optional[Mapping[str, Any]]) -> Optional[dict[str, Any]]:
    base = next((r["eval"]["baseline_perplexity"] for r in runs
                 if r.get("eval") and r["eval"].get("baseline_perplexity") is not None), None)
    if source is None and base is None:
        return None
    return {"label": "float (source)", "bits_per_weight": None, "perplexity": base,
            "delta_perplexity": 0.0 if base is not None else None, "kl_divergence": 0.0 if base is not None else None,
            "top1_agreement": 1.0 if base is not None else None,
            "size_bytes": source["total_bytes"] if source else None, "quantize_seconds": None}


def _pct(x: float) -> str:
    return f"{x * 100:+.1f}%"


def headline(runs: Sequence[Mapping[str, Any]], float_row: Optional[Mapping[str, Any]]) -> dict[str, str]:
    """What was done, the quality cost, the memory saved, and a recommendation, in sentences."""
    model = pathlib.Path(runs[0]["source"]).name if runs[0].get("source") else "the model"
    labels = ", ".join(r["label"] for r in runs)
    done = f"Quantized {model} with {labels}" + (f" ({len(runs)} outputs compared)." if len(runs) > 1 else ".")
    float_size = float_row and float_row.get("size_bytes")
    sizes = []
    for r in runs:
        total = r["size"]["total_bytes"]
        s = f"{r['label']}: {format_bytes(total)}"
        if float_size:
            s += f" ({_pct(total / float_size - 1)} vs {format_bytes(float_size)} float)"
        sizes.append(s)
    memory = "Size on disk — " + "; ".join(sizes) + "."
    evaluated = [r for r in runs if (r.get("eval") or {}).get("perplexity") is not None
                 and r["eval"].get("baseline_perplexity") is not None]
    if not evaluated:
        quality = "Quality not measured yet: run `anyquant eval DIR --report` to add perplexity, KL and top-1 here."
        return {"done": done, "quality": quality, "memory": memory,
                "recommendation": "No recommendation without a quality measurement."}
    costs = []
    for r in evaluated:
        ev = r["eval"]
        rel = ev["perplexity"] / ev["baseline_perplexity"] - 1
        costs.append((rel, r))
    quality = "Quality cost — " + "; ".join(
        f"{r['label']}: perplexity {r['eval']['baseline_perplexity']:.2f} → {r['eval']['perplexity']:.2f} "
        f"({_pct(rel)}), KL {r['eval']['kl_divergence']:.4f}, top-1 agreement {r['eval']['top1_agreement'] * 100:.1f}%"
        for rel, r in costs) + "."
    ok = [(rel, r) for rel, r in costs if rel <= ACCEPTABLE_PPL_INCREASE]
    bar = f"{ACCEPTABLE_PPL_INCREASE * 100:.0f}%"
    if ok:
        rel, best = min(ok, key=lambda x: (x[1]["size"]["total_bytes"], x[1]["eval"]["kl_divergence"]))
        rec = (f"Use {best['label']} ({best['dir']}): the smallest output whose perplexity is within {bar} of "
               f"the float model ({_pct(rel)}, {format_bytes(best['size']['total_bytes'])}).")
    else:
        rel, best = min(costs, key=lambda x: x[1]["eval"]["kl_divergence"])
        rec = (f"No output is within {bar} of the float perplexity; the closest is {best['label']} ({_pct(rel)}). "
               "Try gptq or awq with more calibration (--n-samples, --tune-steps), a smaller --group-size, "
               "or keep the most damaged layers below in float (--keep).")
    four_bit = [(rel, r) for rel, r in costs if (r["size"]["bits_per_weight"] or 99) < 6]
    if len(costs) > 1 and four_bit:
        rel, b4 = min(four_bit, key=lambda x: x[1]["eval"]["kl_divergence"])
        if b4 is not best:
            rec += (f" Best at about 4 bits: {b4['label']} (lowest KL of the 4-bit outputs: "
                    f"{b4['eval']['kl_divergence']:.4f}, perplexity {_pct(rel)}, {format_bytes(b4['size']['total_bytes'])}).")
    return {"done": done, "quality": quality, "memory": memory, "recommendation": rec}


def _plot_quality_vs_bits(rows: Sequence[Mapping[str, Any]], float_row: Optional[Mapping[str, Any]]) -> Optional[str]:
    points = [r for r in rows if r.get("perplexity") is not None and r.get("bits_per_weight") is not None]
    if not points:
        return None
    fig = _new_figure(10, 4)
    ax1, ax2 = fig.subplots(1, 2)
    for r in points:
        for ax, key in ((ax1, "perplexity"), (ax2, "kl_divergence")):
            if r.get(key) is None:
                continue
            ax.scatter([r["bits_per_weight"]], [r[key]], s=30)
            ax.annotate(str(r["label"]), (r["bits_per_weight"], r[key]), fontsize="small",
                        xytext=(4, 4), textcoords="offset points")
    if float_row and float_row.get("perplexity") is not None:
        ax1.axhline(float_row["perplexity"], linestyle="--", color="gray", linewidth=1)
        ax1.annotate(f"float {float_row['perplexity']:.2f}", (0.01, float_row["perplexity"]),
                     xycoords=("axes fraction", "data"), fontsize="small", color="gray",
                     xytext=(0, 3), textcoords="offset points")
    ax1.set_title("Perplexity vs stored bits per weight (lower is better)")
    ax1.set_ylabel("perplexity")
    ax2.set_title("KL from the float model vs bits per weight")
    ax2.set_ylabel("KL divergence (nats/token)")
    for ax in (ax1, ax2):
        ax.set_xlabel("stored bits per quantized weight (codes + scales)")
        ax.grid(True, alpha=0.3)
        ax.margins(x=0.25, y=0.2)
    return _png_base64(fig)


_BLOCK = re.compile(r"^(?P<prefix>.*?)\.(?P<index>\d+)\.(?P<rest>.+)$")


def group_by_block(errors: Mapping[str, float]) -> tuple[str, list[int], list[str], dict[tuple[str, int], float], dict[str, float]]:
    """Module errors as a block × module-type grid: `model.layers.12.self_attn.q_proj` is block 12,
    row `self_attn.q_proj`. Returns (block prefix, block indices, row names, grid, modules outside blocks)."""
    prefixes: dict[str, int] = {}
    for name in errors:
        m = _BLOCK.match(name)
        if m:
            prefixes[m["prefix"]] = prefixes.get(m["prefix"], 0) + 1
    prefix = max(prefixes, key=prefixes.get) if prefixes else ""
    grid: dict[tuple[str, int], float] = {}
    rows: list[str] = []
    blocks: set[int] = set()
    outside: dict[str, float] = {}
    for name, err in errors.items():
        m = _BLOCK.match(name)
        if m and m["prefix"] == prefix:
            idx = int(m["index"])
            if m["rest"] not in rows:
                rows.append(m["rest"])
            blocks.add(idx)
            grid[(m["rest"], idx)] = float(err)
        else:
            outside[name] = float(err)
    return prefix, sorted(blocks), rows, grid, outside


def _plot_block_heatmap(label: str, errors: Mapping[str, float]) -> Optional[str]:
    prefix, blocks, rows, grid, _ = group_by_block(errors)
    vals = [v for v in grid.values() if math.isfinite(v) and v > 0]
    if not vals:
        return None
    from matplotlib.colors import LogNorm

    data = [[grid.get((row, b), float("nan")) for b in blocks] for row in rows]
    data = [[v if math.isfinite(v) and v > 0 else float("nan") for v in line] for line in data]
    fig = _new_figure(max(6.0, 0.28 * len(blocks) + 3), 0.35 * len(rows) + 1.6)
    ax = fig.add_subplot()
    im = ax.imshow(data, aspect="auto", norm=LogNorm(vmin=min(vals), vmax=max(vals)), cmap="viridis",
                   interpolation="nearest")
    ax.set_yticks(range(len(rows)), rows, fontsize="small")
    step = max(1, len(blocks) // 15)
    ax.set_xticks(range(0, len(blocks), step), [str(b) for b in blocks[::step]], fontsize="small")
    ax.set_xlabel(f"block ({prefix}.N)")
    ax.set_title(f"{label}: relative weight error ‖W−Ŵ‖/‖W‖ per module (log colour)")
    fig.colorbar(im, ax=ax, fraction=0.03)
    return _png_base64(fig)


def _block_table(label: str, errors: Mapping[str, float]) -> str:
    """The heatmap's numbers, module names as rows and blocks as columns (folded away)."""
    prefix, blocks, rows, grid, outside = group_by_block(errors)
    head = "".join(f"<th>{b}</th>" for b in blocks)
    body = "".join(f"<tr><td><code>{_esc(row)}</code></td>" + "".join(
        f'<td class="num">{grid[(row, b)]:.4f}</td>' if (row, b) in grid else f"<td>{_MISSING}</td>" for b in blocks)
        + "</tr>" for row in rows)
    extra = "".join(f'<tr><td><code>{_esc(n)}</code></td><td class="num">{v:.4f}</td></tr>' for n, v in outside.items())
    table = (f'<table class="small"><thead><tr><th>module \\ block ({_esc(prefix)}.N)</th>{head}</tr></thead>'
             f"<tbody>{body}</tbody></table>")
    if extra:
        table += f"<table class=\"small\"><thead><tr><th>outside the blocks</th><th>relative error</th></tr></thead><tbody>{extra}</tbody></table>"
    return f"<details><summary>{_esc(label)}: every module's error, by block</summary>{table}</details>"


def _plot_sizes(stacks: Mapping[str, Mapping[str, int]]) -> Optional[str]:
    return _plot_size_by_component(stacks)


def generate_samples(model, tokenizer, prompts: Sequence[str] = PROMPTS, max_new_tokens: int = 16) -> list[str]:
    """Greedy continuations of `prompts` (the new text only), for side-by-side reading. One batched
    generate call (left padding): on CPU int4/nf4 layers dequantize per call, so steps are what costs."""
    device = getattr(model, "device", None)
    side, pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        enc = tokenizer(list(prompts), return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side, tokenizer.pad_token = side, pad
    if device is not None:
        enc = enc.to(device)
    ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    start = enc["input_ids"].shape[1]
    return [tokenizer.decode(row[start:], skip_special_tokens=True) for row in ids]


def samples_from_disk(runs: Sequence[Mapping[str, Any]], prompts: Sequence[str] = PROMPTS,
                      max_new_tokens: int = 16, verify: bool = True) -> dict[str, list[str]]:
    """Generations of the float source (when it is still there) and each output, loaded one at a time."""
    samples: dict[str, list[str]] = {}
    tokenizers = {run["dir"]: load_tokenizer(pathlib.Path(run["dir"]), False) for run in runs}
    missing = [d for d, tok in tokenizers.items() if tok is None]
    if missing:
        log.warning("%s: no tokenizer files, so the report has no sample generations; copy the source's "
                    "tokenizer files into it to get them", ", ".join(missing))
        return {}
    src = runs[0].get("source")
    if src and (src == "default" or pathlib.Path(src).is_dir()):
        model, tok, _ = load_model(resolve_source(src))
        samples["float (source)"] = generate_samples(model, tok or tokenizers[runs[0]["dir"]], prompts, max_new_tokens)
        del model
    else:
        log.warning("the float source %s is not there: the report's samples show the outputs only", src)
    for run in runs:
        model = load_quantized(run["dir"], verify=verify)
        samples[run["label"]] = generate_samples(model, tokenizers[run["dir"]], prompts, max_new_tokens)
        del model
    return samples


def _esc(x: Any) -> str:
    return html.escape(str(x))


def render_run_report(runs: Sequence[Mapping[str, Any]], *, source: Optional[Mapping[str, Any]] = None,
                      samples: Optional[Mapping[str, Sequence[str]]] = None, prompts: Sequence[str] = PROMPTS,
                      commands: Sequence[str] = (), env: Optional[Mapping[str, Any]] = None,
                      title: Optional[str] = None, notes: Iterable[str] = ()) -> str:
    """The page: headline, results table, quality vs bits, per-layer error by block, size by
    component (adding up to the table), sample generations, commands, versions, device, date."""
    if not runs:
        raise AnyquantError("a report needs at least one output directory")
    env = env or environment()
    rows = [_row(r) for r in runs]
    frow = _float_row(runs, source)
    table_rows = ([frow] if frow else []) + rows
    head = headline(runs, frow)
    model = pathlib.Path(runs[0]["source"]).name if runs[0].get("source") else "model"
    title = title or f"anyquant report — {model}: " + ", ".join(r["label"] for r in runs)
    parts = ["<!DOCTYPE html>", '<html lang="en">', '<head><meta charset="utf-8">',
             f"<title>{_esc(title)}</title>", f"<style>{_CSS}{_RUN_CSS}</style>", "</head>", "<body>",
             f"<h1>{_esc(title)}</h1>", '<section id="headline" class="headline">']
    for key in ("done", "quality", "memory", "recommendation"):
        cls = ' class="rec"' if key == "recommendation" else ""
        parts.append(f"<p{cls}>{_esc(head[key])}</p>")
    parts.append("</section>")

    parts += ['<section id="results">', "<h2>Results</h2>", _html_table(table_rows, RUN_COLUMNS)]
    parts.append("<p class=\"small\">Perplexity on held-out text; KL(float ‖ quantized) per predicted token; "
                 "top-1: share of positions where both models' most likely token agrees. Size: every file of "
                 "the output (weights, tokenizer, config, anyquant.json).</p></section>")

    parts += ['<section id="quality">', "<h2>Quality versus bits</h2>"]
    png = _plot_quality_vs_bits(table_rows, frow)
    parts.append(_img("Quality versus bits per weight", png) if png else
                 "<p>Not evaluated: run <code>anyquant eval DIR --report</code> on each output.</p>")
    parts.append("</section>")

    parts += ['<section id="per-layer">', "<h2>Per-layer weight error, by block</h2>"]
    any_layer = False
    for run in runs:
        errors = run.get("per_layer") or {}
        if not errors:
            continue
        any_layer = True
        png = _plot_block_heatmap(run["label"], errors)
        if png:
            parts.append(_img(f"{run['label']}: per-layer error by block", png))
        parts.append(_block_table(run["label"], errors))
        worst = sorted(((float(v), k) for k, v in errors.items() if v is not None and math.isfinite(float(v))),
                       reverse=True)[:5]
        parts.append(f"<p>{_esc(run['label'])}: the 5 modules with the largest error</p>")
        parts.append("<table><thead><tr><th>module</th><th>relative error</th></tr></thead><tbody>"
                     + "".join(f'<tr><td><code>{_esc(k)}</code></td><td class="num">{v:.4f}</td></tr>' for v, k in worst)
                     + "</tbody></table>")
    if not any_layer:
        parts.append("<p>These outputs do not record per-layer errors (saved by an older anyquant); "
                     "quantize again to see them.</p>")
    parts.append("</section>")

    stacks: dict[str, dict[str, int]] = {}
    if source:
        stacks["float (source)"] = dict(source["components"])
    for run in runs:
        stacks[run["label"]] = dict(run["size"]["components"])
    comps: list[str] = []
    for st in stacks.values():
        comps += [c for c in st if c not in comps]
    parts += ['<section id="size">', "<h2>Size on disk by component</h2>"]
    png = _plot_sizes(stacks)
    if png:
        parts.append(_img("Size on disk by component", png))
    head_cells = "".join(f"<th>{_esc(label)}</th>" for label in stacks)
    body = "".join(f"<tr><td>{_esc(c)}</td>" + "".join(
        f'<td class="num">{format_bytes(st[c]) if c in st else _MISSING}</td>' for st in stacks.values()) + "</tr>"
        for c in comps)
    totals = "".join(f'<td class="num total">{format_bytes(sum(st.values()))}</td>' for st in stacks.values())
    parts.append(f"<table><thead><tr><th>component</th>{head_cells}</tr></thead><tbody>{body}"
                 f"<tr><td><b>total (= size on disk above)</b></td>{totals}</tr></tbody></table>")
    parts.append("</section>")

    parts += ['<section id="samples">', "<h2>Sample generations (greedy)</h2>"]
    if samples:
        cols = list(samples)
        parts.append("<table><thead><tr><th>prompt</th>" + "".join(f"<th>{_esc(c)}</th>" for c in cols)
                     + "</tr></thead><tbody>")
        for i, prompt in enumerate(prompts):
            parts.append(f"<tr><td><b>{_esc(prompt)}</b></td>" + "".join(
                f'<td class="gen">{_esc(samples[c][i]) if i < len(samples[c]) else _MISSING}</td>' for c in cols) + "</tr>")
        parts.append("</tbody></table>")
    else:
        parts.append("<p>Not generated (--no-samples, or the outputs have no tokenizer files).</p>")
    parts.append("</section>")

    parts += ['<section id="commands">', "<h2>Commands</h2>", "<ul>"]
    for run in runs:
        if run.get("command"):
            parts.append(f"<li>quantize: <code>{_esc(run['command'])}</code></li>")
        else:
            parts.append(f"<li>quantize (reconstructed from anyquant.json; the command was not recorded): "
                         f"<code>{_esc(_reconstructed_command(run))}</code></li>")
        ev = run.get("eval") or {}
        if ev.get("command"):
            parts.append(f"<li>eval: <code>{_esc(ev['command'])}</code></li>")
    parts += [f"<li><code>{_esc(c)}</code></li>" for c in commands]
    parts += ["</ul>", "</section>"]

    parts += ['<section id="environment">', "<h2>Versions, device, date</h2>", "<table><tbody>"]
    for name, version in env["versions"].items():
        parts.append(f"<tr><td>{_esc(name)}</td><td>{_esc(version)}</td></tr>")
    for key in ("device", "platform", "python", "date"):
        parts.append(f"<tr><td>{key}</td><td>{_esc(env.get(key))}</td></tr>")
    parts.append("</tbody></table>")
    for run in runs:
        parts.append(f"<p class=\"small\">{_esc(run['label'])}: {_esc(run['dir'])}, made {_esc(run.get('created'))} "
                     f"by anyquant {_esc(run.get('anyquant_version'))}</p>")
    notes = [str(n) for n in notes]
    if notes:
        parts.append("<ul>" + "".join(f"<li>{_esc(n)}</li>" for n in notes) + "</ul>")
    parts += ["</section>", "</body>", "</html>", ""]
    return "\n".join(parts)


_RUN_CSS = """
section { margin-bottom: 2em; }
.headline { background: #f5f8ff; border-left: 4px solid #3a6ee8; padding: 0.5em 1em; }
.rec { font-weight: bold; }
.small { color: #555; font-size: 0.9em; }
td.gen { font-family: ui-monospace, monospace; font-size: 0.9em; white-space: pre-wrap; max-width: 22em; }
"""


def _img(alt: str, png: str) -> str:
    return f'<img alt="{html.escape(alt, quote=True)}" src="data:image/png;base64,{png}">'


def build_report(dirs: Sequence["str | os.PathLike[str]"], out: "str | os.PathLike[str] | None" = None, *,
                 samples: "bool | Mapping[str, Sequence[str]]" = True, max_new_tokens: int = 16,
                 commands: Sequence[str] = (), verify: bool = True, notes: Iterable[str] = ()) -> pathlib.Path:
    """Write the HTML report of one or more anyquant outputs; returns its path. `out` defaults to
    DIR/report.html for one output, and report.html in their common parent for several.
    samples: True to generate them (loads each output and the float source), a precomputed
    {column: [text per prompt]}, or False."""
    if not dirs:
        raise AnyquantError("anyquant report: pass at least one output directory")
    runs = [collect_run(d) for d in dirs]
    if out is None:
        paths = [pathlib.Path(d).resolve() for d in dirs]
        out = paths[0] / "report.html" if len(paths) == 1 else pathlib.Path(os.path.commonpath(paths)) / "report.html"
    out = pathlib.Path(out)
    if out.suffix.lower() not in (".html", ".htm"):
        raise AnyquantError(f"--out {out}: a report is an HTML page; pass a path ending in .html")
    src = runs[0].get("source")
    source = source_size(resolve_source(src)) if src and (src == "default" or pathlib.Path(src).is_dir()) else None
    if samples is True:
        samples = samples_from_disk(runs, PROMPTS, max_new_tokens, verify=verify)
    page = render_run_report(runs, source=source, samples=samples or None, commands=commands, notes=notes)
    _atomic_write(out, page)
    return out
