"""A model's decoder blocks and what the calibration loop does with one: find the block list
from the module tree, capture the first block's inputs, run a block on captured inputs, compare
outputs, find which planned Linears read the same input (probe_block)."""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from anyquant.calib.memory import available_memory_bytes
from anyquant.errors import AnyquantError
from anyquant.model.tree import device_of

Batch = tuple[tuple, dict]  # (args, kwargs) of one block call


class _Stop(Exception):
    pass


# --------------------------------------------------------------------------- discovery


def find_blocks(model: nn.Module, prefer: list[str] | None = None) -> tuple[str, nn.ModuleList]:
    """The longest nn.ModuleList of identically typed modules: the decoder blocks. With
    `prefer` (module names: the plan's language-model linears), only lists holding at least one
    of them compete, so a VLM's vision encoder layers are never taken for the decoder; if no
    list holds one, the longest list overall.

    Hybrid stacks (Jamba's attention + Mamba layers, StripedHyena's attention + Hyena blocks)
    hold children of different types: such a heterogeneous ModuleList is the decoder too when it
    holds the planned linears (`prefer`) and no identically typed list does; each of its blocks
    is calibrated on what the block before it returned."""
    cands: list[tuple[str, nn.ModuleList]] = []
    mixed: list[tuple[str, nn.ModuleList]] = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            (cands if len({type(c) for c in mod}) == 1 else mixed).append((name, mod))

    def holding(lists):
        return [(n, m) for n, m in lists if any(p.startswith(f"{n}." if n else "") for p in prefer)]

    if prefer:
        # a list holding the planned linears; an identically typed one first, else a hybrid stack
        # (never a list of one block's experts or heads: it must hold more of them than any other)
        held = holding(cands)
        held_mixed = holding(mixed)
        if held_mixed and (not held or _count_in(held_mixed, prefer) > _count_in(held, prefer)):
            held = held_mixed
        cands = held or cands
    best: tuple[str, nn.ModuleList] | None = None
    for name, mod in cands:
        if best is None or len(mod) > len(best[1]):
            best = (name, mod)
    if best is None:
        raise AnyquantError(
            f"{type(model).__name__}: no list of repeated blocks found in the module tree; "
            "calibrated methods need decoder blocks (use int4 or hqq, which need none)"
        )
    return best


def _count_in(lists: list[tuple[str, nn.ModuleList]], names: list[str]) -> int:
    """How many of `names` the best of `lists` holds."""
    return max(sum(1 for p in names if p.startswith(f"{n}." if n else "")) for n, _ in lists)


def _detach(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, tuple):
        return tuple(_detach(v) for v in x)
    if isinstance(x, list):
        return [_detach(v) for v in x]
    if isinstance(x, dict):
        return {k: _detach(v) for k, v in x.items()}
    return x


def _to_device(x: Any, device: torch.device) -> Any:
    return x.to(device) if isinstance(x, torch.Tensor) else x


def calib_batches(calib, batch_size: int) -> list[dict[str, Any]]:
    """Forward-input dicts: a token-id tensor cut into rows of `batch_size`; a list of dicts
    as it is (each dict is one forward: VLM inputs such as Qwen2-VL's flattened patches do not
    stack along a batch dimension)."""
    if isinstance(calib, torch.Tensor):
        return [{"input_ids": calib[i:i + batch_size]} for i in range(0, calib.shape[0], batch_size)]
    batches = list(calib)
    if not batches or not all(isinstance(b, dict) and ("input_ids" in b or "inputs_embeds" in b) for b in batches):
        raise AnyquantError("calibration data: expected a LongTensor [n, seq] of token ids or a non-empty list of "
                            "dicts of forward inputs (each with input_ids)")
    return batches


def calib_summary(calib) -> dict[str, Any]:
    """For the report: sequences and tokens (per sequence, or min-max for varying lengths)."""
    if isinstance(calib, torch.Tensor):
        return {"sequences": int(calib.shape[0]), "tokens_per_sequence": int(calib.shape[1])}
    lens, seqs = [], 0
    for b in calib:
        ids = b.get("input_ids")
        if ids is None:
            ids = b["inputs_embeds"]
        seqs += int(ids.shape[0])
        lens.append(int(ids.shape[1]))
    out: dict[str, Any] = {"sequences": seqs,
                           "tokens_per_sequence": lens[0] if len(set(lens)) == 1 else [min(lens), max(lens)]}
    images = sum(1 for b in calib if "pixel_values" in b)
    if images:
        out["image_samples"] = images
    return out


def hash_calib(h, calib) -> None:
    if isinstance(calib, torch.Tensor):
        h.update(calib.detach().cpu().contiguous().numpy().tobytes())
        h.update(str(tuple(calib.shape)).encode())
        return
    for b in calib:
        for k in sorted(b):
            v = b[k]
            h.update(k.encode())
            if isinstance(v, torch.Tensor):
                t = v.detach().cpu().contiguous()
                h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
                h.update((t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes())
            else:
                h.update(repr(v).encode())


@torch.no_grad()
def capture_inputs(model: nn.Module, first_block: nn.Module, calib_ids, batch_size: int) -> list[Batch]:
    """Run the model on calibration batches up to the first block; keep what the block receives.
    `calib_ids`: token ids [n, seq] (text), or a list of forward-input dicts (input_ids,
    pixel_values, attention_mask, image_grid_thw, ...), each run as one forward: the block's
    inputs then hold the image-token positions the model's own forward put there."""
    captured: list[Batch] = []

    def pre_hook(_mod, args, kwargs):
        kw = dict(kwargs)
        if "past_key_values" in kw:
            kw["past_key_values"] = None
        if "use_cache" in kw:
            kw["use_cache"] = False
        captured.append((_detach(args), _detach(kw)))
        raise _Stop

    h = first_block.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        device = device_of(model)
        for i, inputs in enumerate(calib_batches(calib_ids, batch_size)):
            kw = {k: _to_device(v, device) for k, v in inputs.items()}
            kw.setdefault("use_cache", False)
            try:
                model(**kw)
            except _Stop:
                pass
            except Exception as e:  # noqa: BLE001 — user/remote code: re-raised with what was fed to it
                shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in inputs.items() if isinstance(v, torch.Tensor))
                raise AnyquantError(
                    f"calibration batch {i} ({shapes}): {type(model).__name__}'s forward failed before reaching "
                    f"its first block ({type(e).__name__}: {str(e)[:300]})") from e
    finally:
        h.remove()
    if len(captured) == 0:
        raise AnyquantError("calibration: the model never called its first block")
    return captured


def hidden_of(batch: Batch) -> torch.Tensor:
    args, kwargs = batch
    return args[0] if args else kwargs["hidden_states"]


def with_hidden(batch: Batch, h: torch.Tensor) -> Batch:
    args, kwargs = batch
    if args:
        return (h,) + tuple(args[1:]), kwargs
    return args, {**kwargs, "hidden_states": h}


def run_block(block: nn.Module, batch: Batch) -> torch.Tensor:
    args, kwargs = batch
    out = block(*args, **kwargs)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out


@torch.no_grad()
def block_outputs(block: nn.Module, batches) -> list[torch.Tensor] | Activations:
    """The block's output on each batch; kept where `batches` keep theirs (SpilledBatches)."""
    if isinstance(batches, SpilledBatches):
        out = batches.hidden.empty_like()
        for b in batches:
            out.append(run_block(block, b))
        return out
    return [run_block(block, b) for b in batches]


# --------------------------------------------------------------------------- activations off the device


class Activations(Sequence):
    """One hidden-state tensor per calibration batch, kept at `home` between uses and read back to
    `device` on access: "host" (CPU memory, pinned for a GPU) or "disk" (one file per tensor in a
    folder of its own under `root`, removed with the object). Copies both ways are exact."""

    def __init__(self, home: str, device: torch.device, root: Path | None = None):
        self.home, self.device, self.root = home, torch.device(device), root
        self._items: list[Any] = []
        self._folder: Path | None = None
        if home == "disk":
            if root is not None:
                root.mkdir(parents=True, exist_ok=True)
            self._folder = Path(tempfile.mkdtemp(prefix="activations-", dir=root))
            weakref.finalize(self, shutil.rmtree, self._folder, True)

    def empty_like(self) -> Activations:
        return Activations(self.home, self.device, self.root)

    def append(self, t: torch.Tensor) -> None:
        t = t.detach()
        if self.home == "disk":
            f = self._folder / f"{len(self._items)}.pt"
            torch.save(t.cpu(), f)
            self._items.append(f)
        elif t.device.type == "cuda":
            self._items.append(t.to("cpu").pin_memory())
        else:
            self._items.append(t.to("cpu"))

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int) -> torch.Tensor:
        item = self._items[i]
        t = torch.load(item, map_location="cpu", weights_only=True) if self.home == "disk" else item
        return t.to(self.device, non_blocking=self.device.type == "cuda")


class SpilledBatches(Sequence):
    """Calibration batches whose hidden states wait in an Activations store: each access gives
    the batch with its hidden state back on the compute device; everything else a batch holds
    (masks, position embeddings: small) stays as captured."""

    def __init__(self, skeletons: list[Batch], hidden: Activations):
        self.skeletons, self.hidden = skeletons, hidden

    @classmethod
    def spill(cls, batches: list[Batch], home: str, root: Path | None = None) -> SpilledBatches:
        store = Activations(home, hidden_of(batches[0]).device, root)
        for b in batches:
            store.append(hidden_of(b))
        return cls([with_hidden(b, None) for b in batches], store)

    def __len__(self) -> int:
        return len(self.skeletons)

    def __getitem__(self, i: int) -> Batch:
        return with_hidden(self.skeletons[i], self.hidden[i])


def next_batches(batches, outputs):
    """The next block's inputs: `batches` with their hidden states replaced by `outputs`."""
    if isinstance(batches, SpilledBatches):
        return SpilledBatches(batches.skeletons, outputs)
    return [with_hidden(b, o) for b, o in zip(batches, outputs)]


def spill_home(setting: str, batches: list[Batch], copies: int = 4) -> str:
    """Where calibration activations wait: `setting` unless "auto"; then the compute device while
    `copies` sets of them (a block's inputs, the float model's, its float and quantized outputs)
    fit half its free memory, else the host while they fit half of MemAvailable, else disk."""
    if setting != "auto":
        return setting
    h = hidden_of(batches[0])
    need = copies * sum(hidden_of(b).numel() for b in batches) * h.element_size()
    avail = available_memory_bytes()
    if h.device.type == "cuda":
        if need <= torch.cuda.mem_get_info(h.device)[0] // 2:
            return "device"
        return "host" if avail is None or need <= avail // 2 else "disk"
    return "device" if avail is None or need <= avail // 2 else "disk"


def relative_error(ref: list[torch.Tensor], approx: list[torch.Tensor]) -> float:
    """||ref - approx|| / ||ref|| over all batches, counting only positions finite in both."""
    num = den = 0.0
    for r, a in zip(ref, approx):
        r, a = r.double(), a.double()
        ok = torch.isfinite(r) & torch.isfinite(a)
        num += float(((r - a)[ok] ** 2).sum())
        den += float((r[ok] ** 2).sum())
    return (num / den) ** 0.5 if den > 0 else float("nan")


@dataclass
class LinearProbe:
    """Which planned linears of a block read the same input tensor (in call order), and which
    module produced that tensor (None when an operation outside any module did)."""

    groups: list[list[str]]
    producers: list[str | None]


def slice_batch(batch: Batch, rows: slice | torch.Tensor) -> Batch:
    """The batch cut to sequences `rows` (every tensor whose leading dim is the batch size)."""
    bs = hidden_of(batch).shape[0]

    def cut(x):
        if isinstance(x, torch.Tensor):
            return x[rows] if x.dim() > 0 and x.shape[0] == bs else x
        if isinstance(x, (tuple, list)):
            return type(x)(cut(v) for v in x)
        if isinstance(x, dict):
            return {k: cut(v) for k, v in x.items()}
        return x

    return cut(batch[0]), cut(batch[1])


def first_sample(batch: Batch) -> Batch:
    return batch if hidden_of(batch).shape[0] == 1 else slice_batch(batch, slice(0, 1))


@torch.no_grad()
def probe_block(block: nn.Module, batch: Batch, planned: list[str]) -> LinearProbe:
    out_by_id: dict[int, str] = {}
    keep: list[torch.Tensor] = []  # hold every tensor seen, so ids are not reused during the probe
    order: list[tuple[str, int]] = []
    hooks = []
    planned_set = set(planned)
    for name, mod in block.named_modules():
        if not name:
            continue
        if name in planned_set:
            def pre(m, args, _n=name):
                if args and isinstance(args[0], torch.Tensor):
                    keep.append(args[0])
                    order.append((_n, id(args[0])))
            hooks.append(mod.register_forward_pre_hook(pre))

        def post(m, args, out, _n=name):
            if isinstance(out, torch.Tensor):
                keep.append(out)
                out_by_id.setdefault(id(out), _n)
        hooks.append(mod.register_forward_hook(post))
    try:
        run_block(block, first_sample(batch))
    finally:
        for h in hooks:
            h.remove()
    groups: dict[int, list[str]] = {}
    for n, tid in order:
        if n not in groups.setdefault(tid, []):
            groups[tid].append(n)
    seen = {n for n, _ in order}
    missing = [n for n in planned if n not in seen]
    gl = list(groups.values()) + [[n] for n in missing]
    prods = [out_by_id.get(tid) for tid in groups] + [None] * len(missing)
    return LinearProbe(gl, prods)


# --------------------------------------------------------------------------- block context


