"""The ``predict`` flow: one volume planned, predicted on a Dask cluster, recorded, published."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from unet_volume.cluster.client import describe
from unet_volume.instances.labelling import label_instances
from unet_volume.instances.watershed import WatershedConfig
from unet_volume.io.locations import absolute
from unet_volume.models.shipped import model_file
from unet_volume.prediction.engine import RunReport
from unet_volume.prediction.options import DEFAULT_OPTIONS, PredictOptions
from unet_volume.prediction.plan import PredictionPlan, plan_prediction
from unet_volume.prediction.run import run_plan
from unet_volume.progress import duration
from unet_volume_flows.artifacts import default_preview, log_plan, publish, publish_objects, record
from unet_volume_flows.common import (
    CLUSTER_HELP,
    STORAGE_RETRIES,
    Instances,
    check_locations,
    described,
    flow_client,
    reported,
)


@task(**STORAGE_RETRIES, timeout_seconds=600, cache_policy=NO_CACHE)
def plan(image: str, model: str, out: str, options: PredictOptions) -> PredictionPlan:
    """Validate input, model and output; nothing is written, no cluster started yet."""
    return plan_prediction(model, image, out, options)


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
    get_run_logger().info(
        "segmented %s (%s): %s objects in %s",
        out,
        method,
        f"{report.objects:,}",
        duration(report.seconds),
    )
    publish_objects(report.output_url, report.objects, method)
    return {"objects": report.objects, "output_url": report.output_url}


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
    instances: Instances = "none",
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
