"""Memory and time of streamed quantization against depth (issue 20): does peak host memory stay
at about one block whatever the model's size?

For one width and two depths, a random-weight Llama checkpoint is written to disk in shards
(one tensor at a time: building it never holds the model), then each method quantizes it with
`anyquant.quantize_to_disk` (streamed: one block in memory at a time) and, for comparison, with
today's in-memory path (`from_pretrained` + `anyquant.quantize` + `anyquant.save`). Each run is
its own process, so its peak host RSS is its own: the figure reported is the peak RSS above
that process's baseline, sampled every 20 ms (eval/memory.py track_peak_memory); the baseline is
taken after the same run on a one-layer, width-64 model, so that imports, kernels and the CUDA
context (a few hundred MB, whatever the model) are in it.

  python benchmarks/scale.py                                   # CPU: hidden 512, 4 and 8 layers, float32
  python benchmarks/scale.py --shape wide --methods gptq       # CPU: hidden 1024, MLP 8192 (gptq's Hessians dominate)
  python benchmarks/scale.py --shape 8b                        # GPU: Llama-3-8B shape, 32 and 64 layers, bf16
  python benchmarks/scale.py --shape 8b --layers 32 --methods gptq --no-in-memory
  (under a per-command time limit: one depth / method per call, same --workdir (the checkpoint is
   built once and kept when one depth is given) and --append, which adds the rows to the JSON)
  options: --methods int4,nf4,gptq  --layers 4,8  --n-samples N --seq-len N  --workdir DIR  --out FILE
           --in-memory-max-layers N (the in-memory path only up to this depth; it holds the whole model)
           --timeout S (per run)

Rows are written to the JSON after each run (a run that fails or times out is recorded with its
error and the script goes on). The JSON also extrapolates to an 80-layer, 8192-wide model
(the shape of a 70B-class model) from the deepest row measured per method (see `extrapolation`).

Target (issue 20): peak host RSS above baseline <= 2 x the largest unit's float size (a block,
or the embedding / head where larger) + calibration activations + 1 GB, and the deeper model
within 10% of the shallower one.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata as md
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

SHAPES = {
    # hidden, intermediate, heads, kv heads, vocab, dtype, default depths
    "small": dict(hidden=512, inter=1536, heads=8, kv=4, vocab=32000, dtype="float32", layers=(4, 8),
                  n_samples=16, seq_len=128),
    # a CPU shape whose MLP is wide: gptq's per-layer Hessian (intermediate^2 float32, 268 MB)
    # outweighs a block's weights, as on the 8b shape
    "wide": dict(hidden=1024, inter=8192, heads=8, kv=4, vocab=32000, dtype="float32", layers=(2, 4),
                 n_samples=16, seq_len=128),
    "8b": dict(hidden=4096, inter=14336, heads=32, kv=8, vocab=128256, dtype="bfloat16", layers=(32, 64),
               n_samples=128, seq_len=512),
}
# the shape of a 70B-class model (Llama-3-70B), for the extrapolation
BIG = dict(hidden=8192, inter=28672, heads=64, kv=8, vocab=128256, layers=80, bytes_per=2)
CALIBRATED = {"gptq", "awq"}
GB = 1e9


def block_params(s: dict) -> int:
    h, i, kvd = s["hidden"], s["inter"], s["hidden"] // s["heads"] * s["kv"]
    return 2 * h * h + 2 * h * kvd + 3 * h * i + 2 * h


def largest_unit_params(s: dict) -> int:
    return max(block_params(s), s["vocab"] * s["hidden"])


def build_checkpoint(directory: Path, s: dict, layers: int, seed: int = 0) -> int:
    """A random-weight Llama checkpoint in 5 GB shards, written tensor by tensor; returns its bytes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from anyquant.formats.direct import parameters_on_meta
    from anyquant.formats.shards import ShardWriter

    dtype = getattr(torch, s["dtype"])
    cfg = LlamaConfig(hidden_size=s["hidden"], intermediate_size=s["inter"], num_hidden_layers=layers,
                      num_attention_heads=s["heads"], num_key_value_heads=s["kv"], vocab_size=s["vocab"],
                      max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False, dtype=s["dtype"])
    with parameters_on_meta():
        skel = LlamaForCausalLM(cfg)
    directory.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    w = ShardWriter(directory, "5GB")
    for name, p in skel.named_parameters():
        if p.dim() == 1:
            t = torch.ones(p.shape, dtype=dtype)
        else:
            t = (torch.randn(p.shape, generator=g) * 0.02).to(dtype)
        w.add({name: t})
        del t
    w.close()
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(directory)
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def child(spec: dict) -> dict:
    """One run, in this process: peak RSS above the baseline measured after imports."""
    import torch

    import anyquant
    from anyquant.eval.memory import track_peak_memory

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        torch.zeros(1, device=dev)   # the CUDA context belongs to the baseline
        torch.cuda.reset_peak_memory_stats(dev)
    import tempfile

    def one(source: str, out: Path, vocab: int):
        opts: dict = {"progress": False, "dtype": spec["dtype"]}
        if spec["method"] in CALIBRATED:
            g = torch.Generator().manual_seed(1)
            opts.update(calib=torch.randint(0, vocab, (spec["n_samples"], spec["seq_len"]), generator=g),
                        n_samples=spec["n_samples"], seq_len=spec["seq_len"], checkpoint_dir=None,
                        activations=spec.get("activations", "auto"))
        if spec["path"] == "stream":
            r = anyquant.quantize_to_disk(source, spec["method"], out, force=True, verify=spec["verify"], **opts)
        else:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, spec["torch_dtype"]),
                                                         device_map=str(dev))
            r = anyquant.quantize(model, spec["method"], **opts)
            anyquant.save(r, out, force=True, verify=spec["verify"])
        st = r.report.get("stream") or {}
        return r.report["probe_logits_relative_error"], st.get("fingerprint_seconds"), st.get("phase_seconds")

    # The baseline is the process with everything imported and initialised: the same run once on a
    # one-layer model of width 64 first (imports of transformers' model code, bitsandbytes,
    # compressed-tensors and the kernels they load cost a few hundred MB, whatever the model).
    with tempfile.TemporaryDirectory() as tiny:
        tiny_shape = dict(hidden=64, inter=128, heads=4, kv=2, vocab=256, dtype=spec["dtype"])
        build_checkpoint(Path(tiny) / "src", tiny_shape, 1)
        one(str(Path(tiny) / "src"), Path(tiny) / "out", 256)
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    out = Path(spec["out"])
    t0 = time.perf_counter()
    with track_peak_memory() as mem:
        probe_err, fingerprint_s, phases = one(spec["source"], out, spec["vocab"])
        if dev.type == "cuda":
            torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    return {
        "wall_s": round(wall, 2),
        "peak_rss_above_baseline_bytes": mem.peak_bytes,
        "baseline_rss_bytes": mem.baseline_rss_bytes,
        "peak_gpu_bytes": torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None,
        "output_bytes": sum(f.stat().st_size for f in out.glob("*.safetensors")),
        "probe_logits_relative_error": probe_err,
        # streamed runs hash the source in the background (its fingerprint, for the manifest and resumable
        # checkpoints); the in-memory runs here quantize a loaded nn.Module, which has none
        "fingerprint_seconds": fingerprint_s,
        "phase_seconds": phases,   # streamed runs: open, probes and plan, calibration, quantize and write, report
        # streamed runs: the rest of the wall time, after the report: the output's manifest, hashes, atomic move
        "finish_s": round(wall - sum(phases.values()), 2) if phases else None,
        "sampled": mem.sampled,
    }


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} logical cores)"


def run_child(spec: dict, timeout: int) -> dict:
    try:
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                              text=True, timeout=timeout, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-1500:]}"}
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--layers", help="depths, comma-separated (default: the shape's two)")
    ap.add_argument("--methods", default="int4,nf4,gptq")
    ap.add_argument("--n-samples", type=int)
    ap.add_argument("--activations", default="auto",
                    help="where gptq/awq keep calibration activations, comma-separated settings to run each "
                         "with (auto, device, host, disk)")
    ap.add_argument("--seq-len", type=int)
    ap.add_argument("--no-in-memory", action="store_true", help="skip the in-memory comparison")
    ap.add_argument("--in-memory-max-layers", type=int, default=None,
                    help="run the in-memory path only up to this depth (default: every depth)")
    ap.add_argument("--workdir", type=Path, default=None, help="where checkpoints and outputs go (default: a temp dir)")
    ap.add_argument("--timeout", type=int, default=3600)
    ap.add_argument("--verify", action="store_true",
                    help="keep the save-time reload check on (it loads the whole output: peak RSS then includes it)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--append", action="store_true",
                    help="add rows to an existing --out file (one depth or method per call, e.g. under a time limit)")
    args = ap.parse_args()
    if args.child:
        try:
            print(json.dumps(child(json.loads(args.child))), flush=True)
        except Exception as e:  # noqa: BLE001 — reported to the parent, which records it
            traceback.print_exc()
            print(json.dumps({"error": f"{type(e).__name__}: {str(e)[:1500]}"}), flush=True)
        return

    import tempfile

    import torch

    s = dict(SHAPES[args.shape])
    depths = [int(x) for x in args.layers.split(",")] if args.layers else list(s["layers"])
    n_samples = args.n_samples or s["n_samples"]
    seq_len = args.seq_len or s["seq_len"]
    methods = [m for m in args.methods.split(",") if m]
    dev = device_name()
    if args.shape == "8b" and not torch.cuda.is_available():
        print("note: the 8b shape is meant for a GPU machine; running it on the CPU", flush=True)
    stamp = datetime.datetime.now(datetime.timezone.utc)
    out = args.out or HERE / "results" / f"scale_{args.shape}_{'gpu' if torch.cuda.is_available() else 'cpu'}.json"
    work = args.workdir or Path(tempfile.mkdtemp(prefix="anyquant-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    elem = 2 if s["dtype"] == "bfloat16" else 4
    compute_elem = elem   # compute dtype = the source's on these runs
    result = {
        "benchmark": "benchmarks/scale.py",
        "date": stamp.isoformat(timespec="seconds"),
        "device": dev,
        "shape": {k: s[k] for k in ("hidden", "inter", "heads", "kv", "vocab", "dtype")},
        "calibration": {"n_samples": n_samples, "seq_len": seq_len, "tokens": "random"},
        "save_time_reload_check": args.verify,
        "versions": {p: md.version(p) for p in ("torch", "transformers", "bitsandbytes")},
        "definitions": {
            "peak_rss_above_baseline": "peak resident set size of the run's process minus its RSS before the run, "
                                       "after the same run on a one-layer width-64 model (imports, kernels, CUDA "
                                       "context), sampled every 20 ms",
            "verify": "the save-time reload check (verify=) of both paths; off unless --verify: it loads the whole "
                      "output, which is not the quantization's memory",
            "gpu_bound_bytes": "gptq/awq: 2 x a block's float size + calibration activations (as in bound_bytes)",
            "hessian_bytes": "one float32 Hessian of the widest Linear input (gptq holds it and one factor of it)",
            "bound_bytes": "2 x the largest unit's float size (a block, or the embedding/head if larger) + "
                           "calibration activations (n_samples x seq_len x hidden x compute element size x 2: a "
                           "block's inputs and outputs) + 1 GB",
        },
        "rows": [],
        "errors": [],
    }

    if args.append and out.is_file():
        earlier = json.loads(out.read_text())
        if earlier.get("shape") == result["shape"]:
            result["rows"] = earlier.get("rows", [])
            result["errors"] = earlier.get("errors", [])
            result["earlier_dates"] = sorted(set(earlier.get("earlier_dates", []) + [earlier.get("date")]))

    def write() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")

    for layers in depths:
        src = work / f"ckpt-{args.shape}-{layers}"
        try:
            if not (src / "config.json").is_file():
                t0 = time.perf_counter()
                size = build_checkpoint(src, s, layers)
                print(f"built {src} ({size / GB:.2f} GB) in {time.perf_counter() - t0:.0f} s", flush=True)
            size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
        except Exception as e:  # noqa: BLE001 — e.g. no disk for the deeper checkpoint: recorded, next depth
            result["errors"].append({"layers": layers, "stage": "build", "error": f"{type(e).__name__}: {e}"})
            write()
            shutil.rmtree(src, ignore_errors=True)
            continue
        block_bytes = block_params(s) * elem
        unit_bytes = largest_unit_params(s) * elem
        for method in methods:
            acts = n_samples * seq_len * s["hidden"] * compute_elem * 2 if method in CALIBRATED else 0
            bound = 2 * unit_bytes + acts + GB
            runs = [("stream", a) for a in (args.activations.split(",") if method in CALIBRATED else ["auto"])]
            if not args.no_in_memory and (args.in_memory_max_layers is None or layers <= args.in_memory_max_layers):
                runs.append(("in-memory", "auto"))
            for path, activations in runs:
                spec = {"path": path, "method": method, "source": str(src), "out": str(work / f"out-{method}"),
                        "dtype": s["dtype"], "torch_dtype": s["dtype"], "vocab": s["vocab"],
                        "n_samples": n_samples, "seq_len": seq_len, "verify": args.verify, "activations": activations}
                print(f"{layers} layers, {method}, {path}, activations {activations} ...", flush=True)
                got = run_child(spec, args.timeout)
                shutil.rmtree(work / f"out-{method}", ignore_errors=True)
                row = {"layers": layers, "method": method, "path": path, "checkpoint_bytes": size,
                       "block_float_bytes": block_bytes, "largest_unit_float_bytes": unit_bytes,
                       "calibration_activation_bytes": acts, "bound_bytes": bound, **got}
                if method in CALIBRATED:
                    row["activations"] = activations
                    row["gpu_bound_bytes"] = 2 * block_bytes + acts
                    row["hessian_bytes"] = 4 * max(s["hidden"], s["inter"]) ** 2
                    if got.get("peak_gpu_bytes"):
                        row["gpu_within_bound"] = got["peak_gpu_bytes"] <= row["gpu_bound_bytes"]
                if "peak_rss_above_baseline_bytes" in got and path == "stream":
                    row["within_bound"] = got["peak_rss_above_baseline_bytes"] <= bound
                    row["peak_rss_share_of_checkpoint"] = got["peak_rss_above_baseline_bytes"] / size
                result["rows"].append(row)
                if "error" in got:
                    result["errors"].append({"layers": layers, "method": method, "path": path, "error": got["error"]})
                    print(f"  error: {got['error'][-300:]}", flush=True)
                else:
                    gpu = got.get("peak_gpu_bytes")
                    print(f"  {got['wall_s']:.1f} s, peak RSS above baseline {got['peak_rss_above_baseline_bytes'] / GB:.3f} GB"
                          + (f", peak GPU {gpu / GB:.2f} GB" if gpu else ""), flush=True)
                _summarise(result, depths)
                write()
        if args.workdir is None or len(depths) > 1:
            shutil.rmtree(src, ignore_errors=True)   # the next depth's checkpoint needs the disk
    _summarise(result, depths)
    write()
    _table(result)
    print(f"wrote {out}")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


def _summarise(result: dict, depths: list[int]) -> None:
    """Depth ratio per method (deepest / shallowest, streamed) and the 80-layer x 8192 extrapolation."""
    rows = [r for r in result["rows"] if r["path"] == "stream" and "peak_rss_above_baseline_bytes" in r
            and r.get("activations", "auto") == "auto"]
    checks = {}
    extra = {}
    s = result["shape"]
    big_unit = max(block_params(BIG), BIG["vocab"] * BIG["hidden"]) * BIG["bytes_per"]
    big_ckpt = (BIG["layers"] * block_params(BIG) + 2 * BIG["vocab"] * BIG["hidden"]) * BIG["bytes_per"]
    for method in sorted({r["method"] for r in rows}):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["layers"])
        if len(mine) >= 2:
            a, b = mine[0], mine[-1]
            ratio = b["peak_rss_above_baseline_bytes"] / max(1, a["peak_rss_above_baseline_bytes"])
            checks[method] = {"shallow_layers": a["layers"], "deep_layers": b["layers"],
                              "deep_over_shallow_peak_rss": round(ratio, 3), "within_10_percent": ratio <= 1.10,
                              "all_within_bound": all(r.get("within_bound") for r in mine)}
        deep = mine[-1]
        scale = big_unit / deep["largest_unit_float_bytes"]
        extra[method] = {
            "from": f"{deep['layers']} layers, hidden {s['hidden']}",
            "method": "the deepest run's peak RSS above baseline x (70B-shape largest unit / this shape's largest "
                      "unit); calibration activations scale with hidden size the same way; an estimate, not a "
                      "measurement",
            "predicted_peak_rss_above_baseline_bytes": int(deep["peak_rss_above_baseline_bytes"] * scale),
            "checkpoint_bytes_bf16": big_ckpt,
            "largest_unit_bytes_bf16": big_unit,
        }
        if deep.get("peak_gpu_bytes"):
            # a block's weights scale with hidden x intermediate, the Hessians with the widest
            # input squared, the activations with hidden: the largest of the three ratios bounds all
            ratio = max(block_params(BIG) / block_params(s),
                        (max(BIG["hidden"], BIG["inter"]) / max(s["hidden"], s["inter"])) ** 2,
                        BIG["hidden"] / s["hidden"])
            extra[method]["predicted_peak_gpu_bytes"] = int(deep["peak_gpu_bytes"] * ratio)
            extra[method]["peak_gpu_method"] = (f"the deepest run's peak GPU memory x {ratio:.2f}, the largest of the "
                                                "block-weight, Hessian and activation growth ratios: an upper estimate")
    result["depth_checks"] = checks
    result["extrapolation_80_layers_8192"] = extra


def _table(result: dict) -> None:
    print()
    print("| layers | method | path | activations | checkpoint GB | wall s | peak RSS above baseline GB | bound GB "
          "| peak GPU GB | GPU bound GB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        if "error" in r:
            print(f"| {r['layers']} | {r['method']} | {r['path']} | {r.get('activations', '')} | "
                  f"{r['checkpoint_bytes'] / GB:.2f} | error | | | | |")
            continue
        gpu = r.get("peak_gpu_bytes")
        gb = r.get("gpu_bound_bytes")
        print(f"| {r['layers']} | {r['method']} | {r['path']} | {r.get('activations', '')} | "
              f"{r['checkpoint_bytes'] / GB:.2f} | {r['wall_s']:.1f} | "
              f"{r['peak_rss_above_baseline_bytes'] / GB:.3f} | {r['bound_bytes'] / GB:.2f} | "
              f"{'' if gpu is None else f'{gpu / GB:.2f}'} | {'' if gb is None else f'{gb / GB:.2f}'} |")
    for m, c in result.get("depth_checks", {}).items():
        print(f"{m}: deep/shallow peak RSS {c['deep_over_shallow_peak_rss']:.3f} "
              f"(within 10%: {c['within_10_percent']}; every streamed run within its bound: {c['all_within_bound']})")


if __name__ == "__main__":
    main()
