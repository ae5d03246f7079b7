"""What one prediction task does on its worker: read, predict tile by tile, write, mark done.

A task (:mod:`unet_volume.prediction.tasks`) is a box of whole shards read through one reader of
the input, so each input chunk is fetched once. Each shard's read box is read straight from the
input store (mirrored outside the volume); the predictor runs tile by tile with tile origins on
the network's period lattice; the shard is written at once and marked done. Because tiles of a
valid-convolution U-Net placed on the period lattice compute exactly what one whole-volume pass
computes, the stitched output has no seams and needs no blending (see :mod:`unet_volume.tiling`).
Tasks return a few numbers: no voxel data goes through the scheduler or the client.

A *predictor* is any picklable callable mapping an input tile ``(c, z, y, x)`` to class scores
``(k, *geometry.output_shape)``: :class:`~unet_volume.prediction.model_predictor.ModelPredictor`
wraps a U-Net, the tests use probes. The driver's side, which submits the tasks and tallies what
they return, is :mod:`unet_volume.prediction.engine`.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from unet_volume.border import reflect
from unet_volume.cluster.client import release_free_memory
from unet_volume.cluster.task_window import beat
from unet_volume.errors import GeometryError, InputError
from unet_volume.geometry import Box, Shape
from unet_volume.io.locations import with_retries
from unet_volume.io.volumes import Volume, VolumeReader
from unet_volume.output.prediction import (
    EncodedOutput,
    PredictionStore,
    encode_probabilities,
    segment,
)
from unet_volume.prediction.tasks import Task, shards_of
from unet_volume.tiling import Region, TileGeometry, plan_tiles

_FLOAT_STORE = PredictionStore("", "float64")
"""Where :func:`predict_tiles` takes its output from when given no store: float64, unencoded."""
Predictor = Callable[[np.ndarray], np.ndarray]
"""Input tile ``(c, z, y, x)`` -> probabilities ``(k, *output_shape)``."""


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
