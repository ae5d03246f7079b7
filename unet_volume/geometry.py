"""Boxes of voxel coordinates: the vocabulary every other module speaks.

A :class:`Box` is a half-open integer region ``[begin, end)`` per axis, in voxels.
Volumes, chunks, blocks, tiles, halos and read regions are all boxes, so the
arithmetic of overlap-tile prediction (grow a write box by the halo, intersect it
with the volume, mirror what falls outside) is written once, here, and tested
exhaustively. This module imports only the standard library.

Usage:

>>> volume = Box.from_shape((25, 512, 512))
>>> write = Box((0, 0, 448), (1, 64, 512))
>>> read = write.grow((0, 92, 92), (0, 92, 92))
>>> read
Box([0:1, -92:156, 356:604])
>>> read.intersect(volume)
Box([0:1, 0:156, 356:512])
>>> read.intersect(volume).shape
(1, 156, 156)
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

Shape = tuple[int, ...]
"""A tuple of non-negative voxel counts, one per axis."""


def as_shape(values: int | Sequence[int], ndim: int) -> Shape:
    """Broadcast an int to ``ndim`` axes, or check that a sequence has ``ndim`` ints.

    >>> as_shape(3, 2)
    (3, 3)
    """
    if isinstance(values, int):
        return (values,) * ndim
    result = tuple(int(v) for v in values)
    if len(result) != ndim:
        raise ValueError(f"expected {ndim} values, got {len(result)}: {tuple(values)}")
    return result


def ceil_div(a: int, b: int) -> int:
    """Integer division rounding up: ``ceil_div(7, 2) == 4``.

    >>> ceil_div(-7, 2)
    -3
    """
    return -(-a // b)


def grid_shape(shape: Sequence[int], step: Sequence[int]) -> Shape:
    """Boxes of ``step`` per axis that cover ``shape`` (the last ones may stick out).

    >>> grid_shape((5, 40, 24), (2, 16, 16))
    (3, 3, 2)
    """
    return tuple(ceil_div(n, s) for n, s in zip(shape, step, strict=True))


def within(sizes: Sequence[int], volume: Sequence[int], unit: Sequence[int]) -> Shape:
    """``sizes`` no larger than ``volume`` rounded up to whole ``unit``s, axis by axis: a
    block, shard or chunk that still holds whole units and no more than the volume needs.

    >>> within((64, 64), (100, 10), (16, 4))
    (64, 12)
    """
    return tuple(min(s, ceil_div(n, u) * u) for s, n, u in zip(sizes, volume, unit))


@dataclass(frozen=True, slots=True)
class Box:
    """A half-open box ``[begin, end)`` of integer voxel coordinates.

    Boxes may lie partly outside a volume (a read box at the volume border does):
    coordinates can be negative. An empty box has ``begin == end`` on some axis.
    """

    begin: Shape
    end: Shape

    def __post_init__(self) -> None:
        begin, end = tuple(int(b) for b in self.begin), tuple(int(e) for e in self.end)
        if len(begin) != len(end):
            raise ValueError(f"box begin {begin} and end {end} have different ranks")
        if any(e < b for b, e in zip(begin, end)):
            raise ValueError(f"box end {end} lies before its begin {begin}")
        object.__setattr__(self, "begin", begin)
        object.__setattr__(self, "end", end)

    @classmethod
    def from_shape(cls, shape: Sequence[int], begin: Sequence[int] | None = None) -> Box:
        """The box of ``shape`` starting at ``begin`` (the origin by default).

        >>> Box.from_shape((2, 3), begin=(1, 1))
        Box([1:3, 1:4])
        """
        start = tuple(begin) if begin is not None else (0,) * len(shape)
        return cls(start, tuple(b + s for b, s in zip(start, shape, strict=True)))

    @property
    def ndim(self) -> int:
        return len(self.begin)

    @property
    def shape(self) -> Shape:
        return tuple(e - b for b, e in zip(self.begin, self.end))

    @property
    def size(self) -> int:
        """Number of voxels in the box."""
        n = 1
        for s in self.shape:
            n *= s
        return n

    def is_empty(self) -> bool:
        return any(s == 0 for s in self.shape)

    def grow(self, low: int | Sequence[int], high: int | Sequence[int] | None = None) -> Box:
        """Extend by ``low`` voxels below and ``high`` (default: ``low``) above, per axis.

        >>> Box((4, 4), (8, 8)).grow(2, (0, 1))
        Box([2:8, 2:9])
        """
        lo = as_shape(low, self.ndim)
        hi = lo if high is None else as_shape(high, self.ndim)
        return Box(
            tuple(b - d for b, d in zip(self.begin, lo)),
            tuple(e + d for e, d in zip(self.end, hi)),
        )

    def shrink(self, low: int | Sequence[int], high: int | Sequence[int] | None = None) -> Box:
        """The inverse of :meth:`grow`.

        >>> Box((2, 2), (9, 9)).shrink(2)
        Box([4:7, 4:7])
        """
        lo = as_shape(low, self.ndim)
        hi = lo if high is None else as_shape(high, self.ndim)
        return self.grow(tuple(-d for d in lo), tuple(-d for d in hi))

    def shift(self, offset: int | Sequence[int]) -> Box:
        """Translate by ``offset``.

        >>> Box((0, 0), (2, 2)).shift((10, -1))
        Box([10:12, -1:1])
        """
        d = as_shape(offset, self.ndim)
        return Box(
            tuple(b + o for b, o in zip(self.begin, d)),
            tuple(e + o for e, o in zip(self.end, d)),
        )

    def intersect(self, other: Box) -> Box:
        """The common part; an empty box (``begin == end``) when they do not overlap.

        >>> Box((0, 0), (4, 4)).intersect(Box((6, 1), (8, 3)))
        Box([6:6, 1:3])
        """
        self._check_rank(other)
        begin = tuple(max(a, b) for a, b in zip(self.begin, other.begin))
        end = tuple(max(b, min(x, y)) for b, x, y in zip(begin, self.end, other.end))
        return Box(begin, end)

    def hull(self, other: Box) -> Box:
        """The smallest box containing both.

        >>> Box((0, 0), (1, 1)).hull(Box((3, 3), (4, 4)))
        Box([0:4, 0:4])
        """
        self._check_rank(other)
        return Box(
            tuple(min(a, b) for a, b in zip(self.begin, other.begin)),
            tuple(max(a, b) for a, b in zip(self.end, other.end)),
        )

    def contains(self, other: Box) -> bool:
        """Whether ``other`` lies entirely inside this box (empty boxes lie anywhere)."""
        self._check_rank(other)
        if other.is_empty():
            return True
        return all(
            sb <= ob and oe <= se
            for sb, se, ob, oe in zip(self.begin, self.end, other.begin, other.end)
        )

    def outside(self, volume: Box) -> tuple[Shape, Shape]:
        """How far this box reaches below ``volume.begin`` and above ``volume.end``, per axis.

        These are the widths a reader fills by mirroring, e.g. for a block's read box
        at the volume border.

        >>> Box((-92, 0), (156, 512)).outside(Box.from_shape((100, 512)))
        ((92, 0), (56, 0))
        """
        self._check_rank(volume)
        low = tuple(max(0, v - b) for b, v in zip(self.begin, volume.begin))
        high = tuple(max(0, e - v) for e, v in zip(self.end, volume.end))
        return low, high

    def is_aligned(self, grid: Sequence[int]) -> bool:
        """Whether ``begin`` and ``end`` both lie on the lattice of spacing ``grid``."""
        g = as_shape(grid, self.ndim)
        return all(b % s == 0 and e % s == 0 for b, e, s in zip(self.begin, self.end, g))

    def snap(self, grid: Sequence[int], mode: Literal["grow", "shrink"] = "grow") -> Box:
        """Move ``begin`` and ``end`` onto the lattice of spacing ``grid``.

        ``"grow"`` rounds outwards (the result contains this box), ``"shrink"`` inwards.

        >>> Box((3, 17), (13, 31)).snap((4, 16))
        Box([0:16, 16:32])
        >>> Box((3, 17), (13, 50)).snap((4, 16), mode="shrink")
        Box([4:12, 32:48])
        """
        g = as_shape(grid, self.ndim)
        if mode == "grow":
            begin = tuple(b // s * s for b, s in zip(self.begin, g))
            end = tuple(ceil_div(e, s) * s for e, s in zip(self.end, g))
        elif mode == "shrink":
            begin = tuple(ceil_div(b, s) * s for b, s in zip(self.begin, g))
            end = tuple(max(b, e // s * s) for b, e, s in zip(begin, self.end, g))
        else:
            raise ValueError(f"snap mode must be 'grow' or 'shrink', not {mode!r}")
        return Box(begin, end)

    def to_slices(self, origin: Sequence[int] | None = None) -> tuple[slice, ...]:
        """Slices selecting this box from an array whose first voxel is at ``origin``.

        >>> Box((2, 3), (4, 5)).to_slices(origin=(2, 0))
        (slice(0, 2, None), slice(3, 5, None))
        """
        o = (0,) * self.ndim if origin is None else tuple(origin)
        return tuple(slice(b - x, e - x) for b, e, x in zip(self.begin, self.end, o))

    def grid(self, step: Sequence[int]) -> Iterator[tuple[Shape, Box]]:
        """Walk the boxes of a regular grid of spacing ``step`` anchored at ``begin``.

        Yields ``(index, box)`` in C order; boxes at the far end are clipped to this box.

        >>> [str(b) for _, b in Box((0,), (5,)).grid((2,))]
        ['[0:2]', '[2:4]', '[4:5]']
        """
        s = as_shape(step, self.ndim)
        counts = [ceil_div(n, k) for n, k in zip(self.shape, s)]
        for index in itertools.product(*(range(c) for c in counts)):
            begin = tuple(b + i * k for b, i, k in zip(self.begin, index, s))
            end = tuple(min(e, x + k) for e, x, k in zip(self.end, begin, s))
            yield tuple(index), Box(begin, end)

    def _check_rank(self, other: Box) -> None:
        if other.ndim != self.ndim:
            raise ValueError(f"boxes {self} and {other} have different ranks")

    def __str__(self) -> str:
        return "[" + ", ".join(f"{b}:{e}" for b, e in zip(self.begin, self.end)) + "]"

    def __repr__(self) -> str:
        return f"Box({self})"
