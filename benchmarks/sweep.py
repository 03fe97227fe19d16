"""Architecture sweep: every causal-LM and image-text-to-text architecture in the installed
transformers that can be instantiated from a shrunken default config (random weights, float32, CPU).

For each model type: build a shrunken config (2 layers, width 64, 4 heads, vocab 256; vision
sub-configs likewise, images of 4x4 patches), instantiate it with random weights, run it in float
on synthetic inputs (token ids; for VLMs also pixel values, with as many image placeholder tokens
as the model reports image features), save it, and then:

- anyquant nf4 / int8 / int4: `anyquant.quantize(<saved dir>)` -> forward -> `anyquant.save` ->
  `anyquant.load` -> forward; pass = error against float within a loose bound (it catches
  breakage, not quality) and the reloaded model gives the same logits as the in-memory one;
- plain transformers + `BitsAndBytesConfig` defaults (nf4, int8) on the same saved float model;
- per type: whether the quantize probe ran the image path (VLMs), whether `anyquant.doctor` ran, and per
  method the share of parameters quantized, fused MoE expert parameters left in float, and whether stock
  transformers reloads the output with the same logits (as `anyquant.save` verified it).

Each type runs in a forked child with a time limit, so a hang or a crash costs one row, not the
sweep; the parent imports torch/transformers/anyquant once (children inherit them) and runs no
torch ops itself. Prints a table and writes benchmarks/results/sweep.json.

    .venv/bin/python benchmarks/sweep.py                        # everything (~4-8 min on 2 shared cores)
    .venv/bin/python benchmarks/sweep.py --types gpt2,mixtral   # some types
    .venv/bin/python benchmarks/sweep.py --task image-text --limit 10
    .venv/bin/python benchmarks/sweep.py --show                 # print the table of the last run
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402

METHODS = ["nf4", "int8", "int4"]
BNB_METHODS = ["nf4", "int8"]
BOUND = {"nf4": 0.5, "int8": 0.1, "int4": 0.5}  # relative logits error: catches breakage, not quality
RELOAD_BOUND = 1e-3  # anyquant.load(save(model)) computes what the in-memory model computes
VOCAB = 256
LAYERS = 2
WIDTH = 64

# Integer config fields shrunk (never grown) wherever they appear, sub-configs included.
SHRINK = {
    "hidden_size": WIDTH, "n_embd": WIDTH, "d_model": WIDTH, "embed_dim": WIDTH, "dim": WIDTH,
    "model_dim": WIDTH, "width": WIDTH, "out_hidden_size": WIDTH, "projection_dim": WIDTH,
    "intermediate_size": 128, "ffn_dim": 128, "n_inner": 128, "mlp_dim": 128, "moe_intermediate_size": 64,
    "shared_expert_intermediate_size": 64, "expert_intermediate_size": 64, "d_ff": 128, "d_kv": 16,
    "num_hidden_layers": LAYERS, "n_layer": LAYERS, "num_layers": LAYERS, "n_layers": LAYERS,
    "depth": LAYERS, "num_decoder_layers": LAYERS, "num_encoder_layers": LAYERS, "encoder_layers": LAYERS,
    "decoder_layers": LAYERS, "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "num_heads": 4,
    "encoder_attention_heads": 4, "decoder_attention_heads": 4, "num_key_value_heads": 2, "n_kv_heads": 2,
    "num_kv_heads": 2, "head_dim": 16, "attention_head_dim": 16, "vocab_size": VOCAB,
    # a head narrower than the padded vocabulary (Inkling2), as in the shipped config
    "unpadded_vocab_size": VOCAB - 16,
    "max_position_embeddings": 256, "n_positions": 256, "num_experts": 4, "num_local_experts": 4,
    "n_routed_experts": 4, "moe_num_experts": 4, "num_experts_per_tok": 2, "moe_topk": 2, "top_k": 2,
    "n_group": 1, "topk_group": 1, "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8, "v_head_dim": 16, "n_shared_experts": 1, "num_shared_experts": 1,
    "state_size": 16, "d_state": 16, "mamba_d_state": 16, "mamba_n_heads": 4, "mamba_head_dim": 16,
    "expand": 1, "mamba_expand": 1, "mamba_d_head": 16, "d_head": 16, "time_step_rank": 8, "conv_kernel": 4, "linear_num_key_heads": 2,
    "linear_num_value_heads": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
    "projection_hidden_size": WIDTH, "projector_hidden_size": WIDTH, "vision_hidden_size": WIDTH,
    "vision_output_dim": WIDTH, "projector_input_dim": WIDTH, "projector_output_dim": WIDTH,
    "intermediate_size_mlp": 128, "moe_hidden_size": 64,
    "sliding_window": 64, "attention_window_size": 64, "mm_tokens_per_image": 4,
    "num_image_tokens": 16, "image_seq_length": 16, "rotary_dim": 8, "attn_layer_period": LAYERS,
    "expert_layer_period": LAYERS, "attn_layer_offset": 1, "expert_layer_offset": 1,
}
INDEX_KEY = re.compile(r"(index|indexes|indices|layer_ids|feature_layers?|_layers_idx|layer_idx)$")
TOKEN_KEY = re.compile(r"(_token_id|_token_index|_token_ids)$")


def _shrink_dict(d: dict, layers_before: int | None = None) -> dict:
    """Shrink one config dict (and its sub-config dicts) in place; returns it."""
    n_before = next((d[k] for k in ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "depth")
                     if isinstance(d.get(k), int)), layers_before)
    for k, v in list(d.items()):
        if isinstance(v, dict) and v and all(str(x).isdigit() for x in v) and k not in ("id2label", "label2id"):
            d[k] = {x: y for x, y in v.items() if int(x) < LAYERS}  # per-layer-index configs
        elif isinstance(v, dict) and k not in ("id2label", "label2id", "rope_parameters", "rope_scaling"):
            _shrink_dict(v, n_before)
        elif k in SHRINK and isinstance(v, int) and not isinstance(v, bool) and v > SHRINK[k]:
            d[k] = SHRINK[k]
        elif isinstance(v, list) and n_before and len(v) == n_before and n_before > LAYERS:
            # per-layer lists (layer_types, ...): the first entry and the first different one, so
            # a hybrid keeps one layer of each kind (an attention layer among linear-attention ones)
            other = next((x for x in v if x != v[0]), None)
            d[k] = [v[0], other] if other is not None and LAYERS == 2 else v[:LAYERS]
    for k, v in list(d.items()):
        if isinstance(k, str) and INDEX_KEY.search(k) and not TOKEN_KEY.search(k):
            if isinstance(v, int) and not isinstance(v, bool):
                d[k] = max(-LAYERS, min(v, LAYERS - 1))
            elif isinstance(v, list) and all(isinstance(x, int) for x in v):
                d[k] = [max(-LAYERS, min(x, LAYERS - 1)) for x in v]
    if "head_dim" in d and d["head_dim"] is None and isinstance(d.get("hidden_size"), int):
        d["head_dim"] = SHRINK["head_dim"]  # left for the code to derive, which some do from full sizes
    if isinstance(d.get("qk_rope_head_dim"), int) and "head_dim" in d:
        d["head_dim"] = d["qk_rope_head_dim"]  # MLA: rotary on qk_rope_head_dim only
    if isinstance(d.get("vision_config"), dict) and isinstance(d.get("text_config"), dict):
        # multimodal rotary (Qwen2-VL, GLM-4V): the code's default sections sum to 64 = 128 / 2;
        # give the shrunken head_dim its own (a key that a plain rope ignores)
        rope = d["text_config"].get("rope_parameters")
        if isinstance(rope, dict) and "mrope_section" not in rope:
            rope["mrope_section"] = [16, 24, 24]
            _fit_mrope(d["text_config"])
    _fit_mrope(d)
    ratio = d.get("pixel_shuffle_ratio")
    if isinstance(ratio, float) and 0 < ratio < 1 and isinstance(d.get("hidden_size"), int) \
            and isinstance(d.get("intermediate_size"), int):
        # Llama 4's vision adapter reads the pixel-shuffled patches (hidden / ratio^2 features)
        # with a layer of the tower's intermediate size, as its shipped config has them equal
        d["intermediate_size"] = int(d["hidden_size"] / ratio ** 2)
    ps = d.get("patch_size")
    if isinstance(d.get("image_size"), int) and isinstance(ps, int) and ps > 0:
        d["image_size"] = ps * 4 * max(1, int(d.get("spatial_merge_size", 1) or 1) // 2)
    return d


def _fit_mrope(d: dict) -> None:
    """mrope_section sums to head_dim / 2: keep its proportions for the shrunken head_dim."""
    for rk in ("rope_parameters", "rope_scaling"):
        rope = d.get(rk)
        if isinstance(rope, dict) and isinstance(rope.get("mrope_section"), list):
            sec = rope["mrope_section"]
            half = (d.get("head_dim") or SHRINK["head_dim"]) // 2
            new = [max(1, round(x * half / sum(sec))) for x in sec]
            new[0] += half - sum(new)
            rope["mrope_section"] = new


def _keep_merge_width(before: dict, after: dict) -> None:
    """Widths the shipped config derives from the vision tower's stay so once shrunk: a top-level
    `out_hidden_size` that is the vision width times merge^2 (MuSE Spark / Glimmer: the adapter
    reads the merged patches), a `vision_output_dim` that is the vision width times one plus the
    number of intermediate layers it concatenates (Mllama)."""
    vb, va = before.get("vision_config"), after.get("vision_config")
    if not (isinstance(vb, dict) and isinstance(va, dict)):
        return
    merge = vb.get("merge_size") or vb.get("spatial_merge_size")
    sb, sa = vb.get("sam_config"), va.get("sam_config")
    eb, ea = vb.get("encoder_config"), va.get("encoder_config")
    if all(isinstance(x, dict) for x in (sb, sa, eb, ea)) and isinstance(sb.get("downsample_channels"), list) \
            and sb["downsample_channels"][-1] == eb.get("hidden_size") and isinstance(ea.get("hidden_size"), int):
        # DeepSeek-OCR-like towers: the SAM neck's last channels are the CLIP encoder's patch width
        sa["downsample_channels"] = [c * ea["hidden_size"] // eb["hidden_size"] for c in sb["downsample_channels"]]
    vo, hb = vb.get("vision_output_dim"), vb.get("hidden_size")
    layers = vb.get("intermediate_layers_indices")
    if isinstance(vo, int) and isinstance(hb, int) and isinstance(layers, list) and vo == hb * (len(layers) + 1) \
            and isinstance(va.get("hidden_size"), int):
        # Mllama: the tower outputs its last state and the intermediate ones side by side
        va["vision_output_dim"] = va["hidden_size"] * (vo // hb)
    if isinstance(merge, int) and isinstance(vb.get("hidden_size"), int) and isinstance(before.get("out_hidden_size"), int) \
            and before["out_hidden_size"] == vb["hidden_size"] * merge ** 2:
        after["out_hidden_size"] = va["hidden_size"] * merge ** 2


def _scale_pinpoints(before: dict, after: dict) -> None:
    """AnyRes grid pinpoints (LLaVA-OneVision, LLaVA-NeXT) are multiples of the tower's image
    size: scaled with the shrunk size, or the packed features do not tile the grid."""
    vb, va = before.get("vision_config"), after.get("vision_config")
    pins = after.get("image_grid_pinpoints")
    if not (isinstance(vb, dict) and isinstance(va, dict) and isinstance(pins, list)):
        return
    old, new = vb.get("image_size"), va.get("image_size")
    if isinstance(old, int) and isinstance(new, int) and old != new and all(
            isinstance(p, list) and all(isinstance(x, int) and x % old == 0 for x in p) for p in pins):
        after["image_grid_pinpoints"] = [[x // old * new for x in p] for p in pins]


def _remap_tokens(d: dict, used: dict[int, int]) -> None:
    """Token ids beyond the shrunken vocabulary: onto distinct ids at its top (>= 240)."""
    for k, v in list(d.items()):
        if isinstance(v, dict) and k not in ("id2label", "label2id"):
            _remap_tokens(v, used)
        elif isinstance(k, str) and TOKEN_KEY.search(k):
            def new(x):
                if not isinstance(x, int) or isinstance(x, bool) or x < VOCAB:
                    return x
                if x not in used:
                    used[x] = VOCAB - 1 - len(used)
                return used[x]
            d[k] = [new(x) for x in v] if isinstance(v, list) else new(v)


def shrunk_config(model_type: str):
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(model_type)
    d0 = cfg.to_dict()
    d = _shrink_dict(cfg.to_dict())
    _keep_merge_width(d0, d)
    _scale_pinpoints(d0, d)
    _remap_tokens(d, {})
    for k in ("image_token_index", "image_token_id"):  # declared but unset (BLIP-2): give it an id
        if k in d and d[k] is None:
            d[k] = VOCAB - 16
    if model_type.endswith("_thinker") and "vision_start_token_id" not in d:
        # Qwen-Omni thinkers read config.vision_start_token_id, which their config class does not
        # declare and a released checkpoint's thinker config carries
        d["vision_start_token_id"] = VOCAB - 32
    d.pop("model_type", None)
    d.pop("transformers_version", None)
    return type(cfg).from_dict(d)


def auto_class(task: str):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if task == "image-text" else AutoModelForCausalLM


def build_model(model_type: str, task: str):
    cfg = shrunk_config(model_type)
    torch.manual_seed(0)
    return auto_class(task).from_config(cfg).eval()


def logits_of(model, inputs):
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    inputs = {k: (v.to(p.dtype) if p is not None and v.is_floating_point() else v) for k, v in inputs.items()}
    with torch.no_grad():
        out = model(**inputs)
    lg = out.logits if hasattr(out, "logits") else out[0]
    return lg.float()


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def synthetic_inputs(model) -> tuple[dict, str]:
    """Token ids (avoiding the special ids remapped to >= 240); for a VLM whose forward takes
    pixel_values, also an image, with as many image placeholder tokens as the model reports
    features ("Image features and image tokens do not match, tokens: 0, features: N"). Falls
    back to text only, and says which inputs ran."""
    from anyquant.numerics.probe import vision_probe_inputs

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 200, (1, 16), generator=g)
    text = {"input_ids": ids}
    pv = vision_probe_inputs(model, g)
    cfg = model.config
    img_tok = next((getattr(cfg, k) for k in ("image_token_id", "image_token_index") if
                    isinstance(getattr(cfg, k, None), int)), None)
    reasons = []
    if pv:
        n = 0
        for _ in range(3 if img_tok is not None else 1):  # without an image token id: images + ids as they are
            ids_img = torch.cat([torch.full((1, n), img_tok if img_tok is not None else 3), ids], dim=1)
            inputs = {"input_ids": ids_img, **pv}
            try:
                logits_of(model, inputs)
                return inputs, f"text + image ({n} image tokens)"
            except Exception as e:  # noqa: BLE001
                m = re.search(r"tokens:?\s*(\d+),\s*features:?\s*(\d+)", str(e))
                if m and int(m.group(2)) != n:
                    n = int(m.group(2))
                    continue
                reasons.append(f"{type(e).__name__}: {str(e)[:120]}")
                break
    try:
        logits_of(model, text)
    except Exception as e:  # noqa: BLE001
        raise RuntimeError(f"{type(e).__name__}: {str(e)[:150]}"
                           + (f"; with an image: {reasons[0]}" if reasons else "")) from e
    return text, "text only" + (f" (image forward failed: {reasons[0]})" if reasons else "")


def one(model_type: str, task: str, workdir: Path) -> dict:
    import bitsandbytes
    from transformers import BitsAndBytesConfig

    import anyquant
    from anyquant.numerics.probe import has_image_input

    row: dict = {"model_type": model_type, "task": task, "anyquant": {}, "transformers_bnb": {}}
    try:
        model = build_model(model_type, task)
    except Exception as e:  # noqa: BLE001
        row["instantiates"] = False
        row["reason"] = f"does not instantiate: {type(e).__name__}: {str(e)[:200]}"
        return row
    row["instantiates"] = True
    row["params"] = sum(p.numel() for p in model.parameters())
    if task == "image-text" and getattr(model.config, "vision_config", "absent") is None:
        # counted apart from the image probe's denominator, with this reason
        row["no_image_path"] = "the shipped default config has no vision tower (vision_config is None)"
    try:
        inputs, row["inputs"] = synthetic_inputs(model)
        ref = logits_of(model, inputs)
    except Exception as e:  # noqa: BLE001
        row["runs"] = False
        row["reason"] = f"float model cannot run: {type(e).__name__}: {str(e)[:200]}"
        return row
    src = workdir / "float"
    try:
        model.save_pretrained(src)
        reloaded = auto_class(task).from_pretrained(src).eval()
        e0 = rel(logits_of(reloaded, inputs), ref)
        if not e0 < 1e-4:
            raise RuntimeError(f"float save+reload changes the logits (relative error {e0:.3g})")
        del reloaded
    except Exception as e:  # noqa: BLE001
        row["runs"] = False
        row["reason"] = f"float model cannot save/reload: {type(e).__name__}: {str(e)[:200]}"
        return row
    row["runs"] = True
    saved_class = type(model).__name__
    del model
    for method in METHODS:
        try:
            r = anyquant.quantize(str(src), method, progress=False)
            if type(r.model).__name__ != saved_class:
                raise RuntimeError(f"anyquant loaded the saved {saved_class} as {type(r.model).__name__} "
                                   "(model/load.py tries AutoModelForCausalLM before config.architectures)")
            mem = logits_of(r.model, inputs)
            err = rel(mem, ref)
            out = anyquant.save(r, workdir / f"aq-{method}")
            back = logits_of(anyquant.load(out), inputs)
            err2, drift = rel(back, ref), rel(back, mem)
            ok = err < BOUND[method] and drift < RELOAD_BOUND
            if task == "image-text" and "image_probe" not in row:
                why = r.report["probe"].get("image_path_not_probed")
                row["image_probe"] = {"ran": has_image_input(r.probe_inputs or {}) and not why,
                                      **({"reason": _one_line(why)[:200]} if why else {})}
            stock = json.loads((out / "anyquant.json").read_text()).get("verification", {}).get("transformers")
            res = {"ok": ok, "error": round(err, 4), "reloaded_error": round(err2, 4),
                   "reload_vs_in_memory": float(f"{drift:.3g}"),
                   "params_quantized_share": round(r.report["params_quantized_share"], 4),
                   "fused_experts_float_params": r.report.get("fused_experts_float", {}).get("params", 0),
                   # stock transformers' from_pretrained of the output, as save verified it:
                   # True (same logits), False (refused: loads or runs wrong), None (not applicable / skipped)
                   "stock_reload": (None if stock is None else stock.get("ok") if stock.get("ok") is not None
                                    else (False if "reason" in stock else None)),
                   "quantized": len(r.plan.to_quantize()),
                   "kept_outside_reads": [d.name for d in r.plan.kept()
                                          if d.reason_code == "weight_read_outside_forward"]}
            if not ok:
                res["reason"] = (f"error {err:.3g} over bound {BOUND[method]}" if err >= BOUND[method]
                                 else f"the reloaded model's logits differ from the in-memory one's by {drift:.3g} "
                                      f"(errors against float: {err2:.4g} reloaded, {err:.4g} in memory)")
            row["anyquant"][method] = res
            del r
        except Exception as e:  # noqa: BLE001
            row["anyquant"][method] = {"ok": False, "reason": f"{type(e).__name__}: {str(e)[:240]}"}
    try:
        found = anyquant.doctor(str(src))
        row["doctor"] = {"ran": True, "findings": len(found.get("findings", found.get("problems", [])) or [])}
    except Exception as e:  # noqa: BLE001 — recorded: doctor must run on every type that runs in float
        row["doctor"] = {"ran": False, "reason": f"{type(e).__name__}: {_one_line(str(e))[:200]}"}
    for method in BNB_METHODS:
        qc = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4") if method == "nf4"
              else BitsAndBytesConfig(load_in_8bit=True))
        try:
            m = auto_class(task).from_pretrained(src, quantization_config=qc)
            err = rel(logits_of(m, inputs), ref)
            n_q = sum(isinstance(x, (bitsandbytes.nn.Linear4bit, bitsandbytes.nn.Linear8bitLt)) for x in m.modules())
            res = {"ok": bool(err < BOUND[method]) and n_q > 0, "error": round(err, 4), "quantized": n_q}
            if n_q == 0:
                res["reason"] = "loads and runs, but no module was quantized (silently float)"
            elif not res["ok"]:
                res["reason"] = f"error {err:.3g} over bound {BOUND[method]}"
            row["transformers_bnb"][method] = res
        except Exception as e:  # noqa: BLE001
            row["transformers_bnb"][method] = {"ok": False, "reason": f"{type(e).__name__}: {str(e)[:240]}"}
    return row


# ---------------------------------------------------------------- running children


def _child(model_type: str, task: str, result_file: str, threads: int) -> None:
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as d:
        try:
            row = one(model_type, task, Path(d))
        except BaseException:  # noqa: BLE001
            row = {"model_type": model_type, "task": task, "instantiates": False,
                   "reason": "sweep error: " + traceback.format_exc(limit=2)[-300:]}
    Path(result_file).write_text(json.dumps(row))


def run_all(jobs: list[tuple[str, str]], n_jobs: int, limit_s: int, on_row) -> None:
    pending = list(jobs)
    running: dict[int, tuple[str, str, str, float]] = {}
    tmp = tempfile.mkdtemp(prefix="sweep-")
    threads = max(1, (os.cpu_count() or 1) // n_jobs)
    while pending or running:
        while pending and len(running) < n_jobs:
            t, task = pending.pop(0)
            rf = os.path.join(tmp, f"{t}-{task}.json")
            sys.stdout.flush()
            pid = os.fork()
            if pid == 0:  # child
                code = 0
                try:
                    _child(t, task, rf, threads)
                except BaseException:  # noqa: BLE001
                    code = 1
                finally:
                    os._exit(code)
            running[pid] = (t, task, rf, time.perf_counter())
        time.sleep(0.2)
        for pid, (t, task, rf, t0) in list(running.items()):
            done, status = os.waitpid(pid, os.WNOHANG)
            elapsed = time.perf_counter() - t0
            if done == 0 and elapsed > limit_s:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                row = {"model_type": t, "task": task, "instantiates": None,
                       "reason": f"sweep limit: over {limit_s} s (killed)"}
            elif done == 0:
                continue
            elif os.path.exists(rf):
                row = json.loads(Path(rf).read_text())
            else:
                sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
                row = {"model_type": t, "task": task, "instantiates": None,
                       "reason": f"process died ({'signal ' + str(sig) if sig else 'exit ' + str(os.WEXITSTATUS(status))})"}
            row["seconds"] = round(elapsed, 1)
            del running[pid]
            on_row(row)


def _cell(v: dict | None) -> str:
    if v is None:
        return "-"
    return "ok" if v.get("ok") else "FAIL"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _first_reason(row: dict) -> str:
    if row.get("reason"):
        return _one_line(row["reason"])
    for side in ("anyquant", "transformers_bnb"):
        for m, v in row.get(side, {}).items():
            if not v.get("ok"):
                return f"{'aq' if side == 'anyquant' else 'bnb'} {m}: {_one_line(v.get('reason', ''))}"
    return ""


def print_row(row: dict) -> None:
    aq, tb = row.get("anyquant", {}), row.get("transformers_bnb", {})
    inst = {True: "yes", False: "no", None: "?"}[row.get("instantiates")]
    if inst == "yes" and not row.get("runs"):
        inst = "nrun"
    print(f"{row['model_type'][:26]:26s} {row['task'][:5]:5s} {inst:4s} "
          + " ".join(f"{_cell(aq.get(m)):4s}" for m in METHODS) + " | "
          + " ".join(f"{_cell(tb.get(m)):4s}" for m in BNB_METHODS)
          + f" | img {_yes(row.get('image_probe'))} doc {_yes(row.get('doctor'))}"
          + f" {row.get('seconds', 0):5.1f}s  {_first_reason(row)[:110]}", flush=True)


def _yes(v: dict | None) -> str:
    return "-  " if v is None else ("yes" if v.get("ran") else "NO ")


def summarize(rows: list[dict], seconds: float, complete: bool) -> dict:
    ran = [r for r in rows if r.get("runs")]
    aq_pass = [r["model_type"] for r in ran if all(r["anyquant"].get(m, {}).get("ok") for m in METHODS)]
    tb_pass = [r["model_type"] for r in ran if all(r["transformers_bnb"].get(m, {}).get("ok") for m in BNB_METHODS)]
    per_method = {f"anyquant_{m}": sum(bool(r["anyquant"].get(m, {}).get("ok")) for r in ran) for m in METHODS}
    per_method.update({f"transformers_bnb_{m}": sum(bool(r["transformers_bnb"].get(m, {}).get("ok")) for r in ran)
                       for m in BNB_METHODS})
    vlm = [r for r in ran if r["task"] == "image-text" and not r.get("no_image_path")]
    probed = [r["model_type"] for r in vlm if r.get("image_probe", {}).get("ran")]
    extra = {
        "image_probe_ran": f"{len(probed)}/{len(vlm)}",
        "image_probe_missing": sorted(r["model_type"] for r in vlm if r["model_type"] not in probed),
        "image_probe_excluded": {r["model_type"]: r["no_image_path"] for r in ran
                                 if r["task"] == "image-text" and r.get("no_image_path")},
        "doctor_ran": f"{sum(bool(r.get('doctor', {}).get('ran')) for r in ran)}/{len(ran)}",
        "doctor_failures": sorted(r["model_type"] for r in ran if not r.get("doctor", {}).get("ran")),
        "reloads_in_anyquant": {m: sum(r["anyquant"].get(m, {}).get("reload_vs_in_memory", 1) < RELOAD_BOUND
                                       for r in ran) for m in METHODS},
        "reloads_in_stock_transformers": {m: sum(r["anyquant"].get(m, {}).get("stock_reload") is True for r in ran)
                                          for m in METHODS},
        "fused_experts_left_float": sorted({r["model_type"] for r in ran for m in METHODS
                                            if r["anyquant"].get(m, {}).get("fused_experts_float_params")}),
    }
    return {
        **extra,
        "types": len(rows),
        "instantiated": sum(bool(r.get("instantiates")) for r in rows),
        "ran_in_float": len(ran),
        "anyquant_pass": len(aq_pass),
        "transformers_bnb_pass": len(tb_pass),
        "anyquant_pass_rate": round(len(aq_pass) / max(1, len(ran)), 3),
        "transformers_bnb_pass_rate": round(len(tb_pass) / max(1, len(ran)), 3),
        "per_method": per_method,
        "anyquant_failures": sorted(r["model_type"] for r in ran if r["model_type"] not in aq_pass),
        "transformers_bnb_failures": sorted(r["model_type"] for r in ran if r["model_type"] not in tb_pass),
        "seconds": round(seconds, 1),
        "transformers": __import__("transformers").__version__,
        "torch": torch.__version__,
        "complete": complete,
    }


def main() -> None:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    ap = argparse.ArgumentParser()
    ap.add_argument("--types", default="", help="comma-separated model types (default: all)")
    ap.add_argument("--task", choices=["all", "causal", "image-text"], default="all")
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--per-type-seconds", type=int, default=150)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "sweep.json"))
    ap.add_argument("--show", action="store_true", help="print the table of --out without running anything")
    ap.add_argument("--update", action="store_true",
                    help="re-run --types only and replace their rows in --out (the summary is recomputed; "
                         "its 'updated' field lists them)")
    a = ap.parse_args()
    if a.update and not a.types:
        sys.exit("--update needs --types (the rows to re-run)")
    if a.show:
        data = json.loads(Path(a.out).read_text())
        print_table(data["rows"], data["summary"])
        return

    # A type in both mappings runs once: as image-text-to-text if it has that class.
    jobs: list[tuple[str, str]] = []
    if a.task in ("all", "image-text"):
        jobs += [(t, "image-text") for t in sorted(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)]
    if a.task in ("all", "causal"):
        jobs += [(t, "causal") for t in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
                 if a.task == "causal" or t not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES]
    if a.types:
        wanted = [t for t in a.types.split(",") if t]
        known = {t for t, _ in jobs}
        unknown = [t for t in wanted if t not in known]
        if unknown:
            sys.exit(f"unknown model types: {unknown}")
        jobs = [j for j in jobs if j[0] in wanted]
    if a.limit:
        jobs = jobs[: a.limit]

    # Import what the children use once, here (they inherit it through fork); no torch ops.
    import bitsandbytes  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText  # noqa: F401

    import anyquant  # noqa: F401
    import anyquant.formats.io  # noqa: F401
    import anyquant.numerics.probe  # noqa: F401

    transformers.utils.logging.disable_progress_bar()

    rows: list[dict] = []
    updated: list[str] = []
    if a.update and Path(a.out).exists():
        previous = json.loads(Path(a.out).read_text())
        wanted = {t for t, _ in jobs}
        rows = [r for r in previous["rows"] if r["model_type"] not in wanted]
        updated = sorted(set(previous["summary"].get("updated", [])) | wanted)
    t0 = time.perf_counter()
    print(f"{len(jobs)} model types, {a.jobs} at a time, {a.per_type_seconds} s limit each")
    print(f"{'model_type':26s} {'task':5s} inst {' '.join(f'{m:4s}' for m in METHODS)} | "
          f"{' '.join(f'{m:4s}' for m in BNB_METHODS)}  (anyquant | transformers+bnb)")

    def on_row(row):
        rows.append(row)
        print_row(row)
        _write(a.out, rows, t0, complete=False, updated=updated)

    run_all(jobs, a.jobs, a.per_type_seconds, on_row)
    summary = _write(a.out, rows, t0, complete=True, updated=updated)
    print_table(rows, summary)


def print_table(rows: list[dict], summary: dict) -> None:
    """The whole table (sorted), every failure with its reason, and the summary."""
    print(f"\n{'model_type':26s} {'task':5s} inst {' '.join(f'{m:4s}' for m in METHODS)} | "
          f"{' '.join(f'{m:4s}' for m in BNB_METHODS)}  (anyquant | transformers+bnb)")
    for row in rows:
        print_row(row)
    print("\nfailures of types that ran in float (anyquant, then transformers+bnb):")
    for side, tag in (("anyquant", "anyquant"), ("transformers_bnb", "transformers+bnb")):
        for row in rows:
            if not row.get("runs"):
                continue
            for m, v in row[side].items():
                if not v.get("ok"):
                    print(f"  {tag:16s} {row['model_type']:22s} {m:4s} {_one_line(v.get('reason', ''))[:150]}")
    print("\nsummary:")
    print(json.dumps(summary, indent=1))


def _write(out: str, rows: list[dict], t0: float, complete: bool, updated: list[str] = ()) -> dict:
    rows.sort(key=lambda r: (r["task"], r["model_type"]))
    summary = summarize(rows, time.perf_counter() - t0, complete)
    if updated:  # rows re-run later than the rest (--update): "seconds" is that re-run's
        summary["updated"] = list(updated)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    return summary


if __name__ == "__main__":
    main()
