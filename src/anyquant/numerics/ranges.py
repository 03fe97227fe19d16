"""Activation ranges from a float32 probe forward, and where float16 would overflow.

`probe_ranges` records, per module, the absmax of its floating inputs and outputs and whether
they are finite; with `float16=True` each module is also re-run in float16 on its own inputs,
which catches overflow *inside* a module (an `exp`, a sum of squares) that the float32 boundary
values cannot show. `overflow_regions` turns those facts into the smallest modules to keep in
float32: a value over the float16 range is produced inside the nearest called ancestor of the
module that receives it (or by the module whose output it is); that region grows up the tree
until its inputs and outputs fit float16 again, so the casts at its boundary are safe.
"""

from __future__ import annotations

import copy
import inspect
import logging
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn
from torch.func import functional_call

from anyquant.numerics.dtype import iter_tensors

log = logging.getLogger(__name__)

FP16_MAX = 65504.0
MAX_FP32_SHARE = 0.5  # float32 regions holding more of the weights than this: use float32 throughout
FP16_MARGIN = 0.5  # activations above FP16_MAX * margin count as overflowing (errors add up)


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
                    token = _pause_output_capture()
                    try:
                        _check_float16(m, r, *snap)
                    finally:
                        rerunning[0] = False
                        _resume_output_capture(token)

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


def _pause_output_capture() -> Any:
    """transformers' output capturing (the vision towers of Llava, Gemma3, InternVL ...) collects
    hidden states through hooks on the layers while the tower's call is in progress; a float16
    re-run of a layer inside our post-hook would add to (and break) that collection, and the
    caller gets `hidden_states=None`. The re-run happens with no active collector."""
    try:
        from transformers.utils import output_capturing
    except ImportError:
        return None
    var = getattr(output_capturing, "_active_collector", None)
    return (var, var.set(None)) if var is not None else None


def _resume_output_capture(token: Any) -> None:
    if token is not None:
        var, tok = token
        var.reset(tok)


def _accepts(model: nn.Module, arg: str) -> bool:
    try:
        return arg in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _half_snapshot(obj: Any) -> Any:
    """(args, kwargs) with floating tensors cast to float16 (copies) and other objects deep-copied;
    None where the float16 inputs are already non-finite (over the range: the absmax check's case)
    or cannot be copied."""
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


def ancestors(name: str) -> Iterator[str]:
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
        return next((a for a in ancestors(name) if a in called), "")

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
               if not any(a in regions for a in ancestors(r)) or r == ""}
    if "" in minimal:
        minimal = {"": minimal[""]}
    values.sort(key=lambda v: -v["absmax"])
    return minimal, values
