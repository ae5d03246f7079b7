"""Dask clusters: the one way to get a client, and running tasks on it.

unet-volume never manages workers itself. :func:`open_client` connects to a scheduler the user
started (dask-jobqueue on SLURM, dask-kubernetes, ``dask scheduler`` by hand) through its
address, starts the cluster a spec in ``deploy/clusters`` describes
(:mod:`unet_volume.cluster.spec`), or else starts a ``distributed.LocalCluster`` of
single-threaded worker processes. The CLI, the flows and the benchmarks all call it.

Two measured traps are handled (see the stack notes):

- The nanny's default ``MALLOC_TRIM_THRESHOLD_=65536`` makes torch CPU inference
  ~40% slower. Clusters we start spawn workers without it
  (:func:`~unet_volume.cluster.spec.local_cluster_config`), and
  :func:`tune_worker_process` fixes it from inside any worker (clusters we did not start)
  with ``mallopt``.
- torch threads per worker must match the worker's Dask threads, or workers
  oversubscribe the cores.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import fsspec.config
from distributed import Client, LocalCluster, WorkerPlugin, get_worker

from unet_volume.cluster import malloc
from unet_volume.cluster.spec import load_cluster_spec, make_cluster, start_local_cluster
from unet_volume.errors import InputError

log = logging.getLogger(__name__)

WORKER_EXIT = 30.0
"""Seconds a worker process of a LocalCluster we close may take to exit before it is killed."""
_TUNED = False
TRIM_EVERY = 16
"""Tasks between two trims of a worker's heap (see release_free_memory)."""
_TASKS = 0


@contextmanager
def open_client(
    scheduler: str | None = None,
    cluster: str | Path | None = None,
    *,
    n_workers: int | None = None,
    dashboard: bool = True,
    quiet: bool = False,
) -> Iterator[Client]:
    """A Dask client: of the scheduler at ``scheduler``, of a cluster started from a spec, or
    of a fresh LocalCluster, so that every caller finds its workers the same way.

    Args:
        scheduler: address of a running scheduler (``tcp://host:8786``); left running on exit.
        cluster: a spec name in ``deploy/clusters`` or a spec path; started here, closed on
            exit. Its workers may join late (batch jobs, pods): the client waits for the first
            one, so that callers see whether workers have GPUs before they submit blocks.
        n_workers: worker processes (one thread each) of the default LocalCluster; default one
            per core. Only for the LocalCluster: a spec says its own size.
        dashboard: serve the LocalCluster's dashboard (on a free port).
        quiet: workers log no tracebacks of failed tasks (:class:`QuietTaskErrors`), e.g.
            when their output is the caller's terminal and the caller reports failures.

    The default LocalCluster is closed on exit too.
    """
    _check_cluster_choice(scheduler, cluster, n_workers)
    if scheduler:
        with Client(scheduler) as client:
            yield client
        return
    spec = load_cluster_spec(cluster) if cluster else None
    started = (
        make_cluster(spec)
        if spec is not None
        else start_local_cluster(_local_options(n_workers, dashboard=dashboard))
    )
    storage = StorageOptions(spec.storage_options if spec is not None else {})
    with started, Client(started) as client:
        if storage.options:  # before any block runs; workers that join later get it too
            client.register_plugin(storage)
        if spec is None or not spec.starts_empty:  # an adaptive one asks when blocks queue up
            client.wait_for_workers(1)
        if quiet:
            client.register_plugin(QuietTaskErrors())
        yield client
        if isinstance(started, LocalCluster):  # not after an error: that closes at once
            close_workers_patiently(started)


def close_workers_patiently(cluster: LocalCluster, timeout: float = WORKER_EXIT) -> None:
    """Give a LocalCluster's worker processes ``timeout`` seconds to exit, before it closes.

    The cluster's own close gives each 4 s, then kills it with a warning in the terminal
    ("Worker process still alive after 4.0 seconds, killing"); with torch loaded, a worker on a
    busy 2-core machine can take longer. The nannies close their workers the same way, only
    more patiently; what is left after ``timeout`` the cluster's close kills.
    """

    async def close_all() -> None:
        nannies = list(cluster.workers.values())
        await asyncio.gather(*(nanny.close(timeout=timeout) for nanny in nannies))

    with contextlib.suppress(Exception):  # the cluster's close follows, whatever happens here
        cluster.sync(close_all)


def dashboard_link(client: Client, *, timeout: float = 5.0) -> str | None:
    """The address of the cluster's Dask dashboard if a dashboard answers there, else None.

    ``client.dashboard_link`` names an address even for a scheduler that serves no dashboard
    (a 404) or that this machine cannot reach: an operator should never be sent to a dead link.
    The dashboard's own list of plots answers in milliseconds (its status page takes a
    rendering, seconds on a busy machine), and is empty where no dashboard is served.
    """
    link = client.dashboard_link
    plots = f"{link.rsplit('/', 1)[0]}/individual-plots.json"
    try:
        with urllib.request.urlopen(plots, timeout=timeout) as page:
            listed = json.loads(page.read() or b"{}")
    except (OSError, ValueError):  # refused, 404 (HTTPError), timeout, not a URL, not JSON
        return None
    return link if listed else None


def describe(client: Client) -> str:
    """Where a client's tasks run, for a log line: the scheduler, its workers, the dashboard
    (named only if one answers)."""
    workers = len(client.scheduler_info(n_workers=-1)["workers"])
    dashboard = dashboard_link(client)
    where = f"{client.scheduler.address}, {workers} worker{'s' if workers != 1 else ''}"
    return f"{where}; dashboard {dashboard}" if dashboard else where


class QuietTaskErrors(WorkerPlugin):
    """Workers keep failed tasks' tracebacks to themselves (the driver reports each block),
    and the warnings of a slow machine (garbage collection taking a share of the CPU).

    Without it, every failed block prints a multi-line traceback from its worker.
    """

    name = "unet-volume-quiet-task-errors"

    def setup(self, worker: Any) -> None:
        logging.getLogger("distributed").setLevel(logging.ERROR)
        logging.getLogger("distributed.worker").setLevel(logging.CRITICAL)


SCHEDULER_ADDRESS = re.compile(r"(tcp|tls|ucx|ws|wss|inproc)://[^\s/]+(:\d+)?(/[^\s]*)?")
"""A Dask scheduler address: a protocol Dask speaks and a host, no spaces."""


class StorageOptions(WorkerPlugin):
    """fsspec's keyword arguments per protocol (a cluster spec's ``storage_options``), set as
    fsspec's own defaults (``fsspec.config.conf``) in each worker process: every filesystem
    opened from a URL there takes them. This process (which plans, creates the output and
    records the run) takes its environment and the AWS config files, as any fsspec program.

    Credentials may be among them: they live in the workers' memory only, never in a run's
    records, and this object's repr names the protocols alone.
    """

    name = "unet-volume-storage-options"

    def __init__(self, options: Mapping[str, Mapping[str, Any]]) -> None:
        self.options = {protocol: dict(kwargs) for protocol, kwargs in options.items()}

    def __repr__(self) -> str:
        return f"StorageOptions({sorted(self.options)})"

    def setup(self, worker: Any) -> None:
        for protocol, kwargs in self.options.items():
            fsspec.config.conf.setdefault(protocol, {}).update(kwargs)


def _check_cluster_choice(
    scheduler: str | None, cluster: str | Path | None, n_workers: int | None
) -> None:
    """One InputError naming the conflict, for arguments that ask for two clusters."""
    if scheduler and cluster:
        raise InputError(
            f"got both a scheduler address ({scheduler}) and a cluster spec ({cluster}); "
            "pass one of them"
        )
    if n_workers is not None and (scheduler or cluster):
        raise InputError(
            f"n_workers {n_workers} sizes the default LocalCluster only, not "
            f"{scheduler or cluster}; drop it, or set the workers in the cluster spec"
        )
    if n_workers is not None and n_workers < 1:
        raise InputError(f"n_workers {n_workers} must be at least 1; or pass None for one per core")
    if scheduler and not SCHEDULER_ADDRESS.fullmatch(str(scheduler)):
        raise InputError(
            f"scheduler address {scheduler!r} is not a Dask address; pass e.g. "
            "tcp://10.0.0.5:8786 (or tls://... on a secured cluster)"
        )


def _local_options(n_workers: int | None, *, dashboard: bool) -> dict[str, Any]:
    """``LocalCluster`` options of the default cluster: single-threaded worker processes."""
    return {
        "n_workers": n_workers or os.cpu_count() or 1,
        "threads_per_worker": 1,
        "processes": True,
        # Loopback only: a one-machine cluster opens no port to the network.
        "host": "127.0.0.1",
        "dashboard_address": "127.0.0.1:0" if dashboard else None,
        # Without a dashboard the scheduler still serves HTTP: on a free port, not 8787.
        "scheduler_kwargs": {"dashboard_address": "127.0.0.1:0"},
    }


TASKS_PER_GPU = 4
"""Tasks a GPU worker runs at once (as many as it has threads, at most this): while one
runs the network, the others read and decompress, or encode and write; the predictor's device
lock makes them take turns on the GPU."""


def gpu_resources(client: Client) -> dict[str, float] | None:
    """``{"GPU": 1 / TASKS_PER_GPU}`` when some worker advertises a ``GPU`` resource, else None.

    GPU workers are started with ``--resources GPU=1`` (one per GPU, see ``deploy/``): tasks
    asking for a share of it run only there, up to :data:`TASKS_PER_GPU` at once per GPU (a
    power of 2: the shares add up exactly), each worker keeping its model loaded between
    blocks. Asking only when a worker has it matters: a task that needs a resource no worker
    has waits forever, with no error.
    """
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    if any(worker.get("resources", {}).get("GPU", 0) >= 1 for worker in workers):
        return {"GPU": 1 / TASKS_PER_GPU}
    return None


def task_slots(workers: Mapping[str, Mapping[str, Any]]) -> int:
    """The tasks ``workers`` (``scheduler_info()["workers"]``) run at once: on GPU workers
    up to :data:`TASKS_PER_GPU` per GPU (as many as each has threads), else one per thread;
    at least 1 (no workers known: plan for one)."""
    gpus = [w for w in workers.values() if w.get("resources", {}).get("GPU", 0) >= 1]
    if gpus:
        return sum(
            min(int(w.get("nthreads", 1)), int(w["resources"]["GPU"] * TASKS_PER_GPU)) for w in gpus
        )
    return max(1, sum(int(w.get("nthreads", 1)) for w in workers.values()))


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
    malloc.tune_for_torch()


def release_free_memory() -> None:
    """After every :data:`TRIM_EVERY`-th task: give the heap's free memory back (glibc).

    The high trim threshold that keeps torch fast within a task lets freed heap stay resident
    after it; across hundreds of tasks a worker's peak RSS crept up by 13% between a 1 GB and a
    4 GB volume. Trimming after every task held it to 8% but cost 15% of the engine's
    throughput (the next task faults the pages in again); every 16th task costs a sixteenth.
    """
    global _TASKS
    _TASKS += 1
    if _TASKS % TRIM_EVERY == 0:
        malloc.give_back()
