"""Peak memory of block-by-block calibration does not grow with depth (issue 5).

Builds random-weight Llama models of one width at two depths (default 8 and 32 layers), saves
each to a temporary directory, then for every (depth, method) runs a FRESH subprocess that

  1. loads the model (anyquant.model.load.load_model, float32),
  2. records its RSS after loading,
  3. resets the kernel's peak-RSS mark (VmHWM, via /proc/self/clear_refs) and runs
     anyquant.quantize(model, method, calib=<random LongTensor [n, seq]>, checkpoint_dir=None)
     (also inside anyquant.eval.memory.track_peak_memory, a thread sampling every 20 ms),

and reports the RSS after load, the exact peak RSS during quantize, the model's float size and
the calibration overhead = peak during quantize - RSS after load. Each (depth, method) runs
`--repeats` times (default 3): identical runs differ by about +-10 MiB. The claim checked: the
median overhead does not grow with depth (deep < 1.25 x shallow) while the model grows.

  python benchmarks/calib_memory.py [--depths 8,32] [--methods gptq,awq] [--hidden 256]
        [--intermediate 768] [--heads 4] [--vocab 4096] [--n-samples 8] [--seq-len 128]
        [--threads 2] [--repeats 3] [--out benchmarks/results/calib_memory.json]

The defaults take about 15 minutes on a shared 2-core CPU; `--hidden 512 --intermediate 1536
--heads 8 --n-samples 16 --seq-len 256` is the wider setting (about 4x slower).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata as md
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

MiB = 1024 * 1024
RATIO_LIMIT = 1.25


def _rss_bytes() -> int:
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux: clear_refs 5), so
    the peak of what follows is exact, where a 20 ms sampler can miss a short spike."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------- child


def _warm_up(config, method: str, calib, n_samples: int, seq_len: int) -> float:
    """Quantize a one-layer model of the same width once before measuring. The first run of a
    code path faults in pages of torch's and anyquant's shared libraries (file-backed, counted
    in RSS) and sizes the allocator's arenas; that cost is the same at any depth but varied by
    up to 20 MiB between identical runs, enough to fake or hide a trend with depth."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    import anyquant

    t0 = time.perf_counter()
    cfg = copy.deepcopy(config)
    cfg.num_hidden_layers = 1
    tiny = AutoModelForCausalLM.from_config(cfg).to(torch.float32).eval()
    anyquant.quantize(tiny, method, calib=calib, checkpoint_dir=None, progress=False, n_samples=n_samples,
                      seq_len=seq_len)
    del tiny
    gc.collect()
    return time.perf_counter() - t0


def child(model_dir: str, method: str, n_samples: int, seq_len: int, threads: int, seed: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    import anyquant
    from anyquant.calib.memory import release_freed_memory
    from anyquant.eval.memory import peak_rss_bytes, track_peak_memory
    from anyquant.model.load import load_model

    gc.collect()
    rss_before_load = _rss_bytes()
    t0 = time.perf_counter()
    model, _tok, _info = load_model(model_dir, dtype=torch.float32)
    load_s = time.perf_counter() - t0
    float_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    float_bytes += sum(b.numel() * b.element_size() for b in model.buffers())
    blocks = model.model.layers
    block_bytes = sum(p.numel() * p.element_size() for p in blocks[0].parameters())
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    calib = torch.randint(0, vocab, (n_samples, seq_len), generator=g, dtype=torch.long)
    warmup_s = _warm_up(model.config, method, calib, n_samples, seq_len)
    gc.collect()
    release_freed_memory()
    rss_after_load = _rss_bytes()

    exact = _reset_peak_rss()
    t0 = time.perf_counter()
    with track_peak_memory() as pm:
        result = anyquant.quantize(model, method, calib=calib, checkpoint_dir=None, progress=False,
                                   n_samples=n_samples, seq_len=seq_len)
    quant_s = time.perf_counter() - t0
    sampled_peak = pm.baseline_rss_bytes + pm.peak_bytes
    peak_during = max(_status_bytes("VmHWM:"), sampled_peak) if exact else sampled_peak
    rss_end = _rss_bytes()
    blocks_report = result.report["calibration"]["blocks"]
    return {
        "layers": len(blocks),
        "method": method,
        "seconds_warm_up": warmup_s,
        "model_float_bytes": float_bytes,
        "block_float_bytes": block_bytes,
        "rss_before_load_bytes": rss_before_load,
        "rss_after_load_bytes": rss_after_load,
        "rss_at_quantize_start_bytes": pm.baseline_rss_bytes,
        "peak_rss_during_quantize_bytes": peak_during,
        "calib_overhead_bytes": peak_during - rss_after_load,
        "rss_after_quantize_bytes": rss_end,
        "process_peak_rss_bytes": peak_rss_bytes(),  # ru_maxrss: whole life, loading included
        "memory_sampled": pm.sampled,
        "peak_exact": exact,  # the kernel's high-water mark (VmHWM after clear_refs), not only sampling
        "peak_sampled_bytes": sampled_peak,
        "seconds_load": load_s,
        "seconds_quantize": quant_s,
        "blocks_quantized": len(blocks_report),
        "probe_logits_relative_error": result.report["probe_logits_relative_error"],
        "compute_dtype": result.report["compute_dtype"],
    }


# --------------------------------------------------------------------------- parent


def build_model(directory: Path, layers: int, args) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed + layers)
    cfg = LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate, vocab_size=args.vocab,
        num_hidden_layers=layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=max(2048, args.seq_len), tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).to(torch.float32).eval()
    model.save_pretrained(directory)
    del model
    gc.collect()


def versions() -> dict:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("anyquant", "torch", "transformers", "safetensors"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    try:
        out["anyquant_git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                             text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        out["anyquant_git"] = None
    return out


def _median_row(rows: list[dict]) -> dict:
    """The run with the median overhead: the peak varies by about +-10 MiB between identical
    runs (thread timing in the allocator), so one run per depth can fake a trend either way."""
    return sorted(rows, key=lambda r: r["calib_overhead_bytes"])[len(rows) // 2]


def mib(x: float) -> str:
    return f"{x / MiB:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depths", default="8,32")
    ap.add_argument("--methods", default="gptq,awq")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--n-samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3,
                    help="fresh processes per (depth, method); the check uses the median overhead")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "calib_memory.json")
    ap.add_argument("--child", nargs=2, metavar=("MODEL_DIR", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        res = child(args.child[0], args.child[1], args.n_samples, args.seq_len, args.threads, args.seed)
        print("RESULT " + json.dumps(res), flush=True)
        return

    depths = [int(x) for x in args.depths.split(",") if x]
    methods = [x for x in args.methods.split(",") if x]
    t_start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="aq-calibmem-") as tmp:
        dirs = {}
        for d in depths:
            dirs[d] = Path(tmp) / f"llama-{d}L"
            t = time.perf_counter()
            build_model(dirs[d], d, args)
            print(f"built {d}-layer model in {time.perf_counter() - t:.1f}s", flush=True)
        for method in methods:
            for d in depths:
                for rep in range(args.repeats):
                    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(dirs[d]), method,
                           "--n-samples", str(args.n_samples), "--seq-len", str(args.seq_len),
                           "--threads", str(args.threads), "--seed", str(args.seed)]
                    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
                    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
                    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
                    if p.returncode != 0 or not lines:
                        sys.stderr.write(p.stdout[-4000:] + p.stderr[-4000:])
                        raise SystemExit(f"{method} at {d} layers failed (exit {p.returncode})")
                    row = json.loads(lines[-1][len("RESULT "):])
                    row["repeat"] = rep
                    rows.append(row)
                    print(f"{method} {d} layers (run {rep + 1}): after load {mib(row['rss_after_load_bytes'])} MiB, peak "
                          f"{mib(row['peak_rss_during_quantize_bytes'])} MiB, overhead {mib(row['calib_overhead_bytes'])} MiB "
                          f"({row['seconds_quantize']:.1f}s)", flush=True)

    shallow, deep = min(depths), max(depths)
    checks = {}
    for method in methods:
        a = _median_row([r for r in rows if r["method"] == method and r["layers"] == shallow])
        b = _median_row([r for r in rows if r["method"] == method and r["layers"] == deep])
        ratio = b["calib_overhead_bytes"] / max(1, a["calib_overhead_bytes"])
        checks[method] = {
            "overhead_median_bytes": {shallow: a["calib_overhead_bytes"], deep: b["calib_overhead_bytes"]},
            "overhead_all_bytes": {d: [r["calib_overhead_bytes"] for r in rows if r["method"] == method
                                       and r["layers"] == d] for d in (shallow, deep)},
            "overhead_ratio": ratio,
            "model_size_ratio": b["model_float_bytes"] / a["model_float_bytes"],
            "blocks_size_ratio": deep / shallow,
            "holds": ratio < RATIO_LIMIT,
        }

    hdr = (f"| method | layers | model float MiB | one block MiB | RSS after load MiB | peak during quantize MiB "
           f"| overhead (peak - after load) MiB | quantize s |")
    print()
    print(hdr)
    print("|" + "---|" * 8)
    for r in rows:
        print(f"| {r['method']} | {r['layers']} | {mib(r['model_float_bytes'])} | {mib(r['block_float_bytes'])} | "
              f"{mib(r['rss_after_load_bytes'])} | {mib(r['peak_rss_during_quantize_bytes'])} | "
              f"{mib(r['calib_overhead_bytes'])} | {r['seconds_quantize']:.1f} |")
    print()
    for method, c in checks.items():
        print(f"{method}: overhead({deep}) / overhead({shallow}) = {c['overhead_ratio']:.3f} "
              f"(limit {RATIO_LIMIT}); model size x{c['model_size_ratio']:.2f}, blocks x{c['blocks_size_ratio']:.0f}: "
              f"{'holds' if c['holds'] else 'FAILS'}")

    out = {
        "benchmark": "calib_memory",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "settings": {
            "depths": depths, "methods": methods, "hidden_size": args.hidden,
            "intermediate_size": args.intermediate, "vocab_size": args.vocab, "num_attention_heads": args.heads,
            "tie_word_embeddings": False, "dtype": "float32", "n_samples": args.n_samples, "seq_len": args.seq_len,
            "calib": "random token ids (torch.randint, seed)", "seed": args.seed, "torch_threads": args.threads,
            "checkpoint_dir": None, "memory_sampling_interval_s": 0.020, "repeats": args.repeats,
            "overhead_definition": "peak RSS during anyquant.quantize (the kernel's VmHWM, reset after loading; "
                                   "the 20 ms sampler where that is unavailable) - RSS after loading and after a warm-up "
                                   "quantization of a one-layer model of the same width (_warm_up)",
            "claim": f"median overhead(deep) < {RATIO_LIMIT} x median overhead(shallow), {args.repeats} fresh "
                     "processes each",
            "machine": f"{os.cpu_count()} CPUs, shared with other jobs",
        },
        "rows": rows,
        "checks": checks,
        "claim_holds": all(c["holds"] for c in checks.values()),
        "wall_seconds": time.perf_counter() - t_start,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"\nwrote {args.out} ({out['wall_seconds']:.0f}s)")


if __name__ == "__main__":
    main()
