"""Connected components of a volume too large for one machine, block by block, exactly.

The result equals ``scipy.ndimage.label`` on the whole volume, up to the numbering, for any
block shape. Three passes, each one task per block, none of which reads more than its block
and a one-voxel rim:

1. **Label** each block on its own (``scipy.ndimage.label``). Block-local id ``i`` of block
   ``b`` becomes the provisional id ``b * capacity + i``: unique across the volume without
   any exchange (``capacity`` is the block's voxel count, the most objects a block can hold).
2. **Pairs**: for each axis, a block's last plane and the plane after it (the first of the
   next block), both grown by one voxel on the other axes so that diagonal neighbours in
   edge- and corner-adjacent blocks are seen too, give the pairs of provisional ids that
   touch across the border under the connectivity. Every pair of adjacent voxels in two
   blocks lies across some axis's border, inside the grown planes of the lower block.
3. **Relabel**: the pairs are merged (graph components, ``scipy.sparse.csgraph``) into final
   ids, numbered 1, 2, ... by each object's first voxel in C order over the whole volume, as
   scipy numbers them: the result is scipy's labelling itself, not only up to a renumbering.
   Pass 1 records each block object's first voxel for this. Each block receives only its own
   table (local id -> final id), never the whole map.

Connectivity is 6 (faces) or 26 (faces, edges, corners) in 3D; ``per_slice`` labels each z
slice on its own (4 or 8 neighbours in the plane), as 2D segmentations of EM stacks are.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from unet_volume.errors import InputError
from unet_volume.geometry import Box, Shape

Connectivity = Literal[6, 26]


def structure(connectivity: int, *, per_slice: bool) -> np.ndarray:
    """The (3, 3, 3) neighbourhood: 6 or 26 neighbours, or their z = 0 plane if ``per_slice``.

    >>> int(structure(6, per_slice=False).sum()), int(structure(26, per_slice=True).sum())
    (7, 9)
    """
    if connectivity not in (6, 26):
        raise InputError(f"connectivity {connectivity!r} is not 6 or 26; pass 6 (faces) or 26")
    shape = ndimage.generate_binary_structure(3, 1 if connectivity == 6 else 3)
    if per_slice:
        shape = shape.copy()
        shape[0], shape[2] = False, False
    return shape


def capacity(block_shape: Sequence[int]) -> int:
    """Provisional ids per block: its voxel count bounds its number of objects."""
    return int(np.prod(block_shape))


def block_number(index: Sequence[int], grid: Sequence[int]) -> int:
    """The block's position in C order on the block grid (``grid`` blocks per axis)."""
    return int(np.ravel_multi_index(tuple(index), tuple(grid)))


def label_block(
    mask: np.ndarray, neighbourhood: np.ndarray, base: int, box: Box, volume: Shape
) -> tuple[np.ndarray, np.ndarray]:
    """Provisional ids of the components of ``mask``, the block at ``box`` of a ``volume``
    (``base + 1``, ...; 0 is background), and the first voxel of each in C order over the
    whole volume (flat index), by which the final ids are numbered."""
    local, count = ndimage.label(mask, structure=neighbourhood)
    return provisional_ids(local, count, base, box, volume)


def provisional_ids(
    local: np.ndarray, count: int, base: int, box: Box, volume: Shape
) -> tuple[np.ndarray, np.ndarray]:
    """Block-local ids 1..``count`` as provisional ids (``base + local``), and each one's
    first voxel in C order over the whole ``volume`` (see :func:`label_block`)."""
    where = np.nonzero(local)
    flat = np.ravel_multi_index(tuple(w + b for w, b in zip(where, box.begin)), tuple(volume))
    firsts = np.full(count, np.iinfo(np.int64).max, np.int64)
    np.minimum.at(firsts, local[where] - 1, flat)
    ids = local.astype(np.uint64)
    ids[local > 0] += np.uint64(base)
    return ids, firsts


def border_boxes(block: Box, volume: Box, axis: int) -> tuple[Box, Box] | None:
    """The last plane of ``block`` along ``axis`` and the plane after it, each grown by one
    voxel on the other axes and clipped to ``volume``; None at the volume's end."""
    if block.end[axis] >= volume.end[axis]:
        return None
    grown = block.grow([0 if a == axis else 1 for a in range(block.ndim)]).intersect(volume)
    last = list(grown.begin), list(grown.end)
    last[0][axis], last[1][axis] = block.end[axis] - 1, block.end[axis]
    low = Box(tuple(last[0]), tuple(last[1]))
    return low, low.shift([1 if a == axis else 0 for a in range(block.ndim)])


def touching_pairs(
    low: np.ndarray, high: np.ndarray, axis: int, neighbourhood: np.ndarray, own: Box, grown: Box
) -> np.ndarray:
    """The (k, 2) unique pairs of ids that touch across the border between planes ``low``
    and ``high`` (1 voxel thick along ``axis``, over box ``grown``'s other axes).

    Only pairs with a voxel of ``low`` inside ``own`` (the block's own part of the plane)
    count, so each pair is found by the one block it belongs to.
    """
    a, b = np.squeeze(low, axis), np.squeeze(high, axis)
    rest = [d for d in range(low.ndim) if d != axis]
    inside = np.zeros(a.shape, dtype=bool)
    inside[
        tuple(slice(own.begin[d] - grown.begin[d], own.end[d] - grown.begin[d]) for d in rest)
    ] = True
    found = []
    for offset in np.argwhere(neighbourhood) - 1:
        if offset[axis] != 1:
            continue
        shift = [int(offset[d]) for d in rest]
        src = tuple(slice(max(0, -s), a.shape[i] - max(0, s)) for i, s in enumerate(shift))
        dst = tuple(slice(max(0, s), a.shape[i] - max(0, -s)) for i, s in enumerate(shift))
        x, y, keep = a[src], b[dst], inside[src]
        both = (x > 0) & (y > 0) & keep
        found.append(np.stack([x[both], y[both]], axis=1))
    pairs = np.concatenate(found) if found else np.zeros((0, 2), np.uint64)
    return np.unique(pairs, axis=0) if len(pairs) else pairs.astype(np.uint64)


def block_pairs(
    read: Callable[[Box], np.ndarray], block: Box, volume: Box, neighbourhood: np.ndarray
) -> np.ndarray:
    """The pairs of provisional ids that touch across ``block``'s upper borders, on every axis;
    ``read(box)`` gives the provisional ids in ``box``."""
    found = [np.zeros((0, 2), np.uint64)]
    for axis in range(volume.ndim):
        borders = border_boxes(block, volume, axis)
        if borders is not None:
            low, high = borders
            found.append(touching_pairs(read(low), read(high), axis, neighbourhood, block, low))
    return np.concatenate(found)


@dataclass(frozen=True)
class Relabel:
    """The final ids: ``tables[b][i]`` is the final id of block ``b``'s local id ``i``."""

    tables: dict[int, np.ndarray]
    count: int


def relabel(
    firsts: dict[int, np.ndarray], pairs: Iterable[np.ndarray], block_capacity: int
) -> Relabel:
    """Merge the provisional ids that touch, and number the objects 1, 2, ... by their first
    voxel in C order (``firsts``: per block number, each local object's first flat index)."""
    counts = {b: len(f) for b, f in firsts.items()}
    blocks = sorted(counts)
    ids = np.concatenate(
        [b * block_capacity + np.arange(1, counts[b] + 1, dtype=np.int64) for b in blocks]
        or [np.zeros(0, np.int64)]
    )
    found = [np.asarray(p, dtype=np.int64).reshape(-1, 2) for p in pairs]
    edges = np.concatenate(found or [np.zeros((0, 2), np.int64)])
    nodes = np.searchsorted(ids, edges)  # ids is sorted: blocks ascending, local ids ascending
    graph = coo_matrix(
        (np.ones(len(nodes), np.int8), (nodes[:, 0], nodes[:, 1])), shape=(len(ids), len(ids))
    )
    objects, component = connected_components(graph, directed=False)
    first = np.full(objects, np.iinfo(np.int64).max, np.int64)
    np.minimum.at(first, component, np.concatenate([firsts[b] for b in blocks] or [first[:0]]))
    order = np.empty(objects, np.int64)
    order[np.argsort(first)] = np.arange(1, objects + 1)  # numbered by first voxel, as scipy
    final = order[component]
    tables, start = {}, 0
    for b in blocks:
        tables[b] = np.concatenate([[0], final[start : start + counts[b]]]).astype(np.uint64)
        start += counts[b]
    return Relabel(tables, objects)


def apply_table(provisional: np.ndarray, table: np.ndarray, base: int) -> np.ndarray:
    """A block's final ids from its provisional ones (``base + local``; 0 stays 0)."""
    local = np.where(provisional > 0, provisional - np.uint64(base), 0).astype(np.int64)
    return table[local]


def label_blockwise(
    mask: np.ndarray, block_shape: Shape, connectivity: int = 6, *, per_slice: bool = False
) -> tuple[np.ndarray, int]:
    """The three passes in one process over an in-memory ``mask`` (z, y, x): the reference
    that the distributed run follows block for block, and what the tests compare with
    ``scipy.ndimage.label``."""
    neighbourhood = structure(connectivity, per_slice=per_slice)
    volume = Box.from_shape(mask.shape)
    cap = capacity(block_shape)
    grid = tuple(-(-n // b) for n, b in zip(mask.shape, block_shape))
    provisional = np.zeros(mask.shape, np.uint64)
    firsts: dict[int, np.ndarray] = {}
    blocks = {block_number(i, grid): box for i, box in volume.grid(block_shape)}
    for number, box in blocks.items():
        block = mask[box.to_slices()]
        ids, firsts[number] = label_block(block, neighbourhood, number * cap, box, mask.shape)
        provisional[box.to_slices()] = ids
    pairs = [
        block_pairs(lambda b: provisional[b.to_slices()], box, volume, neighbourhood)
        for box in blocks.values()
    ]
    result = relabel(firsts, pairs, cap)
    labels = np.zeros(mask.shape, np.uint64)
    for number, box in blocks.items():
        labels[box.to_slices()] = apply_table(
            provisional[box.to_slices()], result.tables[number], number * cap
        )
    return labels, result.count
