"""quantize_to_disk(): quantize a model directory that need not fit in memory, writing the
output shard by shard (`anyquant quantize --stream`).

The source is a LazyModel (formats/lazy.py): the model skeleton on the meta device, each unit (a
repeated block, or one module outside the blocks) read from the safetensors files when its turn
comes. The steps are the in-memory pipeline's (pipeline.py), unit by unit:

- probes and plan: `planning.prepare` on the skeleton; every forward it runs brings one block in
  at a time (the weight-read probe, the dtype policy, the float16 range probe);
- quantize: calibration-free methods: per unit, its planned Linears through the same
  `quantize_linear_at`; awq / gptq: the same block-by-block runner, whose `block_scope` reads each
  block in before its turn and writes it out after. Each finished unit's state dict (the
  tensors save_pretrained would write for it) goes to a ShardWriter (formats/shards.py) and the
  unit goes back to the meta device;
- config.json with the quantization config, tokenizer, card and manifest as save() writes them,
  in a temporary sibling renamed into place (formats/io.py staged_output / finish_output).

Same source, same device, same options: every saved tensor equals the in-memory path's
(tests/test_stream.py). Verification: where the finished output fits the memory budget it is
reloaded (the probe logits of the report come from that reload, and save()'s reload check runs on
it); otherwise the manifest says the check was skipped and why.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from anyquant.calib.data import calibration_data
from anyquant.calib.memory import available_memory_bytes, frozen_heap, pin_mmap_threshold, release_freed_memory
from anyquant.calib.runner import outside_note, rtn_outside
from anyquant.config import MethodConfig, make_config
from anyquant.errors import AlreadyQuantizedError, AnyquantError
from anyquant.eval.memory import peak_rss_bytes
from anyquant.formats.io import finish_output, staged_output
from anyquant.formats.lazy import LazyModel, Unit
from anyquant.formats.regions import restore_float32_regions
from anyquant.formats.registry import format_for
from anyquant.formats.shards import ShardWriter, parse_size
from anyquant.methods import handler_for
from anyquant.model.files import estimate_output_bytes
from anyquant.model.load import (
    SourceInfo,
    fingerprint,
    inspect_files,
    load_tokenizer,
    refuse_if_quantized,
    resolve_source,
)
from anyquant.model.modelmap import build_model_map, quantized_linear_types
from anyquant.model.tree import probe_logits
from anyquant.numerics.casts import check_consistency
from anyquant.numerics.dtype import dtype_name
from anyquant.pipeline import (
    QuantizeResult,
    is_vlm,
    quantize_calibrated,
    quantize_linear_at,
    quantized_report,
    refuse_non_finite,
)
from anyquant.planning.prepare import apply_policy, prepare
from anyquant.progress import progress_bar

log = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_SIZE = "5GB"
# the share of available memory a finished output may take and still be reloaded for verification
RELOAD_SHARE = 0.5


def source_float_bytes(path: Path) -> int:
    """Bytes of the source's safetensors weights (what loading it whole would take in memory)."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def should_stream(path: Path, max_memory: int | str | None = None) -> tuple[bool, str]:
    """Whether `anyquant quantize` should stream this source: its weights take more than
    `max_memory`, or more than 80% of the memory available now. Returns (yes, why)."""
    size = source_float_bytes(path)
    if max_memory is not None:
        limit = parse_size(max_memory)
        return size > limit, f"the checkpoint's weights ({size / 1e9:.2f} GB) vs --max-memory {limit / 1e9:.2f} GB"
    avail = available_memory_bytes()
    if avail is None:
        return False, "available memory unknown"
    return size > 0.8 * avail, f"the checkpoint's weights ({size / 1e9:.2f} GB) vs {avail / 1e9:.2f} GB available"


def _shell(module: nn.Module) -> None:
    """The tensors of the quantized modules in `module` (a unit already written) on the meta
    device: their structure stays for the quantization config and the report, their memory goes.
    (Float parameters go back to meta through LazyModel.drop, which keeps their identity.)"""
    qtypes = quantized_linear_types()
    for mod in module.modules():
        if not isinstance(mod, qtypes):
            continue
        for k, p in list(mod._parameters.items()):
            if p is not None and not p.is_meta:
                mod._parameters[k] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                                  requires_grad=False)
        for k, b in list(mod._buffers.items()):
            if b is not None and not b.is_meta and k not in mod._non_persistent_buffers_set:
                mod._buffers[k] = torch.empty(b.shape, dtype=b.dtype, device="meta")


class _Emitter:
    """A finished unit's tensors, named as save_pretrained names them, into the shard writer."""

    def __init__(self, lazy: LazyModel, writer: ShardWriter):
        from transformers.modeling_utils import remove_tied_weights_from_state_dict

        self.lazy, self.writer = lazy, writer
        model = lazy.model
        self.ignore = set(getattr(model, "_keys_to_ignore_on_save", None) or [])
        # for each group of tied names, the one save_pretrained keeps (asked of transformers itself)
        self.drop: set[str] = set()
        for names in _tied_name_groups(model):
            one = torch.zeros(1)
            kept = remove_tied_weights_from_state_dict(dict.fromkeys(names, one), model)
            self.drop.update(n for n in names if n not in kept)
        self.done: set[str] = set()

    def emit(self, unit: Unit) -> None:
        from transformers.core_model_loading import revert_weight_conversion

        prefix = f"{unit.name}." if unit.name else ""
        # (a quantized module outside the blocks replaced the unit's module in the model)
        module = self.lazy.model.get_submodule(unit.name) if unit.name else self.lazy.model
        state: dict[str, Any] = {}
        if unit.block:
            state = module.state_dict(prefix=prefix)
        else:
            module._save_to_state_dict(state, prefix, keep_vars=False)
        state = {k: v for k, v in state.items() if k not in self.drop and k not in self.ignore and k not in self.done}
        meta = [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_meta]
        if meta:
            raise AssertionError(f"stream: {unit.name}: tensors {meta[:3]} were not materialised before writing")
        self.done.update(state)
        state = revert_weight_conversion(self.lazy.model, state)
        self.writer.add({k: v for k, v in state.items() if isinstance(v, torch.Tensor)})


def _tied_name_groups(model: nn.Module) -> list[list[str]]:
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def _write_config(model: nn.Module, directory: Path, quantization_config: dict[str, Any]) -> None:
    """config.json and generation_config.json as save_pretrained writes them for `model`."""
    config = model.config
    had = getattr(config, "quantization_config", None)
    config.quantization_config = quantization_config
    config.dtype = str(model.dtype).split(".")[1]
    config.architectures = [type(model).__name__]
    try:
        config.save_pretrained(directory)
    finally:
        if had is None:
            del config.quantization_config
        else:
            config.quantization_config = had
    if model.can_generate():
        model.generation_config.save_pretrained(directory)


def quantize_to_disk(
    source: str | Path,
    method: str | MethodConfig = "nf4",
    out: str | Path | None = None,
    *,
    force: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    max_memory: int | str | None = None,
    device: str | torch.device | None = None,
    verify: bool = True,
    dtype: str = "auto",
    plan=None,
    overrides: list[tuple[str, str]] | None = None,
    trust_remote_code: bool = False,
    progress: bool = True,
    calib: str | Path | torch.Tensor | None = None,
    checkpoint_dir: str | Path | None = "auto",
    include_vision: bool = False,
    only: list[str] | None = None,
    tokenizer: Any = None,
    target: str = "auto",
    extra_metrics: dict[str, Any] | None = None,
    **options: Any,
) -> QuantizeResult:
    """Quantize the model directory `source` into `out` without holding the model in memory
    (one block at a time, read from its safetensors files; module docstring). Returns the
    QuantizeResult (its `model` is the skeleton, on the meta device; `output` the directory).

    `max_shard_size`: as transformers' (bytes, or "5GB"). `max_memory`: a host memory budget
    (bytes or "20GB"): refused up front if two blocks do not fit it; the finished output is
    reloaded for verification only if it takes at most half of it (default: of the memory
    available). `device`: where each block is computed (default: the GPU if there is one).
    Other options as anyquant.quantize."""
    t0 = time.perf_counter()
    if out is None:
        raise AnyquantError("quantize_to_disk: give out=DIR (the output is written while quantizing)")
    config = method if isinstance(method, MethodConfig) else make_config(method, **options)
    handler = handler_for(config.method)
    path = resolve_source(source)
    t_inspect = time.perf_counter()
    info: SourceInfo = inspect_files(path, with_fingerprint=False)   # headers
    t_inspect = time.perf_counter() - t_inspect
    if info.quantized_tensors or info.quantization_config:
        refuse_if_quantized(info)
        raise AlreadyQuantizedError(f"{path}: already quantized; streamed quantization does not dequantize "
                                    "(quantize it without --stream, with --requantize)")
    if info.config.get("auto_map") and not trust_remote_code:
        raise AnyquantError(f"{path}: the model's config.json names custom modeling code (auto_map); "
                            "pass --trust-remote-code to run it, after reading that code")
    # The fingerprint (a sha256 of every weight byte, for the manifest and calibration resume) reads
    # the whole checkpoint once more: hashed in a thread (hashlib and file reads release the GIL)
    # while the probes and quantization run, and joined where it is first needed.
    hashing = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="anyquant-fingerprint")
    hashed = hashing.submit(_timed_fingerprint, path)
    try:
        return _quantize_streamed(path, info, hashed, t0, t_inspect, config, handler, out, force=force,
                                  max_shard_size=max_shard_size, max_memory=max_memory, device=device, verify=verify,
                                  dtype=dtype, plan=plan, overrides=overrides, trust_remote_code=trust_remote_code,
                                  progress=progress, calib=calib, checkpoint_dir=checkpoint_dir,
                                  include_vision=include_vision, only=only, tokenizer=tokenizer, target=target,
                                  extra_metrics=extra_metrics)
    finally:
        hashing.shutdown(wait=False, cancel_futures=True)


def _timed_fingerprint(path: Path) -> tuple[str, float]:
    t = time.perf_counter()
    return fingerprint(path), time.perf_counter() - t


def _quantize_streamed(path, info, hashed, t0, t_inspect, config, handler, out, *, force, max_shard_size, max_memory,
                       device, verify, dtype, plan, overrides, trust_remote_code, progress, calib, checkpoint_dir,
                       include_vision, only, tokenizer, target, extra_metrics) -> QuantizeResult:
    """quantize_to_disk's work once the source's headers are checked; `hashed` is the fingerprint
    being computed in the background."""
    fingerprint_seconds = None

    def fingerprinted() -> SourceInfo:
        nonlocal fingerprint_seconds
        if not info.fingerprint:
            info.fingerprint, fingerprint_seconds = hashed.result()
        return info

    if isinstance(tokenizer, (str, Path)):
        tokenizer = load_tokenizer(Path(tokenizer), trust_remote_code, required=True)
    elif tokenizer is None:
        tokenizer = load_tokenizer(path, trust_remote_code)
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    rss_start = peak_rss_bytes()
    pin_mmap_threshold()   # unit-sized tensors map and unmap their own pages (calib/memory.py)
    lazy = LazyModel.open(path, dev, trust_remote_code=trust_remote_code)
    model = lazy.model
    budget = parse_size(max_memory) if max_memory is not None else None
    biggest = max((sum(p.numel() * p.element_size() for p in u.params.values()) for u in lazy.units), default=0)
    if budget is not None and 2 * biggest > budget:
        raise AnyquantError(f"--max-memory {budget / 1e9:.2f} GB: two of {path}'s largest units take "
                            f"{2 * biggest / 1e9:.2f} GB in their stored dtype; give more memory")
    mmap = build_model_map(model)
    if mmap.quantized_tensors:
        raise AlreadyQuantizedError(f"{path}: holds quantized tensors (first: {mmap.quantized_tensors[0]})")
    notes: list[str] = [f"streamed from {path}: one block in memory at a time on {dev}, output written shard by shard"]

    # seconds per phase, in the report: where a streamed run spends its time ("open": headers, the
    # meta skeleton, the tokenizer and the module map; what follows "report" is the output's
    # manifest, hashes and atomic move, timed by the caller)
    t_phase = time.perf_counter()
    phases: dict[str, float] = {"open": round(t_phase - t0, 3)}

    def phase_done(name: str) -> None:
        nonlocal t_phase
        now = time.perf_counter()
        phases[name] = round(now - t_phase, 3)
        t_phase = now

    prep = prepare(model, config, dtype=dtype, plan=plan, overrides=overrides, include_vision=include_vision,
                   only=only, model_map=mmap, target=target)
    policy, the_plan, inputs = prep.policy, prep.plan, prep.inputs
    compute_dtype = policy.compute_dtype
    notes += prep.notes
    todo = the_plan.to_quantize()
    if not todo:
        raise AnyquantError(f"{config.method}: the plan quantizes no module (all {len(the_plan.decisions)} kept); "
                            "see `anyquant plan` for the reasons")
    not_linear = [d.name for d in todo if not isinstance(model.get_submodule(d.name), nn.Linear)]
    if not_linear:
        raise AnyquantError(f"{path}: planned modules {not_linear[:3]} are not nn.Linear (GPT-2-style Conv1D); "
                            "streamed quantization does not transpose them: quantize without --stream")
    # the in-memory path casts the loaded model to the compute dtype, then float32 regions back up:
    # their values went through the compute dtype (except those the policy restores from the file)
    if compute_dtype != torch.float32:
        for region in policy.fp32_modules:
            for n, _ in model.get_submodule(region).named_parameters():
                lazy.through[f"{region}.{n}" if region else n] = compute_dtype
    lazy.exact.update(policy.precise_params)
    inputs = {k: v.to(compute_dtype) if torch.is_tensor(v) and v.is_floating_point() else v
              for k, v in inputs.items()}
    # compute dtype; float32 regions and disagreeing modules get casts at their boundaries
    float_logits = apply_policy(prep, model, inputs)
    phase_done("probes_and_plan")

    per_layer: dict[str, float] = {}
    bits = 0.0
    qparams = 0
    calibration = None
    by_unit: dict[str, list] = {u.name: [] for u in lazy.units}
    for d in todo:
        u = _unit_of(lazy, d.name)
        by_unit[u.name].append(d)
    fmt = format_for(handler.format)
    with staged_output(out, path, force, estimated_bytes=estimate_output_bytes(path, config.bits or 16),
                       notes=notes) as (tmp, outp), frozen_heap():
        writer = ShardWriter(tmp, max_shard_size)
        emitter = _Emitter(lazy, writer)
        emitted: set[str] = set()

        def finish_unit(u: Unit) -> None:
            emitter.emit(u)
            emitted.add(u.name)
            if u.block or by_unit[u.name]:
                _shell(model.get_submodule(u.name) if u.name else model)
            release_freed_memory()

        if handler.calibrated:
            data, data_notes = calibration_data(model, config, calib, compute_dtype, tokenizer=tokenizer,
                                                model_dir=path, vlm=is_vlm(mmap, the_plan),
                                                trust_remote_code=trust_remote_code)
            notes += data_notes

            @contextlib.contextmanager
            def block_scope(i: int, name: str, block: nn.Module):
                u = lazy.unit(name)
                with lazy.held(u):
                    lazy.stop_keeping()   # the first block's inputs are captured: the embedding goes back
                    yield
                    finish_unit(u)

            with lazy.keeping_outside_blocks():   # one read of the embedding for all batches
                calibration = quantize_calibrated(handler, model, the_plan, config, compute_dtype, data, fingerprinted(),
                                                  checkpoint_dir, progress, notes, block_scope=block_scope,
                                                  outside_later=True)
            # planned Linears outside the calibrated blocks (a vision tower with --include-vision, a
            # planned head): round-to-nearest as in memory, one unit read at a time
            later = calibration.pop("outside_later", {})
            later_by_unit: dict[str, dict[str, dict]] = {}
            for n, o in later.items():
                later_by_unit.setdefault(_unit_of(lazy, n).name, {})[n] = o
            for uname, group in later_by_unit.items():
                u = lazy.unit(uname)
                with lazy.held(u):
                    rtn_outside(model, group, config, compute_dtype)
                    finish_unit(u)
            if later:
                notes.append(outside_note(later))
            lazy.release_all()
            phase_done("calibration")
            per_layer = calibration.pop("per_layer_weight_error")
            for d in todo:
                mod = model.get_submodule(d.name)
                n = mod.out_features * mod.in_features
                bits += handler.bits_per_weight(mmap.modules[d.name], d.options, config) * n
                qparams += n
        rest = [u for u in lazy.units if u.name not in emitted]
        with progress_bar(f"quantizing ({config.method}, streamed)", total=len(rest), enabled=progress) as advance:
            for u in rest:
                with lazy.held(u):
                    for d in by_unit[u.name] if not handler.calibrated else []:
                        b, n = quantize_linear_at(model, d, handler, config, policy, mmap, per_layer)
                        bits += b
                        qparams += n
                    finish_unit(u)
                advance()
        lazy.release_all()
        shards = writer.close()
        phase_done("quantize_and_write")
        qc = fmt.quantization_config(model, the_plan, compute_dtype)
        _write_config(model, tmp, qc)

        # the finished output, reloaded where it fits: the report's quantized probe logits
        avail = budget if budget is not None else available_memory_bytes()
        fits = avail is not None and writer.total <= RELOAD_SHARE * avail
        q_logits = None
        if verify and fits:
            # (as load_quantized reads it, from the parts of the manifest a load needs: it is
            # written once the report is complete)
            regions = {} if compute_dtype == torch.float32 else dict(policy.to_dict().get("float32_modules") or {})
            partial = {"plan": the_plan.to_dict(), "format": handler.format, "float32_regions": regions}
            qmodel = restore_float32_regions(fmt.load(tmp, partial, trust_remote_code, device=dev), tmp, partial)
            q_logits = probe_logits(qmodel, inputs)
            refuse_non_finite(config.method, q_logits)
            policy.consistency = check_consistency(qmodel, inputs)
            del qmodel
            phase_done("reload_check")
        report = quantized_report(model, config, the_plan, mmap, prep, per_layer, bits, qparams, float_logits,
                                  q_logits, notes, time.perf_counter() - t0, calibration)
        phase_done("report")
        report["stream"] = {
            "device": str(dev),
            "inspect_seconds": round(t_inspect, 3),
            # hashed in the background; how long the hash itself took (None: cached or not yet joined)
            "fingerprint_seconds": None if fingerprint_seconds is None else round(fingerprint_seconds, 3),
            "max_shard_size": writer.limit,
            "shards": shards,
            "bytes_written": writer.total,
            "source_bytes_read": lazy.reads,
            "units": len(lazy.units),
            "phase_seconds": phases,
            # the process's lifetime peak (ru_maxrss) now and when this run began: a run in a fresh
            # process has its own peak here (benchmarks/scale.py measures above a baseline)
            "process_peak_rss_bytes": peak_rss_bytes(),
            "process_peak_rss_before_bytes": rss_start,
            "peak_gpu_bytes": torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None,
        }
        why = None
        if not verify:
            why = ("not reloaded (verify=False / --no-verify-save): the probe logits of the quantized model were not "
                   "measured (anyquant eval measures the output)")
        elif not fits:
            why = (f"not reloaded: the output ({writer.total / 1e9:.2f} GB) is over {RELOAD_SHARE:.0%} of the memory "
                   f"budget ({'unknown' if avail is None else f'{avail / 1e9:.2f} GB'}); the probe logits of the "
                   "quantized model were not measured (anyquant eval measures the output)")
        if why:
            notes.append(why)
        result = QuantizeResult(model, the_plan, config, report, fingerprinted(), tokenizer, mmap, notes,
                                probe_inputs=inputs if q_logits is not None else None,
                                probe_logits=q_logits.detach().cpu() if q_logits is not None else None,
                                trust_remote_code=trust_remote_code)
        verification = {"skipped": why} if verify and not fits else None
        extra = {"per_layer_weight_error": per_layer, **(extra_metrics or {})}
        result.output = finish_output(tmp, outp, result, force=force, extra_metrics=extra,
                                      verify=verify and fits, verification=verification)
    lazy.remove_hooks()
    log.info("streamed %s: peak host RSS %.2f GB, %s", path, peak_rss_bytes() / 1e9, dtype_name(compute_dtype))
    return result


def _unit_of(lazy: LazyModel, name: str) -> Unit:
    """The unit that holds module `name`: its block, or the module itself."""
    best = None
    for u in lazy.units:
        if name == u.name or name.startswith(f"{u.name}.") or u.name == "":
            if best is None or len(u.name) > len(best.name):
                best = u
    if best is None:
        raise AnyquantError(f"stream: no unit holds {name}")
    return best
