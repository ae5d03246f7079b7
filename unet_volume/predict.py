"""A prediction run into an output: planned, checked, run on the engine, resumed, recorded.

:func:`plan_prediction` checks everything before anything is written (input, model, geometry,
output) and finds a run of the same identity already at the output, to resume.
:func:`run_plan` creates or resumes the output and runs its missing blocks on the engine
(:mod:`unet_volume.engine`); failed blocks are recorded and finished ones kept.
:func:`predict_volume` does both with a U-Net, wrapped in a :class:`ModelPredictor` that
builds the network once per worker process and keeps it.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from distributed import Client

from unet_volume import __version__
from unet_volume.checkpoint import (
    Checkpoint,
    checkpoint_bytes,
    checkpoint_from_bytes,
    read_checkpoint_bytes,
)
from unet_volume.cluster import open_client
from unet_volume.engine import Predictor, RunReport, run_prediction
from unet_volume.errors import BlockError, InputError
from unet_volume.geometry import Shape, ceil_div
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
from unet_volume.run_record import (
    BlockFailure,
    RunStatus,
    check_lease_free,
    done_blocks,
    fingerprint,
    held_lease,
)
from unet_volume.storage import Volume, absolute, exists, open_volume, removed_on_failure
from unet_volume.tiling import (
    TileGeometry,
    check_block_shape,
    count_blocks,
)


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
    stall_after: float = 600.0
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
    _check_run_limits(options)
    output_url = absolute(output)  # workers may not share our working directory
    identity = run_identity(info, volume, shape, geometry, dtype, tta=options.tta)
    if exists(output_url):
        check_lease_free(output_url, str(output))  # not even --overwrite while another runs
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
        options.stall_after,
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
    if plan.existing is None:
        _create_output(plan)
    if predictor is None:
        predictor = ModelPredictor(plan.checkpoint, tta=plan.tta)
    with held_lease(plan.output_url, plan.output_url):  # one driver writes an output
        record_failures(plan.output_url, [])  # failed blocks are tried again
        try:
            report = run_prediction(
                client,
                predictor=predictor,
                geometry=plan.geometry,
                volume=plan.volume,
                store=PredictionStore(plan.output_url, plan.output_dtype),
                block_shape=plan.block_shape,
                progress=progress,
                skip=done_blocks(plan.output_url),
                max_failures=plan.max_failures,
                stall_after=plan.stall_after,
            )
        except BlockError as error:
            raise _recorded(plan, error) from error
        finish_prediction(plan.output_url, {"report": report.to_dict()})
    return report


def _create_output(plan: PredictionPlan) -> None:
    """A new, empty output (an existing one is removed only with ``overwrite``).

    A location that cannot be written (read-only, not a folder, full) is refused in one line,
    and whatever part of the output was created is removed again.
    """
    prepare_output(plan.output_url, overwrite=plan.overwrite)
    try:
        with removed_on_failure(plan.output_url):
            create_prediction(
                plan.output_url,
                volume=plan.volume,
                num_classes=plan.info.config.num_classes,
                block_shape=plan.block_shape,
                output_dtype=plan.output_dtype,
                attrs=_run_attrs(plan),
            )
    except OSError as error:
        raise InputError(
            f"output {plan.output_url} cannot be created ({type(error).__name__}: "
            f"{error.strerror or error}); choose a location you can write to"
        ) from error


def _recorded(plan: PredictionPlan, error: BlockError) -> BlockError:
    """Record the failed blocks in the output; the error that names them and says what next."""
    failures = sorted(
        BlockFailure(block.index, str(block.write_box), _describe(cause))
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


def _describe(cause: BaseException) -> str:
    """A block's error in one line, with what to try where Dask's own words do not say it."""
    if type(cause).__name__ == "KilledWorker":
        return (
            "it killed its worker twice (out of memory, or a crash in native code); "
            "try a smaller --block-shape or --tile-shape, or workers with more memory"
        )
    return " ".join(f"{type(cause).__name__}: {cause}".split())


def _check_run_limits(options: PredictOptions) -> None:
    failures, stall = options.max_failures, options.stall_after
    if isinstance(failures, bool) or not isinstance(failures, int) or failures < 0:
        raise InputError(f"max_failures must be an int >= 0, got {failures!r}; e.g. 10")
    if isinstance(stall, bool) or not isinstance(stall, int | float) or not stall > 0:
        raise InputError(f"stall_after must be a number of seconds > 0, got {stall!r}; e.g. 600")


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
