"""What is saved is what was verified: a saved output, reloaded, must give the in-memory
model's logits on the probe inputs.

`verify_saved` runs after every file of an output is written (formats/io.py `save`, before the
output is put in place): the output is loaded by anyquant.load (the loader passed in) and, for
the stock formats, by transformers' `from_pretrained` where transformers can load it; each one's
probe logits are compared with the in-memory model's. A mismatch is an AnyquantError naming
the largest difference and where it is (batch, position, vocabulary index); `save` then leaves
nothing behind. What stock transformers cannot load, or cannot reproduce (float32 regions,
quantized fused MoE experts), is recorded, not an error: the manifest's `verification` says which loaders matched."""

from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from anyquant.errors import AnyquantError
from anyquant.formats.experts import stock_refusal as experts_refusal
from anyquant.formats.hf import classes_for_config
from anyquant.formats.regions import float32_regions, stock_refusal
from anyquant.model.tree import device_of, probe_logits

log = logging.getLogger(__name__)

# Largest difference allowed between a reloaded output's logits and the in-memory model's, as
# a fraction of the in-memory logits' largest magnitude (at least 1): the same weights computed
# by the same kernels differ only by rounding of the compute dtype; a wrong tensor, dtype or
# missing cast moves logits by far more (or to NaN).
TOLERANCE = {"float32": 1e-3, "float16": 2e-2, "bfloat16": 5e-2}
# Stock transformers runs other kernels on the same weights (bitsandbytes' bfloat16 CPU path for
# 4-bit layers, which anyquant turns off; compressed-tensors dequantized at load): bfloat16
# rounding is the agreement to expect from it.
STOCK_TOLERANCE = "bfloat16"
STOCK_FORMATS = ("bitsandbytes", "compressed-tensors")


def _on(inputs: dict[str, Any], device: torch.device, dtype: torch.dtype | None) -> dict[str, Any]:
    out = {}
    for k, v in inputs.items():
        if torch.is_tensor(v):
            v = v.to(device)
            if dtype is not None and v.is_floating_point():
                v = v.to(dtype)
        out[k] = v
    return out


def compare_logits(expected: torch.Tensor, got: torch.Tensor, compute_dtype: str) -> dict[str, Any]:
    """max |difference|, where it is, the allowed difference and whether it is within."""
    expected, got = expected.float().cpu(), got.float().cpu()
    scale = max(1.0, float(expected.abs().max()))
    tol = TOLERANCE.get(compute_dtype, TOLERANCE["float16"]) * scale
    if expected.shape != got.shape:
        return {"ok": False, "max_abs_diff": float("inf"), "tolerance": tol,
                "where": f"shape {tuple(got.shape)} instead of {tuple(expected.shape)}"}
    diff = (expected - got).abs()
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
    worst = float(diff.max()) if diff.numel() else 0.0
    idx = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape)) if diff.numel() else ()
    where = "logits" + str(list(idx))
    if idx:
        where += f" (saved {float(got[idx]):.5g}, in memory {float(expected[idx]):.5g})"
    return {"ok": worst <= tol, "max_abs_diff": worst, "tolerance": tol, "where": where}


def _stock_load(directory: Path, trust_remote_code: bool) -> nn.Module:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    last: Exception | None = None
    for cls in classes_for_config(config):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return cls.from_pretrained(directory, trust_remote_code=trust_remote_code).eval()
        except ValueError as e:
            last = e
    raise AnyquantError(f"no transformers class loads config type {config.model_type}: {last}")


@torch.no_grad()
def verify_saved(directory: Path, result, load: Callable[..., nn.Module], fmt: str, *,
                 stock: bool = True) -> dict[str, Any]:
    """Reload `directory` with `load` (anyquant.load) and, for stock formats, transformers; compare
    the probe logits with `result.probe_logits`. Raises AnyquantError on a mismatch. Returns
    what the manifest records under `verification`."""
    t0 = time.perf_counter()
    inputs = getattr(result, "probe_inputs", None)
    expected = getattr(result, "probe_logits", None)
    if inputs is None or expected is None:
        return {"skipped": "the QuantizeResult carries no probe inputs / logits (made by an older anyquant)"}
    compute = result.plan.compute_dtype
    trc = bool(getattr(result, "trust_remote_code", False))
    out: dict[str, Any] = {"inputs": sorted(inputs), "compute_dtype": compute}
    dev = device_of(result.model)
    try:
        model = load(directory, trust_remote_code=trc, verify=False)
    except AnyquantError as e:
        raise AnyquantError(f"verify: the saved output does not load in anyquant.load: {e}; nothing was saved") from e
    except Exception as e:  # noqa: BLE001 — any failure to reload means the output is not the model
        raise AnyquantError(f"verify: the saved output does not load in anyquant.load ({type(e).__name__}: "
                            f"{str(e)[:300]}); nothing was saved") from e
    model.to(dev)
    got = probe_logits(model, _on(inputs, dev, None))
    del model
    cmp = compare_logits(expected, got, compute)
    out["anyquant"] = cmp
    if not cmp["ok"]:
        raise AnyquantError(
            f"verify: the saved output reloaded by anyquant.load differs from the in-memory model: max |difference| "
            f"{cmp['max_abs_diff']:.4g} at {cmp['where']} (allowed {cmp['tolerance']:.3g}); nothing was saved. "
            "Report it with the model; save(..., verify=False) / --no-verify-save writes it unchecked")
    if stock and fmt in STOCK_FORMATS:
        regions = float32_regions(result)
        experts = experts_refusal(result.plan)
        if experts:
            out["transformers"] = {"ok": None, "skipped": experts}
        elif regions:
            out["transformers"] = {"ok": None, "skipped": stock_refusal(regions, compute)}
        else:
            out["transformers"] = _verify_stock(directory, trc, inputs, expected, compute, dev)
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return json.loads(json.dumps(out, default=str))  # exactly what the manifest will read back


def _verify_stock(directory, trc, inputs, expected, compute, dev) -> dict[str, Any]:
    try:
        model = _stock_load(directory, trc)
    except Exception as e:  # noqa: BLE001 — recorded: stock transformers cannot load this output
        msg = " ".join(str(e).split())[:300]
        log.warning("verify: stock transformers cannot load %s: %s: %s", directory.name, type(e).__name__, msg)
        return {"ok": None, "loads": False, "reason": f"{type(e).__name__}: {msg}"}
    try:
        model.to(dev)
        dt = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
        got = probe_logits(model, _on(inputs, dev, dt))
    except Exception as e:  # noqa: BLE001 — loads but does not run: recorded
        msg = " ".join(str(e).split())[:300]
        log.warning("verify: stock transformers loads %s but its forward fails: %s", directory.name, msg)
        return {"ok": None, "loads": True, "runs": False, "reason": f"{type(e).__name__}: {msg}"}
    cmp = compare_logits(expected, got, compute if TOLERANCE.get(compute, 1.0) > TOLERANCE[STOCK_TOLERANCE]
                         else STOCK_TOLERANCE)
    cmp["loads"] = True
    if not cmp["ok"]:
        raise AnyquantError(
            f"verify: the saved output loaded by stock transformers' from_pretrained differs from the in-memory "
            f"model: max |difference| {cmp['max_abs_diff']:.4g} at {cmp['where']} (allowed {cmp['tolerance']:.3g}); "
            "nothing was saved. Report it with the model; save(..., verify=False) / --no-verify-save writes it "
            "unchecked")
    return cmp
