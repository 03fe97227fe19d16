"""Block checkpoints of a calibration run: each finished block's tensors and report entry,
keyed by source fingerprint + config + plan + calibration data, so that a re-run after a kill
loads the finished blocks and gives the same result. The JSON entry is the commit marker,
written last."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from anyquant.calib.blocks import hash_calib
from anyquant.model.tree import set_submodule
from anyquant.runtime.int4_linear import Int4Linear

# --------------------------------------------------------------------------- checkpoints


def checkpoint_key(fingerprint: str, config: dict, compute_dtype: str, plan_items: list, calib_ids) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"source": fingerprint, "config": config, "dtype": compute_dtype, "plan": plan_items},
                        sort_keys=True).encode())
    hash_calib(h, calib_ids)
    return h.hexdigest()[:20]


def model_fingerprint(model: nn.Module) -> str:
    """For in-memory models: a hash of every parameter's shape and leading values."""
    h = hashlib.sha256()
    for n, p in model.named_parameters():
        h.update(n.encode() + str(tuple(p.shape)).encode())
        h.update(p.detach().reshape(-1)[:4096].float().cpu().numpy().tobytes())
    return "params:" + h.hexdigest()[:20]


def save_block(directory: Path, i: int, block: nn.Module, entry: dict) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in block.state_dict().items()}
    tmp = directory / f".block_{i:04d}.safetensors.tmp"
    save_file(state, str(tmp))
    os.replace(tmp, directory / f"block_{i:04d}.safetensors")
    tmpj = directory / f".block_{i:04d}.json.tmp"
    tmpj.write_text(json.dumps(entry, indent=1))
    os.replace(tmpj, directory / f"block_{i:04d}.json")  # the commit marker: written last


def load_block(directory: Path, i: int, block: nn.Module, linears: dict[str, dict], config,
                compute_dtype: torch.dtype) -> dict | None:
    from safetensors.torch import load_file

    meta = directory / f"block_{i:04d}.json"
    if not meta.exists():
        return None
    entry = json.loads(meta.read_text())
    for rel, opts in linears.items():
        lin = block.get_submodule(rel)
        g = int(opts.get("group_size", config.group_size))
        shell = Int4Linear(lin.in_features, lin.out_features, g, lin.bias is not None, config.symmetric,
                           compute_dtype, lin.weight.device)
        set_submodule(block, rel, shell)
    device = next(block.buffers()).device
    state = {k: v.to(device) for k, v in load_file(str(directory / f"block_{i:04d}.safetensors")).items()}
    block.load_state_dict(state, strict=True)
    return entry


