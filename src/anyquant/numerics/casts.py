"""Casts at module boundaries, and the check that every module's inputs and weights agree in dtype.

`keep_in_float32` makes a float32 region inside a 16-bit model (inputs cast in, outputs cast
back); `cast_inputs_to_own_dtype` / `fix_boundaries` put a cast where a model's own code hands a
module another dtype (remote code casting an image to bfloat16 before a float16 conv);
`check_consistency` proves, after quantization, that no module sees mixed dtypes (F1).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from anyquant.errors import AnyquantError
from anyquant.model.modelmap import quantized_linear_types
from anyquant.numerics.dtype import cast_floats, dtype_name, iter_tensors

log = logging.getLogger(__name__)

CAST_MARK = "_anyquant_float32_region"


def keep_in_float32(module: nn.Module, outer: torch.dtype) -> None:
    """Parameters in float32; inputs cast to float32 on the way in, outputs to `outer` on the way out."""
    if getattr(module, CAST_MARK, None):
        return
    module.float()

    def pre(m, args, kwargs):
        return cast_floats(args, torch.float32), cast_floats(kwargs, torch.float32)

    def post(m, args, kwargs, out):
        return cast_floats(out, outer)

    h1 = module.register_forward_pre_hook(pre, with_kwargs=True, prepend=True)
    h2 = module.register_forward_hook(post, with_kwargs=True)
    setattr(module, CAST_MARK, (outer, h1, h2))


class DtypeBoundaryError(AnyquantError):
    """A forward failed inside `module` because dtypes disagree (F1)."""

    def __init__(self, message: str, module: str):
        super().__init__(message)
        self.module = module


BOUNDARY_MARK = "_anyquant_boundary_cast"
_DTYPE_ERROR = re.compile(r"dtype|Half|BFloat16|Float\b|Double|type \(|same type", re.I)


def cast_inputs_to_own_dtype(module: nn.Module) -> None:
    """A cast at the module's boundary: floating inputs to its parameters' dtype, read at call
    time (so the cast stays right when the model is later cast to another dtype)."""
    if getattr(module, BOUNDARY_MARK, None):
        return

    def pre(m, args, kwargs):
        dt = _own_float_dtype(m)
        return (cast_floats(args, dt), cast_floats(kwargs, dt)) if dt is not None else None

    h = module.register_forward_pre_hook(pre, with_kwargs=True, prepend=True)
    setattr(module, BOUNDARY_MARK, h)


def _own_float_dtype(module: nn.Module) -> torch.dtype | None:
    dts = {p.dtype for p in module.parameters(recurse=False) if p.is_floating_point()}
    return dts.pop() if len(dts) == 1 else None


def fix_boundaries(model: nn.Module, inputs: dict[str, Any], max_fixes: int = 64) -> dict[str, str]:
    """Run the consistency check and put a cast at every module boundary where inputs and
    parameters disagree (e.g. remote code casting an image to bfloat16 before a float16 conv),
    until a forward passes with no mismatch. Returns {module: what was cast}."""
    fixed: dict[str, str] = {}
    for _ in range(max_fixes):
        try:
            mismatches = check_consistency(model, inputs)
        except DtypeBoundaryError as e:
            mod = model.get_submodule(e.module) if e.module not in ("", "<model>") else None
            dt = _own_float_dtype(mod) if mod is not None else None
            if dt is None or getattr(mod, BOUNDARY_MARK, None):
                raise
            cast_inputs_to_own_dtype(mod)
            fixed[e.module] = (f"inputs cast to its weights' dtype ({dtype_name(dt)} now): the forward failed there: "
                              f"{str(e).split(': ', 2)[-1][:160]}")
            continue
        todo = []
        for m in mismatches:
            mod = model.get_submodule(m["module"]) if m["module"] != "<model>" else None
            dt = _own_float_dtype(mod) if mod is not None else None
            if dt is not None and not getattr(mod, BOUNDARY_MARK, None):
                todo.append((m, mod, dt))
        if not todo:
            return fixed
        for m, mod, dt in todo:
            cast_inputs_to_own_dtype(mod)
            fixed[m["module"]] = f"inputs ({', '.join(m['inputs'])}) cast to its weights' dtype ({dtype_name(dt)} now)"
    return fixed


def _casts_at_boundary(module: nn.Module) -> bool:
    """Modules that cast their input to their own compute dtype (quantized linears) or sit
    inside a float32 region's cast hooks."""
    if getattr(module, CAST_MARK, None) or getattr(module, BOUNDARY_MARK, None):
        return True
    return isinstance(module, quantized_linear_types())


@contextlib.contextmanager
def recording_dtype_mismatches(model: nn.Module) -> Iterator[tuple[list[dict], list[str]]]:
    """Hooks on every module for the forwards run inside: a module's floating inputs, weights and
    biases must agree in dtype unless it casts at its boundary. Yields (mismatches, the running
    module stack); `unique_mismatches` gives one entry per module. Other hooks may run beside
    these (prepare runs this check and the weight-read probe in one forward)."""
    mismatches: list[dict] = []
    stack: list[str] = []
    handles = []
    for name, mod in model.named_modules():
        params = {f"{pn}": p.dtype for pn, p in mod.named_parameters(recurse=False) if p.is_floating_point()}
        caster = _casts_at_boundary(mod)

        def pre(m, args, kwargs, name=name, params=params, caster=caster):
            stack.append(name)
            ins = {t.dtype for t in iter_tensors((args, kwargs)) if t.is_floating_point()}
            if caster or not (ins or params):
                return
            if len(ins | set(params.values())) > 1:
                mismatches.append({
                    "module": name or "<model>", "type": type(m).__name__,
                    "inputs": sorted(dtype_name(d) for d in ins),
                    "params": {k: dtype_name(v) for k, v in params.items()},
                })

        def post(m, args, kwargs, out):
            if stack:
                stack.pop()

        handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(mod.register_forward_hook(post, with_kwargs=True))
    try:
        yield mismatches, stack
    finally:
        for h in handles:
            h.remove()


def unique_mismatches(mismatches: list[dict], warn: bool = True) -> list[dict]:
    """One entry per module, each logged as a warning where `warn`."""
    seen, unique = set(), []
    for m in mismatches:
        if m["module"] not in seen:
            seen.add(m["module"])
            unique.append(m)
    for m in unique if warn else []:
        log.warning("dtype mismatch in %s (%s): inputs %s, parameters %s", m["module"], m["type"], m["inputs"], m["params"])
    return unique


@torch.no_grad()
def check_consistency(model: nn.Module, inputs: dict[str, Any]) -> list[dict]:
    """Forward on probe inputs; every module's floating inputs, weights and biases must agree in
    dtype unless the module casts at its boundary. Returns the mismatches (module, dtypes).

    A forward that fails with a dtype error is re-raised as AnyquantError naming the module."""
    with recording_dtype_mismatches(model) as (mismatches, stack):
        try:
            model(**inputs)
        except RuntimeError as e:
            if not _DTYPE_ERROR.search(str(e)):
                raise
            where = stack[-1] if stack else ""
            kind = type(model.get_submodule(where)).__name__
            raise DtypeBoundaryError(f"dtype check: the forward fails in {where or '<model>'} ({kind}): {e}",
                                     where) from e
    return unique_mismatches(mismatches)
