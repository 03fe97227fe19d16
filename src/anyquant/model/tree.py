"""Module-tree helpers every layer above `model` shares: replace a submodule by name, the
device a model lives on, the logits of a forward whatever the output type."""

from __future__ import annotations

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
