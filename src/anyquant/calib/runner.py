"""Block-by-block calibration runner.

1. Find the decoder blocks from the module tree: the longest nn.ModuleList whose children all
   have one type and that holds planned linears of the language model (a VLM's vision tower
   has its own, often longer, list of blocks); no per-architecture table, no fx tracing.
2. Capture the first block's inputs (positional and keyword arguments) with a forward
   pre-hook that stops the model there. Calibration data is token ids (text) or a list of
   forward-input dicts (input_ids + pixel_values + ...: image+text samples for a VLM, see
   calib.images), so the language model's first block sees image-token positions too.
3. For every block: record its float outputs, the outputs of its RTN-quantized copy ("before"),
   run the method's algorithm on it (in place), record the quantized outputs ("after"), and
   feed those to the next block.
4. After each block its tensors and report entry go to a checkpoint directory keyed by source
   fingerprint + config + plan + calibration data; a re-run (after kill -9) loads the finished
   blocks instead of recomputing them, so it gives the same result.

Algorithms implement `quantize_block(ctx)` (see BlockContext) and replace the block's planned
nn.Linear modules with Int4Linear themselves, through calib.guard.
"""

from __future__ import annotations

import copy
import ctypes
import functools
import gc
import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from anyquant.calib.guard import Fallback, guarded, rtn_grid
from anyquant.calib.tune import tune_block
from anyquant.errors import AnyquantError
from anyquant.methods.registry import set_submodule
from anyquant.progress import progress_bar
from anyquant.runtime.int4_linear import Int4Linear

log = logging.getLogger(__name__)

Batch = tuple[tuple, dict]  # (args, kwargs) of one block call


class _Stop(Exception):
    pass


# --------------------------------------------------------------------------- discovery


def find_blocks(model: nn.Module, prefer: list[str] | None = None) -> tuple[str, nn.ModuleList]:
    """The longest nn.ModuleList of identically typed modules: the decoder blocks. With
    `prefer` (module names: the plan's language-model linears), only lists holding at least one
    of them compete, so a VLM's vision encoder layers are never taken for the decoder; if no
    list holds one, the longest list overall."""
    cands: list[tuple[str, nn.ModuleList]] = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and len({type(c) for c in mod}) == 1:
            cands.append((name, mod))
    if prefer:
        holding = [(n, m) for n, m in cands
                   if any(p.startswith(f"{n}." if n else "") for p in prefer)]
        cands = holding or cands
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


def _hash_calib(h, calib) -> None:
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
        device = next(model.parameters()).device
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
def block_outputs(block: nn.Module, batches: list[Batch]) -> list[torch.Tensor]:
    return [run_block(block, b) for b in batches]


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


def _first_sample(batch: Batch) -> Batch:
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
        run_block(block, _first_sample(batch))
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


@dataclass
class BlockContext:
    """What an algorithm gets for one block. It replaces `linears` (names relative to `block`)
    with Int4Linear via `self.install`, which goes through the guard."""

    block: nn.Module
    name: str
    linears: dict[str, dict[str, Any]]  # relative name -> plan options
    batches: list[Batch]
    config: Any
    compute_dtype: torch.dtype
    fallbacks: list[Fallback] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    weight_errors: dict[str, float] = field(default_factory=dict)
    # The float model's own inputs to this block (same order as `batches`), carried only for
    # algorithms that ask for them (config.float_targets): these match the float model's
    # activations instead of the float block's output on already-quantized inputs.
    float_batches: list[Batch] | None = None

    def group_size(self, rel: str) -> int:
        return int(self.linears[rel].get("group_size", self.config.group_size))

    def install(self, rel: str, algorithm: Callable[[], tuple], inputs: dict | None = None,
                weight: torch.Tensor | None = None) -> None:
        from anyquant.methods import primitives as P

        lin = self.block.get_submodule(rel)
        w = lin.weight.detach() if weight is None else weight
        g = self.group_size(rel)
        (codes, scale, zero), fb = guarded(f"{self.name}.{rel}", w, g, self.config.symmetric,
                                           self.compute_dtype, algorithm, inputs)
        if fb is not None:
            self.fallbacks.append(fb)
        deq = P.dequantize(codes, scale, zero, g)
        self.weight_errors[f"{self.name}.{rel}"] = P.relative_error(w, deq)
        q = Int4Linear.from_codes(codes, scale, zero, g, lin.bias, self.config.symmetric, self.compute_dtype)
        set_submodule(self.block, rel, q)


def rtn_block(block: nn.Module, linears: dict[str, dict], group_size: int, symmetric: bool,
              compute_dtype: torch.dtype) -> None:
    for rel, opts in linears.items():
        lin = block.get_submodule(rel)
        g = int(opts.get("group_size", group_size))
        codes, scale, zero = rtn_grid(lin.weight.detach(), g, symmetric, compute_dtype)
        set_submodule(block, rel, Int4Linear.from_codes(codes, scale, zero, g, lin.bias, symmetric, compute_dtype))


# --------------------------------------------------------------------------- checkpoints


def checkpoint_key(fingerprint: str, config: dict, compute_dtype: str, plan_items: list, calib_ids) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"source": fingerprint, "config": config, "dtype": compute_dtype, "plan": plan_items},
                        sort_keys=True).encode())
    _hash_calib(h, calib_ids)
    return h.hexdigest()[:20]


def model_fingerprint(model: nn.Module) -> str:
    """For in-memory models: a hash of every parameter's shape and leading values."""
    h = hashlib.sha256()
    for n, p in model.named_parameters():
        h.update(n.encode() + str(tuple(p.shape)).encode())
        h.update(p.detach().reshape(-1)[:4096].float().cpu().numpy().tobytes())
    return "params:" + h.hexdigest()[:20]


def _save_block(directory: Path, i: int, block: nn.Module, entry: dict) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in block.state_dict().items()}
    tmp = directory / f".block_{i:04d}.safetensors.tmp"
    save_file(state, str(tmp))
    os.replace(tmp, directory / f"block_{i:04d}.safetensors")
    tmpj = directory / f".block_{i:04d}.json.tmp"
    tmpj.write_text(json.dumps(entry, indent=1))
    os.replace(tmpj, directory / f"block_{i:04d}.json")  # the commit marker: written last


def _load_block(directory: Path, i: int, block: nn.Module, linears: dict[str, dict], config,
                compute_dtype: torch.dtype) -> dict | None:
    from safetensors.torch import load_file

    meta = directory / f"block_{i:04d}.json"
    if not meta.exists():
        return None
    entry = json.loads(meta.read_text())
    for rel, opts in linears.items():
        lin = block.get_submodule(rel)
        g = int(opts.get("group_size", config.group_size))
        shell = Int4Linear(lin.in_features, lin.out_features, g, lin.bias is not None, config.symmetric,
                           compute_dtype, lin.weight.device)
        set_submodule(block, rel, shell)
    device = next(block.buffers()).device
    state = {k: v.to(device) for k, v in load_file(str(directory / f"block_{i:04d}.safetensors")).items()}
    block.load_state_dict(state, strict=True)
    return entry


# --------------------------------------------------------------------------- memory


def _libc_function(name: str) -> Callable[..., int] | None:
    """A C library function of this process on Linux (glibc: malloc_trim, mallopt), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(None), name)  # musl and others lack malloc_trim
    except (OSError, AttributeError):
        return None


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's initial value


@functools.lru_cache(maxsize=1)
def pin_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold at its initial 128 KiB for the rest of the process.

    glibc raises the threshold to the size of each mmapped chunk freed (up to 32 MiB), so once
    the first replaced float weight is freed, later tensors of block size come from the heap,
    where the int4 blocks that outlive each step sit among freed temporaries and pin their
    pages; `release_freed_memory` then cannot return them. Peak RSS above the loaded model grew
    with depth by this alone, and varied by up to 20 MiB between identical runs
    (benchmarks/calib_memory.py, gptq: 29.7 -> 40.7 MiB median from 8 to 32 layers; with the
    threshold fixed 33.3-33.5 -> 34.3-34.6). Large tensors then map and unmap their own pages.
    Setting it turns off glibc's dynamic adjustment for the whole process (a calibrating
    process), so it is done once. A no-op off glibc."""
    mallopt = _libc_function("mallopt")
    return mallopt is not None and bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


def release_freed_memory() -> None:
    """Give heap pages that freed tensors left behind back to the OS (glibc's malloc_trim).

    After each block its float weights (replaced by Int4Linear) and its temporaries are freed,
    but glibc keeps them: its mmap threshold rises after the first large free, so later
    tensors of a block's sizes come from the heap, which it does not shrink. Without this the
    process RSS grew by about one block's float size per block although no tensor outlives its
    block. This alone reduced the growth with depth (gptq's overhead above the loaded model 63
    MiB at 8 layers, 108 at 32; 74 -> 146 without it); with `pin_mmap_threshold` keeping large
    tensors out of the heap it no longer grows (benchmarks/calib_memory.py). A no-op off glibc."""
    gc.collect()  # a block's copies can sit in reference cycles (modules, hooks, closures) until the next collection
    trim = _libc_function("malloc_trim")
    if trim is not None:
        trim(0)


# --------------------------------------------------------------------------- the loop


@torch.no_grad()
def run(
    model: nn.Module,
    plan,
    config,
    compute_dtype: torch.dtype,
    calib_ids,
    quantize_block: Callable[[BlockContext], None],
    *,
    progress: bool = True,
    checkpoint_dir: str | Path | None = None,
    fingerprint: str | None = None,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Quantize every planned linear inside the decoder blocks; return the report section.
    Planned linears outside the blocks are left to the caller (returned as `outside`).
    `calib_ids`: token ids [n, seq] or a list of forward-input dicts (see capture_inputs)."""
    from anyquant.model.modelmap import LANGUAGE
    from anyquant.numerics.dtype import dtype_name

    planned = plan.to_quantize()
    lm = [d.name for d in planned if getattr(d, "component", None) == LANGUAGE]
    blocks_name, blocks = find_blocks(model, prefer=lm or [d.name for d in planned])
    todo = {d.name: d.options for d in planned}
    per_block: list[dict[str, dict]] = []
    inside: set[str] = set()
    for i in range(len(blocks)):
        prefix = f"{blocks_name}.{i}." if blocks_name else f"{i}."
        mine = {n[len(prefix):]: o for n, o in todo.items() if n.startswith(prefix)}
        per_block.append(mine)
        inside.update(prefix + r for r in mine)
    outside = sorted(set(todo) - inside)

    ckdir = None
    if checkpoint_dir is not None:
        fp = fingerprint or model_fingerprint(model)
        key = checkpoint_key(fp, config.to_dict(), dtype_name(compute_dtype),
                             sorted([n, o] for n, o in todo.items()), calib_ids)
        ckdir = Path(checkpoint_dir) / key

    pin_mmap_threshold()
    batches = capture_inputs(model, blocks[0], calib_ids, batch_size)
    model_targets = getattr(config, "tune_steps", 0) > 0 and getattr(config, "tune_target", "block") == "model"
    float_batches = list(batches) if getattr(config, "float_targets", False) or model_targets else None
    entries: list[dict] = []
    fallbacks: list[dict] = []
    notes: list[str] = []
    weight_errors: dict[str, float] = {}
    resumed = 0
    with progress_bar(f"{config.method}: block by block", total=len(blocks), enabled=progress) as advance:
        for i, block in enumerate(blocks):
            bname = f"{blocks_name}.{i}" if blocks_name else str(i)
            linears = per_block[i]
            # The float model's outputs of this block, taken while it is still float, also when
            # it is about to be resumed from a checkpoint: later blocks then get the same targets
            # as in an uninterrupted run.
            float_outs = block_outputs(block, float_batches) if float_batches is not None else None
            entry = _load_block(ckdir, i, block, linears, config, compute_dtype) if ckdir else None
            if entry is not None:
                resumed += 1
                entry["resumed"] = True
                outs = block_outputs(block, batches)
            else:
                ref = block_outputs(block, batches)
                tuned_outs = None
                if linears:
                    rtn = copy.deepcopy(block)
                    rtn_block(rtn, linears, config.group_size, config.symmetric, compute_dtype)
                    before = relative_error(ref, block_outputs(rtn, batches))
                    del rtn
                    ctx = BlockContext(block, bname, linears, batches, config, compute_dtype,
                                       float_batches=float_batches)
                    quantize_block(ctx)
                    left = [r for r in linears if isinstance(block.get_submodule(r), nn.Linear)]
                    if left:
                        raise AssertionError(f"{config.method} left {left} of {bname} unquantized")
                    entry = {"block": bname, "linears": len(linears), "output_error_rtn": before,
                             "fallbacks": [f.as_dict() for f in ctx.fallbacks], "notes": ctx.notes,
                             "weight_errors": ctx.weight_errors}
                    if getattr(config, "tune_steps", 0) > 0:
                        entry["tune"], tuned_outs = tune_block(
                            block, [r for r in linears if isinstance(block.get_submodule(r), Int4Linear)],
                            batches, float_outs if model_targets and float_outs is not None else ref,
                            steps=config.tune_steps, lr=config.tune_lr,
                            rounding=config.tune_rounding, sequences_per_step=config.tune_sequences,
                            compute_dtype=compute_dtype, seed=i)
                else:
                    entry = {"block": bname, "linears": 0, "output_error_rtn": 0.0, "fallbacks": [],
                             "notes": [], "weight_errors": {}}
                # the tuning step already ran the kept block on these batches
                outs = tuned_outs if tuned_outs is not None else block_outputs(block, batches)
                entry["output_error"] = relative_error(ref, outs)
                del ref
                if ckdir is not None:
                    _save_block(ckdir, i, block, entry)
                entry["resumed"] = False
            log.info("%s: output error rtn %.4g -> %s %.4g%s", bname, entry["output_error_rtn"], config.method,
                     entry["output_error"], " (from checkpoint)" if entry["resumed"] else "")
            fallbacks += entry["fallbacks"]
            notes += [f"{bname}: {n}" for n in entry["notes"]]
            weight_errors.update(entry["weight_errors"])
            entries.append(entry)
            batches = [with_hidden(b, o) for b, o in zip(batches, outs)]
            if float_batches is not None and float_outs is not None:
                float_batches = [with_hidden(b, o) for b, o in zip(float_batches, float_outs)]
            del outs, float_outs
            release_freed_memory()
            advance()
    return {
        "blocks": entries,
        "fallbacks": fallbacks,
        "notes": notes,
        "per_layer_weight_error": weight_errors,
        "outside_blocks": outside,
        "resumed_blocks": resumed,
        "checkpoint_dir": str(ckdir) if ckdir else None,
        "calibration": calib_summary(calib_ids),
    }


def calibration_ids(tokenizer, text: str, n_samples: int, seq_len: int) -> torch.Tensor:
    """n_samples rows of seq_len tokens (BOS first where the tokenizer has one) from `text`."""
    from anyquant.eval.metrics import token_windows

    ids = token_windows(tokenizer, text, max_tokens=n_samples * seq_len, window=seq_len)
    if ids.shape[0] < n_samples:
        log.warning("calibration text gives %d sequences of %d tokens, fewer than the %d asked for",
                    ids.shape[0], seq_len, n_samples)
    return ids[:n_samples]


def quantize_model_blockwise(model, plan, config, compute_dtype, calib_ids, quantize_block, progress=True,
                             checkpoint_dir=None, fingerprint=None, batch_size: int = 8) -> dict[str, Any]:
    """The calibrated methods' `quantize_model`: blocks through `run`, then planned linears
    outside the blocks (rare: the plan keeps heads and embeddings) by round-to-nearest, noted."""
    report = run(model, plan, config, compute_dtype, calib_ids, quantize_block, progress=progress,
                 checkpoint_dir=checkpoint_dir, fingerprint=fingerprint, batch_size=batch_size)
    outside = {n: d.options for n, d in ((d.name, d) for d in plan.to_quantize()) if n in set(report["outside_blocks"])}
    if outside:
        rtn_block(model, outside, config.group_size, config.symmetric, compute_dtype)
        report["notes"].append(
            f"{len(outside)} planned linear(s) outside the decoder blocks quantized by round-to-nearest "
            f"(no calibrated inputs there): {', '.join(sorted(outside))[:300]}")
    return report
