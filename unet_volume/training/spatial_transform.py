"""The random spatial transform of one training tile, and the warps that apply it.

One draw (:meth:`Transform.draw`) of flips, right-angle turns, a rotation, a shift and an
elastic displacement (3x3 knots, bicubic) maps tile coordinates to source coordinates;
:func:`warp` samples an image channel there (bicubic or linear), :func:`gather` a target at the
nearest voxel. :mod:`unet_volume.training.augment` holds the recipe and the tiles; see its docstring
for the geometry (the apron, mirroring, why targets are gathered).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from scipy import ndimage

from unet_volume.border import reflect

TRUNCATE = 3.0  # elastic displacements are cut at 3 std, so required_apron is a hard bound


class Recipe(Protocol):
    """What a draw reads of the augmentation recipe
    (:class:`~unet_volume.training.augment.AugmentConfig`)."""

    @property
    def elastic_std(self) -> float: ...
    @property
    def elastic_grid(self) -> int: ...
    @property
    def rotate(self) -> str: ...
    @property
    def flip(self) -> bool: ...
    @property
    def shift(self) -> float: ...


@dataclass(frozen=True)
class Transform:
    """tile voxel p -> source point ``centre + matrix @ r + offset + d(r)``, r = p - tile centre.

    ``coarse`` holds the elastic displacements ``(rank, n, ..., n)`` at knots spanning the image
    tile (``half``: its half extents), or is None. ``flips`` and ``turns`` are the same draw as
    index operations, used when nothing else moves.
    """

    flips: tuple[bool, ...]
    turns: int
    matrix: np.ndarray
    offset: np.ndarray
    coarse: np.ndarray | None
    half: tuple[float, ...]
    limit: float

    @classmethod
    def draw(
        cls, config: Recipe, tiles: Sequence[tuple[int, ...]], rng: np.random.Generator
    ) -> Transform:
        rank = len(tiles[0])
        flips = (
            tuple(bool(f) for f in rng.integers(2, size=rank)) if config.flip else (False,) * rank
        )
        square = all(t[-1] == t[-2] for t in tiles)
        turns = (
            (int(rng.integers(4)) if square else 2 * int(rng.integers(2)))
            if config.rotate == "quarter"
            else 0
        )
        angle = float(rng.uniform(0, 2 * np.pi)) if config.rotate == "any" else 0.0
        offset = (
            rng.uniform(-config.shift, config.shift, size=rank) if config.shift else np.zeros(rank)
        )
        coarse = None
        if config.elastic_std:
            knots = rng.normal(
                0.0, config.elastic_std, size=(rank,) + (config.elastic_grid,) * rank
            )
            coarse = np.clip(knots, -TRUNCATE * config.elastic_std, TRUNCATE * config.elastic_std)
        # np.rot90 by one turn reads a[x, -y]: the quarter angles go clockwise, exactly.
        quarter = ((1, 0), (0, -1), (-1, 0), (0, 1))[turns]
        cos, sin = quarter if config.rotate != "any" else (np.cos(angle), np.sin(angle))
        rotation = np.eye(rank)
        rotation[-2:, -2:] = [[cos, -sin], [sin, cos]]
        matrix = (
            np.diag([-1.0 if f else 1.0 for f in flips]) @ rotation
        )  # flip(a) then turn, as index()
        half = tuple((n - 1) / 2 for n in tiles[0])
        return cls(flips, turns, matrix, offset, coarse, half, TRUNCATE * config.elastic_std)

    def index(self, array: np.ndarray) -> np.ndarray:
        """The flips and quarter turns as exact index operations on the trailing spatial axes."""
        rank = len(self.flips)
        axes = tuple(a - rank for a, f in enumerate(self.flips) if f)
        return np.array(
            np.rot90(np.flip(array, axes), self.turns, axes=(-2, -1)), order="C"
        )  # a copy

    def coordinates(self, tile: tuple[int, ...], source_shape: tuple[int, ...]) -> np.ndarray:
        """Source points ``(rank, *tile)``, float32, of a tile centred in ``source_shape``."""
        rank = len(tile)
        rel = [np.arange(n) - (n - 1) / 2 for n in tile]
        grids = [
            r.reshape((-1,) + (1,) * (rank - 1 - a)) for a, r in enumerate(rel)
        ]  # broadcastable
        field = self._displacement(rel)
        points = np.empty((rank, *tile), dtype=np.float32)
        for a in range(rank):
            linear = sum(self.matrix[a, b] * grids[b] for b in range(rank) if self.matrix[a, b])
            points[a] = (
                (source_shape[a] - 1) / 2
                + self.offset[a]
                + linear
                + (field[a] if field is not None else 0)
            )
        return points

    def _displacement(self, rel: list[np.ndarray]) -> np.ndarray | None:
        """d(r) ``(rank, *tile)``: the coarse knots, interpolated bicubically (a B-spline)."""
        if self.coarse is None:
            return None
        n = self.coarse.shape[1]
        bases = [
            _spline_basis((r + h) * (n - 1) / (2 * h) if h else np.full_like(r, (n - 1) / 2), n)
            for r, h in zip(rel, self.half)
        ]
        field = self.coarse
        for axis, basis in enumerate(bases, start=1):  # contract one knot axis at a time
            field = np.moveaxis(np.tensordot(basis, field, axes=(1, axis)), 0, axis)
        clipped: np.ndarray = np.clip(
            field, -self.limit, self.limit
        )  # spline overshoot: keep the bound
        return clipped


@functools.lru_cache(maxsize=64)
def _unit_splines(n: int) -> tuple[np.ndarray, ...]:
    return tuple(ndimage.spline_filter1d(np.eye(n)[k], 3, mode="mirror") for k in range(n))


def _spline_basis(u: np.ndarray, n: int) -> np.ndarray:
    """``(len(u), n)``: cubic-spline interpolation weights of n knots at knot coordinates u."""
    return np.stack(
        [
            ndimage.map_coordinates(c, u[None], order=3, mode="mirror", prefilter=False)
            for c in _unit_splines(n)
        ],
        axis=1,
    )


def warp(channel: np.ndarray, points: np.ndarray, order: int) -> np.ndarray:
    """Interpolate one image channel at ``points``: one spline prefilter, one map_coordinates."""
    if order > 1:
        channel = ndimage.spline_filter(channel, order, mode="mirror", output=np.float32)
    warped: np.ndarray = ndimage.map_coordinates(
        channel, points, order=order, mode="mirror", prefilter=False, output=np.float32
    )
    return warped


def gather(array: np.ndarray, points: np.ndarray) -> np.ndarray:
    """``array`` at the nearest voxel of each point, mirrored (no edge repeat) outside it."""
    index = np.rint(points).astype(np.intp)
    for axis, size in enumerate(array.shape):
        index[axis] = reflect(index[axis], size)
    gathered: np.ndarray = np.take(array, np.ravel_multi_index(tuple(index), array.shape))
    return gathered
