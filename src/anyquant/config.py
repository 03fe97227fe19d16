"""One frozen, validated config per method, with a JSON round trip (type + version)."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any, ClassVar

from anyquant.errors import AnyquantError

CONFIG_VERSION = 1
# GGUF types `anyquant export --to gguf --type` may ask for (formats/gguf.py): those the gguf
# package's Python quantizer writes and llama.cpp's CPU reads; here, not there, so the command
# line checks --type before torch loads.
GGUF_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "F16", "BF16", "F32")


@dataclass(frozen=True)
class MethodConfig:
    method: ClassVar[str] = ""
    bits: ClassVar[int] = 0
    calibrated: ClassVar[bool] = False

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "version": CONFIG_VERSION, **dataclasses.asdict(self)}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "MethodConfig":
        d = dict(d)
        method = d.pop("method", None)
        d.pop("version", None)
        cls = config_class(method)
        return cls(**d)


@dataclass(frozen=True)
class BnB4bitConfig(MethodConfig):
    """bitsandbytes 4-bit (NF4 / FP4): block-wise absmax, optional double quantization."""

    block_size: int = 64
    double_quant: bool = True
    quant_type: ClassVar[str] = ""
    bits: ClassVar[int] = 4

    def __post_init__(self) -> None:
        if self.block_size not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            raise AnyquantError(
                f"{self.method}: block_size={self.block_size} is not one bitsandbytes supports; "
                "use 64 (default) or another power of two from 32 to 4096"
            )


@dataclass(frozen=True)
class NF4Config(BnB4bitConfig):
    method: ClassVar[str] = "nf4"
    quant_type: ClassVar[str] = "nf4"


@dataclass(frozen=True)
class FP4Config(BnB4bitConfig):
    method: ClassVar[str] = "fp4"
    quant_type: ClassVar[str] = "fp4"


@dataclass(frozen=True)
class Int8Config(MethodConfig):
    """bitsandbytes LLM.int8: row-wise int8 with fp16 outlier columns above `threshold`."""

    threshold: float = 6.0
    method: ClassVar[str] = "int8"
    bits: ClassVar[int] = 8

    def __post_init__(self) -> None:
        if not self.threshold >= 0:
            raise AnyquantError(f"int8: threshold must be >= 0, got {self.threshold}")


@dataclass(frozen=True)
class Int4Config(MethodConfig):
    """Round-to-nearest int4, group-wise along input features; asymmetric by default."""

    group_size: int = 128
    symmetric: bool = False
    method: ClassVar[str] = "int4"
    bits: ClassVar[int] = 4

    def __post_init__(self) -> None:
        if self.group_size <= 0 or self.group_size % 8:
            raise AnyquantError(
                f"{self.method}: group_size={self.group_size} must be a positive multiple of 8 "
                "(32, 64 or 128 are the usual choices)"
            )


@dataclass(frozen=True)
class HQQConfig(Int4Config):
    """Half-quadratic optimisation of each group's zero point (then scale) against an lp-norm
    (p < 1) of the weight error, on the int4 grid of Int4Config; calibration-free."""

    iters: int = 20
    lp_norm: float = 0.7
    method: ClassVar[str] = "hqq"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.symmetric:
            raise AnyquantError("hqq: optimises the zero point; symmetric=True leaves nothing to optimise (use int4)")
        if not (0 < self.lp_norm <= 1) or self.iters < 1:
            raise AnyquantError(f"hqq: need 0 < lp_norm <= 1 and iters >= 1, got {self.lp_norm}, {self.iters}")


ACTIVATION_HOMES = ("auto", "device", "host", "disk")


@dataclass(frozen=True)
class CalibratedInt4Config(Int4Config):
    """Shared by awq and gptq: calibration set size (sequences x tokens). 128 x 512 is the
    usual GPU setting; the CPU default is smaller."""

    n_samples: int = 32
    seq_len: int = 512
    # Block-output tuning after the method (calib.tune): steps of gradient descent on the group
    # scales (and, with tune_rounding, each code's rounding) against the float block's output.
    tune_steps: int = 0
    tune_lr: float = 5e-3
    tune_rounding: bool = True
    tune_sequences: int = 2  # calibration sequences per tuning step
    # Off by default (tune_steps=0) for its cost, which adds substantially to the method's own
    # time; the measurements behind that choice are in docs/methods.md and benchmarks/results/.
    # "model": the float model's own output of this block, so tuning also corrects error that
    # earlier blocks left (the default: it measured better than "block"); "block": the float
    # block's output on the same (quantized) inputs.
    tune_target: str = "model"
    # "token": each token's squared error over its target's squared norm, averaged (every token
    # weighs alike); "global": the mean square error over the target's mean square, which a few
    # high-norm positions (BOS) dominate. docs/methods.md has the measurements.
    tune_loss: str = "token"
    # Share of the calibration sequences held out of the tuning steps; a tuned block is kept only
    # if its error on them falls (0: judged on the sequences it trained on).
    tune_holdout: float = 0.25
    # Share of the blocks tuned, those whose per-token error after the method is largest, chosen
    # as the blocks come (calib.tune.select_for_tuning): fewer steps in all where time is short.
    tune_blocks: float = 1.0
    # Where the calibration activations (each block's inputs and outputs) wait between uses:
    # "device" (where they are computed), "host" (CPU memory), "disk" (files beside the run's
    # checkpoints), or "auto": the device while four sets of them fit half its free memory, else
    # the host while they fit half its available memory, else disk (calib/blocks.py
    # spill_home). Where they wait changes no result.
    activations: str = "auto"
    calibrated: ClassVar[bool] = True

    def needs_float_batches(self) -> bool:
        """Whether calibration must also carry the float model's own block inputs along."""
        return self.tune_steps > 0 and self.tune_target == "model"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_samples < 1 or self.seq_len < 2:
            raise AnyquantError(f"{self.method}: need n_samples >= 1 and seq_len >= 2, got {self.n_samples}, {self.seq_len}")
        if self.tune_target not in ("block", "model"):
            raise AnyquantError(f"{self.method}: tune_target={self.tune_target!r} must be 'block' or 'model'")
        if self.tune_loss not in ("token", "global"):
            raise AnyquantError(f"{self.method}: tune_loss={self.tune_loss!r} must be 'token' or 'global'")
        if not (0 <= self.tune_holdout <= 0.5):
            raise AnyquantError(f"{self.method}: tune_holdout={self.tune_holdout} must be between 0 and 0.5 "
                                "(the share of calibration sequences held out of tuning)")
        if self.activations not in ACTIVATION_HOMES:
            raise AnyquantError(f"{self.method}: activations={self.activations!r} must be one of "
                                f"{', '.join(ACTIVATION_HOMES)} (where calibration activations wait between blocks)")
        if not (0 < self.tune_blocks <= 1):
            raise AnyquantError(f"{self.method}: tune_blocks={self.tune_blocks} must be in (0, 1] "
                                "(the share of blocks tuned)")
        if self.tune_steps < 0 or self.tune_sequences < 1 or not (0 < self.tune_lr < 1):
            raise AnyquantError(f"{self.method}: need tune_steps >= 0, tune_sequences >= 1 and 0 < tune_lr < 1, got "
                                f"{self.tune_steps}, {self.tune_sequences}, {self.tune_lr}")


@dataclass(frozen=True)
class AWQConfig(CalibratedInt4Config):
    """Activation-aware per-input-channel scales s = mean|x|^alpha, alpha on a grid in [0, 1]."""

    grid: int = 20
    method: ClassVar[str] = "awq"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.grid < 1:
            raise AnyquantError(f"awq: grid={self.grid} must be >= 1")


@dataclass(frozen=True)
class GPTQConfig(CalibratedInt4Config):
    """GPTQ: Hessian 2 X^T X from calibration inputs, dampening, activation order (static
    groups), each group's range shrunk where that lowers its Hessian-weighted error, and
    optionally AWQ's scales folded in first."""

    damp: float = 0.01
    # On: each lowered perplexity and KL against the float model (docs/methods.md has the
    # measurements). With act_order the group grids are fixed up front (static groups), so
    # groups stay contiguous and the checkpoint needs no g_idx.
    act_order: bool = True
    clip_search: bool = True
    awq_scales: bool = False  # AWQ's activation-aware scales (searched, folded) before GPTQ
    # Both off: neither improved on the defaults when measured (docs/methods.md); kept as options.
    float_targets: bool = False  # match the float model's activations (GPTAQ), not the float layer's
    refits: int = 0  # rounds of least-squares scale refit + GPTQ again (methods.gptq.gptq_refined)
    method: ClassVar[str] = "gptq"

    def needs_float_batches(self) -> bool:
        return self.float_targets or super().needs_float_batches()

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (0 < self.damp < 1):
            raise AnyquantError(f"gptq: damp={self.damp} must be in (0, 1)")
        if not (0 <= self.refits <= 10):
            raise AnyquantError(f"gptq: refits={self.refits} must be between 0 and 10")


_CONFIGS: dict[str, type[MethodConfig]] = {}


def register_config(cls: type[MethodConfig]) -> type[MethodConfig]:
    _CONFIGS[cls.method] = cls
    return cls


for _c in (NF4Config, FP4Config, Int8Config, Int4Config, HQQConfig, AWQConfig, GPTQConfig):
    register_config(_c)


# Scheme names users know from llm-compressor / vLLM, mapped to an anyquant method and the
# config fields the scheme fixes (options given explicitly still win). W4A16 is llm-compressor's
# preset: int4 weights, symmetric, group 128, 16-bit activations; anyquant's round-to-nearest int4
# with symmetric=True is exactly that scheme (and, symmetric, loads packed in stock transformers);
# for GPTQ's algorithm on the same scheme use `--method gptq --symmetric`. W8A16 maps to int8
# (bitsandbytes LLM.int8: 8-bit weights, 16-bit activations).
SCHEME_ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    "W4A16": ("int4", {"symmetric": True}),
    "W4A16_ASYM": ("int4", {"symmetric": False}),
    "W8A16": ("int8", {}),
}


# The recommended 4-bit method: what `anyquant quantize SOURCE` runs without --method, and the
# name `recommended` (case-insensitive) anywhere a method is taken. The choice and its
# measurements against every other row and peer: docs/methods.md ("The recommended method").
# Symmetric group 64 stores 4 + 16/64 = 4.25 bits per weight with whole groups on 576-wide
# layers (asymmetric group 64 would be 4.31); options given explicitly still win.
RECOMMENDED = "recommended"
RECOMMENDED_METHOD: tuple[str, dict[str, Any]] = (
    "gptq", {"symmetric": True, "group_size": 64, "tune_steps": 100},
)


def known_methods() -> list[str]:
    return sorted(_CONFIGS)


def known_aliases() -> list[str]:
    return sorted(SCHEME_ALIASES)


def resolve_method(method: str | None) -> tuple[str | None, dict[str, Any]]:
    """(anyquant method, the fields the alias fixes) for a method name or a scheme alias
    (case-insensitive: w4a16 = W4A16); a method name comes back as it is, with no fields.
    None or "recommended": the recommended 4-bit method (RECOMMENDED_METHOD)."""
    if method is None or (isinstance(method, str) and method.lower() == RECOMMENDED):
        name, fields = RECOMMENDED_METHOD
        return name, dict(fields)
    if isinstance(method, str) and method not in _CONFIGS and method.upper() in SCHEME_ALIASES:
        name, fields = SCHEME_ALIASES[method.upper()]
        return name, dict(fields)
    return method, {}


def config_class(method: str | None) -> type[MethodConfig]:
    method, _ = resolve_method(method)
    if method not in _CONFIGS:
        names = known_methods() + known_aliases() + [RECOMMENDED]
        close = difflib.get_close_matches(str(method), names, n=1, cutoff=0.4)
        hint = f"; did you mean {close[0]}?" if close else ""
        aliases = ", ".join(f"{a} (= {m}{', symmetric' if f.get('symmetric') else ''})"
                            for a, (m, f) in sorted(SCHEME_ALIASES.items()))
        raise AnyquantError(f"unknown method {method!r}; known methods: {', '.join(known_methods())}; "
                            f"scheme aliases: {aliases}; {RECOMMENDED} (= {RECOMMENDED_METHOD[0]} with "
                            f"{_fields_text(RECOMMENDED_METHOD[1])}, the default){hint}")
    return _CONFIGS[method]


def _fields_text(fields: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in fields.items())


def recommended_text() -> str:
    """The recommended method in words, for messages: `gptq (symmetric=True, ...)`."""
    return f"{RECOMMENDED_METHOD[0]} ({_fields_text(RECOMMENDED_METHOD[1])})"


def make_config(method: str | None, **options: Any) -> MethodConfig:
    """Build a method's config from CLI/API options; options set to None take the default,
    options the method does not have are refused by name."""
    cls = config_class(method)
    method, fixed = resolve_method(method)
    fields = {f.name for f in dataclasses.fields(cls)}
    given = {**fixed, **{k: v for k, v in options.items() if v is not None}}
    unknown = sorted(set(given) - fields)
    if unknown:
        raise AnyquantError(
            f"{method}: option(s) {', '.join(unknown)} do not apply; "
            f"{method} takes: {', '.join(sorted(fields)) or 'no options'}"
        )
    return cls(**given)
