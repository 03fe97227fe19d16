"""int4 outputs (int4, hqq, awq, gptq) in compressed-tensors' pack-quantized format: read by
vLLM and transformers; anyquant rebuilds them with its own Int4Linear."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from anyquant.errors import AnyquantError
from anyquant.formats.hf import checkpoint_key_renamer, from_pretrained_float
from anyquant.formats.registry import Format, register_format
from anyquant.model.modelmap import LINEAR, linear_features
from anyquant.model.tree import set_submodule
from anyquant.numerics.dtype import DTYPES
from anyquant.planning.plan import Plan
from anyquant.runtime.int4_linear import Int4Linear


def _kept_linears(plan: Plan) -> list[str]:
    return [d.name for d in plan.kept() if d.kind == LINEAR]


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


def load_int4(directory: Path, manifest: dict[str, Any], trust_remote_code: bool) -> nn.Module:
    """transformers loads the float tensors (with the weight conversions it applies at load: fused
    MoE experts, renamed legacy keys, ...), then each planned module becomes an Int4Linear filled
    from the checkpoint's packed tensors, whose keys go through the same renamings."""
    from safetensors import safe_open
    from transformers import AutoConfig


    config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plan = Plan.from_dict(manifest["plan"])
    dtype = DTYPES[plan.compute_dtype]
    model, info = from_pretrained_float(directory, config, dtype, trust_remote_code)
    symmetric = bool(plan.config.get("symmetric", False))
    todo = plan.to_quantize()
    for d in todo:
        try:
            mod = model.get_submodule(d.name)
        except AttributeError as e:
            raise AnyquantError(f"{directory}: the plan quantizes {d.name}, which the rebuilt model lacks") from e
        feats = linear_features(mod)
        if feats is None:
            raise AnyquantError(f"{directory}: the plan quantizes {d.name}, but the rebuilt model has a "
                                f"{type(mod).__name__} there, not a linear layer")
        in_f, out_f = feats
        q = Int4Linear(in_f, out_f, int(d.options.get("group_size", plan.config["group_size"])),
                       getattr(mod, "bias", None) is not None, symmetric, dtype)
        set_submodule(model, d.name, q)
    wanted = {f"{d.name}.{k}" for d in todo for k, _ in
              list(model.get_submodule(d.name).named_buffers(recurse=False))
              + list(model.get_submodule(d.name).named_parameters(recurse=False))}
    rename = checkpoint_key_renamer(model)
    found: dict[str, torch.Tensor] = {}
    placed: set[str] = set()  # what transformers called these keys (its report renames them)
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():
                name = key if key in wanted else rename(key)
                if name in wanted:
                    found[name] = sf.get_tensor(key)
                    placed.update((key, rename(key)))
    lacking = sorted(wanted - set(found))
    if lacking:
        raise AnyquantError(f"{directory}: checkpoint lacks the int4 tensors {lacking[:5]}")
    # What transformers could not place: only the int4 tensors (placed above) may be left over,
    # and only the planned modules' float weights may be missing.
    replaced = {f"{d.name}.{p}" for d in todo for p in ("weight", "bias")}
    unexpected = sorted(k for k in info.get("unexpected_keys", ()) if k not in wanted and k not in placed)
    if unexpected:
        raise AnyquantError(f"{directory}: checkpoint tensors the model has no place for: {unexpected[:5]}")
    missing = sorted(k for k in info.get("missing_keys", ()) if k not in replaced)
    if missing:
        raise AnyquantError(f"{directory}: checkpoint lacks tensors: {missing[:5]}")
    state = model.state_dict()
    for name, t in found.items():
        if state[name].shape != t.shape:
            raise AnyquantError(f"{directory}: {name} has shape {tuple(t.shape)} in the checkpoint, "
                                f"{tuple(state[name].shape)} in the model")
        state[name].copy_(t.to(state[name].dtype))
    return model.eval()


class CompressedTensorsFormat(Format):
    name = "compressed-tensors"

    def quantization_config(self, model: nn.Module, plan: Plan, compute_dtype: torch.dtype) -> dict[str, Any]:
        return compressed_tensors_config(plan)

    def load(self, directory: Path, manifest: dict[str, Any], trust_remote_code: bool) -> nn.Module:
        return load_int4(directory, manifest, trust_remote_code)


register_format(CompressedTensorsFormat())
