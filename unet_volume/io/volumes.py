"""Reading input volumes and writing prediction stores.

Inputs are any of :mod:`unet_volume.io.formats` (Zarr, TIFF stacks and folders, HDF5), with
shape ``(z, y, x)`` or ``(c, z, y, x)``, never read whole. A :class:`Volume` is a small picklable
description of one: workers re-open it from its URL and read only their own box.

Voxels outside the volume are mirrored without repeating the edge voxel
(:mod:`unet_volume.border`), as in the U-Net authors' release.

Outputs are Zarr v3 groups that ``xarray.open_zarr`` reads (see
:mod:`unet_volume.output.prediction`).
"""

from __future__ import annotations

import functools
import logging
import math
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from unet_volume.border import mirrored_range, reflect
from unet_volume.errors import InputError, is_transient
from unet_volume.geometry import Box, Shape
from unet_volume.io.chunk_cache import (
    MAX_CHUNK_VOXELS,
    ChunkCache,
    CountedReads,
    ReadCount,
    planned_uses,
)
from unet_volume.io.formats import Kind, input_exists, input_kind, opened_array, stored_voxel_size
from unet_volume.io.locations import (
    absolute,
    access_denied,
    exists,
    fast_io,
    remove_output,
    removed_on_failure,
)
from unet_volume.label_offset import moved, offset_reach

T = TypeVar("T")
log = logging.getLogger(__name__)


class ArrayLike(Protocol):
    """Anything sliceable with a shape: a numpy array, a zarr array."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> Any: ...

    def __getitem__(self, key: Any) -> Any: ...


def read_box(array: ArrayLike, box: Box) -> np.ndarray:
    """Read ``box`` (spatial, may reach outside) from a ``(z, y, x)`` or ``(c, z, y, x)`` array.

    Only the part of the array the mirrored box touches is read (one slice per axis),
    so a block at the volume border reads no more than an interior one. Returns
    ``(c, *box.shape)`` (``c = 1`` for arrays without a channel axis).
    """
    spatial = tuple(array.shape[-box.ndim :])
    if box.is_empty():
        channels = array.shape[0] if len(array.shape) > box.ndim else 1
        empty: np.ndarray = np.zeros((channels, *box.shape), dtype=np.dtype(array.dtype))
        return empty
    indices = [reflect(np.arange(b, e), n) for b, e, n in zip(box.begin, box.end, spatial)]
    window = stored_window(box, spatial).to_slices()
    data: np.ndarray = np.asarray(array[(Ellipsis, *window)])
    if data.ndim == box.ndim:
        data = data[np.newaxis]
    # Mirror axis by axis, only where the box reaches out (a contiguous take each, 4x faster
    # than one fancy index over every axis).
    for axis, (index, w, b, e, n) in enumerate(
        zip(indices, window, box.begin, box.end, spatial), start=1
    ):
        if b < 0 or e > n:
            data = np.take(data, index - w.start, axis=axis)
    return data


def stored_window(box: Box, shape: Sequence[int]) -> Box:
    """The stored voxels that reading ``box`` (mirrored outside ``shape``) touches: one range
    per axis, the box itself inside the volume.

    >>> str(stored_window(Box((0, -92, 420), (1, 604, 1116)), (4, 1024, 1024)))
    '[0:1, 0:604, 420:1024]'
    """
    ranges = [mirrored_range(b, e, n) for b, e, n in zip(box.begin, box.end, shape)]
    return Box(tuple(lo for lo, _ in ranges), tuple(hi for _, hi in ranges))


@dataclass(frozen=True, slots=True)
class Volume:
    """An input volume: where it is and what it holds; reopened by URL wherever it is read.

    ``shape`` is spatial ``(z, y, x)``; ``channels`` counts the leading channel axis
    (1 when the array has none). ``voxel_size`` is ``(z, y, x)`` in ``units``, or None
    when neither the input nor the caller gives one.
    """

    url: str
    kind: Kind
    shape: Shape
    channels: int
    dtype: str
    voxel_size: tuple[float, float, float] | None
    units: str | None
    chunks: Shape | None = None
    """Spatial chunks ``(z, y, x)`` of the stored array (a TIFF's pages), for aligned reads:
    the read unit (a Zarr v3 shard's inner chunk)."""
    objects: Shape | None = None
    """Spatial shape of the stored objects when they hold several chunks (Zarr v3 shards)."""
    token: str = field(default_factory=lambda: uuid.uuid4().hex, compare=False, repr=False)
    """This opening of the volume: a Zarr array is opened once per process and token."""
    offset: tuple[float, float, float] = (0.0, 0.0, 0.0)
    """Read moved by this many voxels ``(z, y, x)``, each at most 1: the labels' registration
    that a model was trained to (see :mod:`unet_volume.label_offset`)."""

    @property
    def dtype_name(self) -> str:
        """The element type as people write it (``uint8``; :attr:`dtype` is ``|u1``)."""
        return np.dtype(self.dtype).name

    @property
    def read_itemsize(self) -> int:
        """Bytes per voxel of what :meth:`read` returns: the stored type's, or float32's when
        the read is moved by an :attr:`offset` (interpolated); block memory counts these."""
        if any(self.offset):
            return np.dtype(np.float32).itemsize
        return np.dtype(self.dtype).itemsize

    def read(self, box: Box) -> np.ndarray:
        """Read a spatial box, mirrored outside the volume: ``(channels, *box.shape)``.

        Only the chunks (TIFF pages) the box touches are read. A Zarr input is opened once per
        worker process (its metadata read once, not per block); a TIFF per read, as its file
        handle must be closed. A chunk that cannot be decoded (corrupt, truncated) is named in
        an :class:`InputError`; transient errors pass as they are, to be retried. A volume with
        an :attr:`offset` reads one voxel more per side and interpolates (exact per voxel).
        """
        with self._opened() as array:
            return self._read(array, box)

    def window(self, box: Box) -> Box:
        """The stored voxels (z, y, x) that :meth:`read` of ``box`` touches."""
        return stored_window(box.grow(offset_reach(self.offset)), self.shape)

    @contextmanager
    def reading(self, boxes: Iterable[Box]) -> Iterator[VolumeReader]:
        """One opening of the input for reading ``boxes`` in turn, each chunk fetched once.

        The reader's :meth:`VolumeReader.read` reads any box as :meth:`read` does; the chunks
        that ``boxes`` share are decoded once and kept until the last of them is read
        (:class:`~unet_volume.io.chunk_cache.ChunkCache`). Its ``count`` says what was fetched.
        """
        uses = planned_uses((self.window(b) for b in boxes), self.chunks or self.shape)
        with self._opened() as array:
            yield VolumeReader(self, self._cached(array, uses))

    def _cached(self, array: Any, uses: Counter[Shape]) -> Any:
        chunks = self.chunks or self.shape
        if math.prod(chunks) > MAX_CHUNK_VOXELS:
            return CountedReads(array, chunks)
        return ChunkCache(array, chunks, uses=uses, objects=self.objects)

    @contextmanager
    def _opened(self) -> Iterator[Any]:
        """The stored array: a Zarr one opened once per process, other kinds per use."""
        if self.kind == "zarr":
            yield _opened_zarr(self.url, self.token)
            return
        with opened_array(self.url, self.kind) as array:
            yield array

    def _read(self, array: Any, box: Box) -> np.ndarray:
        if any(self.offset):
            return moved(self._stored_read(array, box.grow(offset_reach(self.offset))), self.offset)
        return self._stored_read(array, box)

    def _stored_read(self, array: Any, box: Box) -> np.ndarray:
        stored = getattr(array, "array", array)  # under a ChunkCache
        try:
            return read_box(array, box)
        except Exception as error:
            if is_transient(error) or isinstance(error, InputError):
                raise
            if denied := access_denied(self.url, error):
                raise denied from error
            raise InputError(
                f"input {self.url} cannot be read in {box}: {_bad_chunk(stored, box, error)}; "
                "replace it (copy or convert the input again), then run the same command again"
            ) from error

    @property
    def box(self) -> Box:
        return Box.from_shape(self.shape)


@dataclass(frozen=True, slots=True)
class VolumeReader:
    """Reads of one task from one opening of a volume (:meth:`Volume.reading`)."""

    volume: Volume
    array: ChunkCache | CountedReads

    def read(self, box: Box) -> np.ndarray:
        """The volume over ``box``, as :meth:`Volume.read` gives it."""
        return self.volume._read(self.array, box)

    @property
    def count(self) -> ReadCount:
        """The stored chunks fetched so far, and their voxels."""
        return self.array.count


def _bad_chunk(array: Any, box: Box, error: Exception) -> str:
    """Which chunk of ``array`` in ``box`` fails to read, and why (on the error path only)."""
    shape = tuple(array.shape[-box.ndim :])
    spatial = Box.from_shape(shape)
    chunks = tuple(getattr(array, "chunks", array.shape))[-box.ndim :]
    lead = len(array.shape) - box.ndim
    # The voxels read_box reads: the box, mirrored into the volume.
    indices = [reflect(np.arange(b, e), n) for b, e, n in zip(box.begin, box.end, shape)]
    window = Box(tuple(int(i.min()) for i in indices), tuple(int(i.max()) + 1 for i in indices))
    for _, chunk in window.snap(chunks).grid(chunks):
        part = chunk.intersect(spatial)
        try:
            np.asarray(array[(Ellipsis, *part.to_slices())])
        except Exception as cause:
            coords = tuple(b // c for b, c in zip(part.begin, chunks))
            key = _chunk_key(array, (0,) * lead + coords)
            return f"chunk {coords}{key} is damaged ({type(cause).__name__}: {cause})"
    return f"{type(error).__name__}: {error}"


def _chunk_key(array: Any, coords: tuple[int, ...]) -> str:
    try:
        return f" (key {array.metadata.encode_chunk_key(coords)})"
    except (AttributeError, TypeError, ValueError):
        return ""


def check_z_range(
    z_range: Sequence[int] | None, depth: int | None, *, what: str = "z range"
) -> tuple[int, int]:
    """``z_range`` (half-open; None: all ``depth`` slices) if it is a non-empty part of them.

    The one check of every z range (evaluation, training and validation slices, class balance).
    ``depth=None`` checks the range alone, before any volume is open (a training recipe).

    >>> check_z_range((20, 25), 25), check_z_range(None, 25)
    ((20, 25), (0, 25))
    """
    if z_range is None and depth is not None:
        return 0, depth
    bound = "" if depth is None else f" <= {depth}"
    values = tuple(z_range) if z_range is not None else ()
    if (
        len(values) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in values)
        or not 0 <= values[0] < values[1] <= (depth if depth is not None else values[1])
    ):
        part = "non-empty part of the volume's" if depth is not None else "non-empty range of"
        slices = f"{depth} slices" if depth is not None else "slices"
        shown = ":".join(map(str, values)) if len(values) == 2 else repr(z_range)
        raise InputError(
            f"{what} {shown} is not a {part} {slices}; pass BEGIN:END with 0 <= BEGIN < END{bound}"
        )
    return int(values[0]), int(values[1])


def open_volume(
    url: str | Path,
    *,
    voxel_size: Sequence[float] | None = None,
    units: str | None = None,
) -> Volume:
    """Open and validate an input volume; ``voxel_size`` (z, y, x) overrides the stored one.

    Raises :class:`InputError` with the fix for: a missing or unreadable input, a rank
    other than 3 or 4, an empty array, a non-numeric dtype.
    """
    url = str(url)
    try:
        found = input_exists(url)
    except PermissionError as error:
        raise access_denied(url, error) or error from error
    if not found:
        raise InputError(
            f"input {url} does not exist; pass a Zarr array, a TIFF stack, a folder of TIFFs, "
            "an HDF5 dataset (file.h5:/path) or an N5 dataset (container.n5/path)"
        )
    kind = input_kind(url)
    try:
        with opened_array(url, kind) as array:
            return _describe(array, url, kind, voxel_size, units)
    except (InputError, ConnectionError, TimeoutError):
        raise  # transient storage errors stay themselves, so callers can retry them
    except Exception as error:  # zarr/tifffile raise many types for unreadable data
        if denied := access_denied(url, error):
            raise denied from error
        first_line = str(error).splitlines()[0] if str(error) else ""
        raise InputError(
            f"input {url} is not a readable {kind} array ({type(error).__name__}: {first_line}); "
            "pass a Zarr array (v2 or v3) or a TIFF stack"
        ) from error


def _describe(
    array: Any,
    url: str,
    kind: Kind,
    voxel_size: Sequence[float] | None,
    units: str | None,
) -> Volume:
    shape = tuple(int(s) for s in array.shape)
    if len(shape) not in (3, 4):
        raise InputError(
            f"input {url} has shape {shape}; expected (z, y, x) or (c, z, y, x): "
            "give a 2D image a z axis of size 1"
        )
    if 0 in shape:
        raise InputError(f"input {url} is empty (shape {shape}); pass a volume with data")
    dtype = np.dtype(array.dtype)
    if dtype.kind not in "uif":
        raise InputError(f"input {url} has dtype {dtype}; expected integer or float voxels")
    stored_size, stored_units = stored_voxel_size(array, url, kind)
    size = tuple(float(v) for v in voxel_size) if voxel_size is not None else stored_size
    if size is not None and (len(size) != 3 or any(v <= 0 for v in size)):
        raise InputError(f"voxel size {size} must be 3 positive numbers (z, y, x), e.g. 50,4,4")
    return Volume(
        url=absolute(url),  # messages name the path as given; workers get one they can open
        kind=kind,
        shape=shape[-3:],
        channels=shape[0] if len(shape) == 4 else 1,
        dtype=dtype.str,
        voxel_size=size,
        units=units or stored_units or ("nm" if size is not None else None),
        chunks=tuple(int(c) for c in getattr(array, "chunks", None) or shape)[-3:],
        objects=_shards(array),
    )


def _shards(array: Any) -> Shape | None:
    """The spatial shape of a Zarr v3 array's shards; None when it is not sharded."""
    shards = getattr(array, "shards", None)
    return tuple(int(s) for s in shards)[-3:] if shards else None


@functools.lru_cache(maxsize=8)
def _opened_zarr(url: str, token: str) -> Any:
    """The Zarr array at ``url``, opened once per process for each ``token`` (a run's volume).

    Keyed by the token as well as the URL: an array rewritten under the same URL between two
    runs is opened again, never read through the first run's metadata.
    """
    with fast_io(url), opened_array(url, "zarr") as array:
        return array


def convert_to_zarr(
    source: str | Path,
    out: str | Path,
    *,
    chunks: Sequence[int] = (1, 512, 512),
    voxel_size: Sequence[float] | None = None,
    units: str | None = None,
    overwrite: bool = False,
) -> Volume:
    """Copy a volume (e.g. a TIFF stack) into a chunked Zarr v3 array, with dims and voxel size.

    Zarr's chunks let every block task read just its own region; a TIFF must be read page by
    page. The copy goes one slab of ``chunks[0]`` slices at a time, so memory stays bounded,
    and a failed copy leaves nothing behind.
    """
    volume = open_volume(source, voxel_size=voxel_size, units=units)
    out = str(out)
    if exists(out) and not overwrite:
        raise InputError(
            f"output {out} already exists; pass overwrite=True (--overwrite) or another path"
        )
    remove_output(out)
    lead = (volume.channels,) if volume.channels > 1 else ()
    names = ("c", "z", "y", "x")[-len(lead) - 3 :]
    chunk_shape = lead + tuple(min(c, n) for c, n in zip(chunks, volume.shape))
    depth, step = volume.shape[0], chunk_shape[len(lead)]
    attrs = (
        {"voxel_size": list(volume.voxel_size), "units": volume.units} if volume.voxel_size else {}
    )
    with removed_on_failure(out):  # no partial copy left behind
        target = zarr.create_array(
            out,
            shape=lead + volume.shape,
            chunks=chunk_shape,
            dtype=volume.dtype,
            dimension_names=names,
            attributes={**attrs, "source": volume.url},
            compressors=BloscCodec(cname="zstd", clevel=3),
        )
        with opened_array(volume.url, volume.kind) as array:
            for z in range(0, depth, step):
                slab = (..., slice(z, min(z + step, depth)), slice(None), slice(None))
                target[slab] = array[slab]
    return open_volume(out)
