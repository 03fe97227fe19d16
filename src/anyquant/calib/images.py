"""Image + text calibration data for vision-language models.

A VLM's language model reads image tokens (the projected vision features) as well as text
tokens; calibrating its blocks on text alone leaves the activation statistics of every image
position out of GPTQ's Hessians and AWQ's scales. These samples put real photos in front of the
language model:

* images: scikit-image's bundled photos (astronaut, coffee, chelsea, rocket), read offline;
  sample i uses photo i mod 4, and from the second round on a deterministic crop (and mirror)
  of it, so no two samples are the same picture.
* text: consecutive chunks of the news calibration text (calib.text.calibration_text), cut to
  `seq_len` tokens each; the image tokens come in addition.

Two ways to build one sample:

* the model directory has a processor (AutoProcessor): the processor does everything, on the
  chat template's rendering of [image, text] where it has one, else on its image token + text.
* no processor (the tiny random VLMs the tests build from transformers' config classes): the
  image goes through the model type's own image processor class with its sizes taken from the
  vision config (or is resized and normalized by hand where there is none); the ids are the
  image token (`image_token_id` / `image_token_index`) repeated as often as the vision path
  gives features — counted with the model's `get_image_features`, or read from the error a
  forward without image tokens raises — wrapped in the vision start/end tokens the config
  declares, followed by the text ids (from the tokenizer, or deterministic synthetic ids where
  the directory has no tokenizer, noted).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from anyquant.calib.text import calibration_text, token_windows
from anyquant.errors import AnyquantError
from anyquant.numerics.inputs import (
    config_image_inputs,
    count_image_tokens,
    image_text_sample,
    image_token_id,
    keep_forward_inputs,
    synthetic_text_ids,
)

log = logging.getLogger(__name__)

IMAGE_NAMES = ("astronaut", "coffee", "chelsea", "rocket")
_INSTALL_FIX = "pip install scikit-image"


# --------------------------------------------------------------------------- images


@functools.lru_cache(maxsize=1)
def calibration_images() -> tuple[np.ndarray, ...]:
    """scikit-image's bundled real photos, each (H, W, 3) uint8 RGB."""
    try:
        import skimage.data
    except ImportError as e:
        raise AnyquantError(f"image calibration needs scikit-image's bundled photos. Fix: {_INSTALL_FIX}") from e
    out = []
    for name in IMAGE_NAMES:
        img = np.asarray(getattr(skimage.data, name)())
        if img.ndim == 2:
            img = np.stack([img] * 3, axis=-1)
        out.append(np.ascontiguousarray(img[..., :3]))
    return tuple(out)


def sample_image(i: int) -> np.ndarray:
    """Photo i mod 4; from i >= 4 on, a deterministic crop (60-100% of each side) of it,
    mirrored on odd rounds."""
    imgs = calibration_images()
    img = imgs[i % len(imgs)]
    rnd = i // len(imgs)
    if rnd == 0:
        return img
    g = np.random.default_rng(1000 + i)
    h, w = img.shape[:2]
    ch, cw = int(h * g.uniform(0.6, 1.0)), int(w * g.uniform(0.6, 1.0))
    y, x = int(g.integers(0, h - ch + 1)), int(g.integers(0, w - cw + 1))
    crop = img[y:y + ch, x:x + cw]
    return np.ascontiguousarray(crop[:, ::-1] if rnd % 2 else crop)


# --------------------------------------------------------------------------- helpers


@dataclass
class VLMCalibration:
    """Calibration batches (one dict of forward inputs per sample) and what they are."""

    batches: list[dict[str, torch.Tensor]]
    source: str  # "processor" or "config"
    image_tokens: list[int]
    text_tokens: list[int]
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        n = len(self.batches)
        img = sorted(set(self.image_tokens))
        img_s = str(img[0]) if len(img) == 1 else f"{img[0]}-{img[-1]}"
        return (f"calibrated on {n} image+text samples (scikit-image photos + news text, built by the "
                f"{'model' + chr(39) + 's processor' if self.source == 'processor' else 'config'}; "
                f"{img_s} image tokens and up to {max(self.text_tokens)} text tokens each)")


# --------------------------------------------------------------------------- text chunks


def _text_chunks(tokenizer, text: str, n: int, seq_len: int) -> list[list[int]]:

    ids = token_windows(tokenizer, text, max_tokens=n * seq_len, window=seq_len, bos=False)
    rows = [r.tolist() for r in ids]
    if len(rows) < n:
        log.warning("calibration text gives %d chunks of %d tokens, fewer than the %d image samples asked for; "
                    "chunks repeat", len(rows), seq_len, n)
    return [rows[i % len(rows)] for i in range(n)]


# --------------------------------------------------------------------------- with a processor


def load_processor(model_dir: str | Path | None, trust_remote_code: bool = False):
    """The directory's AutoProcessor if it has one that handles images; else None."""
    if model_dir is None:
        return None
    d = Path(model_dir)
    if not any((d / f).exists() for f in ("processor_config.json", "preprocessor_config.json")):
        return None
    from transformers import AutoProcessor

    try:
        proc = AutoProcessor.from_pretrained(d, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError, KeyError) as e:
        log.warning("%s: processor present but not loadable (%s); building image inputs from the config", d, e)
        return None
    if getattr(proc, "tokenizer", None) is None or getattr(proc, "image_processor", None) is None:
        return None
    return proc


def _prompt(processor, text: str) -> str:
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    tok = getattr(processor, "image_token", None)
    if tok is None:
        tid = getattr(processor, "image_token_id", None)
        tok = processor.tokenizer.convert_ids_to_tokens(tid) if tid is not None else None
    if tok is None:
        raise AnyquantError(f"{type(processor).__name__}: neither a chat template nor an image token to place the "
                            "image in the calibration text")
    return f"{tok}\n{text}"


def processor_batches(model: nn.Module, processor, text: str, n: int, seq_len: int) -> VLMCalibration:
    from PIL import Image

    chunks = _text_chunks(processor.tokenizer, text, n, seq_len)
    img_id = image_token_id(model)
    if img_id is None:
        img_id = getattr(processor, "image_token_id", None)
    batches, n_img, n_txt = [], [], []
    for i in range(n):
        chunk = processor.tokenizer.decode(chunks[i], skip_special_tokens=True)
        inputs = processor(images=[Image.fromarray(sample_image(i))], text=[_prompt(processor, chunk)],
                           return_tensors="pt")
        b = keep_forward_inputs(model, dict(inputs))
        ids = b["input_ids"]
        k = int((ids == img_id).sum()) if img_id is not None else 0
        batches.append(b)
        n_img.append(k)
        n_txt.append(int(ids.shape[1]) - k)
    return VLMCalibration(batches, "processor", n_img, n_txt)


# --------------------------------------------------------------------------- from the config


def config_batches(model: nn.Module, tokenizer, text: str | None, n: int, seq_len: int) -> VLMCalibration:
    """Image+text samples without a processor (see the module docstring)."""
    img_id = image_token_id(model)
    if img_id is None:
        raise AnyquantError(f"{type(model).__name__}: its config names no image_token_id / image_token_index, so "
                            "image features cannot be placed in the text; calibrate on text (--calib FILE)")
    notes = []
    if tokenizer is not None and text is not None:
        chunks = _text_chunks(tokenizer, text, n, seq_len)
    else:
        chunks = synthetic_text_ids(model, n, seq_len)
        notes.append("the model directory has no tokenizer: the text half of each image+text sample is "
                     "deterministic synthetic token ids")
    bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    batches, n_img, n_txt = [], [], []
    count_cache: dict[tuple, int] = {}
    for i in range(n):
        image = config_image_inputs(model, sample_image(i))
        text_ids = torch.tensor([chunks[i]], dtype=torch.long)
        key = tuple((k, tuple(v.shape), tuple(v.reshape(-1).tolist()) if not v.is_floating_point() else None)
                    for k, v in sorted(image.items()))
        if key not in count_cache:
            count_cache[key] = count_image_tokens(model, image, text_ids)
        k = count_cache[key]
        if k == 0:
            raise AnyquantError(f"{type(model).__name__}: its vision path gives no features for a calibration image")
        b = image_text_sample(model, image, chunks[i], k, bos)
        batches.append(b)
        n_img.append(k)
        n_txt.append(int(b["input_ids"].shape[1]) - k)
    return VLMCalibration(batches, "config", n_img, n_txt, notes)


def vlm_calibration(model: nn.Module, *, model_dir: str | Path | None = None, tokenizer=None,
                    n_samples: int = 32, seq_len: int = 512, text: str | None = None,
                    trust_remote_code: bool = False) -> VLMCalibration:
    """Image+text calibration batches for a VLM: through the directory's processor where it has
    one, else built from the config. `text` defaults to the news calibration text."""
    proc = load_processor(model_dir, trust_remote_code)
    if text is None and (proc is not None or tokenizer is not None):

        text = calibration_text()
    if proc is not None:
        return processor_batches(model, proc, text, n_samples, seq_len)
    return config_batches(model, tokenizer, text, n_samples, seq_len)
