"""Image+text calibration of vision-language models (issue 5): tiny random Llava and Qwen2-VL
built from transformers' config classes, quantized with gptq and awq through anyquant.quantize.

The vision towers are deeper than the language models on purpose: the longest list of blocks
is the vision encoder's, and the runner must still calibrate the language model's."""

from collections import Counter

import pytest
import torch

import anyquant
from anyquant.calib import blocks as calib_blocks
from anyquant.calib import runner
from anyquant.calib.images import IMAGE_NAMES, sample_image, vlm_calibration
from anyquant.runtime.int4_linear import Int4Linear

N_SAMPLES, SEQ = 3, 16
LLAVA_IMAGE_TOKEN = 299


def _word_tokenizer(vocab_size: int, image_token: str, image_id: int):
    """A word-level tokenizer over the news calibration text's most frequent words, with the
    image token at `image_id` (what a real VLM's tokenizer has)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from anyquant.calib.text import calibration_text

    words = Counter(calibration_text()[:100_000].split())
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w, _ in words.most_common(vocab_size - 4):
        vocab.setdefault(w, len(vocab))
    vocab[image_token] = image_id
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.add_special_tokens({"additional_special_tokens": [image_token]})
    return fast


def build_llava(path, processor: bool = False):
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    torch.manual_seed(0)
    v = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                         image_size=28, patch_size=14)
    t = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=300, bos_token_id=1, eos_token_id=2)
    LlavaForConditionalGeneration(LlavaConfig(vision_config=v, text_config=t,
                                              image_token_index=LLAVA_IMAGE_TOKEN)).save_pretrained(path)
    tok = _word_tokenizer(LLAVA_IMAGE_TOKEN, "<image>", LLAVA_IMAGE_TOKEN)
    if processor:
        from transformers import LlavaImageProcessorPil, LlavaProcessor

        ip = LlavaImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
        template = ("{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n"
                    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}\n{% endfor %}")
        LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                       num_additional_image_tokens=1, chat_template=template, image_token="<image>").save_pretrained(path)
    else:
        tok.save_pretrained(path)
    return path


def build_qwen2_vl(path):
    """No tokenizer: the text half of each sample is synthetic ids (noted)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(0)
    cfg = Qwen2VLConfig(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, bos_token_id=1, eos_token_id=2,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=3, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        image_token_id=298, video_token_id=297, vision_start_token_id=296, vision_end_token_id=295)
    Qwen2VLForConditionalGeneration(cfg).save_pretrained(path)
    return path


BUILDERS = {"llava": build_llava, "llava-processor": lambda p: build_llava(p, processor=True),
            "qwen2-vl": build_qwen2_vl}
LM_BLOCKS = "model.language_model.layers"
VISION_KEY_PREFIX = "vision_tower."   # a Llava checkpoint's vision tower keys
VISION = {"llava": "model.vision_tower", "llava-processor": "model.vision_tower", "qwen2-vl": "model.visual"}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlms")
    return {k: b(root / k) for k, b in BUILDERS.items()}


@pytest.fixture(scope="module")
def runs(model_dirs, tmp_path_factory):
    """Every (model, method) quantized once, recording what the first calibrated block received."""
    out_root = tmp_path_factory.mktemp("vlm-outs")
    seen: dict = {}
    orig = runner.capture_inputs

    def spy(model, first_block, calib, batch_size):
        batches = orig(model, first_block, calib, batch_size)
        seen["capture"] = (model, first_block, calib, batches)
        return batches

    results = {}
    mp = pytest.MonkeyPatch()
    mp.setattr(runner, "capture_inputs", spy)
    try:
        for name, path in model_dirs.items():
            for method in ("gptq", "awq"):
                seen.clear()
                r = anyquant.quantize(str(path), method, progress=False, checkpoint_dir=None,
                                      n_samples=N_SAMPLES, seq_len=SEQ)
                results[name, method] = (r, anyquant.save(r, out_root / f"{name}-{method}"), seen["capture"])
    finally:
        mp.undo()
    return results


CASES = [(n, m) for n in BUILDERS for m in ("gptq", "awq")]


@pytest.mark.parametrize("name,method", CASES)
def test_language_blocks_calibrate_on_image_tokens(runs, name, method):
    r, _, (model, first_block, calib, batches) = runs[name, method]
    assert first_block is model.get_submodule(f"{LM_BLOCKS}.0")  # not the (longer) vision encoder list
    assert [b["block"] for b in r.report["calibration"]["blocks"]] == [f"{LM_BLOCKS}.0", f"{LM_BLOCKS}.1"]
    assert r.report["calibration"]["calibration"]["image_samples"] == N_SAMPLES
    assert any(f"calibrated on {N_SAMPLES} image+text samples" in n for n in r.report["notes"])
    assert len(calib) == len(batches) == N_SAMPLES
    img_id = model.config.image_token_id
    embed = model.get_input_embeddings()
    owner = model.model
    for inputs, (args, kwargs) in zip(calib, batches):
        ids = inputs["input_ids"]
        h = args[0] if args else kwargs["hidden_states"]
        is_img = ids[0] == img_id
        n_img = int(is_img.sum())
        assert n_img > 0 and h.shape[1] == ids.shape[1] == n_img + int((~is_img).sum())
        # the block saw the projected image features at the image positions, token embeddings elsewhere
        extra = {k: v for k, v in inputs.items() if k in ("image_grid_thw",)}
        with torch.no_grad():
            feats = owner.get_image_features(pixel_values=inputs["pixel_values"], **extra).pooler_output
            feats = torch.cat(list(feats)) if isinstance(feats, (list, tuple)) else feats
            torch.testing.assert_close(h[0, is_img], feats.reshape(-1, h.shape[-1]).to(h.dtype))
            torch.testing.assert_close(h[0, ~is_img], embed(ids[:, ~is_img])[0])
    if name == "qwen2-vl":  # no tokenizer in that directory
        assert any("synthetic token ids" in n for n in r.report["notes"])
    else:
        words = model.config.text_config.vocab_size  # text ids are real news words, not all <unk>
        text = calib[0]["input_ids"][0][calib[0]["input_ids"][0] != img_id]
        assert (text > 2).float().mean() > 0.5 and int(text.max()) < words


@pytest.mark.parametrize("name,method", CASES)
def test_save_reload_same_logits_vision_in_float(runs, model_dirs, name, method):
    r, out, _ = runs[name, method]
    inputs = vlm_calibration(r.model, model_dir=model_dirs[name], tokenizer=r.tokenizer, n_samples=1,
                             seq_len=12).batches[0]
    with torch.no_grad():
        ref = r.model(**inputs).logits
        back = anyquant.load(out)(**inputs).logits
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(back, ref, rtol=0, atol=0)
    vision = VISION[name]
    int4 = [n for n, m in r.model.named_modules() if isinstance(m, Int4Linear)]
    assert int4 and all(n.startswith(LM_BLOCKS) for n in int4)
    vlin = [m for n, m in r.model.named_modules() if n.startswith(vision) and isinstance(m, torch.nn.Linear)]
    assert vlin and all(m.weight.is_floating_point() for m in vlin)
    assert all(d.action == "keep" for d in r.plan.decisions if d.component == "vision tower")


def test_calib_file_on_vlm_is_text_only_and_noted(model_dirs, tmp_path):
    f = tmp_path / "calib.txt"
    f.write_text("The council said on Tuesday that the new bridge would open next year . " * 40)
    r = anyquant.quantize(str(model_dirs["llava"]), "gptq", progress=False, checkpoint_dir=None, calib=str(f),
                          n_samples=2, seq_len=SEQ)
    assert "image_samples" not in r.report["calibration"]["calibration"]
    assert any("calibrated text-only on --calib" in n for n in r.report["notes"])


def test_find_blocks_prefers_listed_modules():
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    v = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                         image_size=28, patch_size=14)
    t = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=300)
    m = LlavaForConditionalGeneration(LlavaConfig(vision_config=v, text_config=t, image_token_index=299))
    assert calib_blocks.find_blocks(m)[0] == "model.vision_tower.encoder.layers"  # the longest list
    assert calib_blocks.find_blocks(m, prefer=[f"{LM_BLOCKS}.1.mlp.up_proj"])[0] == LM_BLOCKS


def test_calibration_images_are_real_and_varied():
    imgs = [sample_image(i) for i in range(2 * len(IMAGE_NAMES))]
    assert all(im.ndim == 3 and im.shape[2] == 3 and im.dtype.name == "uint8" for im in imgs)
    assert imgs[0].shape == (512, 512, 3)  # astronaut
    assert len({(im.shape, int(im.sum())) for im in imgs}) == len(imgs)  # crops differ from the originals


@pytest.mark.parametrize("name", list(BUILDERS))
def test_streamed_vlm_equals_in_memory(runs, model_dirs, tmp_path, name):
    """Streaming a VLM (quantize_to_disk, one unit read at a time) writes what the in-memory path
    writes, tensor for tensor: language blocks calibrated on image tokens, the vision tower in
    float, and the checkpoint's own key layout (a Llava's `language_model.model.*`, which the
    streamed writer used to double into `language_model.model.model.*`)."""
    from anyquant.stream import quantize_to_disk
    from tests.test_stream import tensors

    _, saved, _ = runs[name, "gptq"]
    quantize_to_disk(model_dirs[name], "gptq", tmp_path / "st", progress=False, checkpoint_dir=None,
                     n_samples=N_SAMPLES, seq_len=SEQ)
    a, b = tensors(saved), tensors(tmp_path / "st")
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_streamed_vlm_with_vision_quantized_equals_in_memory(model_dirs, tmp_path):
    """--include-vision with a calibrated method: the vision tower's Linears lie outside the
    calibrated blocks and are rounded to nearest; streamed, each of its units is read, rounded
    and written in turn (they used to be left on the meta device and fail)."""
    from anyquant.stream import quantize_to_disk
    from tests.test_stream import tensors

    opts = {"progress": False, "checkpoint_dir": None, "n_samples": N_SAMPLES, "seq_len": SEQ, "include_vision": True}
    r = anyquant.quantize(str(model_dirs["llava"]), "awq", **opts)
    anyquant.save(r, tmp_path / "mem", verify=False)
    quantize_to_disk(model_dirs["llava"], "awq", tmp_path / "st", **opts)
    a, b = tensors(tmp_path / "mem"), tensors(tmp_path / "st")
    assert any(k.startswith(VISION_KEY_PREFIX) and k.endswith("weight_packed") for k in a)
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
