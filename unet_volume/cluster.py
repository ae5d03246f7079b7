"""Dask clusters: an embedded LocalCluster by default, or any existing scheduler.

unet-volume never manages workers itself. On one machine it starts a
``distributed.LocalCluster`` of single-threaded worker processes; on a cluster
it connects to a scheduler the user started (dask-jobqueue on SLURM,
dask-kubernetes, ``dask scheduler`` by hand) through its address.

Two measured traps are handled here (see the stack notes):

- The nanny's default ``MALLOC_TRIM_THRESHOLD_=65536`` makes torch CPU inference
  ~40% slower. We unset it for clusters we start, and :func:`tune_worker_process`
  fixes it from inside any worker (clusters we did not start) with ``mallopt``.
- torch threads per worker must match the worker's Dask threads, or workers
  oversubscribe the cores.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from itertools import islice
from typing import Any, TypeVar

import dask
from distributed import Client, LocalCluster, as_completed, get_worker

from unet_volume.errors import BlockError

Item = TypeVar("Item")

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
_TUNED = False


def local_cluster_config() -> dict[str, object]:
    """Dask settings for clusters we start: keep glibc's dynamic mmap threshold."""
    return {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}


@contextmanager
def open_client(
    address: str | None = None, *, n_workers: int | None = None, dashboard: bool = True
) -> Iterator[Client]:
    """A client of the scheduler at ``address``, or of a fresh LocalCluster.

    The LocalCluster has ``n_workers`` (default: one per core) worker processes of one
    thread each, and is closed on exit; an existing cluster is left running.
    """
    if address:
        with Client(address) as client:
            yield client
        return
    workers = n_workers or os.cpu_count() or 1
    with dask.config.set(local_cluster_config()):
        cluster = LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0" if dashboard else None,
            # Without a dashboard the scheduler still serves HTTP: on a free port, not 8787.
            scheduler_kwargs={"dashboard_address": ":0"},
        )
    with cluster, Client(cluster) as client:
        yield client


def map_bounded(
    client: Client,
    function: Callable[..., Any],
    items: Iterable[Item],
    *,
    name: Callable[[Item], str],
    window: int | None = None,
    resources: Mapping[str, float] | None = None,
    **kwargs: Any,
) -> Iterator[Any]:
    """``function(item, **kwargs)`` as one Dask task per item; yields results as tasks finish.

    At most ``window`` tasks (default: 4 per worker thread) are on the cluster at once, so
    a 10^6-block volume never floods the scheduler, and ``items`` may be a lazy iterator.
    Keys are ``name(item)`` plus a run token (unique per call: Dask must never see the same
    key with another graph). A failed task cancels the rest and raises :class:`BlockError`
    naming it. ``resources`` (e.g. ``{"GPU": 1}``) restricts every task to workers that
    advertise them, and runs as many at once on a worker as its amount allows.
    """
    run = uuid.uuid4().hex[:8]
    todo = iter(items)
    limit = window or 4 * max(1, sum(client.nthreads().values()))

    def submit(item: Item) -> Any:
        return client.submit(
            function, item, key=f"{name(item)}-{run}", pure=False, resources=resources, **kwargs
        )

    running = as_completed([submit(item) for item in islice(todo, limit)])
    for future in running:
        try:
            result = future.result()
        except Exception as error:
            client.cancel(list(running.futures))
            running.clear()
            raise BlockError(f"block task {future.key} failed: {error}") from error
        future.release()
        running.update(submit(item) for item in islice(todo, 1))
        yield result


def gpu_resources(client: Client) -> dict[str, float] | None:
    """``{"GPU": 1}`` when some worker advertises a ``GPU`` resource, else None.

    GPU workers are started with ``--resources GPU=1`` (one per GPU, see ``deploy/``): tasks
    asking for it run only there, one block per GPU at a time, each worker keeping its model
    loaded between blocks. Asking only when a worker has it matters: a task that needs a
    resource no worker has waits forever, with no error.
    """
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    if any(worker.get("resources", {}).get("GPU", 0) >= 1 for worker in workers):
        return {"GPU": 1}
    return None


def worker_threads() -> int:
    """Threads of the Dask worker running this code (torch should use as many)."""
    try:
        return int(get_worker().state.nthreads)
    except ValueError:  # not inside a worker: leave torch's default alone
        return 0


def tune_worker_process() -> None:
    """Once per process: restore glibc's mmap/trim thresholds the nanny disabled.

    With ``MALLOC_TRIM_THRESHOLD_`` set, glibc maps and unmaps every large
    activation; 32 MiB / 256 MiB thresholds brought a default-configured cluster
    from 0.61x to 0.98x of the bare model's throughput.
    """
    global _TUNED
    if _TUNED:
        return
    _TUNED = True
    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt(M_MMAP_THRESHOLD, 32 * 2**20)
        libc.mallopt(M_TRIM_THRESHOLD, 256 * 2**20)
    except (OSError, AttributeError):  # not glibc (e.g. macOS): nothing to fix
        log.debug("mallopt unavailable; leaving the allocator as it is")
