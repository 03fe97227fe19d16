"""save() and load(): whole outputs or nothing, readable by stock transformers.

A save goes into a temporary sibling directory, renamed into place once every file is written,
so a crash or Ctrl-C never leaves a half-written output where a user expects a model.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from anyquant.errors import AnyquantError, terminate_as_interrupt
from anyquant.formats.card import write_card
from anyquant.formats.experts import write_experts
from anyquant.formats.hf import checkpoint_key_renamer
from anyquant.formats.manifest import (
    MANIFEST,
    SELF_HASH,
    build_manifest,
    canonical_sha256,
    read_manifest,
    seal_manifest,
    verify_output,
    write_manifest,
)
from anyquant.formats.regions import restore_float32_regions
from anyquant.formats.registry import format_for
from anyquant.formats.verify import verify_saved
from anyquant.methods import handler_for
from anyquant.model.files import check_source
from anyquant.model.load import load_model, resolve_source
from anyquant.model.modelmap import quantized_linear_types
from anyquant.numerics.dtype import DTYPES
from anyquant.runtime.experts import quantized_experts_types

log = logging.getLogger(__name__)


def is_anyquant_output(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def check_output_dir(out: Path, source: Path | None, force: bool, *, estimated_bytes: int | None = None) -> Path:
    """Refuse, before any long work, an output location that save() would refuse or fail on:
    inside or around the source, the working directory, a file, a directory that is neither an
    anyquant output nor empty (never replaced, --force or not), one that is not writable, or a
    filesystem without room for `estimated_bytes`. Returns the resolved path."""
    given = out
    out = Path(out).expanduser().resolve()
    if source is not None:
        src = Path(source).expanduser().resolve()
        if out == src or src in out.parents:
            raise AnyquantError(
                f"output directory {out} is inside the source model {src}; choose a directory outside it "
                "(the source is never modified)"
            )
        if out in src.parents:
            raise AnyquantError(f"output directory {out} contains the source model {src}; choose another")
    cwd = Path.cwd().resolve()
    if out == cwd or out in cwd.parents:
        raise AnyquantError(
            f"--out {given}: is the working directory{'' if out == cwd else ' or contains it'} ({out}); the output "
            "is written as a whole new directory, so name one, e.g. --out ./quantized"
        )
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise AnyquantError(f"--out {given}: is a file, not a directory; give a directory path "
                                "(a new one, or an earlier anyquant output to replace with --force)")
        empty = not any(out.iterdir())
        if not is_anyquant_output(out) and not empty:
            raise AnyquantError(
                f"--out {given}: exists and is not an anyquant output (no {MANIFEST}) and not empty; anyquant "
                "replaces only its own outputs, even with --force: choose another directory"
            )
        if not force:
            what = "an empty directory" if empty else "an earlier anyquant output"
            raise AnyquantError(f"--out {given}: already exists ({what}); pass --force to replace it")
    _check_writable(out, estimated_bytes)
    return out


def _existing_ancestor(path: Path) -> Path:
    p = path.parent
    while not p.exists():
        p = p.parent
    return p


def _check_writable(out: Path, estimated_bytes: int | None) -> None:
    base = _existing_ancestor(out)
    if not base.is_dir():
        raise AnyquantError(f"--out {out}: {base} is a file, so no directory can be made under it; choose another path")
    try:  # a real write: access(W_OK) says yes to root on a read-only mount's directory permissions
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.probe-", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise AnyquantError(f"--out {out}: cannot write in {base} ({e.strerror}); choose a writable location "
                            "(nothing was quantized)") from None
    if estimated_bytes:
        free = shutil.disk_usage(base).free
        need = int(estimated_bytes * 1.05) + (1 << 20)
        if free < need:
            raise AnyquantError(
                f"--out {out}: the filesystem of {base} has {free / 2**20:.1f} MiB free, the output needs about "
                f"{need / 2**20:.1f} MiB; free space or choose another location (nothing was quantized)"
            )


def leftovers(out: Path) -> list[Path]:
    """Temporary siblings of `out` (`.OUT.tmp-*`, `.OUT.old-*`) that earlier runs left: killed
    during save, or between the renames of a --force replacement."""
    out = Path(out).expanduser().resolve()
    if not out.parent.is_dir():
        return []
    return sorted(p for p in out.parent.iterdir()
                  if p.name.startswith((f".{out.name}.tmp-", f".{out.name}.old-")) and p.is_dir())


def _try_lock(path: Path) -> int | None:
    """An exclusive flock on a directory, or None where another live process holds it (its
    save is still running). The kernel drops a killed process's locks."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def clean_leftovers(out: Path) -> list[str]:
    """Remove what killed runs left next to `out`; an output that was moved aside by a --force
    replacement and never replaced is moved back first. Folders of a save still running in
    another process (locked) are left alone. Returns one note per action."""
    out = Path(out).expanduser().resolve()
    notes: list[str] = []
    found = leftovers(out)
    if not found:
        return notes
    with _dir_lock(out.parent):
        for p in found:
            fd = _try_lock(p)
            if fd is None:
                continue
            try:
                if p.name.startswith(f".{out.name}.old-") and not out.exists() and is_anyquant_output(p):
                    os.rename(p, out)
                    _fsync_dir(out.parent)
                    notes.append(f"restored {out} from {p.name} (a --force replacement was killed between its renames)")
                    continue
                shutil.rmtree(p, ignore_errors=True)
                if not p.exists():
                    notes.append(f"removed {p} (left by a killed run)")
            finally:
                os.close(fd)
    for n in notes:
        log.info("%s", n)
    return notes


@contextlib.contextmanager
def _dir_lock(directory: Path):
    """Serialise the renames of concurrent saves into the same parent directory."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def _signals_deferred():
    """SIGTERM / SIGINT held back while the renames run (delivered right after), so an output
    is never left moved aside by this process's own handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    sigs = {signal.SIGTERM, signal.SIGINT}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _finish_files(root: Path) -> None:
    """Modes that follow the umask (mkdtemp makes 0700; a server running as another user must
    read the output), and every byte on disk before the directory is renamed into place."""
    mask = os.umask(0)
    os.umask(mask)
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        for f in filenames:
            p = d / f
            os.chmod(p, 0o666 & ~mask)
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.chmod(d, 0o777 & ~mask)
        _fsync_dir(d)


def state_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers: what its safetensors files will hold."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t is None or id(t) in seen or t.device.type == "meta":
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def save(result, out_dir: str | Path, *, force: bool = False, extra_metrics: dict[str, Any] | None = None,
         verify: bool = True) -> Path:
    """Write the output into a temporary sibling, fsync it, then rename it into place. With
    --force an earlier output is renamed aside first and deleted only once the new one is in
    place: a kill at any point leaves one complete output (or the old one at `.OUT.old-*`,
    which the next run on OUT restores) and temporary folders that the next run removes.

    `verify` (default): before the output is put in place, it is reloaded (anyquant.load and,
    for the stock formats, transformers) and its probe logits compared with the in-memory
    model's (formats/verify.py); a mismatch raises and nothing is left behind."""
    with staged_output(out_dir, result.source.path, force, estimated_bytes=state_bytes(result.model),
                       notes=result.notes) as (tmp, out):
        handler = handler_for(result.config.method)
        compute_dtype = DTYPES[result.plan.compute_dtype]
        qc = format_for(handler.format).quantization_config(result.model, result.plan, compute_dtype)
        _save_pretrained_with(result.model, tmp, qc)
        write_experts(tmp, result.model, result.plan)  # quantized MoE experts, left out of save_pretrained
        return finish_output(tmp, out, result, force=force, extra_metrics=extra_metrics, verify=verify)


@contextlib.contextmanager
def staged_output(out_dir: str | Path, source: Path | None, force: bool, *, estimated_bytes: int | None = None,
                  notes: list[str] | None = None):
    """Context yielding (temporary sibling directory, final path) for an output written piece by
    piece (save(), and the streamed quantization, which writes shards while it quantizes); the
    temporary directory is removed on any failure, and write errors become one AnyquantError.
    `finish_output` puts it in place."""
    out = Path(out_dir).expanduser()
    for n in clean_leftovers(out):
        if notes is not None and n not in notes:
            notes.append(n)
    out = check_output_dir(out, source, force, estimated_bytes=estimated_bytes)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp: Path | None = None
    lock_fd: int | None = None
    try:
        with terminate_as_interrupt():
            with _dir_lock(out.parent):  # created and locked at once: another run's clean-up leaves it alone
                tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
                lock_fd = _try_lock(tmp)
            yield tmp, out
    except OSError as e:
        raise AnyquantError(
            f"writing {out} failed: {e.strerror or e} ({getattr(e, 'filename', None) or out}); nothing was "
            "written there: free space or fix permissions and run again") from None
    except SafetensorError as e:  # safetensors reports its write errors (ENOSPC, EFBIG) as its own type
        raise AnyquantError(f"writing {out} failed: {' '.join(str(e).split())}; nothing was written there: "
                            "free space or fix permissions and run again") from None
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if lock_fd is not None:
            os.close(lock_fd)


def finish_output(tmp: Path, out: Path, result, *, force: bool = False, extra_metrics: dict[str, Any] | None = None,
                  verify: bool = True, verification: dict[str, Any] | None = None) -> Path:
    """The weights and config.json are in `tmp`: add the tokenizer, remote code, model card and
    the sealed manifest, reload and compare (`verify`; `verification` instead records a check
    the caller made, or why none was), and rename it into place."""
    handler = handler_for(result.config.method)
    if result.tokenizer is not None:
        result.tokenizer.save_pretrained(tmp)
    elif result.source.path is not None:
        _copy_tokenizer_files(Path(result.source.path), tmp)
    if result.source.path is not None:
        _copy_remote_code(Path(result.source.path), tmp)
    manifest = build_manifest(result, handler.format)
    if extra_metrics:
        manifest["metrics"].update(extra_metrics)
    write_card(tmp, manifest)  # README.md: method, plan, measured quality, how to load
    sealed = seal_manifest(tmp, manifest)
    write_manifest(tmp, sealed)  # last: hashes every other file
    _finish_files(tmp)
    if verify or verification is not None:  # what is put in place is what was verified
        sealed["verification"] = (verify_saved(tmp, result, load_quantized, handler.format) if verify
                                  else verification)
        sealed[SELF_HASH] = canonical_sha256(sealed)
        write_manifest(tmp, sealed)
        _finish_files(tmp)
    with _signals_deferred(), _dir_lock(out.parent):
        _swap_into_place(tmp, out, force)
    return out


def _swap_into_place(tmp: Path, out: Path, force: bool) -> None:
    if not out.exists():
        try:
            os.rename(tmp, out)  # fails, rather than merging, if another run created OUT meanwhile
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR):
                raise
            raise AnyquantError(f"--out {out}: appeared while this run was quantizing (another run?); "
                                "nothing was replaced: pass --force to replace it") from None
        _fsync_dir(out.parent)
        return
    if not force:
        raise AnyquantError(f"--out {out}: appeared while this run was quantizing (another run?); "
                            "nothing was replaced: pass --force to replace it")
    if not is_anyquant_output(out) and any(out.iterdir()):
        raise AnyquantError(f"--out {out}: is no longer an anyquant output or empty; not replaced")
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rmdir(old)
    os.rename(out, old)  # the old output stays whole, at a name the next run recognises
    os.rename(tmp, out)
    _fsync_dir(out.parent)
    shutil.rmtree(old, ignore_errors=True)


def _save_pretrained_with(model: nn.Module, directory: Path, quantization_config: dict[str, Any]) -> None:
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "save_pretrained"):
        raise AnyquantError(
            f"{type(model).__name__} is not a transformers model (no config / save_pretrained); "
            "use anyquant.quantize on it in memory, or load it from a model directory"
        )
    had = getattr(config, "quantization_config", None)
    config.quantization_config = quantization_config
    kwargs: dict[str, Any] = {}
    if _reverting_merges_quantized(model):
        # transformers saves in the checkpoint's original layout by undoing its load-time
        # conversions; one that merges or splits tensors (Molmo2's fused att_proj) would mix
        # packed int4 / 4-bit tensors with their shapes and scales. Saved as loaded instead:
        # transformers loads that layout as it is.
        kwargs["save_original_format"] = False
        log.info("%s: saved in transformers' loaded layout (its conversion would merge quantized tensors)",
                 type(model).__name__)
    experts = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, quantized_experts_types()))
    if experts:
        # quantized MoE experts are written by formats/experts.py `write_experts`, after: transformers'
        # reverse conversion would split or merge their packed tensors as if they were float experts
        kwargs["state_dict"] = {k: v for k, v in model.state_dict().items() if not k.startswith(experts)}
    try:
        model.save_pretrained(directory, safe_serialization=True, **kwargs)
    finally:
        if had is None:
            del config.quantization_config
        else:
            config.quantization_config = had


def _reverting_merges_quantized(model: nn.Module) -> bool:
    """Would save_pretrained's reverse weight conversion touch a quantized module's tensors with
    anything but a rename that loading undoes (a merge, split or transpose; a one-way rename)?"""

    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers without load-time conversions
        return False
    qtypes = quantized_linear_types()
    probe: dict[str, torch.Tensor] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, qtypes):
            for k, t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
                if t is not None:
                    probe[f"{name}.{k}"] = torch.empty(tuple(t.shape), dtype=t.dtype, device="meta")
    if not probe:
        return False
    try:
        reverted = revert_weight_conversion(model, dict(probe))
    except Exception:  # noqa: BLE001 — a conversion that cannot even run on these tensors merges them
        return True
    if len(reverted) != len(probe):
        return True
    if sorted(tuple(t.shape) for t in reverted.values()) != sorted(tuple(t.shape) for t in probe.values()):
        return True
    # A rename written for a float checkpoint's own names (Inkling2: `sconv.weight_proj` ->
    # `sconv.weight_proj.weight`) need not map the quantized tensors' saved names back.
    rename = checkpoint_key_renamer(model)
    return {rename(k) for k in reverted} != set(probe)


def _copy_tokenizer_files(src: Path, dst: Path) -> None:
    for f in src.iterdir():
        if f.is_file() and (f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template", "preprocessor", "processor"))):
            shutil.copy2(f, dst / f.name)


def _copy_remote_code(src: Path, dst: Path) -> None:
    for f in src.glob("*.py"):
        if not (dst / f.name).exists():
            shutil.copy2(f, dst / f.name)


def load_quantized(directory: str | Path, *, trust_remote_code: bool = False, verify: bool = True, device=None,
                   device_map=None, fuse: bool = False) -> nn.Module:
    """Load an anyquant output. bitsandbytes outputs go through transformers as they are;
    int4 outputs are rebuilt with anyquant's Int4Linear (any device, no compressed-tensors needed).
    `verify` (default) first checks every file against the sha256 anyquant.json recorded.
    device / device_map / fuse: see Format.load (default: the CPU, unfused)."""

    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise AnyquantError(f"{directory}: no such model directory")
    manifest = read_manifest(directory)
    if manifest is None:
        raise AnyquantError(f"{directory}: no {MANIFEST}: not an anyquant output (load it with transformers)")
    if verify:
        verify_output(directory, manifest)
    # float32 regions are restored by module name, so their model keeps the saved (unfused) layout
    regions = bool(manifest.get("float32_regions"))
    model = format_for(manifest.get("format", "compressed-tensors")).load(
        directory, manifest, trust_remote_code, device=device, device_map=device_map, fuse=fuse and not regions)
    return restore_float32_regions(model, directory, manifest)


def load_source(source: str | Path, *, verify: bool = True, **kwargs: Any):
    """model.load.load_model for any source, an anyquant output included (built by
    load_quantized, verified unless verify=False; with requantize=True it is then dequantized).
    Returns (model, tokenizer, SourceInfo)."""
    path = resolve_source(source)
    loader = None
    if (path / MANIFEST).is_file():
        trc = kwargs.get("trust_remote_code", False)

        def loader(p: Path) -> nn.Module:
            return load_quantized(p, trust_remote_code=trc, verify=verify)
    else:  # the command line checked already; the Python API gets the same one-line refusals
        check_source(path, kwargs.get("trust_remote_code", False))
    return load_model(path, loader=loader, **kwargs)
