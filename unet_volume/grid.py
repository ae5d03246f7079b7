"""How an output is laid out in storage and in tasks: blocks, grouped into shards.

- **block**: the output's chunk, the unit the network's tiles are planned for, and what a
  viewer or a partial read fetches (``--block-shape``, e.g. 1x512x512 or 64^3).
- **shard**: a box of whole blocks, aligned to the shard grid. One Dask task computes one
  shard and writes it at once: with the Zarr v3 sharding codec, one object per array, its
  blocks inside as independently compressed inner chunks. One done marker per shard.

A task that carries several blocks pays Dask's per-task cost (a few milliseconds on the
scheduler, client and worker) and the storage's per-object cost once for all of them: tiny
blocks run at hundreds per second instead of tens, and a terabyte output is tens of thousands
of objects, not tens of millions. :func:`auto_shard_shape` picks the shard from the block and
the volume alone, so the same run always gets the same layout (a resumed run must).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from unet_volume.errors import GeometryError
from unet_volume.geometry import Shape, ceil_div, grid_shape

SHARD_VOXELS = (2**22, 2**26)
"""Voxels per shard the automatic choice aims within: 4 Mi (a write worth an object and a done
marker) to 64 Mi (a shard's outputs held in memory until its one write)."""
MAX_SHARDS = 4096
"""Above this many shards the automatic shard grows (up to 64 Mi voxels): a 10^6-block volume
is planned, recorded and tracked as a few thousand shards (and at most as many tasks)."""
MIN_SHARDS = 64
"""Below this many shards the automatic shard shrinks (to one block): small volumes keep
enough shards to spread over the workers."""


@dataclass(frozen=True, slots=True)
class OutputLayout:
    """Block and shard shapes (z, y, x) over a volume; the shard is a whole number of blocks."""

    volume_shape: Shape
    block_shape: Shape
    shard_shape: Shape

    def __post_init__(self) -> None:
        if any(s % b for s, b in zip(self.shard_shape, self.block_shape)):
            raise GeometryError(
                f"shard shape {self.shard_shape} is not a whole number of blocks "
                f"{self.block_shape}; pass a multiple of the block shape per axis"
            )

    @classmethod
    def unsharded(cls, volume_shape: Sequence[int], block_shape: Sequence[int]) -> OutputLayout:
        """Each block its own shard (its own stored object)."""
        return cls(tuple(volume_shape), tuple(block_shape), tuple(block_shape))

    @property
    def blocks_per_shard(self) -> Shape:
        return tuple(s // b for s, b in zip(self.shard_shape, self.block_shape))

    @property
    def block_grid(self) -> Shape:
        """Blocks per axis: the shape of the done markers."""
        return grid_shape(self.volume_shape, self.block_shape)

    @property
    def shard_grid(self) -> Shape:
        return grid_shape(self.volume_shape, self.shard_shape)

    @property
    def num_blocks(self) -> int:
        return math.prod(self.block_grid)

    @property
    def num_shards(self) -> int:
        return math.prod(self.shard_grid)

    @property
    def sharded(self) -> bool:
        """Whether shards hold several blocks (else each block is its own object, no index)."""
        return self.shard_shape != self.block_shape

    def blocks_in_shard(self, index: Sequence[int]) -> int:
        """Blocks in shard ``index``: fewer at the volume's far edges."""
        return blocks_in(index, self.blocks_per_shard, self.block_grid)

    def objects(self, arrays: int) -> int:
        """Stored objects (files) of ``arrays`` data arrays: one per shard each, plus one done
        marker per shard (metadata and coordinates left out)."""
        return (arrays + 1) * self.num_shards


def blocks_in(index: Sequence[int], per: Sequence[int], grid: Sequence[int]) -> int:
    """Cells of a ``grid`` in group ``index`` of ``per`` cells per axis (blocks in a shard,
    shards in a task): fewer at the grid's far edges.

    >>> blocks_in((1, 0), per=(2, 2), grid=(3, 4))
    2
    """
    return math.prod(min(p, g - i * p) for i, p, g in zip(index, per, grid, strict=True))


def check_shard_shape(
    shard_shape: Sequence[int], block_shape: Shape, *, name: str = "shard", unit: str = "block"
) -> Shape:
    """A shard shape given by a user: 3 positive sizes, each a multiple of the block's.

    Also a task shape (``name="task"``), a multiple of the shard's (``unit="shard"``).
    """
    shape = tuple(int(s) for s in shard_shape)
    if len(shape) != len(block_shape) or any(s <= 0 for s in shape):
        example = "x".join(str(2 * b) for b in block_shape)
        raise GeometryError(
            f"{name} shape {tuple(shard_shape)} must be {len(block_shape)} positive sizes "
            f"(z, y, x); pass e.g. --{name}-shape {example.replace('x', ',')}, or leave it out "
            "to pick one"
        )
    for axis, (size, block) in enumerate(zip(shape, block_shape)):
        if size % block:
            below, above = max(size // block, 1) * block, ceil_div(size, block) * block
            options = f"{below} or {above}" if below != above else f"{above}"
            raise GeometryError(
                f"{name} size {size} on axis {'zyx'[axis]} is not a multiple of the {unit} size "
                f"{block}; use {options}"
            )
    return shape


def auto_shard_shape(
    volume_shape: Sequence[int], block_shape: Shape, *, ndim: int, max_voxels: int | None = None
) -> Shape:
    """The shard a run gets when none is given: a function of the volume and block only.

    Blocks per shard double, one axis at a time, until the shard holds at least 4 Mi voxels
    and the volume at most :data:`MAX_SHARDS` shards, never past 64 Mi voxels (or
    ``max_voxels``), the volume's extent, or so far that fewer than :data:`MIN_SHARDS` shards
    remain. A shard grows on its shortest axis first (the least halo per voxel); a 2D net's
    in y and x before z, so that tasks of whole shards (:mod:`unet_volume.prediction.tasks`) can be
    wide in y and x, where the halo is, within their size.

    >>> auto_shard_shape((1000, 4096, 4096), (1, 512, 512), ndim=2)
    (1, 2048, 2048)
    >>> auto_shard_shape((10, 1024, 1024), (1, 512, 512), ndim=2)
    (1, 512, 512)
    """
    grid = [ceil_div(n, b) for n, b in zip(volume_shape, block_shape)]
    per = [1, 1, 1]
    block_voxels = math.prod(block_shape)
    ceiling = min(SHARD_VOXELS[1], max_voxels or SHARD_VOXELS[1])

    def shards(blocks: Sequence[int]) -> int:
        return math.prod(ceil_div(g, p) for g, p in zip(grid, blocks))

    while True:
        voxels = block_voxels * math.prod(per)
        if voxels >= SHARD_VOXELS[0] and shards(per) <= MAX_SHARDS:
            break
        axis = _next_axis(per, grid, block_shape, ndim)
        if axis is None:
            break
        grown = [p * 2 if a == axis else p for a, p in enumerate(per)]
        if voxels * 2 > ceiling or shards(grown) < MIN_SHARDS:
            break
        per = grown
    return tuple(b * p for b, p in zip(block_shape, per))


def _next_axis(per: list[int], grid: list[int], block: Shape, ndim: int) -> int | None:
    """The axis a shard grows along next, or None when it spans the volume."""
    open_axes = [a for a in range(3) if per[a] < grid[a]]
    if not open_axes:
        return None
    if ndim == 2 and len(open_axes) > 1:
        open_axes = [a for a in open_axes if a != 0]  # z last: it has no halo
    return min(open_axes, key=lambda a: (per[a] * block[a], a))
