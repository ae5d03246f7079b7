"""The ``ingest`` flow: find new volumes in a landing location and predict each one once."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import NonNegativeFloat

from unet_volume.io.locations import absolute
from unet_volume.models.checkpoint import read_checkpoint
from unet_volume.prediction.landing import Arrival, due, find_volumes, settled_volumes
from unet_volume.prediction.options import PredictOptions
from unet_volume_flows.common import (
    CLUSTER_HELP,
    STORAGE_RETRIES,
    Instances,
    check_locations,
    described,
    scheduler_address,
)
from unet_volume_flows.predict import predict_flow


@task(**STORAGE_RETRIES, timeout_seconds=300, cache_policy=NO_CACHE)
def scan(
    landing: str,
    outputs: str,
    model: str,
    reprocess: bool,
    settle_seconds: float,
    labels: str | None = None,
) -> list[Arrival]:
    """The volumes in ``landing`` with no complete prediction (and ``labels``) in ``outputs``.

    With ``reprocess``, also those whose prediction another model made. Volumes still being
    copied (or truncated) are logged and left for the next scan.
    """
    ready, waiting = settled_volumes(find_volumes(landing), settle_seconds=settle_seconds)
    for source, why in waiting:
        get_run_logger().info("%s left for the next scan: %s", source, why)
    sha256 = read_checkpoint(model).sha256
    return due(ready, outputs, sha256, reprocess=reprocess, labels=labels)


@flow(name="ingest")
@described(
    PredictOptions,
    landing="the folder or fsspec URL where new volumes (Zarr arrays, TIFF stacks) arrive",
    outputs="the folder or fsspec URL where each volume's prediction goes (<volume>.zarr)",
    model="the checkpoint (.pt) to predict with, or a shipped model's name",
    reprocess="redo volumes whose prediction another model made (default: leave them be)",
    instances="label each prediction's objects into its OME-Zarr labels (OUT/labels/METHOD) "
    "with their table: connected components of the foreground (default), the seeded "
    "watershed, or none",
    settle_seconds="a volume changed more recently than this (still being copied) is left "
    "for the next scan",
    **CLUSTER_HELP,
)
def ingest_flow(
    landing: str,
    outputs: str,
    model: str,
    *,
    reprocess: bool = False,
    instances: Instances = "components",
    tta: bool = False,
    scheduler: str | None = None,
    cluster: str | None = None,
    settle_seconds: NonNegativeFloat = 60.0,
) -> list[dict[str, Any]]:
    """Predict each volume of ``landing`` (folder or URL) that has no prediction in ``outputs``
    yet, and label its objects (``instances``): the whole chain, pyramid and table included.

    Idempotent: what is done is read from the outputs, so a second run finds nothing to do.
    A new ``model`` leaves finished predictions alone unless ``reprocess``. A volume still being
    copied (changed within ``settle_seconds``, empty or truncated) waits for the next scan. One
    failing volume does not stop the others; the flow fails at the end, naming it.
    """
    check_locations(landing=landing, outputs=outputs, model=model)
    log = get_run_logger()
    labels = None if instances == "none" else instances
    arrivals = scan(landing, outputs, model, reprocess, settle_seconds, labels)
    log.info("%d volume(s) due in %s", len(arrivals), landing)
    done, failed = [], []
    if arrivals:
        with scheduler_address(scheduler, cluster) as address:  # one cluster for all volumes
            for arrival in arrivals:
                try:
                    report = predict_flow(
                        arrival.source,
                        model,
                        arrival.output,
                        # incomplete: resumed; predicted with another model: replaced
                        PredictOptions(tta=tta, overwrite=arrival.reason == "model changed"),
                        instances=instances,
                        scheduler=address,
                    )
                    done.append(
                        {
                            "source": arrival.source,
                            "output": arrival.output,
                            "reason": arrival.reason,
                            "seconds": round(report["seconds"], 1),
                        }
                    )
                except Exception as error:  # reported below, after the other volumes had their turn
                    log.error("%s failed: %s", arrival.source, error)
                    failed.append(arrival.source)
    if done or failed:  # a scan that found nothing new adds no artifact version to page through
        rows = done + [{"source": source, "reason": "failed"} for source in failed]
        create_table_artifact(
            rows, key="ingest-run", description=f"Volumes predicted from {absolute(landing)}"
        )
    if failed:
        raise RuntimeError(
            f"{len(failed)} of {len(arrivals)} volume(s) failed: {', '.join(failed)}"
        )
    return done
