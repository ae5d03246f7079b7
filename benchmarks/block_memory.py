"""How close the planner's block memory estimate comes to a block task's measured peak.

Each case runs one block task in a fresh process (the real ``predict_task``: read, predict tile
by tile, write, mark done, with the model already loaded as in a worker; or a weight-map block)
and reads its peak resident memory (``ru_maxrss``) above the process's peak before the task.
Prints the estimate of :mod:`unet_volume.prediction.memory` beside it; the planner refuses blocks
whose estimate exceeds the workers' memory limit, so an estimate far below the peak would let
workers die, and one far above would refuse blocks that fit.

    .venv/bin/python benchmarks/block_memory.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

CASES = [
    # kind, ndim, depth, base channels, block (z, y, x), tile (z, y, x) or None
    ("predict", 2, 4, 64, (1, 512, 512), None),
    ("predict", 2, 4, 64, (1, 1024, 1024), (1, 512, 512)),
    ("predict", 2, 2, 8, (1, 1024, 1024), None),
    ("predict", 2, 4, 16, (1, 2048, 2048), None),
    ("predict", 3, 3, 16, (64, 64, 64), None),
    ("weights", 2, 0, 0, (1, 1024, 1024), None),
    ("weights", 3, 0, 0, (64, 128, 128), None),
]


def measure(case: list, root: str) -> dict[str, object]:
    """One block of ``case`` in this (fresh) process: its estimate and its measured peak."""
    import resource

    import numpy as np
    import torch

    torch.set_num_threads(1)
    kind, ndim, depth, base, block, tile = case
    rng = np.random.default_rng(0)
    if kind == "predict":
        estimate, work = _prediction_block(root, ndim, depth, base, tuple(block), tile, rng)
    else:
        estimate, work = _weight_block(ndim, tuple(block), rng)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    work()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {"estimate": estimate.total, "parts": dict(estimate.parts), "peak": peak}


def _prediction_block(root, ndim, depth, base, block, tile, rng):  # type: ignore[no-untyped-def]
    """The real task of a one-block prediction, its model loaded (once per worker)."""
    import zarr

    from unet_volume.models.checkpoint import save_model
    from unet_volume.models.unet import UNet
    from unet_volume.output.prediction import PredictionStore
    from unet_volume.prediction.estimate import task_memory
    from unet_volume.prediction.model_predictor import ModelPredictor
    from unet_volume.prediction.options import PredictOptions
    from unet_volume.prediction.plan import plan_prediction
    from unet_volume.prediction.run import create_planned_output
    from unet_volume.prediction.worker import predict_task

    image = zarr.create_array(f"{root}/in.zarr", shape=block, chunks=block, dtype="uint8")
    image[...] = rng.integers(0, 255, block, dtype="uint8")
    model = save_model(UNet(base_channels=base, depth=depth, ndim=ndim), f"{root}/m.pt")
    options = PredictOptions(block_shape=block, tile_shape=tile)
    plan = plan_prediction(model, f"{root}/in.zarr", f"{root}/out.zarr", options)
    create_planned_output(plan)
    estimate = task_memory(plan, on_gpu=False)
    predictor = ModelPredictor(plan.checkpoint)
    predictor.network()
    first = next(iter(plan.tasks.tasks()))
    store = PredictionStore(plan.output_url, plan.output_dtype, plan.layout, plan.threshold)
    return estimate, lambda: predict_task(
        first,
        volume=plan.volume,
        store=store,
        predictor=predictor,
        geometry=plan.geometry,
        shard_shape=plan.layout.shard_shape,
    )


def _weight_block(ndim, block, rng):  # type: ignore[no-untyped-def]
    """The weight map of a block's read box of touching cells (what a weight task computes)."""
    import numpy as np
    from scipy import ndimage

    from unet_volume.geometry import Box
    from unet_volume.prediction.memory import weight_memory
    from unet_volume.training.weight_map import WeightMapConfig, halo_for, weight_map

    config = WeightMapConfig(ndim=ndim)
    read = Box.from_shape(block).grow(halo_for(config)).shape
    labels = np.zeros(read, np.uint32)
    cells = int(np.prod(read)) // 300
    labels[tuple(rng.integers(0, s, cells) for s in read)] = np.arange(1, cells + 1)
    labels = ndimage.grey_dilation(labels, size=(1, 9, 9) if ndim == 2 else (5, 5, 5))
    return weight_memory(read), lambda: weight_map(labels, config)


def main() -> None:
    print(f"{'case':<52} {'estimate':>10} {'measured':>10} {'ratio':>6}")
    for case in CASES:
        kind, ndim, depth, base, block, tile = case
        with tempfile.TemporaryDirectory() as root:
            result = subprocess.run(
                [sys.executable, __file__, "--one", json.dumps(case), root],
                capture_output=True,
                text=True,
                check=False,
                cwd=Path(__file__).parents[1],
            )
        if result.returncode != 0:
            print(f"{case}: failed\n{result.stderr[-2000:]}")
            continue
        found = json.loads(result.stdout.strip().splitlines()[-1])
        name = f"{kind} {ndim}D" + (f" d{depth} b{base}" if kind == "predict" else "")
        name += f" block {'x'.join(map(str, block))}"
        name += f" tile {'x'.join(map(str, tile))}" if tile else ""
        ratio = found["estimate"] / max(found["peak"], 1)
        print(
            f"{name:<52} {found['estimate'] / 2**20:>8.0f}Mi {found['peak'] / 2**20:>8.0f}Mi "
            f"{ratio:>6.2f}"
        )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--one"]:
        print(json.dumps(measure(json.loads(sys.argv[2]), sys.argv[3])))
    else:
        main()
