"""ModelMap: what the module tree holds, read from structure and tensor identity only.

Nothing here calls methods a model may lack (get_output_embeddings, tie_weights, ...):
custom architectures (F4) break tools that do. Tied parameters are found by identity.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

LINEAR, CONV, EMBEDDING, NORM, OTHER = "linear", "conv", "embedding", "norm", "other"
VISION, PROJECTOR, LANGUAGE, HEAD = "vision tower", "projector", "language model", "head"

_VISION_HINTS = ("vision", "visual", "image_encoder", "vit", "patch_embed")
_PROJECTOR_HINTS = ("projector", "resampler", "mm_proj", "merger", "connector", "adapter")


def quantized_linear_types() -> tuple[type, ...]:
    from anyquant.runtime.int4_linear import Int4Linear

    types: list[type] = [Int4Linear]
    try:
        import bitsandbytes as bnb

        types += [bnb.nn.Linear4bit, bnb.nn.Linear8bitLt]
    except ImportError:  # bitsandbytes is a dependency, but inspect must work without it
        pass
    return tuple(types)


def module_kind(module: nn.Module) -> str:
    if isinstance(module, (nn.Linear, *quantized_linear_types())):
        return LINEAR
    if isinstance(module, nn.modules.conv._ConvNd):
        return CONV
    if isinstance(module, nn.Embedding):
        return EMBEDDING
    name = type(module).__name__.lower()
    if "norm" in name:
        return NORM
    return OTHER


@dataclass
class ModuleInfo:
    name: str
    kind: str
    component: str
    type: str
    params: int
    dtypes: list[str]
    in_features: int | None = None
    out_features: int | None = None
    quantized: bool = False
    tied_with: list[str] = field(default_factory=list)


@dataclass
class ModelMap:
    model_type: str
    modules: dict[str, ModuleInfo]
    tied: list[list[str]]
    quantized_tensors: list[str]
    total_params: int
    vocab_size: int | None

    def linears(self) -> list[ModuleInfo]:
        return [m for m in self.modules.values() if m.kind == LINEAR]

    def summary(self) -> dict[str, Any]:
        comps: dict[str, Counter] = defaultdict(Counter)
        params: Counter = Counter()
        for m in self.modules.values():
            comps[m.component][m.kind] += 1
            params[m.component] += m.params
        return {
            "model_type": self.model_type,
            "total_params": self.total_params,
            "components": {
                c: {"modules": dict(k), "params": params[c]} for c, k in sorted(comps.items())
            },
            "tied": self.tied,
            "quantized_tensors": self.quantized_tensors,
        }

    def to_dict(self) -> dict[str, Any]:
        d = self.summary()
        d["modules"] = [asdict(m) for m in self.modules.values()]
        return d


def _text_vocab_size(config: Any) -> int | None:
    for cfg in (config, getattr(config, "text_config", None), getattr(config, "llm_config", None)):
        v = getattr(cfg, "vocab_size", None) if cfg is not None else None
        if v:
            return int(v)
    return None


def _component(name: str, module: nn.Module, kind: str, vocab: int | None, tied_to_embedding: bool) -> str:
    lname = name.lower()
    parts = lname.split(".")
    if any(h in p for p in parts for h in _PROJECTOR_HINTS):
        return PROJECTOR
    if any(h in p for p in parts for h in _VISION_HINTS):
        return VISION
    if kind == LINEAR and (tied_to_embedding or (vocab and getattr(module, "out_features", None) == vocab)):
        return HEAD
    return LANGUAGE


def own_parameters(module: nn.Module):
    return list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))


def build_model_map(model: nn.Module) -> ModelMap:
    config = getattr(model, "config", None)
    vocab = _text_vocab_size(config) if config is not None else None

    owners: dict[int, list[str]] = defaultdict(list)
    for mname, mod in model.named_modules(remove_duplicate=False):
        for pname, p in mod.named_parameters(recurse=False):
            owners[id(p)].append(f"{mname}.{pname}" if mname else pname)
    tied = [sorted(v) for v in owners.values() if len(v) > 1]
    tied_names = {n: group for group in tied for n in group}
    embedding_weight_ids = {
        id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)
    }

    modules: dict[str, ModuleInfo] = {}
    quantized_tensors: list[str] = []
    qtypes = quantized_linear_types()
    for name, mod in model.named_modules():
        if not name:
            continue
        kind = module_kind(mod)
        own = own_parameters(mod)
        if kind == OTHER and not own:
            continue
        weight = getattr(mod, "weight", None)
        tied_emb = (
            kind == LINEAR and isinstance(weight, torch.Tensor) and id(weight) in embedding_weight_ids
        )
        is_q = isinstance(mod, qtypes)
        for pname, p in own:
            full = f"{name}.{pname}"
            if is_q or (pname == "weight" and kind in (LINEAR, CONV, EMBEDDING) and not p.is_floating_point()):
                if pname in ("weight", "weight_packed"):
                    quantized_tensors.append(f"{full} ({str(p.dtype).replace('torch.', '')})")
        modules[name] = ModuleInfo(
            name=name,
            kind=kind,
            component=_component(name, mod, kind, vocab, tied_emb),
            type=type(mod).__name__,
            params=sum(p.numel() for _, p in mod.named_parameters(recurse=False)),
            dtypes=sorted({str(p.dtype).replace("torch.", "") for _, p in own}),
            in_features=getattr(mod, "in_features", None),
            out_features=getattr(mod, "out_features", None),
            quantized=is_q,
            tied_with=[t for t in tied_names.get(f"{name}.weight", []) if t != f"{name}.weight"],
        )
    # Embeddings share the component of what reads them most: the head's tied partner stays "embedding".
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return ModelMap(
        model_type=str(getattr(config, "model_type", type(model).__name__)),
        modules=modules,
        tied=tied,
        quantized_tensors=quantized_tensors,
        total_params=total,
        vocab_size=vocab,
    )
