"""Memory stays flat with the volume: peak RSS of the client and of each worker at 1, 4, 16 GB.

For each size, a uint8 volume of (z, 8192, 8192) is generated on disk by a process of its own
(smooth blobs and noise, compressed, chunks 1x512x512), then predicted with a tiny U-Net
(base 2, depth 2) into a uint8 output in 1x512x512 blocks with automatic shards, on a fresh
LocalCluster of 2 single-threaded workers, in a fresh driver process (peak RSS is a lifetime
figure). Prints the peaks and their spread across sizes (target: within +10%), with the run time.

    .venv/bin/python benchmarks/memory_flat.py [--sizes 1 4 16] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIDE = 8192


def write_volume(path: Path, gigabytes: float) -> tuple[int, int, int]:
    import dask.array as da
    import numpy as np

    shape = (max(1, round(gigabytes * 1e9 / SIDE**2)), SIDE, SIDE)
    if not path.exists():
        rng = da.random.default_rng(0)
        noise = rng.integers(0, 40, shape, chunks=(1, 512, 512), dtype=np.uint8)
        y = da.arange(SIDE, chunks=512)[None, :, None]
        x = da.arange(SIDE, chunks=512)[None, None, :]
        blobs = (100 + 60 * da.sin(y / 37.0) * da.cos(x / 23.0)).astype(np.uint8)
        (noise + blobs).to_zarr(str(path), zarr_format=3)
    return shape


def one_size(root: Path, gigabytes: float) -> dict[str, float]:
    """Generate, predict and measure one volume (run in its own process)."""
    import torch

    from unet_volume.cluster.client import open_client
    from unet_volume.cluster.malloc import peak_resident_mb
    from unet_volume.models.unet import UNet
    from unet_volume.prediction.run import predict_volume

    image = root / f"in-{gigabytes:g}.zarr"
    shape = write_volume(image, gigabytes)  # written beforehand, by another process
    torch.manual_seed(0)
    net = UNet(in_channels=1, base_channels=2, depth=2, ndim=2)
    with open_client(n_workers=2, dashboard=False) as client:
        start = time.perf_counter()
        report = predict_volume(
            net,
            image,
            root / f"out-{gigabytes:g}.zarr",
            client=client,
            block_shape=(1, 512, 512),
            overwrite=True,
        )
        seconds = time.perf_counter() - start
        workers = client.run(peak_resident_mb)  # not ru_maxrss: it includes the client's
    return {
        "gigabytes": gigabytes,
        "shape": list(shape),
        "seconds": seconds,
        "mvoxel_s": report.voxels_per_second / 1e6,
        "client_mb": peak_resident_mb(),
        "worker_mb": max(workers.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1, 4, 16], help="GB")
    parser.add_argument("--workdir", type=Path, help="where volumes go (default: tmp)")
    parser.add_argument("--one", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--generate", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="memory-flat-"))
    if args.generate is not None:
        write_volume(root / f"in-{args.generate:g}.zarr", args.generate)
        return
    if args.one is not None:
        print(json.dumps(one_size(root, args.one)))
        return
    rows = []
    for gigabytes in args.sizes:
        # The input is written by a process of its own: its memory is not the client's.
        here = ["--workdir", str(root)]
        subprocess.run([sys.executable, __file__, "--generate", str(gigabytes), *here], check=True)
        command = [sys.executable, __file__, "--one", str(gigabytes), *here]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(
            f"{row['gigabytes']:g} GB {tuple(row['shape'])}: {row['seconds']:.0f} s "
            f"({row['mvoxel_s']:.1f} Mvoxel/s); peak RSS client {row['client_mb']:.0f} MB, "
            f"worker {row['worker_mb']:.0f} MB",
            flush=True,
        )
    for key in ("client_mb", "worker_mb"):
        values = [row[key] for row in rows]
        print(f"{key}: largest / smallest = {max(values) / min(values):.3f} (target <= 1.10)")


if __name__ == "__main__":
    main()
