"""A prediction run into an output: run on the engine, resumed, recorded.

A run is planned first (:mod:`unet_volume.prediction.plan`: every check, nothing written).
:func:`run_plan` creates or resumes the output and runs its missing blocks on the engine
(:mod:`unet_volume.prediction.engine`); failed blocks are recorded and finished ones kept.
:func:`predict_volume` does both with a U-Net, wrapped in a :class:`ModelPredictor` that
builds the network once per worker process and keeps it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

from distributed import Client

from unet_volume import __version__
from unet_volume.cluster.client import gpu_resources, open_client
from unet_volume.geometry import Shape
from unet_volume.models.unet import UNet
from unet_volume.output.lifecycle import (
    create_output,
    run_recorded,
)
from unet_volume.output.ome import publish_levels
from unet_volume.output.prediction import (
    PredictionStore,
    create_prediction,
    segmentation_name,
    volume_attrs,
)
from unet_volume.prediction.engine import (
    PredictionWork,
    RunLimits,
    RunReport,
    run_prediction,
)
from unet_volume.prediction.estimate import task_memory
from unet_volume.prediction.memory import check_worker_memory
from unet_volume.prediction.model_predictor import ModelPredictor
from unet_volume.prediction.options import DEFAULT_OPTIONS, PredictOptions
from unet_volume.prediction.plan import PredictionPlan, fit_to_workers, plan_prediction
from unet_volume.prediction.worker import Predictor
from unet_volume.progress import ProgressSink


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
