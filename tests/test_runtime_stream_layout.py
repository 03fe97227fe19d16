"""cuda_stream's tile-contiguous layout and stream-K work split, checked on CPU.

The GPU kernel (runtime/cuda_int4_stream.cu) is tested against the float reference in
tests/test_runtime_gpu.py; here the pieces it relies on are checked where CI can run them:
the repacked units hold exactly the module's weights (`cuda_int4.dense_from_units` decodes them
to the module's own dequantization, bit for bit), and the shared-memory size `supports()` checks
(`cuda_int4.stream_smem_bytes`, the launcher's formula) for the shapes and configurations used.
"""

from __future__ import annotations

import pytest
import torch

from anyquant.runtime import cuda_int4
from anyquant.runtime.int4_linear import Int4Linear


@pytest.mark.parametrize("n, k, group", [(64, 256, 128), (300, 512, 128), (40, 1024, 256), (16, 128, 128)])
def test_units_hold_the_modules_weights(n, k, group):
    torch.manual_seed(0)
    lin = torch.nn.Linear(k, n, bias=False)
    lin.weight.data = lin.weight.data.to(torch.bfloat16).float()
    m = Int4Linear.from_float(lin, group_size=group)
    w, meta = cuda_int4.repack(m, torch.device("cpu"))
    units = cuda_int4.units_from_packed(w, meta, group)
    tiles = (n + 15) // 16
    assert units.numel() == tiles * (k // 128) * cuda_int4.UNIT_WORDS
    dense = cuda_int4.dense_from_units(units, n, k)
    ref = m.dequantized_weight(torch.float32)
    assert torch.equal(dense, ref)
    # the rows padded to a tile have zero scales: they add nothing
    if n % 16:
        pad_meta = units.view(tiles, k // 128, -1)[-1, :, 256 + n % 16:]
        assert (pad_meta == 0).all()


def test_a_wrong_nibble_order_is_caught():
    """The decoder is not a mirror of the encoder: swapping two row halves changes the weights."""
    torch.manual_seed(1)
    m = Int4Linear.from_float(torch.nn.Linear(256, 32, bias=False), group_size=128)
    w, meta = cuda_int4.repack(m, torch.device("cpu"))
    units = cuda_int4.units_from_packed(w, meta, 128).clone().view(-1, cuda_int4.UNIT_WORDS)
    units[:, :128], units[:, 128:256] = units[:, 128:256].clone(), units[:, :128].clone()
    assert not torch.equal(cuda_int4.dense_from_units(units.view(-1), 32, 256), m.dequantized_weight(torch.float32))


def test_stream_shared_memory_matches_the_launcher_and_declines_what_does_not_fit():
    # K = 14336, 4096 rows, S = 4, W = 16 on 132 multiprocessors: x 29,568 + slots 2 x 16 x 64
    # + ring 4 x 16 x 1088 + 8 mbarriers
    assert cuda_int4.stream_smem_bytes(4096, 14336, (4, 16, 1, 1), 132) == 29568 + 2048 + 69632 + 64
    assert cuda_int4.stream_shape_ok(4096, 14336, 128, (4, 16, 1, 1), 132)
    assert cuda_int4.stream_shape_ok(4096, 14336, 128, (8, 16, 1, 1), 132)        # 167 KiB
    assert not cuda_int4.stream_shape_ok(4096, 65536, 128, (8, 16, 1, 1), 132)    # x alone is 132 KiB
    assert not cuda_int4.stream_shape_ok(4096, 4096, 64, (4, 8, 1, 1), 132)       # group 64
    assert not cuda_int4.stream_shape_ok(4096, 4096, 128, (7, 8, 1, 1), 132)      # S not compiled
    # an lm_head-sized matrix: 8016 tiles, 61 per CTA, so the slots grow with the tiles a CTA owns
    assert cuda_int4.stream_smem_bytes(128256, 4096, (4, 8, 1, 1), 132) == 8448 + 61 * 8 * 64 + 4 * 8 * 1088 + 64
