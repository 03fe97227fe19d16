"""llm-compressor's GPTQ or AWQ (W4A16, asymmetric int4, groups along the input) on a local model,
as a peer row for benchmarks/quality.py. Runs in llm-compressor's OWN virtual environment (it
pins transformers <= 5.17 and compressed-tensors 0.19), on the same calibration token windows
anyquant uses (news text, BOS first), and saves a compressed-tensors checkpoint that
quality.py (`--peers ckpt:OUT`) loads with transformers and scores on the same tokens.

  make llmc-venv
  .llmc/bin/python benchmarks/peers/llmcompressor_w4a16.py --method gptq --model DIR --out OUT \\
      --n-samples 16 --seq-len 512 --group-size 96
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def calibration_windows(tokenizer, n_samples: int, seq_len: int):
    """anyquant.calib.text's default calibration windows, rebuilt here without importing anyquant
    (this venv has other transformers / compressed-tensors versions): read by path."""
    root = Path(__file__).resolve().parents[2] / "src"
    sys.path.insert(0, str(root))
    from anyquant.calib.text import (
        calibration_text,  # noqa: E402  (pure Python: reads gensim's file)
        token_windows,  # noqa: E402
    )

    ids = token_windows(tokenizer, calibration_text(), max_tokens=n_samples * seq_len, window=seq_len)
    return ids[:n_samples]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", choices=("gptq", "awq"), required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--n-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--group-size", type=int, default=96)
    args = ap.parse_args()

    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.awq import AWQModifier
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not torch.cuda.is_available():
        # llm-compressor 0.14's AWQ pins cached activations for a GPU copy, which raises on a
        # machine without one ("Cannot access accelerator device"); on CPU there is nothing to pin.
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, *a, **k: None
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    ids = calibration_windows(tok, args.n_samples, args.seq_len)
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    scheme = {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": False,
                                                             "strategy": "group", "group_size": args.group_size}}}
    if args.method == "gptq":
        recipe = GPTQModifier(config_groups=scheme, ignore=["lm_head"])
    else:
        recipe = AWQModifier(config_groups=scheme, ignore=["lm_head"])
    t0 = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=len(ids),
            max_seq_length=args.seq_len)
    seconds = time.perf_counter() - t0
    model.save_pretrained(args.out, save_compressed=True)
    tok.save_pretrained(args.out)
    import importlib.metadata as md

    (Path(args.out) / "peer.json").write_text(json.dumps({
        "peer": f"llm-compressor {args.method} W4A16 asym g{args.group_size}", "seconds_quantize": seconds,
        "n_samples": int(ids.shape[0]), "seq_len": args.seq_len,
        "versions": {p: md.version(p) for p in ("llmcompressor", "compressed-tensors", "transformers", "torch")}}, indent=2))
    print(f"llm-compressor {args.method}: {seconds:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()
