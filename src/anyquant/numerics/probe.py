"""Probe forward: which parameters are read outside the forward of the module that owns them (F2).

One forward on small inputs runs under a `TorchFunctionMode` that sees every torch function
call, while forward pre/post hooks on every module keep the stack of running modules. A
parameter passed to a torch function while none of its owner modules is on that stack is read
"outside its module's forward" — e.g. `nn.MultiheadAttention` hands `out_proj.weight` to
`F.multi_head_attention_forward`, a block multiplies a router's weight itself, an output head
is `x @ embedding.weight.t()`. Replacing such a Linear by a quantized module breaks the reader
(dtype errors, or silently wrong numbers), so the plan keeps it in float.

No names decide this: only tensor identity and the running-module stack.
"""

from __future__ import annotations

import inspect
import logging
import weakref
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from anyquant.errors import AnyquantError
from anyquant.model.modelmap import cfg_get, sub_config
from anyquant.model.tree import fused_expert_tensors, logits_of

log = logging.getLogger(__name__)

# Only these calls are ignored. Metadata reads count as reads: after quantization
# `x.to(self.fc.weight.dtype)` would cast to int8/uint8, `.shape` is the packed shape, and
# anyquant's int4 module has no `.weight` at all.
_IGNORED = {"__repr__", "__format__", "requires_grad_"}


@dataclass
class ProbeFacts:
    """What the probe forward saw. `outside_reads`: module name -> names of the modules that were
    running when its weights were read (\"\" is the model's own top-level forward)."""

    outside_reads: dict[str, list[str]] = field(default_factory=dict)
    root_type: str = ""
    ran: bool = False
    # modules whose forward ran in the probe (empty: not recorded)
    called: set[str] = field(default_factory=set)
    # absmax of each called module's first floating input over the probe forward (the quality
    # guard's activation ranges: planning/rules.py rule_outlier_input)
    input_absmax: dict[str, float] = field(default_factory=dict)
    # module name -> its own parameters (weight, bias, ...) that were read outside its forward
    read_params: dict[str, list[str]] = field(default_factory=dict)
    # a VLM whose forward with images failed: why (the image path was not probed); "" otherwise
    image_failure: str = ""
    # fused MoE expert tensor -> how its forward multiplied it: "out_in" (F.linear(x, W[e]),
    # W[e] @ x) or "in_out" (x @ W[e], torch.bmm(x, W)); tensors not seen multiplied are absent
    expert_layouts: dict[str, str] = field(default_factory=dict)
    # the probe forward's output as float32 logits (model/tree.py probe_logits), None where it had
    # none: a model the probe leaves as it was needs no second forward for them (planning/prepare.py
    # apply_policy; a streamed model reads its whole checkpoint once per forward)
    logits: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def reader_text(self, module_name: str) -> str:
        readers = self.outside_reads.get(module_name, [])
        return ", ".join(r if r else f"{self.root_type} (top-level forward)" for r in readers)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"outside_reads": self.outside_reads, "ran": self.ran}
        if self.image_failure:
            out["image_path_not_probed"] = self.image_failure
        return out


# Ops whose result keeps the last two dimensions of a tracked expert tensor in place (an expert
# picked, a copy, a cast, a reshape that leaves [out, in] alone) ...
_KEEPS_LAST_TWO = {"__getitem__", "select", "narrow", "index_select", "view", "reshape", "expand", "contiguous",
                   "to", "float", "half", "bfloat16", "clone", "detach", "type_as", "unsqueeze", "squeeze",
                   "flatten", "unflatten", "repeat"}
# ... and the matrix products that consume one: for each, (operand position, layout of the
# operand as it is multiplied: "out_in" for a weight whose rows are outputs)
_CONSUMERS = {"linear": ((1, "out_in"),), "matmul": ((0, "out_in"), (1, "in_out")),
              "__matmul__": ((0, "out_in"), (1, "in_out")), "__rmatmul__": ((0, "in_out"), (1, "out_in")),
              "bmm": ((0, "out_in"), (1, "in_out")), "mm": ((0, "out_in"), (1, "in_out")),
              "baddbmm": ((2, "in_out"),), "addmm": ((2, "in_out"),), "addbmm": ((2, "in_out"),)}
_FLIPPED = {"out_in": "in_out", "in_out": "out_in"}


class _ExpertLayouts:
    """How each fused expert tensor is multiplied in the forward, followed through the views
    taken of it: an expert picked (`W[e]`), transposed (`.transpose(1, 2)`, `.t()`, `.mT`) or
    reshaped, up to the F.linear / matmul / bmm that consumes it. That decides which of its last
    two dimensions is the input one, for classes that do not declare it (`is_transposed`)."""

    def __init__(self, tensors: dict[int, tuple[str, torch.Tensor]]):
        # id -> (parameter name, weak reference to the tensor, flipped relative to the parameter);
        # weak, so that a copy (`.float()` of a whole expert tensor) is not kept alive by the
        # probe, and checked, so that a reused id is not mistaken for a tracked tensor
        self.tracked: dict[int, tuple[str, weakref.ref, bool]] = {
            i: (n, weakref.ref(t), False) for i, (n, t) in tensors.items()}
        self.layouts: dict[str, str] = {}

    def _get(self, x) -> tuple[str, weakref.ref, bool] | None:
        hit = self.tracked.get(id(x)) if isinstance(x, torch.Tensor) else None
        return hit if hit is not None and hit[1]() is x else None

    def observe(self, func, args, kwargs, result) -> None:
        if not self.tracked or not args:
            return
        name = getattr(func, "__name__", "")
        src = self._get(args[0])
        if src is not None and isinstance(result, torch.Tensor) and result.dim() >= 2:
            flip = self._flip(func, name, args, args[0], result)
            if flip is not None and len(self.tracked) < 4096:
                self.tracked[id(result)] = (src[0], weakref.ref(result), src[2] ^ flip)
        for pos, layout in _CONSUMERS.get(name, ()):
            operand = args[pos] if pos < len(args) else (kwargs.get("weight") if name == "linear" else None)
            hit = self._get(operand)
            if hit is not None and hit[0] not in self.layouts:
                self.layouts[hit[0]] = _FLIPPED[layout] if hit[2] else layout

    @staticmethod
    def _flip(func, name: str, args, src: torch.Tensor, result: torch.Tensor) -> bool | None:
        n = src.dim()
        if name == "__get__":  # .T, .mT, .H, .mH
            return True
        if name == "t":
            return True
        if name in ("transpose", "swapaxes", "swapdims") and len(args) >= 3:
            a, b = (int(args[1]) % n, int(args[2]) % n)
            if {a, b} == {n - 2, n - 1}:
                return True
            return False if a < n - 2 and b < n - 2 else None
        if name == "permute":
            dims = list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else list(args[1:])
            last = [int(d) % n for d in dims[-2:]]
            return {(n - 2, n - 1): False, (n - 1, n - 2): True}.get(tuple(last))
        if name in _KEEPS_LAST_TWO and tuple(result.shape[-2:]) == tuple(src.shape[-2:]):
            return False
        return None


class _WeightReadMode(TorchFunctionMode):
    def __init__(self, owners: dict[int, list[str]], stack: list[str], reads: dict[str, set[str]],
                 pnames: dict[int, str] | None = None, params: dict[str, set[str]] | None = None,
                 layouts: _ExpertLayouts | None = None):
        super().__init__()
        self.owners, self.stack, self.reads = owners, stack, reads
        self.pnames = pnames if pnames is not None else {}
        self.params = params if params is not None else defaultdict(set)
        self.layouts = layouts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") not in _IGNORED:
            flat, _ = tree_flatten((args, kwargs))
            running = set(self.stack)
            for t in flat:
                if isinstance(t, nn.Parameter):
                    names = self.owners.get(id(t))
                    if names and not running.intersection(names):
                        reader = self.stack[-1] if self.stack else ""
                        for n in names:
                            self.reads[n].add(reader)
                            self.params[n].add(self.pnames.get(id(t), "?"))
        result = func(*args, **kwargs)
        if self.layouts is not None:
            self.layouts.observe(func, args, kwargs, result)
        return result


@torch.no_grad()
def probe_weight_reads(model: nn.Module, inputs: dict[str, Any]) -> ProbeFacts:
    """Run `model(**inputs)` once and record every parameter read outside its owner's forward."""
    owners: dict[int, list[str]] = defaultdict(list)
    pnames: dict[int, str] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        for pname, p in mod.named_parameters(recurse=False):
            if mname not in owners[id(p)]:
                owners[id(p)].append(mname)
            pnames.setdefault(id(p), pname)
    stack: list[str] = []
    reads: dict[str, set[str]] = defaultdict(set)
    called: set[str] = set()
    absmax: dict[str, float] = {}
    handles = []

    def pre(name):
        def hook(module, args):
            stack.append(name)
            called.add(name)
            x = next((a for a in args if isinstance(a, torch.Tensor)), None)
            if x is not None and x.is_floating_point() and x.numel() and x.device.type != "meta":
                v = float(x.detach().abs().max())
                absmax[name] = max(absmax.get(name, v), v)
        return hook

    def post(name):
        def hook(module, args, output):
            # always_call: pops on exceptions too; a module called re-entrantly pops its own entry
            if stack and stack[-1] == name:
                stack.pop()
            elif name in stack:
                del stack[len(stack) - 1 - stack[::-1].index(name)]
        return hook

    for name, mod in model.named_modules():
        handles.append(mod.register_forward_pre_hook(pre(name)))
        handles.append(mod.register_forward_hook(post(name), always_call=True))
    was_training = model.training
    model.eval()
    fused = fused_expert_tensors(model)
    layouts = _ExpertLayouts({id(p): (n, p) for n, p in model.named_parameters() if n in fused})
    try:
        params: dict[str, set[str]] = defaultdict(set)
        with _WeightReadMode(owners, stack, reads, pnames, params, layouts):
            output = model(**inputs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    facts = ProbeFacts(
        outside_reads={k: sorted(v) for k, v in sorted(reads.items())},
        root_type=type(model).__name__,
        ran=True,
        called=called,
        input_absmax=absmax,
        read_params={k: sorted(v) for k, v in sorted(params.items())},
        expert_layouts=dict(sorted(layouts.layouts.items())),
    )
    logits = logits_of(output)
    if torch.is_tensor(logits) and logits.is_floating_point():
        facts.logits = logits.float()
    for k in facts.outside_reads:
        log.info("probe: weight of %s read outside its forward by %s", k, facts.reader_text(k))
    return facts


@dataclass
class VisionInputSpec:
    """What a model's config and forward say about its image input: the vision sub-config, the
    channels and square size of `pixel_values` (size None where the config gives none, e.g.
    Qwen2-VL's patch-sequence inputs), and the model's float dtype and device."""

    vision_config: Any
    channels: int
    size: int | None
    dtype: torch.dtype
    device: torch.device


def vision_input_spec(model: nn.Module) -> VisionInputSpec | None:
    """The VisionInputSpec of a model whose config has a vision sub-config and whose forward
    takes `pixel_values`; None otherwise. Shared by the probe and the image calibration data."""
    vcfg = sub_config(getattr(model, "config", None), ("vision", "visual"))
    if vcfg is None:
        return None
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    if "pixel_values" not in params:
        return None
    size = cfg_get(vcfg, "image_size", "img_size")
    if isinstance(size, (list, tuple)):
        size = size[0]
    channels = cfg_get(vcfg, "num_channels", "in_channels", "in_chans") or 3
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    dtype = p.dtype if p is not None else torch.float32
    device = p.device if p is not None else torch.device("cpu")
    return VisionInputSpec(vcfg, int(channels), int(size) if size else None, dtype, device)


def vision_probe_inputs(model: nn.Module, generator: torch.Generator, batch: int = 1) -> dict[str, torch.Tensor]:
    """pixel_values for a model whose config has a vision sub-config and whose forward takes
    them: (batch, channels, size, size) from the vision config, in the model's float dtype."""
    spec = vision_input_spec(model)
    if spec is None:
        return {}
    size = spec.size or 224
    x = torch.randn(batch, spec.channels, size, size, generator=generator)
    return {"pixel_values": x.to(device=spec.device, dtype=spec.dtype)}


# The forward arguments that carry an image: pixel_values for nearly every VLM; patch rows
# under their own name for models that embed patches themselves (Fuyu: image_patches,
# Pix2Struct / Kosmos-2.5: flattened_patches).
IMAGE_INPUT_KEYS = ("pixel_values", "image_patches", "flattened_patches")


def takes_images(model: nn.Module) -> bool:
    """The forward takes an image argument and the config describes something to embed it with
    (a vision sub-config, or patch sizes on the config itself as in Fuyu). A VLM type built
    without a vision tower (a config whose vision_config is None) is a text model here."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    cfg = getattr(model, "config", None)
    return any(k in params for k in IMAGE_INPUT_KEYS) and (
        sub_config(cfg, ("vision", "visual")) is not None or cfg_get(cfg, "patch_size") is not None)


def has_image_input(inputs: dict[str, Any]) -> bool:
    return any(k in inputs for k in IMAGE_INPUT_KEYS)


def run_probe(model: nn.Module, inputs: dict[str, Any], image_note: str = "", facts: ProbeFacts | None = None
              ) -> tuple[ProbeFacts, dict[str, Any], list[str]]:
    """probe_weight_reads with one documented fallback: if the forward with images fails (many
    VLMs need image placeholder tokens the synthetic ids lack), probe text-only and say so.
    A model that takes images probed without any (no image input could be built) is recorded
    the same way: `image_failure` says why (`image_note`: what building them said), and the plan
    keeps its image path in float. Returns (facts, the inputs that ran, notes). `facts`: what a
    forward of the same model on `inputs` already recorded (it is not run again)."""
    if takes_images(model) and not has_image_input(inputs):
        try:
            facts = facts if facts is not None else probe_weight_reads(model, inputs)
        except Exception as e:  # noqa: BLE001 — as below
            raise AnyquantError(
                f"probe forward of {type(model).__name__} failed ({type(e).__name__}: {e}) on ids without an image "
                f"({image_note[:300] or 'no image input could be built from the config'})"
            ) from e
        facts.image_failure = image_note or "no image input could be built from the config"
        note = (f"probe forward without images ({facts.image_failure[:200]}): weights read only on the image "
                "path were not checked (the vision tower and projector stay in float)")
        log.warning(note)
        return facts, inputs, [note]
    try:
        return (facts if facts is not None else probe_weight_reads(model, inputs)), inputs, []
    except Exception as e:  # noqa: BLE001 — any failure of user/remote code; reported, not hidden
        if not has_image_input(inputs):
            raise AnyquantError(
                f"probe forward of {type(model).__name__} failed ({type(e).__name__}: {e}); "
                "the planner needs one forward to find weights read outside their module"
            ) from e
        # ids (and their mask) only: grids, sizes and modality ids describe images no longer there
        text_only = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
        note = (f"probe forward with images failed ({type(e).__name__}: {str(e)[:200]}); probed text-only: "
                "weights read only on the image path were not checked (the vision tower and projector "
                "stay in float by default)")
        log.warning(note)
        try:
            facts = probe_weight_reads(model, text_only)
            facts.image_failure = f"{type(e).__name__}: {str(e)[:200]}" + (
                f" (building image inputs from the config: {image_note[:400]})" if image_note else "")
            return facts, text_only, [note]
        except Exception as e2:  # noqa: BLE001
            raise AnyquantError(
                f"probe forward of {type(model).__name__} failed ({type(e2).__name__}: {e2})"
            ) from e2
