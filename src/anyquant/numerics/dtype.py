"""Dtype names, and walking the floating tensors of nested arguments and outputs.

The compute dtype itself is decided in one place only: numerics/policy.py `choose_policy`."""

from __future__ import annotations

from typing import Any, Iterator

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def iter_tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):  # includes transformers ModelOutput
        for v in obj.values():
            yield from iter_tensors(v)
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            yield from iter_tensors(v)


def cast_floats(obj: Any, dtype: torch.dtype) -> Any:
    """Floating tensors in `obj` (nested tuples, lists, namedtuples, dicts) cast to `dtype`.
    Dicts are updated in place: a ModelOutput must keep its type."""
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() and obj.dtype != dtype else obj
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(cast_floats(v, dtype) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(cast_floats(v, dtype) for v in obj)
    if isinstance(obj, dict):
        for k in list(obj.keys()):
            obj[k] = cast_floats(obj[k], dtype)
        return obj
    return obj
