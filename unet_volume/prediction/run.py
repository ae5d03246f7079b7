"""A prediction run into an output: planned, checked, run on the engine, resumed, recorded.

:func:`plan_prediction` checks everything before anything is written (input, model, geometry,
output) and finds a run of the same identity already at the output, to resume.
:func:`run_plan` creates or resumes the output and runs its missing blocks on the engine
(:mod:`unet_volume.prediction.engine`); failed blocks are recorded and finished ones kept.
:func:`predict_volume` does both with a U-Net, wrapped in a :class:`ModelPredictor` that
builds the network once per worker process and keeps it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from distributed import Client

from unet_volume import __version__
from unet_volume.cluster.client import gpu_resources, open_client, task_slots
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
from unet_volume.output.lifecycle import (
    check_run_limits,
    create_output,
    find_resumable,
    run_info,
    run_recorded,
)
from unet_volume.output.ome import publish_levels
from unet_volume.output.prediction import (
    OutputDtype,
    PredictionStore,
    check_output_dtype,
    create_prediction,
    segmentation_name,
    volume_attrs,
)
from unet_volume.prediction.engine import (
    PredictionWork,
    Predictor,
    RunLimits,
    RunReport,
    run_prediction,
)
from unet_volume.prediction.estimate import auto_block_shape, task_memory
from unet_volume.prediction.memory import check_worker_memory
from unet_volume.prediction.model_predictor import PRECISIONS, ModelPredictor
from unet_volume.prediction.options import DEFAULT_BLOCK, DEFAULT_OPTIONS, PredictOptions
from unet_volume.prediction.tasks import TaskPlan, auto_task_shape
from unet_volume.progress import ProgressSink
from unet_volume.tiling import (
    TileGeometry,
    check_block_shape,
)


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
    def precision(self) -> str:
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
    block = options.block_shape
    if block == "auto":
        block = _auto_block(info, volume, workers or {})
    shape, geometry = plan_geometry(info, volume, block, options.tile_shape)
    wanted_shard = options.shard_shape
    if wanted_shard is None and not options.overwrite:
        wanted_shard = recorded_shard_shape(absolute(output), shape)
    shard = plan_shards(volume.shape, shape, wanted_shard, ndim=info.config.ndim)
    layout = OutputLayout(volume.shape, shape, shard)
    task = plan_task_shape(
        volume, layout, geometry, options.task_shape, slots=task_slots(workers or {})
    )
    check_run_limits(options.max_failures, options.stall_after)
    output_url = absolute(output)  # workers may not share our working directory
    identity = run_identity(info, volume, shape, geometry, dtype, tta=options.tta)
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


def run_plan(
    plan: PredictionPlan,
    client: Client,
    *,
    progress: bool = False,
    predictor: Predictor | None = None,
    on_plan: Callable[[PredictionPlan, Client], None] | None = None,
    on_progress: ProgressSink | None = None,
) -> RunReport:
    """Fit ``plan`` to ``client``'s workers (:func:`fit_to_workers`), create (or resume) the
    output, run its missing blocks there, mark it complete: the one call under
    :func:`predict_volume`, ``unet-volume predict`` and the ``predict`` flow.

    ``on_plan`` hears of the fitted plan before anything is written; ``predictor`` replaces the
    plan's model (e.g. a probe in tests); ``on_progress`` hears of every finished task
    (:mod:`unet_volume.progress`). A run that stops early (failed blocks, a killed driver, a
    lost cluster) keeps every finished block; failed blocks are recorded, and running the same
    plan again redoes only what is not done.
    """
    if plan.existing is not None and plan.existing.complete:
        return complete_report(plan)
    plan = fit_to_workers(plan, client.scheduler_info(n_workers=-1)["workers"])
    if plan.existing is not None and plan.existing.complete:  # found by an automatic block
        return complete_report(plan)
    if on_plan is not None:
        on_plan(plan, client)
    check_block_memory(plan, client)
    if plan.existing is None:
        create_planned_output(plan)
    if predictor is None:
        predictor = ModelPredictor(plan.checkpoint, tta=plan.tta, precision=plan.precision)
    store = PredictionStore(plan.output_url, plan.output_dtype, plan.layout, plan.threshold)
    work = PredictionWork(plan.volume, plan.geometry, plan.tasks, store)
    limits = RunLimits(plan.options.max_failures, plan.options.stall_after)

    def run(done: Collection[Shape]) -> RunReport:
        report = run_prediction(
            client,
            work,
            predictor,
            skip=done,
            limits=limits,
            progress=progress,
            on_progress=on_progress,
        )
        start = time.perf_counter()
        publish_levels(client, plan.output_url, "probabilities", "mean")
        return replace(report, pyramid_seconds=time.perf_counter() - start)

    return run_recorded(
        plan.output_url, run, lambda r: {"report": r.to_dict()}, command="unet-volume predict"
    )


def complete_report(plan: PredictionPlan) -> RunReport:
    """The report of a run whose output was complete before it began."""
    total = plan.existing.total if plan.existing is not None else plan.num_blocks
    return RunReport(plan.output_url, 0, 0, 0.0, skipped=total, complete_before=True)


def check_block_memory(plan: PredictionPlan, client: Client) -> None:
    """Refuse a task whose estimated memory exceeds the workers' limit, before any writing."""
    check_worker_memory(
        client.scheduler_info(n_workers=-1)["workers"],
        task_memory(plan, on_gpu=gpu_resources(client) is not None),
        block="x".join(map(str, plan.shard_shape)),
        fix="pass a smaller --shard-shape, --task-shape, --block-shape or --tile-shape (the "
        "network's share grows with the tile), or give the workers more memory",
    )


def create_planned_output(plan: PredictionPlan) -> None:
    """Create the plan's empty output (arrays, run identity, done markers) as one step.

    Replaces an existing output only if the plan says ``overwrite``; a creation that fails
    removes what it made (see :func:`~unet_volume.output.lifecycle.create_output`).
    """
    create_output(plan.output_url, lambda: _create_prediction(plan), overwrite=plan.overwrite)


def _create_prediction(plan: PredictionPlan) -> None:
    create_prediction(
        plan.output_url,
        volume=plan.volume,
        num_classes=plan.info.config.num_classes,
        layout=plan.layout,
        output_dtype=plan.output_dtype,
        attrs=_run_attrs(plan),
        threshold=plan.threshold,
    )


ClientSource = Client | Callable[[], AbstractContextManager[Client]] | None
"""A Dask client, a function that opens one (called once the run is checked, so that bad input
starts no cluster), or None: a LocalCluster of one worker per core."""


def predict_volume(
    model: UNet | str | Path,
    image: str | Path,
    output: str | Path,
    options: PredictOptions = DEFAULT_OPTIONS,
    *,
    client: ClientSource = None,
    progress: bool = False,
    on_plan: Callable[[PredictionPlan, Client], None] | None = None,
    on_progress: ProgressSink | None = None,
    **changes: Any,
) -> RunReport:
    """Predict a whole volume with a U-Net into a Zarr group at ``output``: the one call that
    ``unet-volume predict`` and the ``predict`` flow wrap.

    Args:
        model: a :class:`UNet` or the path of a checkpoint.
        image: the volume to segment: a Zarr array (path or fsspec URL) or TIFF stack,
            ``(z, y, x)`` or ``(c, z, y, x)``.
        output: the output group (refused if it exists, unless ``overwrite``).
        options: how to predict; see :class:`PredictOptions` for each field and its default.
        client: where the blocks run (:data:`ClientSource`).
        progress: show a progress bar.
        on_plan: called with the plan for the client's workers, before anything is written.
        on_progress: hears of every finished task (:mod:`unet_volume.progress`).
        changes: fields of ``options`` to change, e.g. ``block_shape=(1, 512, 512)``,
            ``output_dtype="float64"`` (``uint8``, ``float16``, ``float32`` or ``float64``).

    Everything is validated before a cluster starts or anything is written
    (:func:`plan_prediction`); the plan is then made for the workers at hand
    (:func:`run_plan`). An incomplete output of the same run (model, geometry, dtype,
    input) is resumed: only its missing blocks are computed (:attr:`RunReport.skipped` counts
    the others); a complete one is left as it is (:attr:`RunReport.complete_before`).
    """
    options = replace(options, **changes)
    plan = plan_prediction(model, image, output, options)
    if plan.existing is not None and plan.existing.complete:
        return complete_report(plan)
    with _opened(client) as active:
        return run_plan(plan, active, progress=progress, on_plan=on_plan, on_progress=on_progress)


def _opened(client: ClientSource) -> AbstractContextManager[Client]:
    if isinstance(client, Client):
        return nullcontext(client)
    return client() if client is not None else open_client()


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
    if plan.options.block_shape == "auto":
        model, image = plan.checkpoint, plan.volume.url
        return plan_prediction(model, image, plan.output_url, plan.options, workers=workers)
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
            "shard_shape": list(plan.shard_shape),
            "tile_input_shape": list(geometry.input_shape),
            "tile_output_shape": list(geometry.output_shape),
            "halo": list(geometry.halo),
            "period": list(geometry.period),
            "border": "reflect (mirror, edge voxel not repeated)",
            "test_time_augmentation": "mean of 8 flips/turns in (y, x)" if plan.tta else None,
            "label_offset": list(plan.volume.offset) if any(plan.volume.offset) else None,
            "precision": plan.precision,
            "segmentation": segmentation_name(plan.threshold),
        },
        "input": volume_attrs(plan.volume),
        "identity": plan.identity,
    }
