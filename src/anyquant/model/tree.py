"""Module-tree helpers every layer above `model` shares: replace a submodule by name, the
device a model lives on, the logits of a forward whatever the output type."""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def device_of(model: nn.Module) -> torch.device:
    """The device of the first materialised parameter (meta parameters are skipped); CPU if none.
    A model whose weights are read on demand (formats/lazy.py) names its compute device in
    `anyquant_device`."""
    dev = getattr(model, "anyquant_device", None)
    if dev is not None:
        return torch.device(dev)
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def logits_of(output: Any) -> torch.Tensor:
    """`.logits` of a model output, else its first element; a base model's hidden states."""
    logits = output.logits if hasattr(output, "logits") else (
        output[0] if isinstance(output, (tuple, list)) else output)
    if hasattr(logits, "last_hidden_state"):
        logits = logits.last_hidden_state
    return logits


@torch.no_grad()
def probe_logits(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """The model's output on `inputs` as float32 logits."""
    return logits_of(model(**inputs)).float()


def fused_expert_tensors(model: nn.Module) -> dict[str, int]:
    """Floating parameters of 3 or more dimensions outside convolutions and embeddings, in a
    module holding no Linear layer: MoE experts that transformers keeps fused as [experts, out,
    in] tensors (Mixtral's and Qwen3-MoE's `mlp.experts.gate_up_proj` / `down_proj`, Jamba's),
    not nn.Linear layers. Returns {parameter name: number of elements}.

    Only modules that say they hold experts (class or path naming "expert", as transformers'
    experts classes all do: MixtralExperts, JetMoeParallelExperts, ...): other 3-D parameters
    (class and position embeddings, XLNet's relative attention q/k/v) are not experts."""
    out: dict[str, int] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.modules.conv._ConvNd, nn.Embedding)):
            continue
        if "expert" not in type(mod).__name__.lower() and "expert" not in name.lower():
            continue
        params = [(n, p) for n, p in mod.named_parameters(recurse=False) if p.dim() >= 3 and p.is_floating_point()]
        if params and not any(isinstance(c, nn.Linear) for c in mod.modules()):
            for n, p in params:
                out[f"{name}.{n}" if name else n] = p.numel()
    return out


def not_reloadable(model: nn.Module, names: list[str], suffixes: list[str]) -> dict[str, str]:
    """Linear layers `names` whose quantized tensors (`{name}.{suffix}` for each of `suffixes`,
    the format's state-dict keys) transformers would not load back into the same module: module
    name -> why. Two ways, both found from transformers' own conversion mapping of the type:
    - a WeightConverter (an operation on the tensor, not a rename) reads the weight under its
      own name at load (Inkling2 pads `lm_head.weight` to the vocabulary size): the packed
      weight is converted, its quantization state is not;
    - save_pretrained's reverse renaming then the load renaming send a key elsewhere (Inkling2:
      `sconv.weight_proj` is a bare tensor in its checkpoints, renamed `sconv.weight_proj.weight`
      at load, so LLM.int8's module-level `sconv.weight_proj.SCB` comes back as
      `sconv.weight_proj.weight.SCB`)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            rename_source_key,
            revert_weight_conversion,
        )
    except ImportError:  # a transformers without load-time conversions
        return {}
    try:
        mapping = get_model_conversion_mapping(model)
    except Exception:  # noqa: BLE001 — not a transformers model: nothing is converted at its load
        return {}
    converters = [re.compile(p) for t in mapping if isinstance(t, WeightConverter)
                  for p in t.source_patterns if isinstance(p, str)]
    renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
    if not converters and not renamings:
        return {}
    prefix = getattr(model, "base_model_prefix", None) or None
    known = dict.fromkeys(model.state_dict().keys(), True)
    out: dict[str, str] = {}
    for name in names:
        if any(p.search(f"{name}.weight") for p in converters):
            out[name] = (f"transformers converts {name}.weight when it loads this model type (a WeightConverter, "
                         "not a rename): a quantized weight would lose its quantization state")
            continue
        keys = [f"{name}.{s}" for s in suffixes]
        known.update(dict.fromkeys(keys, True))
        try:
            reverted = list(revert_weight_conversion(model, {k: torch.empty(1, device="meta") for k in keys}))
        except Exception:  # noqa: BLE001 — a reverse conversion that cannot run on it: not a plain rename
            reverted = []
        back = [rename_source_key(k, renamings, [], prefix, known)[0] for k in reverted]
        if sorted(back) != sorted(keys):
            lost = next((f"{k} -> {b}" for k, b in zip(reverted, back) if b not in keys), "its tensors")
            out[name] = (f"transformers' renaming of this model type does not bring its saved tensors back "
                         f"({lost}): the quantized module would load without its state")
    return out


def converted_at_load(model: nn.Module) -> set[str]:
    """Linear layers whose weight, under its own name, transformers passes through a
    WeightConverter when it loads this model type (an operation on the tensor, not a rename:
    Inkling2 pads `lm_head.weight` to the vocabulary size). Its bitsandbytes loader converts the
    packed 4-/8-bit weight but not its quantization state, so such a layer cannot be saved
    quantized in that format, in either layout. (Converters whose source is another name, e.g.
    one fused checkpoint tensor split into q/k/v, do not match the saved-as-loaded names.)"""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter
    except ImportError:  # a transformers without load-time conversions
        return set()
    try:
        converters = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightConverter)]
    except Exception:  # noqa: BLE001 — not a transformers model: nothing is converted at its load
        return set()
    patterns = [re.compile(p) for t in converters for p in t.source_patterns if isinstance(p, str)]
    return {name for name, mod in model.named_modules()
            if isinstance(mod, nn.Linear) and any(p.search(f"{name}.weight") for p in patterns)}
