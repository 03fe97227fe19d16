"""auto-round (SignRound) at its recommended 4-bit weight-only setting, as a peer row for
benchmarks/quality.py. Runs in auto-round's OWN virtual environment (`make autoround-venv`), on
the same calibration token windows anyquant uses (news text, BOS first).

Its default scheme W4A16 (int4, symmetric, group 128 along the input, scales in float16) with
its default tuning (200 steps per block, lr 1/steps = 5e-3, batch 8, min-max tuning on), on
--n-samples x --seq-len of anyquant's windows. Where the default cannot finish on a CPU, its own
"light" recipe is the documented lower setting (`--iters 50 --lr 5e-3`); peer.json records what ran.

Group size: auto-round quantizes a width that is no multiple of the group size by padding the
last group, but none of its inference backends accepts such a layer (they need in_features %
group_size == 0) and its loader then leaves the layer uninitialised. So SmolLM2 (576-wide) runs at
--group-size 64; this script refuses a group size its loader cannot serve.

Writes OUT/packed (auto-round's own format, as it ships), then reloads it with transformers
(auto-round's CPU kernels), reads each quantized Linear's effective weight and writes OUT/dense
(a float checkpoint) and OUT/peer.json, which quality.py scores as `--peers dense:OUT`.

  make autoround-venv
  nice .autoround/bin/python benchmarks/peers/autoround_w4.py --model DIR --out OUT \\
      --n-samples 32 --seq-len 512 [--iters 200] [--group-size 128]
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import time
from pathlib import Path

from dense import (  # benchmarks/peers/dense.py
    calibration_windows,
    stored_bits,
    write_dense,
    write_peer_json,
)

DEFAULT_ITERS = 200  # auto-round's SignRoundConfig default; lr defaults to 1 / iters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--n-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--iters", type=int, default=DEFAULT_ITERS,
                    help=f"tuning steps per block (auto-round's default {DEFAULT_ITERS})")
    ap.add_argument("--lr", type=float, default=None, help="rounding lr (auto-round's default: 1 / iters)")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args()

    import torch
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    unservable = sorted({m.in_features for n, m in model.named_modules()  # lm_head stays float in W4A16
                         if isinstance(m, torch.nn.Linear) and "lm_head" not in n and m.in_features % args.group_size})
    if unservable:
        raise SystemExit(f"autoround_w4.py: input widths {unservable} of {args.model} are no multiple of "
                         f"--group-size {args.group_size}; auto-round pads them when quantizing, but its loader "
                         "cannot serve such layers (inference/backend.py needs in_features % group_size == 0). "
                         "Fix: a group size dividing every width (64 for SmolLM2's 576)")
    ids = calibration_windows(tok, args.n_samples, args.seq_len)
    packed = args.out / "packed"
    settings = {"scheme": "W4A16", "bits": 4, "sym": True, "group_size": args.group_size, "iters": args.iters,
                "lr": args.lr if args.lr is not None else 1.0 / args.iters, "batch_size": 8, "nsamples": int(ids.shape[0]), "seqlen": args.seq_len,
                "format": "auto_round", "device": device,
                "iters_note": ("auto-round's default" if args.iters == DEFAULT_ITERS else
                               f"lowered from auto-round's default {DEFAULT_ITERS} to finish on this machine")}
    ar = AutoRound(model, tok, scheme="W4A16", group_size=args.group_size, iters=args.iters, lr=args.lr,
                   dataset=[w.unsqueeze(0) for w in ids], nsamples=int(ids.shape[0]), seqlen=args.seq_len,
                   device_map=device, seed=42)
    t0 = time.perf_counter()
    _, folders = ar.quantize_and_save(str(packed), format="auto_round")
    seconds = time.perf_counter() - t0
    del ar, model
    packed = Path(folders[0] if isinstance(folders, (list, tuple)) else folders)  # it adds a sub-folder

    served = AutoModelForCausalLM.from_pretrained(packed, dtype=torch.float32, device_map="cpu").eval()
    kernels = sorted({type(m).__name__ for m in served.modules() if hasattr(m, "qweight")})
    quantized = write_dense(served, packed, args.model, args.out / "dense", lambda m: hasattr(m, "qweight"))
    bits = stored_bits(packed, quantized)
    write_peer_json(args.out, {
        "peer": f"auto-round W4A16 sym g{args.group_size}, {args.iters} iters, lr {settings['lr']:g}",
        "label": f"auto-round W4A16 sym g{args.group_size} ({args.iters} iters, lr {settings['lr']:g})",
        "tool": "auto-round", "model": str(args.model), "settings": settings,
        "seconds_quantize_and_save": seconds, "packed": str(packed), "reload_kernels": kernels, **bits,
        "dense": "each quantized Linear's weight read back through auto-round's own CPU kernel (forward on the "
                 "identity); other tensors as the packed checkpoint reloads them",
        "versions": {p: md.version(p) for p in ("auto-round", "transformers", "torch")}})
    print(f"auto-round W4A16 g{args.group_size} {args.iters} iters: {seconds:.0f} s, "
          f"{bits['bits_per_weight']:.3f} bits/weight -> {args.out}")


if __name__ == "__main__":
    main()
