"""GPU speed of anyquant's int4 kernels against the memory-bandwidth floor (issue 6).

Kernel level: the Linear layers of 32 Llama-3-8B-shaped decoder layers (q, k, v, o, gate, up,
down; random weights), batch 1 and 16, bf16 activations. All 224 matmuls are captured in one
CUDA graph; the time is the median of many replays. The floor of a row is the bytes of weights
its format must read (bits per weight x weights / 8) over the measured device-to-device copy
bandwidth (bytes read + bytes written); "% of floor" is floor / measured time.

The same weights are then timed with q/k/v and gate/up fused (anyquant.runtime.fuse: 5 matmuls
per layer, qkv 6144 x 4096 and gate_up 28672 x 4096; the same bytes, so the same floor).

End to end: decode tokens/s of a Llama-3-8B-shaped LlamaForCausalLM with random weights built on
the GPU, bf16 vs anyquant int4 (each decoder nn.Linear replaced by Int4Linear.from_float, group
128; kernels chosen by anyquant.runtime.kernels), batch 1, 128 new tokens (greedy) after a
128-token prompt, static KV cache, each decode step one CUDA graph replay. Variants: eager
decode step in a graph; torch.compile (--compile-mode, "default") of the decode step, also in a
graph, for bf16 and int4 alike; lm_head in int4 too; q/k/v and gate/up fused (bf16 and int4);
and "_attn" rows: the same model with anyquant's decode attention (anyquant.runtime.attention),
for bf16 and int4 alike.

--e2e-repeat N (robust comparison): the bf16 and fused int4 + lm_head models in one process, each
variant of REPEAT_VARIANTS prepared once, then N rounds of every variant in turn (median, min,
max of tok/s and of the per-round ratio to bf16). "_step" variants compile the whole decode step
(forward + runtime.decode.greedy_token + token/position updates) with the cache's layers sharing
one position counter (runtime.decode.share_position_counter); "_combo" adds inductor's
combo_kernels option.

  python benchmarks/speed_gpu.py [--out PATH] [--tune [mma,cuda,gemv,gemv2,gemm]] [--apply-tune]
      [--skip-e2e] [--skip-kernels] [--skip-separate] [--kinds K1,K2] [--compile-mode MODE]
      [--e2e VARIANTS] [--e2e-layers N] [--batch1-first KERNEL] [--e2e-compare KERNEL] [--errors PATH]
      [--attention-bench] [--tune-lm-head] [--profile PATH] [--e2e-repeat N] [--repeat-variants V1,V2]

Prints tables and writes JSON (device, date, versions, every number) to --out.
"""

from __future__ import annotations

import argparse
import contextlib
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

from anyquant.runtime import cuda_int4, kernels  # noqa: E402
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
# The same weights with q/k/v and gate/up fused (anyquant.runtime.fuse): 5 matmuls per layer.
SHAPES_FUSED = [
    ("qkv_proj", (HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN),
    ("o_proj", HIDDEN, HEADS * HEAD_DIM),
    ("gate_up_proj", 2 * INTER, HIDDEN),
    ("down_proj", HIDDEN, INTER),
]
FUSED_FROM = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
GROUP = 128
BITS = {"bf16": 16.0, "int4_g128": 4.0 + 32 / GROUP, "nf4_dq": 4.0 + 8 / 64 + 32 / (64 * 256)}
TUNE_OBJECTIVE = "back_to_back"  # or "after_elementwise" (--tune-objective): which best --apply-tune keeps
ANYQUANT_KERNELS = ["cuda_stream", "cuda_mma", "cuda_gemv", "torch_int4", "gemlite", "triton_gemv", "triton_gemv2", "triton_gemm"]
BATCH1_ONLY = ("cuda_stream", "cuda_mma", "cuda_gemv", "triton_gemv", "triton_gemv2")


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

def graph_time_ms(fn, replays: int = 30, before_capture=None) -> float:
    """Median ms of replays of one CUDA graph holding fn(); before_capture() runs after the
    warm-up calls, just before the capture."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    if before_capture is not None:
        before_capture()
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


def fuse_layers(layers):
    """The same weights, q/k/v and gate/up joined (bf16 by concatenation, int4 by
    anyquant.runtime.fuse); the separate layers' entries are dropped as it goes."""
    from anyquant.runtime.fuse import fuse_int4

    out = []
    for layer in layers:
        new = {}
        for name, _, _ in SHAPES_FUSED:
            parts = FUSED_FROM.get(name, (name,))
            if len(parts) == 1:
                new[name] = {"bf16": layer[name]["bf16"], "int4": layer[name]["int4"]}
            else:
                new[name] = {"bf16": torch.cat([layer[p]["bf16"] for p in parts], 0),
                             "int4": fuse_int4([layer[p]["int4"] for p in parts])}
        new["o_proj"]["int4"].clear_kernel_cache()
        new["down_proj"]["int4"].clear_kernel_cache()
        layer.clear()
        out.append(new)
    return out


def kernel_rows(layers, batches, copy_bw, shapes=SHAPES, kinds=None, layout="separate", interleave=False):
    """interleave: each matmul follows an elementwise kernel that rewrites its input in place
    (x.mul_(1.0)), as in a model where each GEMV follows a norm or activation kernel: programmatic
    dependent launch then cannot overlap a GEMV with the one before. The time of the elementwise
    kernels alone (the same graph without the matmuls) is subtracted."""
    rows = []
    per_shape = []
    inputs = {b: {k: torch.randn(b, k, device="cuda", dtype=torch.bfloat16) for k in (HIDDEN, INTER)} for b in batches}
    kinds = kinds or (["bf16", "bnb_nf4"] + ANYQUANT_KERNELS + ["anyquant_auto"])
    n_weights = sum(n * k for _, n, k in shapes) * LAYERS
    first = shapes[0][0]
    for b in batches:
        xs = inputs[b]
        for kind in kinds:
            if kind in BATCH1_ONLY and b != 1:
                continue
            if kind.startswith("anyquant") or kind in ANYQUANT_KERNELS:
                e0 = layers[0][first]["int4"]
                if kind in ANYQUANT_KERNELS and not kernels.supports(kind, e0, xs[HIDDEN]):
                    rows.append({"batch": b, "kernel": kind, "error": "not available"})
                    continue
            op = make_op(kind)
            fmt = "bf16" if kind == "bf16" else ("nf4_dq" if kind == "bnb_nf4" else "int4_g128")

            def run_all(with_op=True):
                for layer in layers:
                    for name, _, k in shapes:
                        if interleave:
                            xs[k].mul_(1.0)
                        if with_op:
                            op(layer[name], xs[k])

            try:
                t0 = time.time()
                ms = graph_time_ms(run_all)
                if interleave:
                    ms -= graph_time_ms(lambda: run_all(False))
                floor = n_weights * BITS[fmt] / 8 / (copy_bw * 1e9) * 1e3
                row = {"batch": b, "kernel": kind, "layout": layout + ("_after_elementwise" if interleave else ""),
                       "ms": round(ms, 4), "format": fmt,
                       "bits_per_weight": round(BITS[fmt], 4), "floor_ms": round(floor, 4),
                       "pct_of_floor": round(100 * floor / ms, 1)}
                if kind == "anyquant_auto":
                    row["chosen"] = {nm: kernels.choose_kernel(layers[0][nm]["int4"], xs[k]) for nm, _, k in shapes}
                rows.append(row)
                log(f"  batch {b:2d} {kind:14s} {row['layout']:9s} {ms:8.3f} ms  {row['pct_of_floor']:5.1f}% of floor  ({time.time() - t0:.1f}s)")
            except Exception as exc:  # recorded in the JSON and printed, never silently dropped
                rows.append({"batch": b, "kernel": kind, "layout": layout + ("_after_elementwise" if interleave else ""),
                             "error": f"{type(exc).__name__}: {exc}"[:500]})
                log(f"  batch {b:2d} {kind:14s} FAILED {type(exc).__name__}: {str(exc)[:300]}")
                continue
            # per unique shape (for the dispatch table): the 32 layers' matrices of that shape
            for (n, k) in ([] if interleave else sorted({(n, k) for _, n, k in shapes})):
                names = [nm for nm, nn, kk in shapes if (nn, kk) == (n, k)]

                def run_shape():
                    for layer in layers:
                        for nm in names:
                            op(layer[nm], xs[k])

                ms_s = graph_time_ms(run_shape, replays=20)
                cnt = LAYERS * len(names)
                per_shape.append({"batch": b, "kernel": kind, "layout": layout, "n": n, "k": k, "us_per_matmul": round(1e3 * ms_s / cnt, 2),
                                  "pct_of_floor": round(100 * (n * k * BITS[fmt] / 8 / (copy_bw * 1e9) * 1e6) / (1e3 * ms_s / cnt), 1)})
    return rows, per_shape


# cps 1 with W <= 17: two CTAs of 17 or 18 warps at 56 registers fit a multiprocessor, so the
# next GEMV's CTA starts beside this one's and copies while it runs
STREAM_SEQUENCE_CFGS = [(2, 16, 1), (3, 16, 1), (4, 16, 1), (5, 16, 1), (6, 16, 1), (3, 12, 1), (4, 12, 1),
                        (5, 12, 1), (6, 12, 1), (4, 14, 1), (5, 14, 1), (4, 17, 1), (5, 17, 1), (4, 8, 1),
                        (8, 8, 1), (2, 16, 2), (3, 16, 2), (3, 24, 1), (3, 30, 1)]


def with_pdl(c):
    """(S, W, CTAs) -> (S, W, CTAs, 1); a 4-tuple keeps its programmatic-launch flag."""
    return tuple(c) if len(c) == 4 else tuple(c) + (1,)


def tune_stream_sequence(layers, copy_bw, shapes, layout, apply=False, cfgs=None):
    """cuda_stream in the whole sequence of one layout (every matmul of the 32 layers in one
    graph, as kernel_rows times it): consecutive GEMVs overlap only where their CTAs fit on a
    multiprocessor together, so the per-shape bests (timed on one shape back to back) can lose
    there. Times the per-shape table as it stands, then each configuration of
    STREAM_SEQUENCE_CFGS on every shape; with apply, the fastest stays in the dispatch table."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    x = {k: torch.randn(1, k, device="cuda", dtype=torch.bfloat16) for k in (HIDDEN, INTER)}
    n_weights = sum(n * k for _, n, k in shapes) * LAYERS
    floor = n_weights * BITS["int4_g128"] / 8 / (copy_bw * 1e9) * 1e3
    keys = sorted({(n, k) for _, n, k in shapes})
    before = {key: kernels.current_settings().config("cuda_stream", key) for key in keys}
    candidates = [("per_shape", before)] + [
        (list(with_pdl(c)), {key: with_pdl(c) for key in keys}) for c in cfgs or STREAM_SEQUENCE_CFGS]
    rows, best = [], None
    for label, table in candidates:
        if not all(cuda_int4.stream_shape_ok(n, k, GROUP, table[(n, k)], sms) for n, k in keys):
            continue

        def run():
            for layer in layers:
                for name, _, k in shapes:
                    kernels.int4_linear_forward(layer[name]["int4"], x[k], kernel="cuda_stream")

        try:
            with kernels.use_kernels(configs={"cuda_stream": table}):
                ms = graph_time_ms(run)
        except Exception as exc:  # recorded, never silently dropped
            rows.append({"kernel": "stream_sequence", "layout": layout, "cfg": label,
                         "error": f"{type(exc).__name__}: {exc}"[:300]})
            log(f"  stream sequence {layout:8s} {str(label):22s} FAILED {str(exc)[:200]}")
            continue
        rows.append({"kernel": "stream_sequence", "layout": layout, "cfg": label, "ms": round(ms, 4),
                     "pct_of_floor": round(100 * floor / ms, 1),
                     "table": {f"{n}x{k}": list(v) for (n, k), v in table.items()}})
        log(f"  stream sequence {layout:8s} {str(label):22s} {ms:.3f} ms  {100 * floor / ms:5.1f}% of floor")
        if best is None or ms < best[0]:
            best = (ms, table)
    if apply:
        keep_settings(configs={"cuda_stream": best[1]})
    return rows


def tune(layers, copy_bw, shapes=SHAPES, which=("gemv", "gemv2", "gemm"), apply=False):
    """Sweep our kernels' launch configurations per unique shape (batch 1 and 16). With apply,
    cuda_gemv's best configuration per shape, and whether it beat torch_int4 there, are put in
    the kernel settings for the rest of the run (keep_settings; copy them into kernels.DEFAULT_SETTINGS
    to keep them)."""
    from anyquant.runtime import triton_int4

    out = []
    gemv_cfgs = [(bn, w, pf) for bn, w in ((1, 1), (2, 1), (2, 2), (4, 2), (4, 4), (8, 4), (8, 8), (16, 4), (16, 8), (32, 8)) for pf in (0, 1)]
    gemv2_cfgs = [(bn, w, r) for bn, w in ((1, 1), (2, 1), (2, 2), (4, 1), (4, 2), (4, 4), (8, 2), (8, 4), (16, 4)) for r in (4, 8)]
    gemm_cfgs = [(16, bn, sk, w, st) for bn in (16, 32, 64, 128) for sk in (1, 2, 4) for w, st in ((4, 1), (4, 2), (8, 2))]
    sweeps = {"gemv": (1, gemv_cfgs, triton_int4.gemv_il), "gemv2": (1, gemv2_cfgs, triton_int4.gemv_il2),
              "gemm": (16, gemm_cfgs, triton_int4.gemm_il)}
    if "cuda" in which:
        cuda_cfgs = [(r, u, w, cps, pdl) for (r, u) in cuda_int4.VARIANTS for w in (4, 8) for cps in (0, 1, 2, 4)
                     for pdl in (0, 1)]
        sweeps["cuda"] = (1, cuda_cfgs, cuda_int4.gemv)
    if "mma" in which:
        tiles = ((1, 2), (1, 4), (1, 8), (1, 16), (2, 2), (2, 4), (2, 8), (4, 2), (4, 4), (8, 1))
        mma_cfgs = [(0, u, rt, sk, cps, 1) for u in (1, 2, 4) for (rt, sk) in tiles for cps in (0, 2)]
        mma_cfgs += [(1, p, rt, sk, cps, 1) for p in cuda_int4.MMA_STAGES for (rt, sk) in tiles for cps in (0, 1, 2)]
        sweeps["mma"] = (1, mma_cfgs, cuda_int4.gemv_mma)
    if "stream" in which:
        stream_cfgs = [(st, w, cps, 1) for st in cuda_int4.STREAM_STAGES for w in (4, 8, 15, 16) for cps in (1, 2)]
        sweeps["stream"] = (1, stream_cfgs, None)  # fn bound per shape below (it takes N)
    dev = torch.device("cuda:0")
    for (n, k) in sorted({(n, k) for _, n, k in shapes}):
        names = [nm for nm, nn, kk in shapes if (nn, kk) == (n, k)]
        mods = [layer[nm]["int4"] for layer in layers for nm in names]
        for kname in which:
            if kname in ("cuda", "mma"):
                packs = [kernels.layout(m, "cuda_gemv", dev) for m in mods]
            elif kname == "stream":
                packs = [kernels.layout(m, "cuda_stream", dev) for m in mods]
            else:
                packs = [kernels.layout(m, "triton_gemv", dev) for m in mods]
            b, cfgs, fn = sweeps[kname]
            if kname == "stream":
                def fn(x_, p_, _group, cfg_, n=n):
                    return cuda_int4.gemv_stream(x_, p_, n, cfg_, carveout=kernels.current_settings().stream_carveout)
            x = torch.randn(b, k, device="cuda", dtype=torch.bfloat16)
            best = None
            for cfg in cfgs:
                def run():
                    for p in packs:
                        fn(x, p, GROUP, cfg)
                try:
                    us = 1e3 * graph_time_ms(run, replays=15) / len(packs)
                except Exception as exc:
                    out.append({"kernel": kname, "n": n, "k": k, "batch": b, "cfg": list(cfg), "error": str(exc)[:200]})
                    continue
                pct = 100 * (n * k * BITS["int4_g128"] / 8 / (copy_bw * 1e9) * 1e6) / us
                out.append({"kernel": kname, "n": n, "k": k, "batch": b, "cfg": list(cfg), "us": round(us, 2), "pct_of_floor": round(pct, 1)})
                if best is None or us < best[0]:
                    best = (us, cfg, pct)
            if kname == "mma" and best is not None:
                # the 12 best configurations again, each matmul after an elementwise kernel that
                # rewrites x (kernel_rows' interleave); the dispatch table takes the best of these
                def run_ew():
                    for _ in packs:
                        x.mul_(1.0)
                base = graph_time_ms(run_ew, replays=15)
                top = sorted((r for r in out if r.get("kernel") == "mma" and r.get("n") == n and r.get("k") == k
                              and "us" in r), key=lambda r: r["us"])[:12]
                best_il = None
                for r in top:
                    cfg_i = tuple(r["cfg"])

                    def run_il():
                        for p in packs:
                            x.mul_(1.0)
                            fn(x, p, GROUP, cfg_i)
                    us_il = 1e3 * (graph_time_ms(run_il, replays=15) - base) / len(packs)
                    r["us_after_elementwise"] = round(us_il, 2)
                    if best_il is None or us_il < best_il[0]:
                        best_il = (us_il, cfg_i)
                log(f"  tune mma   n={n:5d} k={k:5d}: after elementwise best {best_il[1]} {best_il[0]:.2f} us/matmul "
                    f"(back-to-back best {best[1]}: {top[0].get('us_after_elementwise')})")
                out.append({"kernel": "mma_best_after_elementwise", "n": n, "k": k, "cfg": list(best_il[1]),
                            "us_after_elementwise": round(best_il[0], 2)})
                if TUNE_OBJECTIVE == "after_elementwise":
                    best = (best[0], best_il[1], best[2])
                # the best configuration without programmatic dependent launch, for the record
                cfg0 = tuple(best[1][:-1]) + (0,)

                def run0():
                    for p in packs:
                        fn(x, p, GROUP, cfg0)
                us0 = 1e3 * graph_time_ms(run0, replays=15) / len(packs)
                out.append({"kernel": kname, "n": n, "k": k, "batch": b, "cfg": list(cfg0), "us": round(us0, 2),
                            "note": "best configuration, pdl off"})
                log(f"  tune mma   n={n:5d} k={k:5d}: best {best[1]} without pdl {us0:.2f} us/matmul")
                if apply:
                    keep_settings(configs={"cuda_mma": {(n, k): best[1]}})
            if kname == "stream" and best is not None and apply:
                keep_settings(configs={"cuda_stream": {(n, k): best[1]}})
            if kname == "cuda" and best is not None:
                # against torch_int4 on the same matrices, the same way (decides the dispatch order)
                def run_t():
                    for m in mods:
                        kernels.int4_linear_forward(m, x, kernel="torch_int4")
                us_t = 1e3 * graph_time_ms(run_t, replays=15) / len(mods)
                out.append({"kernel": "torch_int4", "n": n, "k": k, "batch": 1, "us": round(us_t, 2)})
                log(f"  tune cuda  n={n:5d} k={k:5d}: torch_int4 {us_t:.2f} us/matmul")
                if apply:
                    preferred = kernels.current_settings().cuda_gemv_preferred
                    keep_settings(configs={"cuda_gemv": {(n, k): best[1]}},
                                  cuda_gemv_preferred=preferred | {(n, k)} if best[0] < us_t else preferred - {(n, k)})
            if best is None:
                log(f"  tune {kname} n={n:5d} k={k:5d}: every configuration failed: {out[-1].get('error')}")
            else:
                log(f"  tune {kname:5s} n={n:5d} k={k:5d} batch {b:2d}: best {best[1]} {best[0]:.2f} us/matmul ({best[2]:.1f}% of floor)")
    return out


def tune_lm_head(copy_bw, cfgs=None):
    """cuda_mma configurations for the int4 lm_head (VOCAB x HIDDEN, one matrix of 279 MB, so
    no cache effects): us per call, 4 calls per graph replay."""
    w = torch.randn(VOCAB, HIDDEN, device="cuda", dtype=torch.bfloat16) * 0.02
    lin = torch.nn.Linear(HIDDEN, VOCAB, bias=False, device="meta")
    lin.weight = torch.nn.Parameter(w, requires_grad=False)
    m = Int4Linear.from_float(lin, group_size=GROUP)
    del w, lin
    dev = torch.device("cuda:0")
    packed = kernels.layout(m, "cuda_mma", dev)
    x = torch.randn(1, HIDDEN, device="cuda", dtype=torch.bfloat16)
    cfgs = cfgs or ([kernels.DEFAULT_SETTINGS.default_configs["cuda_mma"]]
                    + [(0, u, rt, sk, cps, 1) for u in (1, 2, 4) for (rt, sk) in ((1, 4), (1, 8), (1, 16), (2, 4), (2, 8), (4, 2), (4, 4))
                       for cps in (0, 1, 2)])
    floor_us = VOCAB * HIDDEN * BITS["int4_g128"] / 8 / (copy_bw * 1e9) * 1e6
    out, best = [], None
    for cfg in cfgs:
        def run():
            for _ in range(4):
                cuda_int4.gemv_mma(x, packed, GROUP, cfg)
        try:
            us = 1e3 * graph_time_ms(run, replays=10) / 4
        except Exception as exc:
            out.append({"cfg": list(cfg), "error": str(exc)[:200]})
            continue
        out.append({"cfg": list(cfg), "us": round(us, 2), "pct_of_floor": round(100 * floor_us / us, 1)})
        if best is None or us < best[0]:
            best = (us, cfg)
    log(f"  tune lm_head {VOCAB}x{HIDDEN}: default {out[0].get('us')} us, best {best[1]} {best[0]:.2f} us "
        f"(floor {floor_us:.1f} us)")
    del m, packed
    return out


def attention_bench(lengths=(264, 1024, 4096)):
    """One decode step's attention for the 32 layers (Hkv 8, 4 query heads each, head_dim 128,
    a static cache of L positions, the first L - 8 valid), in one CUDA graph: anyquant's kernel
    vs torch SDPA as transformers calls it under torch.compile (repeat_kv copies, bool mask) and
    with enable_gqa. us per layer."""
    from anyquant.runtime import attention

    attention.build_for(torch.device("cuda:0"))
    out = []
    for L in lengths:
        ks = [torch.randn(1, KV_HEADS, L, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(LAYERS)]
        vs = [torch.randn_like(k) for k in ks]
        q = torch.randn(1, HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        mask = torch.zeros(1, 1, 1, L, dtype=torch.bool, device="cuda")
        mask[..., :L - 8] = True
        scale = HEAD_DIM ** -0.5
        g = HEADS // KV_HEADS
        fns = {
            "anyquant": lambda k, v: torch.ops.anyquant.decode_attention(q, k, v, mask, scale),
            "sdpa_repeat_kv": lambda k, v: F.scaled_dot_product_attention(
                q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), attn_mask=mask, scale=scale),
            "sdpa_enable_gqa": lambda k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                                                          enable_gqa=True),
        }
        row = {"L": L}
        for name, fn in fns.items():
            try:
                row[name + "_us"] = round(1e3 * graph_time_ms(lambda: [fn(k, v) for k, v in zip(ks, vs)], 20) / LAYERS, 2)
            except Exception as exc:
                row[name + "_error"] = str(exc)[:200]
        ref = fns["sdpa_repeat_kv"](ks[0], vs[0]).transpose(1, 2).double()
        got = fns["anyquant"](ks[0], vs[0]).double()
        row["rel_err_vs_sdpa"] = ((got - ref).norm() / ref.norm()).item()
        log(f"  attention L={L}: {row}")
        out.append(row)
        del ks, vs
    return out


# ---- end to end -----------------------------------------------------------------------------

def llama_config(layers=LAYERS):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=layers,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
        max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
    )


class DecodeRun:
    """One model's greedy decode, prepared once (prefill, compile, warm-up, CUDA graph capture) and
    timed as often as asked: each `run()` restarts at the prompt's end and decodes `new_tokens`.

    compile_mode None: the eager decode step captured in one CUDA graph; otherwise torch.compile
    (mode=compile_mode, dynamic=False) of the decode step (the prompt runs eagerly), captured in one
    CUDA graph as well unless the mode makes its own ("reduce-overhead"). whole_step: compile the
    whole step (forward, greedy token by runtime.decode.greedy_token, token and position updates)
    instead of the model's forward alone (argmax then runs eagerly). share_counter: the static
    cache's layers share one position counter (runtime.decode.share_position_counter)."""

    def __init__(self, model, prompt_len=128, new_tokens=128, compile_mode=None, whole_step=False,
                 share_counter=False, inductor_options=None):
        from transformers import StaticCache

        from anyquant.runtime.decode import greedy_token, share_position_counter

        cfg = model.config
        self.new_tokens = new_tokens
        self.prompt_len = prompt_len
        self.cache = cache = StaticCache(config=cfg, max_cache_len=prompt_len + new_tokens + 8)
        self.shared_counter = share_position_counter(cache, "cuda") is not None if share_counter else False
        fwd_params = inspect.signature(model.forward).parameters
        gen = torch.Generator(device="cuda").manual_seed(1)
        prompt = torch.randint(0, cfg.vocab_size, (1, prompt_len), device="cuda", generator=gen)
        self.tok = tok = torch.zeros(1, 1, dtype=torch.long, device="cuda")
        self.pos = pos = torch.zeros(1, dtype=torch.long, device="cuda")

        def kw(position):
            d = {"past_key_values": cache, "use_cache": True, "position_ids": position.view(1, -1)}
            if "cache_position" in fwd_params:
                d["cache_position"] = position
            return d

        fwd = model
        self.compile_s = None
        if compile_mode is not None and not whole_step:
            fwd = torch.compile(model, mode=None if compile_mode == "default" else compile_mode, dynamic=False)
        own_graphs = compile_mode is not None and "reduce-overhead" in compile_mode

        def step_body(tok, pos):
            out = fwd(input_ids=tok, **kw(pos))
            tok.copy_(greedy_token(out.logits))
            pos.add_(1)

        if whole_step:
            compiled = torch.compile(step_body, mode=None if compile_mode in (None, "default") else compile_mode,
                                     dynamic=False, options=inductor_options)

            def step():
                compiled(tok, pos)
        else:
            def step():
                out = fwd(input_ids=tok, **kw(pos))
                tok.copy_(out.logits[:, -1:].argmax(-1))
                pos.add_(1)

        self.step = step
        with torch.inference_mode():
            t0 = time.time()
            out = model(input_ids=prompt, **kw(torch.arange(prompt_len, device="cuda")))
            tok.copy_(out.logits[:, -1:].argmax(-1))
            self.first_tok = tok.clone()
            del out
            self.set_position(prompt_len)
            torch.cuda.synchronize()
            self.prefill_s = time.time() - t0
            self.mode = ("cuda_graph" if compile_mode is None else
                         f"compiled ({compile_mode}{', whole step' if whole_step else ''}) + cuda_graph")
            t1 = time.time()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(3 if own_graphs else 2):
                    step()
            torch.cuda.current_stream().wait_stream(s)
            torch.cuda.synchronize()
            if compile_mode is not None:
                self.compile_s = round(time.time() - t1, 1)
            self.set_position(prompt_len)
            tok.copy_(self.first_tok)
            self.g = torch.cuda.CUDAGraph()
            if own_graphs:
                self.mode = f"compiled ({compile_mode})"
                self.g = None
            else:
                try:
                    with torch.cuda.graph(self.g):
                        step()
                except Exception as exc:
                    log(f"  CUDA graph capture failed ({type(exc).__name__}: {str(exc)[:200]}); timing without")
                    self.mode = (f"{'eager' if compile_mode is None else 'compiled'} "
                                 f"(graph capture failed: {type(exc).__name__})")
                    self.g = None

    def set_position(self, p):
        self.pos.fill_(p)
        for layer in getattr(self.cache, "layers", []):
            cl = getattr(layer, "cumulative_length", None)
            if isinstance(cl, torch.Tensor):
                cl.fill_(p)

    def run(self):
        """ms for new_tokens steps from the prompt's end, and the tokens [1, new_tokens]."""
        with torch.inference_mode():
            self.set_position(self.prompt_len)
            self.tok.copy_(self.first_tok)
            out = torch.empty(1, self.new_tokens, dtype=torch.long, device="cuda")
            torch.cuda.synchronize()
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            for i in range(self.new_tokens):
                self.g.replay() if self.g is not None else self.step()
                out[:, i:i + 1].copy_(self.tok)
            e1.record()
            e1.synchronize()
        return e0.elapsed_time(e1), out

    def close(self):
        del self.g, self.cache, self.step


def decode_tokens_per_s(model, prompt_len=128, new_tokens=128, compile_mode=None, profile=None, whole_step=False,
                        share_counter=False):
    """Greedy decode tokens/s (see DecodeRun), the better of two runs."""
    if compile_mode is not None:
        torch._dynamo.reset()
    r = DecodeRun(model, prompt_len, new_tokens, compile_mode, whole_step, share_counter)
    ms, seq = r.run()
    ms2, _ = r.run()             # a repeat, to show the spread
    if profile and r.g is not None:
        profile_replays(r.g, profile)
    res = {"tokens_per_s": round(new_tokens / (min(ms, ms2) * 1e-3), 2),
           "tokens_per_s_runs": [round(new_tokens / (ms * 1e-3), 2), round(new_tokens / (ms2 * 1e-3), 2)],
           "ms_per_token": round(min(ms, ms2) / new_tokens, 4), "mode": r.mode, "prefill_s": round(r.prefill_s, 3),
           "compile_and_warmup_s": r.compile_s, "distinct_tokens": int(seq.unique().numel()),
           "first_tokens": seq[0, :8].tolist()}
    if share_counter:
        res["shared_counter"] = r.shared_counter
    r.close()
    del r
    if compile_mode is not None:
        torch._dynamo.reset()
    return res


def profile_replays(g, path, replays=3):
    """Kernel times of a few replays of the decode-step graph (torch.profiler, CUDA activity):
    a table by kernel name (PATH.txt) and the trace (PATH.json)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            g.replay()
        torch.cuda.synchronize()
    Path(path + ".txt").write_text(
        f"{replays} replays of one decode step\n"
        + prof.key_averages().table(sort_by="cuda_time_total", row_limit=60, max_name_column_width=90))
    prof.export_chrome_trace(path + ".json")
    log(f"  profile written to {path}.txt / .json")


def _build_model(layers=LAYERS):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(llama_config(layers))
    finally:
        torch.set_default_dtype(prev)
    return model.eval()


def _quantize_decoder(model):
    with torch.no_grad():
        for layer in model.model.layers:
            for parent in (layer.self_attn, layer.mlp):
                for name, child in list(parent.named_children()):
                    if isinstance(child, torch.nn.Linear):
                        setattr(parent, name, Int4Linear.from_float(child, group_size=GROUP))
                        del child
    gc.collect()
    torch.cuda.empty_cache()


# Kernel settings kept for the rest of the run (--batch1-first, --stream-carveout, --apply-tune):
# each keep_settings enters one more kernels.use_kernels block here; main closes them at exit.
RUN_SETTINGS = contextlib.ExitStack()


def keep_settings(**changes):
    """kernels.use_kernels(**changes) for the rest of the run (see RUN_SETTINGS)."""
    return RUN_SETTINGS.enter_context(kernels.use_kernels(**changes))


def e2e(compile_mode="default", variants=None, layers=LAYERS, compare=None, profile=None, lm_head_cfg=None):
    """Each variant is one decode measurement (see E2E_VARIANTS); the model is changed in place
    from bf16 to int4 (decoder Linears), + lm_head, + fused q/k/v and gate/up."""
    from anyquant.runtime.fuse import fuse_projections

    variants = variants or E2E_VARIANTS
    res = {"compile_mode": compile_mode, "layers": layers}

    def measure(key, model, compiled, prof=None):
        if key not in variants:
            return
        t0 = time.time()
        try:
            res[key] = decode_tokens_per_s(model, compile_mode=compile_mode if compiled else None, profile=prof)
        except Exception as exc:  # recorded, never silently dropped
            res[key] = {"error": f"{type(exc).__name__}: {exc}"[:800]}
        log(f"  {key}: {res[key]}  ({time.time() - t0:.0f}s)")

    model = _build_model(layers)
    log(f"  model built: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params, "
        f"{torch.cuda.memory_allocated() / 2**30:.1f} GiB")
    from anyquant.runtime.attention import set_implementation, use_decode_attention

    def with_attention(key, model, compiled, prof=None):
        """the same model with anyquant's decode attention (runtime.attention), then back"""
        if key not in variants:
            return
        prev = use_decode_attention(model)
        try:
            measure(key, model, compiled, prof)
        finally:
            set_implementation(model, prev)

    measure("bf16", model, False)
    with_attention("bf16_attn", model, False)
    measure("bf16_compiled", model, True)
    with_attention("bf16_compiled_attn", model, True)
    if "bf16_fused_compiled" in variants or "bf16_fused_compiled_attn" in variants:
        fuse_projections(model)
        measure("bf16_fused_compiled", model, True)
        with_attention("bf16_fused_compiled_attn", model, True)
        del model
        gc.collect()
        torch.cuda.empty_cache()
        model = _build_model(layers)    # same seed: the same weights, unfused
    t0 = time.time()
    _quantize_decoder(model)
    res["convert_s"] = round(time.time() - t0, 1)
    layer0 = model.model.layers[0]
    res["chosen_kernels_batch1"] = {
        n: kernels.choose_kernel(getattr(layer0.self_attn, n, None) or getattr(layer0.mlp, n),
                                 torch.empty(1, k, device="cuda", dtype=torch.bfloat16))
        for n, _, k in SHAPES
    }
    measure("int4", model, False)
    with torch.no_grad():
        model.lm_head = Int4Linear.from_float(model.lm_head, group_size=GROUP)
    gc.collect()
    torch.cuda.empty_cache()
    measure("int4_with_lm_head", model, False)
    measure("int4_with_lm_head_compiled", model, True)
    fuse_projections(model)
    gc.collect()
    torch.cuda.empty_cache()
    measure("int4_fused_with_lm_head", model, False)
    attn_profiled = "int4_fused_with_lm_head_compiled_attn" in variants
    measure("int4_fused_with_lm_head_compiled", model, True, prof=None if attn_profiled else profile)
    with_attention("int4_fused_with_lm_head_attn", model, False)
    with_attention("int4_fused_with_lm_head_compiled_attn", model, True, prof=profile)
    if lm_head_cfg is not None and "int4_fused_with_lm_head_compiled_attn" in variants:
        # the lm_head with the configuration tuned in this run (tune_lm_head), for comparison
        key = (model.lm_head.out_features, model.lm_head.in_features)
        variants = tuple(variants) + ("int4_fused_with_lm_head_compiled_attn_lm_head_tuned",)
        with kernels.use_kernels(configs={"cuda_mma": {key: lm_head_cfg}}):
            with_attention("int4_fused_with_lm_head_compiled_attn_lm_head_tuned", model, True)
        res["lm_head_tuned_cfg"] = list(lm_head_cfg)
    if compare:
        # the same fused model and weights with another kernel first at batch 1
        with kernels.use_kernels(batch1_first=compare):
            res[f"chosen_kernels_batch1_{compare}"] = {
                n: kernels.choose_kernel(m, torch.empty(1, m.in_features, device="cuda", dtype=torch.bfloat16))
                for n, m in (("qkv_proj", layer0.self_attn.qkv_proj), ("o_proj", layer0.self_attn.o_proj),
                             ("gate_up_proj", layer0.mlp.gate_up_proj), ("down_proj", layer0.mlp.down_proj),
                             ("lm_head", model.lm_head))
            }
            for key in ("int4_fused_with_lm_head", "int4_fused_with_lm_head_compiled"):
                if key in variants:
                    variants = tuple(variants) + (f"{key}_{compare}",)
                    measure(f"{key}_{compare}", model, key.endswith("compiled"))
    del model
    gc.collect()
    torch.cuda.empty_cache()
    base = res.get("bf16", {}).get("tokens_per_s")
    base_c = res.get("bf16_compiled", {}).get("tokens_per_s")
    res["speedup_vs_bf16"] = {k: round(v["tokens_per_s"] / base, 2) for k, v in res.items()
                              if isinstance(v, dict) and "tokens_per_s" in v and base}
    if base_c:
        res["speedup_vs_bf16_compiled"] = {k: round(v["tokens_per_s"] / base_c, 2) for k, v in res.items()
                                           if isinstance(v, dict) and "tokens_per_s" in v}
    # kept for readers of the earlier JSON
    if base and "int4" in res and "tokens_per_s" in res["int4"]:
        res["speedup"] = res["speedup_vs_bf16"]["int4"]
    if base and "tokens_per_s" in res.get("int4_with_lm_head", {}):
        res["speedup_with_lm_head"] = res["speedup_vs_bf16"]["int4_with_lm_head"]
    return res


REPEAT_VARIANTS = {
    # key: (int4 model?, compiled?, decode attention?, whole step compiled?, shared cache counter?)
    "bf16": (False, False, False, False, False),
    "bf16_compiled_step_attn": (False, True, True, True, True),
    "int4_fused_with_lm_head_compiled_attn": (True, True, True, False, False),
    "int4_fused_with_lm_head_compiled_attn_step": (True, True, True, True, True),
    # the same with inductor's combo_kernels (horizontal fusion of independent kernels), an experiment
    "int4_fused_with_lm_head_compiled_attn_step_combo": (True, True, True, True, True),
    # the same with cuda_mma (the batch-1 default before cuda_stream) first in the dispatch order
    "int4_fused_with_lm_head_compiled_attn_step_combo_mma": (True, True, True, True, True),
}
REPEAT_BASE, REPEAT_BEST = "bf16", "int4_fused_with_lm_head_compiled_attn_step"


def e2e_repeat(rounds=5, variants=tuple(REPEAT_VARIANTS), profile=None, layers=LAYERS):
    """The end-to-end comparison measured robustly: the bf16 model and the fused int4 + lm_head
    model (the same weights) both live in one process, every variant is prepared once (compiled,
    captured), then `rounds` rounds each time every variant's 128-token decode in turn. Reports
    per-variant tok/s of each round (median, min, max) and the ratio of each variant to bf16 within
    each round (median, min, max)."""
    from anyquant.runtime.attention import set_implementation, use_decode_attention
    from anyquant.runtime.fuse import fuse_projections

    res = {"rounds": rounds, "layers": layers, "variants": {k: REPEAT_VARIANTS[k] for k in variants},
           "variant_fields": ["int4", "compiled", "decode_attention", "whole_step_compiled", "shared_counter"],
           "variants_timed": list(variants)}
    models = {}
    if any(not REPEAT_VARIANTS[k][0] for k in variants):
        models[False] = _build_model(layers)
    if any(REPEAT_VARIANTS[k][0] for k in variants):
        m = _build_model(layers)    # same seed: the same weights
        _quantize_decoder(m)
        with torch.no_grad():
            m.lm_head = Int4Linear.from_float(m.lm_head, group_size=GROUP)
        fuse_projections(m)
        gc.collect()
        torch.cuda.empty_cache()
        models[True] = m
    log(f"  models built: {torch.cuda.memory_allocated() / 2**30:.1f} GiB")
    runs = {}
    for key in variants:
        int4, compiled, attn, whole, shared = REPEAT_VARIANTS[key]
        model = models[int4]
        prev = use_decode_attention(model) if attn else None
        t0 = time.time()
        try:
            # kernels are chosen when the step's graph is captured
            with kernels.use_kernels(batch1_first="cuda_mma" if key.endswith("_mma") else None):
                # options: a different backend, so dynamo compiles anew rather than reusing the step's code
                runs[key] = DecodeRun(model, compile_mode="default" if compiled else None, whole_step=whole,
                                      share_counter=shared,
                                      inductor_options={"combo_kernels": True} if "_combo" in key else None)
            res[key] = {"mode": runs[key].mode, "compile_and_warmup_s": runs[key].compile_s,
                        "shared_counter": runs[key].shared_counter}
        except Exception as exc:  # recorded, never silently dropped
            res[key] = {"error": f"{type(exc).__name__}: {exc}"[:800]}
        finally:
            if attn:
                set_implementation(model, prev)
        log(f"  prepared {key}: {res[key]} ({time.time() - t0:.0f}s)")
    seqs = {}
    for r in range(rounds):
        for key, run in runs.items():
            ms, seq = run.run()
            res[key].setdefault("tokens_per_s_rounds", []).append(round(run.new_tokens / (ms * 1e-3), 2))
            if key not in seqs:
                seqs[key] = seq
                res[key]["distinct_tokens"] = int(seq.unique().numel())
                res[key]["first_tokens"] = seq[0, :8].tolist()
            res[key].setdefault("tokens_same_as_round0", []).append(int((seq == seqs[key]).sum()))
        log(f"  round {r}: " + ", ".join(f"{k} {res[k]['tokens_per_s_rounds'][-1]}" for k in runs))
    for key in runs:
        v = res[key]["tokens_per_s_rounds"]
        res[key].update(tokens_per_s_median=round(statistics.median(v), 2), tokens_per_s_min=min(v),
                        tokens_per_s_max=max(v))
        if key != REPEAT_BASE and REPEAT_BASE in runs:
            ratios = [a / b for a, b in zip(v, res[REPEAT_BASE]["tokens_per_s_rounds"])]
            res[key]["ratio_vs_bf16_rounds"] = [round(x, 4) for x in ratios]
            res[key].update(ratio_vs_bf16_median=round(statistics.median(ratios), 4),
                            ratio_vs_bf16_min=round(min(ratios), 4), ratio_vs_bf16_max=round(max(ratios), 4))
    for a in seqs:
        if a != REPEAT_BEST and REPEAT_BEST in seqs and a.startswith("int4"):
            res[f"same_tokens_{a}_vs_step"] = int((seqs[a] == seqs[REPEAT_BEST]).sum())
    last = list(runs)[-1] if runs else None
    if profile and last is not None and runs[last].g is not None:   # the last variant named
        profile_replays(runs[last].g, profile)
        res["profiled"] = last
    for run in runs.values():
        run.close()
    del runs, models
    gc.collect()
    torch.cuda.empty_cache()
    return res


E2E_VARIANTS = ("bf16", "bf16_attn", "bf16_compiled", "bf16_compiled_attn", "bf16_fused_compiled",
                "bf16_fused_compiled_attn", "int4", "int4_with_lm_head", "int4_with_lm_head_compiled",
                "int4_fused_with_lm_head", "int4_fused_with_lm_head_compiled", "int4_fused_with_lm_head_attn",
                "int4_fused_with_lm_head_compiled_attn")
E2E_LABELS = {
    "bf16": "bf16 (eager step, CUDA graph)",
    "bf16_attn": "bf16 + anyquant decode attention",
    "bf16_compiled_attn": "bf16 compiled + decode attention",
    "bf16_fused_compiled_attn": "bf16 fused, compiled + decode attn",
    "int4_fused_with_lm_head_attn": "int4 + lm_head, fused + decode attn",
    "int4_fused_with_lm_head_compiled_attn": "int4 + lm_head, fused, compiled + decode attn",
    "bf16_compiled": "bf16 compiled",
    "bf16_fused_compiled": "bf16 fused qkv/gate_up, compiled",
    "int4": "int4 decoder Linears",
    "int4_with_lm_head": "int4 + lm_head",
    "int4_with_lm_head_compiled": "int4 + lm_head, compiled",
    "int4_fused_with_lm_head": "int4 + lm_head, fused",
    "int4_fused_with_lm_head_compiled": "int4 + lm_head, fused, compiled",
}


def print_tables(result):
    log("")
    log(f"{result['device']}  torch {result['torch']}  copy bandwidth {result['copy_bandwidth_GBps']:.0f} GB/s (read + write)")
    log(f"Kernel level: 32 layers x (q,k,v,o,gate,up,down) [separate] or (qkv,o,gate_up,down) [fused], "
        f"one CUDA graph, median of replays")
    log(f"{'batch':>5} {'kernel':16} {'layout':9} {'ms':>9} {'floor ms':>9} {'% floor':>8}")
    for r in result.get("kernel_level", []):
        lay = r.get("layout", "separate")
        if "error" in r:
            log(f"{r['batch']:>5} {r['kernel']:16} {lay:9} {'-':>9} {'-':>9} {'-':>8}  {r['error'][:60]}")
        else:
            log(f"{r['batch']:>5} {r['kernel']:16} {lay:9} {r['ms']:9.3f} {r['floor_ms']:9.3f} {r['pct_of_floor']:7.1f}%")
    if "e2e" in result:
        e = result["e2e"]
        log(f"End to end decode, batch 1, 128 new tokens after a 128-token prompt (static cache, CUDA graph per "
            f"step; compiled = torch.compile mode {e.get('compile_mode')!r})")
        sp, spc = e.get("speedup_vs_bf16", {}), e.get("speedup_vs_bf16_compiled", {})
        keys = list(E2E_VARIANTS) + [k for k in e if k.startswith(("int4_fused_with_lm_head", "bf16")) and k not in E2E_VARIANTS
                                     and isinstance(e[k], dict) and "tokens_per_s" in e[k]]
        for key in keys:
            v = e.get(key)
            if not isinstance(v, dict):
                continue
            if "tokens_per_s" not in v:
                log(f"  {E2E_LABELS.get(key, key):36s} FAILED {v.get('error', '')[:100]}")
                continue
            extra = f"  {sp.get(key, 0):.2f}x bf16" + (f", {spc[key]:.2f}x bf16 compiled" if key in spc else "")
            log(f"  {E2E_LABELS.get(key, key):36s} {v['tokens_per_s']:8.1f} tok/s{extra}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "speed_gpu.json"))
    ap.add_argument("--tune", nargs="?", const="cuda,gemv,gemv2,gemm", default=None,
                    help="also sweep our kernels' launch configurations (comma list of cuda, gemv, gemv2, gemm)")
    ap.add_argument("--apply-tune", action="store_true",
                    help="use cuda_gemv's tuned configurations and dispatch order (vs torch_int4) for the timed rows")
    ap.add_argument("--kinds", default=None,
                    help="kernel level: comma list of rows to time (default: bf16, bnb_nf4, every anyquant kernel, "
                         "anyquant_auto)")
    ap.add_argument("--tune-shapes", choices=("separate", "fused", "both"), default="both")
    ap.add_argument("--stream-sequence", choices=("separate", "fused"), default=None,
                    help="time cuda_stream configurations over each layout's whole sequence; with --apply-tune, "
                         "keep the best for this layout")
    ap.add_argument("--stream-carveout", type=int, default=None,
                    help="cuda_stream's L1 / shared-memory split in percent of the most shared memory (-1: the "
                         "driver's choice per launch); default: kernels.DEFAULT_SETTINGS.stream_carveout")
    ap.add_argument("--stream-cfgs", default=None,
                    help="--stream-sequence: the configurations to time instead of STREAM_SEQUENCE_CFGS, "
                         "as 'S,W,CTAs[,PDL];...' (PDL 1 by default)")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--skip-kernels", action="store_true")
    ap.add_argument("--skip-separate", action="store_true", help="kernel level: only the fused layout")
    ap.add_argument("--compile-mode", default="default",
                    help="torch.compile mode for the compiled end-to-end rows (default, max-autotune-no-cudagraphs, "
                         "reduce-overhead)")
    ap.add_argument("--e2e", default=",".join(E2E_VARIANTS), help="comma list of end-to-end variants")
    ap.add_argument("--e2e-layers", type=int, default=LAYERS, help="decoder layers of the end-to-end model (smoke tests)")
    ap.add_argument("--tune-objective", choices=("back_to_back", "after_elementwise"), default="back_to_back",
                    help="cuda_mma: apply the configuration best back to back, or best after an elementwise kernel")
    ap.add_argument("--interleave", action="store_true",
                    help="kernel level: also time the fused batch-1 rows with each matmul after an elementwise kernel")
    ap.add_argument("--batch1-first", default=None,
                    help="put this kernel first in the batch-1 dispatch order for the whole run (e.g. cuda_mma)")
    ap.add_argument("--e2e-compare", default=None,
                    help="end to end: also time the fused int4 variants with this kernel first at batch 1")
    ap.add_argument("--attention-bench", action="store_true", help="time the decode attention kernel vs torch SDPA")
    ap.add_argument("--tune-lm-head", action="store_true", help="sweep cuda_mma configurations for the int4 lm_head")
    ap.add_argument("--profile", default=None,
                    help="end to end: profile the fused compiled int4 step's graph replays into PATH.txt / PATH.json")
    ap.add_argument("--e2e-repeat", type=int, default=0,
                    help="end to end, robust: N alternating rounds of the bf16 and int4 variants in one process "
                         "(REPEAT_VARIANTS), written to the JSON's e2e_repeat")
    ap.add_argument("--repeat-variants", default=",".join(REPEAT_VARIANTS))
    ap.add_argument("--errors", default=None, help="JSON of measured kernel errors (tests/test_runtime_gpu.py) to include")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("speed_gpu.py needs a CUDA device")
    with RUN_SETTINGS:
        run(args)


def run(args):
    if args.batch1_first:
        keep_settings(batch1_first=args.batch1_first)
    if args.stream_carveout is not None:
        keep_settings(stream_carveout=args.stream_carveout)
    global TUNE_OBJECTIVE
    TUNE_OBJECTIVE = args.tune_objective
    props = torch.cuda.get_device_properties(0)
    result = {
        "device": props.name, "capability": list(torch.cuda.get_device_capability(0)),
        "date": datetime.date.today().isoformat(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "triton": version("triton"), "transformers": version("transformers"),
        "bitsandbytes": version("bitsandbytes"), "gemlite": version("gemlite"),
        "shapes": SHAPES, "shapes_fused": SHAPES_FUSED, "layers": LAYERS, "group_size": GROUP,
        "cuda_stream_carveout": kernels.current_settings().stream_carveout,
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
        kinds = args.kinds.split(",") if args.kinds else None
        if kinds and "bnb_nf4" not in kinds:
            with_bnb = False
        layers = build_layers(with_bnb)
        log(f"built 32 layers in {time.time() - t0:.1f}s; {torch.cuda.memory_allocated() / 2**30:.1f} GiB")
        bw = result["copy_bandwidth_GBps"]
        which = tuple(args.tune.split(",")) if args.tune else ()
        stream_cfgs = ([tuple(int(v) for v in c.split(",")) for c in args.stream_cfgs.split(";")]
                       if args.stream_cfgs else None)
        result["tune"], result["kernel_level"], result["per_shape"] = [], [], []
        if which and args.tune_shapes in ("separate", "both"):
            result["tune"] += tune(layers, bw, SHAPES, which, args.apply_tune)
            save()
        if args.stream_sequence and not args.skip_separate:
            result.setdefault("stream_sequence", []).extend(
                tune_stream_sequence(layers, bw, SHAPES, "separate", args.apply_tune and args.stream_sequence == "separate",
                                     stream_cfgs))
            save()
        if not args.skip_separate:
            rows, per_shape = kernel_rows(layers, [1, 16], bw, kinds=kinds)
            result["kernel_level"] += rows
            result["per_shape"] += per_shape
            save()
        for layer in layers:          # free the separate layout's kernel caches and nf4 copies
            for e in layer.values():
                e["int4"].clear_kernel_cache()
                e.pop("nf4", None)
        layers = fuse_layers(layers)
        gc.collect()
        torch.cuda.empty_cache()
        log(f"fused q/k/v and gate/up: {torch.cuda.memory_allocated() / 2**30:.1f} GiB")
        if which and args.tune_shapes in ("fused", "both"):
            new = {(n, k) for _, n, k in SHAPES_FUSED} - ({(n, k) for _, n, k in SHAPES} if args.tune_shapes == "both" else set())
            result["tune"] += tune(layers, bw, [s for s in SHAPES_FUSED if (s[1], s[2]) in new], which,
                                   args.apply_tune)
            save()
        if args.stream_sequence:
            result.setdefault("stream_sequence", []).extend(
                tune_stream_sequence(layers, bw, SHAPES_FUSED, "fused", args.apply_tune and args.stream_sequence == "fused",
                                     stream_cfgs))
            save()
        rows, per_shape = kernel_rows(layers, [1, 16], bw, shapes=SHAPES_FUSED,
                                      kinds=[k for k in kinds if k != "bnb_nf4"] if kinds else
                                      ["bf16"] + ANYQUANT_KERNELS + ["anyquant_auto"], layout="fused")
        result["kernel_level"] += rows
        result["per_shape"] += per_shape
        save()
        if args.interleave:
            rows, _ = kernel_rows(layers, [1], bw, shapes=SHAPES_FUSED,
                                  kinds=[k for k in (kinds or ["bf16"] + ANYQUANT_KERNELS + ["anyquant_auto"])
                                         if k in ("bf16", "cuda_mma", "torch_int4", "anyquant_auto")],
                                  layout="fused", interleave=True)
            result["kernel_level"] += rows
            save()
        del layers
        gc.collect()
        torch.cuda.empty_cache()
    settings = kernels.current_settings()
    result["cuda_mma_cfg"] = {f"{n}x{k}": list(v) for (n, k), v in sorted(settings.configs["cuda_mma"].items())}
    result["cuda_stream_cfg"] = {f"{n}x{k}": list(v) for (n, k), v in sorted(settings.configs["cuda_stream"].items())}
    result["batch1_order"] = list(settings.preference[1])
    result["cuda_gemv_tables"] = {"cfg": {f"{n}x{k}": list(v) for (n, k), v in sorted(settings.configs["cuda_gemv"].items())},
                                  "preferred_over_torch_int4": sorted(f"{n}x{k}" for n, k in settings.cuda_gemv_preferred)}
    log(f"cuda_gemv tables: {result['cuda_gemv_tables']}")
    if args.attention_bench:
        result["attention_bench"] = attention_bench()
        save()
    lm_head_best = None
    if args.tune_lm_head:
        result["tune_lm_head"] = tune_lm_head(result["copy_bandwidth_GBps"])
        ok = [r for r in result["tune_lm_head"] if "us" in r]
        lm_head_best = min(ok, key=lambda r: r["us"])["cfg"] if ok else None
        save()
    if args.errors and Path(args.errors).exists():
        result["correctness"] = json.loads(Path(args.errors).read_text())
    if args.e2e_repeat:
        result["e2e_repeat"] = e2e_repeat(args.e2e_repeat, tuple(args.repeat_variants.split(",")), args.profile,
                                          args.e2e_layers)
        save()
    if not args.skip_e2e:
        result["e2e"] = e2e(args.compile_mode, tuple(args.e2e.split(",")), args.e2e_layers, args.e2e_compare,
                            args.profile, lm_head_best)
    save()
    print_tables(result)


if __name__ == "__main__":
    main()
