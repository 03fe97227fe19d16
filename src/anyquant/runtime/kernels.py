"""Kernel choice for Int4Linear, per device and batch size.

On CPU the reference path runs: dequantize to the activation dtype, then one matmul.
On a CUDA device (compute capability 8.0 or newer) one of these runs:

  cuda_stream  cuda_mma's math over a tile-contiguous copy of the weights (sm_90): one CTA per
               multiprocessor owns whole 16-row tiles and one thread streams them with bulk
               copies, the first ones issued before waiting for the kernel ahead (programmatic
               dependent launch), so consecutive GEMVs keep DRAM busy across their boundaries
               (runtime/cuda_int4_stream.cu)
  cuda_mma     our CUDA C++ tensor-core GEMV (same file and build as cuda_gemv), batch 1, bf16,
               groups that are multiples of 128: LOP3 nibble -> bf16x2, mma.sync m16n8k16 with fp32
               accumulation, exact integer zero points (folded into per-block sums of x)
  cuda_gemv    our CUDA C++ GEMV (runtime/cuda_int4.py, cuda_int4_gemv.cu), batch 1, bf16: built
               with load_inline at first use where nvcc is present; reads the saved packed
               weights as they are, fp32 accumulation, exact integer zero points
  triton_gemv  our Triton GEMV (runtime/triton_int4.py), batch 1: reads the saved packed
               weights as they are, fp32 accumulation, exact integer zero points
  triton_gemv2 the same GEMV with fewer instructions per weight (interleaved layout only)
  triton_gemm  our Triton tensor-core kernel for batch > 1 (per-group fp32 accumulation)
  torch_int4   torch's built-in tinygemm kernel (torch.ops.aten._weight_int4pack_mm)
  gemlite      gemlite's A16W4 Triton kernels (PyPI `gemlite`), where it is installed

Which one runs, and with which launch configuration, is read from the active `KernelSettings`
(`current_settings()`): per batch-size bucket an order of preference, and the first kernel in
it that is available and supports the input wins. `DEFAULT_SETTINGS` holds the order and the
per-shape launch configurations that measured fastest on an H100; the measurements are in
docs/runtime.md ("Kernel choice") and benchmarks/results/speed_gpu.json, and
benchmarks/speed_gpu.py re-measures them. To run with other choices, for a block of code:

    with kernels.use_kernels(batch1_first="cuda_mma", configs={"cuda_mma": {(4096, 4096): cfg}}):
        ...

The override is held in a context variable (per thread and task), set on entry and restored on
exit; nothing else in this module changes at run time. Kernels are chosen when a forward runs:
a CUDA graph or compiled step captured inside the block keeps the kernels chosen at capture.

Each kernel's layout is built from the module's saved buffers once per (kernel, device, dtype)
and kept on the module (`layout`), so memory stays at about 4 bits per weight plus that one
copy. The optional GPU packages (triton through runtime/triton_int4.py, gemlite) and the CUDA
build are loaded inside functions, on a CUDA device only, never when this module is imported.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import importlib.util
from collections.abc import Iterator, Mapping
from types import MappingProxyType

import torch
import torch.nn.functional as F

from anyquant.runtime import cuda_int4

KERNELS = ("reference", "cuda_stream", "cuda_mma", "cuda_gemv", "triton_gemv", "triton_gemv2", "triton_gemm", "torch_int4", "gemlite")

Shape = tuple[int, int]  # (out_features, in_features)

# Launch-configuration tables, by name, and what a configuration tuple holds:
CONFIG_TABLES = {
    # (rows per warp R, chunks per step U, warps per block, CTAs per multiprocessor, programmatic
    # dependent launch); the (R, U) pairs compiled are cuda_int4.VARIANTS
    "cuda_gemv": "(R, U, warps, CTAs per SM, pdl)",
    # pipe 0 holds the next `depth` blocks' loads in registers, pipe 1 copies `depth` steps ahead
    # with cp.async; RT row tiles of 16 rows per CTA, S warps along K per CTA, CTAs per
    # multiprocessor (0: one CTA per tile)
    "cuda_mma": "(pipe, depth, RT, S, CTAs per SM, pdl)",
    # S stages, W consumer warps per CTA (= units per stage), CTAs per multiprocessor
    "cuda_stream": "(S, W, CTAs per SM, pdl)",
    # "_il": the interleaved layout (in_features a multiple of 8 * group_size: every Llama
    # shape); the plain Triton kernels read the saved layout directly and serve the other shapes
    "triton_gemv_il": "(BLOCK_N, num_warps, PREFETCH)",
    "triton_gemv_il2": "(BLOCK_N, num_warps, R words per thread and group)",
    "triton_gemv": "(BLOCK_N, BLOCK_K, num_warps, num_stages)",
    "triton_gemm_il": "(BLOCK_M, BLOCK_N, SPLIT_K, num_warps, num_stages)",
    "triton_gemm": "(BLOCK_M, BLOCK_N, SPLIT_K, num_warps, num_stages)",
}


def _frozen_table(table) -> Mapping:
    return MappingProxyType({tuple(shape): tuple(cfg) for shape, cfg in dict(table).items()})


@dataclasses.dataclass(frozen=True)
class KernelSettings:
    """Kernel choice and launch configurations (immutable; derive changed copies with
    `replace`, activate one with `use_kernels`).

    preference: per batch-size bucket (1, 16 for 2..16, None for 17+) the kernels to try, in order.
    small_n_preference_16 / small_n: the order used instead in bucket 16 for out_features <= small_n.
    cuda_gemv_preferred: shapes where cuda_gemv is tried first at batch 1.
    configs / default_configs: per table of CONFIG_TABLES, the launch configuration per shape and
      the one for shapes not listed.
    stream_carveout: cuda_stream's L1 / shared-memory split, in percent of the most shared memory
      (-1: the driver picks per launch). The launcher applies it once per compiled variant and
      device, at the first launch, and keeps it: set it before any cuda_stream launch.
    cuda_extension: the built CUDA extension the cuda_gemv / cuda_mma / cuda_stream launches go
      through; None for the plain build of the device (cuda_int4.module_for). Diagnostics pass a
      variant built with cuda_int4.build_extension (the traced build of runtime.stream_trace).
    """

    preference: Mapping
    small_n_preference_16: tuple[str, ...]
    small_n: int
    cuda_gemv_preferred: frozenset
    configs: Mapping
    default_configs: Mapping
    stream_carveout: int = cuda_int4.STREAM_CARVEOUT
    cuda_extension: object = None

    def __post_init__(self):
        for order in (*self.preference.values(), self.small_n_preference_16):
            _check_kernels(order)
        for name in (*self.configs, *self.default_configs):
            _check_table(name)
        set_ = object.__setattr__
        set_(self, "preference", MappingProxyType({b: tuple(o) for b, o in self.preference.items()}))
        set_(self, "small_n_preference_16", tuple(self.small_n_preference_16))
        set_(self, "cuda_gemv_preferred", frozenset(tuple(s) for s in self.cuda_gemv_preferred))
        set_(self, "configs", MappingProxyType({n: _frozen_table(self.configs.get(n, {})) for n in CONFIG_TABLES}))
        set_(self, "default_configs", MappingProxyType({n: tuple(c) for n, c in self.default_configs.items()}))
        missing = set(CONFIG_TABLES) - set(self.default_configs)
        if missing:
            raise ValueError(f"anyquant.runtime.kernels.KernelSettings: default_configs lacks {sorted(missing)}; "
                             f"give a configuration for each of {', '.join(CONFIG_TABLES)}")

    def config(self, table: str, shape: Shape) -> tuple[int, ...]:
        """The launch configuration of `table` (a name in CONFIG_TABLES) for `shape`."""
        _check_table(table)
        return self.configs[table].get(tuple(shape), self.default_configs[table])

    def replace(self, *, batch1_first: str | None = None, configs: Mapping | None = None, **changes) -> KernelSettings:
        """A copy with `changes` (fields), `kernel` moved to the front of the batch-1 order
        (`batch1_first`), and the per-shape entries of `configs` ({table: {shape: cfg}}) merged
        into the tables (entries not named keep their value)."""
        new = dataclasses.replace(self, **changes) if changes else self
        if batch1_first is not None:
            _check_kernels((batch1_first,))
            order = new.preference[1]
            pref = dict(new.preference)
            pref[1] = (batch1_first,) + tuple(k for k in order if k != batch1_first)
            new = dataclasses.replace(new, preference=pref)
        if configs:
            for name in configs:
                _check_table(name)
            merged = {n: {**new.configs[n], **{tuple(s): tuple(c) for s, c in configs.get(n, {}).items()}}
                      for n in CONFIG_TABLES}
            new = dataclasses.replace(new, configs=merged)
        return new


def _check_kernels(names) -> None:
    unknown = [n for n in names if n not in KERNELS]
    if unknown:
        raise ValueError(f"anyquant.runtime.kernels: unknown kernel(s) {unknown}; known: {', '.join(KERNELS)}")


def _check_table(name) -> None:
    if name not in CONFIG_TABLES:
        raise ValueError(f"anyquant.runtime.kernels: unknown configuration table {name!r}; "
                         f"known: {', '.join(CONFIG_TABLES)}")


# The order and configurations measured fastest on an H100 (sm_90); docs/runtime.md, "Kernel
# choice", has the measurements and why each entry is what it is. Every GPU kernel also needs
# compute capability >= 8.0; a kernel that cannot run the input is skipped.
DEFAULT_SETTINGS = KernelSettings(
    preference={
        # cuda_stream (sm_90 only) overlaps consecutive GEMVs; cuda_mma was faster end to end than
        # torch_int4; the Triton GEMVs and gemlite measured slower than both at every shape
        1: ("cuda_stream", "cuda_mma", "torch_int4", "cuda_gemv", "triton_gemv", "triton_gemv2", "triton_gemm", "gemlite"),
        16: ("triton_gemm", "gemlite", "torch_int4"),
        None: ("triton_gemm", "gemlite", "torch_int4"),
    },
    # where gemlite measured faster at batch 2..16: small out_features (k_proj / v_proj)
    small_n_preference_16=("gemlite", "triton_gemm", "torch_int4"),
    small_n=2048,
    # empty: cuda_gemv beat torch_int4 per kernel on most shapes but lost end to end
    cuda_gemv_preferred=frozenset(),
    configs={
        "cuda_gemv": {
            (1024, 4096): (1, 4, 8, 4, 1), (4096, 4096): (2, 4, 8, 2, 1), (4096, 14336): (1, 2, 8, 0, 1),
            (6144, 4096): (2, 4, 8, 0, 1), (14336, 4096): (2, 4, 4, 0, 1), (28672, 4096): (2, 4, 4, 0, 1),
        },
        # tuned for the time after an elementwise kernel that rewrites x, as in the model, where
        # programmatic dependent launch cannot overlap a GEMV with the kernel before it
        "cuda_mma": {
            (1024, 4096): (0, 4, 1, 16, 2, 1), (4096, 4096): (0, 1, 1, 16, 2, 1), (6144, 4096): (0, 1, 1, 8, 0, 1),
            (14336, 4096): (0, 1, 2, 4, 0, 1), (28672, 4096): (0, 4, 1, 8, 0, 1), (4096, 14336): (1, 3, 1, 16, 2, 1),
        },
        # no per-shape entries: consecutive GEMVs overlap only where their CTAs fit on a
        # multiprocessor together, so one configuration for the whole sequence beats per-shape
        # bests (the kernel is held to 56 registers, so two CTAs of W = 16 share a multiprocessor)
        "cuda_stream": {},
        "triton_gemv_il": {
            (1024, 4096): (1, 1, 1), (4096, 4096): (2, 1, 1), (4096, 14336): (2, 1, 1), (14336, 4096): (2, 1, 1),
        },
        "triton_gemv_il2": {
            (4096, 4096): (1, 1, 4), (6144, 4096): (1, 1, 4), (4096, 14336): (1, 1, 4), (28672, 4096): (8, 2, 8),
        },
        "triton_gemv": {
            (1024, 4096): (2, 1024, 4, 3), (4096, 4096): (8, 1024, 4, 3),
            (4096, 14336): (8, 1024, 4, 3), (14336, 4096): (16, 1024, 4, 1),
        },
        "triton_gemm_il": {
            (1024, 4096): (16, 32, 4, 4, 2), (4096, 4096): (16, 32, 2, 4, 2),
            (4096, 14336): (16, 32, 2, 4, 2), (14336, 4096): (16, 64, 1, 4, 2),
        },
        "triton_gemm": {
            (1024, 4096): (16, 32, 8, 4, 3), (4096, 4096): (16, 64, 4, 4, 4),
            (4096, 14336): (16, 64, 4, 4, 4), (14336, 4096): (16, 64, 4, 4, 4),
        },
    },
    default_configs={
        "cuda_gemv": (1, 4, 8, 2, 1),
        "cuda_mma": (0, 1, 1, 16, 2, 1),
        "cuda_stream": (3, 16, 2, 1),
        "triton_gemv_il": (2, 1, 1),
        "triton_gemv_il2": (2, 1, 4),
        "triton_gemv": (8, 1024, 4, 3),
        "triton_gemm_il": (16, 32, 2, 4, 2),
        "triton_gemm": (16, 64, 4, 4, 4),
    },
)

_ACTIVE: contextvars.ContextVar[KernelSettings] = contextvars.ContextVar("anyquant_kernel_settings",
                                                                          default=DEFAULT_SETTINGS)


def current_settings() -> KernelSettings:
    """The settings dispatch reads now: DEFAULT_SETTINGS unless a `use_kernels` block is active."""
    return _ACTIVE.get()


@contextlib.contextmanager
def use_kernels(settings: KernelSettings | None = None, *, batch1_first: str | None = None,
                configs: Mapping | None = None, **changes) -> Iterator[KernelSettings]:
    """Dispatch with other kernel settings inside the block; the previous ones come back on exit.

    settings: the base (default: the current settings); batch1_first, configs and the field
    `changes` (e.g. stream_carveout=-1, cuda_gemv_preferred=...) are applied to it as by
    `KernelSettings.replace`. Yields the settings in force.

        with use_kernels(batch1_first="cuda_mma"):
            y = model(x)
    """
    new = (settings or current_settings()).replace(batch1_first=batch1_first, configs=configs, **changes)
    token = _ACTIVE.set(new)
    try:
        yield new
    finally:
        _ACTIVE.reset(token)


def reference_forward(module, x: torch.Tensor) -> torch.Tensor:
    w = module.dequantized_weight(x.dtype)
    bias = module.bias.to(x.dtype) if module.bias is not None else None
    return F.linear(x, w, bias)


@functools.lru_cache(maxsize=None)
def gemlite_installed() -> bool:
    return importlib.util.find_spec("gemlite") is not None


@functools.lru_cache(maxsize=None)
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _bucket(batch: int):
    return 1 if batch == 1 else (16 if batch <= 16 else None)


def supports(name: str, module, x: torch.Tensor) -> bool:
    """Whether kernel `name` can run this module on this input (device, dtype, shapes)."""
    if name == "reference":
        return True
    if x.device.type != "cuda" or _capability(x.device.index or 0) < (8, 0):
        return False
    k, n, g = module.in_features, module.out_features, module.group_size
    batch = x.numel() // x.shape[-1]
    if name == "cuda_stream":
        return (batch == 1 and x.dtype == torch.bfloat16 and _capability(x.device.index or 0) >= (9, 0)
                and cuda_int4.stream_shape_ok(n, k, g, current_settings().config("cuda_stream", (n, k)),
                                              _sm_count(x.device.index or 0))
                and cuda_int4.available(x.device))
    if name == "cuda_mma":
        return (batch == 1 and x.dtype == torch.bfloat16 and cuda_int4.mma_shape_ok(k, g)
                and _capability(x.device.index or 0) >= (8, 0) and cuda_int4.available(x.device))
    if name == "cuda_gemv":
        return (batch == 1 and x.dtype == torch.bfloat16 and cuda_int4.shape_ok(k, g)
                and cuda_int4.available(x.device))
    if name == "triton_gemv":
        return triton_installed() and batch == 1 and x.dtype in (torch.bfloat16, torch.float16, torch.float32) and g % 8 == 0
    if name == "triton_gemv2":
        return triton_installed() and batch == 1 and x.dtype in (torch.bfloat16, torch.float16, torch.float32) and _interleaved(module)
    if name == "triton_gemm":
        return triton_installed() and x.dtype in (torch.bfloat16, torch.float16) and g >= 16 and g & (g - 1) == 0
    if name == "torch_int4":
        return x.dtype == torch.bfloat16 and g in (32, 64, 128, 256) and k % 128 == 0 and n % 8 == 0
    if name == "gemlite":
        return gemlite_installed() and x.dtype in (torch.bfloat16, torch.float16) and k % 32 == 0 and g >= 16
    raise ValueError(f"unknown kernel {name!r}; known: {', '.join(KERNELS)}")


def choose_kernel(module, x: torch.Tensor) -> str:
    if x.device.type != "cuda":
        return "reference"
    settings = current_settings()
    batch = x.numel() // x.shape[-1]
    order = settings.preference[_bucket(batch)]
    if batch == 1 and (module.out_features, module.in_features) in settings.cuda_gemv_preferred:
        order = ("cuda_gemv",) + tuple(k for k in order if k != "cuda_gemv")
    if _bucket(batch) == 16 and module.out_features <= settings.small_n:
        order = settings.small_n_preference_16
    for name in order:
        if supports(name, module, x):
            return name
    return "reference"


# ---- repacking (once per module, kernel, device and dtype) ----------------------------------

# Kernels that read the same layout share one cached copy (the key's first element).
_LAYOUT_KEY = {"cuda_gemv": "cuda_gemv", "cuda_mma": "cuda_gemv", "cuda_stream": "cuda_stream",
               "triton_gemv": "triton", "triton_gemv2": "triton", "triton_gemm": "triton",
               "torch_int4": "torch_int4", "gemlite": "gemlite"}


def layout(module, kernel: str, device, dtype: torch.dtype = torch.bfloat16):
    """The weights in the layout `kernel` reads, built from the module's saved buffers on first
    use and cached on the module (per kernel family, device and, for torch_int4 / gemlite, the
    activation dtype). Benchmarks time the raw kernels on it; dispatch builds it on demand."""
    if kernel not in _LAYOUT_KEY:
        raise ValueError(f"anyquant.runtime.kernels.layout: no layout for kernel {kernel!r}; "
                         f"one of {', '.join(_LAYOUT_KEY)}")
    device = torch.device(device)
    family = _LAYOUT_KEY[kernel]
    if family == "cuda_gemv":
        return _cached(module, ("cuda_gemv", str(device)), lambda: cuda_int4.repack(module, device))
    if family == "cuda_stream":
        return _cached(module, ("cuda_stream", str(device)), lambda: cuda_int4.repack_units(module, device))
    if family == "triton":
        return _cached(module, ("triton", str(device)), lambda: _pack_triton(module, device))
    if family == "torch_int4":
        return _cached(module, ("torch_int4", str(device), dtype), lambda: _pack_torch_int4(module, device, dtype))
    return _cached(module, ("gemlite", str(device), dtype), lambda: _pack_gemlite(module, device, dtype))


def _cached(module, key, build):
    cache = module.kernel_cache
    if key not in cache:
        cache[key] = build()
    return cache[key]


def _pack_triton(module, device):
    from anyquant.runtime import triton_int4

    if triton_int4.interleave_ok(module.in_features, module.group_size):
        return triton_int4.repack_interleaved(module, device)
    return triton_int4.repack_meta(module, device)


def _interleaved(module) -> bool:
    k, g = module.in_features, module.group_size
    return k % (8 * g) == 0 and g & (g - 1) == 0


def _pack_torch_int4(module, device, dtype):
    """tinygemm layout: w = (u - 8) * scale + zero, u in [0, 15], zero in the float domain.

    Ours is w = (q - zp) * scale with q = u - 8, so zero = -zp * scale. That product is exact
    in float32 (an 8-bit-mantissa scale times a 4-bit integer); tinygemm takes scales and
    zeros in the activation dtype, so the zero is rounded once to bf16 there (<= 2^-9 relative).
    """
    codes = module.codes().to(device).to(torch.int32) + 8            # [N, K], 0..15
    w_uint8 = ((codes[:, ::2] << 4) | codes[:, 1::2]).to(torch.uint8)
    k = module.in_features
    inner_k_tiles = 8 if k % 1024 == 0 else (4 if k % 512 == 0 else 2)
    w_packed = torch.ops.aten._convert_weight_to_int4pack(w_uint8.contiguous(), inner_k_tiles)
    scale = module.weight_scale.to(device).float()
    zero = -module.zero_points().to(device).float() * scale
    sz = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(dtype)  # [K/g, N, 2]
    return w_packed, sz


def _pack_gemlite(module, device, dtype):
    from gemlite import DType, GemLiteLinearTriton

    dt = {torch.bfloat16: DType.BF16, torch.float16: DType.FP16}[dtype]
    layer = GemLiteLinearTriton(
        W_nbits=4, group_size=module.group_size, in_features=module.in_features,
        out_features=module.out_features, input_dtype=dt, output_dtype=dt,
    )
    u = (module.codes().to(device).to(torch.int16) + 8).to(torch.uint8)
    zu = (module.zero_points().to(device).to(torch.float32) + 8).to(dtype)  # integers: exact
    # fma_mode=False keeps w = (u - zu) * scale exactly as saved (fma mode would fold -zu*scale
    # into one rounded number).
    layer.pack(u, module.weight_scale.to(device).to(dtype), zu, bias=None, fma_mode=False)
    return layer


# ---- forward per kernel ----------------------------------------------------------------------

def _shape(module) -> Shape:
    return (module.out_features, module.in_features)


def _run_cuda_gemv(module, x2, settings):
    packed = layout(module, "cuda_gemv", x2.device)
    return cuda_int4.gemv(x2, packed, module.group_size, settings.config("cuda_gemv", _shape(module)),
                          extension=settings.cuda_extension)


def _run_cuda_mma(module, x2, settings):
    packed = layout(module, "cuda_mma", x2.device)
    return cuda_int4.gemv_mma(x2, packed, module.group_size, settings.config("cuda_mma", _shape(module)),
                              extension=settings.cuda_extension)


def _run_cuda_stream(module, x2, settings):
    units = layout(module, "cuda_stream", x2.device)
    return cuda_int4.gemv_stream(x2, units, module.out_features, settings.config("cuda_stream", _shape(module)),
                                 carveout=settings.stream_carveout, extension=settings.cuda_extension)


def _run_triton_gemv(module, x2, settings):
    from anyquant.runtime import triton_int4

    packed = layout(module, "triton_gemv", x2.device)
    if _interleaved(module):
        return triton_int4.gemv_il(x2, packed, module.group_size, settings.config("triton_gemv_il", _shape(module)))
    return triton_int4.gemv(x2, packed, module.group_size, settings.config("triton_gemv", _shape(module)))


def _run_triton_gemv2(module, x2, settings):
    from anyquant.runtime import triton_int4

    packed = layout(module, "triton_gemv2", x2.device)
    return triton_int4.gemv_il2(x2, packed, module.group_size, settings.config("triton_gemv_il2", _shape(module)))


def _run_triton_gemm(module, x2, settings):
    from anyquant.runtime import triton_int4

    packed = layout(module, "triton_gemm", x2.device)
    if _interleaved(module):
        return triton_int4.gemm_il(x2, packed, module.group_size, settings.config("triton_gemm_il", _shape(module)))
    return triton_int4.gemm(x2, packed, module.group_size, settings.config("triton_gemm", _shape(module)))


def _run_torch_int4(module, x2, settings):
    w_packed, sz = layout(module, "torch_int4", x2.device, x2.dtype)
    return torch.ops.aten._weight_int4pack_mm(x2.contiguous(), w_packed, module.group_size, sz)


def _run_gemlite(module, x2, settings):
    return layout(module, "gemlite", x2.device, x2.dtype)(x2)


_RUN = {
    "cuda_stream": _run_cuda_stream,
    "cuda_mma": _run_cuda_mma,
    "cuda_gemv": _run_cuda_gemv,
    "triton_gemv": _run_triton_gemv,
    "triton_gemv2": _run_triton_gemv2,
    "triton_gemm": _run_triton_gemm,
    "torch_int4": _run_torch_int4,
    "gemlite": _run_gemlite,
}


def prepare(module, x: torch.Tensor, kernel: str | None = None) -> str:
    """Build (and cache) the layout the chosen kernel needs, ahead of graph capture."""
    name = kernel or choose_kernel(module, x)
    int4_linear_forward(module, x, kernel=None if kernel is None else name)
    return name


def prepare_model(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, int]:
    """For each Int4Linear of `model` that sits on a CUDA device: the batch-1 kernel chosen for
    `dtype` activations, its layout built and its launch bound now (at load), not at the first
    token. Builds the CUDA extension if it is not built yet. Returns {kernel: modules} (empty on
    CPU, where the reference path runs) and keeps it as `model.anyquant_kernels`."""
    counts: dict[str, int] = {}
    with torch.no_grad():
        for m in model.modules():
            packed = getattr(m, "weight_packed", None)
            if not isinstance(packed, torch.Tensor) or not hasattr(m, "kernel_cache") or not packed.is_cuda:
                continue
            name = prepare(m, torch.zeros(1, m.in_features, dtype=dtype, device=packed.device))
            counts[name] = counts.get(name, 0) + 1
    model.anyquant_kernels = counts
    return counts


def chosen_kernel(module, x: torch.Tensor) -> str:
    """The kernel dispatch runs (or would run) for this module on an input like `x`."""
    entry = module.kernel_cache.get(_dispatch_key(x))
    if entry is not None and entry[0] is _ACTIVE.get():
        return entry[1]
    return choose_kernel(module, x)


def _dispatch_key(x: torch.Tensor) -> tuple:
    """What the kernel choice depends on besides the settings: batch 1, 2..16 or 17+ (the
    buckets; `supports` only tells batch 1 apart), device and dtype."""
    batch = x.numel() // x.shape[-1]
    return ("dispatch", 1 if batch == 1 else (2 if batch <= 16 else 17), x.device, x.dtype)


def bind(module, name: str, device: torch.device, settings: KernelSettings):
    """x2 [M, K] -> y [M, N] for kernel `name` on `device`, with its layout, launch
    configuration and built extension looked up once (the per-call path of dispatch)."""
    shape = _shape(module)
    if name == "cuda_stream":
        units = layout(module, "cuda_stream", device)
        ext = settings.cuda_extension or cuda_int4.module_for(device)
        stages, warps, cps, pdl = settings.config("cuda_stream", shape)
        carveout = cuda_int4.STREAM_CARVEOUT if settings.stream_carveout is None else settings.stream_carveout
        n = module.out_features

        def run_stream(x2):
            if not x2.is_contiguous() or x2.data_ptr() % 16:
                x2 = x2.contiguous().clone()
            return ext.gemv_stream(x2, units, n, stages, warps, cps, pdl, carveout)
        return run_stream
    if name == "cuda_mma":
        w, meta = layout(module, "cuda_mma", device)
        ext = settings.cuda_extension or cuda_int4.module_for(device)
        pipe, depth, rt, s, cps, pdl = settings.config("cuda_mma", shape)
        if pdl and _capability(device.index or 0) < (9, 0):
            pdl = 0
        g = module.group_size

        def run_mma(x2):
            if not x2.is_contiguous() or x2.data_ptr() % 16:
                x2 = x2.contiguous().clone()
            return ext.gemv_mma(x2, w, meta, g, pipe, depth, rt, s, cps, pdl)
        return run_mma
    run = _RUN[name]
    return lambda x2: run(module, x2, settings)


def int4_linear_forward(module, x: torch.Tensor, kernel: str | None = None) -> torch.Tensor:
    """y = x W^T + b for an Int4Linear; `kernel` forces one of KERNELS (tests, benchmarks).

    Without `kernel`, the choice for (batch bucket, device, dtype) under the active settings is
    made once per module and kept in `module.kernel_cache` with the launch bound to its layout
    (`bind`), so a call costs a dictionary lookup, not the checks of `choose_kernel`."""
    if kernel is None:
        if x.device.type != "cuda":
            return reference_forward(module, x)
        settings = _ACTIVE.get()
        key = _dispatch_key(x)
        entry = module.kernel_cache.get(key)
        if entry is None or entry[0] is not settings:
            name = choose_kernel(module, x)
            entry = (settings, name, None if name == "reference" else bind(module, name, x.device, settings))
            module.kernel_cache[key] = entry
        run = entry[2]
        if run is None:
            return reference_forward(module, x)
        y = run(x.reshape(-1, x.shape[-1]))
        if module.bias is not None:
            y = y + module.bias.to(device=y.device, dtype=y.dtype)
        return y.reshape(*x.shape[:-1], module.out_features)
    name = kernel
    if name == "reference":
        return reference_forward(module, x)
    if not supports(name, module, x):
        raise ValueError(
            f"kernel {name!r} cannot run Int4Linear(in={module.in_features}, out={module.out_features}, "
            f"group_size={module.group_size}) on a {x.dtype} input of shape {tuple(x.shape)} on {x.device}; "
            f"use kernel=None to let anyquant choose"
        )
    x2 = x.reshape(-1, x.shape[-1])
    y = _RUN[name](module, x2, current_settings())
    if module.bias is not None:
        y = y + module.bias.to(device=y.device, dtype=y.dtype)
    return y.reshape(*x.shape[:-1], module.out_features)
