"""The overlap-tile engine's driver: one Dask task per box of shards, any predictor.

:func:`run_prediction` submits the tasks of a plan (what each does on its worker is
:mod:`unet_volume.prediction.worker`) through a bounded window, hands every task the predictor
once, tallies the results as they come (blocks done, timings, chunks read, failures, store
faults) and reports the run. :mod:`unet_volume.prediction.run` plans a run into an output and
resumes it.
"""

from __future__ import annotations

import time
import uuid
import warnings
from collections import Counter
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar, cast

from distributed import Client
from tqdm.auto import tqdm

from unet_volume.cluster.client import gpu_resources
from unet_volume.cluster.task_window import STALL_AFTER, map_bounded
from unet_volume.errors import BlockError
from unet_volume.geometry import Shape
from unet_volume.grid import OutputLayout
from unet_volume.io.retries import counted, faults_since
from unet_volume.io.volumes import Volume
from unet_volume.output.prediction import PredictionStore
from unet_volume.prediction.tasks import Task, TaskPlan, shards_of, stored_chunks
from unet_volume.prediction.worker import Predictor, dry_task, predict_task
from unet_volume.progress import Progress, ProgressSink
from unet_volume.tiling import Region, TileGeometry, block_key

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RunReport:
    """What a run did: counts and timing, recorded in the output's attributes too."""

    output_url: str
    blocks: int
    voxels: int
    seconds: float
    task_seconds: dict[str, float] = field(default_factory=dict)
    """Time summed over tasks, per stage: ``read``, ``predict``, ``write``."""
    skipped: int = 0
    """Blocks done by an earlier run of the same prediction (resumed), not redone."""
    pyramid_seconds: float = 0.0
    """Time to build the output's lower-resolution levels (:mod:`unet_volume.output.pyramid`)."""
    tasks: int = 0
    """Dask tasks run (each a box of shards, see :mod:`unet_volume.prediction.tasks`)."""
    chunks_read: int = 0
    """Input chunks fetched and decoded by the tasks (a chunk two tasks read counts twice)."""
    chunks_stored: int = 0
    """Chunks the input holds."""
    store_faults: dict[str, int] = field(default_factory=dict)
    """Transient store faults (throttling, dropped connections, short reads) met and retried
    by the run's workers, per kind (:mod:`unet_volume.io.retries`)."""
    complete_before: bool = False
    """The output was complete already: nothing ran (no cluster was started for it)."""

    @property
    def read_amplification(self) -> float:
        """Input chunks fetched per chunk stored: 1.0 reads the input exactly once (a resumed
        or partial run reads less)."""
        return self.chunks_read / self.chunks_stored if self.chunks_stored else 0.0

    @property
    def voxels_per_second(self) -> float:
        return self.voxels / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "voxels_per_second": self.voxels_per_second,
            "read_amplification": round(self.read_amplification, 4),
        }


def _itself(value: T) -> T:
    return value


def shared_predictor(client: Client, predictor: Predictor) -> Any:
    """The predictor as one task's result, which every task depends on.

    Not ``client.scatter``: scattered data is lost for good when every worker holding it
    dies, and then every remaining block fails. A task's result is recomputed from its spec
    (the predictor's bytes, kept by the scheduler), so workers that die and come back, or
    workers that join late, get it again.
    """
    with warnings.catch_warnings():
        # Dask warns of a graph over 10 MB (a network of 2.5 M parameters) and advises a task
        # or scatter instead: this is that one task, which every task reuses.
        warnings.filterwarnings("ignore", "Sending large graph", UserWarning)
        key = f"predictor-{uuid.uuid4().hex[:8]}"
        return client.submit(_itself, predictor, key=key, pure=False)


@dataclass(frozen=True)
class PredictionWork:
    """What a run computes: ``volume`` through tiles of ``geometry``, in the tasks of ``tasks``
    (its layout: blocks in shards, see :mod:`unet_volume.grid`; its tasks: boxes of whole
    shards, see :mod:`unet_volume.prediction.tasks`), into ``store``."""

    volume: Volume
    geometry: TileGeometry
    tasks: TaskPlan
    store: PredictionStore


@dataclass(frozen=True)
class RunLimits:
    """When a run stops: after ``max_failures`` failed shards, or ``stall_after`` seconds in
    which no task finished; ``max_in_flight`` tasks at most at once (default: 4 per worker
    thread)."""

    max_failures: int = 0
    stall_after: float = STALL_AFTER
    max_in_flight: int | None = None


def run_prediction(
    client: Client,
    work: PredictionWork,
    predictor: Predictor,
    *,
    skip: Collection[Shape] = (),
    limits: RunLimits = RunLimits(),
    progress: bool = False,
    dry_run: bool = False,
    on_progress: ProgressSink | None = None,
) -> RunReport:
    """Submit one task per box of shards with a shard not in ``skip`` (shard indices, as the
    done markers record them), a bounded window of them at once.

    A bounded window (``limits.max_in_flight``) keeps a 10^6-block volume from
    flooding the scheduler; the predictor reaches workers once, as
    :func:`shared_predictor`. When workers advertise a ``GPU`` resource, tasks run only
    there, a few per GPU at once (see
    :func:`~unet_volume.cluster.client.gpu_resources`). Up to ``limits.max_failures``
    shards may fail while the others carry on; then :class:`BlockError` (its ``failures``
    hold the shards) is raised; a run in which no task finishes for ``limits.stall_after``
    seconds stops with :class:`~unet_volume.errors.StallError`.
    ``dry_run`` submits tasks that read, compute and write nothing
    (:func:`~unet_volume.prediction.worker.dry_task`).
    ``on_progress`` hears of every finished task (see :mod:`unet_volume.progress`).
    """
    start = time.perf_counter()
    volume, geometry, store, layout = work.volume, work.geometry, work.store, work.tasks.layout
    max_failures = limits.max_failures
    skipped = set(map(tuple, skip))
    skipped_blocks = sum(layout.blocks_in_shard(index) for index in skipped)
    total = layout.num_blocks - skipped_blocks
    shared = shared_predictor(client, predictor)
    topic = f"predict-beats-{uuid.uuid4().hex[:8]}"  # each shard done: the run is alive
    results = map_bounded(
        client,
        dry_task if dry_run else predict_task,
        work.tasks.tasks(skipped),
        name=task_key,
        window=limits.max_in_flight,
        resources=gpu_resources(client),
        max_failures=max_failures,
        stall_after=limits.stall_after,
        volume=volume,
        store=store,
        predictor=shared,
        geometry=geometry,
        shard_shape=layout.shard_shape,
        max_shard_failures=max_failures,
        beats=topic,
        beat_topic=topic,
    )
    tally = _Tally(layout, total, start, on_progress)
    faults_before = _store_faults(client)
    try:
        with tqdm(total=total, unit="block", disable=not progress, desc="predict") as bar:
            for result in results:
                bar.update(tally.add(result))
                if len(tally.failures) > max_failures:
                    break
    except BlockError as error:  # whole tasks failed (a worker killed, a bug)
        tally.failures += [
            (shard, cause)
            for task, cause in error.failures
            for shard in shards_of(cast(Task, task), layout.shard_shape, geometry)
        ]
    finally:
        results.close()  # cancels what is still in flight
    if tally.failures:
        raise BlockError(tally.failures, names=[shard_name(b) for b, _ in tally.failures])
    seconds = time.perf_counter() - start
    return RunReport(
        store.url,
        total,
        tally.voxels,
        seconds,
        dict(tally.stages),
        skipped=skipped_blocks,
        tasks=tally.tasks,
        chunks_read=tally.chunks_read,
        chunks_stored=stored_chunks(volume),
        store_faults=_faults_since(faults_before, _store_faults(client)),
    )


def _store_faults(client: Client) -> dict[str, dict[str, int]]:
    """Each worker's store fault counts; a worker lost meanwhile (a cancelled job) is left out:
    the figure is a lower bound, and reading it never fails the run."""
    faults: dict[str, dict[str, int]] = client.run(counted, on_error="ignore")
    return faults


def _faults_since(
    before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]
) -> dict[str, int]:
    """The store faults each worker met between two readings, summed (a worker started since
    counts from zero)."""
    total: Counter[str] = Counter()
    for worker, counts in after.items():
        total.update(faults_since(before.get(worker, {}), counts))
    return dict(sorted(total.items()))


@dataclass
class _Tally:
    """The results of a run's tasks as they come: counts, timings, failures, progress."""

    layout: OutputLayout
    total: int
    start: float
    on_progress: ProgressSink | None
    voxels: int = 0
    done: int = 0
    tasks: int = 0
    chunks_read: int = 0
    stages: Counter[str] = field(default_factory=Counter)
    failures: list[tuple[Region, BaseException]] = field(default_factory=list)

    def add(self, result: dict[str, Any]) -> int:
        """Count one task's result; the blocks it finished."""
        self.tasks += 1
        self.voxels += result["voxels"]
        self.stages.update(result["seconds"])
        self.chunks_read += result["read"]["chunks"]
        self.failures += result["failures"]
        blocks = sum(self.layout.blocks_in_shard(index) for index in result["done"])
        self.done += blocks
        if self.on_progress is not None:
            elapsed = time.perf_counter() - self.start
            self.on_progress(
                Progress.of_blocks("predict", self.done, self.total, self.voxels, elapsed)
            )
        return blocks


def task_key(task: Task) -> str:
    """A task's Dask name: ``predict-task-`` and its index in the task grid."""
    return "predict-task-" + "-".join(map(str, task.index))


shard_name = block_key("predict-shard")
"""A shard's name in errors and records: ``predict-shard-`` and its shard index."""
