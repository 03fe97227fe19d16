"""The output-format contract and its registry. A method names its format (Method.format); the
format writes the `quantization_config` that stock loaders read and rebuilds a saved output."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from anyquant.errors import AnyquantError
from anyquant.planning.plan import Plan


class Format:
    name: ClassVar[str]

    def quantization_config(self, model: nn.Module, plan: Plan, compute_dtype: torch.dtype) -> dict[str, Any]:
        """The config.json `quantization_config` for `model` quantized by `plan`."""
        raise NotImplementedError(f"format {self.name}: quantization_config is not implemented")

    def load(self, directory: Path, manifest: dict[str, Any], trust_remote_code: bool, *,
             device: str | torch.device | None = None, device_map: str | dict | None = None,
             fuse: bool = False) -> nn.Module:
        """The saved output at `directory` as a model, on `device` or spread by `device_map`
        (transformers' sense); `fuse`: q/k/v and gate/up fused where the format's modules allow."""
        raise NotImplementedError(f"format {self.name}: load is not implemented")


_FORMATS: dict[str, Format] = {}


def register_format(fmt: Format) -> Format:
    _FORMATS[fmt.name] = fmt
    return fmt


def format_for(name: str) -> Format:
    if name not in _FORMATS:
        raise AnyquantError(f"unknown output format {name!r}; known formats: {', '.join(sorted(_FORMATS))}")
    return _FORMATS[name]
