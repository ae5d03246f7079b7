"""The overlap-tile engine: one Dask task per output block, any predictor.

Each block task reads its own read box straight from the input store (mirrored outside the
volume), runs the predictor tile by tile with tile origins on the network's period lattice,
writes its own output chunks and marks itself done. No voxel data goes through the scheduler
or the client; tasks return a few numbers. Because tiles of a valid-convolution U-Net placed on
the period lattice compute exactly what one whole-volume pass computes, the stitched output has
no seams and needs no blending (see :mod:`unet_volume.tiling`).

A *predictor* is any picklable callable mapping an input tile ``(c, z, y, x)`` to class scores
``(k, *geometry.output_shape)``: :class:`~unet_volume.predictor.ModelPredictor` wraps a U-Net,
the tests use probes. :mod:`unet_volume.predict` plans a run into an output and resumes it.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import numpy as np
from distributed import Client
from tqdm.auto import tqdm

from unet_volume.border import reflect
from unet_volume.cluster import STALL_AFTER, gpu_resources, map_bounded
from unet_volume.errors import GeometryError, InputError
from unet_volume.geometry import Box, Shape
from unet_volume.locations import with_retries
from unet_volume.prediction_store import PredictionStore
from unet_volume.storage import Volume
from unet_volume.tiling import Block, TileGeometry, block_key, count_blocks, plan_blocks, plan_tiles

T = TypeVar("T")
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

    @property
    def voxels_per_second(self) -> float:
        return self.voxels / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "voxels_per_second": self.voxels_per_second}


def predict_tiles(
    data: np.ndarray, read_box: Box, write_box: Box, *, predictor: Predictor, geometry: TileGeometry
) -> np.ndarray:
    """Probabilities for ``write_box`` from ``data`` (the input over ``read_box``).

    Pure and idempotent: tiles start on the period lattice at ``write_box.begin``;
    each tile's output is cropped to the write box.
    """
    result: np.ndarray | None = None
    for tile_box in plan_tiles(write_box, geometry):
        tile_input = data[(slice(None), *geometry.input_box(tile_box).to_slices(read_box.begin))]
        probs = predictor(tile_input)
        if tuple(probs.shape[1:]) != geometry.output_shape:
            raise GeometryError(
                f"predictor returned shape {probs.shape} for a tile of {tile_input.shape}; "
                f"expected (classes, *{geometry.output_shape})"
            )
        if result is None:
            result = np.empty((probs.shape[0], *write_box.shape), dtype=probs.dtype)
        part = tile_box.intersect(write_box)
        result[(slice(None), *part.to_slices(write_box.begin))] = probs[
            (slice(None), *part.to_slices(tile_box.begin))
        ]
    assert result is not None  # plan_tiles always yields at least one tile
    return result


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
    """One Dask task: read the block's read box, predict, write its chunks, mark it done.

    Idempotent: a block run twice (a worker died after writing) writes the same chunks.
    Transient read and write errors are retried; non-finite input fails the block.
    Returns the block's timings.
    """
    start = time.perf_counter()
    data = with_retries(volume.read, block.read_box)
    check_finite(data, block, volume)
    read_s = time.perf_counter() - start
    probs = predict_tiles(
        data, block.read_box, block.write_box, predictor=predictor, geometry=geometry
    )
    predict_s = time.perf_counter() - start - read_s
    with_retries(store.write, block.write_box, probs)
    with_retries(store.mark_done, block.index)  # only after the data is stored
    return {
        "index": block.index,
        "voxels": block.write_box.size,
        "seconds": {
            "read": read_s,
            "predict": predict_s,
            "write": time.perf_counter() - start - read_s - predict_s,
        },
    }


def _itself(value: T) -> T:
    return value


def _shared(client: Client, predictor: Predictor) -> Any:
    """The predictor as one task's result, which every block task depends on.

    Not ``client.scatter``: scattered data is lost for good when every worker holding it
    dies, and then every remaining block fails. A task's result is recomputed from its spec
    (the predictor's bytes, kept by the scheduler), so workers that die and come back, or
    workers that join late, get it again.
    """
    return client.submit(_itself, predictor, key=f"predictor-{uuid.uuid4().hex[:8]}", pure=False)


def run_prediction(
    client: Client,
    *,
    predictor: Predictor,
    geometry: TileGeometry,
    volume: Volume,
    store: PredictionStore,
    block_shape: Shape,
    max_in_flight: int | None = None,
    progress: bool = False,
    skip: Collection[Shape] = (),
    max_failures: int = 0,
    stall_after: float = STALL_AFTER,
) -> RunReport:
    """Submit one task per block not in ``skip``, keeping at most ``max_in_flight`` running.

    A bounded window (default: 4 per worker thread) keeps a 10^6-block volume from
    flooding the scheduler; the predictor reaches workers once, as :func:`_shared`. When workers
    advertise a ``GPU`` resource, blocks run only there, one per GPU at a time. Up to
    ``max_failures`` blocks may fail while the others carry on; then :class:`BlockError`
    (its ``failures`` hold the blocks) is raised; a run in which no block finishes for
    ``stall_after`` seconds stops with :class:`~unet_volume.errors.StallError`.
    """
    start = time.perf_counter()
    skipped = set(map(tuple, skip))
    total = count_blocks(volume.shape, block_shape) - len(skipped)
    shared = _shared(client, predictor)
    blocks = plan_blocks(volume.shape, block_shape, geometry)
    results = map_bounded(
        client,
        predict_block,
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
    voxels = 0
    stages: Counter[str] = Counter()
    with tqdm(total=total, unit="block", disable=not progress, desc="predict") as bar:
        for result in results:
            voxels += result["voxels"]
            stages.update(result["seconds"])
            bar.update(1)
    seconds = time.perf_counter() - start
    return RunReport(store.url, total, voxels, seconds, dict(stages), skipped=len(skipped))
