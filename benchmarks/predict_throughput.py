"""How much does the prediction engine cost over the bare model?

(a) the bare model: one tile of the block size (block 512 -> tile 700 -> 516 out),
    torch with 2 threads, in this process; output voxels of the block per second.
(b) predict_volume on a (16, 1024, 1024) uint8 Zarr volume with 2 single-thread
    worker processes (LocalCluster), same model (base 16, depth 4), default blocks
    (1, 512, 512); output voxels per second, cluster start excluded, model loading
    excluded by a warm-up run.

Prints both and the ratio b / a (target >= 0.8: the engine costs at most 20%).

    .venv/bin/python benchmarks/predict_throughput.py [--repeats 3] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr

from unet_volume.checkpoint import checkpoint_bytes, save_model
from unet_volume.cluster import open_client
from unet_volume.model import UNet
from unet_volume.predict import predict_volume
from unet_volume.predictor import ModelPredictor

BLOCK = (1, 512, 512)
VOLUME = (16, 1024, 1024)
METADATA = {"normalization": {"mean": 127.5, "std": 64.0}}


def bare_model(model: UNet, repeats: int) -> float:
    """Block voxels per second of one forward pass (normalise, net, soft-max) on one tile."""
    torch.set_num_threads(2)
    predictor = ModelPredictor(checkpoint_bytes(model, METADATA))
    geometry = model.tile_geometry(min_output=BLOCK)
    tile = np.random.default_rng(0).integers(0, 256, (1, *geometry.input_shape), dtype=np.uint8)
    predictor(tile)  # warm-up: build the net, let oneDNN pick its kernels
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        predictor(tile)
        times.append(time.perf_counter() - start)
    print(
        f"(a) bare model: tile {geometry.input_shape} -> {geometry.output_shape}, 2 torch threads, "
        f"{statistics.median(times):.3f} s median of {repeats} (min {min(times):.3f})"
    )
    return int(np.prod(BLOCK)) / statistics.median(times)


def engine(model_path: Path, workdir: Path, repeats: int) -> float:
    """Output voxels per second of predict_volume over the whole volume, 2 workers x 1 thread."""
    source = workdir / "volume.zarr"
    array = zarr.create_array(
        source, shape=VOLUME, chunks=(1, 256, 256), dtype="uint8", overwrite=True
    )
    rng = np.random.default_rng(0)
    for z in range(VOLUME[0]):
        array[z] = rng.integers(0, 256, VOLUME[1:], dtype=np.uint8)
    warm = workdir / "warm.zarr"
    zarr.create_array(
        warm, shape=(1, 512, 512), chunks=(1, 512, 512), dtype="uint8", overwrite=True
    )[:] = 7
    times = []
    with open_client(n_workers=2, dashboard=False) as client:
        predict_volume(model_path, warm, workdir / "warm-out.zarr", client=client, overwrite=True)
        for _ in range(repeats):
            report = predict_volume(
                model_path, source, workdir / "out.zarr", client=client, overwrite=True
            )
            times.append(report.seconds)
            stages = ", ".join(f"{k} {v:.1f} s" for k, v in report.task_seconds.items())
            print(f"    run: {report.seconds:.2f} s; summed over tasks: {stages}")
    voxels = int(np.prod(VOLUME))
    print(
        f"(b) predict_volume: {VOLUME} uint8, blocks {BLOCK}, 2 workers x 1 thread, "
        f"{statistics.median(times):.2f} s median of {repeats} (min {min(times):.2f})"
    )
    return voxels / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = UNet(base_channels=16, depth=4).eval()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        workdir = Path(tmp)
        model_path = save_model(model, workdir / "model.pt", metadata=METADATA)
        b = engine(model_path, workdir, args.repeats)
        a = bare_model(model, max(args.repeats, 5))
    print(f"(a) bare model      {a / 1e6:.3f} Mvoxel/s")
    print(f"(b) predict_volume  {b / 1e6:.3f} Mvoxel/s")
    print(f"b / a = {b / a:.2f}  (target >= 0.8)")


if __name__ == "__main__":
    main()
