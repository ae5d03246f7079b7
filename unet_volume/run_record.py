"""What an output records of the run that writes it: its identity, and which blocks are done.

A terabyte run is millions of blocks and hours of cluster time; workers die, jobs are
pre-empted, drivers are killed. So the output itself says how far the run got:

- **Identity**, recorded once when the output is created: the model's sha256, the geometry
  (block, tile, halo), the output dtype, test-time augmentation, and a fingerprint of the
  input (URL, shape, dtype, chunking, and hashes of a few sampled regions). Running the same
  prediction again compares identities: equal resumes, different is refused naming what
  differs. A resume can never mix the blocks of two runs.
- **Done markers**: a ``done`` array with one element, and one chunk object, per block
  (dims ``block_z, block_y, block_x``). A block task writes its marker after its data
  chunks are written, and no two tasks write the same object. The chunk keys are flat
  (``done/c.3.0.7``), so the done blocks of a 10^6-block run are one listing away, not 10^6
  reads. The marker does not depend on how the data arrays are chunked or sharded.
- **Failures**: the driver records failed blocks (index, box, error) in the group's
  attributes; blocks neither done nor failed are missing.

::

    OUTPUT/
      zarr.json     attributes: unet_volume = {identity, complete, failures, report, ...}
      done/         uint8 (block_z, block_y, block_x), chunk 1x1x1: c.0.0.0, c.0.0.1, ...
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import zarr

from unet_volume.geometry import Box, Shape, ceil_div
from unet_volume.storage import Volume, opened_array

DONE = "done"
"""Name of the done-marker array in the output group."""
BLOCK_DIMS = ("block_z", "block_y", "block_x")
SAMPLE = (1, 256, 256)
"""Shape of each region of the input hashed into its fingerprint (z, y, x)."""


def fingerprint(volume: Volume) -> dict[str, Any]:
    """What identifies an input cheaply: where, shape, dtype, chunking, and sampled content.

    Three regions of :data:`SAMPLE` (first, middle and last slice, centred in y and x) are
    hashed: an input rewritten under the same URL is noticed without reading the volume.
    """
    with opened_array(volume.url, volume.kind) as array:
        chunks = getattr(array, "chunks", None)
    digest = hashlib.sha256()
    for box in _sample_boxes(volume.shape):
        digest.update(np.ascontiguousarray(volume.read(box)).tobytes())
    return {
        "url": volume.url,
        "shape": list(volume.shape),
        "channels": volume.channels,
        "dtype": volume.dtype,
        "chunks": list(chunks) if chunks is not None else None,
        "samples_sha256": digest.hexdigest(),
    }


def _sample_boxes(shape: Shape) -> list[Box]:
    depth, height, width = shape
    size = (1, min(SAMPLE[1], height), min(SAMPLE[2], width))
    begin_y, begin_x = (height - size[1]) // 2, (width - size[2]) // 2
    slices = sorted({0, depth // 2, depth - 1})
    return [Box.from_shape(size, begin=(z, begin_y, begin_x)) for z in slices]


def identity_differences(recorded: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """The fields in which two run identities differ, e.g. ``["model sha256", "input"]``.

    >>> identity_differences({"model_sha256": "a", "tta": False}, {"model_sha256": "b", "tta": False})
    ['model_sha256: a, now b']
    """  # noqa: E501
    differences = []
    for key in sorted(set(recorded) | set(wanted)):
        before, now = recorded.get(key), wanted.get(key)
        if before != now:
            differences.append(f"{key}: {_short(before)}, now {_short(now)}")
    return differences


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def block_grid(volume_shape: Sequence[int], block_shape: Sequence[int]) -> Shape:
    """Blocks per axis: the shape of the done-marker array."""
    return tuple(ceil_div(n, b) for n, b in zip(volume_shape, block_shape, strict=True))


def create_done_markers(group: zarr.Group, grid: Shape) -> None:
    """The ``done`` array: one uncompressed 1-voxel chunk per block, flat chunk keys."""
    group.create_array(
        DONE,
        shape=grid,
        chunks=(1,) * len(grid),
        dtype="uint8",
        fill_value=0,
        compressors=None,
        chunk_key_encoding={"name": "default", "separator": "."},
        dimension_names=BLOCK_DIMS,
        attributes={"long_name": "block done (1) or not (0)"},
    )


def mark_done(group_url: str, index: Shape) -> None:
    """Record block ``index`` as done; call only after its data chunks are written."""
    markers = zarr.open_array(f"{group_url.rstrip('/')}/{DONE}", mode="r+", zarr_format=3)
    markers[tuple(index)] = 1


def done_blocks(group_url: str) -> set[Shape]:
    """The indices of the blocks marked done: one listing of the ``done`` array's chunks."""
    fs, path = fsspec.core.url_to_fs(f"{group_url.rstrip('/')}/{DONE}")
    names = fs.ls(path, detail=False) if fs.exists(path) else []
    found = set()
    for name in names:
        key = str(name).rstrip("/").rsplit("/", 1)[-1]
        if key.startswith("c."):
            found.add(tuple(int(i) for i in key[2:].split(".")))
    return found


@dataclass(frozen=True, slots=True, order=True)
class BlockFailure:
    """A block that failed for good: its index, write box and error, as the output records it."""

    index: Shape
    box: str
    error: str

    def to_dict(self) -> dict[str, Any]:
        return {"index": list(self.index), "box": self.box, "error": self.error}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BlockFailure:
        return cls(tuple(int(i) for i in data["index"]), str(data["box"]), str(data["error"]))

    def __str__(self) -> str:
        return f"block {self.index} {self.box}: {self.error}"


@dataclass(frozen=True, slots=True)
class RunStatus:
    """How far the run that writes an output got: blocks done, failed and missing."""

    url: str
    total: int
    done: int
    complete: bool
    identity: dict[str, Any] = field(default_factory=dict)
    failures: tuple[BlockFailure, ...] = ()

    @property
    def missing(self) -> int:
        return self.total - self.done - len(self.failures)

    def summary(self) -> str:
        """One line: ``done 40 / failed 1 / missing 79 / total 120 blocks``."""
        state = "complete" if self.complete else "incomplete"
        return (
            f"{self.url}: {state}; done {self.done} / failed {len(self.failures)} / "
            f"missing {self.missing} / total {self.total} blocks"
        )
