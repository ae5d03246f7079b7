"""Ship a trained checkpoint with the package: copy it, score it, record it in models.json.

The record is what ``unet-volume models`` prints and what ``tests/test_shipped_models.py``
checks: the file's sha256; how it was made (the recipe from the checkpoint's own metadata, its
steps and data); its held-out figures, from the same recipe trained on slices 0-19 and scored
on 20-24 (``isbi_quality.py``'s results.json); and its own figures on slices 20-24 (which it
trained on), measured here as the test measures them.

The read-out is the one the held-out run chose on its training slices 0-19: the pixel error of
the segmentation at the foreground threshold that scored best there (``predict --threshold``),
and the Rand error of the covering watershed (``segment --watershed --cover``) with the seed
threshold that scored best there. The argmax figures are recorded beside them.

An ensemble (``unet-volume ensemble``) ships as one file; its held-out figures are those of the
ensemble of the held-out runs' networks, and ``--other-seed`` takes each of those alone.

    .venv/bin/python scripts/ship_model.py runs/ship/model.pt --name isbi2012-membranes \\
        --held-out runs/held-out/results.json [--other-seed runs/held-out-seed1/results.json]
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from isbi import (  # noqa: E402
    IMAGE,
    VALIDATION,
    instance_scores,
    interior_probability,
    scores,
    watershed_labels,
)

from unet_volume.cluster.client import open_client  # noqa: E402
from unet_volume.models.checkpoint import read_checkpoint, save_model  # noqa: E402
from unet_volume.models.shipped import INDEX, SHIPPED_DIR  # noqa: E402


def recipe_lines(checkpoint_path: Path, held_out: dict) -> list[str]:
    """How the model was made, in words, from its metadata and the held-out run's settings."""
    checkpoint = read_checkpoint(checkpoint_path)
    training = checkpoint.metadata["training"]
    config = training["config"]
    weighted = (
        "the paper's weight map (w0 10, sigma 5)"
        if held_out["settings"].get("weight_map")
        else "class balance"
    )
    tile = config["tile_output"]
    first, end = config["z_range"] or (0, 25)
    offset = config.get("label_offset")
    registered = (
        f", registered to the labels' offset {','.join(f'{v:g}' for v in offset)} px (y,x)"
        if offset
        else ""
    )
    members = [m["training"] for m in checkpoint.metadata.get("ensemble", [training])]
    seeds = ", ".join(str(m["config"]["seed"]) for m in members)
    minutes = " + ".join(f"{m['seconds'] / 60:.0f}" for m in members)
    held_out_members = held_out["settings"].get("members", 1)
    return [
        *(
            [f"ensemble of {len(members)} networks of one recipe, their probabilities averaged"]
            if len(members) > 1
            else []
        ),
        f"recipe: {config['optimizer']} lr {training['learning_rate']:g} "
        f"({config['lr_schedule']}), {tile[1]}x{tile[2]} output tiles, batch "
        f"{config['batch_size']}, augmentation {config['augment']}, loss weighted by {weighted}"
        f"{registered}",
        f"trained: {training['steps']} steps{' each' if len(members) > 1 else ''} on ISBI 2012 "
        f"train-volume slices {first}-{end - 1} ({minutes} min), seed{'s' * (len(members) > 1)} "
        f"{seeds}",
        f"held-out run: the same recipe on slices 0-19, {held_out['training']['steps']} steps"
        + (f", an ensemble of {held_out_members} networks alike" if held_out_members > 1 else ""),
    ]


def ship_file(checkpoint_path: Path, target: Path, weights_dtype: torch.dtype | None) -> None:
    """Write the checkpoint to ``target`` with its data named by file name, not by the paths of
    the machine that trained it (``/tmp/...``): the weights and the rest are the checkpoint's,
    the weights stored as ``weights_dtype`` if given (float16: a bigger net within 20 MB)."""
    checkpoint = read_checkpoint(checkpoint_path)
    metadata = copy.deepcopy(checkpoint.metadata)
    members = [m.get("training") or {} for m in metadata.get("ensemble", [])]
    for training in [metadata.get("training", {}), *members]:
        for key in ("image", "labels", "weights", "init"):
            if isinstance(training.get(key), str):
                training[key] = Path(training[key]).name
    save_model(checkpoint.to_model(), target, metadata=metadata, weights_dtype=weights_dtype)


def rounded(figures: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 4) for k, v in figures.items()}


def held_out_figures(results: dict, suffix: str) -> dict[str, float]:
    """The shipped read-out's figures in a held-out run: its own thresholds, chosen on 0-19;
    the segmentation's pixel error also as the ISBI challenge defined it (1 - F of the interior),
    where the run measured it."""
    segmentation = results[f"validation_pixel_threshold{suffix}"]
    figures = {
        "pixel_error": round(segmentation["pixel_error"], 4),
        "rand_error": round(results[f"validation_watershed_cover{suffix}"]["rand_error"], 4),
    }
    if "challenge_pixel_error" in segmentation:
        figures["challenge_pixel_error"] = round(segmentation["challenge_pixel_error"], 4)
    return figures


def other_seeds(paths: list[Path], suffix: str, how: str, members: int) -> dict[str, object]:
    """``held_out_seed_N`` figures of the same recipe with other seeds: the runs' noise; for an
    ensemble of ``members`` networks, ``held_out_network_seed_N``: each network alone."""
    figures: dict[str, object] = {}
    for path in paths:
        results = json.loads(path.read_text())
        seed = results["settings"]["seed"]
        alone = members > 1 and results["settings"].get("members", 1) == 1
        key = f"held_out_{'network_' if alone else ''}seed_{seed}"
        what = "one network of the ensemble alone" if alone else "the same recipe"
        figures[key] = held_out_figures(results, suffix)
        figures[f"{key}_how"] = (
            f"{how}; {what} with seed {seed}, its thresholds (p > "
            f"{results[f'pixel_threshold{suffix}']:g}, seeds p > "
            f"{results[f'seed_threshold_watershed_cover{suffix}']:g}) chosen on slices 0-19; "
            "never trained on"
        )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--name", required=True)
    parser.add_argument("--summary", default="2D U-Net for EM membranes and cells (ISBI 2012)")
    parser.add_argument("--held-out", type=Path, required=True, help="isbi_quality results.json")
    parser.add_argument("--tta", action="store_true", help="the read-outs with TTA")
    parser.add_argument(
        "--other-seed",
        type=Path,
        action="append",
        default=[],
        help="results.json of the held-out recipe with another seed (repeatable): the noise",
    )
    parser.add_argument(
        "--float16",
        action="store_true",
        help="store the weights as float16 (half the file; read back as float32); the figures "
        "recorded are the shipped file's own",
    )
    args = parser.parse_args()
    held_out = json.loads(args.held_out.read_text())
    suffix = "_tta" if args.tta else ""
    threshold = held_out[f"pixel_threshold{suffix}"]
    seed = held_out[f"seed_threshold_watershed_cover{suffix}"]
    target = SHIPPED_DIR / f"{args.name}.pt"
    SHIPPED_DIR.mkdir(exist_ok=True)
    ship_file(args.checkpoint, target, torch.float16 if args.float16 else None)
    with tempfile.TemporaryDirectory() as tmp, open_client(n_workers=2, dashboard=False) as c:
        prediction = Path(tmp) / "p.zarr"
        interior = interior_probability(target, IMAGE, prediction, c, tta=args.tta)
        own_argmax = scores(interior, VALIDATION)
        own_segmentation = scores(interior, VALIDATION, threshold)
        labels = watershed_labels(prediction, seed, c, cover=True)
        own_rand = instance_scores(labels, VALIDATION)["rand_error"]
    how = f"slices 20-24{', tta' if args.tta else ''}"
    read_out = (
        f"{how}; pixel error of the segmentation at p > {threshold:g}, Rand error of the "
        f"covering watershed (seeds p > {seed:g}); thresholds chosen on slices 0-19"
    )
    entries = json.loads(INDEX.read_text()) if INDEX.exists() else {}
    entries[args.name] = {
        "file": target.name,
        "sha256": hashlib.sha256(target.read_bytes()).hexdigest(),
        "summary": args.summary,
        "made": recipe_lines(target, held_out)
        + (["weights stored as float16 (read as float32)"] if args.float16 else []),
        "predict": {"tta": args.tta, "threshold": threshold},
        "segment": {"watershed": True, "seed_threshold": seed, "threshold": 0.5, "cover": True},
        "figures": {
            "held_out": held_out_figures(held_out, suffix),
            "held_out_how": f"{read_out}; never trained on",
            **other_seeds(args.other_seed, suffix, how, held_out["settings"].get("members", 1)),
            "held_out_argmax": rounded(held_out[f"validation_argmax{suffix}"]),
            "held_out_argmax_how": f"{how}, argmax, connected components; never trained on",
            "slices_20_24": {
                "pixel_error": round(own_segmentation["pixel_error"], 4),
                "rand_error": round(own_rand, 4),
                "challenge_pixel_error": round(own_segmentation["challenge_pixel_error"], 4),
            },
            "slices_20_24_how": f"{read_out}; trained on",
            "slices_20_24_argmax": rounded(own_argmax),
            "slices_20_24_argmax_how": f"{how}, argmax, connected components; trained on",
        },
    }
    INDEX.write_text(json.dumps(entries, indent=2) + "\n")
    print(json.dumps(entries[args.name], indent=2))


if __name__ == "__main__":
    main()
