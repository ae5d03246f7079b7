"""The ``predict`` flow: one volume planned, predicted on a Dask cluster, recorded, published."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from prefect import flow, get_run_logger, runtime, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from unet_volume.cluster.client import describe
from unet_volume.instances.labelling import label_instances
from unet_volume.instances.objects import read_objects, table_url
from unet_volume.instances.watershed import WatershedConfig
from unet_volume.io.locations import absolute
from unet_volume.models.shipped import model_file
from unet_volume.output.prediction import environment, record_provenance
from unet_volume.output.preview import write_preview
from unet_volume.prediction.engine import RunReport
from unet_volume.prediction.options import DEFAULT_OPTIONS, PredictOptions
from unet_volume.prediction.plan import PredictionPlan, plan_prediction
from unet_volume.prediction.run import run_plan
from unet_volume.progress import duration
from unet_volume_flows.artifacts import embedded_image, metric_rows
from unet_volume_flows.common import (
    CLUSTER_HELP,
    STORAGE_RETRIES,
    check_locations,
    described,
    flow_client,
    reported,
)


@task(**STORAGE_RETRIES, timeout_seconds=600, cache_policy=NO_CACHE)
def plan(image: str, model: str, out: str, options: PredictOptions) -> PredictionPlan:
    """Validate input, model and output; nothing is written, no cluster started yet."""
    return plan_prediction(model, image, out, options)


def log_plan(planned: PredictionPlan, model: str) -> None:
    """The plan for the workers at hand, in one line of the run's log."""
    layout, volume = planned.layout, planned.volume
    get_run_logger().info(
        "input %s %s %s -> output %s; model %s (sha256 %s); blocks %s: %d in %d shard(s), "
        "%d task(s)%s",
        volume.url,
        "x".join(map(str, volume.shape)),
        volume.dtype_name,
        planned.output_url,
        model,
        planned.info.sha256[:12],
        "x".join(map(str, planned.block_shape)),
        layout.num_blocks,
        layout.num_shards,
        planned.tasks.num_tasks,
        f", {planned.existing.done} done before (resumed)" if planned.existing else "",
    )


@task(cache_policy=NO_CACHE)  # no timeout: a 10^12-voxel volume takes as long as it takes
def predict(
    prediction: PredictionPlan, model: str, scheduler: str | None, cluster: str | None
) -> RunReport:
    """Every block not yet done on the Dask cluster, planned for its workers; failed blocks are
    recorded, finished ones kept. Logs how far it is every ~30 s and every tenth of the way."""
    log = get_run_logger()
    with flow_client(scheduler, cluster) as client:
        log.info("blocks run on %s", describe(client))
        description = f"Blocks of {prediction.output_url} done"
        with reported("prediction-progress", description) as progress:
            report = run_plan(
                prediction,
                client,
                on_plan=lambda fitted, _: log_plan(fitted, model),
                on_progress=progress,
            )
    log.info(
        "predicted %s: %d block(s)%s, %s voxels in %s (%.1f Mvoxel/s)",
        report.output_url,
        report.blocks,
        f" (and {report.skipped} done before)" if report.skipped else "",
        f"{report.voxels:,}",
        duration(report.seconds),
        report.voxels_per_second / 1e6,
    )
    return report


@task(**STORAGE_RETRIES, cache_policy=NO_CACHE)
def record(report: RunReport, parameters: dict[str, Any]) -> None:
    """Write who made the output and how next to the data."""
    run = {
        "flow_run": str(runtime.flow_run.id),
        "flow_run_name": runtime.flow_run.name,
        "deployment": runtime.deployment.name,
    }
    record_provenance(
        report.output_url, {**run, "parameters": parameters, "environment": environment()}
    )


@task(**STORAGE_RETRIES, cache_policy=NO_CACHE)
def publish(report: RunReport, image: str, preview: str) -> str:
    """The run's figures as a table, and a preview of a few slices shown inline, as artifacts."""
    png = write_preview(image, report.output_url, preview)
    figures = {
        "input": absolute(image),
        "output": report.output_url,
        "blocks": report.blocks,
        "blocks resumed": report.skipped,
        "voxels": report.voxels,
        "seconds": round(report.seconds, 2),
        "Mvoxel/s": round(report.voxels_per_second / 1e6, 3),
    }
    create_table_artifact(
        metric_rows(figures),
        key="prediction-run",
        description=f"Prediction of {absolute(image)}: what ran, how long",
    )
    create_markdown_artifact(
        f"# Prediction of `{absolute(image)}`\n\nOutput: `{report.output_url}`\n\n"
        "Input with the segmentation overlaid (left), foreground probability (right):\n\n"
        f"{embedded_image(png, 'preview of the prediction')}\n",
        key="prediction-preview",
        description=f"Preview of {report.output_url}",
    )
    return str(png)


@task(cache_policy=NO_CACHE)
def segment(
    prediction: str, method: str, scheduler: str | None, cluster: str | None
) -> dict[str, Any]:
    """The prediction's objects (connected components or the seeded watershed) in its OME-Zarr
    labels (``OUT/labels/METHOD``, with their pyramid), on the Dask cluster; the object
    table's summary and largest objects as an artifact."""
    out = f"{prediction.rstrip('/')}/labels/{method}"
    watershed = WatershedConfig() if method == "watershed" else None
    with flow_client(scheduler, cluster) as client:
        # a complete labelling is left be, a stopped one resumed; a new prediction (overwrite)
        # has removed its labels with it
        report = label_instances(prediction, out, client=client, watershed=watershed)
    table = read_objects(report.output_url)
    get_run_logger().info(
        "segmented %s (%s): %s objects in %s",
        out,
        method,
        f"{report.objects:,}",
        duration(report.seconds),
    )
    largest = table.nlargest(20, "voxels").round(3)
    create_table_artifact(
        json.loads(largest.to_json(orient="records")),  # plain JSON types, not numpy's
        key="objects",
        description=f"The 20 largest of {report.objects:,} objects in {report.output_url} "
        f"({method}); the whole table: {table_url(report.output_url)}",
    )
    return {"objects": report.objects, "output_url": report.output_url}


def default_preview(out: str) -> str:
    """Beside a local output (``out.zarr`` -> ``out.preview.png``); for a URL, in the working
    folder."""
    name = f"{PurePosixPath(out.rstrip('/')).stem}.preview.png"
    return name if "://" in out else str(Path(out.rstrip("/")).with_name(name))


@flow(name="predict")
@described(
    image="the volume to segment: a Zarr array or TIFF stack, a path or an fsspec URL "
    "(s3://...), (z, y, x) or (c, z, y, x)",
    model="the checkpoint (.pt) to predict with, or a shipped model's name (isbi2012-membranes)",
    out="the output Zarr group to write (or to resume, if a run of the same model, geometry "
    "and input stopped early)",
    preview="where to write the preview PNG (default: beside a local output, out.preview.png)",
    options="how to predict: block, shard and task shapes, precision, stored dtype, "
    "test-time augmentation, threshold, voxel size, resume or overwrite, failure limits",
    instances="then label the objects into the output's OME-Zarr labels (OUT/labels/METHOD, "
    "its Parquet object table beside OUT): connected components of the foreground, or a "
    "seeded watershed that keeps touching cells apart; none by default",
    **CLUSTER_HELP,
)
def predict_flow(
    image: str,
    model: str,
    out: str,
    options: PredictOptions = DEFAULT_OPTIONS,
    *,
    scheduler: str | None = None,
    cluster: str | None = None,
    preview: str | None = None,
    instances: Literal["none", "components", "watershed"] = "none",
) -> dict[str, Any]:
    """Predict ``image`` (Zarr array or TIFF stack) with the checkpoint ``model`` into ``out``.

    ``out`` is a Zarr group; ``options`` are :class:`~unet_volume.prediction.options.
    PredictOptions`, each field with its default and help (the run form shows them). Blocks
    run on the Dask scheduler at ``scheduler``, on a cluster started from the spec named
    ``cluster`` (``deploy/clusters``), or on a LocalCluster, planned for its workers.
    ``preview`` is the PNG to write (default: beside the output). Returns the run report as a
    dict.

    An incomplete output of the same run is resumed; failed blocks are recorded in it and the
    flow fails naming them (see ``unet-volume status OUT``).
    """
    check_locations(image=image, model=model, out=out, preview=preview)
    planned = plan(image, model, out, options)
    model_path = str(absolute(model_file(model)))
    report = predict(planned, model_path, scheduler, cluster)
    record(report, {"image": image, "model": model_path, "out": out, "options": asdict(options)})
    png = publish(report, image, preview or default_preview(out))
    objects = (
        segment(report.output_url, instances, scheduler, cluster) if instances != "none" else None
    )
    return {**report.to_dict(), "preview": png, "instances": objects}
