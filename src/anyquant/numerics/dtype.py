"""Dtype names and the probe-free compute dtype choice (`anyquant plan`).

The full policy (probe, float16 overflow, float32 regions, consistency) is numerics/policy.py."""

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
    from anyquant.numerics.capabilities import detect_capabilities

    caps = detect_capabilities(device)
    if caps.prefer_float32:
        return torch.float32
    if caps.bf16:
        return torch.bfloat16
    return torch.float16 if caps.fp16 else torch.float32
