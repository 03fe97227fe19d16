"""LoRA (peft) on top of anyquant's int4 outputs: a peft LoRA layer for `Int4Linear`, registered
through peft's custom-module dispatch. bitsandbytes outputs (nf4, fp4, int8) need nothing:
peft supports their layers itself (QLoRA).

    from anyquant.formats.lora import lora_config
    model = get_peft_model(anyquant.load(out, fuse=False), lora_config(r=8, target_modules=["q_proj", "v_proj"]))
    # later: load_adapter(anyquant.load(out, fuse=False), adapter_dir)
    # (fuse=False: adapters target the source's module names, q_proj and v_proj, not the fused qkv_proj)

The int4 weights stay frozen and packed; the adapter's A and B train in the model's dtype.
Merging an adapter into the packed weights would requantize them (lossy), so `merge` refuses
and says what to do instead (keep the adapter separate, or merge into the float source and
quantize again)."""

from __future__ import annotations

import functools
from typing import Any

import torch

from anyquant.errors import AnyquantError
from anyquant.runtime.int4_linear import Int4Linear


@functools.lru_cache(maxsize=None)  # one class, made once peft is imported
def int4_lora_class() -> type:
    from peft.tuners.lora.layer import LoraLayer

    class LoraInt4Linear(torch.nn.Module, LoraLayer):
        def __init__(self, base_layer: Int4Linear, adapter_name: str, config=None, r: int = 0,
                     lora_alpha: int = 1, **kwargs: Any) -> None:
            super().__init__()
            LoraLayer.__init__(self, base_layer)
            self.fan_in_fan_out = False
            self._active_adapter = adapter_name
            self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

        def merge(self, *args: Any, **kwargs: Any) -> None:
            raise AnyquantError(
                "LoRA on int4 (Int4Linear): merging an adapter into the packed int4 weights would requantize "
                "them; keep the adapter separate (PeftModel.from_pretrained on anyquant.load(...)), or merge it "
                "into the float source model and quantize that again")

        def unmerge(self) -> None:
            return None

        def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            result = self.base_layer(x)
            if self.disable_adapters:
                return result
            for name in self.active_adapters:
                if name not in self.lora_A:
                    continue
                a, b = self.lora_A[name], self.lora_B[name]
                out = b(a(self.lora_dropout[name](x.to(a.weight.dtype)))) * self.scaling[name]
                result = result + out.to(result.dtype)
            return result

        def __repr__(self) -> str:
            return "lora." + super().__repr__()

    return LoraInt4Linear


def lora_config(**kwargs: Any):
    """A peft LoraConfig (its keyword arguments) that knows anyquant's Int4Linear."""
    from peft import LoraConfig

    cfg = LoraConfig(**kwargs)
    cfg._register_custom_module({Int4Linear: int4_lora_class()})
    return cfg


def load_adapter(model, adapter_dir, **kwargs: Any):
    """peft's PeftModel.from_pretrained for a saved adapter on an anyquant output: the saved
    LoraConfig does not carry the custom-module mapping, so it is registered again here."""
    from peft import LoraConfig, PeftModel

    cfg = LoraConfig.from_pretrained(str(adapter_dir))
    cfg._register_custom_module({Int4Linear: int4_lora_class()})
    return PeftModel.from_pretrained(model, str(adapter_dir), config=cfg, **kwargs)
