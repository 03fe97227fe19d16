"""anyquant.json: the artifact describes itself (schema version, source, method, plan, metrics)
and vouches for itself: the source's absolute path and content fingerprint, a sha256 of every
other file of the output, and a sha256 of its own canonical content, all checked before an
output is loaded or evaluated (verify_output)."""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from anyquant import __version__
from anyquant.errors import AnyquantError
from anyquant.model.integrity import files_sha256

log = logging.getLogger(__name__)

MANIFEST = "anyquant.json"
FORMAT_VERSION = 1
SELF_HASH = "manifest_sha256"  # sha256 of the manifest's canonical JSON without this field
# The fingerprint's scope: "content" = sha256 over every byte of the weight files (model.integrity).
# Outputs made before it recorded a head-and-tail fingerprint, which cannot be compared.
FINGERPRINT_SCOPE = "content"
NO_VERIFY = "re-run quantize, or pass --no-verify (verify=False in Python) to use it anyway"


def build_manifest(result, fmt: str) -> dict[str, Any]:

    return {
        "format_version": FORMAT_VERSION,
        "anyquant_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "format": fmt,
        "source": {
            "path": str(Path(result.source.path).expanduser().resolve()) if result.source.path else None,
            "fingerprint": result.source.fingerprint,
            "fingerprint_scope": FINGERPRINT_SCOPE if result.source.path else None,
        },
        "method": result.config.method,
        "config": result.config.to_dict(),
        "compute_dtype": result.plan.compute_dtype,
        "plan": result.plan.to_dict(),
        # modules kept in float32 (casts at their boundaries) inside a 16-bit model: anyquant.load
        # restores them (formats/regions.py)
        "float32_regions": ({} if result.plan.compute_dtype == "float32" else
                            dict((result.report.get("dtype_policy") or {}).get("float32_modules") or {})),
        "metrics": {k: v for k, v in result.report.items() if k != "per_layer_weight_error"},
        "notes": result.notes,
    }


def canonical_sha256(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's content (its own hash field left out) as canonical JSON."""
    body = {k: v for k, v in manifest.items() if k != SELF_HASH}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str, ensure_ascii=True)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def output_files(directory: Path) -> list[Path]:
    """Every file of an output except anyquant.json itself, sorted."""
    return sorted(p for p in Path(directory).rglob("*") if p.is_file() and p.relative_to(directory).as_posix() != MANIFEST)


def seal_manifest(directory: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest with the sha256 of each file in `directory` and its own hash: call last,
    once every other file is written. Round-tripped through JSON first, so the hash is over
    exactly what read_manifest will return."""
    sealed = json.loads(json.dumps(manifest, default=str))
    sealed["files"] = {p.relative_to(directory).as_posix(): "sha256:" + digest
                       for p, digest in files_sha256(output_files(directory)).items()}
    sealed[SELF_HASH] = canonical_sha256(sealed)
    return sealed


def verify_output(directory: Path, manifest: dict[str, Any]) -> None:
    """The output is what was saved: anyquant.json's own content, and each file it lists by
    sha256; no file missing, no weight or code file added. Raises AnyquantError naming the
    first file that changed. An output saved before outputs carried hashes loads with a warning."""
    directory = Path(directory)
    files = manifest.get("files")
    if SELF_HASH not in manifest and files is None:
        log.warning("%s: %s holds no file hashes (saved by an older anyquant); its files are not "
                    "verified: re-run quantize to get an output that is", directory, MANIFEST)
        return
    if manifest.get(SELF_HASH) != canonical_sha256(manifest):
        raise AnyquantError(f"{directory / MANIFEST} changed since it was saved (its content no longer "
                            f"matches its {SELF_HASH} {str(manifest.get(SELF_HASH))[:19]}); {NO_VERIFY}")
    if not isinstance(files, dict):
        raise AnyquantError(f"{directory / MANIFEST} has no file list; {NO_VERIFY}")
    for name in sorted(files):
        if not (directory / name).is_file():
            raise AnyquantError(f"{directory}: {name} is missing (it was saved with the output); {NO_VERIFY}")
    digests = files_sha256([directory / name for name in sorted(files)])
    for name, want in sorted(files.items()):
        got = "sha256:" + digests[directory / name]
        if got != want:
            raise AnyquantError(f"{directory}: {name} changed since it was saved (sha256 {got[7:19]}..., "
                                f"saved as {str(want)[7:19]}...); {NO_VERIFY}")
    for f in output_files(directory):
        rel = f.relative_to(directory).as_posix()
        if rel not in files and f.suffix in (".safetensors", ".bin", ".pt", ".py", ".json", ".gguf"):
            raise AnyquantError(f"{directory}: {rel} was added after the output was saved (loading "
                                f"it would use it); remove it, {NO_VERIFY}")


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))


def read_manifest(directory: Path) -> dict[str, Any] | None:
    p = Path(directory) / MANIFEST
    if not p.exists():
        return None
    try:
        manifest = json.loads(p.read_text())
    except (ValueError, OSError) as e:
        raise AnyquantError(f"{p}: not a readable anyquant manifest ({type(e).__name__}: {e}); "
                            "re-run quantize to write the output again") from e
    if not isinstance(manifest, dict):
        raise AnyquantError(f"{p}: holds a {type(manifest).__name__}, not an anyquant manifest; "
                            "re-run quantize to write the output again")
    return manifest
