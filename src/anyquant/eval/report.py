"""Evaluation report: one self-contained HTML file with plots, a Markdown twin, a console table.

The HTML embeds its PNGs as base64 so it can be mailed, attached to an issue or opened from
a CI artifact without the files around it going missing.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import math
import numbers
import os
import pathlib
import tempfile
from typing import Any, Iterable, Mapping, Optional, Sequence

from anyquant.errors import AnyquantError

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
        return f"{value / 2**20:,.1f} MiB"
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
