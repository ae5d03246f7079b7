"""What the engine costs around the network: blocks/s with a predictor that costs nothing.

The crop probe (``unet_volume.testing.CropPredictor``: the tile's centre, as one class) stands in
for the network, so everything measured is the engine: planning, Dask tasks, reading the input,
the work around the predictor (tiles, encoding), writing the output and its records. On a
LocalCluster of 2 single-threaded worker processes, uint8 input and output:

(a) 1x64x64 blocks over (25, 512, 512): 1,600 tiny blocks (target: at least 400 blocks/s);
(b) the default 1x512x512 block over (1024, 512, 512): 1,024 blocks (target: at least 40 Mvoxel/s
    per worker). A run of about 3 s: over 512 slices (1.7 s) the figure moved by 10% between runs.

Each case runs twice (each --repeats times, the median run shown): one task per block
(unsharded), then one task per automatic shard of
blocks (:func:`unet_volume.grid.auto_shard_shape`; one object per shard and array). Prints
blocks/s, Mvoxel/s per worker, and read / predict / write milliseconds per block.

(c) Where the "predict" stage of one 1x512x512 block goes around a near-free net (1 base
channel, depth 1) on one torch thread: the network, its soft-max, and the encoding into what is
stored (segmentation and uint8 / float16 / float32 probabilities) done by numpy after the
probabilities came back as float32 (before) and by torch where the network ran (after:
``ModelPredictor.predict_encoded``), each the median of 20 calls.

    .venv/bin/python benchmarks/engine_overhead.py [--workdir DIR]
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from unet_volume.cluster.client import open_client
from unet_volume.grid import OutputLayout, auto_shard_shape
from unet_volume.io.volumes import open_volume
from unet_volume.models.checkpoint import checkpoint_bytes
from unet_volume.models.unet import UNet
from unet_volume.output.prediction import create_prediction, encode_probabilities, segment
from unet_volume.prediction.engine import PredictionWork, run_prediction
from unet_volume.prediction.model_predictor import ModelPredictor
from unet_volume.prediction.tasks import TaskPlan
from unet_volume.testing import CropPredictor
from unet_volume.tiling import TileGeometry, count_blocks

WORKERS = 2
CASES = [
    ("(a) 1x64x64 blocks", (25, 512, 512), (1, 64, 64)),
    ("(b) 1x512x512 blocks", (1024, 512, 512), (1, 512, 512)),
]


def measure(client, root: Path, shape, block, *, sharded: bool) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """One run of the engine over a fresh output; its figures."""
    url = str(root / f"in-{shape[0]}.zarr")
    if not Path(url).exists():
        data = np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)
        zarr.create_array(url, shape=shape, chunks=(1, 512, 512), dtype="uint8")[...] = data
    volume = open_volume(url)
    geometry = TileGeometry.for_unet(2, 4, min_output=block)
    out = str(root / f"out-{block[1]}.zarr")
    shard = auto_shard_shape(shape, block, ndim=2) if sharded else block
    layout = OutputLayout(shape, block, shard)
    store = create_prediction(
        out, volume=volume, num_classes=1, layout=layout, output_dtype="uint8", attrs={}
    )
    start = time.perf_counter()
    work = PredictionWork(volume, geometry, TaskPlan(layout, shard), store)
    report = run_prediction(client, work, CropPredictor(geometry))
    seconds = time.perf_counter() - start
    blocks = count_blocks(shape, block)
    per_block = {k: 1000 * v / blocks for k, v in report.task_seconds.items()}
    return {
        "shard": shard,
        "tasks": count_blocks(shape, shard),
        "blocks/s": blocks / seconds,
        "Mvoxel/s per worker": report.voxels / seconds / 1e6 / WORKERS,
        "seconds": seconds,
        **{f"{k} ms": v for k, v in per_block.items()},
    }


def median_ms(call: Any, repeats: int = 20) -> float:
    call()  # warm
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def predict_stage() -> list[str]:
    """Case (c): the predict stage of one 1x512x512 block, part by part, on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        geometry = TileGeometry.for_unet(2, 1, min_output=(1, 512, 512))
        net = UNet(ndim=2, depth=1, base_channels=1)
        predictor = ModelPredictor(checkpoint_bytes(net), device="cpu")
        rng = np.random.default_rng(0)
        tile = rng.integers(0, 255, (1, *geometry.input_shape), dtype=np.uint8)
        batch = torch.from_numpy(tile.astype(np.float32)[:, 0][None])
        with torch.inference_mode():
            logits = predictor.network()(batch)
            network = median_ms(lambda: predictor.network()(batch))
            softmax = median_ms(lambda: torch.softmax(logits, dim=1))
        lines = [
            f"(c) predict stage of a 1x512x512 block ({'x'.join(map(str, geometry.input_shape))}"
            f" tile), depth-1 base-1 net, 1 thread: network {network:.1f} ms, soft-max "
            f"{softmax:.1f} ms"
        ]
        for dtype in ("uint8", "float16", "float32"):

            def before(dtype: str = dtype) -> None:
                probs = predictor(tile)
                segment(probs)
                encode_probabilities(probs, dtype)

            after = median_ms(lambda dtype=dtype: predictor.predict_encoded([tile], dtype, None))
            whole = median_ms(before)
            lines.append(
                f"    {dtype:7s}: whole stage {whole:.1f} ms before (numpy encodes), "
                f"{after:.1f} ms after (torch encodes where the net ran); around the network "
                f"{whole - network:.1f} -> {after - network:.1f} ms"
            )
        return lines
    finally:
        torch.set_num_threads(threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, help="where inputs and outputs go (default: tmp)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per case; the median shown")
    args = parser.parse_args()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="engine-overhead-"))
    root.mkdir(parents=True, exist_ok=True)
    with open_client(n_workers=WORKERS, dashboard=False) as client:
        measure(client, root, (2, 512, 512), (1, 64, 64), sharded=False)
        for (name, shape, block), sharded in itertools.product(CASES, (False, True)):
            runs = [
                measure(client, root, shape, block, sharded=sharded) for _ in range(args.repeats)
            ]
            f = sorted(runs, key=lambda run: run["seconds"])[len(runs) // 2]
            layout = "x".join(map(str, f["shard"]))
            print(
                f"{name} over {shape}, shards {layout} ({f['tasks']} tasks): "
                f"{f['blocks/s']:.0f} blocks/s, "
                f"{f['Mvoxel/s per worker']:.1f} Mvoxel/s per worker ({f['seconds']:.1f} s); "
                f"per block: read {f['read ms']:.1f} ms, predict {f['predict ms']:.1f} ms, "
                f"write {f['write ms']:.1f} ms"
            )

    for line in predict_stage():
        print(line, flush=True)


if __name__ == "__main__":
    main()
