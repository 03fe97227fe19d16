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

import contextlib
import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from anyquant import primitives as P
from anyquant.answers import cache_dir
from anyquant.calib.blocks import (
    Batch,
    SpilledBatches,
    block_outputs,
    calib_summary,
    capture_inputs,
    find_blocks,
    hidden_of,
    next_batches,
    relative_error,
    run_block,
    spill_home,
)
from anyquant.calib.checkpoint import (
    DamagedCheckpoint,
    checkpoint_key,
    load_block,
    model_fingerprint,
    save_block,
)
from anyquant.calib.guard import Fallback, guarded, rtn_grid
from anyquant.calib.memory import frozen_heap, pin_mmap_threshold, release_freed_memory
from anyquant.calib.text import token_windows
from anyquant.calib.tune import select_for_tuning, token_error, tune_block
from anyquant.model.modelmap import LANGUAGE
from anyquant.model.tree import set_submodule
from anyquant.numerics.dtype import dtype_name
from anyquant.progress import progress_bar
from anyquant.runtime.int4_linear import Int4Linear

log = logging.getLogger(__name__)


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
    block_scope: Callable[[int, str, nn.Module], Any] | None = None,
) -> dict[str, Any]:
    """Quantize every planned linear inside the decoder blocks; return the report section.
    Planned linears outside the blocks are left to the caller (returned as `outside`).
    `calib_ids`: token ids [n, seq] or a list of forward-input dicts (see capture_inputs).
    `block_scope(i, name, block)`: a context entered around each block's turn (the streamed
    quantization reads the block's weights from disk on entry, writes and frees it on exit)."""

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
        settings = {k: v for k, v in config.to_dict().items() if k != "activations"}   # where they wait: same result
        key = checkpoint_key(fp, settings, dtype_name(compute_dtype),
                             sorted([n, o] for n, o in todo.items()), calib_ids)
        ckdir = Path(checkpoint_dir) / key

    pin_mmap_threshold()
    batches = capture_inputs(model, blocks[0], calib_ids, batch_size)
    home = spill_home(getattr(config, "activations", "auto"), batches)
    # (on a CPU, host memory is where the activations already are)
    if home == "disk" or (home == "host" and hidden_of(batches[0]).device.type != "cpu"):
        root = (ckdir if ckdir is not None else cache_dir() / "spill") / "activations"
        batches = SpilledBatches.spill(batches, home, root)
    model_targets = config.tune_steps > 0 and config.tune_target == "model"
    tune_errors: list[float] = []  # per-token error after the method, per block (tune_blocks < 1)
    float_batches = None
    if config.needs_float_batches():
        float_batches = (SpilledBatches(batches.skeletons, batches.hidden) if isinstance(batches, SpilledBatches)
                         else list(batches))
    entries: list[dict] = []
    fallbacks: list[dict] = []
    notes: list[str] = []
    weight_errors: dict[str, float] = {}
    resumed = 0
    with progress_bar(f"{config.method}: block by block", total=len(blocks), enabled=progress) as advance, \
            frozen_heap():
        for i, block in enumerate(blocks):
            bname = f"{blocks_name}.{i}" if blocks_name else str(i)
            scope = block_scope(i, bname, block) if block_scope is not None else contextlib.nullcontext()
            with scope:
                outs, float_outs, entry = _one_block(
                    i, bname, block, per_block[i], batches, float_batches, ckdir, config, compute_dtype,
                    model_targets, notes, quantize_block, tune_errors)
                if "error_after_method" in entry.get("tune", {}):  # a resumed block's too
                    tune_errors.append(entry["tune"]["error_after_method"])
                resumed += bool(entry["resumed"])
            fallbacks += entry["fallbacks"]
            notes += [f"{bname}: {n}" for n in entry["notes"]]
            weight_errors.update(entry["weight_errors"])
            entries.append(entry)
            batches = next_batches(batches, outs)
            if float_batches is not None and float_outs is not None:
                float_batches = next_batches(float_batches, float_outs)
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
        "activations": home,
        "checkpoint_dir": str(ckdir) if ckdir else None,
        "calibration": calib_summary(calib_ids),
    }


def _one_block(i, bname, block, linears, batches, float_batches, ckdir, config, compute_dtype, model_targets,
               notes, quantize_block, tune_errors):
    """One block's turn: float outputs, the method (or the block's checkpoint), quantized outputs.
    Returns (quantized outputs, float model's outputs or None, report entry)."""
    # The float model's outputs of this block, taken while it is still float, also when
    # it is about to be resumed from a checkpoint: later blocks then get the same targets
    # as in an uninterrupted run.
    float_outs = block_outputs(block, float_batches) if float_batches is not None else None
    entry = None
    if ckdir is not None:
        try:
            entry = load_block(ckdir, i, block, linears, config, compute_dtype)
        except DamagedCheckpoint as e:
            msg = f"{bname}: checkpoint in {ckdir} was damaged ({e}); block recomputed"
            log.warning("%s", msg)
            notes.append(msg)
    if entry is not None:
        entry["resumed"] = True
        outs = block_outputs(block, batches)
    else:
        ref = block_outputs(block, batches)
        tuned_outs = None
        if linears:
            rtn = copy.deepcopy(block)
            rtn_block(rtn, linears, config.group_size, config.symmetric, compute_dtype)
            # batch by batch: the round-to-nearest block's outputs are compared, not kept (one
            # more set of activations on the device otherwise)
            before = relative_error(ref, (run_block(rtn, b) for b in batches))
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
            if config.tune_steps > 0:
                targets = float_outs if model_targets and float_outs is not None else ref
                # the block's own error (against the float block on the same inputs), not the
                # error earlier blocks left, which grows with depth and would pick every block
                error = token_error(ref, (run_block(block, b) for b in batches)) if config.tune_blocks < 1 else None
                if error is None or select_for_tuning(error, tune_errors, config.tune_blocks):
                    entry["tune"], tuned_outs = tune_block(
                        block, [r for r in linears if isinstance(block.get_submodule(r), Int4Linear)],
                        batches, targets, steps=config.tune_steps, lr=config.tune_lr,
                        rounding=config.tune_rounding, sequences_per_step=config.tune_sequences,
                        compute_dtype=compute_dtype, loss=config.tune_loss, holdout=config.tune_holdout, seed=i)
                else:
                    entry["tune"] = {"kept": False, "steps": 0,
                                     "skipped": f"per-token error {error:.4g} not among the largest "
                                                f"{config.tune_blocks:.0%} of the blocks so far"}
                if error is not None:
                    entry["tune"]["error_after_method"] = error
        else:
            entry = {"block": bname, "linears": 0, "output_error_rtn": 0.0, "fallbacks": [],
                     "notes": [], "weight_errors": {}}
        # the tuning step already ran the kept block on these batches
        outs = tuned_outs if tuned_outs is not None else block_outputs(block, batches)
        entry["output_error"] = relative_error(ref, outs)
        del ref
        if ckdir is not None:
            save_block(ckdir, i, block, entry)
        entry["resumed"] = False
    log.info("%s: output error rtn %.4g -> %s %.4g%s", bname, entry["output_error_rtn"], config.method,
             entry["output_error"], " (from checkpoint)" if entry["resumed"] else "")
    return outs, float_outs, entry


def calibration_ids(tokenizer, text: str, n_samples: int, seq_len: int) -> torch.Tensor:
    """n_samples rows of seq_len tokens (BOS first where the tokenizer has one) from `text`."""

    ids = token_windows(tokenizer, text, max_tokens=n_samples * seq_len, window=seq_len)
    if ids.shape[0] < n_samples:
        log.warning("calibration text gives %d sequences of %d tokens, fewer than the %d asked for",
                    ids.shape[0], seq_len, n_samples)
    return ids[:n_samples]


def rtn_outside(model: nn.Module, outside: dict[str, dict], config, compute_dtype: torch.dtype) -> None:
    """Planned linears outside the calibrated blocks (a vision tower quantized with
    --include-vision, a planned head) by round-to-nearest: no calibrated inputs reach them."""
    rtn_block(model, outside, config.group_size, config.symmetric, compute_dtype)


def outside_note(outside: dict[str, dict]) -> str:
    return (f"{len(outside)} planned linear(s) outside the decoder blocks quantized by round-to-nearest "
            f"(no calibrated inputs there): {', '.join(sorted(outside))[:300]}")


def quantize_model_blockwise(model, plan, config, compute_dtype, calib_ids, quantize_block, progress=True,
                             checkpoint_dir=None, fingerprint=None, batch_size: int = 8,
                             block_scope=None, outside_later: bool = False) -> dict[str, Any]:
    """The calibrated methods' `quantize_model`: blocks through `run`, then planned linears
    outside the blocks (rare: the plan keeps heads and embeddings) by round-to-nearest, noted.
    `outside_later`: those are left to the caller, listed in the report's `outside_later` (the
    streamed path reads their units one at a time and calls `rtn_outside` itself)."""
    report = run(model, plan, config, compute_dtype, calib_ids, quantize_block, progress=progress,
                 checkpoint_dir=checkpoint_dir, fingerprint=fingerprint, batch_size=batch_size,
                 block_scope=block_scope)
    outside = {n: d.options for n, d in ((d.name, d) for d in plan.to_quantize()) if n in set(report["outside_blocks"])}
    if outside and outside_later:
        report["outside_later"] = outside
    elif outside:
        rtn_outside(model, outside, config, compute_dtype)
        report["notes"].append(outside_note(outside))
    return report
