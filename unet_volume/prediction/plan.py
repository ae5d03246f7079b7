"""A prediction planned: every check made and every shape resolved before anything is written.

:func:`plan_prediction` checks the input, the model, the geometry and the output, resolves the
block, shard and task shapes (automatic ones for the workers that will run them), and finds a
run of the same identity already at the output, to resume. :func:`fit_to_workers` re-fits a plan
made before its cluster existed to that cluster's workers, without reading the model or the
input again. Running a plan is :mod:`unet_volume.prediction.run`'s.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from unet_volume.cluster.client import task_slots
from unet_volume.errors import InputError
from unet_volume.geometry import Shape, within
from unet_volume.grid import OutputLayout, auto_shard_shape, check_shard_shape
from unet_volume.io.locations import absolute
from unet_volume.io.volumes import Volume, open_volume
from unet_volume.models.checkpoint import (
    Checkpoint,
    checkpoint_bytes,
    checkpoint_from_bytes,
    read_checkpoint_bytes,
)
from unet_volume.models.unet import UNet
from unet_volume.output.bookkeeping import RunStatus, fingerprint
from unet_volume.output.lifecycle import check_run_limits, find_resumable, run_info
from unet_volume.output.prediction import OutputDtype, check_output_dtype
from unet_volume.prediction.estimate import auto_block_shape
from unet_volume.prediction.model_predictor import PRECISIONS, Precision
from unet_volume.prediction.options import DEFAULT_BLOCK, DEFAULT_OPTIONS, PredictOptions
from unet_volume.prediction.tasks import TaskPlan, auto_task_shape
from unet_volume.tiling import TileGeometry, check_block_shape


@dataclass(frozen=True)
class PredictionPlan:
    """A validated prediction run: everything is checked, nothing is written yet.

    ``options`` are the run's options as given; the fields are what they resolved to (an
    automatic block, shard and task shape, the geometry, the run to resume).
    """

    checkpoint: bytes = field(repr=False)
    info: Checkpoint = field(repr=False)
    volume: Volume
    output_url: str
    options: PredictOptions
    geometry: TileGeometry
    tasks: TaskPlan
    """The output's grid (blocks in shards, its :class:`~unet_volume.grid.OutputLayout`) and the
    tasks over it (:mod:`unet_volume.prediction.tasks`), built once here: the store, the engine
    and the done records all read this one value. The task shape is not part of the identity:
    it changes no output voxel."""
    identity: dict[str, Any] = field(default_factory=dict)
    existing: RunStatus | None = None
    """The run of the same identity found at the output, to resume (None: start anew)."""

    @property
    def output_dtype(self) -> OutputDtype:
        return self.options.output_dtype

    @property
    def tta(self) -> bool:
        return self.options.tta

    @property
    def precision(self) -> Precision:
        return self.options.precision

    @property
    def threshold(self) -> float | None:
        return self.options.threshold

    @property
    def overwrite(self) -> bool:
        return self.options.overwrite

    @property
    def layout(self) -> OutputLayout:
        return self.tasks.layout

    @property
    def block_shape(self) -> Shape:
        return self.layout.block_shape

    @property
    def shard_shape(self) -> Shape:
        return self.layout.shard_shape

    @property
    def task_shape(self) -> Shape:
        return self.tasks.task_shape

    @property
    def num_blocks(self) -> int:
        return self.layout.num_blocks


def plan_prediction(
    model: UNet | str | Path | bytes,
    image: str | Path,
    output: str | Path,
    options: PredictOptions = DEFAULT_OPTIONS,
    *,
    workers: Mapping[str, Mapping[str, Any]] | None = None,
) -> PredictionPlan:
    """Validate a run (see :func:`predict_volume`) without writing anything.

    ``block_shape="auto"`` is resolved for ``workers`` (``client.scheduler_info()["workers"]``:
    their memory limit and GPUs; none given: CPU workers without a limit).

    Raises :class:`~unet_volume.errors.UnetVolumeError` subclasses naming the
    problem and the fix: unreadable or empty input, wrong rank or channel count,
    invalid block or tile shape, existing output, a file that is not a checkpoint.
    """
    checkpoint = _checkpoint_of(model)
    info = checkpoint_from_bytes(checkpoint)
    volume = open_volume(image, voxel_size=options.voxel_size, units=options.units)
    return _plan(checkpoint, info, volume, output, options, workers or {})


def _plan(
    checkpoint: bytes,
    info: Checkpoint,
    volume: Volume,
    output: str | Path,
    options: PredictOptions,
    workers: Mapping[str, Mapping[str, Any]],
    input_fingerprint: dict[str, Any] | None = None,
) -> PredictionPlan:
    """:func:`plan_prediction` of a model and an input already read; ``input_fingerprint``:
    the input's, if the caller has it (a re-plan reads no chunk again)."""
    if volume.channels != info.config.in_channels:
        raise InputError(
            f"image {volume.url} has {volume.channels} channel(s) but the model expects "
            f"{info.config.in_channels}; pass a (c, z, y, x) array with that many channels"
        )
    dtype = check_output_dtype(options.output_dtype)
    if options.precision not in PRECISIONS:
        raise InputError(
            f"precision {options.precision!r} is unknown; pass one of {', '.join(PRECISIONS)}"
        )
    check_threshold(options.threshold, info.config.num_classes)
    offset = info.trained_input.read_offset(options.label_offset)
    volume = replace(volume, offset=offset)
    wanted = options.block_shape
    block = _auto_block(info, volume, workers) if isinstance(wanted, str) else wanted
    shape, geometry = plan_geometry(info, volume, block, options.tile_shape)
    wanted_shard: Sequence[int] | None = options.shard_shape
    if wanted_shard is None and not options.overwrite:
        wanted_shard = recorded_shard_shape(absolute(output), shape)
    shard = plan_shards(volume.shape, shape, wanted_shard, ndim=info.config.ndim)
    layout = OutputLayout(volume.shape, shape, shard)
    task = plan_task_shape(volume, layout, geometry, options.task_shape, slots=task_slots(workers))
    check_run_limits(options.max_failures, options.stall_after)
    output_url = absolute(output)  # workers may not share our working directory
    identity = run_identity(info, volume, shape, geometry, dtype, tta=options.tta)
    identity["input"] = input_fingerprint or fingerprint(volume)
    identity.update(shard_shape=list(shard), precision=options.precision)
    if options.threshold is not None:  # absent otherwise: outputs of earlier versions resume
        identity["threshold"] = options.threshold
    if any(offset):
        identity["label_offset"] = list(offset)
    existing = find_resumable(str(output), output_url, identity, overwrite=options.overwrite)
    return PredictionPlan(
        checkpoint,
        info,
        volume,
        output_url,
        options,
        geometry,
        TaskPlan(layout, task),
        identity,
        existing,
    )


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
    shape = within(shape, volume.shape, period_geometry.period)
    geometry = TileGeometry.for_unet(
        info.config.ndim, info.config.depth, min_output=tile_shape or shape
    )
    return shape, geometry


def _auto_block(
    info: Checkpoint, volume: Volume, workers: Mapping[str, Mapping[str, Any]]
) -> Shape:
    """``--block-shape auto`` for these workers (see :func:`planning.auto_block_shape`)."""
    limits = [int(w["memory_limit"]) for w in workers.values() if w.get("memory_limit")]
    on_gpu = any(w.get("resources", {}).get("GPU", 0) >= 1 for w in workers.values())
    return auto_block_shape(
        info.config,
        volume.shape,
        volume.chunks,
        on_gpu=on_gpu,
        memory_limit=min(limits, default=None),
        input_itemsize=volume.read_itemsize,
    )


def plan_shards(
    volume_shape: Shape, block_shape: Shape, wanted: Sequence[int] | None, *, ndim: int
) -> Shape:
    """The shard shape: ``wanted`` (checked), else the automatic one; no larger than the
    volume rounded up to whole blocks."""
    if wanted is None:
        return auto_shard_shape(volume_shape, block_shape, ndim=ndim)
    shape = check_shard_shape(wanted, block_shape)
    return within(shape, volume_shape, block_shape)


def recorded_shard_shape(output_url: str, block_shape: Shape) -> Shape | None:
    """The shard shape an earlier run of this block shape recorded at the output, if any: the
    automatic choice may change between versions, and a resumed run keeps its own."""
    identity = (run_info(output_url) or {}).get("identity") or {}
    if identity.get("block_shape") == list(block_shape) and identity.get("shard_shape"):
        return tuple(int(s) for s in identity["shard_shape"])
    return None


def plan_task_shape(
    volume: Volume,
    layout: OutputLayout,
    geometry: TileGeometry,
    wanted: Sequence[int] | None,
    *,
    slots: int = 1,
) -> Shape:
    """The task shape: ``wanted`` (checked), else the automatic one for workers that run
    ``slots`` tasks at once; no larger than the volume rounded up to whole shards."""
    if wanted is None:
        return auto_task_shape(volume, layout, geometry, slots=slots)
    shape = check_shard_shape(wanted, layout.shard_shape, name="task", unit="shard")
    return within(shape, volume.shape, layout.shard_shape)


def fit_to_workers(
    plan: PredictionPlan, workers: Mapping[str, Mapping[str, Any]]
) -> PredictionPlan:
    """``plan`` (made before the cluster was known) for the ``workers`` that run it
    (``client.scheduler_info()["workers"]``): an automatic block shape picked for their memory
    and device, an automatic task shape that keeps them busy. A given shape stays as given.
    """
    if plan.options.block_shape == "auto":  # the same model and input, for these workers
        recorded = plan.identity["input"]
        model, options = plan.checkpoint, plan.options
        return _plan(model, plan.info, plan.volume, plan.output_url, options, workers, recorded)
    if plan.options.task_shape is not None:
        return plan
    slots = task_slots(workers)
    task = plan_task_shape(plan.volume, plan.layout, plan.geometry, None, slots=slots)
    return replace(plan, tasks=TaskPlan(plan.layout, task))


def check_threshold(threshold: float | None, num_classes: int) -> None:
    """Refuse a segmentation threshold outside (0, 1) or for a model of other than 2 classes."""
    if threshold is None:
        return
    if num_classes != 2 or not 0.0 < threshold < 1.0:
        raise InputError(
            f"threshold {threshold:g} needs a two-class model and a value between 0 and 1 "
            f"(this model has {num_classes} classes); pass e.g. --threshold 0.3, or none for "
            "the most probable class"
        )


def _checkpoint_of(model: UNet | str | Path | bytes) -> bytes:
    if isinstance(model, bytes):
        return model
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
    """What makes two runs the same run: only then may one resume the other's output (with
    the input's fingerprint, which :func:`_plan` adds: it reads the input)."""
    return {
        "model_sha256": info.sha256,
        "block_shape": list(block_shape),
        "tile_input_shape": list(geometry.input_shape),
        "tile_output_shape": list(geometry.output_shape),
        "halo": list(geometry.halo),
        "output_dtype": output_dtype,
        "tta": tta,
    }
