"""What does a killed run cost? Kill `unet-volume predict` half way, run it again, compare.

A (32, 256, 256) uint8 volume in 1x64x64 blocks (512 blocks), the default training net
(base 16, depth 4), `python -m unet_volume predict --workers 2` in a subprocess:

(a) an undisturbed run, timed;
(b) the same command killed with SIGKILL (its whole process group: driver, LocalCluster,
    workers) once about half the blocks are done, then run again until it completes.

Prints the blocks done at the kill, the blocks computed twice (their data was written but
not yet marked done: at most the in-flight window), the time of (b) against (a) plus one
restart (a 1-block run: interpreter and checks, cluster start, model load), and whether
(b)'s output is bit-identical to (a)'s.

    .venv/bin/python benchmarks/resume.py [--workdir DIR] [--kill-at 0.5]
"""

from __future__ import annotations

import argparse
import os
import signal
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

SHAPE, BLOCK, WORKERS = (32, 256, 256), "1,64,64", 2
BLOCKS = 32 * 4 * 4
WINDOW = 4 * WORKERS  # map_bounded's default: 4 tasks per worker thread


def command(image: str, output: Path, model: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "unet_volume",
        "predict",
        image,
        str(output),
        "--model",
        str(model),
        "--block-shape",
        BLOCK,
        "--workers",
        str(WORKERS),
        "--no-progress",
    ]


def timed_run(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def killed_run(args: list[str], output: Path, kill_at: int) -> tuple[float, set, set]:
    """Run ``args`` until ``kill_at`` blocks are done, then SIGKILL its process group."""
    start = time.perf_counter()
    driver = subprocess.Popen(
        args, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    while not (output / DONE).exists() or len(done_blocks(str(output))) < kill_at:
        if driver.poll() is not None:
            raise SystemExit("the run finished before it could be killed; lower --kill-at")
        time.sleep(0.02)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    seconds = time.perf_counter() - start
    done = done_blocks(str(output))
    chunks = output / "probabilities" / "c"
    keys = [p.relative_to(chunks).parts[1:] for p in chunks.rglob("*") if p.is_file()]
    written = {tuple(map(int, key)) for key in keys if all(part.isdigit() for part in key)}
    return seconds, done, written - done


def same_output(a: Path, b: Path) -> bool:
    return all(
        np.array_equal(zarr.open_array(a / name)[...], zarr.open_array(b / name)[...])
        for name in ("probabilities", "segmentation")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--kill-at", type=float, default=0.5, help="fraction of blocks done")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="resume-"))
    workdir.mkdir(parents=True, exist_ok=True)
    # Blobs over a ramp, tiled: blob_volume draws one ball per 400 voxels (slow at this size).
    data = np.tile(blob_volume((8, 64, 64)), (4, 4, 4))
    image = write_zarr(workdir / "in.zarr", data, chunks=(1, 256, 256))
    torch.manual_seed(0)
    model = save_model(UNet(base_channels=16, depth=4, dropout=0.0), workdir / "model.pt")
    undisturbed, resumed = workdir / "undisturbed.zarr", workdir / "resumed.zarr"
    a = timed_run(command(image, undisturbed, model))
    # What starting again costs: interpreter, checks, cluster start, model load, one block.
    one = write_zarr(workdir / "one.zarr", data[:1, :64, :64])
    restart = timed_run(command(one, workdir / "one-out.zarr", model))
    first, done, twice = killed_run(
        command(image, resumed, model), resumed, round(args.kill_at * BLOCKS)
    )
    second = timed_run(command(image, resumed, model))
    b = first + second
    print(
        f"(a) undisturbed: {BLOCKS} blocks in {a:.1f} s; "
        f"a restart (a 1-block run: start-up, cluster, model load) {restart:.1f} s"
    )
    print(
        f"(b) killed after {first:.1f} s with {len(done)} of {BLOCKS} blocks done; "
        f"resumed in {second:.1f} s ({BLOCKS - len(done)} blocks): {b:.1f} s in all"
    )
    print(f"blocks computed twice: {len(twice)} (in-flight window {WINDOW})")
    print(f"b / (a + restart) = {b / (a + restart):.2f}  (target <= 1.1)")
    print(f"bit-identical to the undisturbed run: {same_output(resumed, undisturbed)}")


if __name__ == "__main__":
    main()
