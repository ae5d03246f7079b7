"""Tasks of whole shards read each input chunk once; the plan knows what they fetch."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import zarr

from unet_volume.geometry import Box, Shape
from unet_volume.grid import OutputLayout, auto_shard_shape
from unet_volume.io.volumes import Volume, open_volume, read_box
from unet_volume.prediction.tasks import (
    READ_TARGET,
    SPLIT_VOXELS,
    TaskPlan,
    auto_task_shape,
    held_voxels,
    read_estimate,
    shards_of,
)
from unet_volume.tiling import TileGeometry


def stored(
    tmp_path: Path, shape: Shape, chunks: Shape, shards: Shape | None = None
) -> tuple[Volume, np.ndarray]:
    data = np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)
    path = tmp_path / "in.zarr"
    array = zarr.create_array(path, shape=shape, chunks=chunks, shards=shards, dtype="uint8")
    array[...] = data
    return open_volume(path), data


def described(shape: Shape, chunks: Shape) -> Volume:
    """A volume as the planner sees it: shape and chunks, nothing stored."""
    return Volume("memory://planned.zarr", "zarr", shape, 1, "|u1", None, None, chunks)


def fetch_all(volume: Volume, plan: TaskPlan, geometry: TileGeometry, data: np.ndarray) -> int:
    """Read every task's shards as the engine does, checking each read; chunks fetched."""
    fetched = 0
    for task in plan.tasks():
        shards = shards_of(task, plan.layout.shard_shape, geometry)
        with volume.reading(shard.read_box for shard in shards) as reader:
            for shard in shards:
                got = reader.read(shard.read_box)
                np.testing.assert_array_equal(got, read_box(data, shard.read_box))
            assert reader.array.held == 0  # every chunk dropped after its last use
            fetched += reader.count.chunks
    return fetched


CASES = [
    # volume, chunks, block, shard, task, net ndim, depth
    pytest.param((3, 40, 52), (1, 16, 16), (1, 8, 8), (1, 8, 16), (1, 24, 32), 2, 2, id="2d"),
    pytest.param(
        (5, 37, 41), (2, 8, 12), (1, 8, 8), (1, 16, 8), (2, 16, 16), 2, 2, id="2d-z-chunks"
    ),
    pytest.param((13, 21, 19), (4, 8, 8), (4, 4, 4), (4, 8, 4), (8, 8, 8), 3, 2, id="3d"),
    pytest.param((6, 9, 11), (1, 4, 4), (1, 4, 4), (1, 4, 4), (2, 8, 4), 2, 2, id="tiny-mirrored"),
]


@pytest.mark.parametrize(("shape", "chunks", "block", "shard", "task", "ndim", "depth"), CASES)
def test_task_plan_counts_exactly_the_chunks_the_tasks_fetch(
    tmp_path: Path,
    shape: Shape,
    chunks: Shape,
    block: Shape,
    shard: Shape,
    task: Shape,
    ndim: int,
    depth: int,
) -> None:
    volume, data = stored(tmp_path, shape, chunks)
    geometry = TileGeometry.for_unet(ndim, depth, min_output=block)
    layout = OutputLayout(shape, block, shard)
    for task_shape in (shard, task):
        plan = TaskPlan(layout, task_shape)
        estimate = read_estimate(volume, layout, task_shape, geometry)
        assert fetch_all(volume, plan, geometry, data) == estimate.fetched
    # Tasks of several shards fetch less than one task per shard: the halo rings are shared.
    alone = read_estimate(volume, layout, shard, geometry).fetched
    assert read_estimate(volume, layout, task, geometry).fetched < alone


def test_task_plan_a_moved_read_counts_its_extra_voxel(tmp_path: Path) -> None:
    # A volume read moved onto its labels' registration reads one voxel more per side.
    volume, _ = stored(tmp_path, (2, 40, 40), (1, 8, 8))
    moved = replace(volume, offset=(0.0, 0.5, 0.25))
    geometry = TileGeometry.for_unet(2, 1, min_output=(1, 8, 8))
    layout = OutputLayout(volume.shape, (1, 8, 8), (1, 8, 8))
    plan = TaskPlan(layout, (1, 8, 8))
    fetched = 0
    for task in plan.tasks():
        shards = shards_of(task, layout.shard_shape, geometry)
        with moved.reading(shard.read_box for shard in shards) as reader:
            for shard in shards:
                reader.read(shard.read_box)
            fetched += reader.count.chunks
    assert fetched == read_estimate(moved, layout, (1, 8, 8), geometry).fetched
    assert fetched > read_estimate(volume, layout, (1, 8, 8), geometry).fetched


def test_task_plan_sharded_inputs_are_read_by_their_inner_chunks(tmp_path: Path) -> None:
    volume, data = stored(tmp_path, (2, 48, 48), (1, 8, 8), shards=(1, 16, 16))
    assert (volume.chunks, volume.objects) == ((1, 8, 8), (1, 16, 16))
    geometry = TileGeometry.for_unet(2, 1, min_output=(1, 8, 8))
    layout = OutputLayout(volume.shape, (1, 8, 8), (1, 16, 16))
    plan = TaskPlan(layout, (1, 16, 16))
    estimate = read_estimate(volume, layout, (1, 16, 16), geometry)
    assert fetch_all(volume, plan, geometry, data) == estimate.fetched
    # The halo reads the inner chunks it touches, not the whole shards that hold them.
    whole = read_estimate(replace(volume, chunks=(1, 16, 16)), layout, (1, 16, 16), geometry)
    assert estimate.stored == 2 * 6 * 6 and estimate.fetched < whole.fetched * 2 * 2


ISSUE_LAYOUTS = [
    pytest.param((16, 1536, 1536), (1, 512, 512), 2, id="1x512x512"),
    pytest.param((12, 1024, 1024), (4, 256, 256), 2, id="4x256x256"),
    pytest.param((192, 256, 256), (64, 64, 64), 3, id="64^3-3d"),
    pytest.param((16, 1536, 1536), (1, 1024, 1024), 2, id="1x1024x1024"),
    pytest.param((256, 512, 512), (128, 128, 128), 3, id="128^3-3d"),
    pytest.param((16, 1536, 1536), (1, 128, 128), 2, id="1x128x128"),
    pytest.param((2000, 20000, 20000), (1, 512, 512), 2, id="terabyte-2d"),
]


@pytest.mark.parametrize(("shape", "chunks", "ndim"), ISSUE_LAYOUTS)
def test_task_plan_auto_tasks_read_the_input_about_once(
    shape: Shape, chunks: Shape, ndim: int
) -> None:
    depth = {2: 4, 3: 3}[ndim]
    block = {2: (1, 512, 512), 3: (64, 64, 64)}[ndim]
    geometry = TileGeometry.for_unet(ndim, depth, min_output=block)
    layout = OutputLayout(shape, block, auto_shard_shape(shape, block, ndim=ndim))
    volume = described(shape, chunks)
    one_shard = read_estimate(volume, layout, layout.shard_shape, geometry).amplification
    task = auto_task_shape(volume, layout, geometry, slots=2)  # a default local cluster's
    assert read_estimate(volume, layout, task, geometry).amplification <= READ_TARGET
    assert one_shard > READ_TARGET  # a task per shard fetches the halo's whole chunks again
    assert all(t % s == 0 for t, s in zip(task, layout.shard_shape))


@pytest.mark.parametrize("slots", [1, 8, 64, 256])
def test_task_plan_a_large_volume_keeps_every_slot_busy(slots: int) -> None:
    shape, chunks = (1024, 1024, 1024), (128, 128, 128)  # 2^30 voxels: a task at most
    geometry = TileGeometry.for_unet(3, 3, min_output=(64, 64, 64))
    layout = OutputLayout(shape, (64, 64, 64), auto_shard_shape(shape, (64, 64, 64), ndim=3))
    task = auto_task_shape(described(shape, chunks), layout, geometry, slots=slots)
    tasks = TaskPlan(layout, task).num_tasks
    assert tasks >= min(slots, math.prod(shape) // SPLIT_VOXELS)  # 16 tasks of 2^26 at most
    if slots <= 8:  # 2^30 / 8 voxels a task: the ring between tasks is thin enough
        assert read_estimate(described(shape, chunks), layout, task, geometry).amplification < 2


def test_task_plan_a_small_volume_is_not_split_to_fill_slots() -> None:
    shape, chunks = (192, 256, 256), (64, 64, 64)  # 2^24 voxels: under SPLIT_VOXELS a slot
    geometry = TileGeometry.for_unet(3, 3, min_output=(64, 64, 64))
    layout = OutputLayout(shape, (64, 64, 64), auto_shard_shape(shape, (64, 64, 64), ndim=3))
    volume = described(shape, chunks)
    alone = auto_task_shape(volume, layout, geometry, slots=1)
    assert auto_task_shape(volume, layout, geometry, slots=16) == alone
    assert math.prod(shape) < 16 * SPLIT_VOXELS


def test_task_plan_tasks_hold_every_shard_once_and_skip_the_done_ones() -> None:
    layout = OutputLayout((5, 40, 24), (1, 8, 8), (2, 8, 8))
    geometry = TileGeometry.for_unet(2, 2, min_output=(1, 8, 8))
    plan = TaskPlan(layout, (4, 16, 16))
    every = [s.index for t in plan.tasks() for s in shards_of(t, layout.shard_shape, geometry)]
    assert sorted(every) == sorted(np.ndindex(*layout.shard_grid))
    done = {*np.ndindex(2, 2, 2), (2, 4, 2)}  # all of task (0, 0, 0), one shard of another
    left = [s.index for t in plan.tasks(done) for s in shards_of(t, layout.shard_shape, geometry)]
    assert sorted(left) == sorted(set(every) - done)
    assert (0, 0, 0) not in [t.index for t in plan.tasks(done)]  # all its shards are done


def test_task_plan_a_task_holds_no_more_chunks_than_planned(tmp_path: Path) -> None:
    volume, _ = stored(tmp_path, (1, 96, 96), (1, 8, 8))
    geometry = TileGeometry.for_unet(2, 2, min_output=(1, 8, 8))
    layout = OutputLayout(volume.shape, (1, 8, 8), (1, 8, 8))
    (task,) = TaskPlan(layout, (1, 96, 96)).tasks()
    shards = shards_of(task, layout.shard_shape, geometry)
    most = 0
    with volume.reading(shard.read_box for shard in shards) as reader:
        for shard in shards:
            reader.read(shard.read_box)
            most = max(most, reader.array.held)
    held = held_voxels(volume, layout, (1, 96, 96), geometry)
    assert most * 8 * 8 <= held < 12 * 12 * 8 * 8  # a band of rows, not the whole task


def test_task_plan_reading_a_box_once_reads_as_the_volume_does(tmp_path: Path) -> None:
    volume, data = stored(tmp_path, (3, 30, 20), (2, 7, 9))
    box = Box((-2, -5, 3), (4, 33, 25))
    with volume.reading([box]) as reader:
        np.testing.assert_array_equal(reader.read(box), volume.read(box))
        np.testing.assert_array_equal(reader.read(box), read_box(data, box))  # unplanned: again
