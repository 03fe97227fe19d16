"""The one builder of probe inputs: small deterministic token ids (and images for a VLM) made
from the model's config. Every probe (dtype policy, weights read outside forward, boundary
checks, verification) and doctor run on these, so their findings are about the same forward.

A VLM's image forward needs more than `pixel_values`: the ids must hold one image placeholder
token per image feature (wrapped in the start/end tokens the config declares), and many models
take grid or size inputs (`image_grid_thw`, `image_sizes`, ...). `image_text_sample` builds that
from the config alone — the model type's own image processor (sizes from the vision config), the
placeholder count from the model's `get_image_features` or from the error a forward without
placeholders raises — and is shared with the image calibration data (calib/images.py), which
feeds it real photos. The probe feeds it a deterministic synthetic image.

`probe_inputs_and_notes` tries, for a VLM, (1) that image+text sample, (2) synthetic ids +
the processed image with as many placeholders as a forward's error names (0 for a model that
reads images without placeholders), (3) where no PIL image processor runs here (several are
torchvision-only), image inputs shaped from the vision config by the kind of tower the
forward's arguments name (`patch_sequence_candidates`: patch sequences with `image_grid_thw`,
NaViT patch rows with `spatial_shapes`, MiniCPM-V patch strips with `target_sizes`, patch rows
of a model without a tower, space-time patch cubes); the first whose forward runs *and* calls
a module the text-only forward does not (a forward that ignores the image is no image probe)
is the probe's input. Where none does, the inputs are ids + config-shaped `pixel_values` (or
ids only), and the probe forward (numerics/probe.py `run_probe`) probes text only and records
why in `ProbeFacts.image_failure`: the modules the image path would have run stay in float
with that reason in the plan.
"""

from __future__ import annotations

import inspect
import logging
import re
from typing import Any

import numpy as np
import torch
from torch import nn

from anyquant.errors import AnyquantError
from anyquant.model.modelmap import cfg_get, sub_config
from anyquant.model.tree import device_of
from anyquant.numerics.probe import (
    has_image_input,
    takes_images,
    vision_input_spec,
    vision_probe_inputs,
)

log = logging.getLogger(__name__)

IMAGE_TOKEN_KEYS = ("image_token_id", "image_token_index")
START_KEYS = ("vision_start_token_id", "boi_token_id", "boi_token_index", "image_start_token_id")
END_KEYS = ("vision_end_token_id", "eoi_token_id", "eoi_token_index", "image_end_token_id")
_DTYPE_ERROR = re.compile(r"dtype|Input type \(|type \(c10::|same type|c10::(Half|BFloat16|Float)")
_COUNT_RE = re.compile(r"tokens:?\s*(\d+),\s*features:?\s*(\d+)")


# --------------------------------------------------------------------------- config helpers


def forward_params(model: nn.Module) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def cfg_int(cfg: Any, keys: tuple[str, ...]) -> int | None:
    for k in keys:
        v = getattr(cfg, k, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def image_token_id(model: nn.Module) -> int | None:
    return cfg_int(getattr(model, "config", None), IMAGE_TOKEN_KEYS)


def to_tensor(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v
    if isinstance(v, np.ndarray):
        return torch.from_numpy(v)
    return v


def keep_forward_inputs(model: nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
    """Only the keys the model's forward names (processors return some a forward with
    **kwargs would pass on and choke on)."""
    params = forward_params(model)
    return {k: to_tensor(v) for k, v in inputs.items() if k in params and v is not None}


def vocab_size(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    vocab = None
    for cfg in (config, getattr(config, "text_config", None)):
        vocab = vocab or getattr(cfg, "vocab_size", None)
    return int(vocab) if vocab else None


def synthetic_text_ids(model: nn.Module, n: int, seq_len: int, seed: int = 0) -> list[list[int]]:
    """Deterministic ids from the lower part of the vocabulary, avoiding every special id the
    config names (image, video, start/end tokens, ...)."""
    cfg = getattr(model, "config", None)
    vocab = vocab_size(model)
    if not vocab:
        raise AnyquantError(f"{type(model).__name__}: no vocab_size in its config to build token ids from")
    special = set()
    for c in (cfg, getattr(cfg, "text_config", None)):
        for k, v in (vars(c).items() if c is not None else []):
            if re.search(r"_token_(id|index|ids)$", k):
                special.update(v if isinstance(v, (list, tuple)) else [v])
    hi = max(4, int(vocab) * 3 // 4)
    allowed = torch.tensor([t for t in range(3, hi) if t not in special])
    g = torch.Generator().manual_seed(seed)
    return [allowed[torch.randint(0, len(allowed), (seq_len,), generator=g)].tolist() for _ in range(n)]


# --------------------------------------------------------------------------- images from the config


def _processor_class(model_type: str | None):
    """The PIL image processor class registered for `model_type`, or for the type it extends
    (`glm4v_moe` -> `glm4v`, `qwen3_vl_moe` -> `qwen3_vl`, `..._thinker`): None if none."""
    import transformers
    from transformers.models.auto.image_processing_auto import (
        IMAGE_PROCESSOR_MAPPING_NAMES,
    )

    parts = (model_type or "").split("_")
    for i in range(len(parts), 0, -1):
        names = IMAGE_PROCESSOR_MAPPING_NAMES.get("_".join(parts[:i]))
        if not names:
            continue
        if isinstance(names, dict):
            names = [names.get("pil"), names.get("torchvision")]
        elif isinstance(names, str):
            names = [names]
        cls = next((getattr(transformers, n) for n in names if n and hasattr(transformers, n)), None)
        if cls is not None:
            return cls
    return None


def _cfg_value(cfgs: tuple[Any, ...], key: str) -> Any:
    for c in cfgs:
        v = cfg_get(c, key) if c is not None else None
        if v is not None:
            return v
    return None


def image_processor_for(model: nn.Module):
    """The model type's own image processor class (the PIL one: no torchvision here), set up
    for the tower the config describes: patch/merge sizes from the vision config, every other
    processor setting the config also names (`image_grid_pinpoints`, `max_image_tiles`, ...),
    square image sizes from the vision config, and no tiling of the image (the probe image is
    already the tower's size; the processor's default split sizes are the full model's, which a
    small config does not share). None if the model type has none registered."""
    cfg = model.config
    cls = _processor_class(getattr(cfg, "model_type", None))
    if cls is None:
        return None
    try:
        defaults = cls().to_dict()
    except Exception as e:  # noqa: BLE001 — a third-party constructor; fall back to manual preprocessing, logged
        log.info("%s(): %s; preprocessing images by hand", cls.__name__, e)
        return None
    vcfg = sub_config(cfg, ("vision", "visual"))
    cfgs = (vcfg, cfg)
    kw: dict[str, Any] = {}
    for key, cfg_keys in (("patch_size", ("patch_size",)), ("temporal_patch_size", ("temporal_patch_size",)),
                          ("merge_size", ("spatial_merge_size", "merge_size"))):
        v = cfg_get(vcfg, *cfg_keys) if vcfg is not None else None
        if key in defaults and isinstance(v, int):
            kw[key] = v
    for key, d in defaults.items():  # settings the processor and the config share: the config's
        v = _cfg_value(cfgs, key)
        if key not in kw and v is not None and type(v) is type(d) and isinstance(v, (int, list)) \
                and not isinstance(v, bool) and key not in ("size", "crop_size"):
            kw[key] = v
    if defaults.get("do_image_splitting"):
        kw["do_image_splitting"] = False
    size = _cfg_value(cfgs, "image_size") or _cfg_value(cfgs, "img_size")
    if isinstance(size, (list, tuple)):
        size = size[0]
    if isinstance(size, int):
        for key in ("size", "crop_size", "max_image_size"):
            d = defaults.get(key)
            if isinstance(d, dict) and {"height", "width"} <= set(d):
                kw[key] = {"height": size, "width": size}
            elif isinstance(d, dict) and set(d) == {"shortest_edge"}:
                kw[key] = {"shortest_edge": size}
            elif isinstance(d, dict) and set(d) == {"longest_edge"}:
                kw[key] = {"longest_edge": size}
    for key, d in defaults.items():  # a second tower's input ("high_res_size" <- high_res_vision_config)
        other = getattr(cfg, key[: -len("_size")] + "_vision_config", None) if key.endswith("_size") else None
        side = _first_int(cfg_get(other, "image_size")) if other is not None else None
        if side and isinstance(d, dict) and {"height", "width"} <= set(d):
            kw[key] = {"height": side, "width": side}
    try:
        return cls(**kw)
    except Exception as e:  # noqa: BLE001 — same as above
        log.info("%s(**%s): %s; preprocessing images by hand", cls.__name__, kw, e)
        return None


def _square(img: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    return np.array(Image.fromarray(img).resize((size, size), Image.BICUBIC))  # writable: torch.from_numpy


def config_image_size(spec) -> int:
    """Square side for the image: the vision config's image size; else 224 rounded to whole
    patches x merge (patch-sequence models such as Qwen2-VL size themselves from the image)."""
    if spec.size:
        return spec.size
    unit = (_first_int(cfg_get(spec.vision_config, "patch_size")) or 14) * (
        _first_int(cfg_get(spec.vision_config, "spatial_merge_size", "merge_size")) or 1)
    return max(unit, 224 // unit * unit)


def synthetic_image(seed: int = 0, size: int = 64) -> np.ndarray:
    """A deterministic (size, size, 3) uint8 RGB image: smooth gradients plus noise (an image
    processor normalizes it like a photo; no file or download needed)."""
    g = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / max(1, size - 1)
    base = np.stack([x, y, (x + y) / 2], axis=-1) * 200
    return np.clip(base + g.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)


def config_image_inputs(model: nn.Module, img: np.ndarray) -> dict[str, torch.Tensor]:
    """pixel_values (and whatever else the model type's image processor returns that the
    forward takes: image_grid_thw, image_sizes, ...) for one image, float32."""
    spec = vision_input_spec(model)
    if spec is None:
        return {}
    side = config_image_size(spec)
    img = _square(img, side)
    proc = image_processor_for(model)
    if proc is not None:
        try:
            out = proc(images=[img], return_tensors="pt")
            got = keep_forward_inputs(model, dict(out))
            if "pixel_values" in got:
                return {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in got.items()}
        except Exception as e:  # noqa: BLE001 — logged; the manual path below is the documented fallback
            log.info("%s failed on an image (%s); preprocessing by hand", type(proc).__name__, e)
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


def _on_model(model: nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    device = device_of(model)
    dtype = p.dtype if p is not None else torch.float32
    return {k: ((v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device))
                if torch.is_tensor(v) else v) for k, v in inputs.items()}


@torch.no_grad()
def count_image_tokens(model: nn.Module, image_inputs: dict[str, torch.Tensor], text_ids: torch.Tensor) -> int:
    """How many image placeholder tokens the language model expects for these image inputs:
    the features `get_image_features` returns (the model's own method, on the model or a
    submodule), or else the count a forward without placeholders names in its error
    ("tokens: 0, features: N")."""
    inp = _on_model(model, image_inputs)
    device = device_of(model)
    owner = next((m for m in model.modules() if callable(getattr(m, "get_image_features", None))), None)
    if owner is not None:
        fn = owner.get_image_features
        try:
            params = set(inspect.signature(fn).parameters)
            n = _feature_count(fn(**{k: v for k, v in inp.items() if k in params}))
            if n:
                return n
        except Exception as e:  # noqa: BLE001 — user/remote code; the forward below decides, logged
            log.info("get_image_features failed (%s: %s); counting from a forward", type(e).__name__, e)
    img_id = image_token_id(model)
    try:
        model(input_ids=text_ids.to(device), **inp)
    except Exception as e:  # the error is the information here
        m = _COUNT_RE.search(str(e))
        if not m or img_id is None:
            raise AnyquantError(f"{type(model).__name__}: cannot tell how many image tokens an image needs "
                                f"({type(e).__name__}: {str(e)[:200]})") from e
        n = int(m.group(2))
        # some messages count feature elements, not rows (LLaVA: rows x hidden): try both
        hidden = getattr(model.get_input_embeddings(), "embedding_dim", None)
        for k in [n] + ([n // hidden] if hidden and n % hidden == 0 and n // hidden else []):
            b = _on_model(model, image_text_sample(model, image_inputs, text_ids[0].tolist(), k))
            try:
                model(**b)
                return k
            except Exception:  # noqa: BLE001, S112 — the next candidate; all failing raises below
                continue
        raise AnyquantError(f"{type(model).__name__}: cannot tell how many image tokens an image needs "
                            f"({type(e).__name__}: {str(e)[:200]})") from e
    return 0


def image_text_sample(model: nn.Module, image: dict[str, torch.Tensor], text_ids: list[int],
                      n_image_tokens: int, bos: int | None = None) -> dict[str, torch.Tensor]:
    """One image+text forward input: [bos] [start] image-token x n [end] text, the image
    inputs, and the attention mask / modality ids the forward takes."""
    cfg = model.config
    img_id = image_token_id(model)
    cfgs = (cfg, getattr(cfg, "text_config", None))
    start = next((v for c in cfgs if c is not None for v in [cfg_int(c, START_KEYS)] if v is not None), None)
    end = next((v for c in cfgs if c is not None for v in [cfg_int(c, END_KEYS)] if v is not None), None)
    pre = ([bos] if bos is not None else []) + ([start] if start is not None else [])
    ids = torch.tensor([pre + [img_id] * n_image_tokens + ([end] if end is not None else []) + list(text_ids)],
                       dtype=torch.long)
    params = forward_params(model)
    b = {"input_ids": ids, **image}
    if "attention_mask" in params:
        b["attention_mask"] = torch.ones_like(ids)
    if "mm_token_type_ids" in params:  # transformers' modality ids: 1 marks image positions (M-RoPE)
        b["mm_token_type_ids"] = (ids == img_id).long()
    return b


def _first_int(v: Any) -> int | None:
    if isinstance(v, (list, tuple)) and v:
        v = v[0]
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def patch_sequence_candidates(model: nn.Module, seed: int = 0):
    """(label, image inputs) for a patch-sequence tower (Qwen2-VL-like: the forward takes
    `image_grid_thw` or `image_grid_hw` and `pixel_values` is one row per patch; NaViT-like:
    `spatial_shapes` and a patch mask; MiniCPM-V-like: `target_sizes` and the patches side by
    side; Fuyu-like, no vision tower: patch rows the model embeds itself), built from the
    vision config alone where no image processor runs here (torchvision-only processors): a
    synthetic image of 2 x merge patches a side, cut into patches, as a grid of 1 x h x w. The
    row layout is not in the config, so each layout such towers use is a candidate, most
    common first; the forward decides."""
    params = forward_params(model)
    grid_key = next((k for k in ("image_grid_thw", "image_grid_hw", "spatial_shapes", "target_sizes")
                     if k in params), None)
    cfg = model.config
    vcfg = sub_config(cfg, ("vision", "visual"))
    rows_only = grid_key is None and vcfg is None  # no tower: the model embeds patch rows itself (Fuyu)
    cfgs = (vcfg, cfg)
    video_patches = grid_key is None and vcfg is not None and (_first_int(_cfg_value(cfgs, "temporal_patch_size"))
                                                                or 1) > 1
    if (grid_key is None and not rows_only and not video_patches) or "pixel_values" not in params:
        return
    p = _first_int(_cfg_value(cfgs, "patch_size")) or 14
    merge = (_first_int(_cfg_value(cfgs, "spatial_merge_size")) or _first_int(_cfg_value(cfgs, "merge_size"))
             or _first_int(_cfg_value(cfgs, "merge_kernel_size")) or _first_int(_cfg_value(cfgs, "downsample_factor"))
             or 1)
    t = _first_int(_cfg_value(cfgs, "temporal_patch_size")) or _first_int(_cfg_value(cfgs, "patch_temporal")) or 1
    c = _first_int(_cfg_value(cfgs, "in_channels")) or _first_int(_cfg_value(cfgs, "num_channels")) or 3
    side = 2 * merge
    img = synthetic_image(seed, side * p)
    x = (torch.from_numpy(img).float().permute(2, 0, 1) / 255.0 - 0.5) / 0.5  # (3, H, W)
    x = x[:1].expand(c, -1, -1) if c != 3 else x
    patches = x.reshape(c, side, p, side, p).permute(1, 3, 0, 2, 4).reshape(side * side, c, p, p)
    n = side * side
    grid = torch.tensor([[1, side, side]] if (grid_key or "").endswith("thw") else [[side, side]], dtype=torch.long)
    layouts = {
        f"(patches, {c}x{t}x{p}x{p})": patches.unsqueeze(2).expand(-1, -1, t, -1, -1).reshape(n, c * t * p * p),
        f"(patches, {c}, {p}, {p})": patches,
        f"(patches, {c}x{p}x{p})": patches.reshape(n, c * p * p),
    }
    if video_patches:  # a tower of space-time patches and no grid input (Inkling): one frame repeated
        frames = patches.unsqueeze(2).expand(-1, -1, t, -1, -1)  # (n, c, t, p, p)
        yield f"patch cubes (patches, {t}, {p}, {p}, {c}) from the vision config", {
            "pixel_values": frames.permute(0, 2, 3, 4, 1).contiguous()}
        yield f"patch cubes (patches, {c}, {t}, {p}, {p}) from the vision config", {"pixel_values": frames.contiguous()}
        return
    if rows_only:
        yield (f"patch rows (1, patches, {c}x{p}x{p}) from the config",
               {"pixel_values": patches.permute(0, 2, 3, 1).reshape(1, n, p * p * c).contiguous()})
        return
    if grid_key == "target_sizes":  # MiniCPM-V: the patches side by side in one row, (h, w) in patches
        yield (f"patch strip (1, {c}, {p}, patches x {p}) from the vision config",
               {"pixel_values": patches.permute(1, 2, 0, 3).reshape(1, c, p, n * p).contiguous(),
                "target_sizes": torch.tensor([[side, side]], dtype=torch.int32)})
        return
    if grid_key == "spatial_shapes":  # NaViT-style (Siglip2): a batch of padded patch rows, a mask, (h, w)
        yield (f"patch rows (1, patches, {c}x{p}x{p}) from the vision config",
               {"pixel_values": patches.reshape(1, n, c * p * p), "spatial_shapes": torch.tensor([[side, side]]),
                "pixel_attention_mask": torch.ones(1, n, dtype=torch.long)})
        return
    for label, pv in layouts.items():
        yield f"patch sequence {label} from the vision config", {"pixel_values": pv.contiguous(), grid_key: grid}


# --------------------------------------------------------------------------- the probe's inputs


@torch.no_grad()
def _runs(model: nn.Module, inputs: dict[str, Any], called: set[str] | None = None) -> str | None:
    """None if `model(**inputs)` runs, else the error in one line. `called`, if given, receives
    the names of the modules whose forward ran."""
    was = model.training
    model.eval()
    handles = []
    if called is not None:
        for name, mod in model.named_modules():
            handles.append(mod.register_forward_pre_hook(lambda _m, _a, name=name: called.add(name)))
    try:
        model(**_on_model(model, inputs))
        return None
    except Exception as e:  # noqa: BLE001 — user/remote code; the caller tries the next candidate
        return f"{type(e).__name__}: {str(e)[:160]}"
    finally:
        for h in handles:
            h.remove()
        model.train(was)


def _vlm_candidates(model: nn.Module, seq_len: int, seed: int):
    """(label, builder) pairs of image+text inputs, most specific first (module docstring)."""
    text = synthetic_text_ids(model, 1, seq_len // 2, seed)[0]
    img_id = image_token_id(model)
    params = forward_params(model)

    def image():
        spec = vision_input_spec(model)
        return config_image_inputs(model, synthetic_image(seed, config_image_size(spec)))

    def with_placeholders():
        img = image()
        k = count_image_tokens(model, img, torch.tensor([text], dtype=torch.long))
        if k == 0:
            raise AnyquantError("the vision path gives no features for the probe image")
        return image_text_sample(model, img, text, k)

    def error_count():  # placeholders as many as a forward's error names; 0 for models that need none
        img = image()
        n, last = 0, None
        for _ in range(3):
            ids = torch.tensor([[img_id if img_id is not None else 3] * n + text], dtype=torch.long)
            b = {"input_ids": ids, **img}
            if "attention_mask" in params:
                b["attention_mask"] = torch.ones_like(ids)
            if "mm_token_type_ids" in params and img_id is not None:
                b["mm_token_type_ids"] = (ids == img_id).long()
            err = _runs(model, b)
            if err is None:
                return b
            m = _COUNT_RE.search(err)
            if not m or int(m.group(2)) == n or img_id is None:
                last = err
                break
            n = int(m.group(2))
        raise AnyquantError(last or "placeholder count did not settle")

    if img_id is not None:
        yield "image placeholders counted from the vision features", with_placeholders
    yield "image placeholders counted from the forward's error", error_count
    if img_id is None:
        return
    for label, img in patch_sequence_candidates(model, seed):
        def from_patches(img=img):
            k = count_image_tokens(model, img, torch.tensor([text], dtype=torch.long))
            if k == 0:
                raise AnyquantError("the vision path gives no features for the probe patches")
            return image_text_sample(model, img, text, k)
        yield f"{label}, placeholders counted from the vision features", from_patches


def probe_inputs_and_notes(model: nn.Module, seq_len: int = 32, seed: int = 0
                           ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """probe_inputs, plus notes on how a VLM's image inputs were built (or why none ran)."""
    vocab = vocab_size(model)
    if not vocab:
        raise AnyquantError(
            f"{type(model).__name__}: cannot build probe inputs (no vocab_size in its config)"
        )
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, int(vocab), (1, seq_len), generator=g)
    device = device_of(model)
    legacy = {"input_ids": ids.to(device), **vision_probe_inputs(model, g)}
    if not takes_images(model) or (image_token_id(model) is None and not _has_processor(model)):
        # no image placeholders to place and no image processor: ids + pixel_values as they are
        return legacy, []
    tried = []
    text_called: set[str] = set()
    _runs(model, {"input_ids": ids}, text_called)
    for label, build in _vlm_candidates(model, seq_len, seed):
        try:
            b = build()
        except Exception as e:  # noqa: BLE001 — user/remote code; the next candidate, reported below
            tried.append(f"{label}: {type(e).__name__}: {str(e)[:160]}")
            continue
        called: set[str] = set()
        err = _runs(model, b, called)
        if err is None and not called - text_called:
            # a forward that runs but ignores the image (an input it needs to use it is missing)
            # probes nothing more than the text forward: not an image probe
            err = "runs, but no module beyond the text-only forward's ran: the image was ignored"
        if err is None:
            log.info("probe inputs of %s: %s", type(model).__name__, label)
            return _on_model(model, b), []
        tried.append(f"{label}: {err}")
    note = (f"probe image inputs could not be built from the config ({'; '.join(tried)}); probing with "
            + ("ids + pixel_values of the vision config's shape" if has_image_input(legacy) else "ids only"))
    log.info(note)
    return legacy, [note]


def _has_processor(model: nn.Module) -> bool:
    return _processor_class(getattr(getattr(model, "config", None), "model_type", None)) is not None


def probe_inputs(model: nn.Module, seq_len: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    """Small deterministic inputs built from the config: token ids; for a VLM, an image+text
    sample whose forward runs (module docstring)."""
    return probe_inputs_and_notes(model, seq_len, seed)[0]


def runnable_probe_inputs(model: nn.Module, seq_len: int = 32, seed: int = 0
                          ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """probe_inputs whose forward runs as the model is (doctor: float32, stock transformers):
    where the image forward fails, the text-only inputs and a note saying the image path (the
    vision tower and projector) was not probed. Raises when even the text forward fails."""
    inputs, notes = probe_inputs_and_notes(model, seq_len, seed)
    if not has_image_input(inputs):
        return inputs, notes
    err = _runs(model, inputs)
    if err is None or _DTYPE_ERROR.search(err):
        # a dtype mismatch is what the boundary check (F1) finds and fixes with casts: keep the images
        return inputs, notes
    text_only = {"input_ids": inputs["input_ids"]}
    text_err = _runs(model, text_only)
    if text_err is not None:
        raise AnyquantError(f"probe forward of {type(model).__name__} failed with images ({err}) and text-only "
                            f"({text_err}); doctor needs one forward of the model")
    note = (f"the forward with images failed ({err}); probed text-only: the vision tower and projector were not "
            "probed, so no finding there was reproduced")
    log.warning(note)
    return text_only, notes + [note]
