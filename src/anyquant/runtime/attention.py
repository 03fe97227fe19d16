"""Decode attention for batch-1 generation with a static KV cache (transformers models).

    from anyquant.runtime.attention import use_decode_attention
    use_decode_attention(model)      # model.config._attn_implementation = "anyquant_decode"

Why: in a compiled int4 decode step, attention through torch's SDPA costs about as much as the
o_proj and qkv matmuls together: the SDPA kernel plus the kernels inductor generates around it
(repeat_kv copies of the whole cache for the grouped heads, the mask); docs/runtime.md has the
profile. This module registers an attention
function with transformers' AttentionInterface that, for one query token (batch 1, bf16,
head_dim 128, 1/2/4/8 query heads per key head, a boolean mask over the cache), runs one CUDA
kernel per layer (runtime/cuda_attention.cu: split over the cache in CTAs of 32 positions, the
parts merged by the last CTA of each head; it reads the cache in place);
everything else (prefill, other dtypes and shapes, CPU, no nvcc) goes to transformers' own
`sdpa` function unchanged. Under torch.compile the kernel is one opaque operator
(`torch.ops.anyquant.decode_attention`).

Numerics: scores, softmax and the weighted sum in fp32 (q . k products exact), the output
rounded to bf16 once; torch's fused SDPA kernels round the probabilities to bf16 before the
second product, so the two agree to bf16 rounding, not bit for bit (tests/test_runtime_gpu.py).

It is a runtime choice like the int4 kernels: it applies to any model whose attention modules
call `ALL_ATTENTION_FUNCTIONS` (bf16 models too), and it is not saved with the model.
"""

from __future__ import annotations

import math

import torch

from anyquant.runtime import cuda_int4

NAME = "anyquant_decode"
MAX_LEN = 8192          # cache positions (the kernel splits them over at most 256 CTAs of 32 per key head)
HEAD_DIM = 128
GROUPS = (1, 2, 4, 8)


@torch.library.custom_op("anyquant::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """q [1, Hq, 1, D], k / v [1, Hkv, L, D], mask bool [1, 1, 1, L] -> [1, 1, Hq, D] (the layout
    transformers' attention functions return)."""
    hq, d = q.shape[1], q.shape[-1]
    if q.is_cuda:
        out = cuda_int4.module_for(q.device).decode_attention(
            q.reshape(hq, d).contiguous(), k[0], v[0], mask.reshape(-1).contiguous().view(torch.uint8),
            _counters(q.device), float(scale))
        return out.view(1, 1, hq, d)
    return reference(q, k, v, mask, scale)


@decode_attention.register_fake
def _(q, k, v, mask, scale):
    return q.new_empty((1, 1, q.shape[1], q.shape[-1]))


def reference(q, k, v, mask, scale):
    """The same function in fp32 with torch ops (CPU fallback, tests)."""
    hq, hkv = q.shape[1], k.shape[1]
    kk = k.float().repeat_interleave(hq // hkv, dim=1)
    vv = v.float().repeat_interleave(hq // hkv, dim=1)
    s = (q.float() @ kk.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    out = torch.softmax(s, dim=-1) @ vv
    return out.transpose(1, 2).to(q.dtype)


def decode_ok(query, key, value, attention_mask, dropout=0.0, **kwargs) -> bool:
    """Whether the kernel takes this call (else transformers' sdpa runs)."""
    if not (query.is_cuda and query.dim() == 4 and query.shape[0] == 1 and query.shape[2] == 1):
        return False
    if query.dtype != torch.bfloat16 or key.dtype != torch.bfloat16 or value.dtype != torch.bfloat16:
        return False
    if query.shape[-1] != HEAD_DIM or key.shape[-1] != HEAD_DIM or value.shape[-1] != HEAD_DIM:
        return False
    if key.shape[0] != 1 or key.shape != value.shape or query.shape[1] % key.shape[1]:
        return False
    if query.shape[1] // key.shape[1] not in GROUPS or key.shape[2] > MAX_LEN or key.shape[1] > MAX_KV_HEADS:
        return False
    if key.stride(-1) != 1 or value.stride(-1) != 1:
        return False
    if attention_mask is None or attention_mask.dtype != torch.bool or attention_mask.numel() != key.shape[2]:
        return False
    if dropout or kwargs.get("softcap") is not None or kwargs.get("output_attentions") or kwargs.get("s_aux") is not None:
        return False
    if kwargs.get("position_bias") is not None or kwargs.get("cache") is not None:
        return False
    return query.device.index in _BUILT or (query.device.index is None and 0 in _BUILT)


# Per device: the kernel's split counters (one int32 per key head; each launch leaves them zero,
# so one buffer serves every layer and graph replay on a stream; not for concurrent streams).
_COUNTERS: dict[int, torch.Tensor] = {}
MAX_KV_HEADS = 1024


def _counters(device: torch.device) -> torch.Tensor:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _COUNTERS:
        _COUNTERS[idx] = torch.zeros(MAX_KV_HEADS, dtype=torch.int32, device=torch.device("cuda", idx))
    return _COUNTERS[idx]


# CUDA device indices where the extension was built, filled by `build_for` outside
# any compiled region (decode_ok only reads it, so torch.compile traces no build or cache logic).
_BUILT: set[int] = set()


def build_for(device: torch.device) -> bool:
    """Build the extension for `device` and mark it ready for the decode kernel (outside any
    compiled region); False where it cannot run there (CPU, no CUDA, no nvcc, failed build)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    if cuda_int4.available(device):
        _BUILT.add(device.index if device.index is not None else torch.cuda.current_device())
        _counters(device)
        return True
    return False


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention function: the decode kernel where it applies, else sdpa."""
    if decode_ok(query, key, value, attention_mask, dropout, **kwargs):
        scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
        return torch.ops.anyquant.decode_attention(query, key, value, attention_mask, scale), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def register() -> None:
    """Register NAME with transformers' attention and mask interfaces (masks as for sdpa)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


def use_decode_attention(model) -> str:
    """Run `model`'s attention through `attention_forward`; returns the previous implementation
    name (give it to `set_implementation` to undo). Builds the CUDA
    extension now where the model sits on a CUDA device (else every call goes to sdpa)."""
    register()
    dev = next(model.parameters()).device
    build_for(dev)
    return set_implementation(model, NAME)


def set_implementation(model, name: str) -> str:
    """Set `model`'s attention implementation name (transformers' config._attn_implementation),
    e.g. back to what `use_decode_attention` returned; returns the previous name."""
    prev = model.config._attn_implementation
    model.config._attn_implementation = name
    return prev
