"""Architecture sweep: every causal-LM architecture in the installed transformers that can be
instantiated from a shrunken default config (random weights, float32, CPU).

For each architecture and method (nf4, int8, int4): anyquant quantize -> forward -> save ->
reload (anyquant.load) -> compare with float; and plain transformers + BitsAndBytesConfig
defaults (nf4, int8) on the same saved float model. Prints a table and writes
benchmarks/results/sweep.json.

    .venv/bin/python benchmarks/sweep.py                 # all (slow: minutes per 10 archs on 2 cores)
    .venv/bin/python benchmarks/sweep.py --limit 10      # the first 10 model types
    .venv/bin/python benchmarks/sweep.py --types llama,gpt2,mixtral
"""

from __future__ import annotations

import argparse
import json
import signal
import logging
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)

SHRINK = {
    "hidden_size": 64, "n_embd": 64, "d_model": 64, "embed_dim": 64, "dim": 64, "model_dim": 64,
    "intermediate_size": 128, "ffn_dim": 128, "n_inner": 128, "moe_intermediate_size": 64,
    "shared_expert_intermediate_size": 64, "num_hidden_layers": 2, "n_layer": 2, "num_layers": 2,
    "n_layers": 2, "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "num_heads": 4,
    "num_key_value_heads": 2, "n_kv_heads": 2, "head_dim": 16, "vocab_size": 256,
    "max_position_embeddings": 128, "n_positions": 128, "num_experts": 4, "num_local_experts": 4,
    "n_routed_experts": 4, "num_experts_per_tok": 2, "kv_lora_rank": 16, "q_lora_rank": 16,
    "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16, "layer_types": None,
}
METHODS = ["nf4", "int8", "int4"]
BOUND = {"nf4": 0.5, "int8": 0.1, "int4": 0.5}  # relative logits error: catches breakage, not quality


def shrunk_model(model_type: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type)
    for k, v in SHRINK.items():
        if hasattr(cfg, k) and (v is not None or k == "layer_types"):
            if k == "layer_types":
                lt = getattr(cfg, k)
                if isinstance(lt, list):
                    setattr(cfg, k, lt[:2])
                continue
            setattr(cfg, k, v)
    for k in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
        v = getattr(cfg, k, None)
        if isinstance(v, int) and v >= SHRINK["vocab_size"]:
            setattr(cfg, k, min(v, 1))
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def logits_of(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    lg = out.logits if hasattr(out, "logits") else out[0]
    return lg.float()


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def one(model_type: str, workdir: Path) -> dict:
    import anyquant
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    row = {"model_type": model_type, "anyquant": {}, "transformers_bnb": {}}
    try:
        model = shrunk_model(model_type)
    except Exception as e:  # noqa: BLE001
        row["instantiates"] = False
        row["reason"] = f"{type(e).__name__}: {str(e)[:160]}"
        return row
    row["instantiates"] = True
    src = workdir / "float"
    ids = torch.randint(0, 200, (1, 16), generator=torch.Generator().manual_seed(0))
    try:
        model.save_pretrained(src)
        ref = logits_of(model, ids)
    except Exception as e:  # noqa: BLE001
        row["reason"] = f"float model cannot save/run: {type(e).__name__}: {str(e)[:160]}"
        return row
    for method in METHODS:
        try:
            r = anyquant.quantize(str(src), method, progress=False)
            err = rel(logits_of(r.model, ids), ref)
            out = anyquant.save(r, workdir / f"aq-{method}")
            err2 = rel(logits_of(anyquant.load(out), ids), ref)
            ok = err < BOUND[method] and abs(err2 - err) < 1e-3 + 0.05 * err
            row["anyquant"][method] = {"ok": ok, "error": round(err, 4), "reloaded_error": round(err2, 4),
                                       "kept_outside_reads": [d.name for d in r.plan.kept()
                                                              if d.reason_code == "weight_read_outside_forward"]}
        except Exception as e:  # noqa: BLE001
            row["anyquant"][method] = {"ok": False, "reason": f"{type(e).__name__}: {str(e)[:200]}"}
    for method, qc in (("nf4", BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")),
                       ("int8", BitsAndBytesConfig(load_in_8bit=True))):
        try:
            m = AutoModelForCausalLM.from_pretrained(src, quantization_config=qc)
            err = rel(logits_of(m, ids), ref)
            row["transformers_bnb"][method] = {"ok": bool(err < BOUND[method]), "error": round(err, 4)}
        except Exception as e:  # noqa: BLE001
            row["transformers_bnb"][method] = {"ok": False, "reason": f"{type(e).__name__}: {str(e)[:200]}"}
    return row


def main() -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--types", default="")
    ap.add_argument("--per-type-seconds", type=int, default=120)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "sweep.json"))
    a = ap.parse_args()
    types = [t for t in a.types.split(",") if t] or sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    if a.limit:
        types = types[: a.limit]
    rows = []
    t0 = time.perf_counter()

    def too_slow(signum, frame):
        raise TimeoutError(f"over {a.per_type_seconds} s")

    signal.signal(signal.SIGALRM, too_slow)
    for t in types:
        with tempfile.TemporaryDirectory() as d:
            signal.alarm(a.per_type_seconds)
            try:
                row = one(t, Path(d))
            except Exception:  # noqa: BLE001  (TimeoutError included)
                row = {"model_type": t, "instantiates": False, "reason": traceback.format_exc(limit=1)[-200:]}
            finally:
                signal.alarm(0)
        rows.append(row)
        _write(a.out, rows, t0, final=False)
        aq = " ".join(f"{m}:{'ok' if v.get('ok') else 'FAIL'}" for m, v in row.get("anyquant", {}).items())
        tb = " ".join(f"{m}:{'ok' if v.get('ok') else 'FAIL'}" for m, v in row.get("transformers_bnb", {}).items())
        print(f"{t:28s} {'inst' if row.get('instantiates') else 'skip':5s} anyquant[{aq}] transformers+bnb[{tb}] "
              f"{row.get('reason', '')[:80]}", flush=True)
    print(json.dumps(_write(a.out, rows, t0, final=True)))


def _write(out: str, rows: list[dict], t0: float, final: bool) -> dict:
    inst = [r for r in rows if r.get("instantiates") and "anyquant" in r and r["anyquant"]]
    aq_pass = sum(all(v.get("ok") for v in r["anyquant"].values()) for r in inst)
    tb_pass = sum(all(v.get("ok") for v in r["transformers_bnb"].values()) for r in inst if r["transformers_bnb"])
    summary = {"types": len(rows), "instantiated": len(inst), "anyquant_pass": aq_pass,
               "transformers_bnb_pass": tb_pass, "seconds": round(time.perf_counter() - t0, 1),
               "transformers": __import__("transformers").__version__, "complete": final}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"summary": summary, "rows": rows}, indent=2))
    return summary


if __name__ == "__main__":
    main()
