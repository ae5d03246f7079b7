"""Tile geometry of valid-convolution U-Nets and the block plan."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from unet_volume.errors import GeometryError
from unet_volume.geometry import Box
from unet_volume.tiling import (
    TileGeometry,
    UNetShape,
    check_block_shape,
    count_blocks,
    plan_blocks,
    plan_tiles,
    read_box_of,
)


def test_tiling_paper_numbers() -> None:
    # Ronneberger et al.: 572 -> 388, 92 voxels of context per side; the smallest tile is 188 -> 4.
    net = UNetShape(depth=4)
    assert net.output_size(572) == 388 and net.halo == 92 and net.output_size(188) == 4
    g = TileGeometry.for_unet(ndim=2, depth=4, min_output=(1, 388, 388))
    assert g.input_shape == (1, 572, 572) and g.halo == (0, 92, 92) and g.stride == (1, 384, 384)


@pytest.mark.parametrize(
    ("depth", "halo"),
    [pytest.param(1, 8, id="d1"), pytest.param(3, 44, id="d3"), pytest.param(4, 92, id="d4")],
)
def test_tiling_halo_is_6_times_period_minus_4(depth: int, halo: int) -> None:
    assert UNetShape(depth).halo == halo == 6 * 2**depth - 4


def test_tiling_invalid_input_names_the_nearest_valid_sizes() -> None:
    with pytest.raises(GeometryError, match="nearest valid sizes are 556 and 572"):
        UNetShape(4).check_input_size(570)
    with pytest.raises(GeometryError, match=r"nearest valid size is 188$"):
        UNetShape(4).check_input_size(100)


@given(st.integers(1, 4), st.integers(1, 600))
def test_tiling_min_output_is_the_smallest_valid_output(depth: int, wanted: int) -> None:
    net = UNetShape(depth)
    out = net.min_output_at_least(wanted)
    assert out >= wanted and net.output_size(net.input_for_output(out)) == out
    assert all(
        net.output_size(i) is None or net.output_size(i) < wanted
        for i in range(1, net.input_for_output(out))
    )


def test_tiling_2d_net_keeps_z_unconvolved() -> None:
    g = TileGeometry.for_unet(ndim=2, depth=3, min_output=(5, 10, 30))
    assert g.halo[0] == 0 and g.period[0] == 1 and g.output_shape[0] == 5 == g.input_shape[0]


def test_tiling_block_shape_off_the_period_is_refused_with_the_fix() -> None:
    g = TileGeometry.for_unet(ndim=2, depth=4, min_output=(1, 1, 1))
    with pytest.raises(
        GeometryError, match=r"not a multiple of the network's period 16.*use 496 or 512"
    ):
        check_block_shape((1, 500, 512), g)
    with pytest.raises(GeometryError, match="3 positive sizes"):
        check_block_shape((512, 512), g)
    assert check_block_shape((7, 512, 32), g) == (7, 512, 32)  # z is free for a 2D net


plan_cases = st.tuples(
    st.sampled_from([(2, 2), (2, 3), (3, 2)]),  # (ndim, depth)
    st.tuples(st.integers(1, 40), st.integers(1, 90), st.integers(1, 90)),  # volume
    st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 5)),  # block in periods
    st.integers(1, 40),  # tile output wanted (y, x)
)


@given(plan_cases)
def test_tiling_plan_covers_volume_with_disjoint_aligned_blocks(case: tuple) -> None:
    (ndim, depth), volume, periods, tile = case
    g = TileGeometry.for_unet(ndim, depth, min_output=(1, tile, tile))
    block = tuple(n * p for n, p in zip(periods, g.period))
    hits = np.zeros(volume, dtype=int)
    blocks = list(plan_blocks(volume, block, g))
    assert len(blocks) == count_blocks(volume, block)
    for b in blocks:
        hits[b.write_box.to_slices()] += 1
        assert b.write_box.begin == tuple(i * s for i, s in zip(b.index, block))  # one chunk each
        assert b.read_box.contains(b.write_box.grow(g.halo))
        for t in plan_tiles(b.write_box, g):
            assert all(o % p == 0 for o, p in zip(t.begin, g.period))  # the pooling lattice
            assert b.read_box.contains(g.input_box(t))
    assert (hits == 1).all()


def test_tiling_read_box_is_write_box_plus_halo_plus_last_tile_overhang() -> None:
    # Depth 3: output 20 covers a 16-voxel block with 4 to spare; halo 44 both sides.
    g = TileGeometry.for_unet(ndim=2, depth=3, min_output=(1, 16, 16))
    (block,) = plan_blocks((1, 16, 16), (1, 16, 16), g)
    assert g.output_shape == (1, 20, 20)
    assert block.read_box == Box((0, -44, -44), (1, 64, 64))  # 16 + 4 + 44 = 64


@pytest.mark.parametrize(
    ("volume", "block", "ndim", "tile"),
    [
        pytest.param((3, 50, 47), (1, 16, 16), 2, (1, 16, 16), id="2d-clipped-edges"),
        pytest.param((20, 70, 33), (8, 24, 16), 3, (4, 8, 8), id="3d-several-tiles"),
    ],
)
def test_plan_blocks_gives_every_block_the_read_box_its_tiles_need(
    volume: tuple[int, int, int], block: tuple[int, int, int], ndim: int, tile: tuple[int, ...]
) -> None:
    # plan_blocks works the read box out once per write-box shape and shifts it: the same box
    # as planning each block's tiles, inner blocks and those clipped at the far edges alike.
    geometry = TileGeometry.for_unet(ndim, 2, min_output=tile)
    blocks = list(plan_blocks(volume, block, geometry))
    assert len({b.write_box.shape for b in blocks}) > 1  # clipped edge blocks are among them
    for b in blocks:
        assert b.read_box == read_box_of(b.write_box, geometry), b.index
