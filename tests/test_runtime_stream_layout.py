"""cuda_stream's tile-contiguous layout and stream-K work split, checked on CPU.

The GPU kernel (runtime/cuda_int4_stream.cu) is tested against the float reference in
tests/test_runtime_gpu.py; here the pieces it relies on are checked where CI can run them:
the repacked units hold exactly the module's weights (`cuda_int4.dense_from_units` decodes them
to the module's own dequantization, bit for bit), and the warp ranges and per-tile contributor
counts the kernel computes cover every unit once and fit the partial-sum slots it is given.
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


@pytest.mark.parametrize("tiles, nb, gw", [
    (64, 32, 1056), (256, 32, 1056), (256, 112, 1056), (1792, 32, 1056), (384, 32, 528),
    (64, 32, 2048), (19, 4, 76), (1, 1, 1), (3, 7, 5), (896, 32, 2112), (256, 112, 264),
])
def test_stream_split_covers_every_unit_once_and_fits_the_slots(tiles, nb, gw):
    units = tiles * nb
    ranges, contributors, maxc = cuda_int4.stream_split(units, nb, gw)
    assert ranges[0][0] == 0 and ranges[-1][1] == units
    assert all(a < b for a, b in ranges)                          # no idle warp (gw <= units)
    assert all(ranges[j][1] == ranges[j + 1][0] for j in range(gw - 1))
    for t in range(tiles):
        lo, hi = t * nb, (t + 1) * nb
        touching = [j for j, (a, b) in enumerate(ranges) if a < hi and b > lo]
        assert contributors[t] == len(touching)
        assert touching == list(range(touching[0], touching[0] + len(touching)))
        assert len(touching) <= maxc
