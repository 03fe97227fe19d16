"""The one builder of probe inputs: small deterministic token ids (and images for a VLM) made
from the model's config. Every probe (dtype policy, weights read outside forward, boundary
checks, verification) and doctor run on these, so their findings are about the same forward."""

from __future__ import annotations

import torch
from torch import nn

from anyquant.errors import AnyquantError
from anyquant.model.tree import device_of
from anyquant.numerics.probe import vision_probe_inputs


def probe_inputs(model: nn.Module, seq_len: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    """Small deterministic inputs built from the config (the probe issue extends this to VLMs)."""
    config = getattr(model, "config", None)
    vocab = None
    for cfg in (config, getattr(config, "text_config", None)):
        vocab = vocab or getattr(cfg, "vocab_size", None)
    if not vocab:
        raise AnyquantError(
            f"{type(model).__name__}: cannot build probe inputs (no vocab_size in its config)"
        )
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, int(vocab), (1, seq_len), generator=g)
    return {"input_ids": ids.to(device_of(model)), **vision_probe_inputs(model, g)}
