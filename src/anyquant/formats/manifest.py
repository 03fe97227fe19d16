"""anyquant.json: the artifact describes itself (schema version, source, method, plan, metrics)."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

from anyquant import __version__

MANIFEST = "anyquant.json"
FORMAT_VERSION = 1


def build_manifest(result, fmt: str) -> dict[str, Any]:

    return {
        "format_version": FORMAT_VERSION,
        "anyquant_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "format": fmt,
        "source": {
            "path": str(result.source.path) if result.source.path else None,
            "fingerprint": result.source.fingerprint,
        },
        "method": result.config.method,
        "config": result.config.to_dict(),
        "compute_dtype": result.plan.compute_dtype,
        "plan": result.plan.to_dict(),
        "metrics": {k: v for k, v in result.report.items() if k != "per_layer_weight_error"},
        "notes": result.notes,
    }


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))


def read_manifest(directory: Path) -> dict[str, Any] | None:
    p = Path(directory) / MANIFEST
    if not p.exists():
        return None
    return json.loads(p.read_text())
