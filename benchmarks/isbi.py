"""The ISBI 2012 stack as the quality benchmarks use it: paths, the split, and the scoring.

Slices 0-19 train, 20-24 are held out (the ISBI README's split). Scores are the whole-range
pixel error and adapted Rand error of the thresholded foreground probability, as
``unet_volume.evaluation.scores.evaluate`` defines them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from distributed import Client

from unet_volume.evaluation.scores import evaluate
from unet_volume.instances.labelling import label_instances
from unet_volume.instances.watershed import WatershedConfig
from unet_volume.output.prediction import open_prediction
from unet_volume.prediction.run import predict_volume

DATA = Path(__file__).parents[1] / "data" / "isbi2012"
IMAGE, LABELS = str(DATA / "train-volume.tif"), str(DATA / "train-labels.tif")
TRAIN, VALIDATION = (0, 20), (20, 25)


def scores(
    interior: np.ndarray, z_range: tuple[int, int], threshold: float = 0.5
) -> dict[str, float]:
    """Whole-range pixel and Rand error of ``interior > threshold`` against the labels, and the
    ISBI challenge's pixel error at this threshold (1 - F-score of the interior pixels)."""
    report = evaluate((interior > threshold).astype(np.uint8), LABELS, z_range=z_range)
    volume = report.volume
    return {
        "pixel_error": volume.pixel_error,
        "rand_error": volume.rand_error,
        "challenge_pixel_error": 1.0 - volume.dice,
    }


def interior_probability(
    model: str | Path, image: str, out: Path, client: Client, *, tta: bool = False
) -> np.ndarray:
    """The foreground (cell interior) probability of the whole stack, predicted by the engine."""
    predict_volume(
        model, image, out, output_dtype="float32", overwrite=True, tta=tta, client=client
    )
    return open_prediction(str(out)).probabilities[1].values


def watershed_labels(
    prediction: Path, seed_threshold: float, client: Client, *, cover: bool = False
) -> str:
    """The seeded watershed of a prediction (per slice), as ``unet-volume segment`` makes it;
    ``cover``: every voxel gets an object (``segment --watershed --cover``)."""
    out = f"{prediction}.watershed-{seed_threshold:g}{'-cover' if cover else ''}.zarr"
    config = WatershedConfig(seed_threshold=seed_threshold, cover=cover)
    label_instances(str(prediction), out, client=client, watershed=config, overwrite=True)
    return out


def instance_scores(labels: str, z_range: tuple[int, int]) -> dict[str, float]:
    """Whole-range pixel and Rand error of instance labels (scored as their objects)."""
    report = evaluate(labels, LABELS, z_range=z_range)
    return {"pixel_error": report.volume.pixel_error, "rand_error": report.volume.rand_error}
