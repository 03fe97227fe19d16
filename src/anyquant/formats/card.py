"""README.md model card for every output: what was done (method, plan summary, dtype), what it
measured (the manifest's metrics), and how to load it in transformers, vLLM, anyquant and
llama.cpp (through `anyquant export DIR --to gguf`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from anyquant.errors import AnyquantError
from anyquant.formats.gguf import SUPPORTED_ARCHITECTURES, plan_group_sizes, weight_type
from anyquant.formats.vllm import experts_problem, fused_layout_experts, vllm_compatible
from anyquant.planning.experts import stock_experts_refusal
from anyquant.planning.plan import Plan

CARD = "README.md"


def _num(v: Any, fmt: str = ".4f") -> str:
    return format(v, fmt) if isinstance(v, (int, float)) else "not measured"


def model_card(directory: Path, manifest: dict[str, Any]) -> str:
    """The card's text for the output at `directory` (config.json already written)."""
    plan = manifest.get("plan", {})
    metrics = manifest.get("metrics", {})
    method, fmt = manifest.get("method"), manifest.get("format")
    decisions = plan.get("decisions", [])
    experts = [d for d in decisions if d.get("kind") == "fused_experts"]
    experts_q = [d for d in experts if d.get("action") == "quantize"]
    quantized = [d for d in decisions if d.get("action") == "quantize" and d.get("kind") != "fused_experts"]
    kept_linear = [d for d in decisions if d.get("action") == "keep" and d.get("kind") == "linear"]
    groups = sorted({d.get("options", {}).get("group_size") for d in quantized} - {None})
    src = manifest.get("source", {}).get("path") or "an in-memory model"
    lines = [
        "---", "tags: [anyquant, quantized, " + ("compressed-tensors" if fmt == "compressed-tensors" else "bitsandbytes")
        + "]", "---", "",
        f"# {Path(directory).name}", "",
        f"Quantized by anyquant {manifest.get('anyquant_version', '')} from `{src}` with **{method}** "
        f"({fmt}), compute dtype {manifest.get('compute_dtype')}.", "",
        "## Plan", "",
        f"- {len(quantized)} Linear layers quantized, {len(kept_linear)} kept in float"
        + (f"; group size {', '.join(map(str, groups))}" if groups else ""),
    ]
    if experts:
        lines.append(f"- {len(experts_q)} of {len(experts)} fused MoE expert tensors quantized")
    for d in kept_linear[:10]:
        lines.append(f"- kept: `{d['name']}`: {d.get('reason', '')}")
    if len(kept_linear) > 10:
        lines.append(f"- ... and {len(kept_linear) - 10} more kept (anyquant.json has every decision)")
    for n in plan.get("notes", [])[:8]:
        lines.append(f"- note: {n}")
    lines += ["", "## Measured quality", "",
              "| metric | value |", "|---|---|",
              f"| probe logits relative error (vs float) | {_num(metrics.get('probe_logits_relative_error'))} |",
              f"| bits per quantized weight (estimate) | {_num(metrics.get('bits_per_quantized_weight_estimate'), '.3f')} |"]
    for key in ("perplexity", "baseline_perplexity", "kl_divergence", "top1_agreement"):
        if key in metrics:
            lines.append(f"| {key.replace('_', ' ')} | {_num(metrics[key])} |")
    lines += ["", "## Load it", "", "anyquant (any device; int4 through its own kernels):", "", "```python",
              "import anyquant", f"model = anyquant.load({str(directory)!r})", "```", "",
              "transformers:", ""]
    refusal = stock_experts_refusal(Plan.from_dict(plan)) if experts_q else None
    if refusal:
        lines += [refusal[0].upper() + refusal[1:] + ".", ""]
    else:
        lines += ["```python", "from transformers import AutoModelForCausalLM",
                  f"model = AutoModelForCausalLM.from_pretrained({str(directory)!r})", "```", ""]
    if fmt == "compressed-tensors":
        sym = bool(manifest.get("config", {}).get("symmetric"))
        lines.append("Symmetric int4: transformers keeps the weights packed at load (compressed-tensors "
                     "decompresses each layer at its first forward)." if sym else
                     "Asymmetric int4: transformers dequantizes the weights at load (float size in memory); "
                     "quantize with `--symmetric` (W4A16) for a packed load.")
        lines.append("")
    fused_q = fused_layout_experts(experts_q)
    problems = [experts_problem(fused_q)] if fused_q else vllm_compatible(directory)
    lines += ["vLLM:", "", "```", f"vllm serve {directory}", "```", ""]
    if problems:
        lines += ["vLLM constraints not met (anyquant.formats.vllm.vllm_compatible):", ""]
        lines += [f"- {p}" for p in problems]
    else:
        lines.append("Meets vLLM's documented constraints for this format (checked without vLLM installed).")
    lines += ["", "llama.cpp:", ""] + _gguf_lines(directory, manifest)
    return "\n".join(lines) + "\n"


def _gguf_lines(directory: Path, manifest: dict[str, Any]) -> list[str]:
    try:
        arch = json.loads((Path(directory) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        arch = None
    if arch not in SUPPORTED_ARCHITECTURES:
        return [f"No GGUF export for a {arch!r} model (anyquant exports {', '.join(SUPPORTED_ARCHITECTURES)}); "
                "convert the float source with llama.cpp's own converter."]
    try:
        _, why = weight_type(manifest.get("method"), manifest.get("config"), plan_group_sizes(manifest))
    except AnyquantError as e:
        return [str(e)]
    name = Path(directory).name
    return ["```", f"anyquant export {directory} --to gguf      # writes {name}.gguf beside it",
            f"llama-cli -m {name}.gguf", "```", "", f"GGUF types: {why}."]


def write_card(directory: Path, manifest: dict[str, Any]) -> Path:
    """Write README.md into `directory` (save copies no README from the source)."""
    path = Path(directory) / CARD
    path.write_text(model_card(directory, manifest))
    return path
