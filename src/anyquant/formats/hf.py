"""transformers glue shared by the formats: the model classes for a config, a float load that
reports what it could not place, and the key renamings transformers applied at load."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from anyquant.errors import AnyquantError
from anyquant.formats.direct import parameters_on_meta
from anyquant.model.load import model_classes


def checkpoint_key_renamer(model: nn.Module):
    """checkpoint key -> model key, through the renamings transformers applies when it loads
    `model`'s type (converters, which merge tensors, never match the int4 buffers). The model
    type's whole mapping, not only what `model` recorded: a model loaded records only the
    renamings its checkpoint's float keys needed, and an output whose layers are all quantized
    has none of them in float (EXAONE saves `transformer.h.0.mlp.c_proj.*`, read back as
    `model.layers.0.mlp.down_proj.*`)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    def key(t) -> tuple:
        return (tuple(t.source_patterns), tuple(t.target_patterns))

    try:
        default = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    except Exception:  # noqa: BLE001 — a model outside transformers' mappings: its record only
        default = []
    recorded = [t for t in (getattr(model, "_weight_conversions", None) or []) if isinstance(t, WeightRenaming)]
    seen = {key(t) for t in default}
    renamings = default + [t for t in recorded if key(t) not in seen]
    meta = dict.fromkeys(model.state_dict().keys(), True)
    prefix = getattr(model, "base_model_prefix", None) or None

    def rename(key: str) -> str:
        return rename_source_key(key, renamings, [], prefix, meta)[0]

    return rename


def _drop_load_report(record: logging.LogRecord) -> bool:
    return "LOAD REPORT" not in str(record.msg)


def from_pretrained_float(directory: Path, config, dtype: torch.dtype, trust_remote_code: bool):
    """The checkpoint's float tensors through transformers' own loading; the class named in
    config.architectures first (the auto classes can map a type to another head).
    Returns (model, transformers' loading info)."""
    kwargs = {"config": config, "dtype": dtype, "trust_remote_code": trust_remote_code, "output_loading_info": True}
    last: Exception | None = None
    # transformers' load report would list every quantized layer's weight as missing and its
    # int4 tensors as unexpected: true, expected, and checked by the caller instead.
    # (A filter, not a level: transformers runs extra checks when its logger's level is above WARNING.)
    report_logs = [logging.getLogger(n) for n in ("transformers.modeling_utils", "transformers.utils.loading_report")]
    for cls in classes_for_config(config):
        try:
            for lg in report_logs:
                lg.addFilter(_drop_load_report)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model, info = cls.from_pretrained(directory, **kwargs)
            return model, info
        except ValueError as e:  # this auto class does not know the config type
            last = e
        finally:
            for lg in report_logs:
                lg.removeFilter(_drop_load_report)
    raise AnyquantError(f"cannot build a model for config type {config.model_type}: {last}")


def classes_for_config(config) -> list[Any]:

    return model_classes(getattr(config, "architectures", None))


def meta_skeleton(config, dtype: torch.dtype, trust_remote_code: bool) -> nn.Module | None:
    """The model of `config` with its parameters on the meta device (buffers real); None when
    no class knows the config."""
    for cls in classes_for_config(config):
        try:
            with parameters_on_meta():
                if hasattr(cls, "_from_config"):
                    return cls._from_config(config, dtype=dtype)
                return cls.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        except ValueError:  # this auto class does not know the config type
            continue
    return None
