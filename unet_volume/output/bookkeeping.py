"""What an output records of the run that writes it: its identity, and which blocks are done.

A terabyte run is millions of blocks and hours of cluster time; workers die, jobs are
pre-empted, drivers are killed. So the output itself says how far the run got:

- **Identity**, recorded once when the output is created: the model's sha256, the geometry
  (block, tile, halo), the output dtype, test-time augmentation, and a fingerprint of the
  input (URL, shape, dtype, chunking, and hashes of a few sampled regions). Running the same
  prediction again compares identities: equal resumes, different is refused naming what
  differs. A resume can never mix the blocks of two runs.
- **Done markers**: a ``run/done`` array with one element per block (dims ``block_z, block_y,
  block_x``) and one chunk object per shard of blocks (see :mod:`unet_volume.grid`). It sits in
  its own group, so that ``xarray.open_zarr(OUTPUT)`` shows the data and not the bookkeeping;
  outputs written before kept it at the top (``done``), where it is still read and resumed.
  A task writes its marker after its data is written, and no two tasks write the same object.
  The chunk keys are flat (``done/c.3.0.7``), so the done blocks of a 10^6-block run are one
  listing away, not 10^6 reads.
- **Failures**: the driver records failed blocks (index, box, error) in the group's
  attributes; blocks neither done nor failed are missing.

::

    OUTPUT/
      zarr.json     attributes: unet_volume = {identity, complete, failures, report, ...}
      run/done/     uint8 (block_z, block_y, block_x), chunk = a shard's blocks: c.0.0.0, ...
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import platform
import re
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, cast

import fsspec
import numpy as np
import zarr

from unet_volume.errors import OutputExistsError
from unet_volume.geometry import Box, Shape
from unet_volume.grid import OutputLayout, blocks_in
from unet_volume.io.formats import opened_array
from unet_volume.io.volumes import Volume

log = logging.getLogger(__name__)

DONE = "run/done"
"""Path of the done-marker array in the output group."""
LEGACY_DONE = "done"
"""Where outputs written before kept it: beside the data, a variable of ``xarray.open_zarr``."""
BLOCK_DIMS = ("block_z", "block_y", "block_x")
DONE_KEY = re.compile(r"c\.\d+\.\d+\.\d+")
SAMPLE = (1, 256, 256)
"""Shape of each region of the input hashed into its fingerprint (z, y, x)."""


def fingerprint(volume: Volume) -> dict[str, Any]:
    """What identifies an input cheaply: where, shape, dtype, chunking, and sampled content.

    Three regions of up to :data:`SAMPLE` (first, middle and last slice, centred in y and x)
    are hashed: an input rewritten under the same URL is noticed without reading the volume.
    Each region stays inside the stored chunk that holds its centre, so the fingerprint reads
    three chunks, not (with 64^3 chunks) the 48 a small volume may have in all.
    """
    with opened_array(volume.url, volume.kind) as array:
        chunks = getattr(array, "chunks", None)
    digest = hashlib.sha256()
    stored = replace(volume, offset=(0.0, 0.0, 0.0))  # the input as stored, not as read
    spatial = tuple(chunks[-3:]) if chunks is not None else volume.shape
    for box in _sample_boxes(volume.shape, spatial):
        digest.update(np.ascontiguousarray(stored.read(box)).tobytes())
    return {
        "url": volume.url,
        "shape": list(volume.shape),
        "channels": volume.channels,
        "dtype": volume.dtype,
        "chunks": list(chunks) if chunks is not None else None,
        "samples_sha256": digest.hexdigest(),
    }


def _sample_boxes(shape: Shape, chunks: Shape) -> list[Box]:
    """The sampled regions: centred in y and x, each cut to the chunk that holds its centre.

    >>> _sample_boxes((192, 256, 256), (64, 64, 64))[0]
    Box([0:1, 128:192, 128:192])
    """
    depth, height, width = shape
    size = (1, min(SAMPLE[1], height), min(SAMPLE[2], width))
    begin_y, begin_x = (height - size[1]) // 2, (width - size[2]) // 2
    slices = sorted({0, depth // 2, depth - 1})
    boxes = []
    for z in slices:
        box = Box.from_shape(size, begin=(z, begin_y, begin_x))
        centre = tuple((b + e) // 2 for b, e in zip(box.begin, box.end))
        chunk = Box.from_shape(chunks, begin=tuple(c // n * n for c, n in zip(centre, chunks)))
        boxes.append(box.intersect(chunk))
    return boxes


def identity_differences(
    recorded: Mapping[str, Any], wanted: Mapping[str, Any], prefix: str = ""
) -> list[str]:
    """The fields in which two run identities differ, nested fields by their path.

    >>> identity_differences({"model_sha256": "a", "tta": False}, {"model_sha256": "b", "tta": False})
    ['model_sha256: a, now b']
    >>> identity_differences({"input": {"shape": [2, 9, 9]}}, {"input": {"shape": [3, 9, 9]}})
    ['input.shape: [2, 9, 9], now [3, 9, 9]']
    """  # noqa: E501
    differences = []
    for key in sorted(set(recorded) | set(wanted)):
        before, now = recorded.get(key), wanted.get(key)
        if isinstance(before, Mapping) and isinstance(now, Mapping):
            differences += identity_differences(before, now, f"{prefix}{key}.")
        elif before != now:
            differences.append(f"{prefix}{key}: {_short(before)}, now {_short(now)}")
    return differences


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def create_done_markers(group: zarr.Group, layout: OutputLayout) -> None:
    """The done markers: one element per block of ``layout``, one uncompressed chunk per
    shard, flat chunk keys."""
    group.create_array(
        DONE,
        shape=layout.block_grid,
        chunks=layout.blocks_per_shard,
        dtype="uint8",
        fill_value=0,
        compressors=None,
        chunk_key_encoding={"name": "default", "separator": "."},
        dimension_names=BLOCK_DIMS,
        attributes={"long_name": "block done (1) or not (0)"},
    )


def done_array(group: zarr.Group) -> zarr.Array[Any]:
    """The done markers of an opened output group, where it keeps them (:data:`DONE`, or
    :data:`LEGACY_DONE` in an older output)."""
    try:
        return group[DONE]  # type: ignore[return-value]
    except KeyError:
        return group[LEGACY_DONE]  # type: ignore[return-value]


def done_shards(group_url: str) -> set[Shape]:
    """The indices of the shards marked done: one listing of the done markers' chunks."""
    fs, root = fsspec.core.url_to_fs(group_url.rstrip("/"))
    fs.invalidate_cache(root)  # an object store's cached listing misses what others wrote since
    path = f"{root}/{DONE}"
    if not fs.exists(path) and fs.exists(f"{root}/{LEGACY_DONE}"):
        path = f"{root}/{LEGACY_DONE}"
    fs.invalidate_cache(path)
    names = fs.ls(path, detail=False) if fs.exists(path) else []
    found = set()
    for name in names:
        key = str(name).rstrip("/").rsplit("/", 1)[-1]
        # c.3.0.7; a store writing atomically lists its temporary files too (c.3.0.7.<uuid>)
        if DONE_KEY.fullmatch(key):
            found.add(tuple(int(i) for i in key[2:].split(".")))
    return found


def done_blocks(group_url: str) -> set[Shape]:
    """The indices of the blocks marked done: each done shard's blocks."""
    shards = done_shards(group_url)
    if not shards:
        return set()
    per, grid = _shard_grid(group_url)
    blocks: set[Shape] = set()
    for shard in shards:
        ranges = (range(t * p, min((t + 1) * p, g)) for t, p, g in zip(shard, per, grid))
        blocks.update(itertools.product(*ranges))
    return blocks


def count_done_blocks(group_url: str) -> int:
    """How many blocks are marked done, counted per done shard (no set of 10^6 indices)."""
    shards = done_shards(group_url)
    if not shards:
        return 0
    per, grid = _shard_grid(group_url)
    return sum(blocks_in(shard, per, grid) for shard in shards)


def blocks_of_shard(group_url: str, shard: Sequence[int]) -> int:
    """How many blocks shard ``shard`` holds: fewer at the volume's far edges."""
    return blocks_in(shard, *_shard_grid(group_url))


def _shard_grid(group_url: str) -> tuple[Shape, Shape]:
    """Blocks per shard and blocks per axis, from the done markers' metadata."""
    done = done_array(zarr.open_group(group_url, mode="r", zarr_format=3))
    return tuple(done.chunks), tuple(done.shape)


@dataclass(frozen=True, slots=True, order=True)
class BlockFailure:
    """A block that failed for good: its index, write box and error, as the output records it."""

    index: Shape
    box: str
    error: str
    blocks: int = 1
    """Blocks the failed task held: a shard of several blocks fails as one."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": list(self.index),
            "box": self.box,
            "error": self.error,
            **({"blocks": self.blocks} if self.blocks != 1 else {}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BlockFailure:
        index = tuple(int(i) for i in data["index"])
        return cls(index, str(data["box"]), str(data["error"]), int(data.get("blocks", 1)))

    def __str__(self) -> str:
        if self.blocks == 1:
            return f"block {self.index} {self.box}: {self.error}"
        return f"shard {self.index} ({self.blocks} blocks) {self.box}: {self.error}"


@dataclass(frozen=True, slots=True)
class RunStatus:
    """How far the run that writes an output got: blocks done, failed and missing."""

    url: str
    total: int
    done: int
    complete: bool
    identity: dict[str, Any] = field(default_factory=dict)
    failures: tuple[BlockFailure, ...] = ()
    store_faults: dict[str, int] = field(default_factory=dict)
    """Transient store faults the last finished run met and retried, per kind."""

    @property
    def missing(self) -> int:
        return self.total - self.done - self.failed

    @property
    def failed(self) -> int:
        """Blocks in failed tasks."""
        return sum(failure.blocks for failure in self.failures)

    def summary(self) -> str:
        """One line: ``done 40 / failed 1 / missing 79 / total 120 blocks``."""
        state = "complete" if self.complete else "incomplete"
        return (
            f"{self.url}: {state}; done {self.done} / failed {self.failed} / "
            f"missing {self.missing} / total {self.total} blocks"
        )


LEASE = "lease"
"""Name of the lease group in the output: who is writing it, and until when."""
LEASE_SECONDS = 60.0
"""How long a lease holds without a refresh; the running driver refreshes it every third."""


@dataclass(frozen=True, slots=True)
class Lease:
    """A run's claim on an output: one driver writes it at a time.

    Held in the attributes of a small ``lease`` group of the output (its own object, so
    refreshing it never rewrites the output's metadata). A driver killed without releasing
    it leaves a lease that expires after :data:`LEASE_SECONDS`; the next run takes it over.
    """

    holder: str
    expires: float

    @classmethod
    def mine(cls, seconds: float = LEASE_SECONDS) -> Lease:
        return cls(_holder(), time.time() + seconds)

    def is_alive(self, now: float | None = None) -> bool:
        """Unexpired, and, when held on this machine, by a process that still exists.

        A killed driver on this host frees its output at once; one elsewhere, on expiry.
        """
        if self.expires <= (time.time() if now is None else now):
            return False
        host, pid, _ = [*self.holder.split(":"), "", "", ""][:3]
        return host != platform.node() or not pid.isdigit() or _process_exists(int(pid))

    def describe(self) -> str:
        host, pid, _ = [*self.holder.split(":"), "", "", ""][:3]
        stamp = time.strftime("%H:%M:%S", time.localtime(self.expires))
        return f"host {host}, pid {pid}, lease until {stamp}"


_RUN_TOKEN = uuid.uuid4().hex[:8]


def _holder() -> str:
    """This driver, as a lease names it: host, process id, and a token for this run."""
    return f"{platform.node()}:{os.getpid()}:{_RUN_TOKEN}"


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def read_lease(group_url: str) -> Lease | None:
    """The lease on the output at ``group_url``, or None if there is none (or it is unreadable)."""
    try:
        attrs = zarr.open_group(f"{group_url.rstrip('/')}/{LEASE}", mode="r").attrs
        return Lease(str(attrs["holder"]), float(cast("float", attrs["expires"])))
    except (FileNotFoundError, KeyError, ValueError, TypeError):
        return None


def write_lease(group_url: str, lease: Lease) -> None:
    group = zarr.open_group(f"{group_url.rstrip('/')}/{LEASE}", mode="a", zarr_format=3)
    group.attrs.update({"holder": lease.holder, "expires": lease.expires})


def check_lease_free(group_url: str, given: str) -> Lease | None:
    """Refuse an output another live run is writing; return an expired lease to take over.

    ``given`` is the output as the user wrote it, for the message.
    """
    lease = read_lease(group_url)
    if lease is not None and lease.is_alive() and lease.holder != _holder():
        raise OutputExistsError(
            f"output {given} is being written by another run ({lease.describe()}); wait for it "
            "to finish, or, if it was killed, run again once its lease has expired"
        )
    return lease if lease is not None and lease.expires > 0 else None


@contextmanager
def held_lease(group_url: str, given: str, *, seconds: float = LEASE_SECONDS) -> Iterator[Lease]:
    """Hold the output's lease while the body runs, refreshing it every ``seconds / 3``.

    A lease left by a killed run is taken over, with a warning naming it.
    """
    left = check_lease_free(group_url, given)
    if left is not None and left.holder != _holder():
        log.warning("taking over the lease of a run that stopped (%s)", left.describe())
    lease = Lease.mine(seconds)
    write_lease(group_url, lease)
    stop = threading.Event()
    refresher = threading.Thread(
        target=_refresh, args=(group_url, seconds, stop), name="lease", daemon=True
    )
    refresher.start()
    try:
        yield lease
    finally:
        stop.set()
        refresher.join()
        try:
            write_lease(group_url, Lease(lease.holder, 0.0))  # released: free at once
        except OSError as error:  # e.g. a full disk: the lease expires on its own
            log.info("could not release the lease on %s: %s", group_url, error)


def _refresh(group_url: str, seconds: float, stop: threading.Event) -> None:
    while not stop.wait(seconds / 3):
        try:
            write_lease(group_url, Lease.mine(seconds))
        except OSError as error:  # a flaky store: the next refresh may succeed
            log.warning("could not refresh the lease on %s: %s", group_url, error)
