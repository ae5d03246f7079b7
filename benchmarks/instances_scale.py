"""Instance labels at scale: voxels/s of connected components and of the watershed, and the
workers' peak memory as the volume grows.

For each side N (default 256 and 512), writes an N^3 stand-in for a prediction to disk
(compressed Zarr; a smoothed random field as the foreground probability: blobs, about 10^5
objects at 512^3), then on a fresh 2-worker LocalCluster runs

- ``segment`` with connected components in 3D (26-connected, blocks of 64x256x256), and
- ``segment --watershed`` per slice (blocks of whole slices),

and prints objects, seconds, Mvoxel/s and each run's peak worker RSS (the largest over the
workers, their ``VmHWM``; each run gets new workers so peaks do not carry over).

    .venv/bin/python benchmarks/instances_scale.py --sides 256,512
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import zarr
from scipy import ndimage

from unet_volume.cluster.client import open_client
from unet_volume.cluster.malloc import peak_resident_mb
from unet_volume.instances.labelling import label_instances
from unet_volume.instances.watershed import WatershedConfig

SMOOTH = 7
THRESHOLD = 0.5 + 1.28 * (1 / 12 / SMOOTH**3) ** 0.5
"""The smoothed noise's 90th percentile: p = 0.5 there."""


def stand_in_prediction(side: int, out: Path, seed: int = 0) -> str:
    """A prediction-shaped group: probabilities (2, z, y, x) float32, segmentation uint8.

    The foreground probability is uniform noise smoothed over 7^3 voxels, stretched so that
    about 10% of the voxels are foreground: separate blobs of a few hundred voxels (about 10^5
    at 512^3) rather than one percolating sponge. Written slab by slab (never whole)."""
    group = zarr.open_group(out, mode="w")
    shape = (side, side, side)
    probabilities = group.create_array(
        "probabilities", shape=(2, *shape), chunks=(1, 16, 256, 256), dtype="float32"
    )
    segmentation = group.create_array(
        "segmentation", shape=shape, chunks=(16, 256, 256), dtype="uint8"
    )
    rng = np.random.default_rng(seed)
    for z in range(0, side, 16):
        noise = rng.random((16, side, side), dtype=np.float32)
        smooth = ndimage.uniform_filter(noise, size=SMOOTH)  # mean 0.5, sd 0.016
        p = np.clip((smooth - THRESHOLD) * 15 + 0.5, 0, 1).astype(np.float32)
        probabilities[:, z : z + 16] = np.stack([1 - p, p])
        segmentation[z : z + 16] = p > 0.5
    return str(out)


def peak_worker_rss_mb(client: object) -> float:
    """The largest peak resident memory of the workers (``VmHWM``: ``ru_maxrss`` would include
    this client's own peak, which Linux carries across the workers' ``exec``)."""
    peaks = client.run(peak_resident_mb)  # type: ignore[attr-defined]
    return max(peaks.values())


def timed(source: str, out: str, **options: object) -> tuple[int, float, float]:
    """Objects, seconds and peak worker RSS (MB) of one ``label_instances`` run."""
    with open_client(n_workers=2, dashboard=False, quiet=True) as client:
        start = time.perf_counter()
        report = label_instances(source, out, client=client, overwrite=True, **options)  # type: ignore[arg-type]
        seconds = time.perf_counter() - start
        return report.objects, seconds, peak_worker_rss_mb(client)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sides", default="256,512", help="volume sides, comma-separated")
    parser.add_argument("--workdir", type=Path, default=Path("runs/instances-scale"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    print("side  method                 objects   seconds  Mvoxel/s  peak worker RSS (MB)")
    for side in (int(s) for s in args.sides.split(",")):
        source = stand_in_prediction(side, args.workdir / f"prediction-{side}.zarr")
        components = {"connectivity": 26, "per_slice": False, "block_shape": (64, 256, 256)}
        runs = {
            "components 3D (26)": components,
            "watershed per slice": {"watershed": WatershedConfig()},
        }
        for name, options in runs.items():
            out = str(args.workdir / f"labels-{side}-{name.split()[0]}.zarr")
            objects, seconds, rss = timed(source, out, **options)
            rate = side**3 / seconds / 1e6
            print(f"{side:4d}  {name:21s} {objects:9,d} {seconds:9.1f} {rate:9.2f} {rss:12.0f}")


if __name__ == "__main__":
    main()
