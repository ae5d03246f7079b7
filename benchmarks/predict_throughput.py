"""How much does the prediction engine cost over the bare model?

(a) the bare model: one tile of the block size (block 512 -> tile 700 -> 516 out),
    torch with 2 threads, in this process; output voxels of the block per second.
(b) predict_volume on a (16, 1024, 1024) uint8 Zarr volume with 2 single-thread
    worker processes (LocalCluster), same model (base 16, depth 4), default blocks
    (1, 512, 512); output voxels per second, cluster start excluded, model loading
    excluded by a warm-up run.

Prints both and the ratio b / a (target >= 0.8: the engine costs at most 20%; kept at >= 1.1).

The two are measured in turns, a run of (b) then five passes of (a), ``--repeats`` times, and
the medians compared: this machine's speed drifts by up to 30% over minutes, and measuring all
of (b) and then all of (a) measured the drift as much as the engine.

    .venv/bin/python benchmarks/predict_throughput.py [--repeats 5] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import zarr

from unet_volume.cluster.client import open_client
from unet_volume.models.checkpoint import checkpoint_bytes, save_model
from unet_volume.models.unet import UNet
from unet_volume.prediction.model_predictor import ModelPredictor
from unet_volume.prediction.run import predict_volume

BLOCK = (1, 512, 512)
VOLUME = (16, 1024, 1024)
METADATA = {"normalization": {"mean": 127.5, "std": 64.0}}


def bare_timer(model: UNet) -> Callable[[], float]:
    """A function timing one forward pass (normalise, net, soft-max) on one block's tile."""
    predictor = ModelPredictor(checkpoint_bytes(model, METADATA))
    geometry = model.tile_geometry(min_output=BLOCK)
    tile = np.random.default_rng(0).integers(0, 256, (1, *geometry.input_shape), dtype=np.uint8)
    predictor(tile)  # warm-up: build the net, let oneDNN pick its kernels
    print(f"(a) bare model: tile {geometry.input_shape} -> {geometry.output_shape}, 2 threads")

    def timed() -> float:
        start = time.perf_counter()
        predictor(tile)
        return time.perf_counter() - start

    return timed


def write_volume(workdir: Path) -> tuple[Path, Path]:
    """The (16, 1024, 1024) volume of random uint8, and a one-block volume for a warm-up run."""
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
    return source, warm


def measure(model: UNet, workdir: Path, repeats: int) -> tuple[list[float], list[float]]:
    """Seconds of (b) per run and of (a) per pass, measured in turns."""
    model_path = save_model(model, workdir / "model.pt", metadata=METADATA)
    source, warm = write_volume(workdir)
    engine_s, bare_s = [], []
    with open_client(n_workers=2, dashboard=False) as client:
        predict_volume(model_path, warm, workdir / "warm-out.zarr", client=client, overwrite=True)
        torch.set_num_threads(2)
        bare = bare_timer(model)
        for _ in range(repeats):
            report = predict_volume(
                model_path, source, workdir / "out.zarr", client=client, overwrite=True
            )
            engine_s.append(report.seconds)
            passes = [bare() for _ in range(5)]  # the workers are idle meanwhile
            bare_s.extend(passes)
            stages = ", ".join(f"{k} {v:.1f} s" for k, v in report.task_seconds.items())
            print(
                f"    (b) {report.seconds:.2f} s (summed over tasks: {stages}); "
                f"(a) {statistics.median(passes):.3f} s per tile"
            )
    return engine_s, bare_s


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = UNet(base_channels=16, depth=4).eval()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        engine_s, bare_s = measure(model, Path(tmp), args.repeats)
    a = int(np.prod(BLOCK)) / statistics.median(bare_s)
    b = int(np.prod(VOLUME)) / statistics.median(engine_s)
    print(f"(a) bare model      {a / 1e6:.3f} Mvoxel/s (median of {len(bare_s)} passes)")
    print(f"(b) predict_volume  {b / 1e6:.3f} Mvoxel/s (median of {len(engine_s)} runs)")
    print(f"b / a = {b / a:.2f}  (target >= 0.8; kept at >= 1.1)")


if __name__ == "__main__":
    main()
