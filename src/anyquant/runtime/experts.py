"""Quantized fused MoE experts: what replaces a 3-D expert parameter ([experts, out, in], e.g.
transformers' `mlp.experts.gate_up_proj` / `down_proj`) under the same attribute name.

transformers' eager experts loop reads one expert at a time (`self.gate_up_proj[expert_idx]`
for the experts the router hit) and multiplies with `F.linear`; these modules answer that
indexing with the expert's dequantized 2-D weight, so only the experts a forward uses are
dequantized, one at a time, and memory stays at the stored width. The grouped / batched
experts kernels take the whole 3-D tensor instead, so a module holding quantized experts is
pinned to the eager loop (`pin_eager`).

Experts classes written otherwise use the whole tensor in their own forward: Llama 4's
`torch.bmm(x, self.gate_up_proj)`, Inkling's shared experts `self.gate_proj.transpose(1, 2)`,
JetMoE's `F.linear(x, self.weight[i])`. For them a QuantizedExperts is tensor-like: passed to
any torch function (`__torch_function__`), or asked for a tensor method or attribute it lacks,
it stands for the whole tensor dequantized to the compute dtype (for that call, then freed),
so the owner's own forward runs unchanged on the quantized weights.

Three storages, one per format:
  Int4Experts  the int4 family (int4, hqq, awq, gptq): Int4Linear's buffers with a leading
               experts dimension (weight_packed int32 [E, out, in / 8], weight_scale
               [E, out, in / g], weight_zero_point int32 [E, ceil(out / 8), in / g], weight_shape)
  Bnb4Experts  nf4 / fp4: bitsandbytes' 4-bit blockwise codes of each expert (weight_packed
               uint8 [E, out * in / 2], absmax float32 [E, blocks], quant_map float32 [16])
  Int8Experts  int8: row-wise absmax int8 (bitsandbytes' int8_vectorwise_quant; weight int8
               [E, out, in], weight_scb float32 [E, out]); weight-only, no outlier split
"""

from __future__ import annotations

import copy
import re
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from anyquant import primitives as P
from anyquant.errors import AnyquantError


class QuantizedExperts(nn.Module):
    """A stack of quantized expert matrices [experts, out_features, in_features]; `self[i]` is
    expert i's float weight [out_features, in_features] in the compute dtype."""

    def __init__(self, num_experts: int, out_features: int, in_features: int, dtype: torch.dtype,
                 device=None) -> None:
        super().__init__()
        self.num_experts, self.out_features, self.in_features = num_experts, out_features, in_features
        # the parameter it replaced was [experts, in, out] (Aria, GPT-OSS: `x @ W[e]`): the
        # quantized matrices are [out, in] as always, and `self[e]` hands back their transpose
        self.transposed = False
        # follows model.to(dtype) / .to(device): the dtype and device each expert is dequantized to
        # (never on meta: a skeleton's shells get real tensors from the checkpoint, this one from here)
        anchor_device = None if device is None or torch.device(device).type == "meta" else device
        self.register_buffer("dtype_anchor", torch.empty(0, dtype=dtype, device=anchor_device), persistent=False)

    @property
    def shape(self) -> torch.Size:
        """The shape of the parameter it replaced."""
        if self.transposed:
            return torch.Size((self.num_experts, self.in_features, self.out_features))
        return torch.Size((self.num_experts, self.out_features, self.in_features))

    @property
    def dtype(self) -> torch.dtype:
        return self.dtype_anchor.dtype

    @property
    def device(self) -> torch.device:
        return self.dtype_anchor.device

    @property
    def ndim(self) -> int:
        return 3

    def dim(self) -> int:
        return 3

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def numel(self) -> int:
        return self.num_experts * self.out_features * self.in_features

    def __len__(self) -> int:
        return self.num_experts

    def __getitem__(self, idx) -> torch.Tensor:
        if isinstance(idx, int) or (isinstance(idx, torch.Tensor) and idx.numel() == 1 and idx.dim() == 0
                                    and not idx.is_floating_point() and idx.dtype != torch.bool):
            e = int(idx)
            if not -self.num_experts <= e < self.num_experts:
                raise IndexError(f"{type(self).__name__}: expert {e} out of range for {self.num_experts} experts")
            w = self.expert_weight(e % self.num_experts).to(self.dtype)
            return w.t() if self.transposed else w
        # slices, lists of experts, masks: what the replaced tensor would give
        return self.as_tensor()[idx]

    def as_tensor(self) -> torch.Tensor:
        """The replaced parameter, dequantized: [experts, out, in] (or [experts, in, out] where
        transposed) in the compute dtype, on the buffers' device."""
        return self.dequantized(self.dtype)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        # a torch function handed the experts (torch.bmm(x, experts), x @ experts, F.linear on
        # a slice) computes with the dequantized tensor, as it did with the float parameter
        args, kwargs = tree_map(lambda a: a.as_tensor() if isinstance(a, QuantizedExperts) else a,
                                (args, kwargs or {}))
        return func(*args, **kwargs)

    def __matmul__(self, other):
        return torch.matmul(self.as_tensor(), other)

    def __rmatmul__(self, other):
        return torch.matmul(other, self.as_tensor())

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            # tensor methods and attributes the module lacks (.transpose, .view, .T, .mT, ...) act
            # on the dequantized tensor; private and special names stay the module's own (copy,
            # pickle and nn.Module's machinery must never receive a tensor's)
            if name.startswith("_") or not hasattr(torch.Tensor, name):
                raise
            return getattr(self.as_tensor(), name)

    def expert_weight(self, e: int) -> torch.Tensor:
        raise NotImplementedError

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Every expert's weight in the replaced parameter's layout (for measuring error,
        dequantizing, and the owners whose forward uses the whole tensor: `as_tensor`)."""
        w = torch.stack([self.expert_weight(e).to(dtype) for e in range(self.num_experts)])
        return w.transpose(1, 2) if self.transposed else w

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, out_features={self.out_features}, in_features={self.in_features}"
                + (", transposed=True" if self.transposed else ""))


class Int4Experts(QuantizedExperts):
    def __init__(self, num_experts: int, out_features: int, in_features: int, group_size: int,
                 symmetric: bool = False, dtype: torch.dtype = torch.float32, device=None) -> None:
        super().__init__(num_experts, out_features, in_features, dtype, device)
        if in_features % group_size:
            raise ValueError(f"Int4Experts: in_features={in_features} not divisible by group_size={group_size}")
        self.group_size, self.symmetric = group_size, symmetric
        groups = in_features // group_size
        self.register_buffer("weight_packed", torch.zeros(num_experts, out_features, (in_features + 7) // 8,
                                                          dtype=torch.int32, device=device))
        self.register_buffer("weight_scale", torch.ones(num_experts, out_features, groups,
                                                        dtype=P.scale_storage_dtype(dtype), device=device))
        if symmetric:
            self.weight_zero_point = None
        else:
            self.register_buffer("weight_zero_point", torch.zeros(num_experts, (out_features + 7) // 8, groups,
                                                                  dtype=torch.int32, device=device))
        self.register_buffer("weight_shape", torch.tensor([num_experts, out_features, in_features],
                                                          dtype=torch.int64, device=device))

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                   symmetric: bool, dtype: torch.dtype) -> "Int4Experts":
        """codes int8 [E, out, in], scale [E, out, in / g], zero int8 [E, out, in / g]."""
        n, out_f, in_f = codes.shape
        m = cls(n, out_f, in_f, group_size, symmetric, dtype, codes.device)
        for e in range(n):
            m.weight_packed[e].copy_(P.pack_int4(codes[e], dim=1))
            if not symmetric:
                m.weight_zero_point[e].copy_(P.pack_int4(zero[e].to(torch.int8), dim=0))
        m.weight_scale.copy_(scale)
        return m

    def expert_weight(self, e: int) -> torch.Tensor:
        codes = P.unpack_int4(self.weight_packed[e], self.in_features, dim=1)
        zero = (torch.zeros_like(self.weight_scale[e], dtype=torch.int8) if self.symmetric
                else P.unpack_int4(self.weight_zero_point[e], self.out_features, dim=0))
        return P.dequantize(codes, self.weight_scale[e], zero, self.group_size, self.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}, symmetric={self.symmetric}"


class Bnb4Experts(QuantizedExperts):
    def __init__(self, num_experts: int, out_features: int, in_features: int, quant_type: str, blocksize: int,
                 dtype: torch.dtype = torch.float32, device=None) -> None:
        super().__init__(num_experts, out_features, in_features, dtype, device)
        n = out_features * in_features
        if n % blocksize:
            raise ValueError(f"Bnb4Experts: {out_features} x {in_features} weights per expert is not a whole number "
                             f"of {blocksize}-weight blocks")
        self.quant_type, self.blocksize = quant_type, blocksize
        self.register_buffer("weight_packed", torch.zeros(num_experts, n // 2, dtype=torch.uint8, device=device))
        self.register_buffer("absmax", torch.ones(num_experts, n // blocksize, dtype=torch.float32, device=device))
        self.register_buffer("quant_map", torch.zeros(16, dtype=torch.float32, device=device))

    @classmethod
    def quantize(cls, weight: torch.Tensor, quant_type: str, blocksize: int, dtype: torch.dtype) -> "Bnb4Experts":
        import bitsandbytes.functional as F

        n, out_f, in_f = weight.shape
        m = cls(n, out_f, in_f, quant_type, blocksize, dtype, weight.device)
        for e in range(n):
            # absmax kept in float32 (no double quantization): a per-expert nested state would need
            # its own offset and code book per expert for 0.37 bits per weight less
            packed, state = F.quantize_4bit(weight[e].detach().contiguous(), blocksize=blocksize,
                                            compress_statistics=False, quant_type=quant_type,
                                            quant_storage=torch.uint8)
            m.weight_packed[e].copy_(packed.reshape(-1))
            m.absmax[e].copy_(state.absmax.float())
            m.quant_map.copy_(state.code.float())
        return m

    def expert_weight(self, e: int) -> torch.Tensor:
        import bitsandbytes.functional as F

        state = F.QuantState(absmax=self.absmax[e], shape=torch.Size((self.out_features, self.in_features)),
                             code=self.quant_map, blocksize=self.blocksize, quant_type=self.quant_type,
                             dtype=torch.float32)
        return F.dequantize_4bit(self.weight_packed[e].reshape(-1, 1), state)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", quant_type={self.quant_type}, blocksize={self.blocksize}"


class Int8Experts(QuantizedExperts):
    def __init__(self, num_experts: int, out_features: int, in_features: int, dtype: torch.dtype = torch.float32,
                 device=None) -> None:
        super().__init__(num_experts, out_features, in_features, dtype, device)
        self.register_buffer("weight", torch.zeros(num_experts, out_features, in_features, dtype=torch.int8,
                                                   device=device))
        self.register_buffer("weight_scb", torch.ones(num_experts, out_features, dtype=torch.float32, device=device))

    @classmethod
    def quantize(cls, weight: torch.Tensor, dtype: torch.dtype) -> "Int8Experts":
        import bitsandbytes.functional as F

        n, out_f, in_f = weight.shape
        m = cls(n, out_f, in_f, dtype, weight.device)
        for e in range(n):
            # LLM.int8's own weight quantization (row-wise absmax to +-127), as Linear8bitLt stores it
            cb, scb, _ = F.int8_vectorwise_quant(weight[e].detach().to(torch.float16))
            m.weight[e].copy_(cb)
            m.weight_scb[e].copy_(scb.float())
        return m

    def expert_weight(self, e: int) -> torch.Tensor:
        return self.weight[e].float() * (self.weight_scb[e].unsqueeze(1) / 127.0)


def quantized_experts_types() -> tuple[type, ...]:
    return (Int4Experts, Bnb4Experts, Int8Experts)


def pin_eager(experts_module: nn.Module) -> None:
    """Make `experts_module` (a transformers experts class) run its eager per-expert loop, the
    one that indexes its weights by expert: it gets its own copy of the config with
    `_experts_implementation` = "eager"; the rest of the model keeps its choice."""
    cfg = getattr(experts_module, "config", None)
    if cfg is None or getattr(cfg, "_experts_implementation", None) == "eager":
        return
    own = copy.copy(cfg)
    own._experts_implementation_internal = "eager"
    experts_module.config = own


def stored_transposed(module: nn.Module) -> bool | None:
    """Does `module` (the owner of a fused expert tensor) store its experts [experts, in, out]
    (`x @ W[e]`)? transformers' experts classes say so (`is_transposed`, set by
    @use_experts_implementation); None for others (the probe observes it: numerics/probe.py)."""
    flag = getattr(module, "is_transposed", None)
    return bool(flag) if flag is not None else None


def install_experts(model: nn.Module, param_name: str, q: QuantizedExperts) -> nn.Module:
    """Replace the 3-D parameter `param_name` by `q` under the same attribute name and pin its
    owner to the eager loop. Returns the owner."""
    owner_name, _, attr = param_name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if attr in owner._parameters:
        del owner._parameters[attr]
    owner.add_module(attr, q)
    pin_eager(owner)
    return owner


def experts_state(q: QuantizedExperts) -> dict[str, Any]:
    """Constructor arguments of `q` (for rebuilding an empty one of the same kind at load)."""
    d: dict[str, Any] = {"type": type(q).__name__, "shape": list(q.shape)}
    if isinstance(q, Int4Experts):
        d.update(group_size=q.group_size, symmetric=q.symmetric)
    elif isinstance(q, Bnb4Experts):
        d.update(quant_type=q.quant_type, blocksize=q.blocksize)
    return d


def empty_experts(state: dict[str, Any], dtype: torch.dtype, device=None) -> QuantizedExperts:
    """An empty QuantizedExperts from `experts_state`'s record, to be filled from a checkpoint."""
    n, out_f, in_f = state["shape"]
    kind = state["type"]
    if kind == "Int4Experts":
        return Int4Experts(n, out_f, in_f, int(state["group_size"]), bool(state["symmetric"]), dtype, device)
    if kind == "Bnb4Experts":
        return Bnb4Experts(n, out_f, in_f, state["quant_type"], int(state["blocksize"]), dtype, device)
    if kind == "Int8Experts":
        return Int8Experts(n, out_f, in_f, dtype, device)
    raise ValueError(f"unknown quantized experts type {kind!r} (expected Int4Experts, Bnb4Experts or Int8Experts)")


def checkpoint_layout(model: nn.Module, name: str, shape: list[int]) -> list[tuple[str, int, torch.Tensor]] | None:
    """Where the rows of the fused expert tensor `name` ([experts, out, in]) live in the model's
    original checkpoint layout (one Linear per expert: Mixtral's `block_sparse_moe.experts.{e}.w1`,
    Qwen3-MoE's `mlp.experts.{e}.gate_proj`, ...), found by running transformers' own reverse
    weight conversion (what save_pretrained writes) on a tensor holding each row's index.
    Returns [(checkpoint module name, expert, rows of that expert)], or None where transformers
    keeps this tensor fused in its checkpoints (no conversion splits it)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return None
    n, out_f, _ = shape
    code = torch.arange(n * out_f, dtype=torch.float64).reshape(n, out_f, 1)
    # the model type's default mapping says how its checkpoints split experts; a model loaded
    # records only the conversions its checkpoint needed (none from the loaded layout, only the
    # renamings from a per-expert one), so that record is set aside for the call
    had = model.__dict__.get("_weight_conversions", None)
    model._weight_conversions = None
    try:
        reverted = revert_weight_conversion(model, {name: code})
    except Exception:  # noqa: BLE001 — a conversion that cannot run on this tensor does not split it
        return None
    finally:
        model._weight_conversions = had
    if name in reverted or not reverted or not all(k.endswith(".weight") for k in reverted):
        return None
    out: list[tuple[str, int, torch.Tensor]] = []
    for key, t in reverted.items():
        idx = torch.as_tensor(t).reshape(-1).round().long()
        if idx.numel() == 0 or not bool((idx // out_f == idx[0] // out_f).all()):
            return None
        out.append((key[: -len(".weight")], int(idx[0]) // out_f, idx % out_f))
    seen = torch.cat([e * out_f + rows for _, e, rows in out]).sort().values
    if not torch.equal(seen, torch.arange(n * out_f)):
        return None
    return out


def checkpoint_name_patterns(layout: list[tuple[str, int, torch.Tensor]]) -> list[str]:
    """Regular expressions (full match) for the checkpoint module names of one fused tensor's
    experts, the expert index as `\\d+`: e.g. `model\\.layers\\.0\\.mlp\\.experts\\.\\d+\\.gate_proj`."""
    by_expert: dict[int, list[str]] = {}
    for base, e, _ in layout:
        by_expert.setdefault(e, []).append(base)
    experts = sorted(by_expert)
    first = by_expert[experts[0]]
    if len(experts) == 1:
        return [re.escape(b) for b in first]
    out = []
    for k, base in enumerate(first):
        other = by_expert[experts[1]][k].split(".")
        parts = base.split(".")
        out.append(r"\.".join(r"\d+" if len(other) == len(parts) and p != o and p.isdigit() else re.escape(p)
                              for p, o in zip(parts, other)))
    return out


def _llama4_expert_weights(experts: nn.Module, e: int) -> dict[str, torch.Tensor]:
    # Llama4TextExperts: `gate, up = (x @ gate_up_proj[e]).chunk(2, dim=-1)`, `down = h @ down_proj[e]`
    gate_up = experts.gate_up_proj[e]
    half = gate_up.shape[1] // 2
    return {"gate_proj.weight": gate_up[:, :half].t(), "up_proj.weight": gate_up[:, half:].t(),
            "down_proj.weight": experts.down_proj[e].t()}


# experts classes whose tensors a per-expert module holds as Linears: class name -> expert e's
# Linear weights under the per-expert module's names
_PER_EXPERT_WEIGHTS = {"Llama4TextExperts": _llama4_expert_weights}


def unfuse_for_loader(model: nn.Module, quant_method: str, copy_weights: bool = True) -> list[str]:
    """Replace each experts module that transformers' own loader for `quant_method`
    ("bitsandbytes", "compressed-tensors") replaces by one module per expert before it loads a
    quantized checkpoint (transformers.quantizers.base.MODULES_TO_PATCH_FOR_QUANTIZATION: Llama 4's
    Llama4TextExperts becomes SequentialLlama4TextExperts, one Llama4TextMLP per expert), with
    the same weights: its experts are then ordinary Linear layers, planned, quantized and saved
    like any other, and the output has the layout that loader expects. `copy_weights=False`:
    the structure only (a skeleton about to be filled from a checkpoint). Returns the replaced
    modules' names."""
    try:
        from transformers.quantizers.base import MODULES_TO_PATCH_FOR_QUANTIZATION
    except ImportError:  # a transformers without these patches: nothing to match
        return []
    cfg = getattr(model, "config", None)
    out = []
    for name, module in list(model.named_modules()):
        spec = MODULES_TO_PATCH_FOR_QUANTIZATION.get(type(module).__name__)
        weights_of = _PER_EXPERT_WEIGHTS.get(type(module).__name__)
        if spec is None or weights_of is None or cfg is None:
            continue
        if quant_method not in {getattr(m, "value", m) for m in spec["quantization_methods"]}:
            continue
        p = next(module.parameters())
        new = spec["module_name"](cfg.get_text_config()).to(device=p.device, dtype=p.dtype)
        parent_name, _, attr = name.rpartition(".")
        if not copy_weights:
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
            out.append(name)
            continue
        with torch.no_grad():
            for e, expert in enumerate(new):
                for key, w in weights_of(module, e).items():
                    expert.get_parameter(key).copy_(w)
            # the two forwards must agree before the float module goes
            x = torch.randn(len(new) * 2, module.hidden_size, generator=torch.Generator().manual_seed(0)).to(p)
            # (the per-expert module answers [experts, tokens, hidden], the fused one [experts * tokens, hidden])
            a, b = module(x).float().reshape(-1), new(x).float().reshape(-1)
        if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-3, atol=1e-3 * float(a.abs().max()) + 1e-6):
            raise AnyquantError(f"{name}: {type(new).__name__} built from {type(module).__name__}'s weights computes "
                                f"otherwise (max |difference| {float((a - b).abs().max()):.3g}); this transformers "
                                "version lays out the experts differently: report it with the model")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
        out.append(name)
    return out
