"""Scheduled ingest for real: a local Prefect server, ``unet_volume_flows.serve``, a cron tick.

Slow (a server start and up to a minute's wait for the tick), so it runs with ``-m slow`` only;
the default suite checks the schedule objects in ``deploy/prefect.yaml`` instead.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import torch
import zarr

from unet_volume import __version__
from unet_volume.models.checkpoint import save_model
from unet_volume.models.unet import UNet
from unet_volume.output.lifecycle import run_info
from unet_volume.testing import blob_volume, listening_sockets

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    # A session of its own, so the whole process group (server workers, flow runs) can be stopped.
    with log.open("wb") as out:  # the child keeps its own copy of the file descriptor
        return subprocess.Popen(
            args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture
def prefect_server(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A Prefect server on a free loopback port, with a throw-away home and the UI on, as the
    README starts it.

    Yields the environment that reaches it.
    """
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
    }
    server = start(
        [
            sys.executable,
            "-m",
            "prefect",
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env,
        tmp_path / "server.log",
    )
    api = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None, (tmp_path / "server.log").read_text()
            time.sleep(1)
        else:
            pytest.fail("the Prefect server did not become healthy in 120 s")
        yield {**env, "PREFECT_API_URL": api}
    finally:
        stop(server)


def test_prefect_server_as_documented_serves_the_ui(prefect_server: dict[str, str]) -> None:
    # The README's server command leaves the UI on: the dashboard page loads, not a 404.
    ui = prefect_server["PREFECT_API_URL"].removesuffix("/api")
    page = httpx.get(f"{ui}/", timeout=30, follow_redirects=True)
    assert page.status_code == 200 and "<html" in page.text.lower(), page.text[:300]


def test_serve_runs_ingest_on_its_cron_schedule(
    prefect_server: dict[str, str], tmp_path: Path
) -> None:
    landing, outputs = tmp_path / "landing", tmp_path / "predictions"
    landing.mkdir()
    array = zarr.create_array(
        landing / "a.zarr", shape=(1, 32, 32), dtype="uint8", chunks=(1, 16, 16)
    )
    array[:] = blob_volume((1, 32, 32))
    torch.manual_seed(0)
    model = save_model(UNet(in_channels=1, base_channels=8, depth=2, ndim=2), tmp_path / "m.pt")
    serve = start(
        [
            sys.executable,
            "-m",
            "unet_volume_flows.serve",
            "--landing",
            str(landing),
            "--outputs",
            str(outputs),
            "--model",
            str(model),
            "--cron",
            "* * * * *",
            "--settle-seconds",
            "0",
        ],
        prefect_server,
        tmp_path / "serve.log",
    )
    opened: set[tuple[str, int]] = set()  # what serve and its flow runs listen on, meanwhile
    try:
        deadline = time.monotonic() + 200  # the next minute's tick, plus the run itself
        while time.monotonic() < deadline and not (run_info(str(outputs / "a.zarr")) or {}).get(
            "complete"
        ):
            assert serve.poll() is None, (tmp_path / "serve.log").read_text()
            opened |= listening_sockets(psutil.Process(serve.pid))
            time.sleep(0.5)
    finally:
        stop(serve)
    assert (run_info(str(outputs / "a.zarr")) or {}).get("complete"), (
        tmp_path / "serve.log"
    ).read_text()[-3000:]
    # issue 13: the flow run's LocalCluster (scheduler, worker, nanny) on loopback only.
    assert opened and {host for host, _ in opened} == {"127.0.0.1"}, opened
    # The terminal shows the runs, not Dask's INFO chatter about workers and connections.
    said = (tmp_path / "serve.log").read_text()
    assert "| INFO    | distributed." not in said, said[-3000:]
    # Served deployments are named apart from deploy/prefect.yaml's ("pool"), tagged, versioned.
    found = httpx.post(f"{prefect_server['PREFECT_API_URL']}/deployments/filter", json={}).json()
    assert (
        sorted((d["name"], d["version"], tuple(d["tags"])) for d in found)
        == [("served", __version__, ("unet-volume",))] * 3
    )
