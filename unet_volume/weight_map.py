"""Separation borders and the U-Net loss weight map, whole-volume or block by block on Dask.

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

So chunked weights equal whole-volume weights but for ties between equal distances
(bit-identical in the tests; 1e-5 relative is promised).

>>> separation_borders(np.array([[[1, 1, 2, 2, 0]]]), ndim=2).astype(int)
array([[[0, 1, 1, 0, 0]]])
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import numpy as np
import zarr
from distributed import Client
from scipy import ndimage

from unet_volume import prediction_store
from unet_volume.cluster import map_bounded
from unet_volume.errors import InputError
from unet_volume.geometry import Box, Shape
from unet_volume.storage import Volume, absolute, open_volume

TOLERANCE = 1e-7  # largest relative change the cutoff may cause (chunked runs promise 1e-5)
BALANCED_FLOOR = 0.5  # balanced class weights total / (2 * count) are >= 1/2: the cutoff's w_min
START_RADIUS = 5.0  # first search radius in smallest voxel sizes: where cells touch, d2 <= 5 (99.99%, measured)


@dataclass(frozen=True, slots=True)
class WeightMapConfig:
    """How to weigh: ``w0`` and ``sigma`` (voxels, or the units of ``voxel_size`` (z, y, x)).

    ``ndim=2`` weighs each z slice on its own (the paper's setting), ``ndim=3`` the
    volume. ``class_weights`` is (background, foreground), None for balanced.
    ``binary``: the labels are a mask whose connected components are the cells;
    None decides from the data (one nonzero value, e.g. 0/1 or 0/255).
    """

    w0: float = 10.0
    sigma: float = 5.0
    ndim: Literal[2, 3] = 2
    voxel_size: tuple[float, float, float] | None = None
    class_weights: tuple[float, float] | None = None
    binary: bool | None = None

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
    """Voxels read around a block per axis (z, y, x): ``ceil(D / v) + 1``, and 0 on z for ``ndim=2``.

    >>> halo_for(WeightMapConfig(w0=10, sigma=5, ndim=3))  # D = 5 * sqrt(2 ln 2e8) = 30.9
    (32, 32, 32)
    """
    reach = cutoff_distance(config)
    z, y, x = (math.ceil(reach / v) + 1 for v in config.voxel_size or (1.0, 1.0, 1.0))
    return (0 if config.ndim == 2 else z, y, x)


def cell_labels(labels: np.ndarray, config: WeightMapConfig) -> np.ndarray:
    """The cells: ``labels`` itself, or a mask's connected components (binary None: one nonzero value)."""
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
    """Voxels of a cell with another cell in their 3x3 (``ndim=2``, per z slice) or 3x3x3 neighbourhood.

    ``labels`` are instance labels ``(z, y, x)``. A grey dilation and erosion (background lifted to max + 1,
    as scipy's filters go through float64) find a larger or smaller neighbour. Mode "nearest" repeats only
    voxels already in the neighbourhood: nothing outside the array counts.
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
    """The loss weights (float32) of ``labels`` ``(z, y, x)``, or of a ``(y, x)`` slice with ``ndim=2``.

    ``write_box`` (default: all) is the part to weigh, the rest is context (a block's halo); the result has its
    shape. ``class_weights`` (background, foreground) defaults to ``config.class_weights``, else to the
    balance over the write box; a chunked run passes the whole volume's.
    """
    volume = labels[np.newaxis] if labels.ndim == 2 and config.ndim == 2 else labels
    if volume.ndim != 3:
        raise InputError(
            f"labels have shape {labels.shape}; pass (z, y, x) labels, or a (y, x) slice with ndim=2"
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
    if (
        min(weights) < config.weight_floor
    ):  # the cutoff (and the halo) assume weights above the floor
        raise InputError(
            f"class weights {weights} lie below {config.weight_floor}; set WeightMapConfig.class_weights"
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
    """``w0 exp(-(d1 + d2)**2 / (2 sigma**2))`` at wanted background voxels of ``cells`` (2D or 3D), else 0."""
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
    """Distances d1 <= d2 from wanted voxels to their two nearest cells, exact where d1 + d2 <= cutoff.

    A round merges, for every cell near a pending voxel, the distances to the cell within its bounding box
    grown by ``radius``: every cell within ``radius`` is seen, so ``d2 <= radius`` is exact. A voxel stays
    pending, for a round with twice the radius, only while ``d1 + d2`` may be within the cutoff (``min(d1,
    radius) + radius`` bounds it below). Other values only say that d1 + d2 passes the cutoff.
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
    """Merge the distances to cell ``label`` into ``nearest`` (d1, d2) at pending voxels within ``grow``.

    The transform covers those voxels and the cell's part within ``grow`` of them (their nearest cell voxel).
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


@dataclass(frozen=True, slots=True)
class WeightReport:
    """What :func:`compute_weight_volume` did; ``task_seconds`` sums the weight tasks (read, weigh, write)."""

    output_url: str
    blocks: int
    voxels: int
    seconds: float
    class_weights: tuple[float, float]
    halo: Shape
    task_seconds: float

    @property
    def voxels_per_second(self) -> float:
        return self.voxels / self.seconds if self.seconds > 0 else 0.0


def compute_weight_volume(
    labels_url: str,
    out_url: str,
    config: WeightMapConfig,
    *,
    chunk_shape: Sequence[int],
    client: Client,
    overwrite: bool = False,
    balance_z_range: tuple[int, int] | None = None,
) -> WeightReport:
    """Write the weight map of the labels at ``labels_url`` as a float32 Zarr v3 array at ``out_url``.

    One task per output chunk (block) reads its write box grown by :func:`halo_for` (background outside the
    volume) and writes its chunk. Two cheap passes come first: the label range (binary or not; no negative
    labels) and the target's class counts, so every block uses the whole volume's class weights. A binary
    mask needs chunks spanning its components (whole (y, x) slices for ``ndim=2``, the volume for ``ndim=3``);
    otherwise label it first. ``balance_z_range`` (half-open) counts the class frequencies over those slices
    only, e.g. the training region, so that held-out slices stay unseen. A failed run leaves no output.
    """
    start, given, out_url = (
        time.perf_counter(),
        str(out_url),
        absolute(out_url),
    )  # workers: another cwd
    volume = _open_labels(str(labels_url))
    chunks = tuple(int(c) for c in chunk_shape)
    if len(chunks) != 3 or min(chunks) < 1:
        raise InputError(
            f"chunk shape {tuple(chunk_shape)} must be 3 positive ints (z, y, x), e.g. (64, 64, 64)"
        )
    chunks = tuple(min(c, n) for c, n in zip(chunks, volume.shape))
    prediction_store.check_output(given, overwrite=overwrite)
    boxes = [box for _, box in volume.box.grid(chunks)]
    config = _resolve_binary(
        config, _run_blocks(client, _label_range, boxes, volume=volume), volume, chunks
    )
    region = _balance_region(volume.box, balance_z_range)
    counted = [box.intersect(region) for box in boxes if not box.intersect(region).is_empty()]
    weights = config.class_weights or balanced_class_weights(
        sum(_run_blocks(client, _count_target, counted, volume=volume, config=config)), region.size
    )
    halo = halo_for(config)
    prediction_store.prepare_output(out_url, overwrite=overwrite)
    attrs = {
        **asdict(config),
        "class_weights": list(weights),
        "halo": list(halo),
        "labels": volume.url,
        "cutoff": cutoff_distance(config),
        "tolerance": TOLERANCE,
        "border": "background (0) outside the volume",
    }
    zarr.create_array(
        out_url,
        shape=volume.shape,
        chunks=chunks,
        dtype="float32",
        fill_value=0.0,
        compressors=[prediction_store.COMPRESSOR],
        dimension_names=prediction_store.DIMS,
        attributes={"long_name": "loss weight", prediction_store.ATTRS_KEY: {"weights": attrs}},
    )
    try:
        spent = _run_blocks(
            client,
            _weigh_block,
            boxes,
            volume=volume,
            out_url=out_url,
            config=config,
            class_weights=weights,
            halo=halo,
        )
    except BaseException:
        prediction_store.remove_output(out_url)  # no partial weights left behind
        raise
    return WeightReport(
        out_url, len(boxes), volume.box.size, time.perf_counter() - start, weights, halo, sum(spent)
    )


def _balance_region(volume: Box, z_range: tuple[int, int] | None) -> Box:
    """The slices whose class frequencies set the class weights: ``z_range``, else the whole volume."""
    if z_range is None:
        return volume
    begin, end = z_range
    if not 0 <= begin < end <= volume.shape[0]:
        raise InputError(
            f"class-balance z range {begin}:{end} is not a non-empty part of the labels' "
            f"{volume.shape[0]} slices; pass BEGIN:END with 0 <= BEGIN < END <= {volume.shape[0]}"
        )
    return Box((begin, *volume.begin[1:]), (end, *volume.end[1:]))


def _open_labels(url: str) -> Volume:
    volume = open_volume(url)  # raises for a missing, unreadable, empty or wrongly ranked input
    if volume.channels != 1 or np.dtype(volume.dtype).kind not in "ui":
        raise InputError(
            f"labels {url} have {volume.channels} channel(s) of {np.dtype(volume.dtype)}; pass one "
            "(z, y, x) volume of integer labels (0 = background, cells 1..n) or a 0/1 mask"
        )
    return volume


def _resolve_binary(
    config: WeightMapConfig, ranges: list[tuple[int, float, int]], volume: Volume, chunks: Shape
) -> WeightMapConfig:
    """``config`` with ``binary`` decided by the whole volume's (min, min nonzero, max) labels; checks chunks."""
    lowest, lowest_nonzero, highest = (
        f(r[i] for r in ranges) for i, f in enumerate((min, min, max))
    )
    if lowest < 0:
        raise InputError(
            f"labels {volume.url} hold negative values (min {lowest}); pass 0 = background, cells 1..n"
        )
    binary = config.binary if config.binary is not None else 0 < lowest_nonzero == highest
    spanned = volume.shape[1:] if config.ndim == 2 else volume.shape
    if binary and chunks[3 - len(spanned) :] != spanned:
        raise InputError(
            f"labels {volume.url} are a binary mask, whose connected components (the cells) may cross chunks "
            f"{chunks}; label the cells first (scipy.ndimage.label) or use chunks of shape {(1, *spanned)[-3:]}"
        )
    return replace(config, binary=binary)


def _read_padded(volume: Volume, box: Box) -> np.ndarray:
    """The labels over ``box``, background (0) outside the volume."""
    low, high = box.outside(volume.box)
    return np.pad(volume.read(box.intersect(volume.box))[0], list(zip(low, high)))


def _label_range(box: Box, *, volume: Volume) -> tuple[int, float, int]:
    """(smallest, smallest nonzero or inf, largest) label in ``box``."""
    labels = _read_padded(volume, box)
    nonzero = labels[labels != 0]
    return int(labels.min()), int(nonzero.min()) if nonzero.size else math.inf, int(labels.max())


def _count_target(box: Box, *, volume: Volume, config: WeightMapConfig) -> int:
    """Target (foreground) voxels in ``box``; its borders need one voxel of context."""
    read = box.grow((0 if config.ndim == 2 else 1, 1, 1))
    return int(training_target(_read_padded(volume, read), config)[box.to_slices(read.begin)].sum())


def _weigh_block(
    box: Box,
    *,
    volume: Volume,
    out_url: str,
    config: WeightMapConfig,
    class_weights: tuple[float, float],
    halo: Shape,
) -> float:
    """One block: weigh the write box with its halo as context, write its chunk. Returns seconds."""
    start = time.perf_counter()
    labels = _read_padded(volume, box.grow(halo))
    weights = weight_map(
        labels, config, class_weights, write_box=Box.from_shape(box.shape, begin=halo)
    )
    zarr.open_array(out_url, mode="r+")[box.to_slices()] = weights
    return time.perf_counter() - start


def _run_blocks(
    client: Client, function: Callable[..., Any], boxes: list[Box], **kwargs: Any
) -> list[Any]:
    """``function(box, **kwargs)`` per box as Dask tasks, a bounded number in flight."""
    prefix = function.__name__.strip("_").replace("_", "-")
    return list(
        map_bounded(
            client,
            function,
            boxes,
            name=lambda box: prefix + "-" + "-".join(map(str, box.begin)),
            **kwargs,
        )
    )
