"""What a device computes natively: bfloat16, float16, and what bitsandbytes supports there.

Read from torch (CUDA compute capability: bfloat16 needs sm80+, float16 sm53+; CPU computes
both, but emulated and slowly, so `auto` keeps float32 there). Tests and users simulate another
device by passing a `DeviceCapabilities` or by setting ANYQUANT_DEVICE_CAPS, e.g.
`ANYQUANT_DEVICE_CAPS="bf16=0,fp16=1,prefer_float32=0"` ("a GPU without bfloat16").
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
from dataclasses import dataclass

import torch

from anyquant.errors import AnyquantError

ENV = "ANYQUANT_DEVICE_CAPS"


@dataclass(frozen=True)
class DeviceCapabilities:
    device_type: str
    name: str
    bf16: bool
    fp16: bool
    bnb: bool
    # CPUs compute in bfloat16/float16 correctly but without native speed; `auto` keeps float32.
    prefer_float32: bool = False
    compute_capability: tuple[int, int] | None = None
    simulated: bool = False

    def supports(self, dtype: torch.dtype) -> bool:
        if dtype == torch.bfloat16:
            return self.bf16
        if dtype == torch.float16:
            return self.fp16
        return dtype == torch.float32

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["compute_capability"] = list(self.compute_capability) if self.compute_capability else None
        return d


def _bnb_available() -> bool:
    """bitsandbytes installed (found, not imported: its import costs seconds that planning does
    not need; a method that uses it imports it and reports a broken install then)."""
    if "bitsandbytes" in sys.modules:
        return sys.modules["bitsandbytes"] is not None
    return importlib.util.find_spec("bitsandbytes") is not None


def detect_capabilities(device: torch.device | str = "cpu") -> DeviceCapabilities:
    """Capabilities of `device`, with ANYQUANT_DEVICE_CAPS overrides applied when set."""
    device = torch.device(device)
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(idx)
        caps = DeviceCapabilities(
            "cuda", torch.cuda.get_device_name(idx), bf16=major >= 8, fp16=(major, minor) >= (5, 3),
            bnb=_bnb_available(), compute_capability=(major, minor),
        )
    elif device.type in ("cpu", "meta"):
        caps = DeviceCapabilities("cpu", "cpu", bf16=True, fp16=True, bnb=_bnb_available(), prefer_float32=True)
    else:  # mps, xpu, ...: assume float16 only; bitsandbytes support there is partial
        caps = DeviceCapabilities(device.type, device.type, bf16=False, fp16=True, bnb=False)
    spec = os.environ.get(ENV)
    return simulate(caps, spec) if spec else caps


_FIELDS = {"bf16": bool, "fp16": bool, "bnb": bool, "prefer_float32": bool, "device_type": str, "name": str}


def simulate(base: DeviceCapabilities, spec: str | dict) -> DeviceCapabilities:
    """base with fields replaced: "bf16=0,fp16=1" or {"bf16": False}; marked simulated."""
    if isinstance(spec, str):
        items = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            key, sep, value = part.partition("=")
            if not sep or key.strip() not in _FIELDS:
                raise AnyquantError(
                    f"{ENV}={spec!r}: expected comma-separated key=value with keys {', '.join(_FIELDS)}"
                )
            key, value = key.strip(), value.strip()
            items[key] = value.lower() in ("1", "true", "yes") if _FIELDS[key] is bool else value
        spec = items
    return dataclasses.replace(base, simulated=True, **spec)


def simulated_device(*, bf16: bool, fp16: bool = True, bnb: bool = True) -> DeviceCapabilities:
    """A GPU-like device for tests: e.g. `simulated_device(bf16=False)` is a T4/V100."""
    return DeviceCapabilities("cuda", f"simulated (bf16={bf16}, fp16={fp16})", bf16=bf16, fp16=fp16,
                              bnb=bnb, simulated=True)
