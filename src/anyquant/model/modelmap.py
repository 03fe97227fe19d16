"""ModelMap: what the module tree holds, read from structure and tensor identity only.

Nothing here calls methods a model may lack (get_output_embeddings, tie_weights, ...):
custom architectures (F4) break tools that do. Tied parameters are found by identity.
"""

from __future__ import annotations

import re
import sys
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from anyquant.runtime.experts import QuantizedExperts
from anyquant.runtime.int4_linear import Int4Linear

LINEAR, CONV, EMBEDDING, NORM, OTHER = "linear", "conv", "embedding", "norm", "other"
VISION, PROJECTOR, LANGUAGE, HEAD = "vision tower", "projector", "language model", "head"

_VISION_HINTS = ("vision", "visual", "image_encoder", "vit", "patch_embed")
_PROJECTOR_HINTS = ("projector", "resampler", "mm_proj", "merger", "connector", "adapter")


def quantized_linear_types() -> tuple[type, ...]:
    """The quantized linear classes a model can hold now. bitsandbytes' classes count only once
    bitsandbytes is imported (no instance of them can exist before): importing it costs seconds
    that `inspect` and `plan` of a float model do not need to spend."""
    types: list[type] = [Int4Linear]
    bnb = sys.modules.get("bitsandbytes")
    if bnb is not None and hasattr(bnb, "nn"):
        types += [bnb.nn.Linear4bit, bnb.nn.Linear8bitLt]
    return tuple(types)


def conv1d_type() -> type | None:
    """transformers' `Conv1D` (GPT-2 family): a linear layer with a transposed weight
    [in_features, out_features], computing x @ weight + bias."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def linear_features(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of a linear-like module (nn.Linear, quantized linears,
    transformers' Conv1D), else None."""
    c1d = conv1d_type()
    if c1d is not None and isinstance(module, c1d):
        w = module.weight
        return int(w.shape[0]), int(w.shape[1])
    if isinstance(module, (nn.Linear, *quantized_linear_types())):
        return int(module.in_features), int(module.out_features)
    return None


def as_linear(module: nn.Module) -> nn.Linear:
    """An nn.Linear computing exactly what a Conv1D computes (weight transposed, same tensors'
    values, dtype and device); an nn.Linear is returned as it is."""
    c1d = conv1d_type()
    if c1d is None or not isinstance(module, c1d):
        return module
    w = module.weight.detach()
    lin = nn.Linear(w.shape[0], w.shape[1], bias=module.bias is not None, device="meta", dtype=w.dtype)
    lin.weight = nn.Parameter(w.t().contiguous(), requires_grad=module.weight.requires_grad)
    if module.bias is not None:
        lin.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=module.bias.requires_grad)
    return lin


def computes_linear(module: nn.Linear) -> bool:
    """Does this nn.Linear (or subclass) compute F.linear(x, weight, bias) and nothing else?

    A subclass may override forward with something else (Llama 4's router returns a tuple of
    scores and logits; others scale or clamp); replacing it by a quantized Linear would change
    what it returns. Such a subclass is tried once on a small random input, calling its own
    forward (no hooks); one that cannot be tried (meta or integer weights) counts as not linear."""
    if type(module).forward is nn.Linear.forward:
        return True
    w = module.weight
    if not isinstance(w, torch.Tensor) or w.device.type == "meta" or not w.is_floating_point():
        return False
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, module.in_features, generator=g).to(device=w.device, dtype=w.dtype)
    try:
        with torch.no_grad():
            y = type(module).forward(module, x)
            ref = F.linear(x, w, module.bias)
    except Exception:  # noqa: BLE001 — a forward that fails on a plain 2-D input is not a plain linear map
        return False
    if not isinstance(y, torch.Tensor) or y.shape != ref.shape or y.dtype != ref.dtype:
        return False
    tol = 1e-3 if w.dtype == torch.float32 else 2e-2
    return bool(torch.allclose(y.float(), ref.float(), rtol=tol, atol=tol * float(ref.abs().max().clamp_min(1))))


def module_kind(module: nn.Module) -> str:
    c1d = conv1d_type()
    if isinstance(module, quantized_linear_types()) or (c1d is not None and isinstance(module, c1d)):
        return LINEAR
    if isinstance(module, nn.Linear):
        return LINEAR if computes_linear(module) else OTHER
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
    # `_keep_in_fp32_modules` (and `_strict`) patterns the model's own code declares, prefixed
    # with the submodule that declares them; matched on whole dotted name components.
    keep_fp32: list[str] = field(default_factory=list)
    # Component roots found from config sub-configs and module structure ("" = whole model).
    component_roots: dict[str, str | None] = field(default_factory=dict)

    def keep_fp32_pattern(self, name: str) -> str | None:
        for p in self.keep_fp32:
            if re.search(r"(^|\.)" + re.escape(p) + r"($|\.)", name):
                return p
        return None

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
            "component_roots": self.component_roots,
            "keep_in_fp32_modules": self.keep_fp32,
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


def sub_config(config: Any, kinds: tuple[str, ...]) -> Any:
    """A sub-config whose attribute name contains one of `kinds` (vision_config, text_config, ...)."""
    if config is None:
        return None
    items = config.items() if isinstance(config, dict) else vars(config).items()
    for key, value in items:
        if any(k in key.lower() for k in kinds) and (
            isinstance(value, dict) or hasattr(value, "to_dict")
        ):
            return value
    return None


def cfg_get(cfg: Any, *keys: str) -> Any:
    for k in keys:
        v = cfg.get(k) if isinstance(cfg, dict) else getattr(cfg, k, None)
        if v:
            return v
    return None


def _within(name: str, root: str | None) -> bool:
    return root is not None and (root == "" or name == root or name.startswith(root + "."))


def _highest_ancestor_without(name: str, avoid: list[str]) -> str:
    """The highest ancestor of `name` (or itself) whose subtree contains none of `avoid`."""
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        cand = ".".join(parts[:i])
        if not any(_within(a, cand) for a in avoid):
            return cand
    return name


@dataclass
class _Components:
    vision_root: str | None = None
    language_root: str | None = ""
    text_hidden: int | None = None
    vision_hidden: int | None = None
    vocab: int | None = None
    repeated: tuple[str, ...] = ()  # names of nn.ModuleList containers (stacks of blocks)


def find_components(model: nn.Module, config: Any, vocab: int | None) -> _Components:
    """Vision tower, language model: from config sub-configs and module structure.

    The vision tower is the highest ancestor of the patch embedding (a convolution taking the
    vision config's image channels) that does not hold the token embedding; the language model
    is the highest ancestor of the token embedding (a 2-D weight with `vocab` rows, owned by a
    non-Linear module) that does not hold the vision tower. Module names serve as a hint only
    when the config names no vision sub-config."""
    vcfg = sub_config(config, ("vision", "visual"))
    tcfg = sub_config(config, ("text_config", "llm_config", "language_config")) or config
    comps = _Components(vocab=vocab)
    comps.text_hidden = cfg_get(tcfg, "hidden_size", "n_embd", "d_model", "embed_dim") if tcfg is not None else None
    named = list(model.named_modules())
    embeds = [
        n for n, m in named
        if n and linear_features(m) is None and vocab
        and isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2
        and m.weight.shape[0] == vocab
    ]
    if not embeds and vocab:  # a table with extra rows beyond the vocabulary (Molmo2's additional tokens)
        embeds = [n for n, m in named if n and isinstance(m, nn.Embedding) and m.num_embeddings > vocab]
    if len(embeds) > 1:
        # Another 2-D weight can have `vocab` rows (a vision position table of 256 patches in a
        # 256-token model): prefer one of the text width, then one outside a vision-named subtree.
        for keep in (lambda n: comps.text_hidden and model.get_submodule(n).weight.shape[1] == comps.text_hidden,
                     lambda n: not any(h in p for p in n.lower().split(".") for h in _VISION_HINTS)):
            embeds = [n for n in embeds if keep(n)] or embeds
    patch = None
    if vcfg is not None:
        comps.vision_hidden = cfg_get(vcfg, "hidden_size", "embed_dim", "width", "d_model")
        channels = cfg_get(vcfg, "num_channels", "in_channels", "in_chans") or 3
        patch = next(
            (n for n, m in named if isinstance(m, nn.modules.conv._ConvNd) and m.in_channels == channels),
            None,
        )
    if patch is None:  # hint: names only when structure says nothing
        patch = next(
            (n for n, _ in named if n and any(h in p for p in n.lower().split(".") for h in _VISION_HINTS)),
            None,
        )
    comps.repeated = tuple(n for n, m in named if n and isinstance(m, nn.ModuleList))
    if patch is not None:
        comps.vision_root = _highest_ancestor_without(patch, embeds)
    if embeds and comps.vision_root is not None:
        comps.language_root = _highest_ancestor_without(embeds[0], [comps.vision_root])
    return comps


def _component(name: str, module: nn.Module, kind: str, comps: _Components, tied_to_embedding: bool) -> str:
    parts = name.lower().split(".")
    projector_hint = any(h in p for p in parts for h in _PROJECTOR_HINTS)
    if _within(name, comps.vision_root):
        th, vh = comps.text_hidden, comps.vision_hidden
        # A projector inside the vision tower (GLM-4V's GLU): a Linear outside the stack of
        # vision blocks that reads or writes the language model's width.
        in_blocks = any(_within(name, r) and name != r for r in comps.repeated)
        touches_text = kind == LINEAR and not in_blocks and th and vh and th != vh and th in (
            linear_features(module) or ())
        return PROJECTOR if (touches_text or projector_hint) else VISION
    # A Linear inside a stack of blocks is never the head, even when its width happens to equal
    # the vocabulary size (a tiny Llama with intermediate_size == vocab_size).
    in_stack = any(_within(name, r) and name != r for r in comps.repeated)
    if kind == LINEAR and not in_stack and (
            tied_to_embedding or (comps.vocab and (linear_features(module) or (0, 0))[1] == comps.vocab)):
        return HEAD
    if comps.vision_root is not None and not _within(name, comps.language_root):
        # Outside the vision tower and the embedding's subtree: a projector/resampler, unless it
        # sits in a sibling subtree that holds a stack of blocks (ChatGLM keeps `embedding`,
        # `encoder` and `vision` side by side under `transformer`).
        parent = comps.language_root.rpartition(".")[0] if comps.language_root else ""
        rest = name[len(parent) + 1:] if parent else name
        top = (parent + "." if parent else "") + rest.split(".")[0]
        if not any(_within(r, top) for r in comps.repeated):
            return PROJECTOR
        return LANGUAGE
    if projector_hint:
        return PROJECTOR
    return LANGUAGE


KEEP_FP32 = "_keep_in_fp32_modules"  # transformers applies it under float16 only
KEEP_FP32_STRICT = "_keep_in_fp32_modules_strict"  # under float16 and bfloat16


def keep_fp32_attrs(dtype: torch.dtype) -> tuple[str, ...]:
    """The declarations transformers honours when a model is loaded in `dtype` (strict first)."""
    return (KEEP_FP32_STRICT, KEEP_FP32) if dtype == torch.float16 else (KEEP_FP32_STRICT,)


def keep_fp32_declarations(model: nn.Module, attrs: tuple[str, ...] = (KEEP_FP32, KEEP_FP32_STRICT)
                           ) -> list[tuple[str, str, str]]:
    """The one reader of `_keep_in_fp32_modules(_strict)`: (declaring module, pattern, attribute)
    for every module that declares them, in `attrs` order. A submodule's declarations (a VLM's
    language model) are relative to that submodule, hence the declaring module's name."""
    out: list[tuple[str, str, str]] = []
    for prefix, mod in model.named_modules():
        for attr in attrs:
            for pat in sorted(getattr(mod, attr, None) or []):
                if (prefix, pat, attr) not in out:
                    out.append((prefix, pat, attr))
    return out


def _keep_fp32_patterns(model: nn.Module) -> list[str]:
    """Declared patterns as full dotted names, whatever the dtype: the plan keeps these in float."""
    out: list[str] = []
    for prefix, pat, _ in keep_fp32_declarations(model):
        full = f"{prefix}.{pat}" if prefix else pat
        if full not in out:
            out.append(full)
    return out


def declared_fp32_modules(model: nn.Module, dtype: torch.dtype) -> dict[str, str]:
    """The outermost modules the model's code declares float32 when computing in `dtype`, with
    transformers' semantics (see keep_fp32_attrs): {module: reason}. A pattern matches whole
    name components below its declaring module."""
    decls = keep_fp32_declarations(model, keep_fp32_attrs(dtype))
    found: dict[str, str] = {}
    for name, _ in model.named_modules():
        parts = name.split(".")
        if not name or any(".".join(parts[:i]) in found for i in range(len(parts))):
            continue
        for prefix, pat, attr in decls:
            rel = name[len(prefix) + 1:] if prefix and name.startswith(prefix + ".") else (name if not prefix else None)
            if rel is not None and f".{pat}." in f".{rel}.":
                found[name] = f"declared by the model ({attr}: {pat!r})"
                break
    return found


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

    comps = find_components(model, config, vocab)
    modules: dict[str, ModuleInfo] = {}
    quantized_tensors: list[str] = []
    qtypes = quantized_linear_types()
    for name, mod in model.named_modules():
        if not name:
            continue
        if isinstance(mod, QuantizedExperts):  # quantized fused MoE experts (F5): buffers, no parameters
            packed = getattr(mod, "weight_packed", None)
            if packed is None:
                packed = mod.weight
            quantized_tensors.append(f"{name}.{'weight_packed' if hasattr(mod, 'weight_packed') else 'weight'} "
                                     f"({str(packed.dtype).replace('torch.', '')})")
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
        feats = linear_features(mod) or (getattr(mod, "in_features", None), getattr(mod, "out_features", None))
        modules[name] = ModuleInfo(
            name=name,
            kind=kind,
            component=_component(name, mod, kind, comps, tied_emb),
            type=type(mod).__name__,
            params=sum(p.numel() for _, p in mod.named_parameters(recurse=False)),
            dtypes=sorted({str(p.dtype).replace("torch.", "") for _, p in own}),
            in_features=feats[0],
            out_features=feats[1],
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
        keep_fp32=_keep_fp32_patterns(model),
        component_roots={VISION: comps.vision_root, LANGUAGE: comps.language_root},
    )
