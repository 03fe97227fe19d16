"""GPTQModel at its recommended 4-bit setting, as a peer row for benchmarks/quality.py. Runs in
GPTQModel's OWN virtual environment (`make gptqmodel-venv`), on the same calibration token
windows anyquant uses (news text, BOS first).

Its default QuantizeConfig: GPTQ, int4, symmetric, group 128 along the input, desc_act off with
act_group_aware on (its group-aware reordering, which its config makes the default in place of
desc_act), damp 0.05, true_sequential; `--desc-act` runs classic activation order instead
(act_group_aware off). Its checkpoint stores a g_idx either way, counted in bits per weight.

Writes OUT/packed (GPTQModel's GPTQ checkpoint, as it ships), reloads it with GPTQModel on the
CPU (its reference torch kernel, float16 scales, float32 input: its default CPU kernel would
compute in bfloat16),
reads each quantized Linear's effective weight and writes OUT/dense (a
float checkpoint) and OUT/peer.json, which quality.py scores as `--peers dense:OUT`.

  make gptqmodel-venv
  nice .gptqmodel/bin/python benchmarks/peers/gptqmodel_w4.py --model DIR --out OUT \\
      --n-samples 32 --seq-len 512 [--group-size 128] [--desc-act]
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import time
from pathlib import Path

from dense import (  # benchmarks/peers/dense.py
    calibration_windows,
    stored_bits,
    write_dense,
    write_peer_json,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--n-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--desc-act", action="store_true", help="classic activation order (g_idx) instead of GAR")
    ap.add_argument("--serve-backend", default="gptq_torch",
                    help="GPTQModel kernel the checkpoint is reloaded with (its BACKEND values). Default "
                         "gptq_torch: its reference kernel, which dequantizes in its scales' float16 and multiplies "
                         "in the input's float32 (as quality.py scores every row), and serves a last partial "
                         "group. `auto` picks a CPU "
                         "kernel that computes in bfloat16 (gptq_torch_fused) or needs in_features %% group_size "
                         "== 0 (gptq_torch_aten)")
    ap.add_argument("--reload-only", action="store_true",
                    help="skip quantizing: rewrite OUT/dense and OUT/peer.json from an existing OUT/packed "
                         "(keeps the recorded seconds)")
    args = ap.parse_args()

    # GPTQModel 7.6 sizes its CPU pool at (cores + 1) // 2 workers and a model-loader pool of 2
    # inside it; on a 2-core machine that is 1 < 2 and it stops ("Virtual pool 'model_loader:cpu'
    # requests 2 workers but parent 'cpu' only has 1"). Its own switch sets the pool size.
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    import torch
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig
    from transformers import AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = AutoTokenizer.from_pretrained(args.model)
    ids = calibration_windows(tok, args.n_samples, args.seq_len)
    calibration = [{"input_ids": w.tolist(), "attention_mask": [1] * len(w)} for w in ids]
    cfg = (QuantizeConfig(bits=4, group_size=args.group_size, desc_act=True, act_group_aware=False) if args.desc_act
           else QuantizeConfig(bits=4, group_size=args.group_size))
    packed = args.out / "packed"
    if args.reload_only:
        seconds = json.loads((args.out / "peer.json").read_text())["seconds_quantize"]
    else:
        model = GPTQModel.load(str(args.model), cfg, device=device, dtype=torch.float32)
        t0 = time.perf_counter()
        model.quantize(calibration, batch_size=1)
        seconds = time.perf_counter() - t0
        model.save(str(packed))
        del model

    settings = {k: getattr(cfg, k) for k in ("bits", "group_size", "sym", "desc_act", "act_group_aware",
                                             "damp_percent", "true_sequential", "mse")}
    settings.update(nsamples=int(ids.shape[0]), seqlen=args.seq_len, device=device, batch_size=1,
                    serve_backend=args.serve_backend)
    # float16, the dtype of the scales it stores (its torch kernel takes float16 or bfloat16, not
    # float32): the kernel dequantizes in float16 and casts to the float32 input (quality.py
    # scores every row in float32); its CPU default dtype, bfloat16, would round the scales.
    served = GPTQModel.load(str(packed), device="cpu", dtype=torch.float16, backend=BACKEND(args.serve_backend))
    hf = served.model
    kernels = sorted({type(m).__name__ for m in hf.modules() if hasattr(m, "qweight")})
    quantized = write_dense(hf, packed, args.model, args.out / "dense", lambda m: hasattr(m, "qweight"))
    bits = stored_bits(packed, quantized)
    order = "desc_act" if cfg.desc_act else ("act_group_aware" if cfg.act_group_aware else "no act order")
    write_peer_json(args.out, {
        "peer": f"GPTQModel GPTQ W4 sym g{args.group_size}, {order}",
        "label": f"GPTQModel GPTQ W4 sym g{args.group_size} ({order})",
        "tool": "GPTQModel", "model": str(args.model), "settings": settings,
        "seconds_quantize": seconds, "packed": str(packed), "reload_kernels": kernels, **bits,
        "dense": "each quantized Linear's weight read back through GPTQModel's own CPU kernel (forward on the "
                 "identity); other tensors as the packed checkpoint stores them",
        "versions": {p: md.version(p) for p in ("gptqmodel", "transformers", "torch")}})
    print(f"GPTQModel W4 g{args.group_size} {order}: {seconds:.0f} s, "
          f"{bits['bits_per_weight']:.3f} bits/weight -> {args.out}")


if __name__ == "__main__":
    main()
