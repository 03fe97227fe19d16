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
import inspect
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from anyquant.calib.text import calibration_text, token_windows
from anyquant.errors import AnyquantError
from anyquant.model.modelmap import cfg_get, sub_config
from anyquant.numerics.probe import vision_input_spec

log = logging.getLogger(__name__)

IMAGE_NAMES = ("astronaut", "coffee", "chelsea", "rocket")
_INSTALL_FIX = "pip install scikit-image"
_IMAGE_TOKEN_KEYS = ("image_token_id", "image_token_index")
_START_KEYS = ("vision_start_token_id", "boi_token_id", "boi_token_index", "image_start_token_id")
_END_KEYS = ("vision_end_token_id", "eoi_token_id", "eoi_token_index", "image_end_token_id")


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


def _forward_params(model: nn.Module) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def _cfg_int(cfg: Any, keys: tuple[str, ...]) -> int | None:
    for k in keys:
        v = getattr(cfg, k, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def image_token_id(model: nn.Module) -> int | None:
    return _cfg_int(getattr(model, "config", None), _IMAGE_TOKEN_KEYS)


def _to_tensor(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v
    if isinstance(v, np.ndarray):
        return torch.from_numpy(v)
    return v


def _keep_forward_inputs(model: nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
    """Only the keys the model's forward names (processors return some a forward with
    **kwargs would pass on and choke on)."""
    params = _forward_params(model)
    return {k: _to_tensor(v) for k, v in inputs.items() if k in params and v is not None}


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


def _synthetic_text(model: nn.Module, n: int, seq_len: int) -> list[list[int]]:
    """Deterministic ids from the lower part of the vocabulary, avoiding every special id the
    config names (image, video, start/end tokens, ...)."""
    cfg = getattr(model, "config", None)
    vocab = None
    for c in (cfg, getattr(cfg, "text_config", None)):
        vocab = vocab or getattr(c, "vocab_size", None)
    if not vocab:
        raise AnyquantError(f"{type(model).__name__}: no vocab_size in its config to build calibration ids from")
    special = set()
    for c in (cfg, getattr(cfg, "text_config", None)):
        for k, v in (vars(c).items() if c is not None else []):
            if re.search(r"_token_(id|index|ids)$", k):
                special.update(v if isinstance(v, (list, tuple)) else [v])
    hi = max(4, int(vocab) * 3 // 4)
    allowed = torch.tensor([t for t in range(3, hi) if t not in special])
    g = torch.Generator().manual_seed(0)
    return [allowed[torch.randint(0, len(allowed), (seq_len,), generator=g)].tolist() for _ in range(n)]


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
        b = _keep_forward_inputs(model, dict(inputs))
        ids = b["input_ids"]
        k = int((ids == img_id).sum()) if img_id is not None else 0
        batches.append(b)
        n_img.append(k)
        n_txt.append(int(ids.shape[1]) - k)
    return VLMCalibration(batches, "processor", n_img, n_txt)


# --------------------------------------------------------------------------- from the config


def _image_processor_for(model: nn.Module):
    """The model type's own image processor class (the PIL one: no torchvision here), with
    patch/merge sizes and square image sizes taken from the vision config. None if the model
    type has none registered."""
    import transformers
    from transformers.models.auto.image_processing_auto import (
        IMAGE_PROCESSOR_MAPPING_NAMES,
    )


    cfg = model.config
    names = IMAGE_PROCESSOR_MAPPING_NAMES.get(getattr(cfg, "model_type", None))
    if not names:
        return None
    if isinstance(names, dict):
        names = [names.get("pil"), names.get("torchvision")]
    elif isinstance(names, str):
        names = [names]
    cls = next((getattr(transformers, n) for n in names if n and hasattr(transformers, n)), None)
    if cls is None:
        return None
    try:
        defaults = cls().to_dict()
    except Exception as e:  # noqa: BLE001 — a third-party constructor; fall back to manual preprocessing, logged
        log.info("%s(): %s; preprocessing images by hand", cls.__name__, e)
        return None
    vcfg = sub_config(cfg, ("vision", "visual"))
    kw: dict[str, Any] = {}
    for key, cfg_keys in (("patch_size", ("patch_size",)), ("temporal_patch_size", ("temporal_patch_size",)),
                          ("merge_size", ("spatial_merge_size", "merge_size"))):
        v = cfg_get(vcfg, *cfg_keys) if vcfg is not None else None
        if key in defaults and isinstance(v, int):
            kw[key] = v
    size = cfg_get(vcfg, "image_size", "img_size") if vcfg is not None else None
    if isinstance(size, (list, tuple)):
        size = size[0]
    if isinstance(size, int):
        for key in ("size", "crop_size"):
            d = defaults.get(key)
            if isinstance(d, dict) and {"height", "width"} <= set(d):
                kw[key] = {"height": size, "width": size}
            elif isinstance(d, dict) and set(d) == {"shortest_edge"}:
                kw[key] = {"shortest_edge": size}
    try:
        return cls(**kw)
    except Exception as e:  # noqa: BLE001 — same as above
        log.info("%s(**%s): %s; preprocessing images by hand", cls.__name__, kw, e)
        return None


def _square(img: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC))


def _config_image_size(model: nn.Module, spec) -> int:
    """Square side for the image: the vision config's image size; else 224 rounded to whole
    patches x merge (patch-sequence models such as Qwen2-VL size themselves from the image)."""

    if spec.size:
        return spec.size
    unit = int(cfg_get(spec.vision_config, "patch_size") or 14) * int(
        cfg_get(spec.vision_config, "spatial_merge_size", "merge_size") or 1)
    return max(unit, 224 // unit * unit)


def config_image_inputs(model: nn.Module, img: np.ndarray) -> dict[str, torch.Tensor]:
    """pixel_values (and whatever else the model type's image processor returns that the
    forward takes: image_grid_thw, image_sizes, ...) for one real image, float32."""

    spec = vision_input_spec(model)
    if spec is None:
        return {}
    side = _config_image_size(model, spec)
    img = _square(img, side)
    proc = _image_processor_for(model)
    if proc is not None:
        try:
            out = proc(images=[img], return_tensors="pt")
            got = _keep_forward_inputs(model, dict(out))
            if "pixel_values" in got:
                return {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in got.items()}
        except Exception as e:  # noqa: BLE001 — logged; the manual path below is the documented fallback
            log.info("%s failed on a calibration image (%s); preprocessing by hand", type(proc).__name__, e)
    x = torch.from_numpy(img).float().permute(2, 0, 1) / 255.0  # (3, H, W) in [0, 1]
    x = (x - 0.5) / 0.5
    if spec.channels != 3:
        x = x.mean(0, keepdim=True).expand(spec.channels, -1, -1)
    return {"pixel_values": x.unsqueeze(0).contiguous()}


def _feature_count(out: Any) -> int | None:
    feats = getattr(out, "pooler_output", None)
    if feats is None and not isinstance(out, (torch.Tensor, list, tuple)):
        feats = getattr(out, "last_hidden_state", None)
    if feats is None:
        feats = out
    if isinstance(feats, torch.Tensor):
        return feats.numel() // feats.shape[-1]
    if isinstance(feats, (list, tuple)) and feats and all(isinstance(f, torch.Tensor) for f in feats):
        return sum(f.numel() // f.shape[-1] for f in feats)
    return None


@torch.no_grad()
def count_image_tokens(model: nn.Module, image_inputs: dict[str, torch.Tensor], text_ids: torch.Tensor) -> int:
    """How many image placeholder tokens the language model expects for these image inputs:
    the features `get_image_features` returns (the model's own method, on the model or a
    submodule), or else the count a forward without placeholders names in its error
    ("tokens: 0, features: N")."""
    device = next(model.parameters()).device
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    inp = {k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device))
           for k, v in image_inputs.items()}
    owner = next((m for m in model.modules() if callable(getattr(m, "get_image_features", None))), None)
    if owner is not None:
        fn = owner.get_image_features
        params = set(inspect.signature(fn).parameters)
        try:
            n = _feature_count(fn(**{k: v for k, v in inp.items() if k in params}))
            if n:
                return n
        except Exception as e:  # noqa: BLE001 — user/remote code; the forward below decides, logged
            log.info("get_image_features failed (%s: %s); counting from a forward", type(e).__name__, e)
    img_id = image_token_id(model)
    try:
        model(input_ids=text_ids.to(device), **inp)
    except Exception as e:  # noqa: BLE001 — the error is the information here
        m = re.search(r"tokens:?\s*(\d+),\s*features:?\s*(\d+)", str(e))
        if not m or img_id is None:
            raise AnyquantError(f"{type(model).__name__}: cannot tell how many image tokens an image needs "
                                f"({type(e).__name__}: {str(e)[:200]})") from e
        n = int(m.group(2))
        # some messages count feature elements, not rows (LLaVA: rows x hidden): try both
        hidden = getattr(model.get_input_embeddings(), "embedding_dim", None)
        for k in [n] + ([n // hidden] if hidden and n % hidden == 0 and n // hidden else []):
            ids = torch.cat([torch.full((1, k), img_id, dtype=torch.long), text_ids], dim=1).to(device)
            try:
                model(input_ids=ids, **inp)
                return k
            except Exception:  # noqa: BLE001, S112 — the next candidate; all failing raises below
                continue
        raise AnyquantError(f"{type(model).__name__}: cannot tell how many image tokens an image needs "
                            f"({type(e).__name__}: {str(e)[:200]})") from e
    return 0


def config_batches(model: nn.Module, tokenizer, text: str | None, n: int, seq_len: int) -> VLMCalibration:
    """Image+text samples without a processor (see the module docstring)."""
    cfg = model.config
    img_id = image_token_id(model)
    if img_id is None:
        raise AnyquantError(f"{type(model).__name__}: its config names no image_token_id / image_token_index, so "
                            "image features cannot be placed in the text; calibrate on text (--calib FILE)")
    notes = []
    if tokenizer is not None and text is not None:
        chunks = _text_chunks(tokenizer, text, n, seq_len)
    else:
        chunks = _synthetic_text(model, n, seq_len)
        notes.append("the model directory has no tokenizer: the text half of each image+text sample is "
                     "deterministic synthetic token ids")
    cfgs = (cfg, getattr(cfg, "text_config", None))
    start = next((v for c in cfgs if c is not None for v in [_cfg_int(c, _START_KEYS)] if v is not None), None)
    end = next((v for c in cfgs if c is not None for v in [_cfg_int(c, _END_KEYS)] if v is not None), None)
    bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    params = _forward_params(model)
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
        pre = ([bos] if bos is not None else []) + ([start] if start is not None else [])
        ids = torch.tensor([pre + [img_id] * k + ([end] if end is not None else [])], dtype=torch.long)
        ids = torch.cat([ids, text_ids], dim=1)
        b = {"input_ids": ids, **image}
        if "attention_mask" in params:
            b["attention_mask"] = torch.ones_like(ids)
        if "mm_token_type_ids" in params:  # transformers' modality ids: 1 marks image positions (M-RoPE)
            b["mm_token_type_ids"] = (ids == img_id).long()
        batches.append(b)
        n_img.append(k)
        n_txt.append(int(ids.shape[1]) - k)
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
