"""Wall time and peak GPU memory of anyquant's 4-bit methods on a Llama-3-8B-shaped model (issue 5).

The model (32 layers, hidden 4096, MLP 14336, 32/8 heads, vocab 128256) is built with random
weights directly on the GPU in bf16: nothing to download. Calibration: 128 sequences x 512
random tokens (the algorithms' cost does not depend on what the tokens say). Each method runs on
a fresh model through anyquant.quantize (the same code path as the CLI), block by block.

  python benchmarks/quantize_gpu.py [--methods int4,hqq,awq,gptq] [--layers 32] [--n-samples 128]
  (a method may carry options as JSON after a colon; specs are separated by commas or ';', benchmarks/specs.py):
   --methods 'awq;gptq:{"awq_scales": true}')
                                    [--seq-len 512] [--out benchmarks/results/quantize_gpu.json]
                                    [--shape 8b|tiny]   (tiny: checks the script on a CPU, float32)
  The recommended method (what `anyquant quantize SOURCE` runs): --methods recommended

Target (issue 5): awq and gptq each under 5 minutes on one H100.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata as md
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from specs import parse_spec, split_specs  # noqa: E402  (benchmarks/specs.py)

import anyquant  # noqa: E402
from anyquant.config import RECOMMENDED, resolve_method  # noqa: E402

CALIBRATED = {"awq", "gptq"}


# Llama-3-8B's shape, and a tiny one with the same structure (GQA, untied head) so the script
# itself can be checked on a CPU before it is given GPU time.
SHAPES = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
               vocab_size=128256),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=1024),
}


def build(layers: int, seed: int = 0, shape: str = "8b", device: str = "cuda"):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPES[shape], num_hidden_layers=layers,
                      max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    return model.eval()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="int4,hqq,awq,gptq")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "quantize_gpu.json")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="8b",
                    help="tiny: a small Llama of the same structure, to check the script (on a CPU too)")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and args.shape != "tiny":
        raise SystemExit("quantize_gpu.py: the 8B shape needs a CUDA device; --shape tiny runs on a CPU")
    gpu = device == "cuda"

    g = torch.Generator().manual_seed(1)
    calib = torch.randint(0, SHAPES[args.shape]["vocab_size"], (args.n_samples, args.seq_len), generator=g)
    rows = []
    for spec in split_specs(args.methods):
        method, spec_opts = parse_spec(spec)
        model = build(args.layers, shape=args.shape, device=device).to(torch.bfloat16 if gpu else torch.float32)
        _sync(device)
        base = torch.cuda.memory_allocated() if gpu else 0
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        # the recommended method's own fields (its group size) are what it is timed with
        fixed = resolve_method(method)[1] if method.lower() == RECOMMENDED else {}
        opts = {**({} if "group_size" in fixed else {"group_size": args.group_size}), **spec_opts}
        if method in CALIBRATED or method.lower() == RECOMMENDED:
            opts.update(n_samples=args.n_samples, seq_len=args.seq_len)
        t0 = time.perf_counter()
        # bfloat16 as on the GPU; a CPU check runs in float32 (bfloat16 matmuls are slow there)
        r = anyquant.quantize(model, method, dtype="bfloat16" if gpu else "float32", progress=True, calib=calib, checkpoint_dir=None,
                              **opts)
        _sync(device)
        wall = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() if gpu else 0
        cal = r.report.get("calibration") or {}
        blocks = cal.get("blocks", [])
        row = {
            "method": spec, "wall_s": wall, "peak_gpu_gib": peak / 2**30,
            "peak_over_model_gib": (peak - base) / 2**30, "model_gib": base / 2**30,
            "probe_logits_relative_error": r.report["probe_logits_relative_error"],
            "fallbacks": len(cal.get("fallbacks", [])),
            "mean_block_output_error_rtn": (sum(b["output_error_rtn"] for b in blocks) / len(blocks)) if blocks else None,
            "mean_block_output_error": (sum(b["output_error"] for b in blocks) / len(blocks)) if blocks else None,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        del r, model
        gc.collect()
        if gpu:
            torch.cuda.empty_cache()

    print()
    print("| method | wall s | peak GPU GiB | peak above model GiB | block err rtn -> method |")
    print("|---|---|---|---|---|")
    for r in rows:
        e = ("" if r["mean_block_output_error"] is None
             else f"{r['mean_block_output_error_rtn']:.4f} -> {r['mean_block_output_error']:.4f}")
        print(f"| {r['method']} | {r['wall_s']:.1f} | {r['peak_gpu_gib']:.2f} | {r['peak_over_model_gib']:.2f} | {e} |")
    out = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if gpu else "cpu",
        "model": (f"Llama-3-8B-shaped, {args.layers} layers, random bf16 weights" if args.shape == "8b"
                  else f"tiny Llama ({SHAPES['tiny']}), {args.layers} layers, random bf16 weights"),
        "calibration": {"n_samples": args.n_samples, "seq_len": args.seq_len, "tokens": "random"},
        "group_size": args.group_size,
        "versions": {p: md.version(p) for p in ("torch", "transformers")},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
