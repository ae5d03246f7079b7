"""The engine on a GPU against the bare model: Mvoxel/s, engine / bare, ms per slice, GPU use.

For the paper's net (base 64, depth 4) and base 16, at float32 and bfloat16:

- the bare model: forward passes of batches of 700x700 tiles (516x516 outputs, 512x512 counted
  as a block's share), on the GPU, input already there; the best batch's Mvoxel/s and the ms
  per 512x512 slice (the paper: under 1 s per slice in 2015; target here: under 5 ms);
- the engine: `predict_volume` over a uint8 volume of --gigabytes (default 4) on disk (written
  first, compressed), one GPU worker (GPU=1, 8 threads: tasks share the GPU 4 at a time),
  blocks of 4x1024x1024, automatic shards and tiles per pass, uint8 output; Mvoxel/s, the
  ratio engine / bare (target at least 0.8) and the GPU's utilisation sampled by nvidia-smi.

Meant for a lent GPU machine, in well under 10 minutes:

    python benchmarks/gpu_throughput.py [--gigabytes 4] [--workdir DIR]

``--smoke`` runs the same code on a CPU with a tiny net and volume (the test suite runs it, so
the script cannot rot before a GPU is lent).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import dask.array as da
import numpy as np
import torch
from dask.distributed import Client, LocalCluster

from unet_volume.models.checkpoint import checkpoint_bytes
from unet_volume.models.unet import UNet
from unet_volume.prediction.model_predictor import ModelPredictor
from unet_volume.prediction.run import predict_volume

NETS = {"paper (base 64)": 64, "base 16": 16}
PRECISIONS = ("float32", "bfloat16")
SLICE = 512 * 512
"""Voxels a 700x700 tile contributes to a block of 512x512 slices (its output is 516x516)."""


def bare_model(
    net: UNet, precision: str, device: str, batches: list[int], tile: int = 700
) -> dict[str, float]:
    """Mvoxel/s (512x512 per slice) at the best batch, and ms per slice there."""
    predictor = ModelPredictor(checkpoint_bytes(net), device=device, precision=precision)  # type: ignore[arg-type]
    model = predictor.network()
    best = {"mvoxel_s": 0.0, "ms_per_slice": float("inf"), "batch": 0}
    for batch in batches:
        x = torch.rand(batch, 1, tile, tile, device=device).contiguous(
            memory_format=torch.channels_last
        )
        try:
            seconds = _timed(lambda x=x: _forward(model, x, predictor), device)
        except torch.OutOfMemoryError:
            break
        rate = batch * SLICE / seconds / 1e6
        if rate > best["mvoxel_s"]:
            best = {"mvoxel_s": rate, "ms_per_slice": 1000 * seconds / batch, "batch": batch}
    return best


def _forward(model: UNet, x: torch.Tensor, predictor: ModelPredictor) -> None:
    with torch.inference_mode(), predictor.autocast():
        torch.softmax(model(x), dim=1)


def _timed(run, device: str, repeats: int = 5) -> float:  # type: ignore[no-untyped-def]
    run()  # warm-up: cudnn.benchmark picks its kernels
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    _sync(device)
    return (time.perf_counter() - start) / repeats


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def write_volume(path: Path, shape: tuple[int, int, int]) -> str:
    """A compressible EM-like uint8 volume: smooth blobs and noise, chunks of 1x1024x1024."""
    if path.exists():
        return str(path)
    rng = da.random.default_rng(0)
    noise = rng.integers(0, 40, shape, chunks=(1, 1024, 1024), dtype=np.uint8)
    y = da.arange(shape[1], chunks=1024)[None, :, None]
    x = da.arange(shape[2], chunks=1024)[None, None, :]
    blobs = (100 + 60 * da.sin(y / 37.0) * da.cos(x / 23.0)).astype(np.uint8)
    (noise + blobs).to_zarr(str(path), zarr_format=3, compute=True)
    return str(path)


class Utilisation:
    """GPU utilisation (%) sampled by nvidia-smi twice a second while the engine runs."""

    def __init__(self) -> None:
        self.samples: list[int] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        smi = shutil.which("nvidia-smi")
        while smi and not self.stop.wait(0.5):
            query = [smi, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
            out = subprocess.run(query, capture_output=True, text=True, check=False).stdout
            if out.strip():
                self.samples.append(int(out.split()[0]))

    def __enter__(self) -> Utilisation:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join()

    def mean(self) -> float | None:
        return float(np.mean(self.samples)) if self.samples else None


def engine(client: Client, net: UNet, image: str, out: Path, precision: str, block) -> dict:  # type: ignore[no-untyped-def]
    with Utilisation() as gpu:
        report = predict_volume(
            net,
            image,
            out,
            client=client,
            block_shape=block,
            precision=precision,
            overwrite=True,
        )
    return {
        "mvoxel_s": report.voxels_per_second / 1e6,
        "seconds": report.seconds,
        "gpu": gpu.mean(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gigabytes", type=float, default=4.0, help="engine volume size")
    parser.add_argument("--workdir", type=Path, help="where the volume goes (default: tmp)")
    parser.add_argument("--smoke", action="store_true", help="tiny run on CPU (for the tests)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if device == "cpu" and not args.smoke:
        raise SystemExit("no CUDA device: run on a GPU machine, or pass --smoke")
    root = args.workdir or Path(tempfile.mkdtemp(prefix="gpu-throughput-"))
    side = 1024 if not args.smoke else 128
    depth = max(1, int(args.gigabytes * 1e9 // (side * side * 8)) * 8) if not args.smoke else 2
    shape = (depth, 8 * side, 8 * side) if not args.smoke else (2, side, side)
    image = write_volume(root / f"volume-{depth}.zarr", shape)
    block = (4, 1024, 1024) if not args.smoke else (1, 64, 64)
    nets = NETS if not args.smoke else {"smoke (base 2)": 2}
    batches = [1, 2, 4, 8, 16, 32] if not args.smoke else [1, 2]
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (smoke)"
    size = np.prod(shape) / 1e9
    print(f"device: {name}; torch {torch.__version__}; volume {shape} uint8 ({size:.1f} GB)")
    resources = {"GPU": 1} if device == "cuda" else None
    cluster = LocalCluster(
        n_workers=1,
        threads_per_worker=8 if device == "cuda" else 2,
        resources=resources,
        host="127.0.0.1",
        dashboard_address=None,
    )
    with cluster, Client(cluster) as client:
        for label, base in nets.items():
            torch.manual_seed(0)
            net = UNet(in_channels=1, base_channels=base, depth=4, ndim=2).eval()
            for precision in PRECISIONS:
                bare = bare_model(net, precision, device, batches, 700 if not args.smoke else 188)
                run = engine(client, net, image, root / "out.zarr", precision, block)
                gpu = f"{run['gpu']:.0f}%" if run["gpu"] is not None else "n/a"
                print(
                    f"{label}, {precision}: bare {bare['mvoxel_s']:.0f} Mvoxel/s (batch "
                    f"{bare['batch']}, {bare['ms_per_slice']:.2f} ms per 512x512 slice); engine "
                    f"{run['mvoxel_s']:.0f} Mvoxel/s ({run['seconds']:.1f} s); engine / bare "
                    f"{run['mvoxel_s'] / bare['mvoxel_s']:.2f}; GPU utilisation {gpu}"
                )


if __name__ == "__main__":
    main()
