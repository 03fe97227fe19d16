"""`anyquant doctor`: predict which failure class (F1–F5) a transformers + bitsandbytes
`BitsAndBytesConfig` will hit on this device, and print a corrected config.

The model is loaded once on the CPU in float32 (never onto a GPU) and probed: one forward with
hooks records activation ranges (F3) and weights read outside their module's forward (F2).
Skip patterns (F4) are matched with transformers' own `should_convert_module`, so the verdict
is the one transformers will reach. Already-quantized checkpoints (F5) are read from the
safetensors headers without loading.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from anyquant.errors import AnyquantError
from anyquant.model.load import inspect_files, load_model, resolve_source
from anyquant.model.modelmap import HEAD, LINEAR, PROJECTOR, VISION, build_model_map
from anyquant.numerics.capabilities import DeviceCapabilities, detect_capabilities
from anyquant.numerics.casts import (
    DtypeBoundaryError,
    check_consistency,
    fix_boundaries,
)
from anyquant.numerics.dtype import DTYPES, dtype_name
from anyquant.numerics.inputs import runnable_probe_inputs
from anyquant.numerics.policy import choose_policy
from anyquant.numerics.probe import probe_weight_reads
from anyquant.numerics.ranges import (
    FP16_MARGIN,
    FP16_MAX,
    ModuleRange,
    overflow_regions,
    probe_ranges,
)

log = logging.getLogger(__name__)

FROM_PRETRAINED_KEYS = ("dtype", "torch_dtype")  # accepted in the JSON next to the bnb fields


REPRODUCED = "reproduced"
PREDICTED = "predicted, not reproduced"


def _finding(cls: str, module: str, message: str, evidence: str = REPRODUCED) -> dict[str, str]:
    """One finding. `evidence`: "reproduced" where doctor saw it happen in the stock transformers
    model (a forward in the user's dtype, a module run in float16, a weight read traced in the
    model's own forward, transformers' own skip matching, the checkpoint's headers); "predicted,
    not reproduced" where it follows from a rule (device capabilities, lines of remote code,
    bitsandbytes' CPU repacking constraints) without being run here."""
    return {"class": cls, "module": module, "message": message, "evidence": evidence}


def _dtype_str(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, torch.dtype):
        return dtype_name(v)
    s = str(v).replace("torch.", "")
    return {"half": "float16", "bf16": "bfloat16", "fp16": "float16", "float": "float32"}.get(s, s)


def read_bnb_config(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {"load_in_4bit": True}
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise AnyquantError(f"--bnb-config {path}: cannot read JSON ({e})") from e
    if not isinstance(d, dict):
        raise AnyquantError(f"--bnb-config {path}: expected a JSON object with BitsAndBytesConfig fields")
    return d


def _validate(d: dict[str, Any]):
    from transformers import BitsAndBytesConfig

    try:
        return BitsAndBytesConfig(**d)
    except (TypeError, ValueError) as e:
        raise AnyquantError(f"BitsAndBytesConfig({d}) is not valid: {e}") from e


def should_convert(name: str, patterns: list[str] | None) -> bool:
    """transformers' own matcher (prefix at a module boundary, regex, or suffix)."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    return should_convert_module(name, patterns)


def _default_skips(model: nn.Module) -> list[str]:
    """What transformers skips when llm_int8_skip_modules is None (tied, last, output embedding)."""
    from transformers.quantizers.base import get_keys_to_not_convert

    try:
        return sorted(get_keys_to_not_convert(model))
    except (AttributeError, NotImplementedError, TypeError) as e:  # custom models lack the methods (F4)
        log.info("get_keys_to_not_convert failed (%s)", e)
        return []


def _remote_code_casts(path: Path) -> list[dict[str, str]]:
    """Lines in the model's own code that cast tensors to a fixed low-precision dtype (F1)."""
    pat = re.compile(r"\.to\(\s*(?:dtype\s*=\s*)?torch\.(bfloat16|float16|half)\b|\.(half|bfloat16)\(\s*\)")
    found = []
    for f in sorted(path.glob("*.py")):
        cls = "<module>"
        for i, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
            m = re.match(r"class\s+(\w+)", line)
            if m:
                cls = m.group(1)
            hit = pat.search(line)
            if hit and not line.lstrip().startswith("#"):
                found.append({"class": cls, "where": f"{f.name}:{i}", "dtype": _dtype_str(hit.group(1) or hit.group(2)),
                              "line": line.strip()})
    return found


def _minimal(names: list[str]) -> list[str]:
    s = set(names)
    return sorted(n for n in s if not any(n.startswith(o + ".") for o in s if o != n))


def avx512bf16_cpu() -> bool:
    """Whether bitsandbytes' Linear4bit takes its AVX512-BF16 repacking path on this CPU."""
    try:
        from bitsandbytes.functional import has_avx512bf16
    except ImportError:
        return False
    return bool(has_avx512bf16())


BNB_4BIT_BLOCKSIZE = 64  # Params4bit's default; transformers' BitsAndBytesConfig does not set another
AVX512_BLOCK_N = 32  # bitsandbytes' _convert_weight_packed_for_cpu: out_features % 32, in_features % blocksize


def _repack_fails(m: nn.Linear) -> bool:
    return m.out_features % AVX512_BLOCK_N != 0 or m.in_features % BNB_4BIT_BLOCKSIZE != 0


AVX512_FIX = ("after loading, turn the path off: `for m in model.modules(): m.support_avx512bf16_for_cpu = False` "
              "for every bitsandbytes Linear4bit (anyquant.methods.bnb.keep_compute_dtype(model) does this), "
              "or use the anyquant command below")


@dataclass
class _Request:
    """The user's config, read once: what transformers would be asked to do."""

    user: dict[str, Any]  # BitsAndBytesConfig fields (from_pretrained's dtype taken out)
    user_dtype: str | None  # from_pretrained's dtype in the user's JSON
    bnb: Any  # the validated BitsAndBytesConfig
    four_bit: bool
    compute: str  # the dtype bitsandbytes computes in
    method: str
    declared: str | None  # the checkpoint's config.json dtype
    model_dtype: str  # the dtype the user would load with


@dataclass
class _Probe:
    """One float32 forward's facts, shared by every check."""

    model: nn.Module
    inputs: dict[str, Any]
    ranges: dict[str, ModuleRange]
    regions: dict[str, str]  # float16 overflow regions
    values: list[dict]  # activations over the float16 range
    absmax: float
    linears: list[str]


def _read_request(bnb_config: dict[str, Any] | None, config: dict[str, Any]) -> _Request:
    user = dict(bnb_config or {"load_in_4bit": True})
    user_dtype = None
    for k in FROM_PRETRAINED_KEYS:
        if k in user:
            user_dtype = _dtype_str(user.pop(k))
    bnb = _validate(user)
    four_bit = bool(bnb.load_in_4bit)
    declared = _dtype_str(config.get("dtype") or config.get("torch_dtype"))
    return _Request(
        user, user_dtype, bnb, four_bit,
        compute=_dtype_str(bnb.bnb_4bit_compute_dtype) if four_bit else "float16",  # LLM.int8 computes in fp16
        method=("nf4" if bnb.bnb_4bit_quant_type == "nf4" else "fp4") if four_bit else "int8",
        declared=declared, model_dtype=user_dtype or declared or "float32",
    )


def check_already_quantized(info: Any) -> dict[str, str] | None:
    """F5: the checkpoint is quantized already; nothing else matters."""
    if not (info.quantization_config or info.quantized_tensors):
        return None
    qm = (info.quantization_config or {}).get("quant_method", "unknown")
    first = info.quantized_tensors[0] if info.quantized_tensors else "(quantization_config in config.json)"
    return _finding("F5", first.split(" ")[0].rsplit(".", 1)[0] if info.quantized_tensors else "",
                    f"checkpoint is already quantized ({qm}; first tensor {first}): loading it with "
                    "another BitsAndBytesConfig re-quantizes integer data or fails")


def check_dtype_boundaries(model: nn.Module, inputs: dict[str, Any], model_dtype: str
                           ) -> tuple[list[dict[str, str]], set[str]]:
    """F1, measured: one forward in the dtype the user would load with (the CPU computes all
    three), then casts where dtypes disagree in float32 (remote code casting), so that the probe
    runs. Returns (findings, modules where the user's dtype fails)."""
    findings: list[dict[str, str]] = []
    f1_modules: set[str] = set()
    if model_dtype in DTYPES and model_dtype != "float32":
        dt = DTYPES[model_dtype]
        model.to(dt)
        cast = {k: v.to(dt) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
        try:
            for m in check_consistency(model, cast):
                f1_modules.add(m["module"])
                findings.append(_finding("F1", m["module"], f"with dtype={model_dtype}: inputs {m['inputs']} meet "
                                         f"parameters {m['params']} ({m['type']})"))
        except DtypeBoundaryError as e:
            f1_modules.add(e.module)
            findings.append(_finding("F1", e.module or "<model>", f"with dtype={model_dtype} the forward fails: {e}"))
        model.float()
    for name, what in fix_boundaries(model, inputs).items():
        if name not in f1_modules:
            findings.append(_finding("F1", name, f"dtypes disagree at this module's boundary in float32: {what}"))
    return findings, f1_modules


def _probe(model: nn.Module, inputs: dict[str, Any], margin: float) -> _Probe:
    ranges = probe_ranges(model, inputs, float16=True)  # float32 ranges, and each module re-run in float16
    regions, values = overflow_regions(ranges, FP16_MAX * margin)
    absmax = max((r.out_absmax or 0.0 for r in ranges.values()), default=0.0)
    linears = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    return _Probe(model, inputs, ranges, regions, values, absmax, linears)


def check_overflow(req: _Request, probe: _Probe) -> list[dict[str, str]]:
    """F3: float16 somewhere on the path of an overflowing activation."""
    if not probe.values or not (req.compute == "float16" or req.model_dtype == "float16"):
        return []
    findings = []
    for region in probe.regions:
        inside = [v for v in probe.values
                  if not region or v["module"] == region or v["module"].startswith(region + ".")]
        listing = ", ".join(f"{v['module']} {v['where']} {v['absmax']:.4g}" for v in inside[:4])
        which = "bnb_4bit_compute_dtype=float16" if req.compute == "float16" and req.four_bit else (
            "LLM.int8 (computes in float16)" if not req.four_bit else f"dtype={req.model_dtype}")
        findings.append(_finding("F3", region or "<model>",
                                 f"{which}: activations exceed the float16 range ({FP16_MAX:.0f}) here: "
                                 f"{listing}; outputs become inf/NaN"))
    return findings


def check_device_dtypes(req: _Request, caps: DeviceCapabilities, remote_casts: list[dict[str, str]]
                        ) -> list[dict[str, str]]:
    """F1: a dtype the device does not compute natively; remote code that casts to a fixed dtype."""
    findings = []
    for what, dt in (("bnb_4bit_compute_dtype" if req.four_bit else "LLM.int8 compute", req.compute),
                     ("dtype", req.model_dtype)):
        if dt in DTYPES and not caps.supports(DTYPES[dt]):
            findings.append(_finding("F1", "<model>", f"{what}={dt}: {caps.name} ({caps.device_type}) has no native {dt}",
                                     PREDICTED))
    for c in remote_casts:
        if c["dtype"] != req.model_dtype or c["dtype"] != req.compute:
            findings.append(_finding("F1", c["class"],
                                     f"remote code casts to {c['dtype']} at {c['where']} ({c['line']!r}) while the "
                                     f"model runs in {req.model_dtype} with {req.compute} compute: its neighbours' "
                                     "dtypes will disagree; use one dtype for dtype and compute dtype", PREDICTED))
    return findings


def check_outside_reads(req: _Request, probe: _Probe) -> tuple[list[dict[str, str]], list[str]]:
    """F2: weights read outside their module's forward break when that Linear is quantized.
    Returns (findings, Linears to keep)."""
    findings, keep = [], []
    # The read is traced as the quantized model runs: transformers marks the config of a model it
    # loads with a quantization config (`config._is_quantized`), and some models take another
    # path then (Jamba calls `dt_proj` instead of multiplying `dt_proj.weight`).
    with quantized_load_marks(probe.model):
        facts = probe_weight_reads(probe.model, probe.inputs)
    linear_set = set(probe.linears)
    for name, readers in sorted(facts.outside_reads.items()):
        # bitsandbytes replaces only the weight (the bias stays a float Parameter): a read of
        # the bias alone works on the quantized model and is no finding
        if "weight" not in facts.read_params.get(name, ["weight"]):
            continue
        if name in linear_set and should_convert(name, req.bnb.llm_int8_skip_modules):
            keep.append(name)
            findings.append(_finding("F2", name, f"weight read outside its own forward by "
                                     f"{facts.reader_text(name)}: quantizing it breaks that reader"))
    return findings, keep


@contextlib.contextmanager
def quantized_load_marks(model: nn.Module):
    """`config._is_quantized = True` on every pretrained (sub)model's config while inside, as
    transformers' quantizers set it on a quantized load; restored afterwards."""
    configs = {id(c): c for m in model.modules()
               for c in [getattr(m, "config", None)] if c is not None and hasattr(m, "config_class")}
    before = {k: c.__dict__.get("_is_quantized", _MISSING) for k, c in configs.items()}
    try:
        for c in configs.values():
            c._is_quantized = True
        yield
    finally:
        for k, c in configs.items():
            if before[k] is _MISSING:
                c.__dict__.pop("_is_quantized", None)
            else:
                c._is_quantized = before[k]


_MISSING = object()


@dataclass
class _Skips:
    findings: list[dict[str, str]]
    notes: list[str]
    matched: list[str]  # modules the user's entries (or their near misses) mean to keep
    head_keep: list[str]
    defaults: list[str]  # transformers' default skips
    defaults_lin: list[str]  # the defaults that hold a Linear
    effective: list[str]  # the skips transformers applies with the user's config


def check_skips(req: _Request, probe: _Probe) -> _Skips:
    """F4: skip patterns that transformers does not match, and an output head its defaults miss."""
    model, linears = probe.model, probe.linears
    linear_set = set(linears)
    findings: list[dict[str, str]] = []
    notes: list[str] = []
    skips = list(req.bnb.llm_int8_skip_modules or [])
    matched: list[str] = []
    for p in skips:
        hit = [n for n in linears if not should_convert(n, [p])]
        mods = [n for n, _ in model.named_modules() if n and not should_convert(n, [p])]
        if hit:
            matched += _minimal(mods)
            continue
        near = [n for n in linears if p.strip(".") in n or p.split(".")[-1] in n.split(".")[-1]]
        hint = f"; did you mean {', '.join(near[:4])}{' ...' if len(near) > 4 else ''}?" if near else ""
        other = [n for n, _ in model.named_parameters() if not should_convert(n, [p])] + [
            n for n in mods if n not in linear_set]
        if other and not near:
            hint = (f"; it names non-Linear modules or parameters ({', '.join(sorted(other)[:3])}"
                    f"{' ...' if len(other) > 3 else ''}), which transformers never quantizes: not needed")
        findings.append(_finding("F4", p, f"llm_int8_skip_modules entry {p!r} matches no Linear module in transformers "
                                 f"(prefix at a module boundary, regex, or suffix){hint}; it is silently ignored"))
        matched += near
    defaults = _default_skips(model)
    # only defaults that hold a Linear matter (the "last parameter" may be a norm's scale)
    defaults_lin = [d for d in defaults if any(n == d or n.startswith(d + ".") for n in linears)]
    dropped = [d for d in defaults_lin if should_convert(d, skips)]
    if skips and dropped:
        notes.append(f"a custom llm_int8_skip_modules replaces transformers' default skips, so {', '.join(dropped)} "
                     "would be quantized; added back below")
    # an output head that transformers' defaults (tied weights, last parameter, get_output_embeddings)
    # do not find in a custom architecture (ChatGLM's `transformer.output_layer`) is quantized
    mm = build_model_map(model)
    effective = skips if skips else defaults
    head_keep: list[str] = []
    for name, mi in mm.modules.items():
        if mi.kind == LINEAR and mi.component == HEAD and name in linear_set and should_convert(name, effective) \
                and should_convert(name, defaults):
            head_keep.append(name)
            findings.append(_finding("F4", name, f"the output head ({mi.in_features}->{mi.out_features}, vocabulary "
                                     "size) is not among transformers' default skips (tied weights, last parameter, "
                                     "get_output_embeddings), so this config quantizes it: its error goes straight "
                                     "into the logits; kept unquantized below"))
    float_roots = sorted({n for n, mi in mm.modules.items() if mi.kind == LINEAR and mi.component in (VISION, PROJECTOR)
                          and should_convert(n, effective)})
    if float_roots:
        notes.append(f"{len(float_roots)} vision tower / projector Linears ({', '.join(float_roots[:3])}"
                     f"{' ...' if len(float_roots) > 3 else ''}) would be quantized; anyquant keeps them in float by "
                     "default; add them to llm_int8_skip_modules to do the same")
    return _Skips(findings, notes, matched, head_keep, defaults, defaults_lin, effective)


def recommended_dtype(model: nn.Module, caps: DeviceCapabilities, declared: str | None, probe: _Probe,
                      margin: float) -> tuple[str, str]:
    """The dtype anyquant's own policy (choose_policy, `auto`) picks for the checkpoint's declared
    dtype, from this probe. The model is loaded in float32 here, so the declared dtype is passed
    explicitly. float32 regions inside a float16 model cannot be written in a BitsAndBytesConfig:
    where float16 would need them, the policy decides without regions. Returns (dtype, reason)."""
    policy = choose_policy(model, "auto", caps, probe.inputs, margin=margin, declared=declared,
                           ranges=probe.ranges, allow_regions=False)
    return dtype_name(policy.compute_dtype), policy.reason


def corrected_config(req: _Request, caps: DeviceCapabilities, probe: _Probe, skips: _Skips, f2_keep: list[str],
                     remote_casts: list[dict[str, str]], good: str, why: str
                     ) -> tuple[dict[str, Any], str, str, bool, list[str]]:
    """The BitsAndBytesConfig (and from_pretrained dtype) that avoids what the checks found.
    Returns (config, dtype, reason, whether remote code's cast is unfixable here, notes)."""
    notes: list[str] = []
    forced = sorted({c["dtype"] for c in remote_casts})
    cast_unfixable = False
    if len(forced) == 1 and forced[0] != good:
        where_ = ", ".join(c["where"] for c in remote_casts[:3])
        if caps.supports(DTYPES[forced[0]]) and not (forced[0] == "float16" and probe.values):
            good, why = forced[0], f"{forced[0]}: the model's code casts to it ({where_}); one dtype everywhere"
        else:
            cast_unfixable = True
            notes.append(f"the model's code casts to {forced[0]} ({where_}), which this device cannot use safely: "
                         f"in transformers no dtype avoids the mismatch; patch that line to cast to the module's "
                         f"weight dtype, or use anyquant (it puts a cast at that boundary)")
    keep = list(skips.matched) + f2_keep + skips.head_keep
    if req.bnb.llm_int8_skip_modules or keep:
        keep += skips.defaults_lin
    if not req.four_bit and probe.values and good != "float32":
        # LLM.int8 casts inputs to float16 whatever the dtype: keep Linears fed with overflowing values
        linear_set = set(probe.linears)
        over_in = [v["module"] for v in probe.values if v["where"] == "input" and v["module"] in linear_set]
        keep += over_in
        if over_in:
            notes.append(f"LLM.int8 computes in float16: {', '.join(over_in)} kept unquantized (inputs over range)")
    fixed = dict(req.user)
    if req.four_bit:
        fixed["bnb_4bit_compute_dtype"] = good
    if keep:
        fixed["llm_int8_skip_modules"] = _minimal(keep)
    _validate(fixed)
    return fixed, good, why, cast_unfixable, notes


def unresolved_findings(req: _Request, caps: DeviceCapabilities, probe: _Probe, skips: _Skips,
                        findings: list[dict[str, str]], f1_modules: set[str], remote_casts: list[dict[str, str]],
                        fixed: dict[str, Any], good: str, cast_unfixable: bool
                        ) -> tuple[list[dict[str, str]], list[dict[str, str]], list[str]]:
    """What no BitsAndBytesConfig fixes: the corrected config alone still fails there.
    Returns (unresolved, new findings, notes)."""
    unresolved: list[dict[str, str]] = []
    new: list[dict[str, str]] = []
    notes: list[str] = []
    if cast_unfixable:  # no dtype avoids the remote code's own cast on this device
        cast_classes = {c["class"] for c in remote_casts}
        unresolved += [f for f in findings if f["class"] == "F1" and (f["module"] in f1_modules or
                                                                      f["module"] in cast_classes)]
    # bitsandbytes' AVX512-BF16 CPU path: Linear4bit repacks its weight at the first eval-mode, no-grad
    # forward, computes in bfloat16 from then on, and asserts shapes that narrow layers fail
    if req.four_bit and caps.device_type == "cpu" and avx512bf16_cpu():
        fixed_skips = fixed.get("llm_int8_skip_modules") or skips.defaults
        for n in probe.linears:
            m = probe.model.get_submodule(n)
            if should_convert(n, skips.effective) and should_convert(n, fixed_skips) and _repack_fails(m):
                err = ("AssertionError: N must be divisible by block_n" if m.out_features % AVX512_BLOCK_N else
                       f"RuntimeError: shape '[{m.out_features}, {m.in_features // BNB_4BIT_BLOCKSIZE}]' is invalid")
                f = _finding("F1", n, f"on this CPU (AVX512-BF16) bitsandbytes repacks Linear4bit weights at the first "
                             f"eval-mode, no-grad forward; this layer ({m.in_features}->{m.out_features}) fails there "
                             f"({err}; the path needs out_features % {AVX512_BLOCK_N} == 0 and in_features % "
                             f"{BNB_4BIT_BLOCKSIZE} == 0); {AVX512_FIX}", PREDICTED)
                new.append(f)
                unresolved.append(f)
        if good != "bfloat16":
            notes.append("on this CPU (AVX512-BF16) bitsandbytes computes Linear4bit in bfloat16 in eval-mode, no-grad "
                         f"forwards, whatever bnb_4bit_compute_dtype says; to keep {good}: {AVX512_FIX}")
    return unresolved, new, notes


def diagnose(source: str | Path, bnb_config: dict[str, Any] | None = None, *, trust_remote_code: bool = False,
             capabilities: DeviceCapabilities | None = None, margin: float = FP16_MARGIN) -> dict[str, Any]:
    path = resolve_source(source)
    info = inspect_files(path)
    req = _read_request(bnb_config, info.config)
    caps = capabilities or detect_capabilities("cuda" if torch.cuda.is_available() else "cpu")

    f5 = check_already_quantized(info)
    if f5 is not None:
        return _result(path, caps, [f5], req.user, req.user_dtype, None, req.method, trust_remote_code, [],
                       extra={"already_quantized": True, "unresolved": [f5]})

    model, _, _ = load_model(path, trust_remote_code=trust_remote_code, dtype=torch.float32)
    inputs, input_notes = runnable_probe_inputs(model)
    findings, f1_modules = check_dtype_boundaries(model, inputs, req.model_dtype)
    probe = _probe(model, inputs, margin)
    findings += check_overflow(req, probe)
    remote_casts = _remote_code_casts(path)
    findings += check_device_dtypes(req, caps, remote_casts)
    f2, f2_keep = check_outside_reads(req, probe)
    findings += f2
    skips = check_skips(req, probe)
    findings += skips.findings
    notes = input_notes + list(skips.notes)

    good, why = recommended_dtype(model, caps, req.declared, probe, margin)
    fixed, good, why, cast_unfixable, more = corrected_config(req, caps, probe, skips, f2_keep, remote_casts, good, why)
    notes += more
    changes = dtype_changes(req, fixed, good, why)
    unresolved, new, more = unresolved_findings(req, caps, probe, skips, findings, f1_modules, remote_casts, fixed,
                                                good, cast_unfixable)
    findings += new
    notes += more
    return _result(path, caps, findings, fixed, good, why, req.method, trust_remote_code, notes,
                   extra={"unresolved": unresolved, "activation_absmax": probe.absmax,
                          "float16_overflow": probe.values[:10], "float32_regions": probe.regions,
                          "changes": changes,
                          "user_config": {**req.user, **({"dtype": req.user_dtype} if req.user_dtype else {})}})


def _result(path, caps, findings, fixed, dtype, why, method, trust_remote_code, notes, extra) -> dict[str, Any]:
    cmd = f"anyquant quantize {path} --method {method} --dtype auto --out {path.name}-{method}"
    if trust_remote_code:
        cmd += " --trust-remote-code"
    return {
        "source": str(path),
        "device": caps.to_dict(),
        "findings": findings,
        "bnb_config": fixed,
        "from_pretrained": {"dtype": dtype} if dtype else {},
        "dtype_reason": why,
        "anyquant_command": cmd,
        "notes": notes,
        **extra,
    }


def dtype_changes(req: _Request, fixed: dict[str, Any], good: str, why: str) -> list[str]:
    """Each dtype the user set that the corrected config replaces, with the reason: the report
    must not say "no problems found" and silently hand back another dtype."""
    out = []
    given = req.user.get("bnb_4bit_compute_dtype")
    if req.four_bit and given is not None and _dtype_str(given) != fixed.get("bnb_4bit_compute_dtype"):
        out.append(f"bnb_4bit_compute_dtype: your {_dtype_str(given)} becomes {fixed.get('bnb_4bit_compute_dtype')}: "
                   f"{why}")
    if req.user_dtype and req.user_dtype != good:
        out.append(f"dtype (from_pretrained): your {req.user_dtype} becomes {good}: {why}")
    return out


def print_report(data: dict[str, Any], echo=print) -> None:
    dev = data["device"]
    echo(f"doctor: {data['source']} on {dev['name']} ({dev['device_type']}{', simulated' if dev['simulated'] else ''})")
    changes = data.get("changes") or []
    if not data["findings"]:
        echo("no problems found in the model" + ("; the corrected config changes your settings:" if changes else ""))
    elif changes:
        echo("the corrected config changes your settings:")
    for c in changes:
        echo(f"  changed: {c}")
    for f in data["findings"]:
        tag = f" ({f['evidence']})" if f.get("evidence", REPRODUCED) != REPRODUCED else ""
        echo(f"  {f['class']}  {f['module']}: {f['message']}{tag}")
    for n in data["notes"]:
        echo(f"note: {n}")
    for f in data.get("unresolved", []):
        echo(f"not fixed by the config below: {f['class']} {f['module']}")
    args = ", ".join(f"{k}={v!r}" for k, v in data["bnb_config"].items())
    echo("\ncorrected config:")
    echo(f"  quantization_config = BitsAndBytesConfig({args})")
    if data["from_pretrained"]:
        dt = data["from_pretrained"]["dtype"]
        echo(f"  model = AutoModel....from_pretrained({data['source']!r}, quantization_config=quantization_config, "
             f"dtype=torch.{dt})   # {data['dtype_reason']}")
    echo(f"\nor with anyquant:\n  {data['anyquant_command']}")
