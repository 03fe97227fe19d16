"""MoE expert coverage: for every causal-LM type in the installed transformers whose shrunken
build (benchmarks/sweep.py's `build_model`: 2 layers, width 64, random weights, float32, CPU)
holds fused expert tensors (3-D parameters, anyquant.model.tree.fused_expert_tensors), the share
of expert parameters each method quantizes, the probe logits error, and who loads the saved
output:

- int4 (asymmetric, the default): expert share, probe logits relative error;
- nf4: expert share, error, `anyquant.save` (which reloads it and checks the logits) succeeds;
- W4A16 (symmetric int4): expert share, error, save succeeds, and whether stock transformers'
  `from_pretrained` loaded it with the in-memory logits (the save's own check, recorded in
  anyquant.json's `verification`).

Each type runs in a forked child with a time limit. Prints a table and writes
benchmarks/results/moe_experts.json.

    .venv/bin/python benchmarks/moe_experts.py                      # every MoE type found
    .venv/bin/python benchmarks/moe_experts.py --types mixtral,qwen3_moe
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import logging
import multiprocessing as mp
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

METHODS = [("int4", {}), ("nf4", {}), ("W4A16", {})]
SAVED = {"nf4", "W4A16"}


def candidate_types() -> list[str]:
    """Causal-LM types whose modeling module mentions experts (a text search, before building)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    out = []
    for t, cls_name in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()):
        mod_name = t.replace("-", "_")
        try:
            src = inspect.getsource(importlib.import_module(f"transformers.models.{mod_name}.modeling_{mod_name}"))
        except Exception:  # noqa: BLE001 — module named otherwise, or not importable: the build decides
            src = "experts"
        if "experts" in src.lower():
            out.append(t)
    return out


def one(model_type: str) -> dict:
    from sweep import build_model, logits_of, synthetic_inputs

    import anyquant
    from anyquant.model.tree import fused_expert_tensors

    row: dict = {"model_type": model_type}
    t0 = time.perf_counter()
    model = build_model(model_type, "causal")
    fused = fused_expert_tensors(model)
    row["fused_expert_params"] = sum(fused.values())
    row["fused_expert_tensors"] = len(fused)
    if not fused:
        row["skipped"] = "no fused expert tensors"
        return row
    try:  # the shrunken config must run in float first (as in the sweep), or nothing here is anyquant's
        logits_of(model, synthetic_inputs(model)[0])
    except Exception as e:  # noqa: BLE001
        row["skipped"] = f"does not run in float: {' '.join(str(e).split())[:160]}"
        return row
    for method, kw in METHODS:
        cell: dict = {}
        try:
            m = model if method == METHODS[0][0] else build_model(model_type, "causal")
            r = anyquant.quantize(m, method, progress=False, **kw)
            rep = r.report
            # experts rebuilt one Linear per expert before planning (Llama 4: runtime/experts.py
            # unfuse_for_loader) count through their Linear decisions under the experts module
            owners = {n.rpartition(".")[0] for n in fused}
            as_linears = sum(d.shape[0] * d.shape[1] for d in r.plan.to_quantize()
                             if any(d.name.startswith(o + ".") for o in owners))
            cell["expert_share"] = round((rep["fused_experts_quantized"]["params"] + as_linears)
                                         / max(1, sum(fused.values())), 4)
            cell["params_quantized_share"] = round(rep["params_quantized_share"], 4)
            cell["error"] = round(rep["probe_logits_relative_error"], 4)
            kept = [d for d in r.plan.decisions if d.kind == "fused_experts" and d.action == "keep"]
            if kept:
                cell["kept"] = f"{kept[0].reason_code}: {kept[0].reason}"[:160]
            if method in SAVED:
                with tempfile.TemporaryDirectory() as d:
                    out = anyquant.save(r, Path(d) / "out")
                    ver = json.loads((out / "anyquant.json").read_text())["verification"]
                cell["anyquant_reload"] = bool(ver["anyquant"]["ok"])
                st = ver.get("transformers") or {}
                cell["stock_loads"] = st.get("ok")
                if st.get("ok") is None:
                    cell["stock_reason"] = (st.get("skipped") or st.get("reason") or "")[:200]
        except Exception as e:  # noqa: BLE001 — recorded per cell
            cell["failed"] = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
        row[method] = cell
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def _child(model_type: str, q) -> None:
    torch.set_num_threads(1)
    try:
        q.put(one(model_type))
    except Exception as e:  # noqa: BLE001
        q.put({"model_type": model_type, "skipped": f"does not build: {type(e).__name__}: {str(e)[:160]}"})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--types", default="")
    ap.add_argument("--per-type-seconds", type=int, default=240)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "moe_experts.json"))
    a = ap.parse_args()
    types = [t for t in a.types.split(",") if t] or candidate_types()
    import anyquant  # noqa: F401  (children inherit the imports)
    import anyquant.formats.io  # noqa: F401

    ctx = mp.get_context("fork")
    rows = []
    t0 = time.perf_counter()
    print(f"{'model_type':22s} {'experts':>8s}  " + "  ".join(f"{m:>22s}" for m, _ in METHODS))
    for t in types:
        q = ctx.Queue()
        p = ctx.Process(target=_child, args=(t, q))
        p.start()
        p.join(a.per_type_seconds)
        if p.is_alive():
            p.kill()
            p.join()
            row = {"model_type": t, "skipped": f"over {a.per_type_seconds} s"}
        else:
            row = q.get() if not q.empty() else {"model_type": t, "skipped": f"child exit {p.exitcode}"}
        if row.get("skipped") == "no fused expert tensors" or str(row.get("skipped", "")).startswith("does not build"):
            continue
        rows.append(row)
        cells = []
        for m, _ in METHODS:
            c = row.get(m) or {}
            if "failed" in c:
                cells.append(f"{'FAILED':>22s}")
            elif c:
                stock = {True: "stock", False: "STOCK?", None: "aq-only"}[c.get("stock_loads")] if m in SAVED else ""
                cells.append(f"{c['expert_share']:>6.0%} e={c['error']:.3f} {stock:>7s}")
            else:
                cells.append(f"{'-':>22s}")
        print(f"{t:22s} {row.get('fused_expert_params', 0):>8d}  " + "  ".join(cells)
              + (f"  ({row['skipped']})" if "skipped" in row else ""), flush=True)
    done = [r for r in rows if "skipped" not in r]
    summary = {
        "types": len(rows), "ran": len(done), "seconds": round(time.perf_counter() - t0, 1),
        "transformers": __import__("transformers").__version__, "torch": torch.__version__,
    }
    for m, _ in METHODS:
        shares = [r[m]["expert_share"] for r in done if "expert_share" in r.get(m, {})]
        summary[m] = {
            "types_with_share_ge_95pct": sum(s >= 0.95 for s in shares),
            "types_measured": len(shares),
            "expert_params_quantized_share": round(
                sum(r[m]["expert_share"] * r["fused_expert_params"] for r in done if "expert_share" in r.get(m, {}))
                / max(1, sum(r["fused_expert_params"] for r in done if "expert_share" in r.get(m, {}))), 4),
            "failed": [r["model_type"] for r in done if "failed" in r.get(m, {})],
        }
        if m in SAVED:
            summary[m]["stock_loads"] = sum(r[m].get("stock_loads") is True for r in done if m in r)
            summary[m]["anyquant_reload"] = sum(r[m].get("anyquant_reload") is True for r in done if m in r)
    Path(a.out).write_text(json.dumps({"summary": summary, "rows": rows}, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
