"""Input chunks read once per task: decoded chunks kept while the task still needs them.

A task reads the read boxes of its shards one after another. Neighbouring read boxes overlap by
the network's halo, and a store cannot hand out part of a compressed chunk: every shard whose
halo touches a chunk would fetch and decode all of it again (5 to 16 times the stored bytes,
measured over HTTP). :class:`ChunkCache` stands between the reads of one task and the stored
array: it fetches each chunk the task needs once, keeps it decoded while a later read of the
task still needs it (its *uses*, counted from the task's read boxes before the first read) and
drops it after its last use. So a task holds only the chunks between where it has read and
where it reads next, and the store sees each chunk of the task once.

Missing chunks are fetched in as few calls as cover them exactly (one box when they form one,
else one per stored object: a Zarr v3 shard fetches its index once per call), so an object
store's parallel requests still go out together.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from unet_volume.geometry import Box, Shape, ceil_div

MAX_CHUNK_VOXELS = 2**26
"""Larger chunks (an unchunked HDF5 dataset is one chunk) are read as asked, not cached:
such a store reads any part of them without decoding the rest."""


@dataclass(slots=True)
class ReadCount:
    """What the reads of a task fetched: stored chunks decoded and their voxels (all channels)."""

    chunks: int = 0
    voxels: int = 0

    def add(self, other: ReadCount) -> None:
        self.chunks += other.chunks
        self.voxels += other.voxels


def chunk_indices(window: Box, chunks: Sequence[int]) -> Iterable[Shape]:
    """The indices of the chunks of spacing ``chunks`` that ``window`` (inside the array) touches.

    >>> list(chunk_indices(Box((0, 3), (1, 9)), (1, 4)))
    [(0, 0), (0, 1), (0, 2)]
    """
    ranges = [range(b // c, ceil_div(e, c)) for b, e, c in zip(window.begin, window.end, chunks)]
    return itertools.product(*ranges)


class _CountedArray:
    """What the array-likes here share: the stored array, its read unit, and what was read."""

    def __init__(self, array: Any, chunks: Sequence[int]) -> None:
        self.array = array
        self.chunks = tuple(int(c) for c in chunks)
        self.count = ReadCount()

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def dtype(self) -> Any:
        return self.array.dtype


class ChunkCache(_CountedArray):
    """An array-like over a stored array's last three (spatial) axes, read chunk by chunk.

    ``chunks`` is the read unit (a Zarr v3 shard's inner chunk), ``objects`` the stored object
    (the shard; the chunk when unsharded). ``uses`` counts, per chunk index, the reads that will
    touch it: a chunk is dropped after its last one. A chunk the uses do not name is dropped
    after the read that fetched it. Indexed as :func:`unet_volume.io.volumes.read_box` does it:
    ``cache[..., z_slice, y_slice, x_slice]`` with slices inside the array.
    """

    def __init__(
        self,
        array: Any,
        chunks: Sequence[int],
        *,
        uses: Counter[Shape],
        objects: Sequence[int] | None = None,
    ) -> None:
        super().__init__(array, chunks)
        self.objects = tuple(int(o) for o in objects) if objects is not None else self.chunks
        self.uses = Counter(uses)
        self._held: dict[Shape, np.ndarray] = {}
        self._spatial = tuple(int(n) for n in array.shape[-3:])

    @property
    def held(self) -> int:
        """Chunks held decoded now."""
        return len(self._held)

    def __getitem__(self, key: tuple[Any, ...]) -> np.ndarray:
        window = _window_of(key)
        needed = list(chunk_indices(window, self.chunks))
        missing = [index for index in needed if index not in self._held]
        if missing:
            self._fetch(missing)
        lead = tuple(self.array.shape[:-3])
        out = np.empty(lead + window.shape, dtype=np.dtype(self.array.dtype))
        for index in needed:
            chunk = self._box(index)
            part = chunk.intersect(window)
            target: tuple[Any, ...] = (..., *part.to_slices(window.begin))
            source: tuple[Any, ...] = (..., *part.to_slices(chunk.begin))
            out[target] = self._held[index][source]
            self._used(index)
        return out

    def _box(self, index: Shape) -> Box:
        begin = tuple(i * c for i, c in zip(index, self.chunks))
        end = tuple(min(b + c, n) for b, c, n in zip(begin, self.chunks, self._spatial))
        return Box(begin, end)

    def _used(self, index: Shape) -> None:
        self.uses[index] -= 1
        if self.uses[index] <= 0:
            del self._held[index]
            del self.uses[index]

    def _fetch(self, missing: list[Shape]) -> None:
        """Fetch ``missing`` chunks in as few calls as cover exactly them."""
        for group in _exact_boxes(missing, self.chunks, self.objects):
            hull = self._box(group[0]).hull(self._box(group[-1]))
            where: tuple[Any, ...] = (..., *hull.to_slices())
            data = np.asarray(self.array[where])
            for index in group:
                chunk = self._box(index)
                inside: tuple[Any, ...] = (..., *chunk.to_slices(hull.begin))
                part = data[inside]
                # A view would keep the whole fetched box alive while any of its chunks is held.
                self._held[index] = part.copy() if len(group) > 1 else part
                self.count.chunks += 1
                self.count.voxels += math.prod(data.shape[:-3]) * chunk.size


class CountedReads(_CountedArray):
    """An array-like that reads as asked, counting the chunks each read touches (no cache)."""

    def __getitem__(self, key: tuple[Any, ...]) -> np.ndarray:
        window = _window_of(key)
        data = np.asarray(self.array[key])
        self.count.chunks += sum(1 for _ in chunk_indices(window, self.chunks))
        self.count.voxels += data.size
        return data


def _window_of(key: tuple[Any, ...]) -> Box:
    if not isinstance(key, tuple) or key[:1] != (Ellipsis,) or len(key) != 4:
        raise TypeError(f"a ChunkCache is read as cache[..., z, y, x] with slices, not {key!r}")
    return Box(tuple(int(s.start) for s in key[1:]), tuple(int(s.stop) for s in key[1:]))


def _exact_boxes(missing: list[Shape], chunks: Shape, objects: Shape) -> list[list[Shape]]:
    """``missing`` as groups that each fill a box of chunks, sorted in C order inside each.

    One group when they fill their hull; else one per stored object they fill; else one each.
    """
    ordered = sorted(missing)
    if _fills_hull(ordered):
        return [ordered]
    per = tuple(o // c for o, c in zip(objects, chunks))
    by_object: dict[Shape, list[Shape]] = {}
    for index in ordered:
        by_object.setdefault(tuple(i // p for i, p in zip(index, per)), []).append(index)
    groups: list[list[Shape]] = []
    for group in by_object.values():
        groups.extend([group] if _fills_hull(group) else [[index] for index in group])
    return groups


def _fills_hull(indices: list[Shape]) -> bool:
    """Whether distinct chunk ``indices`` fill the box that spans them."""
    spans = [max(i[a] for i in indices) - min(i[a] for i in indices) + 1 for a in range(3)]
    return math.prod(spans) == len(indices)


def planned_uses(windows: Iterable[Box], chunks: Sequence[int]) -> Counter[Shape]:
    """Per chunk index, how many of ``windows`` (stored regions, in reading order) touch it."""
    uses: Counter[Shape] = Counter()
    for window in windows:
        uses.update(chunk_indices(window, chunks))
    return uses
