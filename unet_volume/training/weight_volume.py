"""The loss weight map of a whole label volume, block by block on Dask, into Zarr.

One task per block reads the block's write box grown by
:func:`~unet_volume.training.weight_map.halo_for`
(background outside the volume), weighs it with :func:`~unet_volume.training.weight_map.weight_map`,
writes its own chunk of the float32 array ``weights`` and marks itself done. Two cheap passes
come first, so that every block uses the whole volume's class weights: the label range (binary
mask or instance labels; no negative labels) and the target's class counts. The result equals
``weight_map(whole labels)`` bit for bit for integer voxel sizes (see :mod:`weight_map`).

The output is a Zarr v3 group laid out as a prediction's (:mod:`unet_volume.output.prediction`),
with the same records (:mod:`unet_volume.output.lifecycle`): a run that stops keeps its finished
blocks, and running it again resumes::

    WEIGHTS.zarr/
      weights       (z, y, x) float32, one chunk per block
      z, y, x       voxel centres in physical units
      done          (block_z, block_y, block_x) uint8: 1 where a block is written

``open_volume("WEIGHTS.zarr")`` opens ``weights`` (the group names it), once it is complete.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
from distributed import Client

from unet_volume.cluster.task_window import map_bounded
from unet_volume.errors import InputError
from unet_volume.geometry import Box, Shape
from unet_volume.io.locations import absolute, with_retries
from unet_volume.io.volumes import Volume, check_z_range, open_volume
from unet_volume.output.bookkeeping import DONE, fingerprint
from unet_volume.output.lifecycle import (
    check_run_limits,
    create_output,
    find_resumable,
    opened_arrays,
    run_info,
    run_recorded,
)
from unet_volume.output.prediction import new_single_array_output, volume_attrs
from unet_volume.prediction.memory import check_worker_memory, weight_memory
from unet_volume.prediction.options import DEFAULT_OPTIONS
from unet_volume.progress import Progress, ProgressSink
from unet_volume.tiling import Region, block_key, count_blocks, plan_halo_blocks
from unet_volume.training.weight_map import (
    TOLERANCE,
    WEIGHT_BLOCK,
    WeightMapConfig,
    balanced_class_weights,
    cutoff_distance,
    halo_for,
    training_target,
    weight_map,
)

WEIGHTS = "weights"
WEIGHTS_ARRAY = (WEIGHTS, "float32", 0.0, "loss weight")
"""Name of the weight array in the output group."""


@dataclass(frozen=True, slots=True)
class WeightReport:
    """What :func:`compute_weight_volume` did.

    ``task_seconds`` sums the time of the weight tasks (read, weigh, write); ``skipped``
    counts the blocks an earlier run of the same weights had done (resumed, not redone).
    """

    output_url: str
    blocks: int
    voxels: int
    seconds: float
    class_weights: tuple[float, float]
    halo: Shape
    task_seconds: float
    skipped: int = 0

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
    max_failures: int = DEFAULT_OPTIONS.max_failures,
    stall_after: float = DEFAULT_OPTIONS.stall_after,
    on_progress: ProgressSink | None = None,
) -> WeightReport:
    """Write the weight map of the labels at ``labels_url`` into a Zarr v3 group at ``out_url``.

    The group holds the float32 array ``weights`` (z, y, x) with coordinates, and the run's
    records (:mod:`unet_volume.output.lifecycle`). One task per block (one chunk of ``block_shape``,
    by default :data:`~unet_volume.training.weight_map.WEIGHT_BLOCK`) reads its write box grown by
    :func:`halo_for`, writes its chunk and marks itself done. A binary mask needs blocks
    spanning its components (whole (y, x) slices for ``ndim=2``, the volume for ``ndim=3``);
    otherwise label it first. ``balance_z_range`` (half-open) counts the class frequencies over
    those slices only, e.g. the training region, so that held-out slices stay unseen.

    Bad input is refused before anything is written. Running the same weights again resumes an
    incomplete output (only missing blocks are computed) and leaves a complete one be; up to
    ``max_failures`` blocks may fail, recorded in the output, before the run stops.
    ``on_progress`` hears of every finished block (:mod:`unet_volume.progress`).
    """
    start = time.perf_counter()
    given, out_url = str(out_url), absolute(out_url)  # workers may have another cwd
    volume = _open_labels(str(labels_url))
    shape = _check_block_shape(block_shape or WEIGHT_BLOCK[config.ndim], volume)
    check_run_limits(max_failures, stall_after)
    _check_memory(client, shape, halo_for(config))
    region = _balance_region(volume.box, balance_z_range)
    identity = _identity(volume, config, shape, region)
    existing = find_resumable(given, out_url, identity, overwrite=overwrite)
    if existing is not None and existing.complete:
        return _already_done(out_url, existing.total, time.perf_counter() - start)
    config, weights = _resolve(client, volume, config, shape, region)
    if existing is None:
        attrs = _run_attrs(volume, config, weights, identity)
        create_output(
            out_url,
            lambda: new_single_array_output(out_url, volume, shape, attrs, WEIGHTS_ARRAY),
            overwrite=overwrite,
        )
    blocks = plan_halo_blocks(volume.shape, shape, halo_for(config))
    run_options: dict[str, Any] = {"max_failures": max_failures, "stall_after": stall_after}
    task: dict[str, Any] = {
        "volume": volume,
        "out_url": out_url,
        "token": uuid.uuid4().hex,  # this run's opening of the output, once per worker
        "config": config,
        "class_weights": weights,
    }

    def run(done: Collection[Shape]) -> list[dict[str, Any]]:
        todo = (block for block in blocks if block.index not in done)
        total = count_blocks(volume.shape, shape) - len(done)
        results = map_bounded(
            client, _weigh_block, todo, name=block_key("weigh-block"), **run_options, **task
        )
        return list(_reported(results, total, on_progress))

    finished = run_recorded(out_url, run, _report, command="unet-volume weights")
    voxels, seconds = sum(d["voxels"] for d in finished), sum(d["seconds"] for d in finished)
    skipped = count_blocks(volume.shape, shape) - len(finished)
    elapsed = time.perf_counter() - start
    halo = halo_for(config)
    return WeightReport(out_url, len(finished), voxels, elapsed, weights, halo, seconds, skipped)


def _check_memory(client: Client, block_shape: Shape, halo: Shape) -> None:
    """Refuse a block whose estimated memory exceeds the workers' limit, before any writing."""
    read = Box.from_shape(block_shape).grow(halo).shape
    check_worker_memory(
        client.scheduler_info(n_workers=-1)["workers"],
        weight_memory(read),
        block="x".join(map(str, block_shape)),
        fix="pass a smaller --block-shape, or give the workers more memory",
    )


def _already_done(url: str, total: int, seconds: float) -> WeightReport:
    """The report of a run that finds its output complete: nothing done, all skipped."""
    recipe = (run_info(url) or {})["weights"]
    weights, halo = tuple(recipe["class_weights"]), tuple(recipe["halo"])
    return WeightReport(url, 0, 0, seconds, weights, halo, 0.0, skipped=total)  # type: ignore[arg-type]


def _resolve(
    client: Client, volume: Volume, config: WeightMapConfig, shape: Shape, region: Box
) -> tuple[WeightMapConfig, tuple[float, float]]:
    """The two cheap passes over the labels: ``binary`` decided (and checked), class weights."""
    boxes = [box for _, box in volume.box.grid(shape)]
    ranges = _run_boxes(client, _label_range, boxes, volume=volume)
    config = _resolve_binary(config, ranges, volume, shape)
    return config, config.class_weights or _balanced_weights(client, volume, config, boxes, region)


def _report(done: list[dict[str, Any]]) -> dict[str, Any]:
    """What the output records of a finished run."""
    return {"report": {"blocks": len(done), "voxels": sum(d["voxels"] for d in done)}}


def _identity(
    volume: Volume, config: WeightMapConfig, block_shape: Shape, region: Box
) -> dict[str, Any]:
    """What makes two weight runs the same run: only then may one resume the other's output."""
    return {
        "weights": asdict(config),
        "block_shape": list(block_shape),
        "balance_z_range": [region.begin[0], region.end[0]],
        "output_dtype": "float32",
        "input": fingerprint(volume),
    }


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


def _run_attrs(
    volume: Volume,
    config: WeightMapConfig,
    weights: tuple[float, float],
    identity: dict[str, Any],
) -> dict[str, Any]:
    """The output's run information: the weight map's recipe, its input and its identity."""
    recipe = {
        **asdict(config),
        "class_weights": list(weights),
        "halo": list(halo_for(config)),
        "labels": volume.url,
        "cutoff": cutoff_distance(config),
        "tolerance": TOLERANCE,
        "border": "background (0) outside the volume",
    }
    return {
        "array": WEIGHTS,
        "weights": recipe,
        "input": volume_attrs(volume),
        "identity": identity,
    }


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
    block: Region,
    *,
    volume: Volume,
    out_url: str,
    token: str,
    config: WeightMapConfig,
    class_weights: tuple[float, float],
) -> dict[str, Any]:
    """One task: weigh the write box with the rest of the read box as context, write its chunk,
    mark the block done.

    Idempotent, as a prediction block; transient read and write errors are retried. Returns the
    block's voxels and seconds.
    """
    start = time.perf_counter()
    labels = with_retries(_read_padded, volume, block.read_box)
    inner = block.write_box.shift(tuple(-b for b in block.read_box.begin))
    weights = weight_map(labels, config, class_weights, write_box=inner)
    stored, done = opened_arrays(out_url, token, (WEIGHTS, DONE))
    with_retries(stored.__setitem__, block.write_box.to_slices(), weights)
    with_retries(done.__setitem__, block.index, 1)  # only after the data is stored
    return {"voxels": block.write_box.size, "seconds": time.perf_counter() - start}


def _reported(
    results: Iterable[dict[str, Any]], total: int, sink: ProgressSink | None
) -> Iterator[dict[str, Any]]:
    """The blocks' results as they come, each told to ``sink`` as progress."""
    start, voxels = time.perf_counter(), 0
    for done, result in enumerate(results, start=1):
        voxels += result["voxels"]
        if sink is not None:
            seconds = time.perf_counter() - start
            sink(Progress.of_blocks("weights", done, total, voxels, seconds))
        yield result


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
