"""A source model whose weights stay on disk until they are needed (quantizing models larger
than memory, `anyquant quantize --stream`).

    lazy = LazyModel.open(path, device)     # skeleton on the meta device, tensors mapped to their files
    lazy.model(**inputs)                    # runs: each unit materialised when its forward starts
    with lazy.held(unit): ...               # a unit materialised for as long as the caller needs it

A *unit* is one repeated block (a child of an nn.ModuleList: a decoder layer, a vision layer)
or, outside the blocks, one module's own parameters and persistent buffers (an embedding, a
norm, the head). Forward hooks materialise a unit when its forward starts and return it to the
meta device once another unit needs the room, so any whole-model forward (the probes, the
dtype policy, calibration's capture of the first block's inputs) runs with one block resident.
Parameters shared by two units (tied embeddings) are held for the whole of a model forward.

Materialising swaps each meta parameter's contents for the real tensor (torch.utils.swap_tensors)
rather than putting a new Parameter in place: the probes key parameters by identity, and a
dtype cast of the skeleton (`model.to(dtype)`, a float32 region's `.float()`) is recorded on the
meta parameter, so a tensor read later gets the dtype the in-memory path would hold then, through
the same casts (`through`: a float32 region of a 16-bit model went through the 16-bit dtype first).

The files are read with direct.read_tensors (plain reads, no memory map: a mapped file's pages
count as the process's memory for as long as the map is open).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils import swap_tensors

from anyquant.errors import AnyquantError
from anyquant.formats import direct
from anyquant.formats.hf import classes_for_config
from anyquant.numerics.dtype import DTYPES

log = logging.getLogger(__name__)


@dataclass
class Unit:
    """What is materialised together: `params` (full name -> the model's Parameter) and the
    persistent buffers `buffers` (full name -> owning module, leaf name) of one block or module."""

    name: str
    module: nn.Module
    block: bool
    params: dict[str, nn.Parameter] = field(default_factory=dict)
    buffers: dict[str, tuple[nn.Module, str]] = field(default_factory=dict)
    holds: int = 0          # callers holding it (held(), a running forward)


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a model directory: those its index names, else every *.safetensors."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise AnyquantError(f"{path}: no *.safetensors files; streamed quantization reads safetensors only "
                            "(convert the checkpoint, e.g. load it and save_pretrained(safe_serialization=True), "
                            "or quantize without --stream)")
    return files


def load_dtype(config, files: list[Path]) -> torch.dtype:
    """The dtype transformers' from_pretrained(dtype="auto") gives the model: config.dtype, else
    the first floating tensor's in the checkpoint, else float32."""
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(declared, torch.dtype):
        return declared
    if isinstance(declared, str) and declared in DTYPES:
        return DTYPES[declared]
    for f in files:
        header, _ = direct.read_header(f)
        for info in header.values():
            dt = direct.ST_DTYPES.get(info["dtype"])
            if dt is not None and dt.is_floating_point:
                return dt
    return torch.float32


def skeleton(config, dtype: torch.dtype, trust_remote_code: bool) -> nn.Module:
    """The model of `config` with its parameters on the meta device (buffers real)."""
    last: Exception | None = None
    for cls in classes_for_config(config):
        try:
            with direct.parameters_on_meta():
                if hasattr(cls, "_from_config"):
                    return cls._from_config(config, dtype=dtype)
                return cls.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        except ValueError as e:  # this auto class does not know the config type
            last = e
    raise AnyquantError(f"cannot build a model for config type {config.model_type}: {last}")


def checkpoint_map(model: nn.Module, files: list[Path], directory: Path) -> dict[str, tuple[Path, str, str]]:
    """Model tensor name -> (file, checkpoint key, safetensors dtype), through transformers'
    renamings of checkpoint keys. A model whose load-time conversions merge or split tensors
    (fused MoE experts, ...) cannot be read tensor by tensor: refused, naming the fix."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    conversions = get_model_conversion_mapping(model)
    renamings = [t for t in conversions if isinstance(t, WeightRenaming)]
    if len(renamings) != len(conversions):
        raise AnyquantError(f"{directory}: transformers merges or splits this model's tensors at load "
                            f"({type(model).__name__}); streamed quantization reads one tensor at a time and cannot "
                            "follow that: quantize it without --stream")
    state = model.state_dict(keep_vars=True)
    meta = dict.fromkeys(state, True)
    prefix = getattr(model, "base_model_prefix", None) or None
    out: dict[str, tuple[Path, str, str]] = {}
    for f in files:
        header, _ = direct.read_header(f)
        for key, info in header.items():
            name = key if key in state else rename_source_key(key, renamings, [], prefix, meta)[0]
            if name not in state:
                raise AnyquantError(f"{f}: checkpoint tensor {key} has no place in {type(model).__name__} "
                                    "(built from config.json); quantize it without --stream")
            out[name] = (f, key, info["dtype"])
    # the renamings this checkpoint's keys went through, as from_pretrained records them: the
    # output's keys are reverted through these alone (all of the type's mappings would add a
    # prefix the checkpoint never had: `language_model.model.model.` for a Llava)
    model._weight_conversions = [t for t in conversions if t.was_used()]
    return out


class LazyModel:
    """The skeleton, where each of its tensors lives on disk, and the hooks that bring units in."""

    def __init__(self, model: nn.Module, tensors: dict[str, tuple[Path, str, str]], device: torch.device,
                 directory: Path):
        self.model = model
        self.tensors = tensors
        self.device = torch.device(device)
        self.directory = directory
        self.through: dict[str, torch.dtype] = {}   # param name -> a dtype its value passed through first
        self.exact: set[str] = set()                # params read as stored (float32 values the policy restores)
        self.initial = {n: p.dtype for n, p in model.named_parameters()}
        self.checked: set[str] = set()              # names whose values were checked finite
        self.units, self.resident = self._units()
        self._running: list[Unit] = []
        self._hook_held: list[Unit] = []
        # units outside the blocks that the hooks read stay until this is switched off (see
        # keeping_outside_blocks)
        self._keep_outside_blocks = False
        self._kept_block: Unit | None = None
        self._in_forward = False
        self._handles: list = []
        self.reads = 0                              # bytes read from the source (for the report)
        missing = [n for u in self.units for n in u.params if n not in self.tensors and n not in self._tied_to]
        if missing:
            raise AnyquantError(f"{directory}: checkpoint lacks tensors {missing[:5]}")
        self._load_buffers()
        model.anyquant_device = self.device          # model.tree.device_of: where inputs go
        self._install()

    # ------------------------------------------------------------------ construction

    @classmethod
    def open(cls, path: Path, device: torch.device | str, *, trust_remote_code: bool = False) -> LazyModel:
        from transformers import AutoConfig

        path = Path(path)
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        files = weight_files(path)
        model = skeleton(config, load_dtype(config, files), trust_remote_code)
        model.eval()
        return cls(model, checkpoint_map(model, files, path), torch.device(device), path)

    def _units(self) -> tuple[list[Unit], list[str]]:
        model = self.model
        blocks: list[tuple[str, nn.Module]] = []
        taken: set[str] = set()
        for name, mod in model.named_modules():
            if isinstance(mod, nn.ModuleList) and not any(name.startswith(t + ".") for t in taken):
                kids = [(f"{name}.{i}", c) for i, c in enumerate(mod) if any(True for _ in c.parameters())]
                if kids:
                    blocks += kids
                    taken.add(name)
        units: list[Unit] = []
        owner_of: dict[int, list[Unit]] = defaultdict(list)
        inside: set[str] = set()
        for bname, mod in blocks:
            u = Unit(bname, mod, True)
            for n, p in mod.named_parameters(remove_duplicate=False):
                u.params[f"{bname}.{n}"] = p
            for mname, m in mod.named_modules():
                for bn, _ in m.named_buffers(recurse=False):
                    if bn not in m._non_persistent_buffers_set:
                        full = f"{bname}.{mname}.{bn}" if mname else f"{bname}.{bn}"
                        u.buffers[full] = (m, bn)
            units.append(u)
            inside.update([bname] + [f"{bname}.{m}" for m, _ in mod.named_modules() if m])
        for name, mod in model.named_modules(remove_duplicate=False):
            if name in inside or any(name.startswith(b + ".") for b, _ in blocks):
                continue
            u = Unit(name, mod, False)
            for n, p in mod.named_parameters(recurse=False):
                u.params[f"{name}.{n}" if name else n] = p
            for bn, _ in mod.named_buffers(recurse=False):
                if bn not in mod._non_persistent_buffers_set:
                    u.buffers[f"{name}.{bn}" if name else bn] = (mod, bn)
            if u.params or u.buffers:
                units.append(u)
        for u in units:
            for p in u.params.values():
                if u not in owner_of[id(p)]:
                    owner_of[id(p)].append(u)
        # a parameter shared by two units (tied embeddings): one object, read once, under the
        # name the checkpoint stores it by
        self._tied_to: dict[str, str] = {}
        names_of: dict[int, list[str]] = defaultdict(list)
        for u in units:
            for n, p in u.params.items():
                names_of[id(p)].append(n)
        resident: list[str] = []
        for pid, names in names_of.items():
            if len(names) > 1:
                stored = [n for n in names if n in self.tensors]
                if not stored:
                    raise AnyquantError(f"{self.directory}: tied parameters {names} are in no checkpoint file")
                for n in names:
                    if n != stored[0]:
                        self._tied_to[n] = stored[0]
                if len(owner_of[pid]) > 1:
                    resident.append(stored[0])
        return units, resident

    def _load_buffers(self) -> None:
        """Persistent buffers the checkpoint stores (construction made the others): small, read now."""
        wanted: dict[Path, dict[str, tuple]] = defaultdict(dict)
        where: dict[str, tuple[nn.Module, str]] = {}
        for u in self.units:
            for n, (mod, leaf) in u.buffers.items():
                if n in self.tensors:
                    f, key, st = self.tensors[n]
                    b = mod._buffers[leaf]
                    wanted[f][key] = (n, torch.device("cpu"), b.dtype if b is not None else direct.ST_DTYPES[st])
                    where[n] = (mod, leaf)
        for f, keys in wanted.items():
            direct.read_tensors(f, keys, lambda n, t: where[n][0]._buffers.__setitem__(where[n][1], t))
        for mod in self.model.modules():
            for k, b in list(mod._buffers.items()):
                if b is not None and b.device != self.device:
                    mod._buffers[k] = b.to(self.device)

    # ------------------------------------------------------------------ materialise / release

    def _value(self, name: str, raw: torch.Tensor, now: torch.dtype) -> torch.Tensor:
        if name not in self.checked and raw.is_floating_point():
            if not torch.isfinite(raw).all():
                bad = int((~torch.isfinite(raw)).sum())
                raise AnyquantError(f"tensor {name} holds {bad} NaN/inf value(s); the source model is broken — "
                                    "fix or re-export its weights before quantizing")
            self.checked.add(name)
        if not raw.is_floating_point():
            return raw
        if name in self.exact and now == torch.float32:
            return raw.to(now)
        t = raw.to(self.initial.get(name, raw.dtype))   # what from_pretrained(dtype="auto") held
        if name in self.through:
            t = t.to(self.through[name])
        return t.to(now)

    def materialise(self, params: dict[str, nn.Parameter]) -> None:
        # Unseen by torch-function modes: the weight-read probe (numerics/probe.py) would take
        # bringing a weight in for code reading it outside its module's forward.
        with torch._C.DisableTorchFunction():
            self._materialise(params)

    def _materialise(self, params: dict[str, nn.Parameter]) -> None:
        todo: dict[Path, dict[str, tuple]] = defaultdict(dict)
        targets: dict[str, nn.Parameter] = {}
        for n, p in params.items():
            if not p.is_meta:
                continue
            stored = self._tied_to.get(n, n)
            f, key, st = self.tensors[stored]
            todo[f][key] = (n, self.device, direct.ST_DTYPES.get(st, torch.float32))
            targets[n] = p

        def sink(n: str, raw: torch.Tensor) -> None:
            p = targets[n]
            if not p.is_meta:   # a tied parameter reached under its other name
                return
            self.reads += raw.numel() * raw.element_size()
            t = self._value(self._tied_to.get(n, n), raw, p.dtype)
            swap_tensors(p, nn.Parameter(t, requires_grad=p.requires_grad))

        for f, keys in todo.items():
            direct.read_tensors(f, keys, sink)

    @staticmethod
    def release(params: dict[str, nn.Parameter]) -> None:
        with torch._C.DisableTorchFunction():   # as in materialise
            for p in params.values():
                if not p.is_meta:
                    swap_tensors(p, nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                                 requires_grad=p.requires_grad))

    def acquire(self, unit: Unit) -> None:
        if unit.holds == 0:
            self.materialise(unit.params)
        unit.holds += 1

    def drop(self, unit: Unit) -> None:
        unit.holds -= 1
        if unit.holds == 0:
            # a tied parameter stays while a model forward runs or another unit holding it is held
            others = {id(p) for u in self.units if u.holds > 0 for p in u.params.values()}
            self.release({n: p for n, p in unit.params.items() if id(p) not in others
                          and not (self._in_forward and n in self.resident_names)})

    @property
    def resident_names(self) -> set[str]:
        return set(self.resident) | {n for n, s in self._tied_to.items() if s in self.resident}

    def held(self, unit: Unit):
        """Context: `unit` materialised throughout."""
        lazy = self

        class _Held:
            def __enter__(self):
                lazy._release_hook_held(keep=(unit,))   # what a forward outside the model's left in
                lazy.acquire(unit)
                return unit

            def __exit__(self, *exc):
                lazy.drop(unit)
                return False

        return _Held()

    def unit(self, name: str) -> Unit:
        for u in self.units:
            if u.name == name:
                return u
        raise KeyError(name)

    # ------------------------------------------------------------------ hooks

    def _install(self) -> None:
        resident = {n: p for u in self.units for n, p in u.params.items() if n in self.resident_names}

        def root_pre(mod, args, kwargs):
            if not self._in_forward:
                self._in_forward = True
                self.materialise(resident)
            return None

        def root_post(mod, args, kwargs, out):
            # (also after an exception: a pre-hook that stops the forward, calibration's capture
            # of the first block's inputs, leaves its block on the running stack)
            if self._in_forward:
                self._running.clear()
                self._in_forward = False
                self._release_hook_held(keep=())
                held = {id(p) for u in self.units if u.holds > 0 for p in u.params.values()}
                self.release({n: p for n, p in resident.items() if id(p) not in held})
            return None

        for u in self.units:
            self._handles.append(u.module.register_forward_pre_hook(self._pre(u), prepend=True))
            self._handles.append(u.module.register_forward_hook(self._post(u), always_call=True))
        self._handles.append(self.model.register_forward_pre_hook(root_pre, with_kwargs=True, prepend=True))
        self._handles.append(self.model.register_forward_hook(root_post, with_kwargs=True, always_call=True))

    @contextlib.contextmanager
    def keeping_outside_blocks(self):
        """Context: units outside the blocks that forwards read (the embedding), and the first
        block they reach, stay read across forwards instead of being returned after each.
        Calibration captures the first block's inputs with one forward per batch that stops at
        that block; each would read the embedding (1 GB for a Llama-3-8B) and the block again.
        Later blocks still come and go one at a time. `stop_keeping` ends it early."""
        self._keep_outside_blocks = True
        try:
            yield
        finally:
            self.stop_keeping()

    def stop_keeping(self) -> None:
        if self._keep_outside_blocks:
            self._keep_outside_blocks = False
            self._kept_block = None
            self._release_hook_held(keep=tuple(self._running))

    def _kept(self, u: Unit) -> bool:
        return self._keep_outside_blocks and (not u.block or u is self._kept_block)

    def _release_hook_held(self, keep) -> None:
        for u in list(self._hook_held):
            if u in keep or u in self._running or self._kept(u):
                continue
            self._hook_held.remove(u)
            self.drop(u)

    def _pre(self, unit: Unit):
        def hook(mod, args):
            # the unit before it is returned to meta only now, not in its own post-hook: hooks
            # registered after these (the probes') still read its weights when it returns
            self._release_hook_held(keep=(unit,))
            if unit not in self._hook_held:
                self.acquire(unit)
                self._hook_held.append(unit)
                if self._keep_outside_blocks and unit.block and self._kept_block is None:
                    self._kept_block = unit
            self._running.append(unit)
            return None
        return hook

    def _post(self, unit: Unit):
        def hook(mod, args, out):
            if unit in self._running:
                del self._running[len(self._running) - 1 - self._running[::-1].index(unit)]
            return None
        return hook

    def release_all(self) -> None:
        self._release_hook_held(keep=())

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
