"""The U-Net loss weight map: separation borders, class balance and the border term.

This module is the mathematics, on arrays in memory; :mod:`unet_volume.training.weight_volume` runs
it block by block over a Zarr volume on Dask.

The paper (Ronneberger et al. 2015, "Training") weights the loss per voxel by
``w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))**2 / (2 sigma**2))``: ``w_c`` balances the
classes of the training target, ``d1`` / ``d2`` are the distances to the nearest /
second-nearest cell. Conventions chosen here:

- **Cells**: instance labels (0 = background, cells 1..n), or the connected components
  of a binary mask (face connectivity; per z slice when ``ndim=2``).
- **Separation borders**: cell voxels with another cell in their 3x3 (3x3x3)
  neighbourhood, both sides (2 voxels wide). They are background in the target,
  ``target = cells & ~borders``, so the network must learn the gaps.
- **Distances** go to the target's cells, in voxels or (``voxel_size``) physical units.
  The exp term is added on background voxels (borders included) only, where the
  paper's formula lives; a cell voxel weighs ``w_c(foreground)``.
- **Class weights** ``total / (2 * count_c)`` over the whole volume, hence >= 1/2; a
  chunked run counts once up front, and every block uses the same weights.
- **Cutoff**: the term is dropped where ``d1 + d2 > D = sigma sqrt(2 ln(w0 / (1e-7 w_min)))``;
  there it is below ``1e-7 w_min <= 1e-7 w(x)``. So results are within 1e-7 relative of the
  formula (plus float32 rounding), no cell farther than D matters, and per-cell work is local.
- **Outside the volume** is background (zero padding), not mirrored: mirroring would
  invent cells and borders. A whole-volume run sees nothing beyond the array either.

Halo of a block, one axis of voxel size v (:func:`halo_for`)::

    read box   [-h ..................................... n + h)    h = ceil(D / v) + 1
    write box        [0 .......................... n)
    cell voxels within D of the write box lie at offsets <= ceil(D / v); the outer
    rim, whose borders depend on labels beyond the read box, is farther than D.

So a block weighed in its halo equals the crop of the whole-volume weights, bit for bit,
when the voxel sizes are integers (unit voxels, or nm): every distance is then the correctly
rounded square root of an exact integer, whichever of several equally near voxels the
transform picks, and the same distances give the same ``exp``. With fractional voxel sizes,
two equally near voxels can give distances one ulp apart (about 1e-16 relative).

>>> separation_borders(np.array([[[1, 1, 2, 2, 0]]]), ndim=2).astype(int)
array([[[0, 1, 1, 0, 0]]])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import ndimage

from unet_volume.errors import InputError
from unet_volume.geometry import Box, Shape
from unet_volume.option_fields import option

WEIGHT_BLOCK = {2: (1, 1024, 1024), 3: (128, 128, 128)}
"""Block shape (z, y, x) of a weight volume by ``ndim`` when none is given: a task, a chunk."""
TOLERANCE = 1e-7  # largest relative change the cutoff may cause (chunked runs promise 1e-5)
BALANCED_FLOOR = 0.5  # balanced class weights total / (2 * count) are >= 1/2: the cutoff's w_min
# First search radius, in smallest voxel sizes: where cells touch, d2 <= 5 (99.99%, measured).
START_RADIUS = 5.0


@dataclass(frozen=True, slots=True)
class WeightMapConfig:
    """How to weigh: ``w0`` and ``sigma`` (voxels, or the units of ``voxel_size`` (z, y, x)).

    ``ndim=2`` weighs each z slice on its own (the paper's setting), ``ndim=3`` the
    volume. ``class_weights`` is (background, foreground), None for balanced.
    ``binary``: the labels are a mask whose connected components are the cells;
    None decides from the data (one nonzero value, e.g. 0/1 or 0/255).
    """

    w0: float = option(10.0, "border weight w0, as the paper")
    sigma: float = option(5.0, "border width sigma, as the paper (voxels, or voxel_size units)")
    ndim: Literal[2, 3] = option(2, "2: cells and distances per z slice; 3: in the volume")
    voxel_size: tuple[float, float, float] | None = option(
        None, "physical voxel size, e.g. 50,4,4 (nm): distances become physical (anisotropic)"
    )
    class_weights: tuple[float, float] | None = option(
        None, "(background, foreground) class weights; default: balanced"
    )
    binary: bool | None = option(
        None, "the labels are a mask whose components are the cells; default: decide from data"
    )

    def __post_init__(self) -> None:
        if self.ndim not in (2, 3):
            raise InputError(f"weight map ndim {self.ndim!r} must be 2 (per z slice) or 3")
        if not (0 < self.sigma < math.inf and 0 <= self.w0 < math.inf):
            raise InputError(
                f"weight map needs sigma > 0 and w0 >= 0, got sigma={self.sigma}, w0={self.w0}"
            )
        for name, count, example in (
            ("voxel_size", 3, "(z, y, x), e.g. (50, 4, 4)"),
            ("class_weights", 2, "(background, foreground)"),
        ):
            value = getattr(self, name)
            if value is not None:
                numbers = tuple(float(v) for v in value)
                if len(numbers) != count or not all(0 < v < math.inf for v in numbers):
                    raise InputError(
                        f"{name} {tuple(value)} must be {count} positive numbers {example}"
                    )
                object.__setattr__(self, name, numbers)

    @property
    def sampling(self) -> tuple[float, ...]:
        """Voxel size along the weighed axes: (y, x) for ``ndim=2``, else (z, y, x)."""
        return (self.voxel_size or (1.0, 1.0, 1.0))[3 - self.ndim :]

    @property
    def weight_floor(self) -> float:
        """The smallest class weight (the cutoff's w_min): 1/2 when balanced."""
        return min(self.class_weights) if self.class_weights else BALANCED_FLOOR


def cutoff_distance(config: WeightMapConfig) -> float:
    """``D``: where ``d1 + d2 > D`` the term is below ``TOLERANCE`` times any weight."""
    ratio = config.w0 / (TOLERANCE * config.weight_floor)
    return config.sigma * math.sqrt(2.0 * math.log(ratio)) if ratio > 1.0 else 0.0


def halo_for(config: WeightMapConfig) -> tuple[int, int, int]:
    """Voxels read around a block per axis (z, y, x): ``ceil(D / v) + 1``; 0 on z for ``ndim=2``.

    >>> halo_for(WeightMapConfig(w0=10, sigma=5, ndim=3))  # D = 5 * sqrt(2 ln 2e8) = 30.9
    (32, 32, 32)
    """
    reach = cutoff_distance(config)
    z, y, x = (math.ceil(reach / v) + 1 for v in config.voxel_size or (1.0, 1.0, 1.0))
    return (0 if config.ndim == 2 else z, y, x)


def cell_labels(labels: np.ndarray, config: WeightMapConfig) -> np.ndarray:
    """The cells: ``labels`` itself, or a mask's connected components.

    ``config.binary=None`` decides from the data: labels with one nonzero value are a mask.
    """
    binary = config.binary
    if binary is None:
        nonzero = labels[labels != 0]
        binary = nonzero.size > 0 and bool(nonzero.min() == nonzero.max())
    if not binary:
        return labels
    structure = ndimage.generate_binary_structure(3, 1)
    if config.ndim == 2:
        structure[[0, 2]] = False  # no connections across z slices
    return np.asarray(ndimage.label(labels != 0, structure=structure)[0])


def separation_borders(labels: np.ndarray, ndim: int = 3) -> np.ndarray:
    """Cell voxels with another cell in their 3x3 (``ndim=2``, per slice) or 3x3x3 neighbourhood.

    ``labels`` are instance labels ``(z, y, x)``. A grey dilation and erosion (background lifted to
    max + 1, as scipy's filters go through float64) find a larger or smaller neighbour. Mode
    "nearest" repeats only voxels already in the neighbourhood: nothing outside the array counts.
    """
    size = (1, 3, 3) if ndim == 2 else (3, 3, 3)
    lifted = np.where(labels == 0, int(labels.max(initial=0)) + 1, labels.astype(np.int64))
    high = ndimage.maximum_filter(labels, size=size, mode="nearest")
    low = ndimage.minimum_filter(lifted, size=size, mode="nearest")
    return np.asarray((labels != 0) & ((high != labels) | (low != labels)))


def training_target(labels: np.ndarray, config: WeightMapConfig) -> np.ndarray:
    """The target's foreground: cell voxels off the separation borders."""
    cells = cell_labels(labels, config)
    return np.asarray((cells != 0) & ~separation_borders(cells, config.ndim))


def balanced_class_weights(foreground: int, total: int) -> tuple[float, float]:
    """(background, foreground) weights ``total / (2 * count)``; 1 for an absent class.

    >>> balanced_class_weights(25, 100)
    (0.6666666666666666, 2.0)
    """
    background = total - foreground
    return (
        total / (2.0 * background) if background else 1.0,
        total / (2.0 * foreground) if foreground else 1.0,
    )


def weight_map(
    labels: np.ndarray,
    config: WeightMapConfig,
    class_weights: tuple[float, float] | None = None,
    *,
    write_box: Box | None = None,
) -> np.ndarray:
    """The loss weights (float32) of ``labels`` ``(z, y, x)``, or of a ``(y, x)`` slice (2D).

    ``write_box`` (default: all) is the part to weigh, the rest is context (a block's halo); the
    result has its shape. ``class_weights`` (background, foreground) defaults to
    ``config.class_weights``, else to the balance over the write box; a chunked run passes the whole
    volume's.
    """
    volume = labels[np.newaxis] if labels.ndim == 2 and config.ndim == 2 else labels
    if volume.ndim != 3:
        raise InputError(
            f"labels have shape {labels.shape}; "
            "pass (z, y, x) labels, or a (y, x) slice with ndim=2"
        )
    box = write_box or Box.from_shape(volume.shape)
    inner = box.to_slices()
    cells = cell_labels(volume, config)
    target = (cells != 0) & ~separation_borders(cells, config.ndim)
    weights = (
        class_weights
        or config.class_weights
        or balanced_class_weights(int(target[inner].sum()), box.size)
    )
    if min(weights) < config.weight_floor:  # the cutoff (and the halo) assume the floor
        raise InputError(
            f"class weights {weights} lie below {config.weight_floor}; "
            "set WeightMapConfig.class_weights"
        )
    result = np.where(target[inner], weights[1], weights[0])
    if config.w0 > 0 and not box.is_empty():
        cells = np.where(target, cells, 0)
        wanted = np.zeros(cells.shape, dtype=bool)
        wanted[inner] = True
        if config.ndim == 3:
            result += border_term(cells, config, wanted)[inner]
        for z in range(box.begin[0], box.end[0]) if config.ndim == 2 else ():
            result[z - box.begin[0]] += border_term(cells[z], config, wanted[z])[inner[1:]]
    return result.astype(np.float32).reshape(labels.shape if write_box is None else box.shape)


def border_term(
    cells: np.ndarray, config: WeightMapConfig, wanted: np.ndarray | None = None
) -> np.ndarray:
    """``w0 exp(-(d1 + d2)**2 / (2 sigma**2))`` at wanted background voxels of ``cells``, else 0.

    ``cells`` is one slice (2D) or a volume (3D).
    """
    cutoff, background = cutoff_distance(config), cells == 0
    d1, d2 = two_nearest_distances(
        cells, config.sampling, cutoff, background & (True if wanted is None else wanted)
    )
    term = np.zeros(cells.shape)
    near = background & (d1 + d2 <= cutoff)
    term[near] = config.w0 * np.exp(-((d1[near] + d2[near]) ** 2) / (2.0 * config.sigma**2))
    return term


def two_nearest_distances(
    cells: np.ndarray, sampling: Sequence[float], cutoff: float, wanted: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Distances d1 <= d2 from wanted voxels to their two nearest cells; exact if d1 + d2 <= cutoff.

    A round merges, for every cell near a pending voxel, the distances to the cell within its
    bounding box grown by ``radius``: every cell within ``radius`` is seen, so ``d2 <= radius`` is
    exact. A voxel stays pending, for a round with twice the radius, only while ``d1 + d2`` may be
    within the cutoff (``min(d1, radius) + radius`` bounds it below). Other values only say that d1
    + d2 passes the cutoff.
    """
    cells = _sequential(cells)
    objects = ndimage.find_objects(cells)
    d1, d2 = np.full(cells.shape, np.inf), np.full(cells.shape, np.inf)
    pending = wanted.copy()
    radius = min(START_RADIUS * min(sampling), cutoff)
    while pending.any():
        d1[pending], d2[pending] = np.inf, np.inf
        grow = tuple(math.ceil(radius / v) for v in sampling)
        for label, slices in enumerate(objects, start=1):
            if slices is not None:
                box = Box(tuple(s.start for s in slices), tuple(s.stop for s in slices))
                _merge_cell(cells, label, box, grow, sampling, pending, (d1, d2))
        if radius >= cutoff:
            break
        pending &= (d2 > radius) & (np.minimum(d1, radius) + radius <= cutoff)
        radius = min(2.0 * radius, cutoff)
    return d1, d2


def _merge_cell(
    cells: np.ndarray,
    label: int,
    box: Box,
    grow: Shape,
    sampling: Sequence[float],
    pending: np.ndarray,
    nearest: tuple[np.ndarray, np.ndarray],
) -> None:
    """Merge the distances to cell ``label`` into ``nearest`` (d1, d2) at pending voxels nearby.

    Nearby: within ``grow`` of the cell's bounding ``box``.

    The transform covers those voxels and the cell's part within ``grow`` of them (their nearest
    cell voxel).
    """
    reach = box.grow(grow).intersect(Box.from_shape(cells.shape))
    here = pending[reach.to_slices()]
    if not here.any():
        return
    axes = range(here.ndim)
    spans = [np.flatnonzero(here.any(axis=tuple(b for b in axes if b != a))) for a in axes]
    points = Box(tuple(int(s[0]) for s in spans), tuple(int(s[-1]) + 1 for s in spans)).shift(
        reach.begin
    )
    part = box.intersect(points.grow(grow))
    window = points.hull(part).to_slices()
    outside = cells[window] != label
    if part.is_empty() or outside.all():
        return  # no voxel of this cell is within reach of these pending voxels
    distance = ndimage.distance_transform_edt(outside, sampling=sampling)
    distance[~pending[window]] = np.inf
    d1, d2 = nearest[0][window], nearest[1][window]
    np.minimum(d2, np.maximum(d1, distance), out=d2)
    np.minimum(d1, distance, out=d1)


def _sequential(cells: np.ndarray) -> np.ndarray:
    """Labels small enough for ``find_objects``, whose list is as long as the largest label."""
    if cells.size == 0 or int(cells.max()) <= cells.size:
        return cells
    return np.unique(cells, return_inverse=True)[1].reshape(cells.shape)  # 0 stays 0: the smallest
