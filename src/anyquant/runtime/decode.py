"""Small pieces of a batch-1 greedy decode step that cost GPU kernels out of proportion.

    from anyquant.runtime.decode import share_position_counter, greedy_token

    cache = StaticCache(config=model.config, max_cache_len=...)
    share_position_counter(cache, device="cuda")   # one counter kernel per step instead of one per layer
    ...
    tok.copy_(greedy_token(model(input_ids=tok, past_key_values=cache, ...).logits))

Why: transformers' `StaticLayer` keeps a 1-element position counter per layer and every layer's
`update` advances its own (`cumulative_length.add_(1)`): one small kernel per layer and token,
even compiled in one CUDA graph. And `logits.argmax(-1)` over a large vocabulary runs as one
single-CTA kernel. docs/runtime.md has the measured cost of each.

`share_position_counter` makes the cache's full-attention static layers read one shared counter
tensor; only the last of them advances it (layers run in index order in one forward, so every
layer of a step reads the position before the step). The cache's contents, positions and masks are
unchanged. `greedy_token` is `argmax` over the last position in two stages (maximum per row of
a [rows, cols] view, then the first row holding the overall maximum), which gives the same index
as `torch.argmax` (the first maximal one; NaN-free logits) with many CTAs instead of one.
"""

from __future__ import annotations

import torch


def _update_without_counter(self, key_states, value_states, *args, **kwargs):
    """StaticLayer.update for every shared-counter layer but the last: the cache, not the counter."""
    if not self.is_initialized:
        self.lazy_initialization(key_states, value_states)
    kv_length = key_states.shape[-2]
    cache_position = torch.arange(kv_length, device=self.device) + self.cumulative_length
    try:
        self.keys.index_copy_(2, cache_position, key_states)
        self.values.index_copy_(2, cache_position, value_states)
    except NotImplementedError:
        self.keys[:, :, cache_position] = key_states
        self.values[:, :, cache_position] = value_states
    return self.keys, self.values


_READ_ONLY: dict[type, type] = {}


def _read_only_class(cls: type) -> type:
    if cls not in _READ_ONLY:
        _READ_ONLY[cls] = type(f"SharedCounter{cls.__name__}", (cls,), {"update": _update_without_counter})
    return _READ_ONLY[cls]


def share_position_counter(cache, device) -> torch.Tensor | None:
    """Make `cache`'s StaticLayers (exactly that class: full attention, static shape) share one
    position counter on `device`; the last of them advances it. Returns the counter, or None (and
    changes nothing) when the cache has fewer than two such layers, has other layer kinds, or a
    layer already holds its tensors. Call it before the first forward, with the device the cache
    will live on."""
    from transformers.cache_utils import StaticLayer

    layers = list(getattr(cache, "layers", []))
    if len(layers) < 2 or any(type(layer) is not StaticLayer for layer in layers):
        return None
    if any(layer.is_initialized for layer in layers):
        return None
    counters = [layer.cumulative_length for layer in layers]
    if not all(isinstance(c, torch.Tensor) and c.numel() == 1 and int(c) == 0 for c in counters):
        return None
    shared = torch.zeros((), dtype=counters[0].dtype, device=torch.device(device))
    for layer in layers:
        # lazy_initialization does `.to(self.device)`: a no-op for a counter already there, so the
        # layers keep sharing it once they hold their tensors
        layer.cumulative_length = shared
    for layer in layers[:-1]:
        layer.__class__ = _read_only_class(type(layer))
    return shared


def greedy_token(logits: torch.Tensor) -> torch.Tensor:
    """argmax over the vocabulary at the last position: [B, T, V] -> [B, 1] (long), the index
    torch.argmax gives (the first maximal one), computed in two stages where V factors well."""
    last = logits[:, -1, :]
    b, v = last.shape
    cols = next((c for c in (1024, 512, 256, 128) if v % c == 0 and v // c >= 8), None)
    if cols is None:
        return last.argmax(-1, keepdim=True)
    rows = v // cols
    row_max, row_arg = last.reshape(b, rows, cols).max(dim=-1)        # first maximal per row
    best_row = row_max.argmax(-1, keepdim=True)                         # first row with the max
    return best_row * cols + row_arg.gather(-1, best_row)
