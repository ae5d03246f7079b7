"""The end-to-end demo on embedded defaults: ISBI 2012 -> Zarr -> ``train`` -> ``predict`` flow.

Prefect runs on its local ephemeral API, Dask on a LocalCluster, data in local Zarr; nothing
needs the network. Run it with ``bash scripts/demo.sh`` (which sets Prefect up offline).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from prefect import flow

from unet_volume.prediction_store import open_prediction
from unet_volume.storage import convert_to_zarr
from unet_volume.train import TrainConfig
from unet_volume_flows.common import HiddenNone
from unet_volume_flows.predict import predict_flow
from unet_volume_flows.train import train_flow

TRAIN, VALIDATION = (0, 20), (20, 25)  # the ISBI README's split: 20-24 are never trained on
MINUTES = TrainConfig().minutes  # the library's training budget, written once there


@flow(name="demo")
def demo_flow(data: str, out: str, minutes: float | HiddenNone = MINUTES) -> dict[str, object]:
    """Convert the ISBI stack, train for ``minutes`` on slices 0-19, score 20-24, predict all 25."""
    root = Path(out)
    image, labels = str(root / "isbi-volume.zarr"), str(root / "isbi-labels.zarr")
    for tiff, zarr_url in (
        (f"{data}/train-volume.tif", image),
        (f"{data}/train-labels.tif", labels),
    ):
        convert_to_zarr(tiff, zarr_url, voxel_size=(50, 4, 4), units="nm", overwrite=True)
    figures = train_flow(
        image,
        labels,
        str(root / "model.pt"),
        minutes=minutes,
        z_range=TRAIN,
        validation_z_range=VALIDATION,
    )
    report = predict_flow(
        image,
        str(root / "model.pt"),
        str(root / "prediction.zarr"),
        overwrite=True,
        preview=str(root / "prediction.preview.png"),
    )
    return {"train": figures, "predict": report}


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
    train, predict = result["train"], result["predict"]
    assert isinstance(train, dict) and isinstance(predict, dict)
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
