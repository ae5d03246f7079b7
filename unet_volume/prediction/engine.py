"""The overlap-tile engine: one Dask task per shard of output blocks, any predictor.

Each task reads its own read box straight from the input store (mirrored outside the volume), runs
the predictor tile by tile with tile origins on the network's period lattice, writes its own shard
of output blocks at once and marks itself done. No voxel data goes through the scheduler or the
client; tasks return a few numbers. Because tiles of a valid-convolution U-Net placed on the period
lattice compute exactly what one whole-volume pass computes, the stitched output has no seams and
needs no blending (see :mod:`unet_volume.tiling`).

A *predictor* is any picklable callable mapping an input tile ``(c, z, y, x)`` to class scores
``(k, *geometry.output_shape)``: :class:`~unet_volume.prediction.model_predictor.ModelPredictor`
wraps a U-Net,
the tests use probes. :mod:`unet_volume.prediction.run` plans a run into an output and resumes it.
"""

from __future__ import annotations

import time
import uuid
import warnings
from collections import Counter
from collections.abc import Callable, Collection, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar, cast

import numpy as np
from distributed import Client
from tqdm.auto import tqdm

from unet_volume.border import reflect
from unet_volume.cluster.client import gpu_resources, release_free_memory
from unet_volume.cluster.task_window import STALL_AFTER, beat, map_bounded
from unet_volume.errors import BlockError, GeometryError, InputError
from unet_volume.geometry import Box, Shape
from unet_volume.grid import OutputLayout
from unet_volume.io.locations import with_retries
from unet_volume.io.retries import counted, faults_since
from unet_volume.io.volumes import Volume, VolumeReader
from unet_volume.output.prediction import (
    EncodedOutput,
    PredictionStore,
    encode_probabilities,
    segment,
)
from unet_volume.prediction.tasks import Task, TaskPlan, shards_of, stored_chunks
from unet_volume.progress import Progress, ProgressSink
from unet_volume.tiling import Region, TileGeometry, block_key, plan_tiles

T = TypeVar("T")
_FLOAT_STORE = PredictionStore("", "float64")
"""Where :func:`predict_tiles` takes its output from when given no store: float64, unencoded."""
Predictor = Callable[[np.ndarray], np.ndarray]
"""Input tile ``(c, z, y, x)`` -> probabilities ``(k, *output_shape)``."""


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


def predict_tiles(
    data: np.ndarray,
    read_box: Box,
    write_box: Box,
    *,
    predictor: Predictor,
    geometry: TileGeometry,
    output: EncodedOutput | None = None,
    store: PredictionStore | None = None,
) -> EncodedOutput:
    """The output over ``write_box`` from ``data`` (the input over ``read_box``), tile by tile.

    Pure and idempotent: tiles start on the period lattice at ``write_box.begin``; each
    tile's probabilities are cropped to the write box and encoded into ``output`` (a new one
    from ``store`` when not given) as they come, so a task never holds a shard's floats whole.
    A predictor with ``predict_many`` gets ``predictor.batch_size(tile_input_shape)`` tiles at
    once.
    """
    tiles = plan_tiles(write_box, geometry)
    target = store or _FLOAT_STORE
    sizing = getattr(predictor, "batch_size", None)
    per_pass = max(1, int(sizing(geometry.input_shape))) if sizing is not None else 1
    for first in range(0, len(tiles), per_pass):
        boxes = tiles[first : first + per_pass]
        inputs = [
            data[(slice(None), *geometry.input_box(t).to_slices(read_box.begin))] for t in boxes
        ]
        for tile_box, tile_input, (labels, probs) in zip(
            boxes, inputs, encoded_tiles(predictor, inputs, target)
        ):
            if tuple(probs.shape[1:]) != geometry.output_shape:
                raise GeometryError(
                    f"predictor returned shape {probs.shape} for a tile of {tile_input.shape}; "
                    f"expected (classes, *{geometry.output_shape})"
                )
            if output is None:
                output = target.new_output(probs.shape[0], write_box.shape)
            part = tile_box.intersect(write_box)
            inside = part.to_slices(tile_box.begin)
            output.put_encoded(
                part.to_slices(write_box.begin), labels[inside], probs[(slice(None), *inside)]
            )
    assert output is not None  # plan_tiles always yields at least one tile
    return output


def encoded_tiles(
    predictor: Predictor, inputs: list[np.ndarray], store: PredictionStore
) -> Iterable[tuple[np.ndarray, np.ndarray]]:
    """Per input tile, its segmentation and its probabilities as ``store`` keeps them.

    A predictor with ``predict_encoded`` encodes them itself, where it ran the network (on a
    GPU: there); one with ``predict_many`` takes the tiles in one pass; any other callable
    one tile at a time, its float probabilities encoded here.
    """
    encoded = getattr(predictor, "predict_encoded", None)
    if encoded is not None:
        return encoded(inputs, store.output_dtype, store.threshold)
    many = getattr(predictor, "predict_many", None)
    floats = many(inputs) if many is not None and len(inputs) > 1 else map(predictor, inputs)
    return (
        (segment(p, store.threshold), encode_probabilities(p, store.output_dtype)) for p in floats
    )


def check_finite(data: np.ndarray, block: Region, volume: Volume) -> None:
    """Refuse NaN or Inf in a block's input, naming the block and the first bad voxel.

    Checked per block, as it is read: scanning a terabyte up front would take as long as
    the run. A network fed NaN predicts NaN everywhere its receptive field reaches.
    """
    if data.dtype.kind != "f" or np.isfinite(data).all():
        return
    channel, *offset = (int(i) for i in np.argwhere(~np.isfinite(data))[0])
    # The read box reaches past the volume, mirrored: name the voxel as it is stored.
    read = (o + b for o, b in zip(offset, block.read_box.begin))
    voxel = tuple(int(reflect(np.array([r]), n)[0]) for r, n in zip(read, volume.shape))
    raise InputError(
        f"input {volume.url} holds {data[(channel, *offset)]} at voxel (z, y, x) {voxel}, "
        f"channel {channel}, read by block {block.index} {block.write_box}; replace NaN and Inf "
        "(e.g. numpy.nan_to_num), then run the same command again"
    )


def predict_shard(
    shard: Region,
    reader: VolumeReader,
    *,
    store: PredictionStore,
    predictor: Predictor,
    geometry: TileGeometry,
) -> dict[str, float]:
    """Read one shard's read box, predict, write the shard, mark it done; its timings.

    Idempotent: a shard done twice (a worker died after writing) writes the same objects.
    Transient read and write errors are retried; non-finite input fails the shard.
    """
    start = time.perf_counter()
    data = with_retries(reader.read, shard.read_box)
    check_finite(data, shard, reader.volume)
    read_s = time.perf_counter() - start
    output = predict_tiles(
        data, shard.read_box, shard.write_box, predictor=predictor, geometry=geometry, store=store
    )
    predict_s = time.perf_counter() - start - read_s
    with_retries(store.write, shard.write_box, output)
    with_retries(store.mark_done, shard.index)  # only after the data is stored
    return {
        "read": read_s,
        "predict": predict_s,
        "write": time.perf_counter() - start - read_s - predict_s,
    }


def predict_task(
    task: Task,
    *,
    volume: Volume,
    store: PredictionStore,
    predictor: Predictor,
    geometry: TileGeometry,
    shard_shape: Shape,
    max_shard_failures: int = 0,
    beat_topic: str | None = None,
) -> dict[str, Any]:
    """One Dask task: the shards of ``task`` in turn, through one reader of the input.

    Each input chunk the task's shards read is fetched once (see
    :mod:`unet_volume.prediction.tasks`). A shard that fails (bad data) is set aside with its error
    while the others go on, up to ``max_shard_failures`` of them; the result names the shards done
    and failed, the voxels written, the time per stage and what was read. Each shard done is
    a beat on ``beat_topic`` (:func:`~unet_volume.cluster.task_window.beat`): a long task is not a
    stall.
    """
    shards = shards_of(task, shard_shape, geometry)
    seconds: Counter[str] = Counter()
    done: list[Shape] = []
    failures: list[tuple[Region, BaseException]] = []
    voxels = 0
    with volume.reading(shard.read_box for shard in shards) as reader:
        for shard in shards:
            try:
                seconds.update(
                    predict_shard(
                        shard, reader, store=store, predictor=predictor, geometry=geometry
                    )
                )
            except Exception as error:
                failures.append((shard, error))
                if len(failures) > max_shard_failures:
                    break
                continue
            done.append(shard.index)
            voxels += shard.write_box.size
            beat(beat_topic, shard.index)
        count = reader.count
    release_free_memory()
    return {
        "index": task.index,
        "done": done,
        "failures": failures,
        "voxels": voxels,
        "seconds": dict(seconds),
        "read": {"chunks": count.chunks, "voxels": count.voxels},
    }


def dry_task(task: Task, *, shard_shape: Shape, geometry: TileGeometry, **_: Any) -> dict[str, Any]:
    """A task that does nothing: what planning, submitting and tracking a run cost alone."""
    shards = shards_of(task, shard_shape, geometry)
    return {
        "index": task.index,
        "done": [shard.index for shard in shards],
        "failures": [],
        "voxels": sum(shard.write_box.size for shard in shards),
        "seconds": {},
        "read": {"chunks": 0, "voxels": 0},
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
    ``dry_run`` submits tasks that read, compute and write nothing (:func:`dry_task`).
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
