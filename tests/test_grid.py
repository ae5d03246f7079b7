"""Blocks grouped into shards: one task and one stored object per shard, the same voxels."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr
from distributed import Client
from hypothesis import given
from hypothesis import strategies as st
from test_bookkeeping import RowsFailPredictor, arange_plan, probe
from test_predict import run_blocks

from unet_volume.errors import BlockError, GeometryError, OutputExistsError
from unet_volume.grid import (
    MAX_SHARDS,
    MIN_SHARDS,
    SHARD_VOXELS,
    OutputLayout,
    auto_shard_shape,
    check_shard_shape,
)
from unet_volume.output.bookkeeping import DONE, done_blocks, done_shards
from unet_volume.output.lifecycle import read_status
from unet_volume.output.prediction import open_prediction
from unet_volume.prediction.run import run_plan
from unet_volume.testing import CropPredictor
from unet_volume.tiling import TileGeometry


@given(
    volume=st.tuples(*(st.integers(1, 5000) for _ in range(3))),
    block=st.sampled_from([(1, 64, 64), (1, 512, 512), (8, 128, 128), (64, 64, 64)]),
    ndim=st.sampled_from([2, 3]),
)
def test_grid_auto_shard_is_whole_blocks_within_the_bounds(
    volume: tuple[int, int, int], block: tuple[int, int, int], ndim: int
) -> None:
    shard = auto_shard_shape(volume, block, ndim=ndim)
    layout = OutputLayout(volume, block, shard)  # refuses a shard of partial blocks
    blocks_per = math.prod(layout.blocks_per_shard)
    assert math.prod(shard) <= max(SHARD_VOXELS[1], math.prod(block))
    if blocks_per > 1:  # grown only while enough tasks are left to spread
        assert layout.num_shards >= MIN_SHARDS
    # Not grown further although it could have: big enough, or few enough tasks, or a bound hit.
    grid = layout.block_grid
    small = math.prod(shard) < SHARD_VOXELS[0] or layout.num_shards > MAX_SHARDS
    if small and layout.num_blocks >= 2 * MIN_SHARDS * blocks_per:
        assert 2 * math.prod(shard) > SHARD_VOXELS[1] or all(
            p >= g for p, g in zip(layout.blocks_per_shard, grid)
        )


def test_grid_auto_shard_grows_a_2d_nets_shards_in_y_and_x_first() -> None:
    # The halo is in y and x: tasks of whole shards must be able to grow wide there, not deep
    # in z, to read their ring of halo chunks seldom (task_plan); z comes once y and x span.
    assert auto_shard_shape((1000, 4096, 4096), (1, 512, 512), ndim=2) == (1, 2048, 2048)
    assert auto_shard_shape((1000, 4096, 4096), (64, 64, 64), ndim=3) == (256, 128, 128)
    assert auto_shard_shape((4000, 16384, 16384), (1, 512, 512), ndim=2) == (1, 8192, 8192)
    assert auto_shard_shape((4000, 1024, 1024), (1, 512, 512), ndim=2) == (4, 1024, 1024)


def test_grid_small_volumes_keep_one_block_per_task() -> None:
    assert auto_shard_shape((10, 1024, 1024), (1, 512, 512), ndim=2) == (1, 512, 512)


@pytest.mark.parametrize(
    ("shard", "match"),
    [
        ((2, 100, 64), "shard size 100 on axis y is not a multiple of the block size 64"),
        ((2, 64), "must be 3 positive sizes"),
        ((0, 64, 64), "must be 3 positive sizes"),
    ],
)
def test_grid_a_shard_of_partial_blocks_is_refused(shard: tuple[int, ...], match: str) -> None:
    with pytest.raises(GeometryError, match=match):
        check_shard_shape(shard, (1, 64, 64))


def test_grid_counts_blocks_per_shard_at_the_far_edges() -> None:
    layout = OutputLayout((5, 20, 20), (1, 8, 8), (2, 16, 16))
    assert (layout.block_grid, layout.shard_grid) == ((5, 3, 3), (3, 2, 2))
    assert layout.blocks_in_shard((0, 0, 0)) == 8
    assert layout.blocks_in_shard((2, 1, 1)) == 1
    total = sum(
        layout.blocks_in_shard((z, y, x)) for z in range(3) for y in range(2) for x in range(2)
    )
    assert total == layout.num_blocks == 45


@pytest.mark.parametrize(
    ("block", "shard"),
    [((1, 8, 8), (2, 16, 24)), ((2, 8, 16), (4, 16, 32))],
)
def test_grid_sharded_output_holds_the_volume_exactly(
    client: Client, tmp_path: Path, block: tuple[int, ...], shard: tuple[int, ...]
) -> None:
    # The crop probe returns each voxel of an arange volume: any voxel of a shard written in
    # the wrong place, or a block of it left out, shows.
    data = np.arange(5 * 23 * 29, dtype=np.float32).reshape(5, 23, 29)
    geometry = TileGeometry.for_unet(2, 3, min_output=block)
    report, got = run_blocks(
        client, tmp_path, CropPredictor(geometry), geometry, data, block, num_classes=1, shard=shard
    )
    np.testing.assert_array_equal(got[0], data)
    layout = OutputLayout(data.shape, block, shard)
    assert report.blocks == layout.num_blocks
    assert done_blocks(str(tmp_path / "out.zarr")) == set(np.ndindex(layout.block_grid))


class ParityPredictor(CropPredictor):
    """Two classes from the crop probe: odd voxels are class 1, even ones class 0."""

    def __call__(self, tile: np.ndarray) -> np.ndarray:
        odd = super().__call__(tile)[0] % 2
        return np.stack([1 - odd, odd])


def test_grid_one_object_per_shard_and_array_and_block_chunks_for_readers(
    client: Client, tmp_path: Path
) -> None:
    data = np.arange(4 * 32 * 32, dtype=np.float32).reshape(4, 32, 32)
    block, shard = (1, 8, 8), (2, 16, 32)
    geometry = TileGeometry.for_unet(2, 3, min_output=block)
    run_blocks(client, tmp_path, ParityPredictor(geometry), geometry, data, block, shard=shard)
    out = tmp_path / "out.zarr"
    layout = OutputLayout(data.shape, block, shard)
    for name in ("probabilities", "segmentation", DONE):
        objects = [p for p in (out / name).rglob("*") if p.is_file() and p.name != "zarr.json"]
        assert len(objects) == layout.num_shards == 4, name
    segmentation = zarr.open_array(out / "segmentation")
    assert (segmentation.chunks, segmentation.shards) == (block, shard)
    dataset = xr.open_zarr(out, zarr_format=3, consolidated=False)
    assert dataset.segmentation.encoding["chunks"] == block
    assert dataset.segmentation.encoding["shards"] == shard
    np.testing.assert_array_equal(dataset.segmentation.values, data % 2)


def test_grid_a_failed_shard_counts_its_blocks_and_resumes_alone(
    client: Client, tmp_path: Path
) -> None:
    # Blocks of 1x4x4 in shards of 1x4x20 (one block row each): rows 3 and 4 fail.
    plan = arange_plan(tmp_path, shard_shape=(1, 4, 20))
    assert plan.layout.num_shards == 5
    with pytest.raises(BlockError, match=r"10 block\(s\) failed: shard \(0, 3, 0\) \(5 blocks\)"):
        run_plan(plan, client, predictor=probe(plan, RowsFailPredictor))
    status = read_status(plan.output_url)
    assert (status.done, status.failed, status.missing, status.total) == (15, 10, 0, 25)
    assert done_shards(plan.output_url) == {(0, 0, 0), (0, 1, 0), (0, 2, 0)}
    resumed = arange_plan(tmp_path, shard_shape=(1, 4, 20))
    report = run_plan(resumed, client, predictor=probe(resumed))
    assert (report.blocks, report.skipped) == (10, 15)
    probabilities = open_prediction(resumed.output_url).probabilities.values
    np.testing.assert_array_equal(probabilities[0], np.arange(400).reshape(1, 20, 20))


def test_grid_another_shard_shape_is_another_run(client: Client, tmp_path: Path) -> None:
    plan = arange_plan(tmp_path, shard_shape=(1, 4, 20))
    with pytest.raises(BlockError):
        run_plan(plan, client, predictor=probe(plan, RowsFailPredictor))
    with pytest.raises(OutputExistsError, match=r"shard_shape: \[1, 4, 20\], now \[1, 4, 4\]"):
        arange_plan(tmp_path, shard_shape=(1, 4, 4))
