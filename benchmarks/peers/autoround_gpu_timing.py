"""Wall time and peak GPU memory of auto-round (SignRound, W4A16 sym g128, its default 200 steps
per block) quantizing a Llama-3-8B-shaped random-weight model on one GPU, 128 x 512 calibration
tokens: the same shape and setting as anyquant's benchmarks/quantize_gpu.py. Weights are random,
so only the time and memory mean anything.

  python benchmarks/peers/autoround_gpu_timing.py [--iters 200] [--layers 32] [--out PATH]
  python benchmarks/peers/autoround_gpu_timing.py --tiny      # checks the script on a CPU

Needs auto-round (docs/benchmarks.md lists the wheels for a machine with torch but no index).
"""

from __future__ import annotations

import argparse
import time

import torch
from timing import add_args, build, stub_tokenizer, write  # benchmarks/peers/timing.py


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(ap)
    ap.add_argument("--iters", type=int, default=200, help="tuning steps per block (auto-round's default 200)")
    args = ap.parse_args()
    from auto_round import AutoRound

    model, calib, device, what = build(args)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ar = AutoRound(model, stub_tokenizer(), scheme="W4A16", group_size=args.group_size, iters=args.iters,
                   dataset=[c.unsqueeze(0) for c in calib], nsamples=int(calib.shape[0]),
                   seqlen=int(calib.shape[1]), device_map=device, seed=42)
    t0 = time.perf_counter()
    ar.quantize()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    row = {"peer": f"auto-round W4A16 sym g{args.group_size}, {args.iters} iters", "model": what,
           "seconds_quantize": seconds, "iters": args.iters}
    if device == "cuda":
        row["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    write(args, "autoround", row, ("auto-round", "transformers", "torch"), calib)


if __name__ == "__main__":
    main()
