"""The loss weight map of a whole label volume, block by block on Dask, into Zarr.

One task per block reads the block's write box grown by :func:`~unet_volume.weight_map.halo_for`
(background outside the volume), weighs it with :func:`~unet_volume.weight_map.weight_map` and
writes its own chunk of a float32 Zarr v3 array. Two cheap passes come first, so that every
block uses the whole volume's class weights: the label range (binary mask or instance
labels; no negative labels) and the target's class counts. The result equals
``weight_map(whole labels)`` bit for bit for integer voxel sizes (see :mod:`weight_map`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import zarr
from distributed import Client

from unet_volume import prediction_store
from unet_volume.cluster import map_bounded
from unet_volume.errors import InputError
from unet_volume.geometry import Box, Shape
from unet_volume.storage import (
    Volume,
    absolute,
    check_z_range,
    open_volume,
    removed_on_failure,
)
from unet_volume.tiling import Block, block_key, plan_halo_blocks
from unet_volume.weight_map import (
    TOLERANCE,
    WEIGHT_BLOCK,
    WeightMapConfig,
    balanced_class_weights,
    cutoff_distance,
    halo_for,
    training_target,
    weight_map,
)


@dataclass(frozen=True, slots=True)
class WeightReport:
    """What :func:`compute_weight_volume` did.

    ``task_seconds`` sums the time of the weight tasks (read, weigh, write).
    """

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
    block_shape: Sequence[int] | None = None,
    client: Client,
    overwrite: bool = False,
    balance_z_range: tuple[int, int] | None = None,
) -> WeightReport:
    """Write the weight map of the labels at ``labels_url``: a float32 Zarr v3 array at ``out_url``.

    One task per block (one output chunk of ``block_shape``, by default
    :data:`~unet_volume.weight_map.WEIGHT_BLOCK`) reads its write box grown by
    :func:`halo_for` and writes its chunk. A binary mask needs blocks spanning its components
    (whole (y, x) slices for ``ndim=2``, the volume for ``ndim=3``); otherwise label it first.
    ``balance_z_range`` (half-open) counts the class frequencies over those slices only, e.g.
    the training region, so that held-out slices stay unseen. Bad input is refused before
    anything is written; a run that fails later leaves no output.
    """
    start = time.perf_counter()
    given, out_url = str(out_url), absolute(out_url)  # workers may have another cwd
    volume = _open_labels(str(labels_url))
    shape = _check_block_shape(block_shape or WEIGHT_BLOCK[config.ndim], volume)
    prediction_store.check_output(given, overwrite=overwrite)
    region = _balance_region(volume.box, balance_z_range)
    boxes = [box for _, box in volume.box.grid(shape)]
    ranges = _run_boxes(client, _label_range, boxes, volume=volume)
    config = _resolve_binary(config, ranges, volume, shape)
    weights = config.class_weights or _balanced_weights(client, volume, config, boxes, region)
    blocks = list(plan_halo_blocks(volume.shape, shape, halo_for(config)))
    _create_output(out_url, volume, config, weights, shape, overwrite=overwrite)
    with removed_on_failure(out_url):  # no partial weights left behind
        spent = _run_blocks(
            client, blocks, volume=volume, out_url=out_url, config=config, class_weights=weights
        )
    seconds = time.perf_counter() - start
    halo = halo_for(config)
    return WeightReport(out_url, len(blocks), volume.box.size, seconds, weights, halo, sum(spent))


def _check_block_shape(block_shape: Sequence[int], volume: Volume) -> Shape:
    """Three positive sizes (z, y, x), clipped to the volume."""
    shape = tuple(int(c) for c in block_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(
            f"block shape {tuple(block_shape)} must be 3 positive sizes (z, y, x); "
            "pass e.g. --block-shape 1,512,512"
        )
    return tuple(min(c, n) for c, n in zip(shape, volume.shape))


def _balanced_weights(
    client: Client, volume: Volume, config: WeightMapConfig, boxes: list[Box], region: Box
) -> tuple[float, float]:
    """Balanced (background, foreground) weights from the target's voxels in ``region``."""
    counted = [box.intersect(region) for box in boxes if not box.intersect(region).is_empty()]
    counts = _run_boxes(client, _count_target, counted, volume=volume, config=config)
    return balanced_class_weights(sum(counts), region.size)


def _create_output(
    out_url: str,
    volume: Volume,
    config: WeightMapConfig,
    weights: tuple[float, float],
    block_shape: Shape,
    *,
    overwrite: bool,
) -> None:
    """The empty float32 output, one chunk per block, its recipe in the attributes."""
    prediction_store.prepare_output(out_url, overwrite=overwrite)
    attrs = {
        **asdict(config),
        "class_weights": list(weights),
        "halo": list(halo_for(config)),
        "labels": volume.url,
        "cutoff": cutoff_distance(config),
        "tolerance": TOLERANCE,
        "border": "background (0) outside the volume",
    }
    zarr.create_array(
        out_url,
        shape=volume.shape,
        chunks=block_shape,
        dtype="float32",
        fill_value=0.0,
        compressors=[prediction_store.COMPRESSOR],
        dimension_names=prediction_store.DIMS,
        attributes={"long_name": "loss weight", prediction_store.ATTRS_KEY: {"weights": attrs}},
    )


def _balance_region(volume: Box, z_range: tuple[int, int] | None) -> Box:
    """The slices whose class frequencies set the class weights: ``z_range``, else all."""
    begin, end = check_z_range(z_range, volume.shape[0], what="class-balance z range")
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
    config: WeightMapConfig, ranges: list[tuple[int, float, int]], volume: Volume, blocks: Shape
) -> WeightMapConfig:
    """``config`` with ``binary`` decided by the labels; checks that blocks span a mask's cells.

    ``ranges`` holds each block's (min, min nonzero, max) label.
    """
    lowest, lowest_nonzero, highest = (
        f(r[i] for r in ranges) for i, f in enumerate((min, min, max))
    )
    if lowest < 0:
        raise InputError(
            f"labels {volume.url} hold negative values (min {lowest}); "
            "pass 0 = background, cells 1..n"
        )
    binary = config.binary if config.binary is not None else 0 < lowest_nonzero == highest
    spanned = volume.shape[1:] if config.ndim == 2 else volume.shape
    if binary and blocks[3 - len(spanned) :] != spanned:
        raise InputError(
            f"labels {volume.url} are a binary mask, whose connected components (the cells) "
            f"may cross blocks of {blocks}; label the cells first (scipy.ndimage.label) "
            f"or pass --block-shape {','.join(map(str, (1, *spanned)[-3:]))}"
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
    block: Block,
    *,
    volume: Volume,
    out_url: str,
    config: WeightMapConfig,
    class_weights: tuple[float, float],
) -> float:
    """One task: weigh the write box with the rest of the read box as context, write its chunk.

    Returns the task's seconds.
    """
    start = time.perf_counter()
    labels = _read_padded(volume, block.read_box)
    inner = block.write_box.shift(tuple(-b for b in block.read_box.begin))
    weights = weight_map(labels, config, class_weights, write_box=inner)
    zarr.open_array(out_url, mode="r+")[block.write_box.to_slices()] = weights
    return time.perf_counter() - start


def _run_blocks(client: Client, blocks: list[Block], **kwargs: Any) -> list[float]:
    """:func:`_weigh_block` per block as Dask tasks, a bounded number in flight."""
    return list(map_bounded(client, _weigh_block, blocks, name=block_key("weigh-block"), **kwargs))


def _run_boxes(
    client: Client, function: Callable[..., Any], boxes: list[Box], **kwargs: Any
) -> list[Any]:
    """``function(box, **kwargs)`` per box as Dask tasks: the cheap passes before the blocks."""
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
