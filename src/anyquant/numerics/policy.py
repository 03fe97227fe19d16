"""The dtype policy: one compute dtype for the whole model, chosen from the device and a probe.

1. A float32 probe forward records, per module, the absmax of its floating inputs and outputs
   (hooks on every module) and whether they are finite.
2. `auto`: float32 where the device prefers it (CPU); the model's declared dtype
   (`config.dtype`) where the device computes it and it is safe (declared float32 stays float32;
   declared float16 is probed, bfloat16 where it overflows); bfloat16 where the device supports it
   (same exponent range as float32: no overflow); else float16 if no activation exceeds the
   float16 range with margin and no module turns inf/NaN when re-run in float16; else float16
   with the overflowing modules kept in float32, casts at their boundaries (inputs to float32,
   outputs back); else float32. `_keep_in_fp32_modules(_strict)` and float32 parameters of a
   16-bit model become float32 regions; `dtype_exceptions` lists every module not in the compute
   dtype, and why.
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
from anyquant.model.tree import device_of
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
    # float16 check (probe_ranges(..., float16=True)): the module re-run in float16 on its own
    # inputs cast to float16 with its parameters cast to float16. None: not checked (inputs
    # already over the float16 range, too large a share of the weights, or the re-run failed).
    fp16_finite: bool | None = None
    fp16_bad: str = ""  # "inf" / "nan" when fp16_finite is False


def _bump(cur: float | None, new: float | None) -> float | None:
    if new is None:
        return cur
    return new if cur is None else max(cur, new)


@torch.no_grad()
def probe_ranges(model: nn.Module, inputs: dict[str, Any], *, float16: bool = False,
                 max_share: float = MAX_FP32_SHARE) -> dict[str, ModuleRange]:
    """One forward with hooks on every module: input/output absmax and finiteness, per module.

    Runs the model as it is (the policy casts it to float32 first). With `float16=True` each
    module (except the root and modules holding over `max_share` of the weights) is also run
    once more in float16, on its own inputs cast to float16 and with float16 copies of its
    parameters (`torch.func.functional_call`: the model's weights are never cast): a module
    whose float16 output is inf/NaN while its float16 inputs are finite overflows *inside*
    (an `exp`, a product, a sum of squares) where the float32 boundary values cannot see it."""
    ranges: dict[str, ModuleRange] = {}
    handles = []
    total = sum(p.numel() for p in model.parameters()) or 1
    rerunning = [False]  # hooks are inert while a module is re-run in float16
    snapshots: dict[int, list] = {}
    for name, mod in model.named_modules():
        r = ranges[name] = ModuleRange(name, type(mod).__name__)
        check16 = float16 and bool(name) and sum(p.numel() for p in mod.parameters()) / total <= max_share

        def pre(m, args, kwargs, r=r, check16=check16):
            if rerunning[0]:
                return
            a, fin = _absmax((args, kwargs))
            r.in_absmax = _bump(r.in_absmax, a)
            r.finite &= fin
            if check16:  # before the call: the module may update a cache or its inputs in place
                snapshots.setdefault(id(m), []).append(_half_snapshot((args, kwargs)))

        def post(m, args, kwargs, out, r=r, check16=check16):
            if rerunning[0]:
                return
            a, fin = _absmax(out)
            r.out_absmax = _bump(r.out_absmax, a)
            r.finite &= fin
            r.calls += 1
            if check16:
                snap = snapshots[id(m)].pop()
                if snap is not None:
                    rerunning[0] = True
                    try:
                        _check_float16(m, r, *snap)
                    finally:
                        rerunning[0] = False

        handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(mod.register_forward_hook(post, with_kwargs=True))
    run_inputs = dict(inputs)
    if float16 and "use_cache" not in run_inputs and _accepts(model, "use_cache"):
        run_inputs["use_cache"] = False  # a KV cache would see the float16 re-runs
    try:
        model(**run_inputs)
    finally:
        for h in handles:
            h.remove()
    return {n: r for n, r in ranges.items() if r.calls}


def _accepts(model: nn.Module, arg: str) -> bool:
    import inspect

    try:
        return arg in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _half_snapshot(obj: Any) -> Any:
    """(args, kwargs) with floating tensors cast to float16 (copies) and other objects deep-copied;
    None where the float16 inputs are already non-finite (over the range: the absmax check's case)
    or cannot be copied."""
    import copy

    bad = [False]

    def conv(o):
        if isinstance(o, torch.Tensor):
            if o.is_floating_point():
                h = o.detach().to(torch.float16)
                if not bool(torch.isfinite(h).all()):
                    bad[0] = True
                return h
            return o
        if isinstance(o, tuple) and hasattr(o, "_fields"):
            return type(o)(*(conv(v) for v in o))
        if isinstance(o, (tuple, list)):
            return type(o)(conv(v) for v in o)
        if isinstance(o, dict) and type(o) is dict:
            return {k: conv(v) for k, v in o.items()}
        if o is None or isinstance(o, (bool, int, float, str, torch.dtype, torch.device)):
            return o
        return copy.deepcopy(o)

    try:
        snap = conv(obj)
    except Exception as e:  # noqa: BLE001 — an argument that cannot be copied: this module is not re-run
        log.info("float16 check: inputs not copyable (%s)", e)
        return None
    return None if bad[0] else snap


def _check_float16(module: nn.Module, r: ModuleRange, args: tuple, kwargs: dict) -> None:
    from torch.func import functional_call

    state = {k: (v.to(torch.float16) if v.is_floating_point() else v)
             for k, v in list(module.named_parameters()) + list(module.named_buffers())}
    try:
        out = functional_call(module, state, args, kwargs, tie_weights=True, strict=False)
    except Exception as e:  # noqa: BLE001 — user/remote code that cannot run in float16 (e.g. its own casts)
        log.info("float16 check of %s skipped: %s: %s", r.name, type(e).__name__, str(e)[:160])
        return
    bad = ""
    for t in iter_tensors(out):
        if t.is_floating_point() and t.numel():
            if bool(torch.isnan(t).any()):
                bad = "nan"
                break
            if bool(torch.isinf(t).any()):
                bad = "inf"
    ok = not bad
    r.fp16_finite = ok if r.fp16_finite is None else (r.fp16_finite and ok)
    if bad and not r.fp16_bad:
        r.fp16_bad = bad


def _ancestors(name: str) -> Iterator[str]:
    while name:
        name = name.rpartition(".")[0]
        yield name


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


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
    # modules that turn inf/NaN when run in float16 although their float16 inputs are finite:
    # the innermost ones (no called descendant fails too) are where the overflow happens
    failing = {n for n, r in ranges.items() if n and r.fp16_finite is False}
    fp16_producers = {n for n in failing if not any(o.startswith(n + ".") for o in failing)}
    for n in sorted(fp16_producers):
        r = ranges[n]
        values.append({"module": n, "where": f"float16 run ({r.fp16_bad or 'inf'})", "absmax": r.out_absmax or 0.0,
                       "float16": r.fp16_bad or "inf"})
    regions: dict[str, str] = {}
    for n in fp16_producers:
        if not over(ranges[n].out_absmax) and not over(ranges[n].in_absmax):
            r = ranges[n]
            regions[n] = (f"turns {r.fp16_bad or 'inf'} when run in float16 although its inputs and outputs stay "
                          f"within the float16 range in float32 (in {_fmt(r.in_absmax)}, out {_fmt(r.out_absmax)}): "
                          "an intermediate overflows inside it")
        else:
            producers.add(n)
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
    declared: str | None = None  # the model's config.dtype
    # parameters kept in float32 while most weights are 16-bit: name -> {module, file, key}
    precise_params: dict[str, dict[str, str]] = field(default_factory=dict)
    # after apply(): every module whose parameters' dtype differs from the compute dtype, and why
    dtype_exceptions: list[dict[str, Any]] = field(default_factory=list)

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
        self._restore_precise(model)
        self.dtype_exceptions = self.exceptions(model)
        if inputs is not None:
            self.boundary_casts.update(fix_boundaries(model, inputs))
            for k, v in self.boundary_casts.items():
                log.warning("dtype policy: %s: %s", k, v)
        return model

    def _restore_precise(self, model: nn.Module) -> None:
        """float32 values of parameters the checkpoint stores in float32 (the load rounded them)."""
        from safetensors import safe_open

        by_file: dict[str, list[tuple[str, str]]] = {}
        for n, info in self.precise_params.items():
            if info.get("file"):
                by_file.setdefault(info["file"], []).append((n, info["key"]))
        params = dict(model.named_parameters())
        for f, items in by_file.items():
            with safe_open(f, framework="pt") as fh:
                for n, key in items:
                    p = params.get(n)
                    if p is not None and p.dtype == torch.float32:  # inside a float32 region (or float32 compute)
                        t = fh.get_tensor(key)
                        if tuple(t.shape) == tuple(p.shape):
                            p.data.copy_(t.to(dtype=torch.float32))

    def exceptions(self, model: nn.Module) -> list[dict[str, Any]]:
        """Every module whose own floating parameters are not in the compute dtype, and why."""
        out = []
        for name, mod in model.named_modules():
            own = [(pn, p.dtype) for pn, p in mod.named_parameters(recurse=False) if p.is_floating_point()]
            diff = sorted({dt for _, dt in own if dt != self.compute_dtype}, key=str)
            if not diff:
                continue
            region = next((r for r in sorted(self.fp32_modules, key=len, reverse=True)
                           if name == r or name.startswith(r + ".") or r == ""), None)
            if region is not None:
                why = self.fp32_modules[region] if region == name else (
                    f"inside the float32 region {region}: {self.fp32_modules[region]}")
            else:
                why = "its parameters were not cast by the policy (the model's code sets their dtype)"
            out.append({"module": name or "<model>", "type": type(mod).__name__,
                        "dtype": ", ".join(dtype_name(d) for d in diff),
                        "parameters": [pn for pn, dt in own if dt != self.compute_dtype], "reason": why})
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "requested": self.requested,
            "declared_dtype": self.declared,
            "compute_dtype": dtype_name(self.compute_dtype),
            "reason": self.reason,
            "device": self.capabilities.to_dict(),
            "float32_modules": dict(self.fp32_modules),
            "dtype_exceptions": self.dtype_exceptions,
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


def _keep_in_fp32_declared(model: nn.Module, dtype: torch.dtype) -> dict[str, str]:
    """Modules the model's code declares float32, with transformers' semantics: `_keep_in_fp32_modules`
    under float16 only, `_keep_in_fp32_modules_strict` under float16 and bfloat16. Declarations of
    submodules (a VLM's language model) apply below them."""
    attrs = ["_keep_in_fp32_modules_strict"] + (["_keep_in_fp32_modules"] if dtype == torch.float16 else [])
    patterns: list[tuple[str, str, str]] = []  # (prefix, pattern, attr)
    for prefix, mod in model.named_modules():
        for attr in attrs:
            for pat in sorted(getattr(mod, attr, None) or []):
                if (prefix, pat, attr) not in patterns:
                    patterns.append((prefix, pat, attr))
    found: dict[str, str] = {}
    for name, _ in model.named_modules():
        if not name or any(a in found for a in _ancestors(name)):
            continue
        for prefix, pat, attr in patterns:
            rel = name[len(prefix) + 1:] if prefix and name.startswith(prefix + ".") else (name if not prefix else None)
            if rel is not None and f".{pat}." in f".{rel}.":
                found[name] = f"declared by the model ({attr}: {pat!r})"
                break
    return found


def declared_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype the model's config declares (`config.dtype`, older `torch_dtype`; a VLM's
    text/LLM sub-config when the top level has none). transformers rewrites `config.dtype` to the
    dtype a model was loaded with, so for an in-memory model this is that dtype."""
    cfg = getattr(model, "config", None)
    for c in (cfg, getattr(cfg, "text_config", None), getattr(cfg, "llm_config", None)):
        if c is None:
            continue
        if isinstance(c, dict):
            v = c.get("dtype") or c.get("torch_dtype")
        else:
            v = c.__dict__.get("dtype") or c.__dict__.get("torch_dtype")
        if v is None:
            continue
        name = v if isinstance(v, str) else dtype_name(v) if isinstance(v, torch.dtype) else None
        name = (name or "").replace("torch.", "")
        if name in DTYPES:
            return DTYPES[name]
    return None


_PRECISE = {"F32": torch.float32, "F64": torch.float64}
_LOW = {"BF16", "F16"}


def _precise_params(model: nn.Module) -> dict[str, dict[str, str]]:
    """Parameters kept in float32 while most of the model's weights are 16-bit: in the model as
    handed over (mixed dtypes in memory), or in its safetensors checkpoint (transformers casts
    every tensor to `dtype` on load, rounding them; evo-1 keeps its filters' `poles` / `residues`
    in float32 this way). {param name: {"module", "file", "key"}}; file/key set when the
    float32 values can be restored from the checkpoint."""
    params = dict(model.named_parameters())
    found: dict[str, dict[str, str]] = {}
    # in memory
    numel: dict[torch.dtype, int] = {}
    for p in params.values():
        if p.is_floating_point():
            numel[p.dtype] = numel.get(p.dtype, 0) + p.numel()
    low = numel.get(torch.bfloat16, 0) + numel.get(torch.float16, 0)
    if low > sum(n for d, n in numel.items() if d in (torch.float32, torch.float64)):
        for n, p in params.items():
            if p.dtype in (torch.float32, torch.float64):
                found[n] = {"module": n.rpartition(".")[0], "file": "", "key": ""}
    # in the checkpoint
    from pathlib import Path

    src = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
    files = sorted(Path(src).glob("*.safetensors")) if src and Path(str(src)).is_dir() else []
    if not files:
        return found
    from safetensors import safe_open

    stored: dict[str, tuple[str, str]] = {}  # key -> (dtype, file)
    sizes = {"low": 0, "precise": 0}
    try:
        for f in files:
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():
                    sl = fh.get_slice(k)
                    dt = sl.get_dtype()
                    n = 1
                    for d in sl.get_shape():
                        n *= int(d)
                    if dt in _LOW:
                        sizes["low"] += n
                    elif dt in _PRECISE:
                        sizes["precise"] += n
                        stored[k] = (dt, str(f))
    except (OSError, ValueError) as e:  # not a readable safetensors file: nothing to restore
        log.info("dtype policy: checkpoint dtypes not read (%s)", e)
        return found
    if sizes["low"] <= sizes["precise"]:
        return found
    for k, (dt, f) in stored.items():
        if k in params and params[k].is_floating_point():
            found[k] = {"module": k.rpartition(".")[0], "file": f, "key": k}
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
    when one is needed; `policy.apply(model)` casts it to the chosen dtype.

    `auto`, after the device: the model's declared dtype (`config.dtype`) where the device
    computes it natively and it is safe: declared float32 stays float32; declared float16 is
    used when the probe finds no overflow, else bfloat16 where supported; declared bfloat16 (or
    nothing declared) gets bfloat16 where supported, else float16 after the probe."""
    requested = requested or "auto"
    if requested != "auto" and requested not in DTYPES:
        raise AnyquantError(f"--dtype {requested}: expected one of auto, {', '.join(DTYPES)}")
    caps = capabilities or detect_capabilities(device_of(model))
    where = f"{caps.name} ({caps.device_type}{', simulated' if caps.simulated else ''})"
    decl = declared_dtype(model)
    decl_name = dtype_name(decl) if decl is not None else None
    precise = _precise_params(model)

    boundary: dict[str, str] = {}
    if inputs is not None:  # remote code that casts to a dtype of its own: a cast where it meets a module
        try:
            boundary = fix_boundaries(model, inputs)
        except Exception as e:  # noqa: BLE001 — user/remote code; the probe reports it, the policy goes on
            log.warning("dtype policy: boundary check skipped, the probe forward failed (%s: %s)",
                        type(e).__name__, str(e)[:200])

    def policy(dtype, reason, **kw):
        p = DtypePolicy(requested, dtype, reason, caps, boundary_casts=dict(boundary), declared=decl_name,
                        precise_params=precise, **kw)
        if dtype != torch.float32:
            for k, v in _keep_in_fp32_declared(model, dtype).items():
                if not any(k == r or k.startswith(r + ".") for r in p.fp32_modules):
                    p.fp32_modules.setdefault(k, v)
            by_module: dict[str, list[str]] = {}
            for n, info in precise.items():
                by_module.setdefault(info["module"], []).append(n.rpartition(".")[2])
            for mod, names in by_module.items():
                if not any(mod == r or mod.startswith(r + ".") for r in p.fp32_modules):
                    src = "the checkpoint stores" if any(precise[f"{mod}.{n}" if mod else n]["file"] for n in names) \
                        else "the model holds"
                    p.fp32_modules[mod] = (f"{src} {', '.join(names)} in float32 while most weights are 16-bit: "
                                           "kept in float32 (inputs cast in, outputs cast back)")
        if decl_name and dtype_name(dtype) != decl_name:
            p.notes.append(f"the model declares {decl_name} (config.dtype); computing in {dtype_name(dtype)} "
                           "(see reason)")
        return p

    decl_txt = f"; the model declares {decl_name}" if decl_name else ""
    if requested == "float32":
        return policy(torch.float32, "requested")
    if requested == "bfloat16":
        if not caps.bf16:
            raise AnyquantError(
                f"--dtype bfloat16: {where} has no native bfloat16 (needs CUDA compute capability 8.0+); "
                "use --dtype auto (float16 where safe, else float32) or --dtype float32"
            )
        return policy(torch.bfloat16, "requested; bfloat16 has float32's range (no overflow)")
    fallback_bf16 = False  # declared float16 that overflows: bfloat16 where supported
    if requested == "auto":
        if caps.prefer_float32:
            return policy(torch.float32, f"{where}: no native low-precision compute; float32 is fast and exact there")
        if decl == torch.float32:
            return policy(torch.float32, "the model declares float32 (config.dtype): auto keeps it; "
                                         "--dtype bfloat16 or float16 computes lower (float16 after the overflow probe)")
        if decl == torch.float16 and caps.fp16:
            fallback_bf16 = caps.bf16
        elif caps.bf16:
            return policy(torch.bfloat16, f"{where} supports bfloat16 (float32's range: no float16 overflow){decl_txt}")
        elif not caps.fp16:
            return policy(torch.float32, f"{where} supports neither bfloat16 nor float16")
    elif not caps.fp16:  # requested float16
        raise AnyquantError(f"--dtype float16: {where} has no native float16; use --dtype auto or float32")

    # float16 wanted: probe in float32 (ranges) and each module in float16 (inf/NaN inside)
    if inputs is None:
        raise AnyquantError("the float16 policy needs probe inputs (to measure activation ranges)")
    model.float()
    inputs = _cast(dict(inputs), torch.float32)
    try:  # the boundary check again in float32 (a model loaded in its declared 16-bit dtype passed it there)
        found = fix_boundaries(model, inputs)
    except Exception as e:  # noqa: BLE001 — as above; probe_ranges below raises with the cause
        log.warning("dtype policy: float32 boundary check failed (%s: %s)", type(e).__name__, str(e)[:200])
        found = {}
    for k, v in found.items():
        boundary.setdefault(k, v)
    ranges = probe_ranges(model, inputs, float16=True)
    bad = [r for r in ranges.values() if not r.finite]
    if bad:
        names = ", ".join(r.name or "<model>" for r in bad[:5])
        raise AnyquantError(f"the model's float32 probe forward is not finite (in {names}); the source model is broken")
    limit = FP16_MAX * margin
    regions, values = overflow_regions(ranges, limit)
    absmax = max((r.out_absmax or 0.0 for r in ranges.values()), default=0.0)
    listing = "; ".join(f"{v['module'] or '<model>'} {v['where']} {v['absmax']:.4g}" for v in values[:8])
    head = "requested; " if requested != "auto" else (
        "the model declares float16 and the device computes it; " if decl == torch.float16 else
        f"{where}: no bfloat16; ")
    if not regions:
        return policy(torch.float16, f"{head}activations peak at {absmax:.4g}, within float16's range, and no module "
                      "turns inf/NaN when run in float16", probe_absmax=absmax)
    if fallback_bf16:
        msg = f"float16 overflows in {', '.join(r or '<model>' for r in regions)} ({listing})"
        log.warning("dtype policy: the model declares float16 but %s; computing in bfloat16", msg)
        return policy(torch.bfloat16, f"the model declares float16, but {msg}; {where} supports bfloat16 "
                      "(float32's range)", overflow=values, probe_absmax=absmax)
    total = sum(p.numel() for p in model.parameters()) or 1
    share = sum(p.numel() for r in regions if r for p in model.get_submodule(r).parameters()) / total
    if "" in regions or share > MAX_FP32_SHARE:
        where_ = "no module boundary contains it" if "" in regions else (
            f"containing it would keep {share:.0%} of the weights in float32 ({', '.join(regions)})")
        msg = f"float16 overflows in this model and {where_} (values over {limit:.0f} or inf/NaN in float16: {listing})"
        if requested == "float16":
            raise AnyquantError(f"--dtype float16 refused: {msg}; use --dtype bfloat16 on a device with "
                                "bfloat16, or --dtype float32")
        log.warning("dtype policy: %s; computing in float32", msg)
        return policy(torch.float32, f"{where}: no bfloat16, and {msg}", overflow=values, probe_absmax=absmax)
    kept = ", ".join(f"{k} ({v})" for k, v in regions.items())
    msg = f"float16 overflows in {len(regions)} module(s); kept in float32 with casts at their boundaries: {kept}"
    log.warning("dtype policy: %s", msg)
    return policy(torch.float16, head + msg, fp32_modules=dict(regions), overflow=values, probe_absmax=absmax)


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
