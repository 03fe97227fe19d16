"""int4 outputs (int4, hqq, awq, gptq) in compressed-tensors' pack-quantized format: read by
vLLM and transformers; anyquant rebuilds them with its own Int4Linear."""

from __future__ import annotations

import logging
import re
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from anyquant.errors import AnyquantError
from anyquant.formats import direct
from anyquant.formats.experts import (
    install_expert_shells,
    load_per_expert_layout,
    per_expert_decisions,
)
from anyquant.formats.hf import (
    checkpoint_key_renamer,
    from_pretrained_float,
    meta_skeleton,
)
from anyquant.formats.registry import Format, register_format
from anyquant.model.modelmap import LINEAR, linear_features
from anyquant.model.tree import set_submodule
from anyquant.numerics.dtype import DTYPES
from anyquant.planning.plan import Plan
from anyquant.runtime import kernels
from anyquant.runtime.experts import unfuse_for_loader
from anyquant.runtime.fuse import fuse_projections
from anyquant.runtime.int4_linear import Int4Linear

log = logging.getLogger(__name__)


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


def load_int4(directory: Path, manifest: dict[str, Any], trust_remote_code: bool, *,
              device: str | torch.device | None = None, device_map: str | dict | None = None,
              fuse: bool = False) -> nn.Module:
    """The int4 output at `directory` on `device` (default CPU) or spread by `device_map`
    ("auto": the GPUs present, then the CPU; or accelerate's {module prefix: device}).

    The model is built on the meta device and the checkpoint's tensors are read straight to
    their devices (`load_int4_direct`); the float weights of quantized layers never exist. Where
    that cannot map the checkpoint (a model whose transformers conversions merge tensors at
    load), transformers builds the float model and the modules are swapped (`load_int4_float`),
    then moved. Then q/k/v and gate/up are fused (`fuse`, runtime.fuse) and, on a GPU, each
    Int4Linear's batch-1 kernel is chosen and its layout built (runtime.kernels.prepare_model)."""
    t0 = time.perf_counter()
    config, plan = _config_and_plan(directory, manifest, trust_remote_code)
    model = load_int4_direct(directory, config, plan, trust_remote_code, device, device_map)
    if model is None:
        model = load_int4_float(directory, manifest, trust_remote_code)
        target = torch.device(device or "cpu") if device_map is None else None
        if target is not None:
            model.to(target)
        else:
            dm = direct.auto_device_map(model) if device_map == "auto" else device_map
            if isinstance(dm, str):
                model.to(torch.device(dm))
            else:
                from transformers.integrations.accelerate import dispatch_model

                dispatch_model(model, device_map=dm)
    if fuse:
        fuse_projections(model)
    kernels.prepare_model(model, DTYPES[plan.compute_dtype])
    model.anyquant_load_s = round(time.perf_counter() - t0, 3)
    return model.eval()


def _config_and_plan(directory: Path, manifest: dict[str, Any], trust_remote_code: bool):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config, Plan.from_dict(manifest["plan"])


def install_int4_shells(model: nn.Module, plan: Plan, directory: Path, dtype: torch.dtype,
                        device=None) -> list:
    """Every planned module of `model` replaced by an empty Int4Linear of its shape; returns the
    planned decisions."""
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
                       getattr(mod, "bias", None) is not None, symmetric, dtype, device=device)
        set_submodule(model, d.name, q)
    # fused MoE experts (3-D parameters): their QuantizedExperts under the same attribute name
    return todo + install_expert_shells(model, plan, dtype, directory, device=device)


def load_int4_direct(directory: Path, config, plan: Plan, trust_remote_code: bool,
                     device=None, device_map=None) -> nn.Module | None:
    """Meta skeleton + Int4Linear on meta + every tensor read to its device; None (nothing
    loaded) where the checkpoint's keys do not map one to one onto the model's."""
    dtype = DTYPES[plan.compute_dtype]
    model = meta_skeleton(config, dtype, trust_remote_code)
    if model is None:
        return None
    unfuse_for_loader(model, "compressed-tensors", copy_weights=False)  # as quantize did (pipeline.py)
    install_int4_shells(model, plan, directory, dtype, device="meta")
    # Checkpoint key -> model name, through transformers' renamings; any converter (merging or
    # splitting tensors at load) sends the load through transformers instead.
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
    except ImportError:   # a transformers without load-time conversions: its loader does the mapping
        return None

    conversions = get_model_conversion_mapping(model)
    renamings = [t for t in conversions if isinstance(t, WeightRenaming)]
    if len(renamings) != len(conversions):
        log.info("%s: transformers converts this model's tensors at load; loading through transformers", directory)
        return None
    state_names = {n: t for n, t in model.state_dict(keep_vars=True).items()}
    meta_dict = dict.fromkeys(state_names, True)
    prefix = getattr(model, "base_model_prefix", None) or None
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise AnyquantError(f"{directory}: no *.safetensors files")
    mapping: dict[Path, dict[str, str]] = {}
    for f in files:
        header, _ = direct.read_header(f)
        for key in header:
            name = key if key in state_names else rename_source_key(key, renamings, [], prefix, meta_dict)[0]
            if name not in state_names:
                log.info("%s: checkpoint tensor %s has no place in the meta model; loading through transformers",
                         directory, key)
                return None
            mapping.setdefault(f, {})[key] = name
    if device_map is None or isinstance(device_map, (str, torch.device)) and device_map != "auto":
        target = torch.device(device_map if device_map is not None else (device or "cpu"))
        if target.type == "cuda" and target.index is None:
            target = torch.device("cuda", torch.cuda.current_device())
        dmap = {"": target}
    else:
        dmap = direct.auto_device_map(model) if device_map == "auto" else dict(device_map)
    ties = direct.tied_groups(model)
    loaded: set[str] = set()

    def sink(name, t):
        direct.assign(model, name, t)
        loaded.add(name)

    for f, keys in mapping.items():
        wanted = {k: (n, direct.device_of(n, dmap), state_names[n].dtype) for k, n in keys.items()}
        direct.read_tensors(f, wanted, sink)
    for group in ties:
        have = [n for n in group if n in loaded]
        if have:
            src = model.get_parameter(have[0])
            for n in group:
                if n not in loaded:
                    direct.tie(model, n, src)   # the same Parameter object again
                    loaded.add(n)
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if still_meta:
        raise AnyquantError(f"{directory}: checkpoint lacks tensors: {still_meta[:5]}")
    # buffers built at construction (CPU) go to their module's device
    for n, b in list(model.named_buffers()):
        dev = direct.device_of(n, dmap)
        if b.device != dev:
            direct.assign(model, n, b.to(dev))
    model._weight_conversions = conversions
    _generation_config(model, directory)
    model.config._name_or_path = str(directory)
    if len(dmap) > 1 or "" not in dmap:
        direct.dispatch(model, dmap)
    return model.eval()


def _generation_config(model: nn.Module, directory: Path) -> None:
    from transformers import GenerationConfig

    if (directory / "generation_config.json").is_file() and hasattr(model, "generation_config"):
        model.generation_config = GenerationConfig.from_pretrained(directory)


def load_int4_float(directory: Path, manifest: dict[str, Any], trust_remote_code: bool) -> nn.Module:
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
    unfused = unfuse_for_loader(model, "compressed-tensors", copy_weights=False)  # as quantize did
    todo = install_int4_shells(model, plan, directory, dtype)
    split = {d.name for d in per_expert_decisions(plan)}  # experts saved one Linear per expert
    wanted = {f"{d.name}.{k}" for d in todo if d.name not in split for k in model.get_submodule(d.name).state_dict()}
    rename = checkpoint_key_renamer(model)
    found: dict[str, torch.Tensor] = {}
    placed: set[str] = set()  # what transformers called these keys (its report renames them)
    placed |= {k for key in load_per_expert_layout(model, directory, plan) for k in (key, rename(key))}
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
    replaced = {f"{d.name}.{p}" for d in todo for p in ("weight", "bias")} | {d.name for d in todo}
    # the fused experts transformers looked for, whose per-expert Linears were read instead
    replaced |= {k for k in info.get("missing_keys", ()) if any(k.startswith(f"{u}.") for u in unfused)}
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

    def load(self, directory: Path, manifest: dict[str, Any], trust_remote_code: bool, *,
             device=None, device_map=None, fuse: bool = False) -> nn.Module:
        return load_int4(directory, manifest, trust_remote_code, device=device, device_map=device_map, fuse=fuse)


register_format(CompressedTensorsFormat())
