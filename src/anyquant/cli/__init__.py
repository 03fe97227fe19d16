"""Command line: inspect | plan | quantize | eval | generate | report | export | doctor | demo, one module per command over
the public API (anyquant.api). Bad input: one line on stderr, exit 2.

Commands import the API inside their function: argument checks answer before torch and
transformers are imported."""

from __future__ import annotations

from anyquant.cli import (  # noqa: F401  (each registers its command)
    demo,
    doctor,
    eval,
    export,
    generate,
    inspect,
    plan,
    quantize,
    report,
)
from anyquant.cli.common import app

__all__ = ["app", "main"]


def main() -> None:  # pragma: no cover
    app()
