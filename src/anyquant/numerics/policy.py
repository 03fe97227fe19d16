"""The dtype policy: one compute dtype for the whole model, chosen from the device and a probe.

1. A float32 probe forward records, per module, the absmax of its floating inputs and outputs
   (hooks on every module) and whether they are finite.
2. `auto`: float32 where the device prefers it (CPU); bfloat16 where the device supports it
   (same exponent range as float32: no overflow); else float16 if no activation exceeds the
   float16 range with margin; else float16 with the overflowing modules kept in float32, casts
   at their boundaries (inputs to float32, outputs back); else float32.
3. An explicit dtype is honoured, or refused (AnyquantError) with the module names and values
   when it is unsafe and the policy cannot keep the offending modules in float32.
4. After quantization, `check_consistency` runs a forward with hooks proving that every
   module's floating inputs, weights and biases agree in dtype, or a cast sits at the boundary.

Regions are found from the probe: a value over the float16 range is *produced inside* the
nearest called ancestor of the module that receives it (or by the module whose output it is);
that region grows up the tree until its inputs and outputs fit float16 again, so the casts at
its boundary are safe.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from anyquant.errors import AnyquantError
from anyquant.numerics.capabilities import DeviceCapabilities, detect_capabilities
from anyquant.numerics.dtype import DTYPES, dtype_name

log = logging.getLogger(__name__)

FP16_MAX = 65504.0
MAX_FP32_SHARE = 0.5  # float32 regions holding more of the weights than this: use float32 throughout
FP16_MARGIN = 0.5  # activations above FP16_MAX * margin count as overflowing (errors add up)


# --------------------------------------------------------------------------- probe


def iter_tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):  # includes transformers ModelOutput
        for v in obj.values():
            yield from iter_tensors(v)
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            yield from iter_tensors(v)


def _absmax(obj: Any) -> tuple[float | None, bool]:
    m, finite = None, True
    for t in iter_tensors(obj):
        if t.is_floating_point() and t.numel() and t.device.type != "meta":
            a = t.detach().abs()
            fin = bool(torch.isfinite(a).all())
            finite &= fin
            v = float(a.nan_to_num(posinf=float("inf")).max()) if not fin else float(a.max())
            m = v if m is None else max(m, v)
    return m, finite


@dataclass
class ModuleRange:
    name: str
    type: str
    in_absmax: float | None = None
    out_absmax: float | None = None
    finite: bool = True
    calls: int = 0


def _bump(cur: float | None, new: float | None) -> float | None:
    if new is None:
        return cur
    return new if cur is None else max(cur, new)


@torch.no_grad()
def probe_ranges(model: nn.Module, inputs: dict[str, Any]) -> dict[str, ModuleRange]:
    """One forward with hooks on every module: input/output absmax and finiteness, per module.

    Runs the model as it is (the policy casts it to float32 first)."""
    ranges: dict[str, ModuleRange] = {}
    handles = []
    for name, mod in model.named_modules():
        r = ranges[name] = ModuleRange(name, type(mod).__name__)

        def pre(m, args, kwargs, r=r):
            a, fin = _absmax((args, kwargs))
            r.in_absmax = _bump(r.in_absmax, a)
            r.finite &= fin

        def post(m, args, kwargs, out, r=r):
            a, fin = _absmax(out)
            r.out_absmax = _bump(r.out_absmax, a)
            r.finite &= fin
            r.calls += 1

        handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(mod.register_forward_hook(post, with_kwargs=True))
    try:
        model(**inputs)
    finally:
        for h in handles:
            h.remove()
    return {n: r for n, r in ranges.items() if r.calls}


def _ancestors(name: str) -> Iterator[str]:
    while name:
        name = name.rpartition(".")[0]
        yield name


def overflow_regions(ranges: dict[str, ModuleRange], limit: float) -> tuple[dict[str, str], list[dict]]:
    """Smallest modules whose forward produces values over `limit` while their own inputs and
    outputs stay within it: {module: reason}, plus the offending values. "" = the whole model."""
    called = set(ranges)

    def parent(name: str) -> str:
        return next((a for a in _ancestors(name) if a in called), "")

    over = lambda v: v is not None and v > limit  # noqa: E731
    values: list[dict] = []
    producers: set[str] = set()
    for name, r in ranges.items():
        if over(r.out_absmax):
            values.append({"module": name, "where": "output", "absmax": r.out_absmax})
            producers.add(name)
        if name and over(r.in_absmax):
            values.append({"module": name, "where": "input", "absmax": r.in_absmax})
            producers.add(parent(name))
    regions: dict[str, str] = {}
    for p in producers:
        region = p
        while region and (over(ranges[region].out_absmax) or over(ranges[region].in_absmax)):
            region = parent(region)
        inside = [v for v in values if v["module"] == region or v["module"].startswith(region + ".") or not region]
        worst = max(inside, key=lambda v: v["absmax"]) if inside else None
        regions[region] = (
            f"activations reach {worst['absmax']:.4g} ({worst['where']} of {worst['module'] or 'the model'}), "
            f"over the float16 range ({FP16_MAX:.0f})" if worst else "float16 overflow"
        )
    # keep the outermost regions only
    minimal = {r: why for r, why in regions.items()
               if not any(a in regions for a in _ancestors(r)) or r == ""}
    if "" in minimal:
        minimal = {"": minimal[""]}
    values.sort(key=lambda v: -v["absmax"])
    return minimal, values


# --------------------------------------------------------------------------- policy


@dataclass
class DtypePolicy:
    requested: str
    compute_dtype: torch.dtype
    reason: str
    capabilities: DeviceCapabilities
    fp32_modules: dict[str, str] = field(default_factory=dict)  # module -> why it stays float32
    overflow: list[dict] = field(default_factory=list)  # probe values over the float16 range
    probe_absmax: float | None = None
    consistency: list[dict] = field(default_factory=list)
    boundary_casts: dict[str, str] = field(default_factory=dict)  # module -> cast added at its inputs
    notes: list[str] = field(default_factory=list)

    def dtype_for(self, module_name: str) -> torch.dtype:
        """float32 inside a kept region, else the compute dtype."""
        if any(module_name == r or module_name.startswith(r + ".") for r in self.fp32_modules):
            return torch.float32
        return self.compute_dtype

    def apply(self, model: nn.Module, inputs: dict[str, Any] | None = None) -> nn.Module:
        """Cast the model to the compute dtype; kept regions to float32 with casts at their
        boundary; with probe inputs, also a cast wherever a module's inputs and weights disagree."""
        model.to(self.compute_dtype)
        if self.compute_dtype != torch.float32:
            for name in self.fp32_modules:
                keep_in_float32(model.get_submodule(name), self.compute_dtype)
        if inputs is not None:
            self.boundary_casts.update(fix_boundaries(model, inputs))
            for k, v in self.boundary_casts.items():
                log.warning("dtype policy: %s: %s", k, v)
        return model

    def to_dict(self) -> dict[str, Any]:
        return {
            "requested": self.requested,
            "compute_dtype": dtype_name(self.compute_dtype),
            "reason": self.reason,
            "device": self.capabilities.to_dict(),
            "float32_modules": dict(self.fp32_modules),
            "overflow": self.overflow[:20],
            "probe_activation_absmax": self.probe_absmax,
            "boundary_casts": dict(self.boundary_casts),
            "consistency_mismatches": self.consistency,
            "notes": self.notes,
        }


def _cast(obj: Any, dtype: torch.dtype) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() and obj.dtype != dtype else obj
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(_cast(v, dtype) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_cast(v, dtype) for v in obj)
    if isinstance(obj, dict):
        for k in list(obj.keys()):
            obj[k] = _cast(obj[k], dtype)
        return obj
    return obj


CAST_MARK = "_anyquant_float32_region"


def keep_in_float32(module: nn.Module, outer: torch.dtype) -> None:
    """Parameters in float32; inputs cast to float32 on the way in, outputs to `outer` on the way out."""
    if getattr(module, CAST_MARK, None):
        return
    module.float()

    def pre(m, args, kwargs):
        return _cast(args, torch.float32), _cast(kwargs, torch.float32)

    def post(m, args, kwargs, out):
        return _cast(out, outer)

    h1 = module.register_forward_pre_hook(pre, with_kwargs=True, prepend=True)
    h2 = module.register_forward_hook(post, with_kwargs=True)
    setattr(module, CAST_MARK, (outer, h1, h2))


def _keep_in_fp32_declared(model: nn.Module) -> dict[str, str]:
    patterns = getattr(model, "_keep_in_fp32_modules", None) or []
    found: dict[str, str] = {}
    for name, _ in model.named_modules():
        if name and any(f".{p}." in f".{name}." for p in patterns) and not any(a in found for a in _ancestors(name)):
            found[name] = f"declared by the model (_keep_in_fp32_modules: {', '.join(patterns)})"
    return found


def choose_policy(
    model: nn.Module,
    requested: str | None,
    capabilities: DeviceCapabilities | None = None,
    inputs: dict[str, Any] | None = None,
    *,
    margin: float = FP16_MARGIN,
) -> DtypePolicy:
    """Decide the compute dtype (and float32 regions). Casts `model` to float32 for the probe
    when one is needed; `policy.apply(model)` casts it to the chosen dtype."""
    requested = requested or "auto"
    if requested != "auto" and requested not in DTYPES:
        raise AnyquantError(f"--dtype {requested}: expected one of auto, {', '.join(DTYPES)}")
    caps = capabilities or detect_capabilities(_device_of(model))
    where = f"{caps.name} ({caps.device_type}{', simulated' if caps.simulated else ''})"
    declared = _keep_in_fp32_declared(model)

    boundary: dict[str, str] = {}
    if inputs is not None:  # remote code that casts to a dtype of its own: a cast where it meets a module
        try:
            boundary = fix_boundaries(model, inputs)
        except Exception as e:  # noqa: BLE001 — user/remote code; the probe reports it, the policy goes on
            log.warning("dtype policy: boundary check skipped, the probe forward failed (%s: %s)",
                        type(e).__name__, str(e)[:200])

    def policy(dtype, reason, **kw):
        p = DtypePolicy(requested, dtype, reason, caps, boundary_casts=dict(boundary), **kw)
        if dtype != torch.float32:
            for k, v in declared.items():
                p.fp32_modules.setdefault(k, v)
        return p

    if requested == "float32":
        return policy(torch.float32, "requested")
    if requested == "bfloat16":
        if not caps.bf16:
            raise AnyquantError(
                f"--dtype bfloat16: {where} has no native bfloat16 (needs CUDA compute capability 8.0+); "
                "use --dtype auto (float16 where safe, else float32) or --dtype float32"
            )
        return policy(torch.bfloat16, "requested; bfloat16 has float32's range (no overflow)")
    if requested == "auto":
        if caps.prefer_float32:
            return policy(torch.float32, f"{where}: no native low-precision compute; float32 is fast and exact there")
        if caps.bf16:
            return policy(torch.bfloat16, f"{where} supports bfloat16 (float32's range: no float16 overflow)")
        if not caps.fp16:
            return policy(torch.float32, f"{where} supports neither bfloat16 nor float16")
    elif not caps.fp16:  # requested float16
        raise AnyquantError(f"--dtype float16: {where} has no native float16; use --dtype auto or float32")

    # float16 wanted: probe in float32 and look for overflow
    if inputs is None:
        raise AnyquantError("the float16 policy needs probe inputs (to measure activation ranges)")
    model.float()
    ranges = probe_ranges(model, inputs)
    bad = [r for r in ranges.values() if not r.finite]
    if bad:
        names = ", ".join(r.name or "<model>" for r in bad[:5])
        raise AnyquantError(f"the model's float32 probe forward is not finite (in {names}); the source model is broken")
    limit = FP16_MAX * margin
    regions, values = overflow_regions(ranges, limit)
    absmax = max((r.out_absmax or 0.0 for r in ranges.values()), default=0.0)
    listing = "; ".join(f"{v['module'] or '<model>'} {v['where']} {v['absmax']:.4g}" for v in values[:8])
    if not regions:
        return policy(torch.float16, f"{'requested; ' if requested != 'auto' else where + ': no bfloat16; '}"
                      f"activations peak at {absmax:.4g}, within float16's range", probe_absmax=absmax)
    total = sum(p.numel() for p in model.parameters()) or 1
    share = sum(p.numel() for r in regions if r for p in model.get_submodule(r).parameters()) / total
    if "" in regions or share > MAX_FP32_SHARE:
        where_ = "no module boundary contains it" if "" in regions else (
            f"containing it would keep {share:.0%} of the weights in float32 ({', '.join(regions)})")
        msg = f"float16 overflows in this model and {where_} (values over {limit:.0f}: {listing})"
        if requested == "float16":
            raise AnyquantError(f"--dtype float16 refused: {msg}; use --dtype bfloat16 on a device with "
                                "bfloat16, or --dtype float32")
        log.warning("dtype policy: %s; computing in float32", msg)
        return policy(torch.float32, f"{where}: no bfloat16, and {msg}", overflow=values, probe_absmax=absmax)
    kept = ", ".join(f"{k} ({v})" for k, v in regions.items())
    msg = f"float16 overflows in {len(regions)} module(s); kept in float32 with casts at their boundaries: {kept}"
    log.warning("dtype policy: %s", msg)
    reason = ("requested; " if requested == "float16" else f"{where}: no bfloat16; ") + msg
    return policy(torch.float16, reason, fp32_modules=dict(regions), overflow=values, probe_absmax=absmax)


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


# --------------------------------------------------------------------------- consistency


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
        return (_cast(args, dt), _cast(kwargs, dt)) if dt is not None else None

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
    from anyquant.model.modelmap import quantized_linear_types

    return isinstance(module, quantized_linear_types())


@torch.no_grad()
def check_consistency(model: nn.Module, inputs: dict[str, Any]) -> list[dict]:
    """Forward on probe inputs; every module's floating inputs, weights and biases must agree in
    dtype unless the module casts at its boundary. Returns the mismatches (module, dtypes).

    A forward that fails with a dtype error is re-raised as AnyquantError naming the module."""
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
        model(**inputs)
    except RuntimeError as e:
        if not _DTYPE_ERROR.search(str(e)):
            raise
        where = stack[-1] if stack else ""
        kind = type(model.get_submodule(where)).__name__
        raise DtypeBoundaryError(f"dtype check: the forward fails in {where or '<model>'} ({kind}): {e}",
                                 where) from e
    finally:
        for h in handles:
            h.remove()
    # one entry per module
    seen, unique = set(), []
    for m in mismatches:
        if m["module"] not in seen:
            seen.add(m["module"])
            unique.append(m)
    for m in unique:
        log.warning("dtype mismatch in %s (%s): inputs %s, parameters %s", m["module"], m["type"], m["inputs"], m["params"])
    return unique
