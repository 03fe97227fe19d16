"""float32 regions of a 16-bit model survive save and reload.

The dtype policy (numerics/policy.py) keeps modules whose activations overflow float16 in
float32, with casts at their boundaries (numerics/casts.py `keep_in_float32`). save_pretrained
writes their parameters in float32; transformers loads every float tensor in one dtype and
installs no casts, so the saved model would compute those modules in float16 again (NaN) or
mix dtypes ("expected m1 and m2 to have the same dtype"). The manifest records the regions
(`float32_regions`), and `restore_float32_regions` puts them back at anyquant.load: the
region's float tensors re-read from the checkpoint in float32, quantized modules inside it
computing in float32, and the boundary casts installed again.

Stock transformers cannot express this: `_keep_in_fp32_modules` is a class attribute (not a
config field) and adds no casts at the region's boundary, so `from_pretrained(DIR)` computes
those modules in the checkpoint's 16-bit dtype. `STOCK_REFUSAL` says so in the plan notes,
the report and the manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from anyquant.errors import AnyquantError
from anyquant.formats.hf import checkpoint_key_renamer
from anyquant.numerics.casts import keep_in_float32
from anyquant.numerics.dtype import DTYPES

STOCK_REFUSAL = (
    "float32 regions ({regions}) inside a {dtype} model cannot be reproduced by stock transformers' "
    "from_pretrained (`_keep_in_fp32_modules` is a class attribute, not a config field, and adds no casts at "
    "the region's boundary): load the output with anyquant.load, which restores them exactly"
)


def float32_regions(result) -> dict[str, str]:
    """The float32 regions of a QuantizeResult's model (module -> why), empty in a float32 model."""
    if result.plan.compute_dtype == "float32":
        return {}
    policy = result.report.get("dtype_policy") or {}
    return dict(policy.get("float32_modules") or {})


def stock_refusal(regions: dict[str, str], compute_dtype: str) -> str:
    return STOCK_REFUSAL.format(regions=", ".join(regions), dtype=compute_dtype)


def restore_float32_regions(model: nn.Module, directory: Path, manifest: dict[str, Any]) -> nn.Module:
    """Re-install the manifest's float32 regions on a model transformers loaded in the compute dtype."""
    regions = manifest.get("float32_regions") or {}
    compute = DTYPES.get(manifest.get("compute_dtype") or "float32", torch.float32)
    if not regions or compute == torch.float32:
        return model
    from safetensors import safe_open

    rename = checkpoint_key_renamer(model)
    wanted: dict[str, torch.Tensor] = {}
    for region in regions:
        try:
            mod = model.get_submodule(region)
        except AttributeError as e:
            raise AnyquantError(f"{directory}: the float32 region {region} (anyquant.json) is not in the "
                                "rebuilt model") from e
        for k, t in list(mod.named_parameters()) + list(mod.named_buffers()):
            if t is not None and t.is_floating_point():
                wanted[f"{region}.{k}" if region else k] = t
        mod.float()
        for m in mod.modules():  # quantized modules inside compute in float32, as they did in memory
            if hasattr(m, "compute_dtype"):
                m.compute_dtype = torch.float32
        keep_in_float32(mod, compute)
    state = model.state_dict()
    for f in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():
                name = key if key in wanted else rename(key)
                if name in wanted and name in state and tuple(state[name].shape) == tuple(sf.get_slice(key).get_shape()):
                    with torch.no_grad():
                        state[name].copy_(sf.get_tensor(key).to(state[name].dtype))
    return model
