"""What the peer scripts share (auto-round, GPTQModel): anyquant's calibration windows, and the
dense float checkpoint that benchmarks/quality.py scores as `--peers dense:DIR`.

Runs inside a peer's own venv (torch, transformers, safetensors; no anyquant dependencies): a
peer's saved format (GPTQ-style packed int32 codes) is not one transformers can load without the
peer installed, so the peer script reloads its own checkpoint here, reads each quantized Linear's
effective weight by running the peer's own module on an identity matrix (its kernel's dequantize,
whatever its packing, order or zero-point convention), and writes a plain float model.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

PEER_FILE = "peer.json"
# Tensors a GPTQ-style checkpoint stores for each quantized Linear (auto-round and GPTQModel both
# write these names): what bits per weight counts.
QUANT_SUFFIXES = (".qweight", ".qzeros", ".scales", ".g_idx")
DTYPE_BYTES = {"I64": 8, "I32": 4, "U32": 4, "I16": 2, "F16": 2, "BF16": 2, "F32": 4, "I8": 1, "U8": 1, "F64": 8,
               "BOOL": 1}


def calibration_windows(tokenizer, n_samples: int, seq_len: int) -> torch.Tensor:
    """anyquant.calib.text's calibration windows (news text, BOS first), [n_samples, seq_len];
    read by path: this venv has no anyquant install and other transformers pins."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
    from anyquant.calib.text import calibration_text, token_windows

    ids = token_windows(tokenizer, calibration_text(), max_tokens=n_samples * seq_len, window=seq_len)
    if ids.shape[0] < n_samples:
        raise SystemExit(f"benchmarks/peers/dense.py: the calibration text gives {ids.shape[0]} windows of "
                         f"{seq_len} tokens, fewer than --n-samples {n_samples}; lower --n-samples or --seq-len")
    return ids[:n_samples]


def stored_bits(packed_dir: Path, quantized: dict[str, tuple[int, int]]) -> dict:
    """Bits per quantized weight from the peer's saved safetensors: every byte of its packed codes,
    scales, zero points and g_idx, over the weights of the Linears it quantized (headers only)."""
    from safetensors import safe_open

    nbytes = 0
    per_kind: dict[str, int] = {}
    for f in sorted(Path(packed_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                if key.endswith(QUANT_SUFFIXES) and key.rsplit(".", 1)[0] in quantized:
                    sl = st.get_slice(key)
                    n = math.prod(sl.get_shape()) * DTYPE_BYTES[sl.get_dtype()]
                    nbytes += n
                    kind = key.rsplit(".", 1)[1]
                    per_kind[kind] = per_kind.get(kind, 0) + n
    numel = sum(o * i for o, i in quantized.values())
    if not numel or not nbytes:
        raise SystemExit(f"benchmarks/peers/dense.py: no quantized tensors ({', '.join(QUANT_SUFFIXES)}) for "
                         f"{len(quantized)} quantized Linears in {packed_dir}: did the peer save its packed format?")
    return {"bits_per_weight": 8 * nbytes / numel, "quantized_weights": numel,
            "bytes_by_tensor": per_kind, "quantized_linears": len(quantized)}


@torch.no_grad()
def effective_weight(module: torch.nn.Module, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """The [out, in] weight a quantized Linear computes with: its forward on the identity (rows of
    I are unit inputs, so row j of the output is column j of W, plus the bias, subtracted)."""
    eye = torch.eye(in_features, dtype=dtype, device=next(module.buffers()).device)
    out = module(eye)
    bias = getattr(module, "bias", None)
    if bias is not None:
        out = out - bias.to(out.dtype)
    return out.t().contiguous().float().cpu()


def write_dense(quantized_model: torch.nn.Module, packed_dir: Path, source_dir: Path, out_dir: Path,
                is_quantized) -> dict[str, tuple[int, int]]:
    """Save, under out_dir, the source model's float architecture holding the peer's weights: each
    quantized Linear's effective weight from the reloaded model, every other tensor as the peer's
    checkpoint stores it (read from its files: a peer's loader may cast the rest of the model, as
    auto-round's CPU path forces float16, while quality.py scores every row in float32). Returns
    {linear name: (out, in)} of the quantized Linears."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dense = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32)
    state = dense.state_dict()
    quantized: dict[str, tuple[int, int]] = {}
    peer_state = {}
    for name, mod in quantized_model.named_modules():
        if is_quantized(mod):
            n_in, n_out = _features(mod)
            # float32 input, as quality.py serves every row: the module casts it as it would then.
            peer_state[f"{name}.weight"] = effective_weight(mod, n_in, torch.float32)
            quantized[name] = (n_out, n_in)
    stored_q = set()
    for f in sorted(Path(packed_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                if key.endswith(".qweight"):
                    stored_q.add(key[: -len(".qweight")])
                elif key in state and key not in peer_state:
                    peer_state[key] = st.get_tensor(key).float()
    unserved = sorted(stored_q - set(quantized))
    if unserved:
        raise SystemExit(f"benchmarks/peers/dense.py: {len(unserved)} Linears stored packed in {packed_dir} were "
                         f"not reloaded as quantized modules (first: {unserved[:3]}): the peer's loader has no "
                         "kernel for them (e.g. a width no multiple of the group size); use another group size")
    missing = [k for k in state if k not in peer_state and not _tied(dense, k)]
    if missing:
        raise SystemExit(f"benchmarks/peers/dense.py: neither the peer's quantized modules nor its files in "
                         f"{packed_dir} give {len(missing)} tensors of {source_dir} (first: {missing[:5]}): "
                         "its tensor names differ from the source's")
    wrong = [k for k, t in peer_state.items() if t.shape != state[k].shape]
    if wrong:
        raise SystemExit(f"benchmarks/peers/dense.py: shape mismatch for {wrong[:5]} between the peer's weights "
                         "and the source model")
    dense.load_state_dict(peer_state, strict=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    dense.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(source_dir).save_pretrained(out_dir)
    return quantized


def _features(mod: torch.nn.Module) -> tuple[int, int]:
    """(in, out) of a quantized Linear: GPTQModel names them in_features/out_features, auto-round's
    QuantLinear infeatures/outfeatures."""
    for a, b in (("in_features", "out_features"), ("infeatures", "outfeatures")):
        if hasattr(mod, a) and hasattr(mod, b):
            return int(getattr(mod, a)), int(getattr(mod, b))
    raise SystemExit(f"benchmarks/peers/dense.py: {type(mod).__name__} has neither in_features nor infeatures")


def _tied(model, key: str) -> bool:
    """lm_head.weight tied to the embedding is not a tensor of its own in a saved model."""
    return key == "lm_head.weight" and bool(getattr(model.config, "tie_word_embeddings", False))


def write_peer_json(out_dir: Path, info: dict) -> None:
    (Path(out_dir) / PEER_FILE).write_text(json.dumps(info, indent=2))
