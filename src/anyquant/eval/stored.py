"""What a saved output actually stores: bytes per component and bits per quantized weight,
from the safetensors headers (no tensor is read)."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from anyquant.errors import AnyquantError
from anyquant.formats.experts import bnb_stored_name
from anyquant.planning.plan import FUSED_EXPERTS


def _module_of(tensor_name: str, module_names: set[str]) -> str | None:
    parts = tensor_name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in module_names:
            return prefix
    return None


def _expert_of(tensor_name: str, patterns: list[tuple[re.Pattern, str]]) -> str | None:
    module = tensor_name.rpartition(".")[0]
    return next((name for p, name in patterns if p.fullmatch(module)), None)


def stored_sizes(directory: str | Path, plan_dict: dict[str, Any]) -> dict[str, Any]:
    """Bytes per component and bits per quantized weight, read from the saved safetensors headers.

    Counts every byte a quantized layer stores (codes, scales, zero points, quantization state),
    divided by the number of weights it replaces: the honest bits-per-weight."""
    from safetensors import safe_open

    directory = Path(directory)
    decisions = {d["name"]: d for d in plan_dict["decisions"]}
    names = set(decisions)
    # int4 MoE experts saved one Linear per expert: their checkpoint names (plan options)
    expert_names = [(re.compile(p), d["name"]) for d in plan_dict["decisions"]
                    for p in (d.get("options") or {}).get("checkpoint_names", [])]
    # bitsandbytes outputs store experts named `weight` under another name (formats/experts.py)
    expert_names += [(re.compile(re.escape(bnb_stored_name(d["name"]))), d["name"]) for d in plan_dict["decisions"]
                     if d["kind"] == FUSED_EXPERTS and d["name"].endswith(".weight")]
    by_component: dict[str, int] = defaultdict(int)
    q_bytes = 0
    q_weights = 0
    shapes_seen: set[str] = set()
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                sl = st.get_slice(key)
                shape = sl.get_shape()
                numel = 1
                for s in shape:
                    numel *= s
                nbytes = numel * DTYPE_BYTES.get(sl.get_dtype(), 4)
                mod = _expert_of(key, expert_names) or _module_of(key, names)
                d = decisions.get(mod) if mod else None
                if d is None:
                    comp = "other"
                elif d["action"] == "quantize":
                    comp = f"{d['component']} (quantized)"
                    q_bytes += nbytes
                    if mod not in shapes_seen:
                        shapes_seen.add(mod)
                else:
                    comp = "embeddings" if d["kind"] == "embedding" else f"{d['component']} (float)"
                by_component[comp] += nbytes
    for mod in shapes_seen:
        q_weights += _weight_count(decisions[mod])
    return {
        "bytes_by_component": dict(by_component),
        "total_bytes": sum(by_component.values()),
        "bits_per_weight": (8 * q_bytes / q_weights) if q_weights else None,
        "quantized_bytes": q_bytes,
        "quantized_weights": q_weights,
    }


def _weight_count(decision: dict[str, Any]) -> int:
    shape = decision.get("shape")
    if shape:  # [out, in] for a Linear, [experts, out, in] for fused MoE experts
        n = 1
        for s in shape:
            n *= int(s)
        return n
    raise AnyquantError(f"plan entry {decision['name']} lacks its shape; re-save with this anyquant version")


DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
