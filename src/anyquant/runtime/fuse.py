"""Fuse projections that read the same input into one matrix, at load time (runtime only).

    from anyquant.runtime.fuse import fuse_projections
    fuse_projections(model)     # q/k/v -> qkv_proj, gate/up -> gate_up_proj, in place

For Llama-like modules (Llama, Mistral, Qwen2/3, Gemma, ...): an attention module with
`q_proj`, `k_proj`, `v_proj` and an MLP with `gate_proj`, `up_proj` call those Linears on one
input, the module's first forward argument. Each such group becomes one Linear of the summed
out_features (an `Int4Linear` built from the concatenated codes, scales, zero points and biases,
or an `nn.Linear` with the concatenated weight), which is one kernel launch instead of three or
two: at batch 1 the small k/v matrices cost a launch's fixed time each (docs/runtime.md).

How the module's own forward is kept: the parent's class is swapped for a subclass whose forward
runs the fused Linear on the input first, then calls the original forward; the original
children are replaced by `FusedSlice` modules that return their slice of that output. A
`FusedSlice` called on any other tensor (a forward that feeds them something else) computes
`fused(x)[..., slice]` itself, so the result is right either way, only slower. Outputs equal
the unfused model's up to the matmul's summation order (tests/test_runtime_fuse.py).

The fused model's state dict has `qkv_proj.*` / `gate_up_proj.*` instead of the separate
Linears: fuse after loading, and save the unfused model.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from anyquant import primitives as P
from anyquant.runtime.int4_linear import Int4Linear

DEFAULT_GROUPS = (
    (("q_proj", "k_proj", "v_proj"), "qkv_proj"),
    (("gate_proj", "up_proj"), "gate_up_proj"),
)


class _Slot:
    """The fused output of one forward call of the parent (set and cleared around it)."""

    def __init__(self) -> None:
        self.x = None
        self.parts = None


class FusedSlice(nn.Module):
    """Stands where one of the fused Linears was; returns its part of the fused output."""

    def __init__(self, parent_name: str, index: int, start: int, end: int, in_features: int) -> None:
        super().__init__()
        self.parent_name, self.index, self.start, self.end = parent_name, index, start, end
        self.in_features, self.out_features = in_features, end - start
        self._fused = None   # set by fuse_projections: [fused_module, slot], kept out of the module tree

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused, slot = self._fused
        if slot.x is x:
            return slot.parts[self.index]
        return fused(x)[..., self.start:self.end]

    def extra_repr(self) -> str:
        return f"{self.parent_name}[..., {self.start}:{self.end}]"


def fuse_int4(mods: list[Int4Linear]) -> Int4Linear:
    """One Int4Linear computing the concatenation of `mods`' outputs (same in_features, group
    size, symmetry, scale dtype, bias presence and device: see `fuse_projections`)."""
    first = mods[0]
    dtype = first.bias.dtype if first.bias is not None else (
        torch.bfloat16 if first.weight_scale.dtype == torch.bfloat16 else torch.float16)
    out = Int4Linear(first.in_features, sum(m.out_features for m in mods), first.group_size,
                     first.bias is not None, first.symmetric, dtype, first.weight_packed.device)
    with torch.no_grad():
        out.weight_packed.copy_(torch.cat([m.weight_packed for m in mods], 0))   # rows are independent
        out.weight_scale = torch.cat([m.weight_scale for m in mods], 0)
        if not first.symmetric:   # packed 8 rows per word along dim 0: unpack, join, repack
            zp = torch.cat([m.zero_points() for m in mods], 0)
            out.weight_zero_point.copy_(P.pack_int4(zp.to(torch.int8), dim=0))
        if first.bias is not None:
            out.bias.data = torch.cat([m.bias.data for m in mods], 0)
    return out


def _fuse_linear(mods: list[nn.Linear]) -> nn.Linear:
    first = mods[0]
    w = torch.cat([m.weight.detach() for m in mods], 0)
    out = nn.Linear(first.in_features, w.shape[0], bias=first.bias is not None, device="meta")
    out.weight = nn.Parameter(w, requires_grad=first.weight.requires_grad)
    if first.bias is not None:
        out.bias = nn.Parameter(torch.cat([m.bias.detach() for m in mods], 0), requires_grad=first.bias.requires_grad)
    return out


def _fusable(mods) -> bool:
    first = mods[0]
    if type(first) is Int4Linear:
        return all(
            type(m) is Int4Linear and m.in_features == first.in_features and m.group_size == first.group_size
            and m.symmetric == first.symmetric and m.weight_scale.dtype == first.weight_scale.dtype
            and (m.bias is None) == (first.bias is None) and m.weight_packed.device == first.weight_packed.device
            for m in mods)
    if type(first) is nn.Linear:
        return all(
            type(m) is nn.Linear and m.in_features == first.in_features and m.weight.dtype == first.weight.dtype
            and m.weight.device == first.weight.device and (m.bias is None) == (first.bias is None)
            for m in mods)
    return False


_FUSED_CLASSES: dict[type, type] = {}


def _fused_class(cls: type) -> type:
    """A subclass of the parent's class whose forward fills the slots first."""
    if cls in _FUSED_CLASSES:
        return _FUSED_CLASSES[cls]
    params = list(inspect.signature(cls.forward).parameters)
    first_arg = params[1] if len(params) > 1 else None

    def forward(self, *args, **kwargs):
        x = args[0] if args else kwargs[first_arg]
        slots = []
        for fused_name, sizes, slot in self._anyquant_fused:
            slot.x = x
            slot.parts = getattr(self, fused_name)(x).split(sizes, dim=-1)
            slots.append(slot)
        try:
            return cls.forward(self, *args, **kwargs)
        finally:
            for slot in slots:
                slot.x = slot.parts = None

    new = type(f"Fused{cls.__name__}", (cls,), {"forward": forward, "__module__": cls.__module__})
    _FUSED_CLASSES[cls] = new
    return new


def fuse_projections(model: nn.Module, groups=DEFAULT_GROUPS) -> list[str]:
    """Fuse each group of sibling Linears named in `groups` (see the module doc), in place.

    A group is fused where all its members are Int4Linear (same in_features, group size,
    symmetry, scale dtype, bias presence) or all plain nn.Linear (same in_features, dtype,
    bias presence); anything else is left as it is. Returns the fused modules' names.
    """
    done = []
    for parent_name, parent in list(model.named_modules()):
        for names, fused_name in groups:
            mods = [getattr(parent, n, None) for n in names]
            if any(m is None for m in mods) or hasattr(parent, fused_name) or not _fusable(mods):
                continue
            fused = fuse_int4(mods) if type(mods[0]) is Int4Linear else _fuse_linear(mods)
            slot = _Slot()
            sizes = [m.out_features for m in mods]
            start = 0
            full = f"{parent_name}.{fused_name}" if parent_name else fused_name
            for i, (n, m) in enumerate(zip(names, mods)):
                s = FusedSlice(full, i, start, start + m.out_features, m.in_features)
                s._fused = [fused, slot]
                start += m.out_features
                setattr(parent, n, s)
            parent.add_module(fused_name, fused)
            if not hasattr(parent, "_anyquant_fused"):
                parent._anyquant_fused = []
                parent.__class__ = _fused_class(type(parent))
            parent._anyquant_fused.append((fused_name, sizes, slot))
            done.append(full)
            del mods
    return done
