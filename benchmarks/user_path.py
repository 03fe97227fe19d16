"""The user's path from a saved model to tokens (issue 18), on one GPU.

An 8B-shaped Llama (benchmarks/speed_gpu.py's shape) with random weights is built on the GPU in
bf16, saved with save_pretrained (bf16), quantized with anyquant.quantize(model, "int4") and
saved with anyquant.save. Each model is then measured in a fresh process (imports and the CUDA
context made before the baseline): load seconds, peak host RSS above the baseline and peak GPU
memory during the load, plain `generate()` (dynamic cache), `generate(cache_implementation=
"static")`, and runtime.generate.FastDecoder (what `anyquant generate` runs on a GPU: static
cache, decode attention, whole step compiled, CUDA graph) with its compile time and time to
first token. bf16 also gets the eager step in a CUDA graph (speed_gpu's "bf16" row) and
bitsandbytes nf4 (through transformers' BitsAndBytesConfig, if bitsandbytes is installed) its
load and plain generate. Batch 1, a 128-token random prompt, 128 new tokens, greedy.

  python benchmarks/user_path.py [--layers N] [--stages build,int4,bf16,nf4] [--ckpt DIR] [--out PATH]

Writes JSON (device, date, versions, every number) to --out and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROMPT, NEW = 128, 128


def log(*a):
    print(*a, flush=True)


def build(ckpt: Path, layers: int) -> dict:
    import torch
    from transformers import LlamaForCausalLM

    sys.path.insert(0, str(HERE))
    from speed_gpu import llama_config

    import anyquant
    from anyquant.errors import AnyquantError

    res = {}
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(llama_config(layers)).eval()
    torch.set_default_dtype(prev)
    t = time.time()
    model.save_pretrained(ckpt / "bf16")
    res["save_bf16_s"] = round(time.time() - t, 1)
    t = time.time()
    r = anyquant.quantize(model, "int4", progress=False)
    res["quantize_s"] = round(time.time() - t, 1)
    t = time.time()
    try:
        anyquant.save(r, ckpt / "int4", force=True)
    except AnyquantError as e:  # recorded, and the timings still taken on an unchecked save
        res["verify_failed"] = str(e)[:400]
        anyquant.save(r, ckpt / "int4", force=True, verify=False)
    res["save_int4_s"] = round(time.time() - t, 1)
    del model, r
    gc.collect()
    # the CUDA extension builds once per machine (cached in torch's extensions dir)
    from anyquant.runtime import cuda_int4

    t = time.time()
    res["cuda_extension_available"] = cuda_int4.available(torch.device("cuda"))
    res["cuda_extension_build_s"] = round(time.time() - t, 1)
    res["checkpoint_bytes"] = {k: sum(f.stat().st_size for f in (ckpt / k).glob("*.safetensors"))
                               for k in ("bf16", "int4")}
    return res


def measure(kind: str, ckpt: Path) -> dict:
    """In a fresh process: load, then the generate paths."""
    import torch
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM, LlamaForCausalLM  # noqa: F401

    import anyquant
    from anyquant.eval.memory import track_peak_memory
    from anyquant.runtime.generate import FastDecoder, plain_generate

    torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    res: dict = {}
    with track_peak_memory(0.005) as pk:
        t = time.perf_counter()
        if kind == "int4":
            model = anyquant.load(ckpt / "int4", device="cuda")
        elif kind == "bf16":
            model = AutoModelForCausalLM.from_pretrained(ckpt / "bf16", dtype=torch.bfloat16, device_map="cuda")
        else:
            from transformers import BitsAndBytesConfig

            q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
            model = AutoModelForCausalLM.from_pretrained(ckpt / "bf16", dtype=torch.bfloat16, device_map="cuda",
                                                         quantization_config=q)
        torch.cuda.synchronize()
        res["load_s"] = round(time.perf_counter() - t, 2)
    model.eval()
    res["peak_host_rss_above_baseline_gb"] = round(pk.peak_bytes / 1e9, 3)
    res["baseline_rss_gb"] = round(pk.baseline_rss_bytes / 1e9, 3)
    res["peak_gpu_during_load_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 3)
    res["gpu_after_load_gb"] = round(torch.cuda.memory_allocated() / 1e9, 3)
    res["peak_gpu_over_loaded"] = round(torch.cuda.max_memory_allocated() / torch.cuda.memory_allocated(), 3)
    res["kernels"] = getattr(model, "anyquant_kernels", None)
    ids = torch.randint(0, model.config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    gen_kw = dict(min_new_tokens=NEW, eos_token_id=None, pad_token_id=0)

    def timed(key, fn):
        t = time.time()
        try:
            res[key] = fn()
        except Exception as exc:  # recorded, never dropped
            res[key] = {"error": f"{type(exc).__name__}: {exc}"[:600]}
        log(f"  {kind} {key}: {res[key]} ({time.time() - t:.0f}s)")

    def plain(**kw):
        plain_generate(model, ids, 8, **gen_kw | {"min_new_tokens": 8}, **kw)   # warm-up (and compile, if any)
        _, s = plain_generate(model, ids, NEW, **gen_kw, **kw)
        return s

    timed("plain_generate", plain)
    if kind != "nf4":
        timed("static_generate", lambda: plain(cache_implementation="static"))

    def fast(**kw):
        torch._dynamo.reset()
        dec = FastDecoder(model, PROMPT + NEW + 128, **kw)
        dec.generate(ids, NEW, eos_token_ids=())
        out, s = dec.generate(ids, NEW, eos_token_ids=())
        s.update(mode=dec.mode, compile_and_capture_s=round(dec.compile_s, 1), distinct_tokens=len(set(out)))
        dec.close()
        return s

    if kind == "bf16":
        timed("eager_step_cuda_graph", lambda: fast(compile=False, decode_attention=False))
    if kind != "nf4":
        timed("anyquant_generate_path", fast)
    res["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 3)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--stages", default="build,int4,bf16,nf4")
    ap.add_argument("--ckpt", default="/tmp/anyquant_user_path")
    ap.add_argument("--out", default=str(HERE / "results" / "user_path.json"))
    ap.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    ckpt = Path(args.ckpt)
    if args.measure:
        print("RESULT " + json.dumps(measure(args.measure, ckpt)), flush=True)
        return
    import torch

    out = Path(args.out)
    res = json.loads(out.read_text()) if out.exists() and out.stat().st_size else {}
    res.update(device=torch.cuda.get_device_name(0), date=datetime.date.today().isoformat(), layers=args.layers,
               prompt_tokens=PROMPT, new_tokens=NEW,
               versions={m: __import__(m).__version__ for m in ("torch", "transformers")})
    stages = args.stages.split(",")
    if "build" in stages:
        ckpt.mkdir(parents=True, exist_ok=True)
        t = time.time()
        res["build"] = build(ckpt, args.layers)
        log(f"build: {res['build']} ({time.time() - t:.0f}s)")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2))  # kept if a later stage runs out of time
        gc.collect()
        torch.cuda.empty_cache()
    for kind in ("int4", "bf16", "nf4"):
        if kind not in stages:
            continue
        if kind == "nf4":
            try:
                import bitsandbytes  # noqa: F401
            except ImportError:
                res["nf4"] = {"skipped": "bitsandbytes not installed"}
                continue
        p = subprocess.run([sys.executable, __file__, "--measure", kind, "--ckpt", str(ckpt)], capture_output=True,
                           text=True, env=os.environ)
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        res[kind] = json.loads(line[-1][7:]) if line else {"error": (p.stdout + p.stderr)[-1500:]}
        log(f"{kind}: {res[kind]}")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2))
    summarize(res)
    out.write_text(json.dumps(res, indent=2))
    print_table(res)


def _tps(res, kind, key):
    v = res.get(kind, {}).get(key, {})
    return v.get("decode_tokens_per_s") if isinstance(v, dict) else None


def summarize(res):
    b = _tps(res, "bf16", "plain_generate")
    s = {}
    if b:
        for key in ("plain_generate", "static_generate", "anyquant_generate_path"):
            v = _tps(res, "int4", key)
            if v:
                s[f"int4_{key}_vs_bf16_plain"] = round(v / b, 2)
    bs = _tps(res, "bf16", "static_generate")
    if bs and _tps(res, "int4", "static_generate"):
        s["int4_static_vs_bf16_static"] = round(_tps(res, "int4", "static_generate") / bs, 2)
    be = _tps(res, "bf16", "eager_step_cuda_graph")
    bc = _tps(res, "bf16", "anyquant_generate_path")
    f = _tps(res, "int4", "anyquant_generate_path")
    if f and be:
        s["int4_anyquant_generate_vs_bf16_eager_step"] = round(f / be, 2)
    if f and bc:
        s["int4_anyquant_generate_vs_bf16_compiled"] = round(f / bc, 2)
    res["ratios"] = s


def print_table(res):
    log(f"\n{res.get('device')} {res.get('date')}, {res.get('layers')} layers")
    log("| model | load s | peak host RSS GB | peak GPU / loaded | plain tok/s | static tok/s | "
        "anyquant generate tok/s (TTFT s, compile s) |")
    log("|---|---|---|---|---|---|---|")
    for kind in ("int4", "bf16", "nf4"):
        r = res.get(kind, {})
        if "load_s" not in r:
            log(f"| {kind} | {r} |")
            continue
        fast = r.get("anyquant_generate_path", {})
        fast_s = (f"{fast.get('decode_tokens_per_s')} ({fast.get('time_to_first_token_s')}, "
                  f"{fast.get('compile_and_capture_s')})" if isinstance(fast, dict) and fast else "-")
        log(f"| {kind} | {r['load_s']} | {r['peak_host_rss_above_baseline_gb']} | {r['peak_gpu_over_loaded']} "
            f"({r['gpu_after_load_gb']} GB) | {_tps(res, kind, 'plain_generate')} | "
            f"{_tps(res, kind, 'static_generate')} | {fast_s} |")
    log(f"ratios: {res.get('ratios')}")


if __name__ == "__main__":
    main()
