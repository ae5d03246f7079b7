"""Instance labels of a whole volume on a Dask cluster: connected components, block by block.

The three passes of :mod:`unet_volume.components`, each one task per block through
:func:`~unet_volume.task_window.map_bounded` (a bounded window: 10^6 blocks never flood the
scheduler):

1. each task labels its block of the mask and writes provisional ids into the output's
   ``instances`` array (one chunk per block), returning its objects' first voxels;
2. each task reads its blocks' upper border planes (a one-voxel rim) back from ``instances``
   and returns the ids that touch;
3. the client merges them, and each task gets its own block's table (never the whole map),
   rewrites its chunk with the final ids, marks its block done and returns its objects'
   partial statistics, which the client merges into the object table
   (:mod:`unet_volume.objects`, ``OUT.objects.parquet``).

The result is ``scipy.ndimage.label`` of the whole mask, ids included. The mask is the
foreground of a prediction (its ``segmentation`` equal to ``foreground``) or the nonzero voxels
of any label or mask volume. The output is a Zarr v3 group like a prediction's: ``instances``
(z, y, x) uint64 with physical coordinates, complete only once pass 3 has written every block.
"""

from __future__ import annotations

import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr
import zarr
from distributed import Client

from unet_volume.components import (
    apply_table,
    block_number,
    block_pairs,
    capacity,
    label_block,
    provisional_ids,
    relabel,
    structure,
)
from unet_volume.errors import InputError
from unet_volume.geometry import Box, Shape, ceil_div
from unet_volume.locations import absolute
from unet_volume.objects import block_stats, decode_probability, merge_stats, table_url, write_table
from unet_volume.ome import publish_levels, register_label
from unet_volume.output_run import ATTRS_KEY, create_output, finish_output, opened_arrays
from unet_volume.prediction_store import new_single_array_output, volume_attrs
from unet_volume.run_record import DONE
from unet_volume.storage import Volume, open_volume
from unet_volume.task_window import map_bounded
from unet_volume.watershed import WatershedConfig, seeded_watershed

INSTANCES = "instances"
INSTANCES_ARRAY = (INSTANCES, "uint64", 0, "instance id (0: background)")
DEFAULT_BLOCK = (1, 512, 512)


@dataclass(frozen=True)
class Labelling:
    """What the block tasks need to know of a run: the mask's source and foreground value
    (None: nonzero), the neighbourhood, the prediction's probabilities (foreground channel;
    None for a mask) and the watershed's thresholds (None: connected components)."""

    volume: Volume
    wanted: int | None
    neighbourhood: np.ndarray
    probability: tuple[Volume, int] | None
    watershed: WatershedConfig | None


@dataclass(frozen=True)
class InstanceReport:
    """What :func:`label_instances` did: where, how many objects, in how many blocks."""

    output_url: str
    objects: int
    blocks: int
    seconds: float


def label_instances(
    source: str,
    out: str,
    *,
    client: Client,
    connectivity: int = 6,
    per_slice: bool = True,
    foreground: int = 1,
    watershed: WatershedConfig | None = None,
    block_shape: Shape | None = None,
    overwrite: bool = False,
) -> InstanceReport:
    """Label the objects of ``source``'s foreground into the group ``out``; write the object
    table beside it.

    ``source`` is a prediction (its ``segmentation == foreground`` is the mask) or a label or
    mask volume (nonzero is the mask). ``per_slice`` labels each z slice on its own (2D
    objects, 4 or 8 neighbours for ``connectivity`` 6 or 26), else in 3D. With ``watershed``
    (a prediction only) the objects come from a seeded watershed of the foreground
    probability (:mod:`unet_volume.watershed`) instead of connected components; its blocks
    must hold whole slices (per slice) or the whole volume (3D), so that no basin is cut:
    that is the default ``block_shape`` with a watershed, (1, 512, 512) without.
    """
    start = time.perf_counter()
    how = _labelling(source, foreground, structure(connectivity, per_slice=per_slice), watershed)
    shape = _check_block_shape(block_shape, how, per_slice)
    out_url = absolute(out)
    attrs = {
        "array": INSTANCES,
        "instances": {
            "source": how.volume.url,
            "method": "watershed" if watershed else "components",
            "connectivity": connectivity,
            "per_slice": per_slice,
            "foreground": how.wanted,
            **(asdict(watershed) if watershed else {}),
        },
        "input": volume_attrs(how.volume),
    }
    create_output(
        out_url,
        lambda: new_single_array_output(out_url, how.volume, shape, attrs, INSTANCES_ARRAY),
        overwrite=overwrite,
    )
    table = merge_stats(_three_passes(client, how, shape, out_url), how.volume.voxel_size)
    write_table(table, out_url)
    blocks = int(np.prod([ceil_div(n, b) for n, b in zip(how.volume.shape, shape)]))
    report = {"objects": len(table), "blocks": blocks}
    units = how.volume.units
    publish_levels(client, out_url, INSTANCES, "stride", label=True)
    finish_output(out_url, {"report": report, "table": table_url(out_url), "units": units})
    register_label(out_url)
    return InstanceReport(out_url, len(table), blocks, time.perf_counter() - start)


def open_instances(url: str) -> xr.Dataset:
    """The instance labels at ``url`` as an xarray Dataset: ``instances`` (z, y, x) at full
    resolution with physical coordinates, lazily (dask); the pyramid's levels left out."""
    group = zarr.open_group(url, mode="r", zarr_format=3)
    levels = [name for name in group.array_keys() if name.startswith(f"{INSTANCES}_")]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        return xr.open_zarr(url, drop_variables=levels, zarr_format=3)


def _three_passes(client: Client, how: Labelling, shape: Shape, out_url: str) -> list[pd.DataFrame]:
    """Label, pair, relabel (the module docstring); returns the blocks' object statistics.
    A watershed has no pairs: its blocks hold whole slices or the whole volume."""
    volume = how.volume.shape
    grid = tuple(ceil_div(n, b) for n, b in zip(volume, shape))
    task = {"how": how, "out_url": out_url, "token": uuid.uuid4().hex, "cap": capacity(shape)}
    labelled = map_bounded(client, _label, iter_blocks(volume, shape), name=_key("label"), **task)
    firsts = dict(labelled)
    touching = (
        map_bounded(client, _pairs, iter_blocks(volume, shape), name=_key("pairs"), **task)
        if how.watershed is None
        else iter(())
    )
    merged = relabel(firsts, touching, task["cap"])
    jobs = ((n, box, merged.tables[n]) for n, box in iter_blocks(volume, shape))
    return list(map_bounded(client, _rewrite, jobs, name=_key("relabel"), grid=grid, **task))


def _labelling(
    source: str, foreground: int, neighbourhood: np.ndarray, watershed: WatershedConfig | None
) -> Labelling:
    volume, wanted = _mask_source(source, foreground)
    probability = _probability_of(source, wanted)
    if watershed is not None and probability is None:
        raise InputError(
            f"{source} is not a prediction: the watershed floods a foreground probability; "
            "pass a prediction group, or label a mask with connected components"
        )
    return Labelling(volume, wanted, neighbourhood, probability, watershed)


def _mask_source(source: str, foreground: int) -> tuple[Volume, int | None]:
    """The volume whose voxels make the mask, and the value that is foreground (None: any
    nonzero). A prediction group gives its ``segmentation``."""
    try:
        group = zarr.open_group(source, mode="r")
    except Exception:  # not a group: an array or a TIFF stack
        group = None
    if group is not None and "segmentation" in group:
        volume = open_volume(f"{source.rstrip('/')}/segmentation")
        return replace(volume, **_grid_of(group)), foreground
    volume = open_volume(source)
    if volume.channels != 1 or np.dtype(volume.dtype).kind not in "uib":
        raise InputError(
            f"{source} holds {volume.channels} channel(s) of {volume.dtype_name}; pass a "
            "prediction, or one (z, y, x) volume of labels or a 0/1 mask"
        )
    return volume, None


def _grid_of(group: zarr.Group) -> dict[str, Any]:
    """The voxel size and units a prediction recorded of its input (None where it had none)."""
    recorded = group.attrs.get(ATTRS_KEY, {}).get("input", {})  # type: ignore[union-attr]
    size = recorded.get("voxel_size")
    return {"voxel_size": tuple(size) if size else None, "units": recorded.get("units")}


def _check_block_shape(block_shape: Shape | None, how: Labelling, per_slice: bool) -> Shape:
    volume = how.volume.shape
    if block_shape is None:
        whole_slices = (1, *volume[1:]) if per_slice else volume
        block_shape = DEFAULT_BLOCK if how.watershed is None else whole_slices
    shape = tuple(int(b) for b in block_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(
            f"block shape {tuple(block_shape)} must be 3 positive sizes (z, y, x); "
            "pass e.g. --block-shape 1,512,512"
        )
    shape = tuple(min(b, n) for b, n in zip(shape, volume))
    whole = volume[1:] if per_slice else volume
    if how.watershed is not None and shape[3 - len(whole) :] != whole:
        fix = (1, *volume[1:]) if per_slice else volume
        raise InputError(
            f"block shape {shape} cuts {'the slices' if per_slice else 'the volume'} of "
            f"{how.volume.url} {volume}: a watershed basin must not be cut; pass "
            f"--block-shape {','.join(map(str, fix))}"
        )
    return shape


def _key(stage: str) -> Any:
    return lambda item: f"{stage}-{item[0]}"


def _label(
    item: tuple[int, Box], *, how: Labelling, out_url: str, token: str, cap: int
) -> tuple[int, np.ndarray]:
    """Pass 1: the block's provisional ids, written; its objects' first voxels, returned."""
    number, box = item
    if how.watershed is not None and how.probability is not None:
        volume, channel = how.probability
        probability = decode_probability(volume.read(box)[channel])
        local, count = seeded_watershed(probability, how.neighbourhood, how.watershed)
        ids, firsts = provisional_ids(local, count, number * cap, box, how.volume.shape)
    else:
        data = how.volume.read(box)[0]
        mask = data == how.wanted if how.wanted is not None else data != 0
        ids, firsts = label_block(mask, how.neighbourhood, number * cap, box, how.volume.shape)
    (labels,) = opened_arrays(out_url, token, (INSTANCES,))
    labels[box.to_slices()] = ids
    return number, firsts


def _pairs(
    item: tuple[int, Box], *, how: Labelling, out_url: str, token: str, cap: int
) -> np.ndarray:
    """Pass 2: the provisional ids that touch across the block's upper borders."""
    (labels,) = opened_arrays(out_url, token, (INSTANCES,))
    return block_pairs(lambda b: labels[b.to_slices()], item[1], how.volume.box, how.neighbourhood)


def _rewrite(
    item: tuple[int, Box, np.ndarray],
    *,
    how: Labelling,
    grid: Shape,
    out_url: str,
    token: str,
    cap: int,
) -> pd.DataFrame:
    """Pass 3: the block's final ids, from its own table; its done marker; its objects'
    partial statistics."""
    number, box, table = item
    labels, done = opened_arrays(out_url, token, (INSTANCES, DONE))
    final = apply_table(labels[box.to_slices()], table, number * cap)
    labels[box.to_slices()] = final
    done[np.unravel_index(number, grid)] = 1
    foreground = None
    if how.probability is not None:
        volume, channel = how.probability
        foreground = decode_probability(volume.read(box)[channel])
    return block_stats(final, box, how.volume.shape, foreground)


def _probability_of(source: str, foreground: int | None) -> tuple[Volume, int] | None:
    """A prediction's probabilities and the foreground's channel; None for a mask."""
    if foreground is None:
        return None
    return open_volume(f"{source.rstrip('/')}/probabilities"), foreground


def iter_blocks(volume_shape: Shape, block_shape: Shape) -> Iterator[tuple[int, Box]]:
    """Each block of the grid with its number, in C order."""
    grid = tuple(ceil_div(n, b) for n, b in zip(volume_shape, block_shape))
    for index, box in Box.from_shape(volume_shape).grid(block_shape):
        yield block_number(index, grid), box
