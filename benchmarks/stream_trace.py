"""Where a sequence of cuda_stream GEMVs loses time at kernel boundaries (H100 diagnostics).

Builds the CUDA extension a second time with ANYQUANT_STREAM_TRACE (anyquant.runtime.stream_trace),
so that thread 0 of every CTA records the GPU's global timer (ns) at: entry, release by the kernel
before (griddepcontrol.wait), x staged, every stage consumed, rows written. Replays the kernel-level
sequence of speed_gpu.py (32 layers, one CUDA graph) for each configuration given and prints,
per shape (median over the 32 layers):

- start: the first CTA's entry, relative to the end of the kernel before (negative: it started
  while the one before ran, which is what lets it stream early)
- release: from the end of the kernel before (its last CTA's rows written) to this kernel's
  first CTA released (the grid-completion latency)
- stage_x: release to x staged (slowest CTA)
- body: x staged to every stage consumed (slowest CTA)
- tail: every stage consumed to rows written (slowest CTA), and end-to-end per kernel
- the most CTAs of one launch that ran on one multiprocessor (over the 32 layers)

Usage (on the GPU): python benchmarks/stream_trace.py --layout fused --cfgs "4,16,1;3,16,1"
Writes benchmarks/results/stream_trace.json unless --out is given.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import speed_gpu  # noqa: E402

from anyquant.runtime import cuda_int4, kernels  # noqa: E402
from anyquant.runtime import stream_trace as trace  # noqa: E402


def trace_sequence(ext, layers, shapes, table, replays=20):
    """Replays the sequence in one graph through the traced build `ext`; returns (median ms,
    per-launch records of the last replay)."""
    x = {k: torch.randn(1, k, device="cuda", dtype=torch.bfloat16) for k in (speed_gpu.HIDDEN, speed_gpu.INTER)}

    def run():
        for layer in layers:
            for name, _, k in shapes:
                kernels.int4_linear_forward(layer[name]["int4"], x[k], kernel="cuda_stream")

    launches = [(name, n, k, table[(n, k)]) for _ in layers for name, n, k in shapes]
    with kernels.use_kernels(configs={"cuda_stream": table}, cuda_extension=ext):
        # slots are numbered from the reset at capture; the buffer keeps the last replay's records
        ms = speed_gpu.graph_time_ms(run, replays, before_capture=lambda: trace.reset(ext))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    return ms, trace.records(ext, launches, sms)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layout", choices=("separate", "fused", "both"), default="both")
    ap.add_argument("--cfgs", default="4,16,1;3,16,1;2,16,2", help="'S,W,CTAs[,PDL];...' (PDL 1 by default)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "stream_trace.json"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() or not cuda_int4.stream_supported(torch.device("cuda")):
        sys.exit("stream_trace.py needs an sm_90 GPU")
    ext = trace.build(torch.device("cuda"))
    cfgs = [speed_gpu.with_pdl(tuple(int(v) for v in c.split(","))) for c in args.cfgs.split(";")]
    layers = speed_gpu.build_layers(False)
    result = {"device": torch.cuda.get_device_name(0), "carveout": kernels.current_settings().stream_carveout, "rows": []}
    layouts = ["separate", "fused"] if args.layout == "both" else [args.layout]
    for layout in layouts:
        if layout == "fused":
            layers = speed_gpu.fuse_layers(layers)
        shapes = speed_gpu.SHAPES if layout == "separate" else speed_gpu.SHAPES_FUSED
        keys = sorted({(n, k) for _, n, k in shapes})
        for cfg in cfgs:
            ms, recs = trace_sequence(ext, layers, shapes, {key: cfg for key in keys})
            summary = trace.summarize(recs, [name for name, _, _ in shapes])
            result["rows"].append({"layout": layout, "cfg": list(cfg), "ms": round(ms, 4), "per_shape_us": summary})
            print(f"{layout} {list(cfg)}: {ms:.3f} ms (traced build)")
            print(f"  {'shape':14s} {'start':>7s} {'release':>8s} {'stage_x':>8s} {'body':>7s} {'tail':>6s} {'kernel':>7s}"
                  "  (us)  most CTAs on one SM")
            for name, s in summary.items():
                print(f"  {name:14s} {s['start']:7.2f} {s['release']:8.2f} {s['stage_x']:8.2f} {s['body']:7.2f} "
                      f"{s['tail']:6.2f} {s['kernel']:7.2f}  {s['sm_max']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
