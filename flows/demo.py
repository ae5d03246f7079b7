"""The end-to-end demo on embedded defaults: ISBI 2012 -> Zarr -> ``predict`` with the shipped
model -> ``train`` -> ``predict`` flow.

A newcomer first sees a good segmentation from the shipped model within a minute, with its
figures on slices 20-24; then a short training of their own, as they would on new data.

Prefect runs on its local ephemeral API, Dask on a LocalCluster, data in local Zarr; nothing
needs the network. Run it with ``bash scripts/demo.sh`` (which sets Prefect up offline).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefect import flow

from unet_volume.cluster.client import open_client
from unet_volume.evaluation.scores import evaluate
from unet_volume.instances.labelling import label_instances
from unet_volume.io.volumes import convert_to_zarr
from unet_volume.models.shipped import shipped_models
from unet_volume.output.prediction import open_prediction
from unet_volume.prediction.options import PredictOptions
from unet_volume.training.config import DEFAULT_MINUTES, TrainConfig
from unet_volume_flows.common import HiddenNone
from unet_volume_flows.predict import predict_flow
from unet_volume_flows.train import train_flow

TRAIN, VALIDATION = (0, 20), (20, 25)  # the ISBI README's split: 20-24 are never trained on
MINUTES = DEFAULT_MINUTES  # the library's training budget, written once there
SHIPPED = "isbi2012-membranes"


@flow(name="demo")
def demo_flow(data: str, out: str, minutes: float | HiddenNone = MINUTES) -> dict[str, object]:
    """Convert the ISBI stack; predict it with the shipped model, segment its objects (the
    watershed) and score slices 20-24; then train for ``minutes`` on slices 0-19, score
    20-24 and predict all 25 with the new model."""
    root = Path(out)
    image, labels = str(root / "isbi-volume.zarr"), str(root / "isbi-labels.zarr")
    for tiff, zarr_url in (
        (f"{data}/train-volume.tif", image),
        (f"{data}/train-labels.tif", labels),
    ):
        convert_to_zarr(tiff, zarr_url, voxel_size=(50, 4, 4), units="nm", overwrite=True)
    shipped = predict_flow(
        image,
        SHIPPED,
        str(root / "shipped.zarr"),
        PredictOptions(overwrite=True, **shipped_models()[SHIPPED].predict_options),
        preview=str(root / "shipped.preview.png"),
    )
    shipped["scores"] = evaluate(shipped["output_url"], labels, z_range=VALIDATION).to_dict()
    shipped |= segmented(
        shipped["output_url"], str(root / "shipped.zarr" / "labels" / "cells"), labels
    )
    figures = train_flow(
        image,
        labels,
        str(root / "model.pt"),
        TrainConfig(minutes=minutes, z_range=TRAIN, validation_z_range=VALIDATION),
    )
    report = predict_flow(
        image,
        str(root / "model.pt"),
        str(root / "prediction.zarr"),
        PredictOptions(overwrite=True),
        preview=str(root / "prediction.preview.png"),
    )
    return {"shipped": shipped, "train": figures, "predict": report}


def segmented(prediction: str, out: str, labels: str) -> dict[str, Any]:
    """The prediction's objects by the shipped model's watershed, and their scores on 20-24."""
    watershed = shipped_models()[SHIPPED].watershed
    with open_client(dashboard=False, quiet=True) as client:
        report = label_instances(
            prediction, out, client=client, watershed=watershed, overwrite=True
        )
    scores = evaluate(report.output_url, labels, z_range=VALIDATION).to_dict()
    return {"objects": report.objects, "objects_url": report.output_url, "watershed": scores}


def print_shipped(shipped: dict[str, Any]) -> None:
    """The shipped model's prediction and figures, beside the ones its record states."""
    record = shipped_models()[SHIPPED]
    figures, held_out = shipped["scores"]["volume"], record.figures("held_out")
    print(
        f"\nshipped model {SHIPPED}: {shipped['output_url']} ({shipped['blocks']} blocks, "
        f"{shipped['seconds']:.1f} s); preview {shipped['preview']}"
    )
    objects = shipped["watershed"]["volume"]
    print(
        f"slices {VALIDATION[0]}-{VALIDATION[1] - 1}: pixel error {figures['pixel_error']:.4f} "
        f"(its segmentation), Rand error {objects['rand_error']:.4f} (its {shipped['objects']:,} "
        f"objects, {shipped['objects_url']}). It trained on all 25 slices; the same recipe "
        f"trained on 0-19 scored {held_out['pixel_error']:.4f} / {held_out['rand_error']:.4f} "
        "on 20-24, never seen"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m unet_volume_flows.demo", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--data", default="data/isbi2012", help="folder with train-volume.tif, train-labels.tif"
    )
    parser.add_argument(
        "--out", default="runs/demo", help="where everything is written (default runs/demo)"
    )
    parser.add_argument(
        "--minutes", type=float, default=MINUTES, help=f"training budget (default {MINUTES:g})"
    )
    args = parser.parse_args(argv)
    result = demo_flow(args.data, args.out, args.minutes)
    shipped, train, predict = result["shipped"], result["train"], result["predict"]
    assert isinstance(shipped, dict) and isinstance(train, dict) and isinstance(predict, dict)
    print_shipped(shipped)
    print(
        f"\nprediction: {predict['output_url']} "
        f"({predict['blocks']} blocks, {predict['seconds']:.1f} s)"
    )
    print(open_prediction(predict["output_url"]))
    scores = {
        k.removeprefix("validation_"): v for k, v in train.items() if k.startswith("validation_")
    }
    print(f"\nvalidation metrics, slices {VALIDATION[0]}-{VALIDATION[1] - 1} (never trained on):")
    print(json.dumps(scores, indent=2))
    print(
        f"\npreview PNGs: {predict['preview']}  "
        f"{train['checkpoint']}.preview.png  {train['checkpoint']}.curve.png"
    )


if __name__ == "__main__":
    main()
