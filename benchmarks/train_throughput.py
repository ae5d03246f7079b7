"""Training throughput: steps/s and output Mvoxel/s for tile sizes, batch sizes and augmentation.

A training step convolves each tile's input, halo included, but only its output is scored, so
the figure that buys quality per minute is output voxels per second, not steps. Each case runs
the library's own loop (``unet_volume.training.loop.train``: sampling from the ISBI 2012 stack,
augmentation, forward, weighted loss, backward, Adam) for ``--steps`` steps, after a warm-up
run of 2 steps that is not counted, and prints:

- input voxels per output voxel of one tile (the halo's cost);
- steps/s and output Mvoxel/s of the loop (set-up excluded: the loop's own clock);
- the same at the same tile and batch with the paper's augmentation (elastic deformation),
  where ``--augment`` names it, to show whether loading keeps up with the network.

First, the network's step alone (forward, loss, backward, Adam on random tiles) in torch's
contiguous layout and in channels-last, which the loop uses, measured in turns (this machine
drifts by minutes): median seconds per step of each.

    .venv/bin/python benchmarks/train_throughput.py [--steps 8] [--tiles 132 228 388]
        [--batches 1 4] [--augment plain paper] [--threads N]
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

from unet_volume.models.unet import UNet, channels_last
from unet_volume.training.loop import TrainConfig, train, weighted_cross_entropy

DATA = Path(__file__).parents[1] / "data" / "isbi2012"
IMAGE, LABELS = str(DATA / "train-volume.tif"), str(DATA / "train-labels.tif")


def network_step(side: int, batch: int, layout: torch.memory_format) -> Callable[[], float]:
    """A function timing one training step of the default net on random tiles of ``side``."""
    config = TrainConfig(tile_output=(1, side, side), batch_size=batch)
    model = UNet.from_config(config.unet_config(1)).to(memory_format=layout).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    tile_in = config.geometry().input_shape[-1]
    x = torch.randn(batch, 1, tile_in, tile_in).contiguous(memory_format=layout)
    y = torch.randint(0, 2, (batch, side, side))
    w = torch.ones(batch, side, side)

    def timed() -> float:
        start = time.perf_counter()
        loss = weighted_cross_entropy(model(x), y, w)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    timed()  # warm-up: oneDNN picks its kernels
    return timed


def compare_layouts(side: int, batch: int, rounds: int = 5) -> tuple[float, float]:
    """Median seconds per step, contiguous and channels-last, two steps each in turns."""
    steps = [network_step(side, batch, f) for f in (torch.contiguous_format, channels_last(2))]
    times: list[list[float]] = [[], []]
    for _ in range(rounds):
        for step, seconds in zip(steps, times, strict=True):
            seconds.extend(step() for _ in range(2))
    return statistics.median(times[0]), statistics.median(times[1])


def measure(config: TrainConfig, workdir: Path) -> tuple[float, float]:
    """Steps/s and output voxels/s of ``config``'s training loop."""
    out = workdir / "model.pt"
    train(IMAGE, LABELS, out, TrainConfig(**{**vars(config), "steps": 2}))  # warm-up
    report = train(IMAGE, LABELS, out, config)
    per_step = config.batch_size * int(np.prod(config.tile_output))
    return report.steps_per_second, report.steps_per_second * per_step


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--tiles", type=int, nargs="+", default=[132, 228, 388])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--augment", nargs="+", default=["plain", "paper"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default all)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("the network's step alone, seconds per step:")
    print("| tile out | batch | contiguous | channels-last | gain |")
    print("| --- | --- | --- | --- | --- |")
    for side in args.tiles:
        for batch in args.batches:
            plain, fast = compare_layouts(side, batch)
            print(f"| {side} | {batch} | {plain:.3f} | {fast:.3f} | {plain / fast:.2f}x |")
    print(f"\nthe training loop, {args.steps} steps each:")
    print("| tile out | tile in | in/out voxels | batch | augment | steps/s | output Mvoxel/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for side in args.tiles:
            for batch in args.batches:
                for augment in args.augment:
                    config = TrainConfig(
                        tile_output=(1, side, side),
                        batch_size=batch,
                        augment=augment,
                        steps=args.steps,
                        minutes=None,
                        checkpoint_every=10**6,
                        validate_every=10**6,
                    )
                    tile_in = config.geometry().input_shape[-1]
                    steps, voxels = measure(config, Path(tmp))
                    print(
                        f"| {side} | {tile_in} | {(tile_in / side) ** 2:.2f} | {batch} | "
                        f"{augment} | {steps:.3f} | {voxels / 1e6:.3f} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
