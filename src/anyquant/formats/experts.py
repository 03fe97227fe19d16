"""Quantized fused MoE experts in a saved output: written, and rebuilt from the plan and the
checkpoint at load.

int4 family: where transformers splits the fused tensor in its checkpoints (Mixtral, Qwen3-MoE,
...), one compressed-tensors pack-quantized Linear per expert under the checkpoint's own names
(`write_per_expert_layout`): transformers' compressed-tensors loader merges them back into fused
float experts (symmetric schemes; it drops asymmetric zero points) and anyquant.load rebuilds the
Int4Experts. Otherwise, and for bitsandbytes, the QuantizedExperts' own tensors under the fused
name, which only anyquant.load reads; the plan and the model card say which
(planning/experts.py `stock_experts_refusal`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from anyquant import primitives as P
from anyquant.errors import AnyquantError
from anyquant.formats.hf import checkpoint_key_renamer
from anyquant.planning.experts import stock_experts_refusal
from anyquant.planning.plan import Decision, Plan
from anyquant.runtime.experts import (
    Bnb4Experts,
    Int4Experts,
    Int8Experts,
    QuantizedExperts,
    checkpoint_layout,
    checkpoint_name_patterns,
    install_experts,
)


def expert_shell(d: Decision, plan: Plan, dtype: torch.dtype, device=None) -> QuantizedExperts:
    """The empty QuantizedExperts that `plan`'s method saved for decision `d`."""
    transposed = bool(d.options.get("transposed"))
    n, out_f, in_f = (d.shape[0], d.shape[2], d.shape[1]) if transposed else d.shape
    if plan.method in ("nf4", "fp4"):
        q = Bnb4Experts(n, out_f, in_f, plan.method, int(plan.config["block_size"]), dtype, device)
    elif plan.method == "int8":
        q = Int8Experts(n, out_f, in_f, dtype, device)
    else:
        g = int(d.options.get("group_size", plan.config.get("group_size", 0)))
        q = Int4Experts(n, out_f, in_f, g, bool(plan.config.get("symmetric", False)), dtype, device)
    q.transposed = transposed
    return q


def install_expert_shells(model: nn.Module, plan: Plan, dtype: torch.dtype, directory: Path,
                          device=None) -> list[Decision]:
    """Every planned fused expert tensor of `model` replaced by an empty QuantizedExperts;
    returns those decisions."""
    todo = plan.experts_to_quantize()
    for d in todo:
        try:
            p = model.get_parameter(d.name)
        except AttributeError as e:
            raise AnyquantError(f"{directory}: the plan quantizes the fused experts {d.name}, which the rebuilt "
                                "model lacks") from e
        if list(p.shape) != list(d.shape):
            raise AnyquantError(f"{directory}: {d.name} is {list(p.shape)} in the rebuilt model, {d.shape} in the plan")
        install_experts(model, d.name, expert_shell(d, plan, dtype, device if device is not None else
                                                    (None if p.is_meta else p.device)))
    return todo


def bnb_stored_name(name: str) -> str:
    """The name a bitsandbytes output stores the quantized experts `name` under. An experts
    tensor named `weight` (JetMoE's `input_linear.weight`) would give keys such as
    `input_linear.weight.absmax`, which transformers' bitsandbytes loader takes for a Linear4bit's
    quantization state and fails to convert: those are stored as `...experts_weight.*`."""
    owner, _, attr = name.rpartition(".")
    return f"{owner}.experts_weight" if attr == "weight" and owner else ("experts_weight" if attr == "weight" else name)


def load_expert_tensors(model: nn.Module, directory: Path, todo: list[Decision]) -> None:
    """Fill the shells of `todo` (a bitsandbytes output's experts) from the checkpoint's tensors
    (keys through transformers' renamings)."""
    from safetensors import safe_open

    if not todo:
        return
    wanted = {f"{bnb_stored_name(d.name)}.{k}": t for d in todo
              for k, t in model.get_submodule(d.name).state_dict().items()}
    rename = checkpoint_key_renamer(model)
    found: set[str] = set()
    for f in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():
                name = key if key in wanted else rename(key)
                if name in wanted:
                    t = sf.get_tensor(key)
                    if tuple(t.shape) != tuple(wanted[name].shape):
                        raise AnyquantError(f"{directory}: {key} has shape {tuple(t.shape)} in the checkpoint, "
                                            f"{tuple(wanted[name].shape)} in the model")
                    wanted[name].copy_(t.to(wanted[name].dtype))
                    found.add(name)
    lacking = sorted(set(wanted) - found)
    if lacking:
        raise AnyquantError(f"{directory}: checkpoint lacks the quantized experts' tensors {lacking[:5]}")


def stock_refusal(plan: Plan) -> str | None:
    """Why stock transformers cannot load this plan's output, or None (planning/experts.py)."""
    return stock_experts_refusal(plan)


def per_expert_decisions(plan: Plan) -> list[Decision]:
    """The int4 experts this plan writes one Linear per expert (options["layout"])."""
    return [d for d in plan.experts_to_quantize() if d.options.get("layout") == "per_expert"]


def _split(q: Int4Experts, layout) -> dict[str, torch.Tensor]:
    """`q`'s tensors as compressed-tensors pack-quantized Linears, one per checkpoint module."""
    out: dict[str, torch.Tensor] = {}
    zeros = {}
    for base, e, rows in layout:
        out[f"{base}.weight_packed"] = q.weight_packed[e][rows].contiguous()
        out[f"{base}.weight_scale"] = q.weight_scale[e][rows].contiguous()
        out[f"{base}.weight_shape"] = torch.tensor([len(rows), q.in_features], dtype=torch.int64)
        if not q.symmetric:
            if e not in zeros:
                zeros[e] = P.unpack_int4(q.weight_zero_point[e], q.out_features, dim=0)
            out[f"{base}.weight_zero_point"] = P.pack_int4(zeros[e][rows].to(torch.int8), dim=0)
    return out


def write_experts(directory: Path, model: nn.Module, plan: Plan) -> None:
    """Add a saved output's quantized experts to its safetensors files (save_pretrained wrote
    everything else: formats/io.py leaves them out, so transformers' reverse weight conversion
    never touches their packed tensors). int4 experts whose tensor transformers splits in its
    checkpoints: one compressed-tensors pack-quantized Linear per expert under the checkpoint's
    own names, which transformers' compressed-tensors loader merges back into fused experts
    (dequantized) and vLLM reads, with a target in the config's quantization group; the others:
    the QuantizedExperts' own tensors under the fused parameter's name."""
    from safetensors.torch import load_file, save_file

    todo = plan.experts_to_quantize()
    if not todo:
        return
    directory = Path(directory)
    split = {d.name for d in per_expert_decisions(plan)}
    added: dict[str, torch.Tensor] = {}
    targets: dict[int, set[str]] = {}
    for d in todo:
        q = model.get_submodule(d.name)
        q = q.cpu() if q.device.type != "cpu" else q
        if d.name not in split:
            stored = bnb_stored_name(d.name) if plan.method in ("nf4", "fp4", "int8") else d.name
            added.update({f"{stored}.{k}": t.contiguous() for k, t in q.state_dict().items()})
            continue
        layout = checkpoint_layout(model, d.name, list(q.shape))
        if layout is None:
            raise AnyquantError(f"{d.name}: the plan writes it one Linear per expert, but transformers no longer "
                                "splits it; plan again")
        added.update(_split(q, layout))
        g = int(d.options.get("group_size", plan.config.get("group_size")))
        targets.setdefault(g, set()).update(f"re:^{p}$" for p in checkpoint_name_patterns(layout))
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise AnyquantError(f"{directory}: no *.safetensors files to add the quantized experts to")
    last = files[-1]
    tensors = load_file(str(last))
    tensors.update(added)
    save_file(tensors, str(last), metadata={"format": "pt"})
    index_path = directory / "model.safetensors.index.json"
    if index_path.is_file():
        index = json.loads(index_path.read_text())
        index["weight_map"].update(dict.fromkeys(added, last.name))
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    if not targets:
        return
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    groups = config["quantization_config"]["config_groups"]
    for g, pats in targets.items():
        group = next((v for v in groups.values() if v["weights"].get("group_size") == g), None)
        if group is None:  # no Linear quantized at this group size: the experts' own group
            group = groups[f"group_{len(groups)}"] = {
                "targets": [], "input_activations": None, "output_activations": None,
                "weights": {"num_bits": 4, "type": "int", "symmetric": bool(plan.config.get("symmetric", False)),
                            "strategy": "group", "group_size": g, "dynamic": False, "observer": "minmax"}}
        group["targets"] = list(group["targets"]) + sorted(pats)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_per_expert_layout(model: nn.Module, directory: Path, plan: Plan) -> set[str]:
    """Fill the Int4Experts shells of `plan`'s per-expert experts from the checkpoint's
    one-Linear-per-expert tensors; returns the checkpoint keys it read."""
    from safetensors import safe_open

    todo = per_expert_decisions(plan)
    if not todo:
        return set()
    wanted: dict[str, tuple[Int4Experts, int, torch.Tensor, str]] = {}
    for d in todo:
        q = model.get_submodule(d.name)
        layout = checkpoint_layout(model, d.name, list(q.shape))
        if layout is None:
            raise AnyquantError(f"{directory}: cannot map {d.name} onto its per-expert checkpoint names with this "
                                "transformers version")
        for base, e, rows in layout:
            for part in ("weight_packed", "weight_scale", "weight_shape") + (() if q.symmetric else
                                                                             ("weight_zero_point",)):
                wanted[f"{base}.{part}"] = (q, e, rows, part)
    zeros: dict[tuple[int, int], torch.Tensor] = {}
    found: set[str] = set()
    for f in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():
                if key not in wanted:
                    continue
                q, e, rows, part = wanted[key]
                t = sf.get_tensor(key).to(q.weight_packed.device)
                if part == "weight_shape":
                    if t.tolist() != [len(rows), q.in_features]:
                        raise AnyquantError(f"{directory}: {key} is {t.tolist()}, the plan's experts need "
                                            f"{[len(rows), q.in_features]}")
                elif part == "weight_zero_point":
                    z = zeros.setdefault((id(q), e), torch.zeros(q.out_features, q.weight_scale.shape[-1],
                                                                 dtype=torch.int8, device=t.device))
                    z[rows] = P.unpack_int4(t, len(rows), dim=0)
                else:
                    getattr(q, part)[e][rows] = t.to(getattr(q, part).dtype)
                found.add(key)
    lacking = sorted(set(wanted) - found)
    if lacking:
        raise AnyquantError(f"{directory}: checkpoint lacks the quantized experts' tensors {lacking[:5]}")
    by_id = {id(model.get_submodule(d.name)): model.get_submodule(d.name) for d in todo}
    for (qid, e), z in zeros.items():
        by_id[qid].weight_zero_point[e] = P.pack_int4(z, dim=0)
    return found
