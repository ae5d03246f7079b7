"""Planning and submitting a run of 10^6 blocks: client time, client memory, scheduler window.

A simulated input (a Zarr array of (1000, 16384, 16384) uint8 with its metadata only: 2.7e11
voxels, 1,024,000 blocks of 1x512x512) is planned with a tiny model exactly as `unet-volume
predict` plans it (checks, identity with the input's fingerprint, automatic shards), its output
is created (metadata, coordinates, the done array of 10^6 blocks), and every task is submitted
through the engine's bounded window as a dry run (tasks that read, compute and write nothing),
on a LocalCluster of 2 single-threaded workers. Then the done markers of every task are written
and the output's status is read back, as a resumed run would.

Prints the seconds of each stage, tasks per second, the client's peak RSS and CPU time, and the
most tasks the scheduler held at once. Targets: under 20 s and under 500 MB for the client.

    .venv/bin/python benchmarks/plan_scale.py [--workdir DIR] [--z 1000]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import threading
import time
from pathlib import Path

import torch
import zarr

from unet_volume.cluster.client import open_client
from unet_volume.models.unet import UNet
from unet_volume.output.bookkeeping import DONE
from unet_volume.output.lifecycle import read_status
from unet_volume.output.prediction import PredictionStore
from unet_volume.prediction.engine import PredictionWork, run_prediction
from unet_volume.prediction.options import PredictOptions
from unet_volume.prediction.plan import plan_prediction
from unet_volume.prediction.run import create_planned_output
from unet_volume.prediction.tasks import TaskPlan

WORKERS = 2


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class SchedulerTasks:
    """Samples how many tasks the scheduler holds, twice a second, in a thread."""

    def __init__(self, client) -> None:  # type: ignore[no-untyped-def]
        self.client, self.most, self.stop = client, 0, threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self.stop.wait(0.5):
            held = self.client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks))
            self.most = max(self.most, held)

    def __enter__(self) -> SchedulerTasks:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, help="where input and output go (default: tmp)")
    parser.add_argument("--z", type=int, default=1000, help="slices of 16384^2 (1000: 10^6 blocks)")
    args = parser.parse_args()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="plan-scale-"))
    image, output = root / "in.zarr", root / "out.zarr"
    shape = (args.z, 16384, 16384)
    zarr.create_array(image, shape=shape, chunks=(1, 512, 512), dtype="uint8", overwrite=True)
    torch.manual_seed(0)
    model = UNet(in_channels=1, base_channels=2, depth=4, ndim=2)
    with open_client(n_workers=WORKERS, dashboard=False) as client:
        client_cpu = time.process_time()
        start = time.perf_counter()
        options = PredictOptions(block_shape=(1, 512, 512), overwrite=True)
        plan = plan_prediction(model, image, output, options)
        planned = time.perf_counter()
        create_planned_output(plan)
        created = time.perf_counter()
        store = PredictionStore(plan.output_url, "uint8", plan.layout)
        tasks = TaskPlan(plan.layout, plan.shard_shape)  # a shard a task, as it measured first
        work = PredictionWork(plan.volume, plan.geometry, tasks, store)
        with SchedulerTasks(client) as held:
            report = run_prediction(client, work, lambda tile: tile, dry_run=True)
        submitted = time.perf_counter()
        client_cpu = time.process_time() - client_cpu
        done = zarr.open_array(output / DONE, mode="r+")
        done[...] = 1  # every task's marker, as a finished run leaves them
        status = read_status(plan.output_url)
        statused = time.perf_counter()
    layout = plan.layout
    print(
        f"{layout.num_blocks:,} blocks of {plan.block_shape} over {shape} in "
        f"{layout.num_shards:,} tasks (shards of {plan.shard_shape})"
    )
    print(
        f"plan {planned - start:.1f} s, create output {created - planned:.1f} s, submit and "
        f"track every task (dry run) {submitted - created:.1f} s "
        f"({layout.num_shards / (submitted - created):.0f} tasks/s): "
        f"total {submitted - start:.1f} s (target < 20 s); client CPU {client_cpu:.1f} s"
    )
    print(
        f"client peak RSS {peak_rss_mb():.0f} MB (target < 500 MB); scheduler held at most "
        f"{held.most} tasks at once (window {4 * WORKERS}, plus the predictor)"
    )
    print(
        f"status of the finished output: {status.done:,} of {status.total:,} blocks done, "
        f"read in {statused - submitted:.1f} s (markers written and listed); blocks reported "
        f"{report.blocks:,}"
    )


if __name__ == "__main__":
    main()
