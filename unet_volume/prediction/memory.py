"""How much memory one task needs, checked against the workers' before a run starts.

A block too large for its workers does not fail cleanly: the worker is killed for memory, Dask
retries the block on another worker, which dies too, and the run stops after hours with
``KilledWorker``. So the planner estimates a task's peak memory and refuses, before
anything is written, a block that cannot fit, printing the estimate.

The estimates are upper-leaning, within about 2x of peaks measured with ``ru_maxrss`` on CPU
(``benchmarks/block_memory.py``). A prediction block holds its input (read box), its float32
probabilities, their encoded copy and the argmax, and, per tile, the network's activations: at
each level ``l`` of the U-Net ``base * 2**l`` channels over the tile pooled ``l`` times, kept
for the skip connection, plus the working maps of the convolutions. A weight-map block needs
about :data:`WEIGHT_BYTES_PER_VOXEL` bytes per voxel of its read box (distance transforms).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from unet_volume.errors import InputError
from unet_volume.models.config import UNetConfig

MiB = 2**20
WORKER_BASELINE = 256 * MiB
"""A worker process before any block: Python, NumPy, torch, distributed (about 220 MiB)."""
NETWORK_FACTOR = 3
"""Activations held at once, per level's skip map: the skip map itself and two working maps."""
WEIGHT_BYTES_PER_VOXEL = 64
"""A weight-map block, per voxel of its read box (measured: 44 in 2D, 51 in 3D)."""


@dataclass(frozen=True, slots=True)
class MemoryEstimate:
    """A task's estimated peak memory, in named parts (bytes)."""

    parts: Mapping[str, int]

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        """``"1.3 GiB (input 68 MiB, network 1.1 GiB, output 134 MiB)"``."""
        shown = ", ".join(f"{name} {size_text(size)}" for name, size in self.parts.items())
        return f"{size_text(self.total)} ({shown})"


def size_text(size: float) -> str:
    """Bytes as people read them.

    >>> size_text(68 * 2**20), size_text(3.25 * 2**30)
    ('68 MiB', '3.2 GiB')
    """
    if size >= 2**30:
        return f"{size / 2**30:.1f} GiB"
    return f"{size / MiB:.0f} MiB"


def prediction_memory(
    config: UNetConfig,
    tile_input: Sequence[int],
    block_shape: Sequence[int],
    read_shape: Sequence[int],
    *,
    input_itemsize: int,
    output_itemsize: int,
    network_on_host: bool = True,
) -> MemoryEstimate:
    """Peak memory of one prediction task (see the module's docstring for the model).

    ``network_on_host=False`` (GPU workers) leaves the activations out: they live on the GPU.
    """
    block, read = math.prod(block_shape), math.prod(read_shape)
    classes, tile = config.num_classes, math.prod(tile_input)
    parts = {
        "input": config.in_channels * read * input_itemsize,
        # The stored encoding and the segmentation of the whole task; float32 probabilities
        # (and their working copies while encoding) of one tile at a time.
        "output": block * (classes * output_itemsize + 1) + tile * classes * 4 * 3,
    }
    if network_on_host:
        parts["network"] = network_activations(config, tile_input)
    return MemoryEstimate(parts)


def network_activations(config: UNetConfig, tile_input: Sequence[int]) -> int:
    """float32 bytes of a U-Net's activations on one tile, :data:`NETWORK_FACTOR` maps a level."""
    pooled = tile_input[-config.ndim :]
    kept = tile_input[: len(tile_input) - config.ndim]
    floats = 0
    for level in range(config.depth + 1):
        voxels = math.prod(kept) * math.prod(max(1, n >> level) for n in pooled)
        floats += config.base_channels * 2**level * voxels
    return 4 * NETWORK_FACTOR * floats


def weight_memory(read_shape: Sequence[int]) -> MemoryEstimate:
    """Peak memory of one weight-map task reading ``read_shape`` voxels of labels."""
    return MemoryEstimate({"weight map": WEIGHT_BYTES_PER_VOXEL * math.prod(read_shape)})


def check_worker_memory(
    workers: Mapping[str, Mapping[str, Any]], estimate: MemoryEstimate, *, block: str, fix: str
) -> None:
    """Refuse a block that cannot fit the workers' memory limit, printing the estimate.

    ``workers`` is ``client.scheduler_info()["workers"]``; a worker runs as many blocks at
    once as it has threads. Workers without a limit (0 or None), and a cluster with no worker
    yet, are not checked. ``block`` names the block (e.g. its shape), ``fix`` what to change.
    """
    limits = [
        (int(w["memory_limit"]), int(w.get("nthreads", 1)))
        for w in workers.values()
        if w.get("memory_limit")
    ]
    if not limits:
        return
    limit, threads = min(limits)
    need = WORKER_BASELINE + threads * estimate.total
    if need > limit:
        raise InputError(
            f"block {block} needs about {estimate.describe()} per task, {threads} at once per "
            f"worker plus {size_text(WORKER_BASELINE)} for the worker itself: "
            f"{size_text(need)}, more than the workers' memory limit of {size_text(limit)}; "
            f"{fix}"
        )
