"""bfloat16 / float16 autocast against float32 on real data: ISBI 2012 slices 20-24.

Trains the default model (base 16, depth 4) on slices 0-19 for --minutes (or takes --model),
then predicts slices 20-24 with the engine at float32 and under autocast at each lower
precision the device runs (bfloat16 on a CPU; bfloat16 and float16 on CUDA), and prints the
segmentation agreement (target: at least 99.9%) and the largest probability difference.

    .venv/bin/python benchmarks/precision_agreement.py [--minutes 3] [--model M] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from unet_volume.cluster.client import open_client
from unet_volume.io.volumes import convert_to_zarr
from unet_volume.output.prediction import open_prediction
from unet_volume.prediction.run import predict_volume
from unet_volume.training.loop import TrainConfig, train

ISBI = Path(__file__).resolve().parents[1] / "data" / "isbi2012"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=3.0, help="training budget")
    parser.add_argument("--model", type=Path, help="a trained checkpoint (skips training)")
    parser.add_argument("--workdir", type=Path, help="where outputs go (default: tmp)")
    args = parser.parse_args()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="precision-"))
    image = convert_to_zarr(ISBI / "train-volume.tif", root / "isbi.zarr", overwrite=True).url
    model = args.model
    if model is None:
        model = root / "model.pt"
        config = TrainConfig(minutes=args.minutes, z_range=(0, 20))
        report = train(image, ISBI / "train-labels.tif", model, config)
        print(f"trained {report.steps} steps in {args.minutes:g} min on slices 0-19")
    cuda = torch.cuda.is_available()
    lower = ["bfloat16", "float16"] if cuda else ["bfloat16"]
    with open_client(n_workers=1, dashboard=False) as client:
        runs = {}
        for precision in ["float32", *lower]:
            output = root / f"{precision}.zarr"
            predict_volume(model, image, output, client=client, precision=precision, overwrite=True)
            runs[precision] = open_prediction(str(output)).isel(z=slice(20, 25))
    reference = runs["float32"]
    device = torch.cuda.get_device_name() if cuda else "CPU"
    for precision in lower:
        run = runs[precision]
        agree = float((run.segmentation == reference.segmentation).mean())
        difference = np.abs(
            run.probabilities.values.astype(np.int16) - reference.probabilities.values
        ).max()
        print(
            f"{device}, {precision} vs float32 on ISBI slices 20-24: segmentation agreement "
            f"{100 * agree:.3f}% (target >= 99.9%), largest probability difference "
            f"{difference / 255:.4f} (uint8 output: steps of 1/255)"
        )


if __name__ == "__main__":
    main()
