"""quantization_config entries that stock transformers (bitsandbytes) and compressed-tensors read."""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

import torch

from anyquant.model.modelmap import LINEAR
from anyquant.planning import Plan


def _kept_linears(plan: Plan) -> list[str]:
    return [d.name for d in plan.kept() if d.kind == LINEAR]


def bnb_quantization_config(plan: Plan, compute_dtype: torch.dtype) -> dict[str, Any]:
    from transformers import BitsAndBytesConfig

    cfg = plan.config
    # transformers skips a module when a skip entry equals its full name or its last name
    # component, or the name ends with "." + entry; full names are therefore exact.
    skip = _kept_linears(plan)
    if plan.method == "int8":
        bnb = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=cfg["threshold"],
                                 llm_int8_skip_modules=skip)
    else:
        bnb = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=plan.method,
            bnb_4bit_use_double_quant=cfg["double_quant"], bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_quant_storage=torch.uint8, llm_int8_skip_modules=skip,
        )
    d = bnb.to_dict()
    return d


def compressed_tensors_config(plan: Plan) -> dict[str, Any]:
    from compressed_tensors.quantization import QuantizationConfig

    by_group: dict[int, list[str]] = defaultdict(list)
    for d in plan.to_quantize():
        by_group[int(d.options.get("group_size", plan.config["group_size"]))].append(d.name)
    groups = {}
    for i, (g, names) in enumerate(sorted(by_group.items(), reverse=True)):
        groups[f"group_{i}"] = {
            # Anchored regexes: compressed-tensors treats a bare string as a class name or a
            # full-name match depending on version; "re:^...$" means the same everywhere.
            "targets": ["re:^" + re.escape(n) + "$" for n in names],
            "weights": {
                "num_bits": 4, "type": "int", "symmetric": bool(plan.config.get("symmetric", False)),
                "strategy": "group", "group_size": g, "dynamic": False, "observer": "minmax",
            },
            "input_activations": None,
            "output_activations": None,
        }
    qc = QuantizationConfig(
        config_groups=groups, format="pack-quantized", quantization_status="compressed",
        ignore=_kept_linears(plan),
    )
    d = qc.model_dump(exclude_none=False)
    d["quant_method"] = "compressed-tensors"
    if not plan.config.get("symmetric", False):
        # transformers (5.x with compressed-tensors 0.20) cannot load packed asymmetric zero
        # points into its compressed modules (llm-compressor#1618: size mismatch); asking it to
        # dequantize at load gives the exact same weights. vLLM ignores this key.
        d["dequantize"] = True
    return d
