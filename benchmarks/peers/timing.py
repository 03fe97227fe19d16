"""What the peers' GPU timing scripts share: the Llama-3-8B-shaped random-weight model of
benchmarks/quantize_gpu.py (the one anyquant's own 8B timings use), random calibration tokens,
and the JSON they write. `--tiny` builds a 2-layer model of the same family on the CPU, to check
a script end to end on a machine without a GPU (its seconds mean nothing)."""

from __future__ import annotations

import datetime
import importlib.metadata as md
import json
import sys
import tempfile
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1]
VOCAB = 128256


def add_args(ap) -> None:
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--tiny", action="store_true", help="2 small layers on the CPU: checks the script, times nothing")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default: benchmarks/results/<peer>_gpu.json)")


def build(args):
    """(model, calibration ids [n, seq], device, description)."""
    g = torch.Generator().manual_seed(1)
    if args.tiny:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=1024)
        calib = torch.randint(0, cfg.vocab_size, (min(args.n_samples, 8), min(args.seq_len, 64)), generator=g)
        return LlamaForCausalLM(cfg).eval(), calib, "cpu", "tiny 2-layer Llama (script check only)"
    if not torch.cuda.is_available():
        raise SystemExit(f"{Path(sys.argv[0]).name}: needs a CUDA device (or --tiny to check the script on a CPU)")
    sys.path.insert(0, str(BENCH))
    # the shape anyquant's own 8B timings use
    from quantize_gpu import build as build_8b

    calib = torch.randint(0, VOCAB, (args.n_samples, args.seq_len), generator=g)
    return (build_8b(args.layers), calib, "cuda",
            f"Llama-3-8B-shaped, {args.layers} layers, random bf16 weights")


def stub_tokenizer():
    """A one-token tokenizer: the calibration is token ids, never text, but auto-round refuses a
    model object without a tokenizer and the random model has none."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")),
                                   unk_token="<unk>")


def write(args, peer: str, row: dict, packages: tuple[str, ...], calib: torch.Tensor) -> None:
    default = Path(tempfile.gettempdir()) if args.tiny else BENCH / "results"  # a check is no result
    out = args.out or default / f"{peer}_gpu.json"
    doc = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() and not args.tiny else "cpu",
           "n_samples": int(calib.shape[0]), "seq_len": int(calib.shape[1]), "tiny_check_only": args.tiny,
           "versions": {p: md.version(p) for p in packages}, **row}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2))
    print(f"| peer | model | seconds | peak GPU GiB |\n|---|---|---|---|\n"
          f"| {row['peer']} | {row['model']} | {row['seconds_quantize']:.0f} | {row.get('peak_gpu_gib', 0):.1f} |")
    print(f"wrote {out}")
