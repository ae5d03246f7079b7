"""What the viewer pyramid costs next to the prediction it follows.

An EM-like volume of (Z, 1024, 1024) at 50 x 4 x 4 nm (the ISBI 2012 stack, tiled 2 x 2 in
y and x and repeated in z) is predicted with the shipped model (no test-time augmentation)
on a 2-worker LocalCluster; the prediction ends by building its OME-Zarr pyramid (2x2 means in
y, x: levels of 512 and 256). Prints the prediction's and the pyramid's seconds (the run
report's ``pyramid_seconds``), their ratio and the levels. Then the same for the instance
labels of ``segment`` (connected components per slice) and their strided pyramid, timed by
building it again on the finished labels.

    .venv/bin/python benchmarks/pyramid_cost.py --slices 50
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import tifffile
import zarr
from isbi import IMAGE

from unet_volume.cluster.client import open_client
from unet_volume.instances.labelling import label_instances
from unet_volume.output.ome import publish_levels
from unet_volume.prediction.run import predict_volume

VOXEL = (50.0, 4.0, 4.0)


def stand_in_volume(slices: int, out: Path) -> str:
    stack = tifffile.imread(IMAGE)
    volume = np.tile(stack, (-(-slices // len(stack)), 2, 2))[:slices]
    zarr.create_array(out, data=volume, chunks=(1, 1024, 1024), overwrite=True)
    return str(out)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slices", type=int, default=50)
    parser.add_argument("--workdir", type=Path, default=Path("runs/pyramid-cost"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    image = stand_in_volume(args.slices, args.workdir / "volume.zarr")
    out = str(args.workdir / "prediction.zarr")
    with open_client(n_workers=2, dashboard=False, quiet=True) as client:
        report = predict_volume(
            "isbi2012-membranes", image, out, client=client, voxel_size=VOXEL, overwrite=True
        )
        levels = [d.shape for d in _levels(out, "probabilities", "pyramid/")]
        blocks_seconds = report.seconds - report.pyramid_seconds
        print(f"volume {args.slices}x1024x1024 ({args.slices * 1024**2 / 1e6:.0f} Mvoxel)")
        print(
            f"prediction blocks {blocks_seconds:7.1f} s   pyramid {report.pyramid_seconds:6.2f} s"
            f"   ratio {report.pyramid_seconds / blocks_seconds:.3f}   levels {levels}"
        )
        labels = f"{out}/labels/cells"
        start = time.perf_counter()
        labelled = label_instances(out, labels, client=client, overwrite=True)
        total = time.perf_counter() - start
        start = time.perf_counter()
        publish_levels(client, labels, "instances", "stride", label=True)
        pyramid = time.perf_counter() - start
        print(
            f"segment (components) {total:7.1f} s with its pyramid; the pyramid again "
            f"{pyramid:6.2f} s   ratio to the prediction {pyramid / blocks_seconds:.3f}   "
            f"{labelled.objects:,} objects"
        )


def _levels(url: str, array: str, prefix: str) -> list[zarr.Array]:
    group = zarr.open_group(url, mode="r")
    names = sorted(n for n in group["pyramid"].array_keys()) if "pyramid" in group else []
    return [group[array], *(group[f"{prefix}{n}"] for n in names)]  # type: ignore[misc]


if __name__ == "__main__":
    main()
