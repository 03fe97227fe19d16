"""Calibration data for awq/gptq, in the form the block runner takes: token ids [n, seq] for a
text model, or a list of forward-input dicts (input_ids + pixel_values + ...) for a VLM.

Text models: token ids from --calib text (default the news corpus). Vision-language models
without --calib: image+text samples (calib.images: scikit-image photos + news text, through the
directory's processor or built from the config), so the language model's blocks calibrate on
image-token positions too; with --calib FILE (or a token tensor) a VLM calibrates text-only,
noted. A list of forward-input dicts passed as `calib` is used as it is."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from anyquant.calib.images import vlm_calibration
from anyquant.calib.runner import calibration_ids
from anyquant.calib.text import calibration_text
from anyquant.config import CalibratedInt4Config
from anyquant.errors import AnyquantError
from anyquant.model.files import read_text_file


def calibration_data(model: nn.Module, config: CalibratedInt4Config, calib: str | Path | torch.Tensor | list | None,
                     compute_dtype: torch.dtype, *, tokenizer: Any = None, model_dir: Path | None = None,
                     vlm: bool = False, trust_remote_code: bool = False) -> tuple[Any, list[str]]:
    """(calibration data, notes for the report)."""
    notes: list[str] = []
    if isinstance(calib, torch.Tensor):
        ids = calib.long()
        if vlm:
            notes.append(f"{config.method}: vision-language model calibrated text-only on the {ids.shape[0]} "
                         "token sequences given (the language model saw no image tokens)")
    elif isinstance(calib, (list, tuple)):
        ids = [_cast_floats(dict(b), compute_dtype) for b in calib]
        n_img = sum(1 for b in ids if "pixel_values" in b)
        if n_img:
            notes.append(f"{config.method}: calibrated on {len(ids)} given input batches ({n_img} with images)")
    elif vlm and calib is None:

        vc = vlm_calibration(model, model_dir=model_dir, tokenizer=tokenizer, n_samples=config.n_samples,
                             seq_len=config.seq_len, trust_remote_code=trust_remote_code)
        ids = [_cast_floats(b, compute_dtype) for b in vc.batches]
        notes.append(f"{config.method}: {vc.describe()}")
        notes.extend(f"{config.method}: {n}" for n in vc.notes)
    else:
        if tokenizer is None and model_dir is not None:
            raise AnyquantError(
                f"{model_dir}: no loadable tokenizer there (tokenizer.json, tokenizer_config.json, tokenizer.model, "
                f"or a processor holding one; remote-code tokenizers need --trust-remote-code), and {config.method} "
                "tokenizes calibration text with it: pass --tokenizer DIR (tokenizer=DIR in Python) naming the "
                "model's tokenizer, or copy the source model's tokenizer files into it"
            )
        if tokenizer is None:
            raise AnyquantError(
                f"{config.method} needs calibration tokens: pass calib=<LongTensor [n, seq]> for an in-memory "
                "model, tokenizer=<tokenizer or its directory>, or quantize a model directory (its tokenizer is used)"
            )
        if calib is None:

            text = calibration_text()
        else:
            text = read_text_file(calib, "--calib", "calibration text")
        ids = calibration_ids(tokenizer, text, config.n_samples, config.seq_len)
        if vlm:
            notes.append(f"{config.method}: vision-language model calibrated text-only on --calib {calib} "
                         f"({ids.shape[0]} sequences; the language model saw no image tokens)")
    return ids, notes


def _cast_floats(batch: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """Floating inputs (pixel_values) in the compute dtype, as the probe inputs are."""
    return {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}
