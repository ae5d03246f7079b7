"""How fast are weight maps? 512^3 labels, ~10^4 touching cells, 3D weights (w0 10, sigma 5).

(a) weight_map in this process on one 128^3 label array (the whole array weighed, nothing around
it); (b) one block as a task runs it: a 128^3 write box with its 32-voxel halo as context; (c)
compute_weight_volume on a LocalCluster of 2 single-thread workers, Zarr in and out, chunks 128^3
    (cluster start excluded; the label-range and class-count passes included).

Cells are Voronoi cells of random seeds (each voxel takes its nearest seed's label, through one
distance transform); a fraction ``--drop`` of them becomes background, so there are gaps where
cells are far apart as well as touching faces. ``--drop 0`` packs the cells.

    .venv/bin/python benchmarks/weight_map_speed.py [--side 512] [--cells 10000] [--chunk 128]
    [--drop 0.15]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr
from scipy import ndimage

from unet_volume.cluster.client import open_client
from unet_volume.geometry import Box
from unet_volume.training.weight_map import WeightMapConfig, halo_for, weight_map
from unet_volume.training.weight_volume import compute_weight_volume

CONFIG = WeightMapConfig(w0=10.0, sigma=5.0, ndim=3)


def voronoi_labels(side: int, cells: int, drop: float, seed: int = 0) -> np.ndarray:
    """About ``cells`` Voronoi cells in a ``side``^3 uint32 volume, ``drop`` of them dropped."""
    rng = np.random.default_rng(seed)
    seeds = round(cells / (1.0 - drop))
    points = tuple(rng.integers(0, side, seeds) for _ in range(3))
    empty = np.ones((side,) * 3, dtype=bool)
    empty[points] = False
    nearest = ndimage.distance_transform_edt(empty, return_distances=False, return_indices=True)
    del empty
    keep = np.zeros(seeds + 1, dtype=np.uint32)
    keep[1:] = np.where(rng.random(seeds) >= drop, np.arange(1, seeds + 1), 0)
    ids = np.zeros((side,) * 3, dtype=np.uint32)
    ids[points] = np.arange(1, seeds + 1)
    return keep[ids[tuple(nearest)]]


def bare(labels: np.ndarray, chunk: int) -> None:
    """(a) and (b): single-process voxels per second of weight_map."""
    cube = labels[:chunk, :chunk, :chunk]
    start = time.perf_counter()
    weight_map(cube, CONFIG)
    seconds = time.perf_counter() - start
    print(
        f"(a) weight_map on one {chunk}^3 array: {seconds:.2f} s, "
        f"{cube.size / seconds / 1e6:.2f} Mvoxel/s, "
        f"{len(np.unique(cube)) - 1} cells"
    )
    halo = halo_for(CONFIG)
    # An interior block: its read box starts at the origin.
    write = Box.from_shape((chunk,) * 3, begin=halo)
    read = write.grow(halo)
    start = time.perf_counter()
    weight_map(labels[read.to_slices()], CONFIG, write_box=Box.from_shape(write.shape, begin=halo))
    seconds = time.perf_counter() - start
    print(
        f"(b) one block: write box {write} with halo {halo} (read {read.shape}): {seconds:.2f} s, "
        f"{write.size / seconds / 1e6:.2f} Mvoxel/s of output"
    )


def chunked(labels: np.ndarray, chunk: int, workdir: Path) -> None:
    """(c): compute_weight_volume over the whole volume on 2 worker processes."""
    source = zarr.create_array(
        workdir / "labels.zarr", shape=labels.shape, chunks=(chunk,) * 3, dtype="uint32"
    )
    source[:] = labels
    with open_client(n_workers=2, dashboard=False) as client:
        report = compute_weight_volume(
            str(workdir / "labels.zarr"),
            str(workdir / "weights.zarr"),
            CONFIG,
            block_shape=(chunk,) * 3,
            client=client,
            overwrite=True,
        )
    print(
        f"(c) compute_weight_volume: {labels.shape} uint32, blocks {(chunk,) * 3}, "
        f"{report.blocks} blocks, "
        f"halo {report.halo}, 2 workers x 1 thread: {report.seconds:.1f} s, "
        f"{report.voxels_per_second / 1e6:.2f} Mvoxel/s; "
        f"weight tasks summed {report.task_seconds:.1f} s; "
        f"class weights {tuple(round(w, 3) for w in report.class_weights)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--cells", type=int, default=10_000)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--drop", type=float, default=0.15)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    start = time.perf_counter()
    labels = voronoi_labels(args.side, args.cells, args.drop)
    cells = len(np.unique(labels)) - 1
    print(
        f"labels: {labels.shape}, {cells} cells (drop {args.drop}), "
        f"background {np.mean(labels == 0):.1%}, "
        f"generated in {time.perf_counter() - start:.1f} s; config {CONFIG}"
    )
    bare(labels, args.chunk)
    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        chunked(labels, args.chunk, Path(workdir))


if __name__ == "__main__":
    main()
