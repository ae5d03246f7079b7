"""The three block passes of :func:`unet_volume.instances.labelling.label_instances`, resumable.

Each pass is one task per block through :func:`~unet_volume.cluster.task_window.map_bounded` (a
bounded window: 10^6 blocks never flood the scheduler):

1. **label**: each task labels its block of the mask (or floods its watershed) and writes
   provisional ids into the scratch array ``provisional`` (one shard per block, of small
   inner chunks: :func:`inner_chunks`), returning its objects' first voxels;
2. **pair**: each task reads its block's upper border planes (a one-voxel rim) back from
   ``provisional`` and returns the ids that touch. A plane decodes only the inner chunks it
   crosses: with one chunk per block, each plane read decoded its neighbours' whole blocks
   (uint64, 32 MiB for 64x256x256), several at once, and this pass cost more time and worker
   memory than the labelling, growing with the number of neighbours a block has;
3. **relabel**: the client merges them (:func:`~unet_volume.instances.components.relabel`) and
stores
   the relabel tables in the output, every block's after the other (``relabel``, with each
   block's start in ``relabel_start``); each task reads its own block's table (never the whole
   map), writes its final ids into ``instances``, marks its block done and returns its
   objects' partial statistics, which the client merges into the object table.

Resume: once the tables are stored, the output records ``relabel_stored``; a run stopped
after that redoes only pass 3 of the blocks not done (and reads the done blocks back for their
statistics). Pass 3 reads ``provisional`` and writes ``instances``, so a block written but not
marked done is simply written again. Stopped before, the run starts from pass 1.
``provisional`` and the tables are removed once the output is complete.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import zarr
from distributed import Client

from unet_volume.cluster import malloc
from unet_volume.cluster.task_window import map_bounded
from unet_volume.geometry import Box, Shape, ceil_div
from unet_volume.instances.components import (
    apply_table,
    block_number,
    block_pairs,
    capacity,
    label_block,
    provisional_ids,
    relabel,
)
from unet_volume.instances.objects import block_stats, decode_probability
from unet_volume.instances.watershed import WatershedConfig, seeded_watershed
from unet_volume.io.volumes import Volume
from unet_volume.output.bookkeeping import DONE
from unet_volume.output.lifecycle import opened_arrays, reconsolidate, run_info, update_run_info
from unet_volume.output.prediction import COMPRESSOR

INSTANCES = "instances"
PROVISIONAL = "provisional"
TABLES, STARTS = "relabel", "relabel_start"
STORED = "relabel_stored"
SCRATCH = (PROVISIONAL, TABLES, STARTS)
TABLE_CHUNK = 1 << 20


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


class Block(NamedTuple):
    """A block of the run: its number (C order), grid index, box, and whether an earlier run
    finished it. Failed blocks are recorded by index and box, as a prediction's."""

    number: int
    index: Shape  # type: ignore[assignment]  # the grid index (tuple.index is never called)
    write_box: Box
    done: bool = False


def run_passes(
    client: Client,
    how: Labelling,
    shape: Shape,
    out_url: str,
    done: Collection[Shape],
    *,
    max_failures: int = 0,
) -> list[pd.DataFrame]:
    """The passes still to run (the module docstring); returns every block's object
    statistics, done blocks' included."""
    volume = how.volume.shape
    task: dict[str, Any] = {
        "how": how,
        "out_url": out_url,
        "token": uuid.uuid4().hex,
        "cap": capacity(shape),
    }
    if not (run_info(out_url) or {}).get(STORED):
        _label_and_merge(client, how, shape, out_url, task)
    finished = {tuple(int(i) for i in index) for index in done}
    jobs = (b._replace(done=b.index in finished) for b in iter_blocks(volume, shape))
    stats = map_bounded(
        client, _rewrite, jobs, name=_key("relabel"), max_failures=max_failures, **task
    )
    return list(stats)


def _label_and_merge(
    client: Client, how: Labelling, shape: Shape, out_url: str, task: dict[str, Any]
) -> None:
    """Passes 1 and 2, then the merged tables stored in the output."""
    volume = how.volume.shape
    _create_provisional(out_url, volume, shape)
    reconsolidate(out_url)  # the tasks open it through the group's metadata
    labelled = map_bounded(client, _label, iter_blocks(volume, shape), name=_key("label"), **task)
    firsts = dict(labelled)
    touching = (
        map_bounded(client, _pairs, iter_blocks(volume, shape), name=_key("pairs"), **task)
        if how.watershed is None  # a watershed's blocks hold whole slices: nothing touches
        else iter(())
    )
    merged = relabel(firsts, touching, task["cap"])
    _store_tables(out_url, [merged.tables[n] for n in range(len(merged.tables))])
    update_run_info(out_url, {STORED: True, "objects": merged.count})


def _create_provisional(out_url: str, volume: Shape, shape: Shape) -> None:
    group = zarr.open_group(out_url, mode="r+", zarr_format=3)
    if PROVISIONAL in group:
        del group[PROVISIONAL]
    group.create_array(
        PROVISIONAL,
        shape=volume,
        shards=shape,
        chunks=inner_chunks(shape),
        dtype="uint64",
        fill_value=0,
        compressors=[COMPRESSOR],
        dimension_names=("z", "y", "x"),
        attributes={"long_name": "provisional ids of a run in progress"},
    )


def inner_chunks(block: Shape, *, cube: int = 16, square: int = 64) -> Shape:
    """Chunks of ``cube``^3 in 3D or ``square``^2 in a slice within a block's shard.

    ``provisional`` takes the defaults (about 4096 voxels: a border plane decodes at most 16 or
    64 times its own voxels); the labels take a viewer's chunks (64^3, 1x256x256). Each divides
    its block's side (a shard holds whole chunks); a side with no divisor near that stays whole.

    >>> inner_chunks((64, 256, 256)), inner_chunks((1, 512, 512)), inner_chunks((8, 100, 97))
    ((16, 16, 16), (1, 64, 64), (8, 10, 97))
    >>> inner_chunks((64, 256, 256), cube=64), inner_chunks((1, 512, 512), square=256)
    ((64, 64, 64), (1, 256, 256))
    """
    edge = cube if all(b > 1 for b in block) else square
    sides = []
    for b in block:
        divisor = max(d for d in range(1, min(b, edge) + 1) if b % d == 0)
        sides.append(divisor if divisor * 4 >= min(b, edge) else b)
    return tuple(sides)


def _store_tables(out_url: str, tables: list[np.ndarray]) -> None:
    """Every block's relabel table, one after the other, and where each starts."""
    starts = np.concatenate([[0], np.cumsum([len(t) for t in tables])]).astype(np.int64)
    group = zarr.open_group(out_url, mode="r+", zarr_format=3)
    for name, values in ((TABLES, np.concatenate(tables)), (STARTS, starts)):
        if name in group:
            del group[name]
        array = group.create_array(
            name,
            shape=values.shape,
            chunks=(min(TABLE_CHUNK, max(1, len(values))),),
            dtype=values.dtype,
            compressors=[COMPRESSOR],
            dimension_names=(name,),
        )
        array[:] = values


def remove_scratch(out_url: str) -> None:
    """Remove what only a run in progress needs (provisional ids, relabel tables)."""
    group = zarr.open_group(out_url, mode="r+", zarr_format=3)
    for name in SCRATCH:
        if name in group:
            del group[name]


def _key(stage: str) -> Any:
    return lambda item: f"{stage}-{item[0]}"


def _label(
    block: Block, *, how: Labelling, out_url: str, token: str, cap: int
) -> tuple[int, np.ndarray]:
    """Pass 1: the block's provisional ids, written; its objects' first voxels, returned."""
    number, box = block.number, block.write_box
    if how.watershed is not None and how.probability is not None:
        volume, channel = how.probability
        probability = decode_probability(volume.read(box)[channel])
        local, count = seeded_watershed(probability, how.neighbourhood, how.watershed)
        ids, firsts = provisional_ids(local, count, number * cap, box, how.volume.shape)
    else:
        data = how.volume.read(box)[0]
        mask = data == how.wanted if how.wanted is not None else data != 0
        ids, firsts = label_block(mask, how.neighbourhood, number * cap, box, how.volume.shape)
    (provisional,) = opened_arrays(out_url, token, (PROVISIONAL,))
    provisional[box.to_slices()] = ids
    malloc.give_back()  # see unet_volume.cluster.malloc: else a worker's peak grows with the volume
    return number, firsts


def _pairs(block: Block, *, how: Labelling, out_url: str, token: str, cap: int) -> np.ndarray:
    """Pass 2: the provisional ids that touch across the block's upper borders."""
    (provisional,) = opened_arrays(out_url, token, (PROVISIONAL,))
    read = lambda b: provisional[b.to_slices()]  # noqa: E731
    return block_pairs(read, block.write_box, how.volume.box, how.neighbourhood)


def _rewrite(
    block: Block,
    *,
    how: Labelling,
    out_url: str,
    token: str,
    cap: int,
) -> pd.DataFrame:
    """Pass 3: the block's final ids from its own table, written, and its done marker (a
    block already done is only read back); its objects' partial statistics."""
    number, box = block.number, block.write_box
    names = (INSTANCES, DONE, PROVISIONAL, TABLES, STARTS)
    labels, done, provisional, tables, starts = opened_arrays(out_url, token, names)
    if block.done:
        final = labels[box.to_slices()]
    else:
        begin, end = starts[number : number + 2]
        final = apply_table(provisional[box.to_slices()], tables[begin:end], number * cap)
        labels[box.to_slices()] = final
    foreground = None
    if how.probability is not None:
        volume, channel = how.probability
        foreground = decode_probability(volume.read(box)[channel])
    stats = block_stats(final, box, how.volume.shape, foreground)
    if not block.done:
        done[block.index] = 1  # last: a block that failed anywhere is done again
    malloc.give_back()
    return stats


def iter_blocks(volume_shape: Shape, block_shape: Shape) -> Iterator[Block]:
    """Each block of the grid, in C order."""
    grid = tuple(ceil_div(n, b) for n, b in zip(volume_shape, block_shape))
    for index, box in Box.from_shape(volume_shape).grid(block_shape):
        yield Block(block_number(index, grid), tuple(int(i) for i in index), box)
