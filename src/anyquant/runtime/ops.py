"""`torch.ops.anyquant.int4_linear`: Int4Linear's forward as one opaque operator for torch.compile.

Under torch.compile, `Int4Linear.forward` calls this operator instead of tracing the kernel
dispatch (its caches, lru_cache'd capability checks, Triton launchers). The operator takes the
input and an integer handle naming the module in a registry of weak references; at run time it
runs the ordinary eager dispatch (`kernels.int4_linear_forward`), so compiled and eager code
compute the same thing with the same kernels. Inductor cannot fuse into it; it does fuse
everything around it (norms, rotary, residual adds, activation), which is what compiling the
decode step is for. Captured in a CUDA graph the dispatch runs once, at capture.
"""

from __future__ import annotations

import itertools
import weakref

import torch

from anyquant.runtime import kernels

_REGISTRY: "weakref.WeakValueDictionary[int, torch.nn.Module]" = weakref.WeakValueDictionary()
_COUNTER = itertools.count(1)


def register(module: torch.nn.Module) -> int:
    """A fresh handle for `module` (called from Int4Linear.__init__ and __setstate__)."""
    handle = next(_COUNTER)
    _REGISTRY[handle] = module
    return handle


def lookup(handle: int) -> torch.nn.Module:
    try:
        return _REGISTRY[handle]
    except KeyError:
        raise RuntimeError(f"anyquant::int4_linear: no live Int4Linear with handle {handle}") from None


@torch.library.custom_op("anyquant::int4_linear", mutates_args=())
def int4_linear(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    return kernels.int4_linear_forward(lookup(handle), x)


@int4_linear.register_fake
def _(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))
