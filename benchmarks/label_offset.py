"""Where the ISBI 2012 labels sit against the image: a sub-pixel offset, measured two ways.

1. Without a model: the mean image intensity on the labelled membrane pixels, with the image
   shifted by whole pixels. Membranes are dark, so the shift at the minimum (a parabola through
   its neighbours gives the fraction) is where the image's membranes sit against the labels'.
2. With a model: a prediction's foreground probability shifted by sub-pixel steps (linear
   interpolation), thresholded, and scored against the labels. The shift and the threshold are
   chosen on the training slices 0-19 and scored on 20-24, as ``isbi_quality.py`` chooses its
   thresholds; the best shift of each slice shows whether the offset is the stack's or noise.

A net trained with flips and turns (``--augment paper`` or ``plain``) sees every orientation
of every label, so it cannot learn an offset that is bound to the image's orientation: its best
shift is the offset. A net trained ``--augment upright`` learns it (best shift 0) and loses the
flips; one trained ``--label-offset Y,X`` (:mod:`unet_volume.label_offset`) keeps the flips and
predicts on the image moved by the offset: its best shift is 0 as well.

    .venv/bin/python benchmarks/label_offset.py --prediction runs/held-out/prediction_tta.zarr
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np
import tifffile
from isbi import IMAGE, LABELS, TRAIN, VALIDATION
from scipy import ndimage

from unet_volume.output.prediction import open_prediction

STEPS = (-1.0, -0.75, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0)
THRESHOLDS = tuple(round(t, 2) for t in np.arange(0.05, 0.95, 0.05))
INNER = (slice(None), slice(2, -2), slice(2, -2))  # no wrapped or clamped edge pixels


def image_offset(image: np.ndarray, membrane: np.ndarray) -> tuple[float, float]:
    """The (y, x) shift of the image that puts its darkest pixels on the labelled membrane."""
    offset = []
    for axis in (1, 2):
        means = [
            float(np.roll(image, -shift, axis=axis)[INNER][membrane[INNER]].mean())
            for shift in (-1, 0, 1)
        ]
        curvature = means[0] - 2 * means[1] + means[2]
        offset.append(0.5 * (means[0] - means[2]) / curvature if curvature > 0 else 0.0)
    return offset[0], offset[1]


def error(interior: np.ndarray, interior_labels: np.ndarray, threshold: float) -> float:
    """1 - accuracy of ``interior > threshold`` (the project's pixel error), inner pixels."""
    return float(((interior > threshold)[INNER] != interior_labels[INNER]).mean())


def best_shift(
    interior: np.ndarray, interior_labels: np.ndarray
) -> tuple[tuple[float, float], float, float]:
    """The (y, x) shift and threshold with the least pixel error, and that error."""
    best = ((0.0, 0.0), 0.5, 1.0)
    for shift in itertools.product(STEPS, STEPS):
        moved = ndimage.shift(interior, (0, *shift), order=1, mode="nearest")
        for threshold in THRESHOLDS:
            if (e := error(moved, interior_labels, threshold)) < best[2]:
                best = (shift, threshold, e)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prediction", type=Path, help="a prediction Zarr of the whole stack")
    args = parser.parse_args()
    image = tifffile.imread(IMAGE).astype(np.float32)
    interior_labels = tifffile.imread(LABELS) > 0
    dy, dx = image_offset(image, ~interior_labels)
    print(f"image: its membranes sit ({dy:+.2f}, {dx:+.2f}) px (y, x) from the labels' membranes")
    if args.prediction is None:
        return
    interior = open_prediction(str(args.prediction)).probabilities[1].values
    train, held_out = slice(*TRAIN), slice(*VALIDATION)
    (sy, sx), threshold, _ = best_shift(interior[train], interior_labels[train])
    unshifted = min(THRESHOLDS, key=lambda t: error(interior[train], interior_labels[train], t))
    moved = ndimage.shift(interior, (0, sy, sx), order=1, mode="nearest")
    as_predicted = error(interior[held_out], interior_labels[held_out], unshifted)
    shifted = error(moved[held_out], interior_labels[held_out], threshold)
    print(f"prediction: shift ({sy:+.2f}, {sx:+.2f}) px and p > {threshold:g}, chosen on 0-19")
    print(
        f"  pixel error on 20-24: {as_predicted:.4f} as predicted (p > {unshifted:g}), "
        f"{shifted:.4f} shifted"
    )
    per_slice = [
        best_shift(interior[z : z + 1], interior_labels[z : z + 1])[0] for z in range(len(image))
    ]
    print("  best (y, x) shift of each slice:", " ".join(f"({y:+g},{x:+g})" for y, x in per_slice))


if __name__ == "__main__":
    main()
