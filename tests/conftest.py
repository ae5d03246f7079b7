"""Shared fixtures: one real LocalCluster with worker processes for the whole run.

``UNET_VOLUME_TEST_THREADS=N`` runs torch with N threads, in this process and in each
worker (whose Dask threads it sets, as torch follows them). Unset, the test process keeps
torch's default and workers have one thread each. Results must not depend on it: CI runs
the exactness tests at 1 and 2.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator

import dask
import pytest
from distributed import Client, Nanny, Scheduler, SpecCluster
from hypothesis import settings

from unet_volume.cluster.spec import local_cluster_config
from unet_volume.testing import free_port_cluster

settings.register_profile("ci", max_examples=50, deadline=None)
settings.load_profile("ci")

THREADS = int(os.environ.get("UNET_VOLUME_TEST_THREADS", "0")) or None


@pytest.fixture(scope="session", autouse=True)
def dashboard_port_taken() -> Iterator[None]:
    """Port 8787, Dask's default dashboard, held for the whole run: a test that would take it
    fails here every time, not only where a user's own Dask or a second run holds it."""
    held = socket.socket()
    try:
        held.bind(("127.0.0.1", 8787))
        held.listen()
    except OSError:  # taken already: the same for the tests
        pass
    yield
    held.close()


@pytest.fixture(scope="session", autouse=True)
def torch_threads() -> None:
    """torch's threads in the test process, where the reference passes run."""
    if THREADS is not None:
        import torch

        torch.set_num_threads(THREADS)


@pytest.fixture
def training_threads(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Training in this process on one torch thread (or UNET_VOLUME_TEST_THREADS).

    Tiny nets gain nothing from threads, and two stall on a busy 2-core machine. ``train``
    keeps the thread count a user chose through OMP_NUM_THREADS, so that is set too.
    """
    import torch

    threads, wanted = torch.get_num_threads(), THREADS or 1
    monkeypatch.setenv("OMP_NUM_THREADS", str(wanted))
    torch.set_num_threads(wanted)
    yield
    torch.set_num_threads(threads)


@contextlib.contextmanager
def suite_client(threads_per_worker: int = THREADS or 1) -> Iterator[Client]:
    """Two worker processes on 127.0.0.1, started with this process's environment."""
    with dask.config.set(local_cluster_config()):
        cluster = free_port_cluster(
            n_workers=2, threads_per_worker=threads_per_worker, processes=True
        )
    with cluster, Client(cluster) as client:
        yield client


@pytest.fixture(scope="session")
def client() -> Iterator[Client]:
    """Two worker processes, so pickling and per-worker model loading really happen."""
    with suite_client() as client:
        yield client


@pytest.fixture(scope="session")
def gpu_client() -> Iterator[Client]:
    """A worker that advertises ``GPU=1`` (as deploy/ starts GPU workers), with more threads
    than block tasks may share a GPU, and one that does not."""
    workers = {
        "gpu": {"cls": Nanny, "options": {"nthreads": 6, "resources": {"GPU": 1}}},
        "cpu": {"cls": Nanny, "options": {"nthreads": 1}},
    }
    scheduler = {
        "cls": Scheduler,
        "options": {"dashboard_address": "127.0.0.1:0", "host": "127.0.0.1"},
    }
    with dask.config.set(local_cluster_config()):
        cluster = SpecCluster(workers=workers, scheduler=scheduler)
    with cluster, Client(cluster) as client:
        client.wait_for_workers(2)
        yield client
