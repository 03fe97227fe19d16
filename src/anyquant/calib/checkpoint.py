"""Block checkpoints of a calibration run: each finished block's tensors and report entry,
keyed by source fingerprint + config + plan + calibration data, so that a re-run after a kill
loads the finished blocks and gives the same result. The source fingerprint hashes every byte
of the weight files (model.integrity), so an edited source gives another key. The JSON entry is
the commit marker, written last, with the sha256 of the block's tensors file: a truncated or
changed block is recomputed (DamagedCheckpoint, noted), a folder that cannot be read or written
is named in the error."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from anyquant.calib.blocks import hash_calib
from anyquant.errors import AnyquantError
from anyquant.model.integrity import file_sha256
from anyquant.model.tree import set_submodule
from anyquant.runtime.int4_linear import Int4Linear

# --------------------------------------------------------------------------- checkpoints

CHECKSUM_KEY = "checkpoint_sha256"  # in each block's JSON entry: its tensors file's sha256


def checkpoint_key(fingerprint: str, config: dict, compute_dtype: str, plan_items: list, calib_ids) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"source": fingerprint, "config": config, "dtype": compute_dtype, "plan": plan_items},
                        sort_keys=True).encode())
    hash_calib(h, calib_ids)
    return h.hexdigest()[:20]


def model_fingerprint(model: nn.Module) -> str:
    """For in-memory models: a hash of every parameter's name, shape, dtype and all its values
    (a change anywhere in a weight is another model, so no stale block is resumed)."""
    h = hashlib.sha256()
    for n, p in model.named_parameters():
        h.update(f"{n}:{tuple(p.shape)}:{p.dtype}".encode())
        flat = p.detach().reshape(-1)
        for start in range(0, flat.numel(), 1 << 22):  # one chunk's float32 copy at a time
            h.update(flat[start:start + (1 << 22)].float().cpu().numpy().tobytes())
    return "params:" + h.hexdigest()[:20]


class DamagedCheckpoint(Exception):
    """A block checkpoint that cannot be used (truncated, corrupt, edited): recomputed, with a note."""


def unusable_folder(directory: Path, e: Exception) -> AnyquantError:
    return AnyquantError(f"calibration checkpoint folder {directory} is unusable ({type(e).__name__}: {e}); "
                         "delete that folder and run again")


def save_block(directory: Path, i: int, block: nn.Module, entry: dict) -> None:
    """The block's tensors, then its JSON entry (the commit marker, written last) with the
    tensors file's sha256, which load_block checks."""
    from safetensors.torch import save_file

    try:
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in block.state_dict().items()}
        tmp = directory / f".block_{i:04d}.safetensors.tmp"
        save_file(state, str(tmp))
        digest = file_sha256(tmp)
        os.replace(tmp, directory / f"block_{i:04d}.safetensors")
        tmpj = directory / f".block_{i:04d}.json.tmp"
        tmpj.write_text(json.dumps({**entry, CHECKSUM_KEY: digest}, indent=1))
        os.replace(tmpj, directory / f"block_{i:04d}.json")  # the commit marker: written last
    except OSError as e:
        raise unusable_folder(directory, e) from e


def load_block(directory: Path, i: int, block: nn.Module, linears: dict[str, dict], config,
               compute_dtype: torch.dtype) -> dict | None:
    """The finished block i from its checkpoint (its linears become Int4Linear), or None when
    there is none. Raises DamagedCheckpoint, with the block left as it was, when the checkpoint
    is truncated, corrupt, or its tensors file does not have the sha256 its entry recorded."""
    from safetensors.torch import load_file

    meta = directory / f"block_{i:04d}.json"
    tensors = directory / f"block_{i:04d}.safetensors"
    try:
        if not meta.exists():
            return None
        try:
            entry = json.loads(meta.read_text())
        except ValueError as e:
            raise DamagedCheckpoint(f"{meta.name} is not valid JSON") from e
        if not isinstance(entry, dict) or not entry.get(CHECKSUM_KEY):
            raise DamagedCheckpoint(f"{meta.name} has no checksum")
        if not tensors.exists():
            raise DamagedCheckpoint(f"{tensors.name} is missing")
        if file_sha256(tensors) != entry.pop(CHECKSUM_KEY):
            raise DamagedCheckpoint(f"{tensors.name} does not match its recorded sha256 (truncated or changed)")
        try:
            loaded = load_file(str(tensors))
        except Exception as e:  # noqa: BLE001 — safetensors' errors for a damaged file have no common type
            raise DamagedCheckpoint(f"{tensors.name} cannot be read ({e})") from e
    except OSError as e:  # unreadable: permissions, a directory where a file should be, I/O errors
        raise unusable_folder(directory, e) from e
    originals = {rel: block.get_submodule(rel) for rel in linears}
    for rel, opts in linears.items():
        lin = originals[rel]
        g = int(opts.get("group_size", config.group_size))
        shell = Int4Linear(lin.in_features, lin.out_features, g, lin.bias is not None, config.symmetric,
                           compute_dtype, lin.weight.device)
        set_submodule(block, rel, shell)
    device = next(block.buffers()).device
    try:
        block.load_state_dict({k: v.to(device) for k, v in loaded.items()}, strict=True)
    except RuntimeError as e:
        for rel, lin in originals.items():  # put the float linears back: the block is recomputed
            set_submodule(block, rel, lin)
        raise DamagedCheckpoint(f"{tensors.name} does not fit the block ({_first_line(str(e))})") from e
    return entry


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return (lines[0] if lines else "")[:200]
