"""Getting a Dask client, GPU workers, and the settings of the clusters we start."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import psutil
import pytest
from distributed import Client, WorkerPlugin, get_worker

from unet_volume.cluster.client import (
    TASKS_PER_GPU,
    dashboard_link,
    gpu_resources,
    open_client,
)
from unet_volume.cluster.task_window import map_bounded
from unet_volume.errors import InputError
from unet_volume.testing import ONE_LOCAL_WORKER, listening_sockets


def where(item: int, *, pause: float) -> tuple[str, float, float]:
    start = time.time()
    time.sleep(pause)
    return get_worker().address, start, time.time()


def most_at_once(spans: list[tuple[float, float]]) -> int:
    """The most (start, end) spans running at one moment."""
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    running = most = 0
    for _, change in events:  # at equal times an end (-1) sorts before a start (+1)
        running += change
        most = max(most, running)
    return most


def test_map_bounded_gpu_tasks_share_a_gpu_worker_a_few_at_a_time(
    gpu_client: Client,
) -> None:
    gpu_worker = next(
        address
        for address, info in gpu_client.scheduler_info()["workers"].items()
        if info["resources"].get("GPU")
    )
    results = list(
        map_bounded(
            gpu_client,
            where,
            range(16),
            name=lambda i: f"gpu-probe-{i}",
            resources=gpu_resources(gpu_client),
            pause=0.3,
        )
    )
    assert {address for address, _, _ in results} == {gpu_worker}
    # GPU=1 on a 6-thread worker, a quarter per task: 4 at once (one computes, three read or
    # write), though the window lets 28 be on the cluster and the worker has 6 threads.
    assert most_at_once([(start, end) for _, start, end in results]) == TASKS_PER_GPU


class SlowExit(WorkerPlugin):
    """A worker whose teardown takes 5 s (torch's exit on a busy machine), then leaves a mark."""

    def __init__(self, mark: Path) -> None:
        self.mark = mark

    def teardown(self, worker: Any) -> None:
        time.sleep(5.0)
        self.mark.touch()


def test_open_client_lets_workers_exit_in_their_own_time_instead_of_killing_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The cluster's own close kills a worker after 4 s, with a warning in the terminal.
    with open_client(n_workers=1, dashboard=False) as client:
        client.register_plugin(SlowExit(tmp_path / "exited"))
    assert (tmp_path / "exited").exists()  # the teardown ran to its end
    assert "still alive" not in caplog.text


def test_open_client_connects_to_a_running_scheduler_and_leaves_it_running(
    client: Client,
) -> None:
    address = client.scheduler.address
    with open_client(address) as connected:
        assert connected.scheduler.address == address
        assert connected.submit(abs, -3).result() == 3
    assert client.submit(abs, -4).result() == 4  # the cluster outlived the connection


def test_open_client_starts_a_local_cluster_and_closes_it_on_exit() -> None:
    with open_client(n_workers=1, dashboard=False) as client:
        # One worker process of one thread: torch in it then uses one core.
        assert list(client.nthreads().values()) == [1]
        assert client.submit(abs, -3).result() == 3
        cluster = client.cluster
    assert cluster is not None and cluster.status.name == "closed"


def test_open_client_local_cluster_listens_on_loopback_only() -> None:
    # issue 13: nothing we start opens a port to the network unless told to.
    me = psutil.Process()
    before = listening_sockets(me)
    with open_client(n_workers=1) as client:
        opened = listening_sockets(me) - before
        addresses = [client.scheduler.address, *client.scheduler_info()["workers"]]
        assert all(a.startswith("tcp://127.0.0.1:") for a in addresses), addresses
        assert urlparse(client.dashboard_link).hostname == "127.0.0.1"
    # scheduler, dashboard, worker and nanny (each with its own server): all on loopback
    assert len(opened) >= 4 and {host for host, _ in opened} == {"127.0.0.1"}, opened


@pytest.mark.parametrize("dashboard", [True, False])
def test_dashboard_link_names_a_dashboard_only_where_one_answers(dashboard: bool) -> None:
    # Without a dashboard the scheduler still serves HTTP, and client.dashboard_link still
    # names an address there: a 404 that no log line should send an operator to.
    with open_client(n_workers=1, dashboard=dashboard) as client:
        assert client.dashboard_link
        assert dashboard_link(client) == (client.dashboard_link if dashboard else None)


def test_open_client_starts_the_cluster_a_spec_describes_and_closes_it(tmp_path: Path) -> None:
    spec = tmp_path / "one.yaml"
    spec.write_text(ONE_LOCAL_WORKER)
    with open_client(cluster=spec) as client:
        assert list(client.nthreads().values()) == [1]
        cluster = client.cluster
    assert cluster is not None and cluster.status.name == "closed"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        pytest.param(
            {"scheduler": "tcp://h:8786", "cluster": "local"},
            r"both a scheduler address \(tcp://h:8786\) and a cluster spec \(local\); pass one",
            id="scheduler-and-spec",
        ),
        pytest.param(
            {"scheduler": "tcp://h:8786", "n_workers": 2},
            "n_workers 2 sizes the default LocalCluster only, not tcp://h:8786; drop it",
            id="workers-of-a-scheduler",
        ),
        pytest.param(
            {"cluster": "slurm-gpu", "n_workers": 2},
            "n_workers 2 sizes the default LocalCluster only, not slurm-gpu; drop it",
            id="workers-of-a-spec",
        ),
        pytest.param({"n_workers": 0}, "n_workers 0 must be at least 1", id="no-workers"),
    ],
)
def test_open_client_rejects_arguments_that_ask_for_two_clusters(
    arguments: dict[str, object], message: str
) -> None:
    # Refused before anything starts or connects: h:8786 is never dialled.
    with pytest.raises(InputError, match=message), open_client(**arguments):  # type: ignore[arg-type]
        pass
