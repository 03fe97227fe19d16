"""Would vLLM serve this output? Asked of vLLM's own code, without a GPU (issue 19).

Runs in its own venv (`make vllm-venv`: vLLM's wheel with torch 2.13.0 CPU, no CUDA libraries)
and imports no anyquant. For an anyquant compressed-tensors output directory it:

1. parses config.json's quantization_config with vLLM's `CompressedTensorsConfig.from_config`;
2. asks it, for every quantized Linear in the safetensors files, which scheme serves the layer
   (`get_scheme`: e.g. CompressedTensorsWNA16);
3. has that scheme create the layer's parameters (`create_weights`) as vLLM's model loader does,
   for tensor-parallel degree 1 (and 2, 4, 8: a row-parallel layer's input split across GPUs,
   reported as the degrees the widths allow, not as failures), which makes vLLM
   pick its mixed-precision kernel (`choose_mp_linear_kernel`: Machete, Marlin, ... each checking
   group size, zero points and shapes) for a GPU of the given compute capability;
4. compares every parameter vLLM created with the checkpoint tensor of the same name (shape and
   dtype), which is what its weight loader copies.

vLLM's platform is set to a CUDA device of `--capability` (default 9.0, the H100): vLLM's kernel
choice depends on it and there is no GPU here. Nothing runs a kernel; what is checked is that
vLLM accepts the config, finds a scheme and a kernel for every layer, and that the tensors fit.

    .vllm/bin/python benchmarks/vllm_check.py OUTPUT_DIR [--capability 9.0] [--tp 1,2,4,8] [--json FILE]

Prints one JSON object: {"ok": bool, "problems": [...], "schemes": {...}, "kernels": {...}, ...}.
Exit status 0 when ok, 1 when vLLM refuses something, 2 when the check itself cannot run.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

# Linears whose input vLLM splits across tensor-parallel GPUs (the others split their output)
ROW_PARALLEL = {"o_proj", "down_proj", "out_proj", "dense_4h_to_h", "fc2", "w2", "wo", "c_proj"}
ST_DTYPES = {"I32": "torch.int32", "I64": "torch.int64", "F16": "torch.float16", "BF16": "torch.bfloat16",
             "F32": "torch.float32", "I8": "torch.int8", "U8": "torch.uint8"}


def headers(directory: Path) -> dict[str, dict]:
    """Every tensor's safetensors header entry (dtype, shape), read without torch."""
    out: dict[str, dict] = {}
    for f in sorted(directory.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            h = json.loads(fh.read(n))
        h.pop("__metadata__", None)
        out.update(h)
    return out


def pretend_cuda(capability: tuple[int, int]) -> None:
    """Make vLLM's platform report a CUDA device of `capability`. Done after its modules are
    imported (they then skip the CUDA-only extensions this CPU machine lacks) on the platform
    object they all share, so the scheme and kernel choice below see a GPU."""
    from vllm.platforms import current_platform
    from vllm.platforms.interface import DeviceCapability, PlatformEnum

    current_platform._enum = PlatformEnum.CUDA
    current_platform.get_device_capability = lambda device_id=0: DeviceCapability(*capability)


def check(directory: Path, capability: tuple[int, int], tps: list[int]) -> dict:
    import torch
    from torch import nn
    from vllm.distributed import parallel_state
    from vllm.model_executor.kernels.linear import choose_mp_linear_kernel  # noqa: F401  (imported before the switch)
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
        CompressedTensorsConfig,
    )

    pretend_cuda(capability)

    config = json.loads((directory / "config.json").read_text())
    qc = config.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != "compressed-tensors":
        return {"ok": False, "problems": [f"{directory}/config.json: quant_method "
                                          f"{(qc or {}).get('quant_method')!r}: this check covers compressed-tensors "
                                          "outputs (int4 / W4A16 / gptq / awq / hqq)"]}
    problems: list[str] = []
    try:
        cfg = CompressedTensorsConfig.from_config(qc)
    except Exception as e:  # noqa: BLE001 — vLLM's own refusal, reported as it is
        return {"ok": False, "problems": [f"vLLM's CompressedTensorsConfig.from_config refused the config: "
                                          f"{type(e).__name__}: {e}"]}
    tensors = headers(directory)
    layers = sorted(k[: -len(".weight_packed")] for k in tensors if k.endswith(".weight_packed"))
    if not layers:
        problems.append("no weight_packed tensors in the safetensors files: nothing for vLLM's WNA16 scheme to load")
    schemes: Counter = Counter()
    kernels: dict[str, Counter] = {str(tp): Counter() for tp in tps}
    act = getattr(torch, config.get("dtype") or config.get("torch_dtype") or "bfloat16")
    notes: list[str] = []
    if act not in (torch.float16, torch.bfloat16):
        # vLLM's dtype="auto" serves a float32 checkpoint in 16 bits; its 4-bit kernels need that
        notes.append(f"config.json dtype {act}: vLLM's dtype=auto serves it in float16 (checked in bfloat16 here)")
        act = torch.bfloat16
    refused_tp: dict[str, list[str]] = {}
    for name in layers:
        rows, cols = tensors[f"{name}.weight_packed"]["shape"]
        if f"{name}.weight_shape" in tensors:
            pass  # its values are the unpacked shape; the packed shape's rows are the output size
        out_features = rows
        try:
            scheme = cfg.get_scheme(layer=nn.Linear(1, 1, device="meta"), layer_name=name)
        except Exception as e:  # noqa: BLE001
            problems.append(f"{name}: vLLM found no scheme: {type(e).__name__}: {str(e)[:300]}")
            continue
        if scheme is None:
            problems.append(f"{name}: vLLM would run it unquantized (no config group targets it)")
            continue
        schemes[type(scheme).__name__] += 1
        in_features = cols * 32 // getattr(scheme, "num_bits", 4)
        row_parallel = name.rsplit(".", 1)[-1] in ROW_PARALLEL
        for tp in tps:
            layer = nn.Module()
            # vLLM splits a row-parallel layer's input and a column-parallel layer's output
            ins = in_features // tp if row_parallel else in_features
            outs = out_features if row_parallel else out_features // tp
            parallel_state._TP = SimpleNamespace(rank_in_group=0, world_size=tp)
            try:
                scheme.create_weights(layer, output_size=out_features, input_size=in_features,
                                      output_partition_sizes=[outs], input_size_per_partition=ins,
                                      params_dtype=act, weight_loader=lambda *a, **k: None)
            except Exception as e:  # noqa: BLE001
                kind = f"row-parallel, input {ins} per GPU" if row_parallel else f"column-parallel, output {outs} per GPU"
                why = f"{name} ({kind}): vLLM refused the layer: {type(e).__name__}: {' '.join(str(e).split())[:400]}"
                if tp == 1:
                    problems.append(why)
                else:   # a larger degree the layer widths do not allow: reported, not a failure of the output
                    refused_tp.setdefault(str(tp), []).append(why)
                continue
            kernel = getattr(scheme, "kernel", None)
            kernels[str(tp)][type(kernel).__name__ if kernel is not None else "none"] += 1
            if tp != 1:
                continue
            for pname, p in layer.named_parameters():
                key = f"{name}.{pname}"
                if key not in tensors:
                    problems.append(f"{key}: vLLM creates this parameter but the checkpoint has no such tensor")
                    continue
                want, got = list(p.shape), tensors[key]["shape"]
                if pname != "weight_shape" and want != got:
                    problems.append(f"{key}: vLLM expects shape {want}, the checkpoint has {got}")
                if str(p.dtype) != ST_DTYPES.get(tensors[key]["dtype"]) and pname != "weight_scale":
                    problems.append(f"{key}: vLLM expects {p.dtype}, the checkpoint has {tensors[key]['dtype']}")
    return {"ok": not problems, "problems": problems[:50], "problem_count": len(problems), "layers": len(layers),
            "schemes": dict(schemes), "kernels_by_tensor_parallel": {k: dict(v) for k, v in kernels.items()},
            "tensor_parallel_ok": {str(tp): str(tp) not in refused_tp and not problems for tp in tps},
            "tensor_parallel_refused": {k: {"layers": len(v), "first": v[0]} for k, v in refused_tp.items()},
            "notes": notes,
            "capability": f"{capability[0]}.{capability[1]}", "activation_dtype": str(act)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("output", type=Path)
    ap.add_argument("--capability", default="9.0")
    ap.add_argument("--tp", default="1,2,4,8", help="tensor-parallel degrees to try (1 decides ok)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    try:
        import vllm
    except ImportError as e:
        print(json.dumps({"ok": False, "error": f"vLLM is not importable here ({e}); run in the venv `make vllm-venv` "
                                                "builds: .vllm/bin/python benchmarks/vllm_check.py DIR"}))
        sys.exit(2)
    major, minor = (int(x) for x in a.capability.split("."))
    result = {"vllm": vllm.__version__, **check(a.output, (major, minor), [int(t) for t in a.tp.split(",")])}
    text = json.dumps(result, indent=2)
    print(text)
    if a.json:
        a.json.write_text(text + "\n")
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
