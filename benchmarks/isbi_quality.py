"""Segmentation quality on ISBI 2012: train on slices 0-19, score the held-out slices 20-24.

Trains with the library (``unet_volume.training.loop.train``) for a time budget, predicts the whole
stack with the engine (``predict_volume`` on a 2-worker LocalCluster), and prints, for the
validation slices, the pixel error and the adapted Rand error (ISBI definitions,
``unet_volume.evaluation.scores.evaluate``), with the training time and all settings.

Three read-outs, each with and without test-time augmentation: the argmax segmentation
(probability threshold 0.5); the foreground threshold that scores best on the *training*
slices 0-19 (thin membrane gaps merge cells, which is what the Rand error punishes; a higher
interior threshold closes gaps); and the seeded watershed of ``unet-volume segment
--watershed``, its seed threshold chosen on slices 0-19 too. The validation slices are never
used to choose anything.

The paper's test-set figures: pixel error 0.0611, Rand error 0.0382 (after ~10 GPU hours).

    .venv/bin/python benchmarks/isbi_quality.py --minutes 25 --augment plain
    .venv/bin/python benchmarks/isbi_quality.py --steps 3000 --augment paper --no-weight-map
    # on a GPU:
    .venv/bin/python benchmarks/isbi_quality.py --minutes 120 --base-channels 64 --augment paper
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from distributed import Client
from isbi import (
    IMAGE,
    LABELS,
    TRAIN,
    VALIDATION,
    instance_scores,
    interior_probability,
    scores,
    watershed_labels,
)

from unet_volume.cluster.client import open_client
from unet_volume.models.checkpoint import read_checkpoint
from unet_volume.models.config import UNetConfig
from unet_volume.option_fields import parse_floats
from unet_volume.training.loop import TrainConfig, train

THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
# The binary map's, for pixel error: its best sits at 0.1-0.15 and moves it by 0.001 per 0.01.
PIXEL_THRESHOLDS = (*(round(0.05 + k / 100, 2) for k in range(26)), 0.4, 0.5)
CHALLENGE_THRESHOLDS = tuple(t / 10 for t in range(10))  # the ISBI script's: 0.0 to 0.9 by 0.1
SEEDS = (0.6, 0.7, 0.8, 0.9)  # watershed seed thresholds tried on the training slices


def watershed_read_out(prediction: Path, client: Client, suffix: str) -> dict[str, object]:
    """The seeded watershed (``segment --watershed``, and ``--cover``), its seed threshold the
    one that scores best on the training slices; the validation slices choose nothing."""
    results: dict[str, object] = {}
    for cover, name in ((False, "watershed"), (True, "watershed_cover")):
        labels = {s: watershed_labels(prediction, s, client, cover=cover) for s in SEEDS}
        best = min(SEEDS, key=lambda seed: instance_scores(labels[seed], TRAIN)["rand_error"])
        results[f"validation_{name}{suffix}"] = instance_scores(labels[best], VALIDATION)
        results[f"seed_threshold_{name}{suffix}"] = best
    return results


def threshold_read_outs(interior: np.ndarray, suffix: str) -> dict[str, object]:
    """Validation scores of the argmax and of three thresholds, each chosen on the training
    slices by what it serves: the Rand error, the pixel error, and the ISBI challenge's pixel
    error (1 - F-score of the interior, from the challenge script's grid; the script itself took
    the best threshold on the scored slices). Each threshold is scored on 0-19 once."""
    grid = sorted({*THRESHOLDS, *PIXEL_THRESHOLDS, *CHALLENGE_THRESHOLDS})
    on_train = {t: scores(interior, TRAIN, t) for t in grid}

    def best(thresholds: tuple[float, ...], metric: str) -> float:
        return min(thresholds, key=lambda t: on_train[t][metric])

    tuned = best(THRESHOLDS, "rand_error")
    pixel = best(PIXEL_THRESHOLDS, "pixel_error")
    challenge = best(CHALLENGE_THRESHOLDS, "challenge_pixel_error")
    return {
        f"validation_argmax{suffix}": scores(interior, VALIDATION, 0.5),
        f"validation_tuned_threshold{suffix}": scores(interior, VALIDATION, tuned),
        f"threshold{suffix}": tuned,
        f"validation_pixel_threshold{suffix}": scores(interior, VALIDATION, pixel),
        f"pixel_threshold{suffix}": pixel,
        f"validation_challenge_pixel{suffix}": scores(interior, VALIDATION, challenge),
        f"challenge_pixel_threshold{suffix}": challenge,
    }


def read_outs(model: Path, out: Path) -> dict[str, object]:
    """Validation scores with and without test-time augmentation: the thresholded maps and the
    watersheds."""
    results: dict[str, object] = {}
    with open_client(n_workers=2, dashboard=False) as client:
        for tta in (False, True):
            suffix = "_tta" if tta else ""
            path = out / f"prediction{suffix}.zarr"
            interior = interior_probability(model, IMAGE, path, client, tta=tta)
            results |= threshold_read_outs(interior, suffix)
            results |= watershed_read_out(path, client, suffix)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=25.0, help="training budget (default 25)")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="a budget in steps instead of minutes: the same training on every machine",
    )
    parser.add_argument("--base-channels", type=int, default=16)
    parser.add_argument("--augment", choices=("none", "plain", "paper", "upright"), default="paper")
    parser.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    parser.add_argument(
        "--tile-output", type=int, default=132, help="y/x output of a training tile"
    )
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument(
        "--no-weight-map",
        action="store_true",
        help="weigh the loss by class balance instead of the paper's weight map (w0 10, sigma 5)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="training seed: a second seed shows the noise"
    )
    parser.add_argument(
        "--label-offset",
        type=parse_floats,
        default=None,
        help="Y,X: where the image's membranes sit against the labels' (ISBI: 0.6,0.2; "
        "label_offset.py measures it); training and prediction register to it",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/isbi-quality"))
    parser.add_argument(
        "--score",
        action="store_true",
        help="no training: score OUT/model.pt (a network, or an ensemble of held-out networks "
        "from `unet-volume ensemble`) again (the read-outs only), e.g. after a read-out "
        "was added; the training's figures come from the checkpoint",
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.score:
        report_results(score_again(args.out / "model.pt", args.out))
        return
    config = TrainConfig(
        model=UNetConfig(base_channels=args.base_channels),
        augment=args.augment,
        optimizer=args.optimizer,
        tile_output=(1, args.tile_output, args.tile_output),
        batch_size=args.batch_size,
        minutes=None if args.steps else args.minutes,
        steps=args.steps,
        z_range=TRAIN,
        validation_z_range=VALIDATION,
        validate_every=250,
        checkpoint_every=500,
        weight_map=not args.no_weight_map,  # computed by train beside the model, from 0-19
        seed=args.seed,
        label_offset=args.label_offset,
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    report = train(IMAGE, LABELS, args.out / "model.pt", config)
    train_s = time.perf_counter() - start
    results = {
        "settings": {**config.to_dict(), "device": device},
        "training": {
            "seconds": round(train_s, 1),
            "steps": report.steps,
            "output_voxels_seen": report.steps * args.batch_size * args.tile_output**2,
            "final_loss": report.final_loss,
        },
        **read_outs(report.checkpoint, args.out),
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    report_results(results)


def score_again(model: Path, out: Path) -> dict[str, Any]:
    """The results of a finished training run, its read-outs measured anew."""
    checkpoint = read_checkpoint(model)
    training = checkpoint.metadata["training"]  # an ensemble's: its first network's
    config = training["config"]
    tile = config["tile_output"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = {
        "settings": {**config, "device": device, "members": checkpoint.members},
        "training": {
            "seconds": round(training["seconds"], 1),
            "steps": training["steps"],
            "output_voxels_seen": training["steps"] * config["batch_size"] * tile[1] * tile[2],
            "final_loss": training["final_loss"],
        },
        **read_outs(model, out),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def report_results(results: dict[str, Any]) -> None:
    """Print the settings, the training and every read-out's scores on slices 20-24."""
    training = results["training"]
    print(json.dumps(results["settings"]))
    print(
        f"training: {training['steps']} steps in {training['seconds']:.0f} s on "
        f"{results['settings']['device']} ({training['steps'] / training['seconds']:.2f} "
        f"steps/s, {training['output_voxels_seen'] / 1e6:.0f} Mvoxel of output seen), "
        f"final loss {training['final_loss']:.4f}"
    )
    for key, value in results.items():
        if key.startswith("validation"):
            print(
                f"slices 20-24, {key:>28}: pixel error {value['pixel_error']:.4f}  "
                f"Rand error {value['rand_error']:.4f}"
                + (
                    f"  (ISBI challenge's pixel error {value['challenge_pixel_error']:.4f})"
                    if "challenge_pixel_error" in value
                    else ""
                )
            )
    chosen = {k: v for k, v in results.items() if "threshold" in k and "validation" not in k}
    print(f"(chosen on the training slices 0-19: {json.dumps(chosen)})")
    best_pixel = results["validation_pixel_threshold_tta"]["pixel_error"]
    best_rand = results["validation_watershed_cover_tta"]["rand_error"]
    print(
        f"the shipped read-out (tta; segmentation at p > {results['pixel_threshold_tta']}; "
        f"segment --watershed --cover): pixel error {best_pixel:.4f}  Rand error {best_rand:.4f}"
    )
    challenge = results["validation_challenge_pixel_tta"]["challenge_pixel_error"]
    print(
        f"the ISBI challenge's pixel error (1 - F-score of the interior, tta, p > "
        f"{results['challenge_pixel_threshold_tta']}): {challenge:.4f}"
    )
    print(
        "paper (ISBI test set, the challenge's definitions): pixel error 0.0611  Rand error 0.0382"
    )


if __name__ == "__main__":
    main()
