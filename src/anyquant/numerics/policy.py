"""The dtype policy: one compute dtype for the whole model, chosen from the device, the model's
declared dtype and a probe. `choose_policy` is the only place the compute dtype is decided:
`plan`, `quantize` (both through planning.prepare) and `doctor` ask it.

1. `auto`: float32 where the device prefers it (CPU); the model's declared dtype
   (`config.dtype`) where the device computes it and it is safe (declared float32 stays float32;
   declared float16 is probed, bfloat16 where it overflows); bfloat16 where the device supports it
   (same exponent range as float32: no overflow); else float16 if no activation exceeds the
   float16 range with margin and no module turns inf/NaN when re-run in float16 (numerics/ranges.py);
   else float16 with the overflowing modules kept in float32, casts at their boundaries
   (numerics/casts.py); else float32. `_keep_in_fp32_modules(_strict)` and float32 parameters of a
   16-bit model (numerics/declared.py) become float32 regions; `dtype_exceptions` lists every
   module not in the compute dtype, and why.
2. An explicit dtype is honoured, or refused (AnyquantError) with the module names and values
   when it is unsafe and the policy cannot keep the offending modules in float32.
3. After quantization, `check_consistency` (numerics/casts.py) proves that every module's
   floating inputs, weights and biases agree in dtype, or a cast sits at the boundary.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from anyquant.errors import AnyquantError
from anyquant.model.modelmap import declared_fp32_modules
from anyquant.model.tree import device_of
from anyquant.numerics.capabilities import DeviceCapabilities, detect_capabilities
from anyquant.numerics.casts import fix_boundaries, keep_in_float32
from anyquant.numerics.declared import (
    declared_dtype,
    precise_params,
    restore_precise_params,
)
from anyquant.numerics.dtype import DTYPES, cast_floats, dtype_name
from anyquant.numerics.ranges import (
    FP16_MARGIN,
    FP16_MAX,
    MAX_FP32_SHARE,
    ModuleRange,
    overflow_regions,
    probe_ranges,
)

log = logging.getLogger(__name__)

NOT_PROBED = "float16 not probed"


def buffers_keeping_dtype(model: nn.Module) -> list[tuple[nn.Module, str, torch.Tensor]]:
    """The buffers the dtype policy leaves in their own dtype when it casts the model, as
    (module, name, buffer), because transformers' loading leaves them so:
    - complex buffers: nn.Module.to(dtype) would drop their imaginary part (Llama 4's vision
      rotary `freqs_ci`);
    - floating buffers that are not saved (non-persistent: the model's code computes them, e.g.
      rotary `inv_freq`, made in float32): a model loaded in bfloat16 computes with them in
      float32, so the quantized model reloaded does too. Cast to bfloat16 they would shift the
      rotary angles of later positions, and calibration and the float reference would run a
      model that nobody deploys."""
    out = []
    for mod in model.modules():
        for n, b in mod._buffers.items():
            if b is not None and (b.is_complex() or b.is_floating_point() and n in mod._non_persistent_buffers_set):
                out.append((mod, n, b))
    return out


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
        kept = buffers_keeping_dtype(model)
        model.to(self.compute_dtype)
        for mod, n, b in kept:
            mod._buffers[n] = b.to(device=mod._buffers[n].device)
        if self.compute_dtype != torch.float32:
            for name in self.fp32_modules:
                keep_in_float32(model.get_submodule(name), self.compute_dtype)
        restore_precise_params(model, self.precise_params)
        self.dtype_exceptions = self.exceptions(model)
        if inputs is not None:
            self.boundary_casts.update(fix_boundaries(model, inputs))
            for k, v in self.boundary_casts.items():
                log.warning("dtype policy: %s: %s", k, v)
        return model

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


_FROM_MODEL: Any = object()  # choose_policy(declared=...) not given: read config.dtype from the model


def _as_dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    name = str(value).replace("torch.", "")
    if name not in DTYPES:
        raise AnyquantError(f"choose_policy(declared={value!r}): expected one of {', '.join(DTYPES)} or None")
    return DTYPES[name]


def choose_policy(
    model: nn.Module,
    requested: str | None,
    capabilities: DeviceCapabilities | None = None,
    inputs: dict[str, Any] | None = None,
    *,
    margin: float = FP16_MARGIN,
    probe: bool = True,
    declared: torch.dtype | str | None = _FROM_MODEL,
    ranges: dict[str, ModuleRange] | None = None,
    allow_regions: bool = True,
    boundaries_checked: bool = False,
) -> DtypePolicy:
    """Decide the compute dtype (and float32 regions). Casts `model` to float32 for the probe
    when one is needed; `policy.apply(model)` casts it to the chosen dtype.

    `auto`, after the device: the model's declared dtype (`config.dtype`) where the device
    computes it natively and it is safe: declared float32 stays float32; declared float16 is
    used when the probe finds no overflow, else bfloat16 where supported; declared bfloat16 (or
    nothing declared) gets bfloat16 where supported, else float16 after the probe.

    `probe=False`: no forward at all; the decision the device and the declared dtype imply, with
    float16 where float16 is the candidate and the reason saying "float16 not probed".
    `declared`: the checkpoint's dtype where the model was loaded in another one (transformers
    rewrites config.dtype to the load dtype). `ranges`: probe_ranges(..., float16=True) already
    measured in float32 on `inputs` (doctor), so no forward runs here. `allow_regions=False`:
    where float16 would need float32 regions, decide as if no module boundary contained the
    overflow (a BitsAndBytesConfig cannot express regions)."""
    requested = requested or "auto"
    if requested != "auto" and requested not in DTYPES:
        raise AnyquantError(f"--dtype {requested}: expected one of auto, {', '.join(DTYPES)}")
    caps = capabilities or detect_capabilities(device_of(model))
    where = f"{caps.name} ({caps.device_type}{', simulated' if caps.simulated else ''})"
    decl = declared_dtype(model) if declared is _FROM_MODEL else _as_dtype(declared)
    decl_name = dtype_name(decl) if decl is not None else None
    precise = precise_params(model)
    forward = probe and ranges is None  # whether this call runs forwards of its own

    boundary: dict[str, str] = {}
    # remote code that casts to a dtype of its own: a cast where it meets a module
    # (`boundaries_checked`: the caller's forward found none on this model, planning/prepare.py)
    if inputs is not None and forward and not boundaries_checked:
        try:
            boundary = fix_boundaries(model, inputs)
        except Exception as e:  # noqa: BLE001 — user/remote code; the probe reports it, the policy goes on
            log.warning("dtype policy: boundary check skipped, the probe forward failed (%s: %s)",
                        type(e).__name__, str(e)[:200])

    def policy(dtype, reason, **kw):
        p = DtypePolicy(requested, dtype, reason, caps, boundary_casts=dict(boundary), declared=decl_name,
                        precise_params=precise, **kw)
        if dtype != torch.float32:
            for k, v in declared_fp32_modules(model, dtype).items():
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

    head = "requested; " if requested != "auto" else (
        "the model declares float16 and the device computes it; " if decl == torch.float16 else
        f"{where}: no bfloat16; ")
    # float16 wanted: probe in float32 (ranges) and each module in float16 (inf/NaN inside)
    if not probe:
        if_over = ("bfloat16 where it overflows" if fallback_bf16 else
                   "float32 regions or float32 where it overflows" if allow_regions else "float32 where it overflows")
        return policy(torch.float16, f"{head}{NOT_PROBED} (a probe forward decides: {if_over})")
    if ranges is None:
        if inputs is None:
            raise AnyquantError("the float16 policy needs probe inputs (to measure activation ranges); pass inputs "
                                "(anyquant.numerics.inputs.probe_inputs(model)), or probe=False for the decision "
                                f"without the probe ({NOT_PROBED})")
        model.float()
        inputs = cast_floats(dict(inputs), torch.float32)
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
    if "" in regions or share > MAX_FP32_SHARE or not allow_regions:
        where_ = "no module boundary contains it" if "" in regions else (
            f"containing it would keep {share:.0%} of the weights in float32 ({', '.join(regions)})"
            if share > MAX_FP32_SHARE else
            f"float32 regions ({', '.join(regions)}) cannot be expressed here")
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
