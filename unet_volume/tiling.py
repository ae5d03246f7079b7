"""Tile geometry of a valid-convolution U-Net, and the boxes a volume's work is cut into.

The terms (tile, halo, period, stride, block, shard, task, chunk, read and write box) are
defined once, in ``docs/concepts/terms.md``; in short:

- **tile**: one forward pass, ``input_shape -> output_shape``; its **halo** is the context it
  loses per side, ``(input - output) / 2`` (92 voxels for the paper's depth-4 net).
- **period**: ``2**depth`` per pooled axis. A U-Net with max-pooling is equivariant
  only to shifts by whole periods, so tiles whose origins all lie on the period
  lattice reproduce one whole-volume pass exactly.
- **stride**: the step between tiles, ``period * (output // period)`` (384 for a
  388 output): the largest lattice step a tile's output still covers.
- **block**: the output's unit of planning and record keeping, one chunk of every output
  array; a :class:`Region` pairs a box of whole blocks (a block, a shard, a task) with the
  region of the input its tiles need: the box grown by the halo, plus the surplus of the
  last tile (valid outputs are ``4 mod 16`` at depth 4, blocks are multiples of 16, so a tile
  covering a block overhangs it by a few voxels).

The volume frame is always ``(z, y, x)``. A 2D U-Net convolves ``(y, x)`` only: its
z axis has halo 0 and period 1, and a tile's z extent is a batch of slices.

One axis of a region of a depth-3 net (write box ``[0, 40)``; tile output 20,
stride 16, halo 44):

    tiles (output)      [0......20)
                                [16......36)
                                        [32......52)     overhang 12, discarded
    read box      [-44..................................96)   = [0 - 44, 52 + 44)
    write box           [0.................40)
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from unet_volume.errors import GeometryError
from unet_volume.geometry import Box, Shape, as_shape, ceil_div, grid_shape

VOLUME_NDIM = 3
"""Every volume is (z, y, x); channels and classes ride in front."""


@dataclass(frozen=True, slots=True)
class UNetShape:
    """What geometry needs to know of a valid-convolution U-Net, as plain ints.

    ``convs_per_level`` unpadded ``kernel_size`` convolutions per level, ``depth``
    2x pools down and 2x up-convolutions up. Used without torch by planning code;
    :class:`unet_volume.models.unet.UNet` traces its real layers and must agree (tested).
    """

    depth: int
    convs_per_level: int = 2
    kernel_size: int = 3

    @property
    def shrink_per_level(self) -> int:
        return self.convs_per_level * (self.kernel_size - 1)

    @property
    def period(self) -> int:
        return 1 << self.depth

    def output_size(self, input_size: int) -> int | None:
        """Output size for ``input_size`` along one axis, or None if it is not valid."""
        size = input_size
        for _ in range(self.depth):
            size -= self.shrink_per_level
            if size <= 0 or size % 2:
                return None
            size //= 2
        size -= self.shrink_per_level
        if size <= 0:
            return None
        for _ in range(self.depth):
            size = 2 * size - self.shrink_per_level
        return size if size > 0 else None

    def _output_for_bottom(self, bottom: int) -> int:
        size = bottom
        for _ in range(self.depth):
            size = 2 * size - self.shrink_per_level
        return size

    @property
    def halo(self) -> int:
        """Context lost per side: ``6 * 2**depth - 4`` for two 3x3 convs per level."""
        output = self._output_for_bottom(self._min_bottom())
        return (self.input_for_output(output) - output) // 2

    def _min_bottom(self) -> int:
        bottom = 1
        while self._output_for_bottom(bottom) <= 0:
            bottom += 1
        return bottom

    def input_for_output(self, output_size: int) -> int:
        """The input size of a valid ``output_size`` (inverse of :meth:`output_size`)."""
        size = output_size
        for _ in range(self.depth):
            size = (size + self.shrink_per_level) // 2
        size += self.shrink_per_level
        for _ in range(self.depth):
            size = 2 * size + self.shrink_per_level
        if self.output_size(size) != output_size:
            raise GeometryError(
                f"tile output {output_size} is not a valid size for a depth-{self.depth} "
                f"U-Net; nearest valid outputs are {self._nearest_outputs(output_size)}"
            )
        return size

    def min_output_at_least(self, wanted: int) -> int:
        """The smallest valid output size >= ``wanted``."""
        bottom = max(self._min_bottom(), ceil_div(max(wanted, 1), self.period))
        while self._output_for_bottom(bottom) < wanted:
            bottom += 1
        while bottom > self._min_bottom() and self._output_for_bottom(bottom - 1) >= wanted:
            bottom -= 1
        return self._output_for_bottom(bottom)

    def _nearest_outputs(self, size: int) -> str:
        above = self.min_output_at_least(size + 1)
        below = above - self.period
        return f"{below} and {above}" if below > 0 else f"{above}"

    def check_input_size(self, input_size: int) -> int:
        """The output size, or :class:`GeometryError` naming the nearest valid inputs."""
        return check_input_size(self.output_size, input_size, depth=self.depth)


SizeMap = Callable[[int], int | None]
"""A network's output size along one axis for an input size; None where the input is invalid."""


def next_valid_input(output_size: SizeMap, size: int) -> int:
    """The smallest valid input size >= ``size`` (valid sizes recur every period)."""
    return next(s for s in itertools.count(max(size, 1)) if output_size(s) is not None)


def check_input_size(output_size: SizeMap, size: int, *, depth: int, axis: str = "") -> int:
    """The output size of input ``size``, or :class:`GeometryError` naming the nearest valid sizes.

    One rule and one message for the torch-free arithmetic (:class:`UNetShape`) and the
    traced network (:class:`unet_volume.models.unet.UNet`), whose tests check that they agree.

    >>> check_input_size(UNetShape(4).output_size, 570, depth=4)
    Traceback (most recent call last):
    ...
    unet_volume.errors.GeometryError: tile input 570 is not a valid size for a depth-4 U-Net; nearest valid sizes are 556 and 572
    """  # noqa: E501
    output = output_size(size)
    if output is not None:
        return output
    above = next_valid_input(output_size, size + 1)
    below = next((s for s in range(size - 1, 0, -1) if output_size(s) is not None), None)
    nearest = f"sizes are {below} and {above}" if below else f"size is {above}"
    along = f" along {axis}" if axis else ""
    raise GeometryError(
        f"tile input {size}{along} is not a valid size for a depth-{depth} U-Net; "
        f"nearest valid {nearest}"
    )


@dataclass(frozen=True, slots=True)
class TileGeometry:
    """One forward pass in the (z, y, x) volume frame: ``input_shape -> output_shape``.

    >>> g = TileGeometry.for_unet(ndim=2, depth=4, min_output=(1, 388, 388))
    >>> g.input_shape, g.output_shape, g.halo, g.period, g.stride
    ((1, 572, 572), (1, 388, 388), (0, 92, 92), (1, 16, 16), (1, 384, 384))
    """

    input_shape: Shape
    output_shape: Shape
    period: Shape

    def __post_init__(self) -> None:
        for name in ("input_shape", "output_shape", "period"):
            value = tuple(int(v) for v in getattr(self, name))
            if len(value) != VOLUME_NDIM:
                raise ValueError(f"{name} must have {VOLUME_NDIM} values (z, y, x), got {value}")
            object.__setattr__(self, name, value)
        if any((i - o) % 2 or o <= 0 for i, o in zip(self.input_shape, self.output_shape)):
            raise ValueError(f"tile {self.input_shape} -> {self.output_shape} is not centred")
        if any(o < p for o, p in zip(self.output_shape, self.period)):
            raise ValueError(
                f"tile output {self.output_shape} is smaller than the period {self.period}"
            )

    @classmethod
    def for_unet(
        cls, ndim: int, depth: int, *, min_output: Sequence[int], convs_per_level: int = 2
    ) -> TileGeometry:
        """The smallest valid tile whose output covers ``min_output`` (z, y, x).

        A 2D net (``ndim=2``) keeps z as is: halo 0, period 1, output = input.
        """
        if ndim not in (2, 3):
            raise GeometryError(f"a U-Net is 2D or 3D, not {ndim}D; pass ndim=2 or ndim=3")
        wanted = as_shape(min_output, VOLUME_NDIM)
        net = UNetShape(depth, convs_per_level)
        conv_axes = range(VOLUME_NDIM - ndim, VOLUME_NDIM)
        # An output smaller than the period could not step along the lattice (stride 0).
        output = tuple(
            net.min_output_at_least(max(w, net.period)) if a in conv_axes else max(w, 1)
            for a, w in enumerate(wanted)
        )
        inputs = tuple(
            net.input_for_output(o) if a in conv_axes else o for a, o in enumerate(output)
        )
        period = tuple(net.period if a in conv_axes else 1 for a in range(VOLUME_NDIM))
        return cls(inputs, output, period)

    @property
    def halo(self) -> Shape:
        """Voxels of context lost per side (the network's halo)."""
        return tuple((i - o) // 2 for i, o in zip(self.input_shape, self.output_shape))

    @property
    def stride(self) -> Shape:
        """Step between tiles: the largest multiple of the period the output covers."""
        return tuple(p * (o // p) for p, o in zip(self.period, self.output_shape))

    def input_box(self, output_box: Box) -> Box:
        """The input a tile needs for ``output_box``."""
        return output_box.grow(self.halo)


@dataclass(frozen=True, slots=True)
class Region:
    """A box of work: write ``write_box`` of the output from ``read_box`` of the input.

    The box is a block, a shard or a task (see the module's terms); ``index`` is its
    position in the grid of its kind, e.g. ``(3, 0, 7)``.
    """

    index: Shape
    write_box: Box
    read_box: Box


def plan_tiles(write_box: Box, geometry: TileGeometry) -> list[Box]:
    """Tile output boxes covering ``write_box``, origins on the period lattice.

    Tiles start at ``write_box.begin`` (a lattice point for every block, see
    :func:`check_block_shape`) and step by ``geometry.stride``; the last one may
    overhang the write box, its surplus is discarded by the caller.

    >>> g = TileGeometry.for_unet(ndim=2, depth=3, min_output=(1, 20, 20))
    >>> [str(t) for t in plan_tiles(Box((0, 0, 0), (1, 16, 40)), g)]
    ['[0:1, 0:20, 0:20]', '[0:1, 0:20, 16:36]', '[0:1, 0:20, 32:52]']
    """
    per_axis: list[list[int]] = []
    for begin, end, out, step in zip(
        write_box.begin, write_box.end, geometry.output_shape, geometry.stride
    ):
        origins = [begin]
        while origins[-1] + out < end:
            origins.append(origins[-1] + step)
        per_axis.append(origins)
    return [
        Box.from_shape(geometry.output_shape, begin=(z, y, x))
        for z in per_axis[0]
        for y in per_axis[1]
        for x in per_axis[2]
    ]


def read_box_of(write_box: Box, geometry: TileGeometry) -> Box:
    """The input region the tiles of ``write_box`` need (may lie outside the volume)."""
    tiles = plan_tiles(write_box, geometry)
    return geometry.input_box(tiles[0].hull(tiles[-1]))


def check_block_shape(block_shape: Sequence[int], geometry: TileGeometry) -> Shape:
    """Validate a block shape: positive, (z, y, x), each a multiple of the period.

    Blocks start at multiples of the block shape; on the period lattice their tiles
    see the same pooling grid as a whole-volume pass, which makes stitching exact.
    """
    shape = tuple(int(s) for s in block_shape)
    if len(shape) != VOLUME_NDIM or any(s <= 0 for s in shape):
        raise GeometryError(
            f"block shape {tuple(block_shape)} must be 3 positive sizes (z, y, x); "
            "pass e.g. --block-shape 1,512,512"
        )
    for axis, (size, period) in enumerate(zip(shape, geometry.period)):
        if size % period:
            below, above = size // period * period, ceil_div(size, period) * period
            options = f"{below} or {above}" if below else f"{above}"
            raise GeometryError(
                f"block size {size} on axis {'zyx'[axis]} is not a multiple of the network's "
                f"period {period} (2**depth), so tiles would not line up with the pooling grid "
                f"and leave seams; use {options}"
            )
    return shape


def plan_blocks(
    volume_shape: Sequence[int], block_shape: Sequence[int], geometry: TileGeometry
) -> Iterator[Region]:
    """Blocks of ``block_shape`` covering a volume, lazily, in C order.

    Write boxes are disjoint, aligned to ``block_shape`` (so each is exactly one
    output chunk, written by exactly one task) and clipped at the volume's far end;
    an edge block keeps the full halo (its read box reaches past the volume, where
    the reader mirrors).
    """
    shape = check_block_shape(block_shape, geometry)
    volume = Box.from_shape(as_shape(volume_shape, VOLUME_NDIM))
    # The read box depends on the write box's shape alone (tiles start at its origin): worked
    # out once per shape (inner blocks, and the few clipped at the far edges), then shifted.
    reach: dict[Shape, Box] = {}
    for index, write_box in volume.grid(shape):
        if write_box.shape not in reach:
            reach[write_box.shape] = read_box_of(Box.from_shape(write_box.shape), geometry)
        yield Region(index, write_box, reach[write_box.shape].shift(write_box.begin))


def count_blocks(volume_shape: Sequence[int], block_shape: Sequence[int]) -> int:
    """Number of blocks :func:`plan_blocks` yields."""
    return math.prod(grid_shape(volume_shape, block_shape))


def plan_halo_blocks(
    volume_shape: Sequence[int], block_shape: Sequence[int], halo: Sequence[int]
) -> Iterator[Region]:
    """Blocks of ``block_shape`` covering a volume, each reading ``halo`` voxels around it.

    For block-wise work without tiles (weight maps): the read box is the write box grown by
    ``halo``, also at the volume's edges (the caller fills what lies outside).

    >>> [str(b.read_box) for b in plan_halo_blocks((1, 4, 6), (1, 4, 4), (0, 1, 1))]
    ['[0:1, -1:5, -1:5]', '[0:1, -1:5, 3:7]']
    """
    volume = Box.from_shape(as_shape(volume_shape, VOLUME_NDIM))
    for index, write_box in volume.grid(as_shape(block_shape, VOLUME_NDIM)):
        yield Region(index, write_box, write_box.grow(as_shape(halo, VOLUME_NDIM)))


def block_key(prefix: str) -> Callable[[Region], str]:
    """Dask task names for regions: ``prefix`` and the index, e.g. ``predict-shard-3-0-7``.

    The index names the region in logs, the dashboard and errors (and keeps keys unique).
    """

    def key(block: Region) -> str:
        return prefix + "-" + "-".join(map(str, block.index))

    return key
