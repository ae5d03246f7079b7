"""SLURM against a LocalCluster: time to the first block, blocks per second, a pre-emption.

Needs a running SLURM (`sudo scripts/slurm-local.sh start`). A (32, 256, 256) uint8 volume in
1x64x64 blocks (512 blocks), the default training net (base 16, depth 4), `python -m
unet_volume predict` in a subprocess, on

(a) a LocalCluster of 2 single-threaded workers (`--workers 2`);
(b) 2 SLURM jobs of one single-threaded worker each (`--cluster slurm-cpu`);
(c) the same as (b), one job cancelled (`scancel`) once half the blocks are done.

Prints, for each: seconds from the command's start to the first block done, blocks per second
from the first block to the last, and the total; for (c) also whether its output equals (b)'s.

    .venv/bin/python benchmarks/slurm.py [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr

from unet_volume.models.checkpoint import save_model
from unet_volume.models.unet import UNet
from unet_volume.output.bookkeeping import DONE, done_blocks
from unet_volume.testing import blob_volume, write_zarr

SHAPE, BLOCK, BLOCKS = (32, 256, 256), "1,64,64", 512
CLUSTERS = Path(__file__).parents[1] / "deploy" / "clusters"


def run(args: list[str], output: Path, cwd: Path, cancel_at: int | None = None) -> dict:
    """Run ``unet-volume ARGS``; time the first block, the last, and the whole command."""
    env = {**os.environ, "UNET_VOLUME_CLUSTERS": str(CLUSTERS)}
    start = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-m", "unet_volume", *args], cwd=cwd, env=env, stderr=subprocess.PIPE
    )
    first = cancelled = None
    while process.poll() is None:
        done = len(done_blocks(str(output))) if (output / DONE).exists() else 0
        if done and first is None:
            first = time.monotonic() - start
        if cancel_at is not None and cancelled is None and done >= cancel_at:
            job = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True)
            subprocess.run(["scancel", job.stdout.split()[0]], check=True)
            cancelled = done
        time.sleep(0.05)
    total = time.monotonic() - start
    _, stderr = process.communicate()
    if process.returncode != 0:
        raise SystemExit(f"{args} failed: {stderr.decode()[-2000:]}")
    return {"first": first or total, "total": total, "rate": BLOCKS / (total - (first or 0))}


def arrays(output: Path) -> list[np.ndarray]:
    return [zarr.open_array(output / name)[...] for name in ("probabilities", "segmentation")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, help="where inputs and outputs go (default: tmp)")
    args = parser.parse_args()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="slurm-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = save_model(UNet(base_channels=16, depth=4), root / "model.pt")
    image = write_zarr(root / "in.zarr", blob_volume(SHAPE), chunks=(1, 64, 64))

    def predict(name: str, *where: str) -> list[str]:
        return [
            "predict", image, str(root / name), "--model", str(model), "--block-shape", BLOCK,
            "--no-progress", "--output-dtype", "float32", *where,
        ]  # fmt: skip

    figures = {
        "(a) LocalCluster, 2 workers": run(
            predict("local.zarr", "--workers", "2"), root / "local.zarr", root
        ),
        "(b) SLURM, 2 jobs": run(
            predict("slurm.zarr", "--cluster", "slurm-cpu"), root / "slurm.zarr", root
        ),
        "(c) SLURM, 1 of 2 jobs cancelled at 50%": run(
            predict("preempted.zarr", "--cluster", "slurm-cpu"),
            root / "preempted.zarr",
            root,
            cancel_at=BLOCKS // 2,
        ),
    }
    print(f"{BLOCKS} blocks of {BLOCK} over {SHAPE}, base-16 depth-4 net, float32 output")
    for name, f in figures.items():
        print(
            f"{name:<42} first block {f['first']:5.1f} s, {f['rate']:5.1f} blocks/s after it, "
            f"total {f['total']:5.1f} s"
        )
    same = all(
        np.array_equal(a, b)
        for a, b in zip(arrays(root / "preempted.zarr"), arrays(root / "slurm.zarr"))
    )
    local_same = all(
        np.array_equal(a, b)
        for a, b in zip(arrays(root / "local.zarr"), arrays(root / "slurm.zarr"))
    )
    print(f"(c) equals (b) bit for bit: {same}; (b) equals (a): {local_same}")


if __name__ == "__main__":
    main()
