"""Tasks: boxes of whole shards, each read from the input once, sized so that the input is
read about once in all.

A shard's read box is its write box grown by the network's halo (92 voxels a side for the
paper's net). A store hands out whole chunks: a shard alone reads every chunk its halo touches,
and its neighbours read them again, 5 to 16 times the stored bytes for the usual chunkings
(measured over HTTP). So one task computes a box of shards, reading through one
:class:`~unet_volume.io.chunk_cache.ChunkCache`: each chunk the task's shards touch is fetched
once, and only the chunks of the ring around the task are fetched by two tasks. A task grows,
an axis at a time, until the ring is a small part of what it reads
(:data:`READ_TARGET`), or it would hold more than :data:`TASK_VOXELS`.

The read amplification (chunks fetched over chunks stored) is exact, worked out from the task
grid before any read, so ``unet-volume plan`` prints what the run will fetch. Shards stay the
unit of writing and of the done markers: a resumed task skips its shards already done.

Along one axis of 3 chunks (1536 voxels), shards of one chunk, halo 92: a task per shard
fetches 2 + 3 + 2 chunks (2.33x); one task over the three fetches each chunk once::

    chunks      [0......512)[512.....1024)[1024....1536)
    shard 1     [-92......604)                            (mirrored: [0, 604))
    shard 2             [420..............1116)
    shard 3                          [932..............1628) (mirrored: [932, 1536))
"""

from __future__ import annotations

import functools
import math
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field

from unet_volume.geometry import Box, Shape, ceil_div
from unet_volume.grid import OutputLayout
from unet_volume.io.volumes import Volume
from unet_volume.label_offset import offset_reach
from unet_volume.tiling import Region, TileGeometry, read_box_of

READ_TARGET = 1.1
"""Chunks fetched per chunk stored at which a task stops growing."""
TASK_VOXELS = 2**30
"""Output voxels one task may hold at most (its shards are written one at a time)."""
SPLIT_VOXELS = 2**26
"""Tasks stop growing before they are fewer than the workers' slots, or than the volume holds
this many output voxels: a volume of a few times this is read once by a few tasks (one, often),
while all the slots would buy seconds at the price of reading the rings between the tasks
again (1.5 to 2x the stored chunks, for the small 3D layouts of the benchmark)."""


@dataclass(frozen=True, slots=True)
class Task:
    """One Dask task: the shards of ``box`` (an index ``index`` in the task grid), in C order,
    but those in ``done`` (shard indices), done by an earlier run."""

    index: Shape
    box: Box
    done: frozenset[Shape] = field(default=frozenset())


@dataclass(frozen=True, slots=True)
class TaskPlan:
    """The task grid over an output's shards: ``task_shape`` is a whole number of shards."""

    layout: OutputLayout
    task_shape: Shape

    @property
    def shards_per_task(self) -> Shape:
        return tuple(t // s for t, s in zip(self.task_shape, self.layout.shard_shape))

    @property
    def num_tasks(self) -> int:
        return math.prod(ceil_div(n, t) for n, t in zip(self.layout.volume_shape, self.task_shape))

    def tasks(self, done: Collection[Shape] = ()) -> Iterator[Task]:
        """The tasks with a shard left to do, lazily, in C order."""
        for index, box in Box.from_shape(self.layout.volume_shape).grid(self.task_shape):
            shards = self.shard_indices(index)
            finished = frozenset(s for s in shards if s in done) if done else frozenset()
            if len(finished) < len(shards):
                yield Task(index, box, finished)

    def shard_indices(self, task: Sequence[int]) -> list[Shape]:
        """The shard indices of task ``task``, in C order (fewer at the volume's far edges)."""
        per, grid = self.shards_per_task, self.layout.shard_grid
        ranges = [range(i * p, min((i + 1) * p, g)) for i, p, g in zip(task, per, grid)]
        return [(z, y, x) for z in ranges[0] for y in ranges[1] for x in ranges[2]]


def shards_of(task: Task, shard_shape: Shape, geometry: TileGeometry) -> list[Region]:
    """The shards ``task`` computes, not done yet, with their read boxes, in C order."""
    blocks = []
    for offset, write_box in task.box.grid(shard_shape):
        index = tuple(t // s + o for t, s, o in zip(task.box.begin, shard_shape, offset))
        if index not in task.done:
            blocks.append(Region(index, write_box, read_box_of(write_box, geometry)))
    return blocks


def task_read_box(box: Box, shard_shape: Shape, geometry: TileGeometry) -> Box:
    """What the shards of task ``box`` read together (may reach outside the volume)."""
    first = Box.from_shape(shard_shape, begin=box.begin).intersect(box)
    last_begin = tuple(b + (e - b - 1) // s * s for b, e, s in zip(box.begin, box.end, shard_shape))
    last = Box(last_begin, box.end)
    return read_box_of(first, geometry).hull(read_box_of(last, geometry))


@dataclass(frozen=True, slots=True)
class ReadEstimate:
    """What a run's tasks fetch from the input, in stored chunks (exact, before any read)."""

    fetched: int
    stored: int

    @property
    def amplification(self) -> float:
        return self.fetched / self.stored if self.stored else 1.0


def read_estimate(
    volume: Volume, layout: OutputLayout, task_shape: Shape, geometry: TileGeometry
) -> ReadEstimate:
    """The chunks a run's tasks fetch, counted axis by axis.

    A task's fetched chunks are a product of one chunk range per axis, and the range along an
    axis depends on the task's place along that axis alone; so the sum over the task grid is
    the product, over axes, of the sums along each.
    """
    fetched = math.prod(
        fetched_along(volume, layout, geometry, axis, task_shape[axis]) for axis in range(3)
    )
    return ReadEstimate(fetched, stored_chunks(volume))


@functools.lru_cache(maxsize=256)
def fetched_along(
    volume: Volume, layout: OutputLayout, geometry: TileGeometry, axis: int, size: int
) -> int:
    """Chunks fetched along ``axis`` by the row of tasks of ``size`` voxels on it, summed.

    Each task is taken one voxel thick on the other axes: its window along ``axis`` depends
    on its place along it alone. Cached: the search of :func:`auto_task_shape` asks again.
    """
    n, chunk = layout.volume_shape[axis], (volume.chunks or volume.shape)[axis]
    reach: dict[int, Box] = {}  # the read box of a task at 0 depends on its extent alone
    total = 0
    for begin in range(0, n, size):
        extent = min(size, n - begin)
        if extent not in reach:
            shape = tuple(extent if a == axis else 1 for a in range(3))
            reach[extent] = task_read_box(Box.from_shape(shape), layout.shard_shape, geometry)
        moved = reach[extent].shift(tuple(begin if a == axis else 0 for a in range(3)))
        window = volume.window(moved)
        total += ceil_div(window.end[axis], chunk) - window.begin[axis] // chunk
    return total


def stored_chunks(volume: Volume) -> int:
    """The chunks ``volume`` holds, in its read unit (a Zarr v3 shard's inner chunks)."""
    chunks = volume.chunks or volume.shape
    return math.prod(ceil_div(n, c) for n, c in zip(volume.shape, chunks))


def auto_task_shape(
    volume: Volume,
    layout: OutputLayout,
    geometry: TileGeometry,
    *,
    slots: int = 1,
    target: float = READ_TARGET,
    max_voxels: int = TASK_VOXELS,
) -> Shape:
    """The task a run gets when none is given: one shard, doubled along the axis that cuts the
    read amplification most, while that cuts it, until it is at most ``target``; never past
    ``max_voxels`` output voxels or the volume, nor to fewer tasks than ``slots`` (the tasks
    the workers run at once), or than the volume holds :data:`SPLIT_VOXELS`.

    A function of the volume's shape and chunks, the layout, the geometry and the slots alone;
    the task shape changes how a run reads, never what it writes, so a run may resume with
    another.
    """
    shard, grid = layout.shard_shape, layout.shard_grid
    per = [1, 1, 1]
    keep = max(1, min(slots, math.prod(layout.volume_shape) // SPLIT_VOXELS))

    def shaped(blocks: Sequence[int]) -> Shape:
        return tuple(p * s for p, s in zip(blocks, shard))

    def measure(blocks: Sequence[int]) -> float:
        return read_estimate(volume, layout, shaped(blocks), geometry).amplification

    best = measure(per)
    while best > target:
        options = []
        for axis in range(3):
            if per[axis] >= grid[axis]:
                continue
            grown = [min(2 * p, g) if a == axis else p for a, (p, g) in enumerate(zip(per, grid))]
            extent = (min(p * s, n) for p, s, n in zip(grown, shard, layout.volume_shape))
            if (
                math.prod(extent) <= max_voxels
                and TaskPlan(layout, shaped(grown)).num_tasks >= keep
            ):
                options.append((measure(grown), axis, grown))
        if not options or min(options)[0] >= best:
            break
        best, _, per = min(options)
    return shaped(per)


def held_voxels(
    volume: Volume, layout: OutputLayout, task_shape: Shape, geometry: TileGeometry
) -> int:
    """At most the stored voxels (all channels) a task holds decoded at once.

    Shards go in C order, and the windows of successive layers of shards along the task's
    outermost axis of several shards move one way: a chunk held between an earlier read and a
    later one lies in the window of the current layer. So a task holds at most the chunks of
    one layer's read box, wherever it lies on the chunk grid.
    """
    per = [t // s for t, s in zip(task_shape, layout.shard_shape)]
    outer = next((a for a, p in enumerate(per) if p > 1), None)
    band = list(task_shape)
    if outer is not None:
        band[outer] = layout.shard_shape[outer]
    box = Box.from_shape(tuple(min(b, n) for b, n in zip(band, layout.volume_shape)))
    reach = task_read_box(box, layout.shard_shape, geometry).grow(offset_reach(volume.offset))
    chunks = volume.chunks or volume.shape
    counts = (
        min(ceil_div(extent, c) + 1, ceil_div(n, c))
        for extent, c, n in zip(reach.shape, chunks, volume.shape)
    )
    return volume.channels * math.prod(counts) * math.prod(chunks)
