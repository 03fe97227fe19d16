"""Can vLLM serve this output? `vllm_compatible(output_dir)` lists the problems, checked against
vLLM's documented constraints for the formats anyquant writes (without importing vLLM, which
anyquant does not depend on; benchmarks/vllm_check.py asks vLLM's own code, in its own venv): compressed-tensors W4A16 (`CompressedTensorsWNA16`: pack-quantized, 4 or 8 bits,
int, weight-only, static, group or channel strategy, group size -1/32/64/128 for its Marlin
kernels, symmetric or asymmetric zero points, float16/bfloat16 activations) and bitsandbytes
(4-bit nf4/fp4, 8-bit). The config is parsed with compressed-tensors' own QuantizationConfig."""

from __future__ import annotations

import json
from pathlib import Path

from anyquant.errors import AnyquantError
from anyquant.methods.rtn import VLLM_GROUP_SIZES

VLLM_DTYPES = ("float16", "bfloat16")  # activation dtypes of vLLM's 4-bit weight-only kernels
VLLM_BITS = (4, 8)


def vllm_compatible(output_dir: str | Path) -> list[str]:
    """The reasons vLLM would refuse (or not serve as written) the output at `output_dir`;
    empty when it meets every constraint checked."""
    path = Path(output_dir).expanduser()
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise AnyquantError(f"{path}: cannot read config.json ({e}); give an anyquant output directory") from None
    qc = config.get("quantization_config")
    if not isinstance(qc, dict):
        return ["config.json has no quantization_config: not a quantized output"]
    method = qc.get("quant_method")
    experts = _quantized_experts(path)
    if experts:
        return [experts_problem(experts)]
    if method == "bitsandbytes":
        return _bnb_problems(qc)
    if method != "compressed-tensors":
        return [f"quant_method {method!r}: anyquant checks compressed-tensors and bitsandbytes outputs only"]
    return _compressed_problems(qc, config)


def _bnb_problems(qc: dict) -> list[str]:
    if qc.get("load_in_4bit") and qc.get("bnb_4bit_quant_type") not in ("nf4", "fp4"):
        return [f"bnb_4bit_quant_type {qc.get('bnb_4bit_quant_type')!r}: vLLM's bitsandbytes loader takes nf4 or fp4"]
    if not (qc.get("load_in_4bit") or qc.get("load_in_8bit")):
        return ["bitsandbytes config with neither load_in_4bit nor load_in_8bit"]
    return []


def _compressed_problems(qc: dict, config: dict) -> list[str]:
    from compressed_tensors.quantization import QuantizationConfig

    problems: list[str] = []
    body = {k: v for k, v in qc.items() if k not in ("quant_method", "dequantize")}
    try:
        parsed = QuantizationConfig.model_validate(body)
    except Exception as e:  # noqa: BLE001 — pydantic's report, one line
        return [f"compressed-tensors cannot parse the quantization_config: {' '.join(str(e).split())[:300]}"]
    fmt = parsed.format
    if fmt != "pack-quantized":
        problems.append(f"format {fmt!r}: vLLM's W4A16 path reads pack-quantized")
    for name, group in parsed.config_groups.items():
        w = group.weights
        if w is None:
            problems.append(f"{name}: no weight quantization")
            continue
        if group.input_activations is not None or group.output_activations is not None:
            problems.append(f"{name}: activations quantized; anyquant's outputs are weight-only (W4A16)")
        if w.num_bits not in VLLM_BITS or str(w.type.value if hasattr(w.type, "value") else w.type) != "int":
            problems.append(f"{name}: {w.num_bits}-bit {w.type}: vLLM's WNA16 scheme takes int 4 or 8 bits")
        if w.dynamic:
            problems.append(f"{name}: dynamic weight quantization: vLLM's WNA16 needs static weights")
        strategy = str(w.strategy.value if hasattr(w.strategy, "value") else w.strategy)
        if strategy == "group":
            if w.group_size not in VLLM_GROUP_SIZES:
                problems.append(f"{name}: group size {w.group_size}: vLLM's 4-bit kernels accept "
                                f"{', '.join(map(str, VLLM_GROUP_SIZES))}; quantize again with --group-size 32, 64 "
                                "or 128 (one that divides every quantized layer's in_features)")
        elif strategy != "channel":
            problems.append(f"{name}: strategy {strategy!r}: vLLM's WNA16 takes group or channel")
        if getattr(w, "actorder", None) not in (None, "static", "group", "weight"):
            problems.append(f"{name}: actorder {w.actorder!r} is not one vLLM reads")
    dtype = config.get("dtype") or config.get("torch_dtype")
    # vLLM's dtype="auto" serves a float32 checkpoint in its platform's preferred 16-bit dtype
    # (benchmarks/vllm_check.py asks vLLM's own code), so float32 is no obstacle
    if dtype not in VLLM_DTYPES + ("float32",):
        problems.append(f"dtype {dtype}: vLLM's 4-bit kernels compute in float16 or bfloat16; serve with "
                        "`vllm serve --dtype bfloat16`, or quantize with --dtype bfloat16")
    return problems


def _quantized_experts(path: Path) -> int:
    """How many quantized fused expert tensors the output's anyquant.json plan keeps in
    anyquant's own fused layout (0 without one; int4 experts written one Linear per expert are
    in the standard layout)."""
    try:
        manifest = json.loads((path / "anyquant.json").read_text())
    except (OSError, json.JSONDecodeError):
        return 0
    decisions = (manifest.get("plan") or {}).get("decisions") or []
    return fused_layout_experts(decisions)


def fused_layout_experts(decisions: list[dict]) -> int:
    """Quantized fused expert tensors among plan `decisions` (dicts) not written one Linear per expert."""
    return sum(1 for d in decisions if d.get("kind") == "fused_experts" and d.get("action") == "quantize"
               and (d.get("options") or {}).get("layout") != "per_expert")


def experts_problem(n: int) -> str:
    return (f"{n} quantized fused MoE expert tensor(s) in anyquant's own layout (runtime/experts.py), which "
            "vLLM's loaders do not read: load the output with anyquant.load")
