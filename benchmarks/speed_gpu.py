"""GPU speed of anyquant's int4 kernels against the memory-bandwidth floor (issue 6).

Kernel level: the Linear layers of 32 Llama-3-8B-shaped decoder layers (q, k, v, o, gate, up,
down; random weights), batch 1 and 16, bf16 activations. All 224 matmuls are captured in one
CUDA graph; the time is the median of many replays. The floor of a row is the bytes of weights
its format must read (bits per weight x weights / 8) over the measured device-to-device copy
bandwidth (bytes read + bytes written); "% of floor" is floor / measured time.

End to end: decode tokens/s of a Llama-3-8B-shaped LlamaForCausalLM with random weights built on
the GPU, bf16 vs anyquant int4 (each decoder nn.Linear replaced by Int4Linear.from_float, group
128; kernels chosen by anyquant.runtime.kernels), batch 1, 128 new tokens (greedy) after a
128-token prompt, static KV cache, each decode step one CUDA graph replay.

  python benchmarks/speed_gpu.py [--out PATH] [--tune] [--skip-e2e] [--errors PATH]

Prints tables and writes JSON (device, date, versions, every number) to --out.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata as md
import inspect
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from anyquant.runtime import kernels  # noqa: E402
from anyquant.runtime.int4_linear import Int4Linear  # noqa: E402

HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, LAYERS, VOCAB = 4096, 14336, 32, 8, 128, 32, 128256
SHAPES = [  # (name, out_features, in_features)
    ("q_proj", HEADS * HEAD_DIM, HIDDEN),
    ("k_proj", KV_HEADS * HEAD_DIM, HIDDEN),
    ("v_proj", KV_HEADS * HEAD_DIM, HIDDEN),
    ("o_proj", HIDDEN, HEADS * HEAD_DIM),
    ("gate_proj", INTER, HIDDEN),
    ("up_proj", INTER, HIDDEN),
    ("down_proj", HIDDEN, INTER),
]
GROUP = 128
BITS = {"bf16": 16.0, "int4_g128": 4.0 + 32 / GROUP, "nf4_dq": 4.0 + 8 / 64 + 32 / (64 * 256)}
ANYQUANT_KERNELS = ["torch_int4", "gemlite", "triton_gemv", "triton_gemm"]


def log(*a):
    print(*a, flush=True)


def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        try:
            return getattr(__import__(name), "__version__", None)
        except ImportError:
            return None


# ---- timing ---------------------------------------------------------------------------------

def graph_time_ms(fn, replays: int = 30) -> float:
    """Median ms of replays of one CUDA graph holding fn()."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(replays):
        e0.record()
        g.replay()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1))
    del g
    return statistics.median(times)


def copy_bandwidth_gbps() -> float:
    n = 1 << 30  # 1 GiB each way
    a = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(20):
        e0.record()
        b.copy_(a)
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1))
    del a, b
    return 2 * n / (statistics.median(times) * 1e-3) / 1e9


# ---- kernel level ---------------------------------------------------------------------------

def build_layers(with_bnb: bool):
    """32 layers x 7 Linears: bf16 weight, Int4Linear, bnb nf4 (double quant) state."""
    bnb = None
    if with_bnb:
        import bitsandbytes as bnb  # noqa: F811
    gen = torch.Generator(device="cuda").manual_seed(0)
    layers = []
    for _ in range(LAYERS):
        layer = {}
        for name, n, k in SHAPES:
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
            lin = torch.nn.Linear(k, n, bias=False, device="meta")
            lin.weight = torch.nn.Parameter(w, requires_grad=False)
            q = Int4Linear.from_float(lin, group_size=GROUP)
            entry = {"bf16": w, "int4": q}
            if bnb is not None:
                wq, state = bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
                entry["nf4"] = (wq, state)
            layer[name] = entry
        layers.append(layer)
    return layers


def make_op(kind: str):
    if kind == "bf16":
        return lambda e, x: F.linear(x, e["bf16"])
    if kind == "bnb_nf4":
        import bitsandbytes as bnb

        return lambda e, x: bnb.matmul_4bit(x, e["nf4"][0].t(), quant_state=e["nf4"][1])
    if kind == "anyquant_auto":
        return lambda e, x: e["int4"](x)
    return lambda e, x: kernels.int4_linear_forward(e["int4"], x, kernel=kind)


def kernel_rows(layers, batches, copy_bw, shape_filter=None):
    rows = []
    per_shape = []
    inputs = {b: {k: torch.randn(b, k, device="cuda", dtype=torch.bfloat16) for k in (HIDDEN, INTER)} for b in batches}
    kinds = ["bf16", "bnb_nf4"] + ANYQUANT_KERNELS + ["anyquant_auto"]
    n_weights = sum(n * k for _, n, k in SHAPES) * LAYERS
    for b in batches:
        xs = inputs[b]
        for kind in kinds:
            if kind == "triton_gemv" and b != 1:
                continue
            if kind.startswith("anyquant") or kind in ANYQUANT_KERNELS:
                e0 = layers[0]["q_proj"]["int4"]
                if kind in ANYQUANT_KERNELS and not kernels.supports(kind, e0, xs[HIDDEN]):
                    rows.append({"batch": b, "kernel": kind, "error": "not available"})
                    continue
            op = make_op(kind)
            fmt = "bf16" if kind == "bf16" else ("nf4_dq" if kind == "bnb_nf4" else "int4_g128")

            def run_all():
                for layer in layers:
                    for name, _, k in SHAPES:
                        op(layer[name], xs[k])

            try:
                t0 = time.time()
                ms = graph_time_ms(run_all)
                floor = n_weights * BITS[fmt] / 8 / (copy_bw * 1e9) * 1e3
                row = {"batch": b, "kernel": kind, "ms": round(ms, 4), "format": fmt,
                       "bits_per_weight": round(BITS[fmt], 4), "floor_ms": round(floor, 4),
                       "pct_of_floor": round(100 * floor / ms, 1)}
                if kind == "anyquant_auto":
                    row["chosen"] = {nm: kernels.choose_kernel(layers[0][nm]["int4"], xs[k]) for nm, _, k in SHAPES}
                rows.append(row)
                log(f"  batch {b:2d} {kind:14s} {ms:8.3f} ms  {row['pct_of_floor']:5.1f}% of floor  ({time.time() - t0:.1f}s)")
            except Exception as exc:  # recorded in the JSON and printed, never silently dropped
                rows.append({"batch": b, "kernel": kind, "error": f"{type(exc).__name__}: {exc}"[:500]})
                log(f"  batch {b:2d} {kind:14s} FAILED {type(exc).__name__}: {str(exc)[:300]}")
                continue
            # per unique shape (for the dispatch table): the 32 layers' matrices of that shape
            for (n, k) in sorted({(n, k) for _, n, k in SHAPES}):
                names = [nm for nm, nn, kk in SHAPES if (nn, kk) == (n, k)]

                def run_shape():
                    for layer in layers:
                        for nm in names:
                            op(layer[nm], xs[k])

                ms_s = graph_time_ms(run_shape, replays=20)
                cnt = LAYERS * len(names)
                per_shape.append({"batch": b, "kernel": kind, "n": n, "k": k, "us_per_matmul": round(1e3 * ms_s / cnt, 2),
                                  "pct_of_floor": round(100 * (n * k * BITS[fmt] / 8 / (copy_bw * 1e9) * 1e6) / (1e3 * ms_s / cnt), 1)})
    return rows, per_shape


def tune(layers, copy_bw):
    """Sweep our Triton kernels' launch configurations per unique shape (batch 1 and 16)."""
    from anyquant.runtime import triton_int4

    out = []
    gemv_cfgs = [(bn, w, pf) for bn, w in ((1, 1), (2, 1), (2, 2), (4, 2), (4, 4), (8, 4), (8, 8), (16, 4), (16, 8), (32, 8)) for pf in (0, 1)]
    gemm_cfgs = [(16, bn, sk, w, st) for bn in (16, 32, 64, 128) for sk in (1, 2, 4) for w, st in ((4, 1), (4, 2), (8, 2))]
    for (n, k) in sorted({(n, k) for _, n, k in SHAPES}):
        names = [nm for nm, nn, kk in SHAPES if (nn, kk) == (n, k)]
        mods = [layer[nm]["int4"] for layer in layers for nm in names]
        packs = [kernels._cached(m, ("triton", "cuda:0"), lambda m=m: kernels._pack_triton(m, torch.device("cuda:0"))) for m in mods]
        for b, cfgs, fn in ((1, gemv_cfgs, triton_int4.gemv_il), (16, gemm_cfgs, triton_int4.gemm_il)):
            x = torch.randn(b, k, device="cuda", dtype=torch.bfloat16)
            best = None
            for cfg in cfgs:
                def run():
                    for p in packs:
                        fn(x, p, GROUP, cfg)
                try:
                    us = 1e3 * graph_time_ms(run, replays=15) / len(packs)
                except Exception as exc:
                    out.append({"n": n, "k": k, "batch": b, "cfg": list(cfg), "error": str(exc)[:200]})
                    continue
                pct = 100 * (n * k * BITS["int4_g128"] / 8 / (copy_bw * 1e9) * 1e6) / us
                out.append({"n": n, "k": k, "batch": b, "cfg": list(cfg), "us": round(us, 2), "pct_of_floor": round(pct, 1)})
                if best is None or us < best[0]:
                    best = (us, cfg, pct)
            log(f"  tune n={n:5d} k={k:5d} batch {b:2d}: best {best[1]} {best[0]:.2f} us/matmul ({best[2]:.1f}% of floor)")
    return out


# ---- end to end -----------------------------------------------------------------------------

def llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
        max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
    )


def decode_tokens_per_s(model, prompt_len=128, new_tokens=128):
    from transformers import StaticCache

    cfg = model.config
    cache = StaticCache(config=cfg, max_cache_len=prompt_len + new_tokens + 8)
    fwd_params = inspect.signature(model.forward).parameters
    gen = torch.Generator(device="cuda").manual_seed(1)
    prompt = torch.randint(0, cfg.vocab_size, (1, prompt_len), device="cuda", generator=gen)
    tok = torch.zeros(1, 1, dtype=torch.long, device="cuda")
    pos = torch.zeros(1, dtype=torch.long, device="cuda")

    def kw(position):
        d = {"past_key_values": cache, "use_cache": True, "position_ids": position.view(1, -1)}
        if "cache_position" in fwd_params:
            d["cache_position"] = position
        return d

    def set_position(p):
        pos.fill_(p)
        for layer in getattr(cache, "layers", []):
            cl = getattr(layer, "cumulative_length", None)
            if isinstance(cl, torch.Tensor):
                cl.fill_(p)

    def step():
        out = model(input_ids=tok, **kw(pos))
        tok.copy_(out.logits[:, -1:].argmax(-1))
        pos.add_(1)

    with torch.inference_mode():
        t0 = time.time()
        out = model(input_ids=prompt, **kw(torch.arange(prompt_len, device="cuda")))
        tok.copy_(out.logits[:, -1:].argmax(-1))
        first_tok = tok.clone()
        set_position(prompt_len)
        torch.cuda.synchronize()
        prefill_s = time.time() - t0
        mode = "cuda_graph"
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            step()
            step()
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        set_position(prompt_len)
        tok.copy_(first_tok)
        g = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(g):
                step()
        except Exception as exc:
            log(f"  CUDA graph capture failed ({type(exc).__name__}: {str(exc)[:200]}); timing eager decode")
            mode = f"eager (graph capture failed: {type(exc).__name__})"
            g = None
        set_position(prompt_len)
        tok.copy_(first_tok)
        torch.cuda.synchronize()
        tokens = []
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(new_tokens):
            if g is not None:
                g.replay()
            else:
                step()
            tokens.append(tok.clone())
        e1.record()
        e1.synchronize()
        ms = e0.elapsed_time(e1)
        # a repeat, to show the spread
        set_position(prompt_len)
        tok.copy_(first_tok)
        e0.record()
        for _ in range(new_tokens):
            g.replay() if g is not None else step()
        e1.record()
        e1.synchronize()
        ms2 = e0.elapsed_time(e1)
    seq = torch.cat(tokens, dim=1)
    del g, cache
    return {"tokens_per_s": round(new_tokens / (min(ms, ms2) * 1e-3), 2),
            "tokens_per_s_runs": [round(new_tokens / (ms * 1e-3), 2), round(new_tokens / (ms2 * 1e-3), 2)],
            "ms_per_token": round(min(ms, ms2) / new_tokens, 4), "mode": mode, "prefill_s": round(prefill_s, 3),
            "distinct_tokens": int(seq.unique().numel())}


def e2e(quantize_lm_head_too: bool = True):
    from transformers import LlamaForCausalLM

    res = {}
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(llama_config())
    finally:
        torch.set_default_dtype(prev)
    model.eval()
    log(f"  model built: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params, "
        f"{torch.cuda.memory_allocated() / 2**30:.1f} GiB")
    res["bf16"] = decode_tokens_per_s(model)
    log(f"  bf16: {res['bf16']}")
    t0 = time.time()
    with torch.no_grad():
        for layer in model.model.layers:
            for parent in (layer.self_attn, layer.mlp):
                for name, child in list(parent.named_children()):
                    if isinstance(child, torch.nn.Linear):
                        setattr(parent, name, Int4Linear.from_float(child, group_size=GROUP))
                        del child
    gc.collect()
    torch.cuda.empty_cache()
    res["convert_s"] = round(time.time() - t0, 1)
    x = torch.randn(1, HIDDEN, device="cuda", dtype=torch.bfloat16)
    layer0 = model.model.layers[0]
    res["chosen_kernels_batch1"] = {
        n: kernels.choose_kernel(getattr(layer0.self_attn, n, None) or getattr(layer0.mlp, n),
                                 torch.empty(1, k, device="cuda", dtype=torch.bfloat16))
        for n, _, k in SHAPES
    }
    res["int4"] = decode_tokens_per_s(model)
    res["speedup"] = round(res["int4"]["tokens_per_s"] / res["bf16"]["tokens_per_s"], 2)
    log(f"  int4 (decoder Linears): {res['int4']}  speedup {res['speedup']}x")
    if quantize_lm_head_too:
        with torch.no_grad():
            model.lm_head = Int4Linear.from_float(model.lm_head, group_size=GROUP)
        gc.collect()
        torch.cuda.empty_cache()
        res["int4_with_lm_head"] = decode_tokens_per_s(model)
        res["speedup_with_lm_head"] = round(res["int4_with_lm_head"]["tokens_per_s"] / res["bf16"]["tokens_per_s"], 2)
        log(f"  int4 (decoder Linears + lm_head): {res['int4_with_lm_head']}  speedup {res['speedup_with_lm_head']}x")
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return res


def print_tables(result):
    log("")
    log(f"{result['device']}  torch {result['torch']}  copy bandwidth {result['copy_bandwidth_GBps']:.0f} GB/s (read + write)")
    log(f"Kernel level: 32 layers x (q,k,v,o,gate,up,down), one CUDA graph, median of replays")
    log(f"{'batch':>5} {'kernel':16} {'ms':>9} {'floor ms':>9} {'% floor':>8}")
    for r in result.get("kernel_level", []):
        if "error" in r:
            log(f"{r['batch']:>5} {r['kernel']:16} {'-':>9} {'-':>9} {'-':>8}  {r['error'][:60]}")
        else:
            log(f"{r['batch']:>5} {r['kernel']:16} {r['ms']:9.3f} {r['floor_ms']:9.3f} {r['pct_of_floor']:7.1f}%")
    if "e2e" in result:
        e = result["e2e"]
        log("End to end decode, batch 1, 128 new tokens after a 128-token prompt (static cache, CUDA graph per step)")
        log(f"  bf16                      {e['bf16']['tokens_per_s']:8.1f} tok/s")
        log(f"  anyquant int4 (decoder)   {e['int4']['tokens_per_s']:8.1f} tok/s  ({e['speedup']:.2f}x)")
        if "int4_with_lm_head" in e:
            log(f"  int4 decoder + lm_head    {e['int4_with_lm_head']['tokens_per_s']:8.1f} tok/s  ({e['speedup_with_lm_head']:.2f}x)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "speed_gpu.json"))
    ap.add_argument("--tune", action="store_true", help="also sweep our Triton kernels' launch configurations")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--skip-kernels", action="store_true")
    ap.add_argument("--errors", default=None, help="JSON of measured kernel errors (tests/test_runtime_gpu.py) to include")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("speed_gpu.py needs a CUDA device")
    props = torch.cuda.get_device_properties(0)
    result = {
        "device": props.name, "capability": list(torch.cuda.get_device_capability(0)),
        "date": datetime.date.today().isoformat(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "triton": version("triton"), "transformers": version("transformers"),
        "bitsandbytes": version("bitsandbytes"), "gemlite": version("gemlite"),
        "shapes": SHAPES, "layers": LAYERS, "group_size": GROUP,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        out.write_text(json.dumps(result, indent=1))

    result["copy_bandwidth_GBps"] = round(copy_bandwidth_gbps(), 1)
    log(f"copy bandwidth: {result['copy_bandwidth_GBps']} GB/s")
    if not args.skip_kernels:
        t0 = time.time()
        try:
            import bitsandbytes  # noqa: F401
            with_bnb = True
        except ImportError as exc:
            log(f"bitsandbytes not importable: {exc}")
            with_bnb = False
        layers = build_layers(with_bnb)
        log(f"built 32 layers in {time.time() - t0:.1f}s; {torch.cuda.memory_allocated() / 2**30:.1f} GiB")
        if args.tune:
            result["tune"] = tune(layers, result["copy_bandwidth_GBps"])
            save()
        rows, per_shape = kernel_rows(layers, [1, 16], result["copy_bandwidth_GBps"])
        result["kernel_level"], result["per_shape"] = rows, per_shape
        save()
        del layers
        gc.collect()
        torch.cuda.empty_cache()
    if args.errors and Path(args.errors).exists():
        result["correctness"] = json.loads(Path(args.errors).read_text())
    if not args.skip_e2e:
        result["e2e"] = e2e()
    save()
    print_tables(result)


if __name__ == "__main__":
    main()
