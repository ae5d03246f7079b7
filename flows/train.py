"""The ``train`` flow: weight maps (Dask) -> training -> evaluation -> the checkpoint registered.

The checkpoint is registered with its metrics, learning curve and preview as Prefect artifacts.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from unet_volume.cluster.client import describe
from unet_volume.evaluation.scores import EvaluationReport, evaluate
from unet_volume.io.locations import absolute
from unet_volume.prediction.options import PredictOptions
from unet_volume.prediction.plan import PredictionPlan
from unet_volume.prediction.run import predict_volume
from unet_volume.progress import duration
from unet_volume.training.config import TrainConfig
from unet_volume.training.loop import TrainReport, check_training, train
from unet_volume.training.weight_map import WeightMapConfig
from unet_volume.training.weight_volume import compute_weight_volume
from unet_volume_flows.artifacts import register
from unet_volume_flows.common import (
    CLUSTER_HELP,
    STORAGE_RETRIES,
    check_locations,
    described,
    flow_client,
    reported,
)

DEFAULTS = TrainConfig()


@task(**STORAGE_RETRIES, cache_policy=NO_CACHE)
def check(image: str, labels: str, config: TrainConfig, init: str | None) -> None:
    """Every check training makes, before the flow writes anything (the weight map first)."""
    check_training(image, labels, config, init=init)


@task(**STORAGE_RETRIES, cache_policy=NO_CACHE)
def weigh(
    labels: str,
    out: str,
    z_range: tuple[int, int] | None,
    scheduler: str | None,
    cluster: str | None,
) -> str:
    """The paper's weight map (borders between touching cells weigh more), one Dask task per chunk;
    class frequencies from the training slices ``z_range`` only."""
    with flow_client(scheduler, cluster) as client:
        get_run_logger().info("weight map of %s into %s on %s", labels, out, describe(client))
        with reported("weights-progress", f"Blocks of the weight map {out} done") as progress:
            return compute_weight_volume(
                labels,
                out,
                WeightMapConfig(),
                client=client,
                overwrite=True,
                balance_z_range=z_range,
                on_progress=progress,
            ).output_url


@task(cache_policy=NO_CACHE)
def fit(
    image: str,
    labels: str,
    model: str,
    config: TrainConfig,
    weights: str | None,
    init: str | None = None,
) -> TrainReport:
    """Train on this machine (all its cores, or its GPU); checkpoint and curve beside ``model``.
    Logs the steps, their pace and the running loss every ~30 s and every tenth of the way."""
    with reported("training-progress", f"Training of {absolute(model)}") as progress:
        report = train(
            image, labels, model, config, weights=weights, init=init, on_progress=progress
        )
    get_run_logger().info(
        "trained %s: %d steps in %s, final loss %.4f",
        absolute(model),
        report.steps,
        duration(report.seconds),
        report.final_loss,
    )
    return report


@task(**STORAGE_RETRIES, cache_policy=NO_CACHE)
def assess(
    image: str,
    labels: str,
    model: str,
    z_range: tuple[int, int],
    scheduler: str | None,
    cluster: str | None,
) -> EvaluationReport:
    """Predict the image with the new model; score the held-out slices (pixel, Rand, VOI, IoU)."""
    out = f"{model}.evaluation.zarr"

    def on_plan(_: PredictionPlan, client: Any) -> None:
        get_run_logger().info("held-out prediction into %s on %s", out, describe(client))

    options = PredictOptions(overwrite=True)
    client = lambda: flow_client(scheduler, cluster)  # noqa: E731 (opened once checked)
    predict_volume(model, image, out, options, client=client, on_plan=on_plan)
    return evaluate(out, labels, z_range=z_range)


@flow(name="train")
@described(
    image="the training image: a Zarr array or TIFF stack, (z, y, x) or (c, z, y, x)",
    labels="the annotations, the image's shape: 0 background/membrane, 1 foreground/interior "
    "(or instance ids, which the weight map separates)",
    model="where to write the checkpoint (.pt); its learning curve and preview go beside it",
    config="how to train: the network, tiles, steps or minutes, training and held-out slices, "
    "augmentation, the weight map, label offset, optimizer and seed",
    init="start from this model's network and weights (fine-tuning on new data; "
    "the network given in config is then the model's)",
    **CLUSTER_HELP,
)
def train_flow(
    image: str,
    labels: str,
    model: str,
    config: TrainConfig = DEFAULTS,
    *,
    init: str | None = None,
    scheduler: str | None = None,
    cluster: str | None = None,
) -> dict[str, Any]:
    """Train a U-Net on ``image`` against ``labels`` and save it to ``model``.

    ``config`` is a :class:`~unet_volume.training.config.TrainConfig`, each field with its
    default and help (the run form shows them). With its ``validation_z_range`` the model is
    scored on those held-out slices; with ``weight_map`` the loss is weighted by the paper's
    weight map (computed on Dask first), else class-balanced. With ``init`` training starts
    from that model's network and weights (fine-tuning). Returns the figures.
    """
    check_locations(image=image, labels=labels, model=model, init=init)
    check(image, labels, config, init)
    weights = (
        weigh(labels, f"{model}.weights.zarr", config.z_range, scheduler, cluster)
        if config.weight_map
        else None
    )
    report = fit(image, labels, model, config, weights, init)
    scores = (
        assess(image, labels, model, config.validation_z_range, scheduler, cluster)
        if config.validation_z_range
        else None
    )
    return register(report, scores, image)
