"""Stored objects of an output: one per block, or one per shard of blocks; 1 TB projected.

Writes a real prediction of a (64, 1024, 1024) volume in 1x512x512 blocks twice (crop probe,
2 workers): unsharded (one object per block and array, one done marker per block) and with
the automatic shards. Counts the files of each, checks the count against
:meth:`unet_volume.grid.OutputLayout.objects`, and prints what the same layouts give for a
1 TB uint8 volume, (4000, 16384, 16384).

    .venv/bin/python benchmarks/file_count.py [--workdir DIR]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import zarr

from unet_volume.cluster.client import open_client
from unet_volume.grid import OutputLayout, auto_shard_shape
from unet_volume.io.volumes import open_volume
from unet_volume.output.bookkeeping import DONE
from unet_volume.output.prediction import create_prediction
from unet_volume.prediction.engine import PredictionWork, run_prediction
from unet_volume.prediction.tasks import TaskPlan
from unet_volume.testing import CropPredictor
from unet_volume.tiling import TileGeometry

SHAPE, BLOCK, TERABYTE = (64, 1024, 1024), (1, 512, 512), (4000, 16384, 16384)
DATA_ARRAYS = ("probabilities", "segmentation")


def count_objects(output: Path) -> int:
    """Data objects and done markers: every file but metadata and the coordinates."""
    arrays = (*DATA_ARRAYS, DONE)
    return sum(
        1 for a in arrays for p in (output / a).rglob("*") if p.is_file() and p.name != "zarr.json"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, help="where input and outputs go (default: tmp)")
    args = parser.parse_args()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="file-count-"))
    image = root / "in.zarr"
    data = np.random.default_rng(0).integers(1, 255, SHAPE, dtype=np.uint8)
    zarr.create_array(image, shape=SHAPE, chunks=BLOCK, dtype="uint8", overwrite=True)[...] = data
    volume = open_volume(str(image))
    geometry = TileGeometry.for_unet(2, 4, min_output=BLOCK)
    with open_client(n_workers=2, dashboard=False) as client:
        for name, shard in [
            ("unsharded", BLOCK),
            ("sharded", auto_shard_shape(SHAPE, BLOCK, ndim=2)),
        ]:
            output = root / f"{name}.zarr"
            layout = OutputLayout(SHAPE, BLOCK, shard)
            store = create_prediction(
                str(output),
                volume=volume,
                num_classes=2,
                layout=layout,
                output_dtype="uint8",
                attrs={},
            )
            predictor = CropPredictor(geometry)
            work = PredictionWork(volume, geometry, TaskPlan(layout, shard), store)
            run_prediction(
                client, work, lambda t, p=predictor: np.concatenate([p(t), 255 - p(t)]) / 255
            )
            counted, expected = count_objects(output), layout.objects(arrays=len(DATA_ARRAYS))
            tb_shard = auto_shard_shape(TERABYTE, BLOCK, ndim=2) if name == "sharded" else BLOCK
            tb = OutputLayout(TERABYTE, BLOCK, tb_shard)
            print(
                f"{name}: shards {'x'.join(map(str, shard))}: {counted:,} objects counted, "
                f"{expected:,} by the layout ({'equal' if counted == expected else 'DIFFER'}); "
                f"1 TB volume {TERABYTE} in shards {'x'.join(map(str, tb_shard))}: "
                f"{tb.objects(arrays=len(DATA_ARRAYS)):,} objects"
            )


if __name__ == "__main__":
    main()
