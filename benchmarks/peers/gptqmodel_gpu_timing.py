"""Wall time and peak GPU memory of GPTQModel (GPTQ W4 sym g128, its default act_group_aware
ordering; --desc-act for classic activation order) quantizing a Llama-3-8B-shaped random-weight
model on one GPU, 128 x 512 calibration tokens: the same shape and setting as anyquant's
benchmarks/quantize_gpu.py. GPTQModel loads models from a directory, so the random model is
first saved under --work (about 16 GB for 32 layers; not timed). Weights are random, so only the
time and memory mean anything.

  python benchmarks/peers/gptqmodel_gpu_timing.py [--layers 32] [--work /tmp/llama8b-random] [--out PATH]
  python benchmarks/peers/gptqmodel_gpu_timing.py --tiny      # checks the script on a CPU

Needs GPTQModel (docs/benchmarks.md lists the wheels for a machine with torch but no index).
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import torch
from timing import add_args, build, write  # benchmarks/peers/timing.py


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(ap)
    ap.add_argument("--desc-act", action="store_true", help="classic activation order instead of act_group_aware")
    ap.add_argument("--work", type=Path, default=Path("/tmp/llama8b-random"), help="where the random model is saved")
    args = ap.parse_args()
    # GPTQModel 7.6 sizes its CPU pool at (cores + 1) // 2 with a loader pool of 2 inside it: on a
    # 2-core machine that fails to start; its own switch sets the size.
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    from gptqmodel import GPTQModel, QuantizeConfig

    model, calib, device, what = build(args)
    dtype = next(model.parameters()).dtype
    model.save_pretrained(args.work)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    cfg = (QuantizeConfig(bits=4, group_size=args.group_size, desc_act=True, act_group_aware=False) if args.desc_act
           else QuantizeConfig(bits=4, group_size=args.group_size))
    qmodel = GPTQModel.load(str(args.work), cfg, device=device, dtype=dtype)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rows = [{"input_ids": c.tolist(), "attention_mask": [1] * len(c)} for c in calib]
    t0 = time.perf_counter()
    qmodel.quantize(rows, batch_size=1)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    order = "desc_act" if cfg.desc_act else "act_group_aware"
    row = {"peer": f"GPTQModel GPTQ W4 sym g{args.group_size}, {order}", "model": what,
           "seconds_quantize": seconds, "settings": {"desc_act": cfg.desc_act, "act_group_aware": cfg.act_group_aware,
                                                      "damp_percent": cfg.damp_percent}}
    if device == "cuda":
        row["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    shutil.rmtree(args.work, ignore_errors=True)
    write(args, "gptqmodel", row, ("gptqmodel", "transformers", "torch"), calib)


if __name__ == "__main__":
    main()
