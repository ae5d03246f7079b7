"""Ship a trained checkpoint with the package: copy it, score it, record it in models.json.

The record is what ``unet-volume models`` prints and what ``tests/test_shipped_models.py``
checks: the file's sha256; how it was made (the recipe from the checkpoint's own metadata, its
steps and data); its held-out figures, from the same recipe trained on slices 0-19 and scored
on 20-24 (``isbi_quality.py``'s results.json, the read-out ``--readout`` names); and its own
figures on slices 20-24 (which it trained on), measured here as the test measures them.

    .venv/bin/python scripts/ship_model.py runs/ship/model.pt --name isbi2012-membranes \\
        --held-out runs/held-out/results.json --readout validation_argmax
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from isbi import IMAGE, VALIDATION, interior_probability, scores  # noqa: E402

from unet_volume.checkpoint import read_checkpoint  # noqa: E402
from unet_volume.cluster import open_client  # noqa: E402
from unet_volume.shipped_models import INDEX, SHIPPED_DIR  # noqa: E402


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
    return [
        f"recipe: {config['optimizer']} lr {training['learning_rate']:g} "
        f"({config['lr_schedule']}), {tile[1]}x{tile[2]} output tiles, batch "
        f"{config['batch_size']}, augmentation {config['augment']}, loss weighted by {weighted}",
        f"trained: {training['steps']} steps on ISBI 2012 train-volume slices {first}-{end - 1} "
        f"({training['seconds'] / 60:.0f} min), seed {config['seed']}",
        f"held-out run: the same recipe on slices 0-19, {held_out['training']['steps']} steps",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--name", required=True)
    parser.add_argument("--summary", default="2D U-Net for EM membranes and cells (ISBI 2012)")
    parser.add_argument("--held-out", type=Path, required=True, help="isbi_quality results.json")
    parser.add_argument("--readout", default="validation_argmax")
    args = parser.parse_args()
    held_out = json.loads(args.held_out.read_text())
    tta = args.readout.endswith("_tta")
    target = SHIPPED_DIR / f"{args.name}.pt"
    SHIPPED_DIR.mkdir(exist_ok=True)
    shutil.copyfile(args.checkpoint, target)
    with tempfile.TemporaryDirectory() as tmp, open_client(n_workers=2, dashboard=False) as c:
        interior = interior_probability(target, IMAGE, Path(tmp) / "p.zarr", c, tta=tta)
    own = scores(interior, VALIDATION)
    how = f"slices 20-24, argmax{', tta' if tta else ''}"
    entries = json.loads(INDEX.read_text()) if INDEX.exists() else {}
    entries[args.name] = {
        "file": target.name,
        "sha256": hashlib.sha256(target.read_bytes()).hexdigest(),
        "summary": args.summary,
        "made": recipe_lines(target, held_out),
        "predict": {"tta": tta},
        "figures": {
            "held_out": {k: round(v, 4) for k, v in held_out[args.readout].items()},
            "held_out_how": f"{how}, never trained on",
            "slices_20_24": {k: round(v, 4) for k, v in own.items()},
            "slices_20_24_how": f"{how}, trained on",
        },
    }
    INDEX.write_text(json.dumps(entries, indent=2) + "\n")
    print(json.dumps(entries[args.name], indent=2))


if __name__ == "__main__":
    main()
