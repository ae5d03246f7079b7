"""Multiscale pyramids of an output, built block by block on Dask, for viewers.

Level 0 is the output's own full-resolution array (``probabilities`` of a prediction,
``instances`` of instance labels), where xarray and :func:`open_prediction` read it. Levels 1,
2, ... of a prediction are ``pyramid/1``, ``pyramid/2``, ... in a subgroup, which
``xarray.open_zarr`` does not open (their dims have other sizes); those of labels are
``instances_1``, ... beside level 0, where ome-zarr-models' check of label images finds them
(:func:`unet_volume.instances.labelling.open_instances` opens the full resolution in xarray).

Each level halves the finest axes of the one before (anisotropic EM at 50 x 4 x 4 nm: y and x
until they are as coarse as z, then all three) until no axis is longer than :data:`SMALLEST`
voxels, so that a viewer draws a whole slice from a few chunks. Probabilities are averaged
over each 2 x 2 (x 2) window (uint8 rounded back), labels strided (an object's id is never a
mean). Each level is one task per shard (or chunk) of that level, read from the level before through
:func:`~unet_volume.cluster.task_window.map_bounded`: nothing holds a level whole, and a 10^6-block
volume never floods the scheduler.

:mod:`unet_volume.output.ome` then describes the levels as OME-Zarr 0.5 ``multiscales``.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import zarr
from distributed import Client

from unet_volume.cluster import malloc
from unet_volume.cluster.task_window import map_bounded
from unet_volume.errors import BlockError, UnetVolumeError
from unet_volume.geometry import Box, Shape, ceil_div, within
from unet_volume.output.lifecycle import opened_arrays, reconsolidate

Reduction = Literal["mean", "stride"]
SMALLEST = 256
"""A pyramid stops once no axis of its coarsest level is longer than this."""
ANISOTROPY = 1.5
"""An axis is halved while its spacing is at most this times the finest spacing."""
LEVELS = "pyramid"


class PyramidError(UnetVolumeError, RuntimeError):
    """A level of a pyramid could not be built; level 0 (the output itself) is whole."""


def level_factors(shape: Shape, spacing: Sequence[float] | None) -> list[Shape]:
    """The downsampling factor of each level against level 0, level 0 first.

    >>> level_factors((25, 512, 512), (50.0, 4.0, 4.0))
    [(1, 1, 1), (1, 2, 2)]
    >>> level_factors((64, 1024, 1024), (50.0, 4.0, 4.0))[-1]
    (1, 4, 4)
    >>> level_factors((600, 600, 600), None)[-1]
    (4, 4, 4)
    >>> level_factors((8, 64, 64), None)
    [(1, 1, 1)]
    """
    step = [float(s) for s in (spacing or (1.0,) * len(shape))]
    factors = [tuple(1 for _ in shape)]
    sizes = list(shape)
    while max(sizes) > SMALLEST:
        finest = min(s for s, n in zip(step, sizes) if n > 1)
        halve = [n > 1 and s <= finest * ANISOTROPY for s, n in zip(step, sizes)]
        factors.append(tuple(f * (2 if h else 1) for f, h in zip(factors[-1], halve)))
        sizes = [ceil_div(n, 2) if h else n for n, h in zip(sizes, halve)]
        step = [s * (2 if h else 1) for s, h in zip(step, halve)]
    return factors  # type: ignore[return-value]


def level_path(array: str, level: int, *, flat: bool = False) -> str:
    """Where ``level`` of ``array`` is stored in its group: ``pyramid/K``, or ``ARRAY_K`` if
    ``flat`` (label images: ome-zarr-models finds only their direct members)."""
    if level == 0:
        return array
    return f"{array}_{level}" if flat else f"{LEVELS}/{level}"


def build_pyramid(
    client: Client,
    url: str,
    array: str,
    reduction: Reduction,
    spacing: Sequence[float] | None,
    *,
    flat: bool = False,
) -> list[Shape]:
    """Write the levels of ``array`` (its last three axes are z, y, x) at :func:`level_path`;
    returns each level's factor (:func:`level_factors`). An earlier pyramid is replaced."""
    group = zarr.open_group(url, mode="r+", zarr_format=3)
    base = group[array]
    assert isinstance(base, zarr.Array)
    factors = level_factors(base.shape[-3:], spacing)
    for name in (LEVELS, *(n for n in group.array_keys() if n.startswith(f"{array}_"))):
        if name in group:
            del group[name]
    paths = [level_path(array, k, flat=flat) for k in range(len(factors))]
    levels = [_create_level(group, base, paths[k], factors[k]) for k in range(1, len(factors))]
    reconsolidate(url)  # the tasks open the new levels through the group's metadata
    token = uuid.uuid4().hex
    for level, target in enumerate(levels, start=1):
        halving = tuple(f // p for f, p in zip(factors[level], factors[level - 1]))
        step = (target.shards or target.chunks)[-3:]  # a task writes whole shards
        blocks = (box for _, box in Box.from_shape(target.shape[-3:]).grid(step))
        tasks = map_bounded(
            client,
            _reduce_block,
            blocks,
            name=functools.partial(_reduce_key, level),
            url=url,
            token=token,
            names=(paths[level - 1], paths[level]),
            halving=halving,
            reduction=reduction,
        )
        try:
            for _ in tasks:
                pass
        except BlockError as error:
            raise PyramidError(
                f"{url}: level {level} of the pyramid failed ({error}); the full resolution "
                "is kept: run the same command again to rebuild the pyramid"
            ) from error
    return factors


def _create_level(group: zarr.Group, base: zarr.Array, path: str, factor: Shape) -> zarr.Array:
    """A level's empty array: the base's chunks (and shards, each a whole number of chunks)
    where the level is big enough, else the level itself."""
    lead = base.shape[:-3]
    shape = tuple(ceil_div(n, f) for n, f in zip(base.shape[-3:], factor))
    chunks = tuple(min(c, n) for c, n in zip(base.chunks[-3:], shape))
    shards = None
    if base.shards is not None:
        shards = (*lead, *within(base.shards[-3:], shape, chunks))
    return group.create_array(
        path,
        shape=(*lead, *shape),
        chunks=(*lead, *chunks),
        shards=shards,
        dtype=base.dtype,
        fill_value=base.fill_value,
        compressors=base.compressors,
        dimension_names=base.metadata.dimension_names,  # type: ignore[union-attr]
        attributes=dict(base.attrs),
    )


def _reduce_block(
    box: Box,
    *,
    url: str,
    token: str,
    names: tuple[str, str],
    halving: Shape,
    reduction: Reduction,
) -> None:
    """One shard (or chunk) of a level from the window of the level before that it covers,
    read one source chunk at a time: a task holds its output and one input chunk, whatever the
    halving and the slice's area, and decodes each input chunk once."""
    source, target = opened_arrays(url, token, names)
    n = source.shape[-3:]
    lead = (slice(None),) * (source.ndim - 3)
    out = np.empty((*source.shape[:-3], *box.shape), dtype=source.dtype)
    part_shape = tuple(max(1, c // h) for c, h in zip(source.chunks[-3:], halving))
    for _, part in box.grid(part_shape):
        begin = tuple(b * h for b, h in zip(part.begin, halving))
        end = tuple(min(e * h, s) for e, h, s in zip(part.end, halving, n))
        data = source[(*lead, *(slice(b, e) for b, e in zip(begin, end)))]
        where = part.shift(tuple(-b for b in box.begin)).to_slices()
        out[(*lead, *where)] = reduce_window(data, halving, reduction)
    target[(*lead, *box.to_slices())] = out
    malloc.give_back()  # see unet_volume.cluster.malloc


def _reduce_key(level: int, box: Box) -> str:
    """A reduction task's Dask name: the level and the box's origin."""
    return f"pyramid-{level}-{box.begin}"


def reduce_window(data: np.ndarray, halving: Shape, reduction: Reduction) -> np.ndarray:
    """``data`` (its last three axes z, y, x) downsampled by ``halving`` per axis.

    A window cut by the volume's end holds fewer voxels: its mean is theirs (edge padding),
    so the level keeps ``ceil(n / 2)`` voxels and loses none.

    >>> reduce_window(np.array([[[1, 3, 5]]], np.uint8), (1, 1, 2), "mean").tolist()
    [[[2, 5]]]
    >>> reduce_window(np.array([[[7, 8, 9]]], np.uint64), (1, 1, 2), "stride").tolist()
    [[[7, 9]]]
    """
    lead = data.ndim - 3
    if reduction == "stride":
        strides: tuple[Any, ...] = (Ellipsis, *(slice(None, None, h) for h in halving))
        return data[strides]
    pad = [(0, 0)] * lead + [(0, -n % h) for n, h in zip(data.shape[lead:], halving)]
    padded = np.pad(data, pad, mode="edge")
    split: list[int] = list(padded.shape[:lead])
    for n, h in zip(padded.shape[lead:], halving):
        split += [n // h, h]
    windows = padded.reshape(split)
    mean = windows.mean(axis=tuple(lead + 2 * i + 1 for i in range(3)), dtype=np.float64)
    if np.issubdtype(data.dtype, np.integer):
        mean = np.rint(mean)
    return mean.astype(data.dtype)
