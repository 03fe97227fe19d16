"""Quality of every anyquant 4-bit method on one real model, on the same held-out tokens (issue 5).

Rows: float, nf4 (bitsandbytes, double quant), int4 RTN, hqq, awq, gptq. Each quantized row is
saved, its bits per weight read back from the saved safetensors (anyquant.evaluate.stored_sizes),
reloaded with anyquant.load, and scored against the float model on the same token windows of
held-out Wikipedia text (anyquant.calib.text.evaluation_text): perplexity, KL(float || quant),
top-1 agreement. awq/gptq calibrate on the news corpus (disjoint from the evaluation text).

  python benchmarks/quality.py [--model DIR] [--max-tokens 16384] [--n-samples 32] [--seq-len 512]
                               [--group-size 128] [--methods nf4,int4,hqq,awq,gptq] [--out PATH]

The issue's setting is --max-tokens 16384 with 128 x 512 calibration (GPU); on the 2-core CPU
machine use fewer tokens and samples and say so: the JSON records every setting.
Peers (bitsandbytes through transformers directly, the hqq library, llm-compressor) are not
run here: see "peers" in the JSON.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata as md
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import anyquant  # noqa: E402
from anyquant.calib.text import evaluation_text  # noqa: E402
from anyquant.eval.metrics import compare, token_windows  # noqa: E402
from anyquant.evaluate import CachedLogits, stored_sizes  # noqa: E402

CALIBRATED = {"awq", "gptq"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory (default: anyquant's SmolLM2-135M)")
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--n-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--methods", default="nf4,int4,hqq,awq,gptq")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "quality.json")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.model is None:
        from anyquant.model.default import default_model_dir

        model_dir = default_model_dir()
    else:
        model_dir = Path(args.model)
    tok = AutoTokenizer.from_pretrained(model_dir)
    windows = token_windows(tok, evaluation_text(), max_tokens=args.max_tokens)
    float_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    baseline = CachedLogits(float_model)

    rows = []
    t = time.perf_counter()
    m = compare(baseline, None, windows, progress=False)
    rows.append({"method": "float", "bits_per_weight": 32.0, "perplexity": m["perplexity"], "kl_divergence": 0.0,
                 "top1_agreement": 1.0, "seconds_quantize": 0.0, "seconds_eval": time.perf_counter() - t})
    print(f"float: ppl {m['perplexity']:.3f} ({m['tokens']} tokens)", flush=True)

    with tempfile.TemporaryDirectory(prefix="aq-quality-") as tmp:
        for method in [x for x in args.methods.split(",") if x]:
            opts = {}
            if method != "nf4":
                opts["group_size"] = args.group_size
            if method in CALIBRATED:
                opts.update(n_samples=args.n_samples, seq_len=args.seq_len)
            t0 = time.perf_counter()
            r = anyquant.quantize(str(model_dir), method, dtype="float32", progress=False, **opts)
            tq = time.perf_counter() - t0
            path = anyquant.save(r, Path(tmp) / method)
            plan = json.loads((path / "anyquant.json").read_text())["plan"]
            sizes = stored_sizes(path, plan)
            blocks = (r.report.get("calibration") or {}).get("blocks", [])
            calib_err = None
            if blocks:  # per-block output error on the calibration data: RTN -> this method
                calib_err = [sum(b["output_error_rtn"] for b in blocks) / len(blocks),
                             sum(b["output_error"] for b in blocks) / len(blocks)]
            del r
            q = anyquant.load(path)
            t1 = time.perf_counter()
            m = compare(q, baseline, windows, progress=False)
            gs = sorted({d["options"].get("group_size") for d in plan["decisions"] if d["action"] == "quantize"}
                        - {None})
            row = {"method": method, "bits_per_weight": sizes["bits_per_weight"], "perplexity": m["perplexity"],
                   "kl_divergence": m["kl_divergence"], "top1_agreement": m["top1_agreement"],
                   "group_size": gs, "calib_block_error_rtn_to_method": calib_err, "seconds_quantize": tq, "seconds_eval": time.perf_counter() - t1}
            rows.append(row)
            print(f"{method}: ppl {row['perplexity']:.3f}  KL {row['kl_divergence']:.4f}  top1 "
                  f"{row['top1_agreement']:.4f}  bits {row['bits_per_weight']:.3f}  ({tq:.0f} s)", flush=True)
            del q

    print()
    print("| method | bits/weight | perplexity | KL (nats) | top-1 | quantize s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['bits_per_weight']:.3f} | {r['perplexity']:.3f} | {r['kl_divergence']:.4f} | "
              f"{r['top1_agreement']:.4f} | {r['seconds_quantize']:.0f} |")
    out = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": str(model_dir),
        "device": "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name(),
        "dtype": "float32",
        "eval_text": "gensim enwiki (held-out Wikipedia), 512-token windows, BOS first",
        "eval_tokens": int(windows.numel()),
        "calibration": {"text": "gensim lee_background.cor (news)", "n_samples": args.n_samples,
                        "seq_len": args.seq_len},
        "requested_group_size": args.group_size,
        "versions": {p: md.version(p) for p in ("torch", "transformers", "bitsandbytes", "compressed-tensors")},
        "rows": rows,
        "peers": "not measured in this run (bitsandbytes appears through anyquant's nf4 row, which is "
                 "bitsandbytes' own nf4; the hqq library and llm-compressor are not installed here)",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
