"""GGUF export for llama.cpp: an anyquant output re-encoded as one `.gguf` file through the
`gguf` package (`anyquant export DIR --to gguf`).

Which GGUF type each quantized Linear gets, and why (`weight_type`):
- int4, hqq, awq, gptq (compressed-tensors, w = s * (q - z), one fp16/bf16 scale and integer
  zero point per group of g input columns): when g is a multiple of 32 every 32-wide GGUF block
  lies inside one group, so the codes are copied as they are. Asymmetric: Q4_1 (per block
  d and m, x = d * n + m with n = q + 8 in 0..15: d = s, m = -s * (z + 8)); symmetric: Q4_0
  (x = d * (n - 8): d = s). Only the fp16 rounding of d and m differs from anyquant's weights.
- int8 (LLM.int8: int8 codes c and one absmax per row, w = c * absmax / 127): Q8_0 (x = d * c
  per 32-block) with every block of a row given d = absmax / 127: the codes are copied.
- nf4, fp4 (bitsandbytes' 16-level non-uniform grids, one absmax per 64 weights): llama.cpp has no
  such type, so the dequantized weights are quantized again, by `gguf.quants.quantize`, to
  Q5_1 (see NF4_TYPE); the added error is measured and reported.
- Any other case (a group size that is not a multiple of 32, or `qtype=` asking for another
  type): the dequantized weights go through `gguf.quants.quantize` to that type.
Everything kept in float: 2-D tensors (token embedding, kept Linears) F16 (BF16 for a bfloat16
model: its range), 1-D ones (norms, biases) F32, as llama.cpp's own converter writes them.

Only the llama architecture is written (what llama.cpp calls `llama`: LlamaForCausalLM); others
are refused before any weight is read.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from anyquant.config import GGUF_TYPES
from anyquant.errors import AnyquantError, terminate_as_interrupt
from anyquant.formats.manifest import read_manifest
from anyquant.model.dequant import dequantize_linear
from anyquant.progress import progress_bar
from anyquant.runtime.int4_linear import Int4Linear

SUPPORTED_ARCHITECTURES = {"llama": "LlamaForCausalLM"}
INT4_METHODS = ("int4", "hqq", "awq", "gptq")
# nf4/fp4 re-quantized: of the types gguf.quants can quantize (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0; its
# Q4_K is dequantize-only), Q5_1 adds 0.40 of nf4's own RMS weight error on SmolLM2 (total 1.08x)
# at 6 bits per weight, where Q4_1 adds 0.85 (1.31x) at 5 and Q8_0 0.06 at 8.5
# (benchmarks/results/gguf_nf4.json; docs/formats.md#gguf).
NF4_TYPE = "Q5_1"
# llama.cpp's pre-tokenizer names for the Hugging Face pre-tokenizers they reproduce
# (src/llama-vocab.cpp regexes): GPT-2's ByteLevel regex; the same with every digit split
# first (SmolLM, StarCoder); Llama 3's Split regex.
LLAMA3_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")


@dataclass
class GGUFExport:
    """What export_gguf wrote: the file, the type of every tensor, and for each re-encoded
    weight the largest absolute difference from anyquant's dequantized weight (in units of
    that weight's largest magnitude, and how it was encoded: "exact codes" or "re-quantized")."""

    path: Path
    tensor_types: dict[str, str] = field(default_factory=dict)
    weight_errors: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "tensor_types": self.tensor_types, "weight_errors": self.weight_errors,
                "notes": self.notes}


def weight_type(method: str | None, config: dict[str, Any] | None,
                group_sizes: list[int] | None = None) -> tuple[str, str]:
    """(GGUF type, why) for the quantized Linears of an output of `method`; `group_sizes`: those the
    plan used (the method's finalize may change the config's: e.g. 64 for SmolLM2's widths)."""
    config = config or {}
    if method in INT4_METHODS:
        gs = sorted(set(group_sizes or [config.get("group_size")]))
        sym = bool(config.get("symmetric"))
        t = "Q4_0" if sym else "Q4_1"
        shown = ", ".join(map(str, gs))
        if all(isinstance(g, int) and g > 0 and g % 32 == 0 for g in gs):
            return t, f"{method} codes copied into {t} (group size {shown}, a multiple of 32): nearly lossless"
        return t, f"{method} group size {shown} is not a multiple of 32: weights re-quantized to {t}"
    if method == "int8":
        return "Q8_0", "int8 codes copied into Q8_0 (row scale in every block): nearly lossless"
    if method in ("nf4", "fp4"):
        return NF4_TYPE, (f"{method} has no GGUF equivalent: dequantized weights re-quantized to {NF4_TYPE} "
                          "(adds error; see docs/formats.md#gguf)")
    raise AnyquantError(f"GGUF export: method {method!r} is not one anyquant writes; expected one of "
                        f"{', '.join(INT4_METHODS + ('int8', 'nf4', 'fp4'))}")


def plan_group_sizes(manifest: dict[str, Any]) -> list[int]:
    """The group sizes the saved plan quantized with."""
    return sorted({d["options"]["group_size"] for d in manifest.get("plan", {}).get("decisions", [])
                   if d.get("action") == "quantize" and isinstance(d.get("options", {}).get("group_size"), int)})


def check_exportable(directory: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The output's manifest and config.json, refused (before any weight is read) when it is
    not an anyquant output or its architecture is not one GGUF export writes."""
    directory = Path(directory)
    manifest = read_manifest(directory) if directory.is_dir() else None
    if manifest is None:
        raise AnyquantError(f"{directory}: not an anyquant output (no anyquant.json); export takes the directory "
                            "written by `anyquant quantize ... --out DIR`")
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise AnyquantError(f"{directory / 'config.json'}: unreadable ({e}); the output is damaged: quantize again")
    arch = config.get("model_type")
    if arch not in SUPPORTED_ARCHITECTURES:
        names = ", ".join(config.get("architectures") or []) or "no architectures field"
        raise AnyquantError(
            f"GGUF export: {directory} is a {arch!r} model ({names}); export writes only "
            f"{', '.join(f'{k} ({v})' for k, v in SUPPORTED_ARCHITECTURES.items())}. Use llama.cpp's "
            "convert_hf_to_gguf.py on the float source for other architectures")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "linear"):
        raise AnyquantError(f"GGUF export: {directory}: rope type {rope_type!r} is not written (default and linear "
                            "are); convert the float source with llama.cpp's convert_hf_to_gguf.py")
    return manifest, config


def default_path(directory: Path) -> Path:
    """DIR -> DIR.gguf beside it: a file inside DIR would fail its anyquant.json check."""
    directory = Path(directory).expanduser().resolve()
    return directory.with_name(directory.name + ".gguf")


# -- weights -------------------------------------------------------------------------------------

def _permute_rope_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Hugging Face's Llama q/k rows in llama.cpp's order: transformers rotates the two halves
    of each head (rotate_half), llama.cpp adjacent pairs; llama.cpp's converter permutes the rows
    the same way (its LlamaModel.permute). Works on any per-row tensor (codes, scales, biases)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _f16_bytes(x: torch.Tensor):
    import numpy as np

    return x.to(torch.float16).numpy().view(np.uint8).reshape(*x.shape, 2)


def _nibbles(n: torch.Tensor):
    """[rows, blocks, 32] values 0..15 -> ggml's 16 bytes per block: byte j = n[j] | n[j + 16] << 4."""
    import numpy as np

    n = n.to(torch.uint8)
    return (n[..., :16] | (n[..., 16:] << 4)).numpy().astype(np.uint8)


def _int4_blocks(mod: Int4Linear, perm_heads: int | None):
    """Q4_0 / Q4_1 bytes [out, in / 32 * type_size] from an Int4Linear's codes, scales and zero points."""
    import numpy as np

    q, s, z = mod.codes(), mod.weight_scale.float(), mod.zero_points().to(torch.int32)
    if perm_heads:
        q, s, z = (_permute_rope_rows(t, perm_heads) for t in (q, s, z))
    out, inf = q.shape
    per = mod.group_size // 32
    n = (q.to(torch.int32) + 8).reshape(out, inf // 32, 32)
    d = s.repeat_interleave(per, dim=1)
    parts = [_f16_bytes(d)]
    if not mod.symmetric:
        parts.append(_f16_bytes(-d * (z.repeat_interleave(per, dim=1).float() + 8)))
    parts.append(_nibbles(n))
    return np.concatenate(parts, axis=-1).reshape(out, -1)


def _int8_blocks(mod: nn.Module, perm_heads: int | None):
    """Q8_0 bytes [out, in / 32 * 34] from LLM.int8 codes and row absmax."""
    import numpy as np

    cb, scb = mod.weight.data, mod.weight.SCB.float()
    if perm_heads:
        cb, scb = _permute_rope_rows(cb, perm_heads), _permute_rope_rows(scb, perm_heads)
    out, inf = cb.shape
    d = (scb / 127.0).unsqueeze(1).expand(out, inf // 32)
    qs = cb.reshape(out, inf // 32, 32).numpy().view(np.uint8)
    return np.concatenate([_f16_bytes(d), qs], axis=-1).reshape(out, -1)


def _quantize(w: torch.Tensor, qtype: str):
    """Float [rows, cols] through gguf.quants.quantize (F16/BF16/F32 included)."""
    import gguf
    import numpy as np

    t = gguf.GGMLQuantizationType[qtype]
    arr = w.detach().float().numpy()
    if t == gguf.GGMLQuantizationType.F32:
        return arr.astype(np.float32)
    if t == gguf.GGMLQuantizationType.F16:
        return arr.astype(np.float16)
    return gguf.quants.quantize(arr, t)


def _dequant(data, qtype: str) -> torch.Tensor:
    import gguf
    import numpy as np

    t = gguf.GGMLQuantizationType[qtype]
    if t in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return torch.from_numpy(np.asarray(data, dtype=np.float32))
    return torch.from_numpy(gguf.quants.dequantize(data, t))


def _is_bnb(mod: nn.Module, cls: str) -> bool:
    """A bitsandbytes Linear4bit / Linear8bitLt, anyquant's subclasses included (by class name:
    bitsandbytes is imported only where it is installed and used)."""
    return any(c.__name__ == cls and c.__module__.startswith("bitsandbytes") for c in type(mod).__mro__)


def encode_linear(mod: nn.Module, qtype: str | None, perm_heads: int | None) -> tuple[Any, str, str, torch.Tensor]:
    """(data for GGUFWriter.add_tensor, GGUF type, how, anyquant's float weight in GGUF row order)
    for one Linear: its codes copied where the type holds them exactly, else its (dequantized)
    weight quantized by gguf.quants."""
    float_lin = dequantize_linear(mod)
    w = (float_lin.weight if float_lin is not None else mod.weight).detach().float()
    if perm_heads:
        w = _permute_rope_rows(w, perm_heads)
    inf = w.shape[1]
    if inf % 32:  # no GGUF block type fits a row that is not a whole number of 32-blocks
        t = "BF16" if qtype == "BF16" else "F16"
        return _quantize(w, t), t, "float (row length not a multiple of 32)", w
    if isinstance(mod, Int4Linear) and mod.group_size % 32 == 0:
        exact = "Q4_0" if mod.symmetric else "Q4_1"
        if qtype in (None, exact):
            return _int4_blocks(mod, perm_heads), exact, "exact codes", w
    if _is_bnb(mod, "Linear8bitLt") and qtype in (None, "Q8_0") and mod.weight.data.dtype == torch.int8:
        return _int8_blocks(mod, perm_heads), "Q8_0", "exact codes", w
    if qtype is None:
        raise AnyquantError(f"GGUF export: no type given for a {type(mod).__name__} (internal: pass qtype)")
    return _quantize(w, qtype), qtype, "re-quantized", w


# -- tokenizer -----------------------------------------------------------------------------------

def pre_tokenizer_name(tokenizer_json: dict[str, Any]) -> str | None:
    """llama.cpp's name for this BPE pre-tokenizer, or None where none reproduces it."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and (steps[0].get("pattern") or {}).get("Regex") == LLAMA3_REGEX:
        return "llama-bpe"
    return None


def add_vocab(writer, directory: Path, vocab_size: int, notes: list[str]) -> None:
    """Tokens, token types, merges, special token ids, add-bos and the chat template, from the
    output's tokenizer files through gguf.vocab (BpeVocab for GPT-2 style byte-level BPE,
    LlamaHfVocab for SentencePiece-style ones)."""
    import gguf
    from transformers import AutoTokenizer

    tj_path = directory / "tokenizer.json"
    if not tj_path.is_file():
        raise AnyquantError(f"GGUF export: {tj_path} is missing; llama.cpp needs the vocabulary: copy the source's "
                            "tokenizer files into the output (or quantize again) and export again")
    tj = json.loads(tj_path.read_text())
    try:
        vocab = gguf.vocab.BpeVocab(directory)
        model_name, pre = "gpt2", pre_tokenizer_name(tj)
    except FileNotFoundError:
        try:
            vocab = gguf.vocab.LlamaHfVocab(directory)
        except (FileNotFoundError, TypeError) as e:
            raise AnyquantError(f"GGUF export: {tj_path}: neither a GPT-2 style byte-level BPE nor a SentencePiece-"
                                f"style (byte-fallback) tokenizer ({e}); llama.cpp's converter is needed for it")
        model_name, pre = "llama", None
    tokens, types = [], []
    for text, _score, ttype in vocab.all_tokens():
        tokens.append(text)
        types.append(ttype)
    scores = None
    if model_name == "llama":
        scores = [s for _, s, _ in vocab.all_tokens()]
    else:
        # gguf's BpeVocab types every token of the main vocabulary NORMAL; tokenizer.json marks
        # its special ones (SmolLM2's <|im_start|> lies inside the main vocabulary), and llama.cpp
        # must know them to keep them whole and not print them (CONTROL), as its converter does.
        for t in tj.get("added_tokens", []):
            if 0 <= t["id"] < len(types):
                types[t["id"]] = gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED
    if len(tokens) > vocab_size:
        raise AnyquantError(f"GGUF export: {tj_path} has {len(tokens)} tokens, more than the model's vocab_size "
                            f"{vocab_size}; the tokenizer does not belong to this model")
    for i in range(len(tokens), vocab_size):  # embedding rows beyond the tokenizer: llama.cpp's padding
        tokens.append(f"[PAD{i}]")
        types.append(gguf.TokenType.UNUSED)
        if scores is not None:
            scores.append(-1000.0)
    writer.add_tokenizer_model(model_name)
    if model_name == "gpt2":
        if pre is None:
            notes.append("tokenizer: its pre-tokenizer matches none llama.cpp names; llama.cpp uses its default "
                         "and may split text differently (token ids fed directly are unaffected)")
        else:
            writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if scores is not None:
        writer.add_token_scores(scores)
    special = gguf.SpecialVocab(directory, load_merges=model_name == "gpt2", n_vocab=len(tokens))
    # whether a BOS is prepended is what the tokenizer does, which tokenizer_config.json may not say
    tok = AutoTokenizer.from_pretrained(directory)
    if tok.bos_token_id is not None:
        ids = tok("a")["input_ids"]
        special.add_special_token["bos"] = bool(ids) and ids[0] == tok.bos_token_id
    special.add_to_gguf(writer, quiet=True)


# -- the file ------------------------------------------------------------------------------------

def _metadata(writer, config: dict[str, Any], name: str) -> None:
    import gguf

    n_head = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    writer.add_name(name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(config.get("num_key_value_heads") or n_head)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    writer.add_rope_freq_base(float(theta))
    if rope.get("rope_type", rope.get("type")) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_vocab_size(config["vocab_size"])


def _file_type(types: list[str]) -> int:
    import gguf

    names = {"Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1", "Q5_0": "MOSTLY_Q5_0", "Q5_1": "MOSTLY_Q5_1",
             "Q8_0": "MOSTLY_Q8_0", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "F32": "ALL_F32"}
    most = max(set(types), key=types.count) if types else "F16"
    return int(gguf.LlamaFileType[names[most]])


def export_gguf(directory: str | Path, load: Callable[[Path], nn.Module], out: str | Path | None = None, *,
                qtype: str | None = None, force: bool = False, progress: bool = True) -> GGUFExport:
    """Write the anyquant output `directory` as one GGUF file for llama.cpp (default: DIR.gguf
    beside it); `load(directory)` gives its model in the saved (unfused) layout on the CPU (the
    API passes formats.io.load_quantized: this module sits below io, which writes the model card
    that names the GGUF types). `qtype` (one of GGUF_TYPES) re-quantizes every quantized Linear
    to that type instead of the method's own (weight_type). The file is written beside its
    destination and renamed into place, so a failed export leaves nothing."""
    import gguf

    directory = Path(directory).expanduser()
    if qtype is not None and qtype not in GGUF_TYPES:
        raise AnyquantError(f"GGUF export: type {qtype!r}: expected one of {', '.join(GGUF_TYPES)} (what gguf's "
                            "Python quantizer writes)")
    manifest, config = check_exportable(directory)
    target = Path(out).expanduser().resolve() if out is not None else default_path(directory)
    if target.suffix != ".gguf":
        raise AnyquantError(f"GGUF export: {target}: the file name must end in .gguf")
    if target.exists() and not force:
        raise AnyquantError(f"GGUF export: {target} exists; pass --force (force=True) to replace it")
    if not target.parent.is_dir():
        raise AnyquantError(f"GGUF export: {target.parent}: no such directory")
    method = manifest.get("method")
    wtype, why = weight_type(method, manifest.get("config"), plan_group_sizes(manifest))
    result = GGUFExport(path=target, notes=[why if qtype is None else f"{method} weights as {qtype} (requested)"])
    model = load(directory)
    n_blocks = config["num_hidden_layers"]
    n_head, n_kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    float_2d = "BF16" if str(manifest.get("compute_dtype")) == "bfloat16" else "F16"
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_blocks)
    linear_types = (nn.Linear, Int4Linear)
    modules = dict(model.named_modules())
    tied = bool(config.get("tie_word_embeddings")) and "lm_head" in modules and \
        modules["lm_head"].weight is model.get_input_embeddings().weight

    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.close(fd)
    # SIGTERM (a timeout, a container stop) unwinds like Ctrl-C, so the partial file goes too
    with terminate_as_interrupt():
        try:
            writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
            _metadata(writer, config, directory.resolve().name)
            add_vocab(writer, directory, config["vocab_size"], result.notes)
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            quantized_types: list[str] = []
            params = dict(model.named_parameters(remove_duplicate=False))
            entries: list[tuple[str, str]] = []  # (module name, "module") for Linears, (param name, "param") else
            for name, mod in modules.items():
                if isinstance(mod, linear_types):  # bitsandbytes' Linear4bit / Linear8bitLt are nn.Linear
                    entries.append((name, "module"))
            linear_names = {n for n, _ in entries}
            for pname in params:
                owner = pname.rsplit(".", 1)[0]
                if owner not in linear_names:
                    entries.append((pname, "param"))
            with progress_bar("gguf", len(entries), progress, unit="tensors") as advance:
                for name, kind in entries:
                    if kind == "module" and name == "lm_head" and tied:
                        advance(1)
                        continue  # llama.cpp reads a missing output.weight as the tied token embedding
                    key = name + ".weight" if kind == "module" else name
                    gname = tmap.get_name(key, try_suffixes=(".weight", ".bias"))
                    if gname is None:
                        raise AnyquantError(f"GGUF export: {directory}: tensor {key} has no llama GGUF name "
                                            "(gguf.TensorNameMap); the model is not a plain Llama")
                    heads = n_head if ".attn_q." in gname else n_kv if ".attn_k." in gname else None
                    if kind == "module":
                        mod = modules[name]
                        quantized = type(mod) is not nn.Linear
                        want = qtype if quantized and qtype else (wtype if quantized else float_2d)
                        data, t, how, w = encode_linear(mod, want, heads)
                        if quantized:
                            quantized_types.append(t)
                            back = _dequant(data, t).reshape(w.shape)
                            scale = w.abs().max().clamp_min(1e-30)
                            result.weight_errors[gname] = {
                                "type": t, "how": how,
                                "max_abs_error_rel": float((back - w).abs().max() / scale),
                                "rms_error_rel": float((back - w).pow(2).mean().sqrt() / w.pow(2).mean().sqrt().clamp_min(1e-30)),
                            }
                        writer.add_tensor(gname, data, raw_dtype=gguf.GGMLQuantizationType[t] if t not in ("F32", "F16")
                                          else None)
                        result.tensor_types[gname] = t
                        bias = getattr(mod, "bias", None)
                        if bias is not None:
                            b = bias.detach().float()
                            b = _permute_rope_rows(b, heads) if heads else b
                            bname = gname[: -len(".weight")] + ".bias"
                            writer.add_tensor(bname, b.numpy())
                            result.tensor_types[bname] = "F32"
                    else:
                        p = params[name].detach().float()
                        if p.dim() == 1:
                            p = _permute_rope_rows(p, heads) if heads else p
                            data, t = p.numpy(), "F32"
                        else:
                            data, t = _quantize(p, float_2d), float_2d
                        writer.add_tensor(gname, data, raw_dtype=gguf.GGMLQuantizationType.BF16 if t == "BF16" else None)
                        result.tensor_types[gname] = t
                    advance(1)
            bad = [n for n, e in result.weight_errors.items() if not math.isfinite(e["max_abs_error_rel"])]
            if bad:
                raise AnyquantError(f"GGUF export: {directory}: re-encoded weights are not finite ({', '.join(bad[:3])}); "
                                    "nothing was written: check the output with `anyquant eval` and report it")
            writer.add_file_type(_file_type(quantized_types))
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return result
