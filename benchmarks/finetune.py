"""Fine-tuning to a new contrast with 3 labelled slices, against training from scratch.

The way users adapt a model to their own volume: the ISBI stack with changed intensities
(inverted, or a gamma curve) stands for a new microscope. Three labelled slices (0-2) train,
for the same number of steps, (a) the model ``--init`` names, fine-tuned
(``train(init=...)``), and (b) the same network from scratch. Both, and the model as it is
(no fine-tuning), are scored on slices 20-24 of the changed stack (argmax).

``--init`` defaults to the shipped model, which was trained on all 25 slices (original
contrast): its score on 20-24 has seen those labels. For a clean comparison pass a model of
the same recipe trained on slices 0-19 only (``isbi_quality.py`` writes one as
``runs/isbi-quality/model.pt``).

    .venv/bin/python benchmarks/finetune.py --contrast inverted --steps 300
    .venv/bin/python benchmarks/finetune.py --init runs/isbi-quality/model.pt --contrast gamma
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import tifffile
from isbi import IMAGE, LABELS, VALIDATION, interior_probability, scores

from unet_volume.cluster.client import open_client
from unet_volume.models.checkpoint import read_checkpoint
from unet_volume.training.loop import TrainConfig, train

GAMMA = 2.5


def changed_contrast(contrast: str, out: Path) -> str:
    """The ISBI stack with ``contrast`` applied, as a TIFF in ``out``."""
    stack = tifffile.imread(IMAGE).astype(np.float32) / 255.0
    if contrast == "inverted":
        stack = 1.0 - stack
    else:
        stack = stack**GAMMA  # darker mid-tones, membranes and cytoplasm closer together
    path = out / f"volume-{contrast}.tif"
    tifffile.imwrite(path, np.round(stack * 255).astype(np.uint8))
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--init", default="isbi2012-membranes", help="model to fine-tune")
    parser.add_argument("--contrast", choices=("inverted", "gamma"), default="inverted")
    parser.add_argument("--steps", type=int, default=300, help="steps of each training")
    parser.add_argument("--slices", type=int, default=3, help="labelled slices 0..N-1")
    parser.add_argument("--out", type=Path, default=Path("runs/finetune"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    image = changed_contrast(args.contrast, args.out)
    labelled = (0, args.slices)
    network = read_checkpoint(args.init).config
    config = TrainConfig(model=network, steps=args.steps, minutes=None, z_range=labelled)
    as_it_is = f"{args.init}, as it is"
    runs: dict[str, dict[str, float]] = {as_it_is: {}}
    models = {as_it_is: args.init}
    for name, init in (("fine-tuned", args.init), ("from scratch", None)):
        start = time.perf_counter()
        report = train(image, LABELS, args.out / f"{name}.pt", config, init=init)
        runs[name] = {"steps": report.steps, "seconds": round(time.perf_counter() - start, 1)}
        models[name] = str(report.checkpoint)
    with open_client(n_workers=2, dashboard=False) as client:
        for name, model in models.items():
            interior = interior_probability(model, image, args.out / "prediction.zarr", client)
            runs[name].update(scores(interior, VALIDATION))
    (args.out / "results.json").write_text(json.dumps(runs, indent=2) + "\n")
    print(
        f"{args.contrast} contrast; {args.slices} labelled slices; {args.steps} steps each; "
        f"init {args.init}; scored on slices 20-24 (argmax)"
    )
    for name, run in runs.items():
        trained = f"{run['steps']} steps in {run['seconds']:.0f} s" if "steps" in run else "-"
        print(
            f"{name:>40}: pixel error {run['pixel_error']:.4f}  Rand error "
            f"{run['rand_error']:.4f}  ({trained})"
        )


if __name__ == "__main__":
    main()
