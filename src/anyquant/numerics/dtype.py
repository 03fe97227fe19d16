"""Compute dtype choice per device. The numerics issue extends this into a full policy."""

from __future__ import annotations

import torch

from anyquant.errors import AnyquantError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def choose_compute_dtype(requested: str | None, device: torch.device | str = "cpu") -> torch.dtype:
    """`auto`: float32 on CPU (bfloat16 matmuls are slow without AMX, and float32 is the
    quality reference there); bfloat16 on GPUs that support it; else float16."""
    requested = requested or "auto"
    if requested != "auto":
        if requested not in DTYPES:
            raise AnyquantError(f"--dtype {requested}: expected one of auto, {', '.join(DTYPES)}")
        return DTYPES[requested]
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32
