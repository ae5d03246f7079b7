"""The overlap-tile engine: one Dask task per shard of output blocks, any predictor.

Each task reads its own read box straight from the input store (mirrored outside the volume), runs
the predictor tile by tile with tile origins on the network's period lattice, writes its own shard
of output blocks at once and marks itself done. No voxel data goes through the scheduler or the
client; tasks return a few numbers. Because tiles of a valid-convolution U-Net placed on the period
lattice compute exactly what one whole-volume pass computes, the stitched output has no seams and
needs no blending (see :mod:`unet_volume.tiling`).

A *predictor* is any picklable callable mapping an input tile ``(c, z, y, x)`` to class scores
``(k, *geometry.output_shape)``: :class:`~unet_volume.predictor.ModelPredictor` wraps a U-Net,
the tests use probes. :mod:`unet_volume.predict` plans a run into an output and resumes it.
"""

from __future__ import annotations

import time
import uuid
import warnings
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import numpy as np
from distributed import Client
from tqdm.auto import tqdm

from unet_volume.border import reflect
from unet_volume.cluster import gpu_resources, release_free_memory
from unet_volume.errors import GeometryError, InputError
from unet_volume.geometry import Box, Shape
from unet_volume.layout import OutputLayout
from unet_volume.locations import with_retries
from unet_volume.prediction_store import EncodedOutput, PredictionStore
from unet_volume.progress import Progress, ProgressSink
from unet_volume.storage import Volume
from unet_volume.task_window import STALL_AFTER, map_bounded
from unet_volume.tiling import Block, TileGeometry, block_key, plan_blocks, plan_tiles

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
    """Time summed over block tasks, per stage: ``read``, ``predict``, ``write``."""
    skipped: int = 0
    """Blocks done by an earlier run of the same prediction (resumed), not redone."""
    pyramid_seconds: float = 0.0
    """Time to build the output's lower-resolution levels (:mod:`unet_volume.pyramid`)."""

    @property
    def voxels_per_second(self) -> float:
        return self.voxels / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "voxels_per_second": self.voxels_per_second}


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
    many = getattr(predictor, "predict_many", None)
    sizing = getattr(predictor, "batch_size", None)
    per_pass = max(1, int(sizing(geometry.input_shape))) if sizing is not None else 1
    for first in range(0, len(tiles), per_pass):
        boxes = tiles[first : first + per_pass]
        inputs = [
            data[(slice(None), *geometry.input_box(t).to_slices(read_box.begin))] for t in boxes
        ]
        outputs = many(inputs) if many is not None and len(inputs) > 1 else map(predictor, inputs)
        for tile_box, tile_input, probs in zip(boxes, inputs, outputs):
            if tuple(probs.shape[1:]) != geometry.output_shape:
                raise GeometryError(
                    f"predictor returned shape {probs.shape} for a tile of {tile_input.shape}; "
                    f"expected (classes, *{geometry.output_shape})"
                )
            if output is None:
                output = (store or _FLOAT_STORE).new_output(probs.shape[0], write_box.shape)
            part = tile_box.intersect(write_box)
            output.put(
                part.to_slices(write_box.begin),
                probs[(slice(None), *part.to_slices(tile_box.begin))],
            )
    assert output is not None  # plan_tiles always yields at least one tile
    return output


def check_finite(data: np.ndarray, block: Block, volume: Volume) -> None:
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


def predict_block(
    block: Block,
    *,
    volume: Volume,
    store: PredictionStore,
    predictor: Predictor,
    geometry: TileGeometry,
) -> dict[str, Any]:
    """One Dask task: read the task's read box, predict, write its shard, mark it done.

    ``block`` is the task's box: one shard of output blocks (one block when unsharded).
    Idempotent: a task run twice (a worker died after writing) writes the same objects.
    Transient read and write errors are retried; non-finite input fails the block.
    Returns the block's timings.
    """
    start = time.perf_counter()
    data = with_retries(volume.read, block.read_box)
    check_finite(data, block, volume)
    read_s = time.perf_counter() - start
    output = predict_tiles(
        data, block.read_box, block.write_box, predictor=predictor, geometry=geometry, store=store
    )
    predict_s = time.perf_counter() - start - read_s
    with_retries(store.write, block.write_box, output)
    with_retries(store.mark_done, block.index)  # only after the data is stored
    del data, output
    release_free_memory()
    return {
        "index": block.index,
        "voxels": block.write_box.size,
        "seconds": {
            "read": read_s,
            "predict": predict_s,
            "write": time.perf_counter() - start - read_s - predict_s,
        },
    }


def dry_block(block: Block, **_: Any) -> dict[str, Any]:
    """A task that does nothing: what planning, submitting and tracking a run cost alone."""
    return {"index": block.index, "voxels": block.write_box.size, "seconds": {}}


def _itself(value: T) -> T:
    return value


def shared_predictor(client: Client, predictor: Predictor) -> Any:
    """The predictor as one task's result, which every block task depends on.

    Not ``client.scatter``: scattered data is lost for good when every worker holding it
    dies, and then every remaining block fails. A task's result is recomputed from its spec
    (the predictor's bytes, kept by the scheduler), so workers that die and come back, or
    workers that join late, get it again.
    """
    with warnings.catch_warnings():
        # Dask warns of a graph over 10 MB (a network of 2.5 M parameters) and advises a task
        # or scatter instead: this is that one task, which every block task reuses.
        warnings.filterwarnings("ignore", "Sending large graph", UserWarning)
        key = f"predictor-{uuid.uuid4().hex[:8]}"
        return client.submit(_itself, predictor, key=key, pure=False)


def run_prediction(
    client: Client,
    *,
    predictor: Predictor,
    geometry: TileGeometry,
    volume: Volume,
    store: PredictionStore,
    block_shape: Shape,
    shard_shape: Shape | None = None,
    max_in_flight: int | None = None,
    progress: bool = False,
    skip: Collection[Shape] = (),
    max_failures: int = 0,
    stall_after: float = STALL_AFTER,
    dry_run: bool = False,
    on_progress: ProgressSink | None = None,
) -> RunReport:
    """Submit one task per shard not in ``skip``, keeping at most ``max_in_flight`` running.

    A shard (``shard_shape``, default one block) is a box of whole blocks: see
    :mod:`unet_volume.layout`. ``skip`` holds shard indices, as the done markers record them.

    A bounded window (default: 4 per worker thread) keeps a 10^6-block volume from
    flooding the scheduler; the predictor reaches workers once, as
    :func:`shared_predictor`. When workers advertise a ``GPU`` resource, blocks run only
    there, a few per GPU at once (see
    :func:`~unet_volume.cluster.gpu_resources`). Up to
    ``max_failures`` blocks may fail while the others carry on; then :class:`BlockError`
    (its ``failures`` hold the blocks) is raised; a run in which no block finishes for
    ``stall_after`` seconds stops with :class:`~unet_volume.errors.StallError`.
    ``dry_run`` submits tasks that read, compute and write nothing (:func:`dry_block`).
    ``on_progress`` hears of every finished task (see :mod:`unet_volume.progress`).
    """
    start = time.perf_counter()
    layout = OutputLayout(volume.shape, tuple(block_shape), tuple(shard_shape or block_shape))
    skipped = set(map(tuple, skip))
    skipped_blocks = sum(layout.blocks_in_shard(index) for index in skipped)
    total = layout.num_blocks - skipped_blocks
    shared = shared_predictor(client, predictor)
    blocks = plan_blocks(volume.shape, layout.shard_shape, geometry)
    results = map_bounded(
        client,
        dry_block if dry_run else predict_block,
        (block for block in blocks if block.index not in skipped),
        name=block_key("predict-block"),
        window=max_in_flight,
        resources=gpu_resources(client),
        max_failures=max_failures,
        stall_after=stall_after,
        volume=volume,
        store=store,
        predictor=shared,
        geometry=geometry,
    )
    voxels = done = 0
    stages: Counter[str] = Counter()
    with tqdm(total=total, unit="block", disable=not progress, desc="predict") as bar:
        for result in results:
            voxels += result["voxels"]
            stages.update(result["seconds"])
            blocks_done = layout.blocks_in_shard(result["index"])
            done += blocks_done
            bar.update(blocks_done)
            if on_progress is not None:
                elapsed = time.perf_counter() - start
                on_progress(Progress.of_blocks("predict", done, total, voxels, elapsed))
    seconds = time.perf_counter() - start
    return RunReport(store.url, total, voxels, seconds, dict(stages), skipped=skipped_blocks)
