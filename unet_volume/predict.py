"""The overlap-tile prediction engine: one Dask task per output block.

Each block task reads its own read box straight from the input store (mirrored
outside the volume), runs the predictor tile by tile with tile origins on the
network's period lattice, and writes its own output chunks. No voxel data goes
through the scheduler or the client; tasks return a few numbers. Because tiles
of a valid-convolution U-Net placed on the period lattice compute exactly what
one whole-volume pass computes, the stitched output has no seams and needs no
blending (see :mod:`unet_volume.tiling`).

The engine (:func:`predict_block`, :func:`run_prediction`) takes any *predictor*:
a picklable callable mapping an input tile ``(c, z, y, x)`` to class
probabilities ``(k, *geometry.output_shape)``. :func:`predict_volume` wraps a
U-Net checkpoint in a :class:`ModelPredictor`, which builds the network once per
worker process and keeps it.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from distributed import Client
from tqdm.auto import tqdm

from unet_volume import __version__
from unet_volume.checkpoint import (
    Checkpoint,
    checkpoint_bytes,
    checkpoint_from_bytes,
    read_checkpoint_bytes,
)
from unet_volume.cluster import gpu_resources, map_bounded, open_client
from unet_volume.errors import BlockError, GeometryError, InputError
from unet_volume.geometry import Box, Shape, ceil_div
from unet_volume.model import UNet
from unet_volume.predict_config import DEFAULT_BLOCK, DEFAULT_OPTIONS, PredictOptions
from unet_volume.prediction_store import (
    OutputDtype,
    PredictionStore,
    check_output_dtype,
    create_prediction,
    find_resumable,
    finish_prediction,
    prepare_output,
    record_failures,
    volume_attrs,
)
from unet_volume.predictor import ModelPredictor
from unet_volume.run_record import BlockFailure, RunStatus, done_blocks, fingerprint
from unet_volume.storage import Volume, absolute, open_volume, with_retries
from unet_volume.tiling import (
    Block,
    TileGeometry,
    block_key,
    check_block_shape,
    count_blocks,
    plan_blocks,
    plan_tiles,
)

log = logging.getLogger(__name__)

Predictor = Callable[[np.ndarray], np.ndarray]
"""Input tile ``(c, z, y, x)`` -> probabilities ``(k, *output_shape)``."""


@dataclass(frozen=True, slots=True)
class RunReport:
    """What a run did: counts and timing, recorded in the output's attributes too."""

    output_url: str
    blocks: int
    voxels: int
    seconds: float
    task_seconds: dict[str, float] = field(default_factory=dict)
    """Time summed over block tasks, per stage: ``read``, ``predict``, ``write``."""
    skipped: int = 0
    """Blocks done by an earlier run of the same prediction (resumed), not redone."""

    @property
    def voxels_per_second(self) -> float:
        return self.voxels / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "voxels_per_second": self.voxels_per_second}


def predict_tiles(
    data: np.ndarray, read_box: Box, write_box: Box, *, predictor: Predictor, geometry: TileGeometry
) -> np.ndarray:
    """Probabilities for ``write_box`` from ``data`` (the input over ``read_box``).

    Pure and idempotent: tiles start on the period lattice at ``write_box.begin``;
    each tile's output is cropped to the write box.
    """
    result: np.ndarray | None = None
    for tile_box in plan_tiles(write_box, geometry):
        tile_input = data[(slice(None), *geometry.input_box(tile_box).to_slices(read_box.begin))]
        probs = predictor(tile_input)
        if tuple(probs.shape[1:]) != geometry.output_shape:
            raise GeometryError(
                f"predictor returned shape {probs.shape} for a tile of {tile_input.shape}; "
                f"expected (classes, *{geometry.output_shape})"
            )
        if result is None:
            result = np.empty((probs.shape[0], *write_box.shape), dtype=probs.dtype)
        part = tile_box.intersect(write_box)
        result[(slice(None), *part.to_slices(write_box.begin))] = probs[
            (slice(None), *part.to_slices(tile_box.begin))
        ]
    assert result is not None  # plan_tiles always yields at least one tile
    return result


def check_finite(data: np.ndarray, block: Block, volume: Volume) -> None:
    """Refuse NaN or Inf in a block's input, naming the block and the first bad voxel.

    Checked per block, as it is read: scanning a terabyte up front would take as long as
    the run. A network fed NaN predicts NaN everywhere its receptive field reaches.
    """
    if data.dtype.kind != "f" or np.isfinite(data).all():
        return
    channel, *offset = (int(i) for i in np.argwhere(~np.isfinite(data))[0])
    voxel = tuple(o + b for o, b in zip(offset, block.read_box.begin))
    where = "" if volume.box.contains(Box.from_shape((1, 1, 1), begin=voxel)) else " (mirrored)"
    raise InputError(
        f"input {volume.url} holds {data[(channel, *offset)]} at voxel (z, y, x) {voxel}{where}, "
        f"channel {channel}, read by block {block.index} {block.write_box}; replace NaN and Inf "
        "(e.g. numpy.nan_to_num), then run the same command again"
    )


def predict_block(
    block: Block,
    *,
    volume: Volume,
    store: PredictionStore,
    predictor: Predictor,
    geometry: TileGeometry,
) -> dict[str, Any]:
    """One Dask task: read the block's read box, predict, write its chunks, mark it done.

    Idempotent: a block run twice (a worker died after writing) writes the same chunks.
    Transient read and write errors are retried; non-finite input fails the block.
    Returns the block's timings.
    """
    start = time.perf_counter()
    data = with_retries(volume.read, block.read_box)
    check_finite(data, block, volume)
    read_s = time.perf_counter() - start
    probs = predict_tiles(
        data, block.read_box, block.write_box, predictor=predictor, geometry=geometry
    )
    predict_s = time.perf_counter() - start - read_s
    with_retries(store.write, block.write_box, probs)
    with_retries(store.mark_done, block.index)  # only after the data is stored
    return {
        "index": block.index,
        "voxels": block.write_box.size,
        "seconds": {
            "read": read_s,
            "predict": predict_s,
            "write": time.perf_counter() - start - read_s - predict_s,
        },
    }


def run_prediction(
    client: Client,
    *,
    predictor: Predictor,
    geometry: TileGeometry,
    volume: Volume,
    store: PredictionStore,
    block_shape: Shape,
    max_in_flight: int | None = None,
    progress: bool = False,
    skip: Collection[Shape] = (),
    max_failures: int = 0,
) -> RunReport:
    """Submit one task per block not in ``skip``, keeping at most ``max_in_flight`` running.

    A bounded window (default: 4 per worker thread) keeps a 10^6-block volume from
    flooding the scheduler; the predictor is scattered once to every worker. When workers
    advertise a ``GPU`` resource, blocks run only there, one per GPU at a time. Up to
    ``max_failures`` blocks may fail while the others carry on; then :class:`BlockError`
    (its ``failures`` hold the blocks) is raised.
    """
    start = time.perf_counter()
    skipped = set(map(tuple, skip))
    total = count_blocks(volume.shape, block_shape) - len(skipped)
    shared = client.scatter(predictor, broadcast=True, hash=False)
    blocks = plan_blocks(volume.shape, block_shape, geometry)
    results = map_bounded(
        client,
        predict_block,
        (block for block in blocks if block.index not in skipped),
        name=block_key("predict-block"),
        window=max_in_flight,
        resources=gpu_resources(client),
        max_failures=max_failures,
        volume=volume,
        store=store,
        predictor=shared,
        geometry=geometry,
    )
    voxels = 0
    stages: Counter[str] = Counter()
    with tqdm(total=total, unit="block", disable=not progress, desc="predict") as bar:
        for result in results:
            voxels += result["voxels"]
            stages.update(result["seconds"])
            bar.update(1)
    seconds = time.perf_counter() - start
    return RunReport(store.url, total, voxels, seconds, dict(stages), skipped=len(skipped))


@dataclass(frozen=True)
class PredictionPlan:
    """A validated prediction run: everything is checked, nothing is written yet."""

    checkpoint: bytes = field(repr=False)
    info: Checkpoint = field(repr=False)
    volume: Volume
    output_url: str
    block_shape: Shape
    geometry: TileGeometry
    output_dtype: OutputDtype
    overwrite: bool
    tta: bool = False
    max_failures: int = 0
    identity: dict[str, Any] = field(default_factory=dict)
    existing: RunStatus | None = None
    """The run of the same identity found at the output, to resume (None: start anew)."""

    @property
    def num_blocks(self) -> int:
        return count_blocks(self.volume.shape, self.block_shape)


def plan_prediction(
    model: UNet | str | Path,
    image: str | Path,
    output: str | Path,
    options: PredictOptions = DEFAULT_OPTIONS,
) -> PredictionPlan:
    """Validate a run (see :func:`predict_volume`) without writing anything.

    Raises :class:`~unet_volume.errors.UnetVolumeError` subclasses naming the
    problem and the fix: unreadable or empty input, wrong rank or channel count,
    invalid block or tile shape, existing output, a file that is not a checkpoint.
    """
    checkpoint = _checkpoint_of(model)
    info = checkpoint_from_bytes(checkpoint)
    volume = open_volume(image, voxel_size=options.voxel_size, units=options.units)
    if volume.channels != info.config.in_channels:
        raise InputError(
            f"image {volume.url} has {volume.channels} channel(s) but the model expects "
            f"{info.config.in_channels}; pass a (c, z, y, x) array with that many channels"
        )
    dtype = check_output_dtype(options.output_dtype)
    shape, geometry = plan_geometry(info, volume, options.block_shape, options.tile_shape)
    _check_max_failures(options.max_failures)
    output_url = absolute(output)  # workers may not share our working directory
    identity = run_identity(info, volume, shape, geometry, dtype, tta=options.tta)
    existing = None if options.overwrite else find_resumable(str(output), output_url, identity)
    return PredictionPlan(
        checkpoint,
        info,
        volume,
        output_url,
        shape,
        geometry,
        dtype,
        options.overwrite,
        options.tta,
        options.max_failures,
        identity,
        existing,
    )


def run_plan(
    plan: PredictionPlan,
    client: Client,
    *,
    progress: bool = False,
    predictor: Predictor | None = None,
) -> RunReport:
    """Create (or resume) the output, run its missing blocks on ``client``, mark it complete.

    ``predictor`` replaces the plan's model (e.g. a probe in tests). A run that stops early
    (failed blocks, a killed driver, a lost cluster) keeps every finished block; failed blocks
    are recorded, and running the same plan again redoes only what is not done.
    """
    if plan.existing is not None and plan.existing.complete:
        return RunReport(plan.output_url, 0, 0, 0.0, skipped=plan.existing.total)
    store, done = _open_store(plan)
    if predictor is None:
        predictor = ModelPredictor(plan.checkpoint, tta=plan.tta)
    try:
        report = run_prediction(
            client,
            predictor=predictor,
            geometry=plan.geometry,
            volume=plan.volume,
            store=store,
            block_shape=plan.block_shape,
            progress=progress,
            skip=done,
            max_failures=plan.max_failures,
        )
    except BlockError as error:
        raise _recorded(plan, error) from error
    finish_prediction(plan.output_url, {"report": report.to_dict()})
    return report


def _open_store(plan: PredictionPlan) -> tuple[PredictionStore, set[Shape]]:
    """The output to write: the resumed one with its done blocks, or a new, empty one."""
    if plan.existing is not None:
        record_failures(plan.output_url, [])  # failed blocks are tried again
        store = PredictionStore(plan.output_url, plan.output_dtype)
        return store, done_blocks(plan.output_url)
    prepare_output(plan.output_url, overwrite=plan.overwrite)
    store = create_prediction(
        plan.output_url,
        volume=plan.volume,
        num_classes=plan.info.config.num_classes,
        block_shape=plan.block_shape,
        output_dtype=plan.output_dtype,
        attrs=_run_attrs(plan),
    )
    return store, set()


def _recorded(plan: PredictionPlan, error: BlockError) -> BlockError:
    """Record the failed blocks in the output; the error that names them and says what next."""
    failures = sorted(
        BlockFailure(block.index, str(block.write_box), str(cause))
        for block, cause in error.failures
    )
    record_failures(plan.output_url, failures)
    done = len(done_blocks(plan.output_url))
    first = "; ".join(map(str, failures[:3])) + ("; ..." if len(failures) > 3 else "")
    return BlockError(
        error.failures,
        message=f"{len(failures)} block(s) failed: {first}. The {done} finished blocks are kept "
        f"in {plan.output_url}; fix the cause and run the same command again to resume "
        "(`unet-volume status OUTPUT` lists the failures)",
    )


def _check_max_failures(value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InputError(f"max_failures must be an int >= 0, got {value!r}; e.g. 10")


def predict_volume(
    model: UNet | str | Path,
    image: str | Path,
    output: str | Path,
    options: PredictOptions = DEFAULT_OPTIONS,
    *,
    client: Client | None = None,
    progress: bool = False,
    **changes: Any,
) -> RunReport:
    """Predict a whole volume with a U-Net into a Zarr group at ``output``.

    Args:
        model: a :class:`UNet` or the path of a checkpoint.
        image: the volume to segment: a Zarr array (path or fsspec URL) or TIFF stack,
            ``(z, y, x)`` or ``(c, z, y, x)``.
        output: the output group (refused if it exists, unless ``overwrite``).
        options: how to predict; see :class:`PredictOptions` for each field and its default.
        client: an existing Dask client; by default a LocalCluster is started.
        progress: show a progress bar.
        changes: fields of ``options`` to change, e.g. ``block_shape=(1, 512, 512)``,
            ``output_dtype="float64"`` (``uint8``, ``float16``, ``float32`` or ``float64``).

    Everything is validated before anything is written (:func:`plan_prediction`). An
    incomplete output of the same run (model, geometry, dtype, input) is resumed: only its
    missing blocks are computed (:attr:`RunReport.skipped` counts the others).
    """
    plan = plan_prediction(model, image, output, replace(options, **changes))
    with nullcontext(client) if client is not None else open_client() as active:
        return run_plan(plan, active, progress=progress)


def plan_geometry(
    info: Checkpoint,
    volume: Volume,
    block_shape: Sequence[int] | None,
    tile_shape: Sequence[int] | None,
) -> tuple[Shape, TileGeometry]:
    """Block shape (validated, clipped to the volume) and the tile geometry for it."""
    period_geometry = TileGeometry.for_unet(
        info.config.ndim, info.config.depth, min_output=(1, 1, 1)
    )
    wanted = tuple(block_shape) if block_shape is not None else DEFAULT_BLOCK[info.config.ndim]
    shape = check_block_shape(wanted, period_geometry)
    # No chunk larger than the volume (rounded up to the period) is useful.
    shape = tuple(
        min(s, ceil_div(n, p) * p) for s, n, p in zip(shape, volume.shape, period_geometry.period)
    )
    geometry = TileGeometry.for_unet(
        info.config.ndim, info.config.depth, min_output=tile_shape or shape
    )
    return shape, geometry


def _checkpoint_of(model: UNet | str | Path) -> bytes:
    if isinstance(model, UNet):
        return checkpoint_bytes(model)
    return read_checkpoint_bytes(model)


def run_identity(
    info: Checkpoint,
    volume: Volume,
    block_shape: Shape,
    geometry: TileGeometry,
    output_dtype: OutputDtype,
    *,
    tta: bool,
) -> dict[str, Any]:
    """What makes two runs the same run: only then may one resume the other's output."""
    return {
        "model_sha256": info.sha256,
        "block_shape": list(block_shape),
        "tile_input_shape": list(geometry.input_shape),
        "tile_output_shape": list(geometry.output_shape),
        "halo": list(geometry.halo),
        "output_dtype": output_dtype,
        "tta": tta,
        "input": fingerprint(volume),
    }


def _run_attrs(plan: PredictionPlan) -> dict[str, Any]:
    info, geometry = plan.info, plan.geometry
    return {
        "version": __version__,
        "model": {
            "config": info.config.to_dict(),
            "sha256": info.sha256,
            "num_params": info.num_params,
            "metadata": info.metadata,
        },
        "geometry": {
            "block_shape": list(plan.block_shape),
            "tile_input_shape": list(geometry.input_shape),
            "tile_output_shape": list(geometry.output_shape),
            "halo": list(geometry.halo),
            "period": list(geometry.period),
            "border": "reflect (mirror, edge voxel not repeated)",
            "test_time_augmentation": "mean of 8 flips/turns in (y, x)" if plan.tta else None,
        },
        "input": volume_attrs(plan.volume),
        "identity": plan.identity,
    }
