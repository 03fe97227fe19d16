"""The kernel-settings override (runtime.kernels.use_kernels): set inside the block, restored on
exit, validated, and without effect on CPU dispatch."""

from __future__ import annotations

import pytest
import torch

from anyquant.runtime import kernels
from anyquant.runtime.int4_linear import Int4Linear


def test_use_kernels_sets_and_restores():
    base = kernels.current_settings()
    assert base is kernels.DEFAULT_SETTINGS
    with kernels.use_kernels(batch1_first="cuda_mma", configs={"cuda_mma": {(8, 16): (0, 1, 1, 2, 0, 0)}},
                             stream_carveout=-1) as s:
        assert kernels.current_settings() is s
        assert s.preference[1][0] == "cuda_mma"
        assert sorted(s.preference[1]) == sorted(base.preference[1])
        assert s.config("cuda_mma", (8, 16)) == (0, 1, 1, 2, 0, 0)
        assert s.config("cuda_mma", (4096, 4096)) == base.config("cuda_mma", (4096, 4096))   # merged, not replaced
        assert s.stream_carveout == -1
        with kernels.use_kernels(batch1_first="torch_int4") as inner:
            assert inner.preference[1][:2] == ("torch_int4", "cuda_mma") and inner.stream_carveout == -1
        assert kernels.current_settings() is s
    assert kernels.current_settings() is base


def test_restored_after_an_exception():
    with pytest.raises(RuntimeError):
        with kernels.use_kernels(batch1_first="cuda_gemv"):
            raise RuntimeError("inside")
    assert kernels.current_settings() is kernels.DEFAULT_SETTINGS


def test_settings_are_immutable_and_validated():
    s = kernels.DEFAULT_SETTINGS
    with pytest.raises(TypeError):
        s.configs["cuda_mma"][(1, 1)] = (0,)
    with pytest.raises(AttributeError):
        s.small_n = 1
    with pytest.raises(ValueError, match="unknown kernel.*known"):
        s.replace(batch1_first="cuda_fast")
    with pytest.raises(ValueError, match="unknown configuration table.*known"):
        s.replace(configs={"cuda_mmaa": {}})
    with pytest.raises(ValueError, match="unknown configuration table"):
        s.config("nope", (1, 1))


def test_cpu_dispatch_is_the_reference_under_any_settings():
    m = Int4Linear.from_float(torch.nn.Linear(256, 64), group_size=128)
    x = torch.randn(1, 256)
    ref = kernels.int4_linear_forward(m, x)
    with kernels.use_kernels(batch1_first="cuda_gemv"):
        assert kernels.choose_kernel(m, x) == "reference"
        assert torch.equal(kernels.int4_linear_forward(m, x), ref)
    assert m.kernel_cache == {}
