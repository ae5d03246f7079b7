"""Training-tile augmentation: elastic deformation, rotations, shifts, flips, gray values.

The paper (Ronneberger et al. 2015, "Training") augments with shifts, rotations, gray-value
variations and "above all" elastic deformations: random displacements on a coarse 3x3 grid,
Gaussian with 10 px std, interpolated bicubically to every pixel. :func:`augment` does all of
them, in 2D and 3D, and each part can be switched off on its own (:class:`AugmentConfig`),
because on a short CPU budget the full recipe measured worse than flips and right-angle turns.

One random spatial transform maps tile coordinates (relative to the tile centre) to source
coordinates. It is sampled at the input grid for the image and at the output grid for the
per-voxel targets (labels, weights, masks), so a target voxel and the image voxel the network
predicts it from always come from the same source point::

    source arrays: image and targets, each `apron` larger per side than its tile
    +---------------------------------+
    |  apron    .  .  rotated,  .     |      image tile   (c, *input_shape)
    |        .  +-----------+    .    |      target tile  (*output_shape), centred in it
    |     .     |  target   |  .      |      source point = centre + A @ r + shift + d(r)
    |    .      |   tile    | .       |        r: tile voxel - tile centre
    |       .   +-----------+         |        A: rotation and flips
    |           .  image tile  .      |        d: elastic displacement (bicubic from 3x3)
    +---------------------------------+

Source points outside the given arrays are mirrored without repeating the edge voxel (the
project's border, :mod:`unet_volume.border`; scipy's ``mode="mirror"``). Mirroring is harmless
for the image but not for targets: a mirrored label beside an unmirrored image is a wrong
label. So read image *and* targets grown by an *apron*: the extra voxels read around a tile so that
the warps and rotations find source voxels, on top of the network's halo (which the image tile
already includes). :func:`required_apron` gives one that suffices; ``read_box`` mirrors the
volume at its border as usual. Then no source point leaves the arrays and the results are
cropped back to the tiles. No apron (the default: tiles as is) works too, at the cost of such
edge voxels.

Interpolation: the image is bicubic (``order=3``, the paper; ``image_order=1`` is ~3x faster in
3D). Every target is sampled at the *nearest* source voxel, one shared gather: a (label,
weight, mask) triple at an output voxel is always one source voxel's triple, so a weight of 0
(unlabelled) never leaks onto a neighbour's label, labels stay labels, and any dtype works.
With ``ndim=2`` the tile's z axis is a batch of slices, each transformed independently.

Usage::

    apron = required_apron(config, geometry.input_shape, ndim=2)
    image = read_box(image_array, geometry.input_box(output_box).grow(apron))
    labels = read_box(label_array, output_box.grow(apron))[0]
    image, targets = augment(image, {"labels": labels}, config, rng, ndim=2, apron=apron)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from unet_volume.errors import InputError
from unet_volume.label_offset import check_offset, spatial_offset
from unet_volume.training.spatial_transform import TRUNCATE, Transform, gather, warp

Rotate = Literal["any", "quarter", "none"]


def _number(value: object, low: float, name: str, example: str) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (low <= value < math.inf)
    ):
        raise InputError(f"{name} must be a number >= {low}, got {value!r}; e.g. {name}={example}")


@dataclass(frozen=True)
class AugmentConfig:
    """One augmentation recipe; the defaults are the paper's, plus moderate gray-value jitter.

    Every part is off at 0 / ``False`` / ``"none"``, so each can be measured on its own.
    ``rotate="any"`` turns by a uniform angle in the (y, x) plane; ``"quarter"`` by a multiple
    of 90 degrees (0 or 180 for non-square tiles), exactly, by index operations when no
    elastic or shift is asked for. ``flip`` mirrors each spatial axis with probability 1/2
    (z too in 3D). ``shift`` is a uniform sub-tile shift of up to that many voxels per axis
    (random tile sampling already shifts). Gray values: ``gamma`` g = exp(U(-gamma, gamma)) on
    the tile's [min, max] range, then contrast x U(1 - contrast, 1 + contrast) about the tile
    mean, then brightness + U(-brightness, brightness) x the tile std; image only.

    ``image_offset`` (voxels along the trailing spatial axes, e.g. ``(y, x)``) is where the
    image's boundaries sit against the labels' (see :mod:`unet_volume.label_offset`): the image
    is sampled that far from each target voxel's source point, so that in every flip and turn
    the targets lie on the image's own boundaries. Empty: image and labels are registered.

    >>> AugmentConfig.none().is_identity(), AugmentConfig().is_identity()
    (True, False)
    """

    elastic_std: float = 10.0
    elastic_grid: int = 3
    rotate: Rotate = "any"
    flip: bool = True
    shift: float = 0.0
    brightness: float = 0.1
    contrast: float = 0.1
    gamma: float = 0.1
    image_order: Literal[1, 3] = 3
    image_offset: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        for name, example in (
            ("elastic_std", "10"),
            ("shift", "0"),
            ("brightness", "0.1"),
            ("gamma", "0.1"),
        ):
            _number(getattr(self, name), 0, name, example)
        _number(self.contrast, 0, "contrast", "0.1")
        if self.contrast >= 1:
            raise InputError(
                f"contrast must be < 1 (a factor in (0, 2)), got {self.contrast!r}; e.g. 0.1"
            )
        if (
            isinstance(self.elastic_grid, bool)
            or not isinstance(self.elastic_grid, int)
            or self.elastic_grid < 2
        ):
            raise InputError(
                f"elastic_grid must be an int >= 2, got {self.elastic_grid!r}; the paper's is 3"
            )
        if self.rotate not in ("any", "quarter", "none"):
            raise InputError(f"rotate {self.rotate!r} is unknown; pass 'any', 'quarter' or 'none'")
        if not isinstance(self.flip, bool):
            raise InputError(f"flip must be True or False, got {self.flip!r}")
        check_offset(self.image_offset, "image_offset")
        order = self.image_order
        if order not in (1, 3) or not isinstance(order, int) or isinstance(order, bool):
            raise InputError(
                f"image_order must be 1 or 3, got {self.image_order!r}; 3 is bicubic (the paper)"
            )

    @classmethod
    def none(cls) -> AugmentConfig:
        """The identity: :func:`augment` returns its inputs' tiles unchanged."""
        return cls(
            elastic_std=0.0, rotate="none", flip=False, brightness=0.0, contrast=0.0, gamma=0.0
        )

    @classmethod
    def plain(cls) -> AugmentConfig:
        """Flips and right-angle turns only: the recipe that won on a short CPU budget."""
        return cls(elastic_std=0.0, rotate="quarter", brightness=0.0, contrast=0.0, gamma=0.0)

    @classmethod
    def upright(cls) -> AugmentConfig:
        """The paper's elastic deformation and gray values, without rotations or flips.

        For labels whose registration to the image is bound to its orientation: the ISBI 2012
        labels sit ~0.6 px above the membranes in the image (``benchmarks/label_offset.py``).
        A net that sees every label flipped and turned learns the offset's average, 0; one
        trained upright learns the offset itself.
        """
        return cls(rotate="none", flip=False)

    def is_identity(self) -> bool:
        """True when :func:`augment` returns the tiles unchanged (and draws nothing)."""
        return self.is_exact() and self.rotate == "none" and not self.flip and not self.has_gray()

    def has_gray(self) -> bool:
        return bool(self.brightness or self.contrast or self.gamma)

    def is_exact(self) -> bool:
        """True when the spatial part is index operations only (no interpolation at all)."""
        return (
            self.rotate != "any"
            and self.elastic_std == 0
            and self.shift == 0
            and not any(self.image_offset)
        )


def required_apron(
    config: AugmentConfig, input_shape: Sequence[int], *, ndim: int
) -> tuple[int, ...]:
    """The apron: voxels per side around the tiles that keep every source point inside them.

    ``input_shape`` is the image tile's spatial shape, ``(z, y, x)`` or ``(y, x)``; the apron
    has the same length (0 for a 2D tile's z batch). It covers the corners of a turned tile
    (``rotate="any"``), the elastic displacement (at most 3 std, see ``TRUNCATE``) and ``shift``.

    >>> required_apron(AugmentConfig.none(), (1, 316, 316), ndim=2)
    (0, 0, 0)
    >>> required_apron(AugmentConfig(), (1, 316, 316), ndim=2)  # 157.5 (sqrt(2) - 1) + 3 * 10
    (0, 96, 96)
    """
    shape = _checked_rank(input_shape, ndim)
    first = len(shape) - _transformed_rank(len(shape), ndim)
    halves = [(n - 1) / 2 for n in shape]
    apron = [0] * len(shape)
    offset = spatial_offset(config.image_offset, len(shape))
    for axis in range(first, len(shape)):
        extent = TRUNCATE * config.elastic_std + config.shift + abs(offset[axis])
        if config.rotate == "any" and axis >= len(shape) - 2:
            extent += math.hypot(halves[-2], halves[-1]) - halves[axis]
        apron[axis] = math.ceil(extent - 1e-9)
    return tuple(apron)


def augment(
    image: np.ndarray,
    targets: Mapping[str, np.ndarray],
    config: AugmentConfig,
    rng: np.random.Generator,
    *,
    ndim: int,
    apron: Sequence[int] | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One random transform of an image tile and its per-voxel targets, applied to all alike.

    Args:
        image: ``(c, z, y, x)`` (or ``(c, y, x)`` with ``ndim=2``): the input tile grown by
            ``apron`` per side; any real dtype, returned as float32.
        targets: per-voxel arrays ``(z, y, x)`` on the output tile grown by ``apron``, centred
            in the image (labels, weights, masks; any dtype, which is kept).
        config: which parts to apply; :meth:`AugmentConfig.none` gives the tiles back unchanged.
        rng: all randomness; the same seed and inputs give the same outputs.
        ndim: 2 (z is a batch of slices, each with its own transform) or 3.
        apron: the extra voxels per side that image and targets carry, ``(z, y, x)``;
            default none. See :func:`required_apron`.

    Returns:
        The image tile ``(c, *input_shape)`` float32 and targets ``(*output_shape)``.
    """
    image = np.asarray(image, dtype=np.float32)
    apron = _checked_apron(image, targets, ndim, apron)
    if ndim == 3 or image.ndim == 3:
        return _augment_tile(image, dict(targets), config, rng, apron)
    slices = [
        _augment_tile(
            image[:, k], {name: t[k] for name, t in targets.items()}, config, rng, apron[1:]
        )
        for k in range(image.shape[1])
    ]  # 2D: every slice its own transform
    return (
        np.stack([s[0] for s in slices], axis=1),
        {name: np.stack([s[1][name] for s in slices]) for name in targets},
    )


def _transformed_rank(rank: int, ndim: int) -> int:
    return 2 if ndim == 2 else rank


def _checked_rank(shape: Sequence[int], ndim: int) -> tuple[int, ...]:
    if ndim not in (2, 3):
        raise InputError(f"ndim must be 2 or 3, got {ndim!r}; pass ndim=2 (slices) or 3")
    if len(shape) not in ((2, 3) if ndim == 2 else (3,)):
        raise InputError(
            f"a {ndim}D tile's spatial shape must be (z, y, x){' or (y, x)' if ndim == 2 else ''}, "
            f"got {tuple(shape)}"
        )
    return tuple(int(n) for n in shape)


def _checked_apron(
    image: np.ndarray, targets: Mapping[str, np.ndarray], ndim: int, apron: Sequence[int] | None
) -> tuple[int, ...]:
    """Raise InputError unless the arrays are tiles grown by ``apron`` with targets centred."""
    spatial = _checked_rank(image.shape[1:], ndim)
    apron = tuple(apron) if apron is not None else (0,) * len(spatial)
    if len(apron) != len(spatial) or any(
        not isinstance(m, int | np.integer) or m < 0 for m in apron
    ):
        raise InputError(
            f"apron {apron} must be {len(spatial)} ints >= 0, like the image's {spatial}"
        )
    if len(spatial) == 3 and ndim == 2 and apron[0] != 0:
        raise InputError(
            f"apron {apron} reaches along z, but a 2D tile's z is a batch; pass (0, y, x)"
        )
    tile = [n - 2 * m for n, m in zip(spatial, apron)]
    if min(tile) < 1:
        raise InputError(
            f"image {spatial} is not larger than twice the apron {apron}; pass a smaller apron"
        )
    for name, target in targets.items():
        out = [n - 2 * m for n, m in zip(target.shape, apron)]
        if (
            target.ndim != len(spatial)
            or any(o < 1 or o > t or (t - o) % 2 for o, t in zip(out, tile))
            or (ndim == 2 and len(spatial) == 3 and out[0] != tile[0])
        ):
            raise InputError(
                f"target {name!r} of shape {target.shape} is not an output tile centred in the "
                f"image tile {tuple(tile)} (each grown by apron {apron}); pass the output box "
                f"of this tile, grown by the same apron"
            )
    return apron


def _augment_tile(
    image: np.ndarray,
    targets: dict[str, np.ndarray],
    config: AugmentConfig,
    rng: np.random.Generator,
    apron: Sequence[int],
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One tile: image ``(c, *S)`` and targets ``(*S')``, every spatial axis transformed."""
    tiles = [
        tuple(n - 2 * m for n, m in zip(a.shape[-len(apron) :], apron))
        for a in (image, *targets.values())
    ]
    transform = Transform.draw(config, tiles, rng)
    if config.is_exact():
        image = transform.index(_crop(image, apron))
        targets = {name: transform.index(_crop(t, apron)) for name, t in targets.items()}
    else:
        image = np.stack(
            [
                warp(
                    channel,
                    _moved(transform.coordinates(tiles[0], channel.shape), config.image_offset),
                    config.image_order,
                )
                for channel in image
            ]
        )
        targets = {
            name: gather(t, transform.coordinates(tile, t.shape))
            for (name, t), tile in zip(targets.items(), tiles[1:])
        }
    return _vary_gray(image, config, rng), targets


def _moved(points: np.ndarray, offset: Sequence[float]) -> np.ndarray:
    """Source points moved by ``offset`` along their trailing axes (a 2D offset on 2D tiles)."""
    for axis, value in enumerate(spatial_offset(offset, len(points))):
        if value:
            points[axis] += np.float32(value)
    return points


def _crop(array: np.ndarray, apron: Sequence[int]) -> np.ndarray:
    lead = (slice(None),) * (array.ndim - len(apron))
    return array[lead + tuple(slice(m, n - m) for m, n in zip(apron, array.shape[-len(apron) :]))]


def _vary_gray(image: np.ndarray, config: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """Gamma on the tile's range, then contrast about its mean and brightness in its std."""
    if config.gamma:
        low, high = float(image.min()), float(image.max())
        g = np.float32(np.exp(rng.uniform(-config.gamma, config.gamma)))
        if high > low:
            span = np.float32(high - low)
            image = low + span * ((image - np.float32(low)) / span) ** g
    if config.contrast:
        mean = np.float32(image.mean())
        image = mean + np.float32(rng.uniform(1 - config.contrast, 1 + config.contrast)) * (
            image - mean
        )
    if config.brightness:
        image = image + np.float32(rng.uniform(-config.brightness, config.brightness) * image.std())
    return np.asarray(image, dtype=np.float32)
