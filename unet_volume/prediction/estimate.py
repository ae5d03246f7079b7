"""What a run will cost before it runs: the block shape to use, and the plan in numbers.

``unet-volume plan`` (and the first lines of ``unet-volume predict``) prints, for a checked
:class:`~unet_volume.prediction.run.PredictionPlan`: the block and shard shapes, the halo overhead
(input voxels read per output voxel), the blocks, tasks and stored objects, the memory a worker
needs, and, from one block timed on one worker, the run time on the cluster at hand.

``--block-shape auto`` picks the block from the network's valid sizes (a multiple of its
period), the input's chunks (a block reads whole chunks, or an aligned part of one), the
workers' memory limit, and the device: bigger on a GPU, where a bigger tile amortises the
per-pass cost and the activations live in GPU memory.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from distributed import Client

from unet_volume.geometry import Box, Shape, ceil_div
from unet_volume.models.config import UNetConfig
from unet_volume.output.prediction import PredictionStore
from unet_volume.prediction.engine import shared_predictor
from unet_volume.prediction.memory import (
    WORKER_BASELINE,
    MemoryEstimate,
    prediction_memory,
    size_text,
)
from unet_volume.prediction.tasks import ReadEstimate, held_voxels, read_estimate
from unet_volume.prediction.worker import predict_tiles
from unet_volume.tiling import TileGeometry, read_box_of

AUTO_SIDE = {
    ("cpu", 2): (1, 512),
    ("gpu", 2): (4, 1024),
    ("cpu", 3): (64, 64),
    ("gpu", 3): (128, 128),
}
"""(z, y/x) sides the automatic block aims at, by device and network ndim."""


def auto_block_shape(
    config: UNetConfig,
    volume_shape: Shape,
    input_chunks: Sequence[int] | None,
    *,
    on_gpu: bool,
    memory_limit: int | None = None,
    input_itemsize: int = 1,
) -> Shape:
    """The block for ``--block-shape auto``: device size, aligned to the input's chunks,
    halved until one task fits the workers' memory limit.

    >>> from unet_volume.models.config import UNetConfig
    >>> auto_block_shape(UNetConfig(ndim=2), (100, 4096, 4096), (1, 1024, 1024), on_gpu=False)
    (1, 512, 512)
    >>> auto_block_shape(UNetConfig(ndim=2), (100, 4096, 4096), (1, 1024, 1024), on_gpu=True)
    (4, 1024, 1024)
    """
    period = 2**config.depth
    z_side, side = AUTO_SIDE[("gpu" if on_gpu else "cpu", config.ndim)]
    chunks = tuple(input_chunks or volume_shape)[-3:]
    wanted = [z_side, side, side]
    conv_axes = range(3 - config.ndim, 3)
    shape = [
        _aligned(w, c, n, period if a in conv_axes else 1)
        for a, (w, c, n) in enumerate(zip(wanted, chunks, volume_shape))
    ]
    while memory_limit and _task_memory(config, tuple(shape), input_itemsize, on_gpu) > (
        memory_limit - WORKER_BASELINE
    ):
        axis = max(conv_axes, key=lambda a: shape[a])
        step = period if axis in conv_axes else 1
        if shape[axis] // 2 < step or shape[axis] // 2 % step:
            break
        shape[axis] //= 2
    return tuple(shape)


def _aligned(wanted: int, chunk: int, size: int, period: int) -> int:
    """A block side near ``wanted``, a multiple of ``period``, that reads whole input chunks
    (a multiple of ``chunk``) or an aligned part of one (``chunk`` divided by a power of 2)."""
    wanted = min(wanted, ceil_div(size, period) * period)
    if chunk % period == 0:
        side = chunk
        while side * 2 <= wanted:
            side *= 2
        while side > wanted and (side // 2) % period == 0 and side // 2 >= period:
            side //= 2
        return side
    return max(period, wanted // period * period)


def _task_memory(config: UNetConfig, block: Shape, input_itemsize: int, on_gpu: bool) -> int:
    geometry = TileGeometry.for_unet(config.ndim, config.depth, min_output=block)
    return prediction_memory(
        config,
        geometry.input_shape,
        block,
        read_box_of(Box.from_shape(block), geometry).shape,
        input_itemsize=input_itemsize,
        output_itemsize=1,
        network_on_host=not on_gpu,
    ).total


@dataclass(frozen=True, slots=True)
class PlanSummary:
    """A run's plan in numbers, as ``unet-volume plan`` prints it."""

    block_shape: Shape
    shard_shape: Shape
    task_shape: Shape
    volume_shape: Shape
    blocks: int
    shards: int
    tasks: int
    objects: int
    read: ReadEstimate
    chunks: Shape
    read_per_output: float
    compute_per_output: float
    memory: MemoryEstimate
    threads_per_worker: int
    workers: int
    seconds_per_block: float | None = None

    @property
    def worker_memory(self) -> int:
        return WORKER_BASELINE + self.threads_per_worker * self.memory.total

    @property
    def estimated_seconds(self) -> float | None:
        if self.seconds_per_block is None or not self.workers:
            return None
        return self.blocks * self.seconds_per_block / self.workers

    def lines(self) -> list[str]:
        fmt = "x".join
        lines = [
            f"blocks: {self.blocks:,} of {fmt(map(str, self.block_shape))} over a "
            f"{fmt(map(str, self.volume_shape))} volume",
            f"shards: {self.shards:,} of {fmt(map(str, self.shard_shape))}; "
            f"{self.objects:,} stored objects",
            f"tasks: {self.tasks:,} of {fmt(map(str, self.task_shape))} "
            f"({math.prod(t // s for t, s in zip(self.task_shape, self.shard_shape)):,} "
            "shard(s) each, read together)",
            f"input read: {self.read.amplification:.2f}x the stored chunks "
            f"({self.read.fetched:,} fetched of {self.read.stored:,} chunks of "
            f"{fmt(map(str, self.chunks))})",
            f"halo overhead: {self.read_per_output:.2f} input voxels read and "
            f"{self.compute_per_output:.2f} computed per output voxel",
            f"memory per worker: {size_text(self.worker_memory)} ({self.threads_per_worker} "
            f"task(s) of {self.memory.describe()}, plus {size_text(WORKER_BASELINE)})",
        ]
        if self.estimated_seconds is not None:
            assert self.seconds_per_block is not None
            lines.append(
                f"estimated run time: {_duration(self.estimated_seconds)} on {self.workers} "
                f"worker thread(s) ({self.seconds_per_block * 1000:.0f} ms per block, timed "
                "on one worker)"
            )
        return lines


def summarize(plan: Any, workers: Mapping[str, Mapping[str, Any]], on_gpu: bool) -> PlanSummary:
    """The numbers of ``plan`` (a :class:`~unet_volume.prediction.run.PredictionPlan`) on
    ``workers``
    (``client.scheduler_info()["workers"]``; empty: no cluster yet)."""
    layout, geometry = plan.layout, plan.geometry
    interior = Box.from_shape(plan.shard_shape)
    read = read_box_of(interior, geometry)
    tiles = math.prod(geometry.input_shape) / math.prod(geometry.output_shape)
    memory = task_memory(plan, on_gpu=on_gpu)
    threads = [int(w.get("nthreads", 1)) for w in workers.values()]
    tasks = plan.tasks
    return PlanSummary(
        plan.block_shape,
        plan.shard_shape,
        tasks.task_shape,
        plan.volume.shape,
        layout.num_blocks,
        layout.num_shards,
        tasks.num_tasks,
        layout.objects(arrays=2),
        read_estimate(plan.volume, layout, tasks.task_shape, geometry),
        plan.volume.chunks or plan.volume.shape,
        read.size / interior.size,
        tiles,
        memory,
        max(threads, default=1),
        sum(threads),
    )


def task_memory(plan: Any, *, on_gpu: bool) -> MemoryEstimate:
    """Peak memory of one task of ``plan`` (a :class:`~unet_volume.prediction.run.PredictionPlan`):
    one shard at a time, and the input chunks its reader holds between shards."""
    geometry, volume = plan.geometry, plan.volume
    shard = prediction_memory(
        plan.info.config,
        geometry.input_shape,
        plan.shard_shape,
        read_box_of(Box.from_shape(plan.shard_shape), geometry).shape,
        input_itemsize=volume.read_itemsize,
        output_itemsize=np.dtype(plan.output_dtype).itemsize,
        network_on_host=not on_gpu,
    )
    held = held_voxels(volume, plan.layout, plan.tasks.task_shape, geometry)
    return MemoryEstimate({**shard.parts, "input chunks": held * np.dtype(volume.dtype).itemsize})


def time_one_block(client: Client, plan: Any, predictor: Any) -> float:
    """Seconds one block takes on one worker: read, predict (the model loaded), encode.

    Run twice in one task, the second timed: the first builds the network on the worker.
    """
    block = Box.from_shape(plan.block_shape)
    future = client.submit(
        _timed_block,
        plan.volume,
        block,
        read_box_of(block, plan.geometry),
        shared_predictor(client, predictor),  # its weights travel as one task, as in a run
        plan.geometry,
        pure=False,
    )
    seconds: float = future.result()
    return seconds


def _timed_block(volume: Any, write: Box, read: Box, predictor: Any, geometry: Any) -> float:
    store = PredictionStore("", "uint8")
    seconds = 0.0
    for _ in range(2):
        start = time.perf_counter()
        data = volume.read(read)
        predict_tiles(data, read, write, predictor=predictor, geometry=geometry, store=store)
        seconds = time.perf_counter() - start
    return seconds


def _duration(seconds: float) -> str:
    """``"2 h 05 min"``, ``"4 min 10 s"``, ``"12 s"``."""
    if seconds >= 3600:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"
    if seconds >= 60:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{seconds:.0f} s"
