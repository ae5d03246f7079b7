"""A block run into an output that records it: created or resumed, leased, failures kept.

Predictions (:mod:`unet_volume.prediction.run`) and weight volumes
(:mod:`unet_volume.training.weight_volume`)
write Zarr v3 groups that record their own run (:mod:`unet_volume.output.bookkeeping`): the run's
identity, a done marker per block, the failed blocks, and ``complete``. This module is the
life of such an output, the same for both:

1. :func:`find_resumable` compares the identity of the run asked for with the one at the
   output: the same run is resumed, another is refused naming what differs.
2. :func:`create_output` makes a new, empty output; a location that cannot be written is
   refused in one line and nothing is left behind.
3. :func:`run_recorded` holds the output's lease, runs the blocks not yet done, records
   failed blocks (keeping every finished one) and marks the output complete.

The group's attribute ``unet_volume`` holds the run information::

    {"identity": {...}, "complete": false, "failures": [...], "report": {...}, ...}
"""

from __future__ import annotations

import errno
import functools
import json
import warnings
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any, TypeVar, cast

import numpy as np
import zarr

from unet_volume.errors import (
    BlockError,
    InputError,
    OutputExistsError,
    StorageError,
    is_unwritable,
)
from unet_volume.geometry import Shape
from unet_volume.io.locations import exists, fast_io, remove_output, removed_on_failure
from unet_volume.output.bookkeeping import (
    DONE,
    BlockFailure,
    RunStatus,
    blocks_of_shard,
    check_lease_free,
    count_done_blocks,
    done_array,
    done_shards,
    held_lease,
    identity_differences,
)
from unet_volume.tiling import Region

R = TypeVar("R")
ATTRS_KEY = "unet_volume"
"""The group attribute that holds the run information."""


def run_info(url: str) -> dict[str, Any] | None:
    """What the output at ``url`` records of its run (identity, ``complete``, ...), or None.

    A group without ``unet_volume`` attributes, or anything that is not a Zarr v3 group,
    counts as none.
    """
    if not exists(url):
        return None
    try:
        group = zarr.open_group(url, mode="r", zarr_format=3)
    except (FileNotFoundError, ValueError, TypeError):  # not a Zarr v3 group
        return None
    info = group.attrs.get(ATTRS_KEY)
    return dict(info) if isinstance(info, dict) else None


@functools.lru_cache(maxsize=16)
def opened_arrays(url: str, token: str, names: tuple[str, ...]) -> tuple[Any, ...]:
    """The arrays ``names`` of the output group at ``url``, opened for writing once per worker
    process and run (``token``): tasks then write without reading metadata again.

    Keyed by the run's token as well: an output created anew under the same URL is reopened.
    """
    with fast_io(url):
        group = zarr.open_group(url, mode="r+", zarr_format=3)
        return tuple(done_array(group) if name == DONE else group[name] for name in names)


def recorded_grid(group: zarr.Group) -> dict[str, Any]:
    """The voxel size and units an output recorded of its input (None where it had none)."""
    info: Any = group.attrs.get(ATTRS_KEY, {})
    recorded = info.get("input", {})
    size = recorded.get("voxel_size")
    return {"voxel_size": tuple(size) if size else None, "units": recorded.get("units")}


def update_run_info(url: str, extra: Mapping[str, Any]) -> None:
    """Merge ``extra`` into the run information, then re-consolidate the metadata.

    Consolidated metadata lets ``xarray.open_zarr(url)`` open the group with one read and
    without its "consolidated metadata" warning.
    """
    group = zarr.open_group(url, mode="r+", zarr_format=3)
    info = dict(group.attrs[ATTRS_KEY])  # type: ignore[arg-type]
    group.attrs[ATTRS_KEY] = {**info, **extra}
    reconsolidate(url)


def reconsolidate(url: str) -> None:
    """Refresh the consolidated metadata of the group at ``url`` and all below it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        zarr.consolidate_metadata(url, zarr_format=3)


def finish_output(url: str, extra: Mapping[str, Any]) -> None:
    """Mark the output complete and record ``extra`` (e.g. the run report)."""
    update_run_info(url, {**extra, "complete": True})


def record_failures(url: str, failures: Iterable[BlockFailure]) -> None:
    """Record the blocks that failed for good (the rest of the output stays as it is)."""
    update_run_info(url, {"failures": [failure.to_dict() for failure in failures]})


def read_status(url: str) -> RunStatus:
    """How far the run writing the output at ``url`` got (done, failed, missing blocks)."""
    info = run_info(url)
    if info is None:
        raise InputError(
            f"{url} is not a unet-volume output; pass the OUTPUT of `unet-volume predict`, "
            "`weights` or `segment`"
        )
    group = zarr.open_group(url, mode="r", zarr_format=3)
    total = int(np.prod(done_array(group).shape))
    failures = tuple(BlockFailure.from_dict(f) for f in info.get("failures", []))
    return RunStatus(
        url,
        total,
        count_done_blocks(url),
        bool(info.get("complete")),
        dict(info.get("identity", {})),
        failures,
        dict(info.get("report", {}).get("store_faults", {})),
    )


def check_output(url: str, *, overwrite: bool) -> None:
    """Refuse an existing output unless ``overwrite``."""
    if not overwrite and exists(url):
        raise OutputExistsError(
            f"output {url} already exists; pass --overwrite (overwrite=True) to replace it, "
            "or choose another output path"
        )


def prepare_output(url: str, *, overwrite: bool) -> None:
    """Make room for a new output: refuse an existing one unless ``overwrite``, then remove it."""
    check_output(url, overwrite=overwrite)
    remove_output(url)


def as_stored(identity: Mapping[str, Any]) -> dict[str, Any]:
    """``identity`` as the output's JSON attributes give it back (tuples become lists).

    Comparing a recorded identity with a fresh one must not see ``(1, 2)`` and ``[1, 2]``
    as a difference: a resume check that never matches redoes everything (volara #65).
    """
    return cast("dict[str, Any]", json.loads(json.dumps(identity)))


def find_resumable(
    given: str, url: str, identity: Mapping[str, Any], *, overwrite: bool = False
) -> RunStatus | None:
    """The status of the same run at ``url``, to resume or leave be; None: start anew.

    Refused: an output another live run is writing (even with ``overwrite``), and, without
    ``overwrite``, anything at ``url`` that is not this run, naming what differs: another
    model, geometry, dtype or input would mix two runs' blocks in one output. ``given`` is
    ``url`` as the user wrote it.
    """
    if not exists(url):
        return None
    check_lease_free(url, given)
    if overwrite:
        return None
    info = run_info(url)
    if info is None or "identity" not in info:
        raise OutputExistsError(
            f"output {given} already exists and is not a resumable unet-volume output; "
            "pass --overwrite (overwrite=True) to replace it, or choose another output path"
        )
    differences = identity_differences(info["identity"], as_stored(identity))
    if differences:
        raise OutputExistsError(
            f"output {given} holds another run ({'; '.join(differences)}); pass --overwrite "
            "(overwrite=True) to start it anew, or choose another output path"
        )
    return read_status(url)


def check_run_limits(max_failures: int, stall_after: float) -> None:
    """Refuse limits that make no sense before a run starts (a flow may pass anything)."""
    failures, stall = max_failures, stall_after
    if isinstance(failures, bool) or not isinstance(failures, int) or failures < 0:
        raise InputError(f"max_failures must be an int >= 0, got {failures!r}; e.g. 10")
    if isinstance(stall, bool) or not isinstance(stall, int | float) or not stall > 0:
        raise InputError(f"stall_after must be a number of seconds > 0, got {stall!r}; e.g. 600")


def create_output(url: str, create: Callable[[], None], *, overwrite: bool) -> None:
    """A new, empty output made by ``create()`` (an existing one is removed only with
    ``overwrite``).

    A location that cannot be written (read-only, not a folder, full) is refused in one line,
    and whatever part of the output was created is removed again.
    """
    prepare_output(url, overwrite=overwrite)
    try:
        with removed_on_failure(url):
            create()
    except OSError as error:
        raise InputError(
            f"output {url} cannot be created ({type(error).__name__}: "
            f"{error.strerror or error}); choose a location you can write to"
        ) from error


def run_recorded(
    url: str,
    run: Callable[[Collection[Shape]], R],
    report: Callable[[R], Mapping[str, Any]],
    *,
    command: str,
) -> R:
    """``run(done)`` under the output's lease, then mark the output complete with ``report``.

    ``run`` gets the indices of the tasks (shards of blocks) already done, to skip. Failed blocks
    from an earlier run are tried again. A :class:`BlockError` is recorded in the output and
    raised again naming the blocks; ``command`` (e.g. ``unet-volume predict``) says what to
    rerun.
    """
    try:
        with held_lease(url, url):  # one driver writes an output
            record_failures(url, [])
            try:
                result = run(done_shards(url))
            except BlockError as error:
                raise recorded(url, error, command) from error
            finish_output(url, report(result))
    except OSError as error:
        if not is_unwritable(error):
            raise
        raise StorageError(
            f"output {url} cannot be written ({describe_failure(error)}); its finished blocks "
            "are kept: free space or fix the permissions, then run the same command again to "
            "resume"
        ) from error
    return result


def recorded(url: str, error: BlockError, command: str) -> BlockError:
    """Record the failed blocks in the output; the error that names them and says what next."""
    failures = sorted(
        BlockFailure(
            cast(Region, block).index,
            str(cast(Region, block).write_box),
            describe_failure(cause),
            blocks_of_shard(url, cast(Region, block).index),
        )
        for block, cause in error.failures
    )
    try:
        record_failures(url, failures)
        unrecorded = ""
    except OSError as not_written:  # e.g. the disk that failed the blocks is full
        unrecorded = f" (not recorded in the output: {describe_failure(not_written)})"
    done = count_done_blocks(url)
    first = "; ".join(map(str, failures[:3])) + ("; ..." if len(failures) > 3 else "")
    failed = sum(failure.blocks for failure in failures)
    return BlockError(
        error.failures,
        message=f"{failed} block(s) failed{unrecorded}: {first}. The {done} finished "
        f"blocks are kept in {url}; fix the cause and run the same command again to resume "
        f"({command}; `unet-volume status OUTPUT` lists the failures)",
    )


def describe_failure(cause: BaseException) -> str:
    """A block's error in one line, with what to try where Dask's own words do not say it."""
    if type(cause).__name__ == "KilledWorker":
        return (
            "it killed the workers running it (out of memory, or a crash in native code); try "
            "a smaller --block-shape or --tile-shape, or workers with more memory"
        )
    if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
        return f"the output's disk is full (OSError: {cause.strerror}: {cause.filename})"
    return " ".join(f"{type(cause).__name__}: {cause}".split())
