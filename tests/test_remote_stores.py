"""Runs against real remote stores on 127.0.0.1: an S3 API (moto's server) and plain HTTP.

Terabyte volumes live in object stores, so the whole chain runs from ``s3://`` inputs into
``s3://`` outputs here, on a LocalCluster whose worker processes find the store the standard
way (AWS_* variables, as a cluster's workers would): predict, weights, segment and train;
a driver killed mid-run and resumed from the done markers stored as objects; ``status``;
xarray and :func:`open_prediction` reading the output from the bucket; ``ingest`` from an
``s3://`` landing prefix. Every output equals the run on local disk, bit for bit.

moto speaks the S3 protocol over HTTP as s3fs does; it is a stand-in, not a production store.
Marked ``remote`` (``pip install 'moto[server]'``); ``.ci/run`` runs them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
import xarray as xr
import zarr
from distributed import Client

from unet_volume.cli.main import main
from unet_volume.models.checkpoint import load_model, save_model
from unet_volume.models.unet import UNet
from unet_volume.output.bookkeeping import DONE, done_blocks
from unet_volume.output.lifecycle import read_status
from unet_volume.output.prediction import open_prediction
from unet_volume.testing import ONE_LOCAL_WORKER, blob_labels, blob_volume, write_zarr

pytest.importorskip("moto.server", reason="the S3 stand-in: pip install 'moto[server]'")
pytest.importorskip("s3fs", reason="s3:// URLs: pip install s3fs")

from conftest import suite_client
from test_failures import BLOCK, LONG, SHAPE, predict_args

from unet_volume.testing.stores import CountingProxy, FolderServer, S3Server, s3_environment

pytestmark = pytest.mark.remote

EXIT_OK, EXIT_USAGE = 0, 2
BUCKET = "volumes"
SECRET = "uv-known-secret-5c1e7a93"
"""The secret access key the suite's store accepts: searched for in everything written."""


@pytest.fixture(scope="module")
def s3() -> Iterator[str]:
    """An S3 API on 127.0.0.1 with one bucket; this process and its children find it through
    the standard variables (endpoint, key, secret)."""
    with S3Server() as server, s3_environment(server.url, secret=SECRET):
        fsspec.filesystem("s3").mkdir(BUCKET)
        yield f"s3://{BUCKET}"


@pytest.fixture(scope="module")
def remote_client(s3: str) -> Iterator[Client]:
    """Two worker processes started inside the store's environment, as a cluster's are."""
    with suite_client(threads_per_worker=1) as client:
        yield client


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    net = UNet(in_channels=1, base_channels=8, depth=2, ndim=2, dropout=0.0)
    return save_model(net, tmp_path_factory.mktemp("model") / "tiny.pt")


@pytest.fixture(scope="module")
def image(s3: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """The same volume on local disk and in the bucket."""
    data = blob_volume(SHAPE)
    local = write_zarr(tmp_path_factory.mktemp("in") / "in.zarr", data)
    return local, write_zarr(f"{s3}/in.zarr", data)


def on(client: Client) -> tuple[str, str]:
    return ("--scheduler", client.scheduler.address)


def assert_same_arrays(got: str, expected: str, names: tuple[str, ...]) -> None:
    for name in names:
        np.testing.assert_array_equal(
            zarr.open_array(f"{got}/{name}", mode="r")[...],
            zarr.open_array(f"{expected}/{name}", mode="r")[...],
            err_msg=name,
        )


@pytest.fixture(scope="module")
def local_prediction(
    image: tuple[str, str],
    model_path: Path,
    remote_client: Client,
    tmp_path_factory: pytest.TempPathFactory,
) -> str:
    out = str(tmp_path_factory.mktemp("local") / "out.zarr")
    assert main(predict_args(image[0], out, model_path, *on(remote_client))) == EXIT_OK
    return out


@pytest.fixture(scope="module")
def s3_prediction(image: tuple[str, str], model_path: Path, remote_client: Client, s3: str) -> str:
    out = f"{s3}/out.zarr"
    assert main(predict_args(image[1], out, model_path, *on(remote_client))) == EXIT_OK
    return out


def test_remote_predict_from_s3_into_s3_equals_the_run_on_local_disk(
    s3_prediction: str, local_prediction: str
) -> None:
    assert_same_arrays(s3_prediction, local_prediction, ("probabilities", "segmentation"))


def test_remote_status_xarray_and_open_prediction_read_the_output_from_the_bucket(
    s3_prediction: str, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    assert main(["status", s3_prediction]) == EXIT_OK
    printed = capsys.readouterr().out
    assert "complete" in printed and "54" in printed
    ds = xr.open_zarr(s3_prediction)  # plain xarray on the bucket, no help from us
    assert ds.probabilities.dims == ("class", "z", "y", "x")
    assert ds.attrs["unet_volume"]["complete"] is True
    opened = open_prediction(s3_prediction)
    np.testing.assert_array_equal(opened.segmentation.values, ds.segmentation.values)


def test_remote_segment_and_weights_from_s3_into_s3_equal_the_local_runs(
    s3: str, s3_prediction: str, local_prediction: str, remote_client: Client, tmp_path: Path
) -> None:
    for source, out in ((s3_prediction, f"{s3}/labels.zarr"), (local_prediction, None)):
        target = out or str(tmp_path / "labels.zarr")
        assert (
            main(["segment", source, target, "--block-shape", "2,24,24", *on(remote_client)]) == 0
        )
    assert_same_arrays(f"{s3}/labels.zarr", str(tmp_path / "labels.zarr"), ("instances",))
    labels = blob_labels(SHAPE, 12)
    sources = (write_zarr(f"{s3}/cells.zarr", labels), write_zarr(tmp_path / "cells.zarr", labels))
    for source, target in zip(sources, (f"{s3}/w.zarr", str(tmp_path / "w.zarr"))):
        assert main(["weights", source, target, *on(remote_client)]) == EXIT_OK
    assert_same_arrays(f"{s3}/w.zarr", str(tmp_path / "w.zarr"), ("weights",))


@pytest.mark.usefixtures("training_threads")
def test_remote_train_from_s3_writes_its_checkpoint_to_the_bucket(
    s3: str, capsys: pytest.CaptureFixture[str]
) -> None:
    image = write_zarr(f"{s3}/train/image.zarr", blob_volume((2, 32, 32)))
    labels = write_zarr(f"{s3}/train/labels.zarr", blob_labels((2, 32, 32), 8))
    out = f"{s3}/models/tiny.pt"
    tiny = ["--steps", "3", "--depth", "2", "--base-channels", "4", "--tile-output", "1,20,20"]
    args = ["train", image, labels, "--out", out, *tiny, "--batch-size", "2", "--no-progress"]
    assert main([*args, "--no-weight-map"]) == EXIT_OK
    assert f"model saved to {out}" in capsys.readouterr().out
    assert load_model(out).config.depth == 2


def test_remote_driver_killed_then_the_same_command_resumes_from_the_markers_in_the_bucket(
    s3: str, model_path: Path, remote_client: Client, tmp_path: Path
) -> None:
    data = blob_volume(LONG)
    image, local = write_zarr(f"{s3}/long.zarr", data), write_zarr(tmp_path / "long.zarr", data)
    expected, output = str(tmp_path / "expected.zarr"), f"{s3}/resumed.zarr"
    assert main(predict_args(local, expected, model_path, *on(remote_client))) == EXIT_OK
    # One block per task, so that the run is killed between markers; the driver with its own
    # LocalCluster, in its own process group, killed with SIGKILL as a pre-empted job is.
    args = [*predict_args(image, output, model_path), "--shard-shape", BLOCK, "--task-shape", BLOCK]
    said = tmp_path / "driver.txt"
    with said.open("w") as log:
        driver = subprocess.Popen(
            [sys.executable, "-m", "unet_volume", *args, "--workers", "1"],
            start_new_session=True,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 120
        while done_in(output) < 10:
            assert driver.poll() is None, f"the driver ended first: {said.read_text()[-500:]}"
            assert time.monotonic() < deadline, "no 10 blocks done in 120 s"
            time.sleep(0.1)
    finally:
        with contextlib.suppress(ProcessLookupError):  # ended by itself
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    done = done_blocks(output)
    assert 10 <= len(done) < 216
    assert main([*args, *on(remote_client)]) == EXIT_OK  # the same command, resumed
    assert read_status(output).complete
    assert_same_arrays(output, expected, ("probabilities", "segmentation"))


def done_in(output: str) -> int:
    """Blocks marked done in ``output`` (0 before its ``done`` array exists)."""
    fs, path = fsspec.core.url_to_fs(f"{output}/{DONE}/zarr.json")
    return len(done_blocks(output)) if fs.exists(path) else 0


def test_remote_predict_reads_an_input_served_over_plain_http(
    image: tuple[str, str],
    model_path: Path,
    remote_client: Client,
    local_prediction: str,
    tmp_path: Path,
) -> None:
    local = Path(image[0])
    with FolderServer(local.parent) as server:
        url = f"{server.url}/{local.name}"
        out = str(tmp_path / "out.zarr")
        assert main(predict_args(url, out, model_path, *on(remote_client))) == EXIT_OK
        requests, _ = server.traffic.total(chunks=True)
    assert_same_arrays(out, local_prediction, ("probabilities", "segmentation"))
    stored = sum(1 for p in (local / "c").rglob("*") if p.is_file())
    assert requests <= 1.5 * stored + 3  # each chunk about once, plus the fingerprint's three


def test_remote_workers_take_the_storage_options_of_their_cluster_spec(
    image: tuple[str, str], model_path: Path, local_prediction: str, tmp_path: Path
) -> None:
    # The spec sends the workers' S3 requests through a counting proxy; this process keeps
    # its environment's endpoint (the store itself), so only the workers' reads pass there.
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    out = f"s3://{BUCKET}/through-spec.zarr"
    with CountingProxy(endpoint) as proxy:
        spec = tmp_path / "one-worker.yaml"
        spec.write_text(
            ONE_LOCAL_WORKER + f"storage_options:\n  s3: {{endpoint_url: '{proxy.url}'}}\n"
        )
        assert main([*predict_args(image[1], out, model_path), "--cluster", str(spec)]) == EXIT_OK
        requests, _ = proxy.traffic.total(under=f"/{BUCKET}/in.zarr/", chunks=True)
    assert_same_arrays(out, local_prediction, ("probabilities", "segmentation"))
    stored = len(fsspec.filesystem("s3").find(f"{BUCKET}/in.zarr/c"))
    assert requests >= stored  # every input chunk, read by the worker through the proxy


def test_remote_a_web_server_that_refuses_the_input_is_access_denied_not_missing(
    image: tuple[str, str], model_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    local = Path(image[0])
    out = tmp_path / "never.zarr"
    with (
        FolderServer(local.parent) as server,
        CountingProxy(server.url, forbid=rf"/{local.name}") as proxy,
    ):
        source = f"{proxy.url}/{local.name}"
        assert main(predict_args(source, str(out), model_path)) == EXIT_USAGE
    error = capsys.readouterr().err.splitlines()
    assert len(error) == 1 and f"{source}: access denied (PermissionError: 403" in error[0]
    assert "the web server lets this machine read it" in error[0]
    assert not out.exists()


def test_remote_a_url_with_credentials_inside_is_refused_in_one_line_writing_nothing(
    s3: str, model_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = f"s3://AKIAEXAMPLE:{SECRET}@{BUCKET}/in.zarr"
    assert main(predict_args(source, f"{s3}/never.zarr", model_path)) == EXIT_USAGE
    error = capsys.readouterr().err.splitlines()
    assert len(error) == 1 and "holds credentials in the URL" in error[0]
    assert SECRET not in error[0] and "AKIAEXAMPLE:***@" in error[0]
    assert not fsspec.filesystem("s3").exists(f"{BUCKET}/never.zarr")


def test_remote_ingest_from_an_s3_landing_prefix_leaves_a_half_uploaded_volume_for_later(
    s3: str,
    model_path: Path,
    remote_client: Client,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from prefect.settings import get_current_settings
    from prefect.testing.utilities import prefect_test_harness

    from unet_volume_flows.ingest import ingest_flow

    monkeypatch.chdir(tmp_path)  # previews of remote outputs go to the working folder
    landing, outputs = f"{s3}/landing", f"{s3}/predictions"
    write_zarr(f"{landing}/a.zarr", blob_volume((2, 32, 32), seed=1))
    staged = write_zarr(tmp_path / "b.zarr", blob_volume((2, 32, 32), seed=2))
    fs = fsspec.filesystem("s3")
    chunks = [p for p in Path(staged).rglob("*") if p.is_file() and p.name != "zarr.json"]
    for chunk in chunks:  # an upload under way: chunks first, the metadata last
        fs.put_file(str(chunk), f"{BUCKET}/landing/b.zarr/{chunk.relative_to(staged)}")
    run = {"scheduler": remote_client.scheduler.address, "settle_seconds": 0, "instances": "none"}
    with prefect_test_harness(server_startup_timeout=120):
        first = ingest_flow(landing, outputs, str(model_path), **run)
        assert [(r["output"], r["reason"]) for r in first] == [(f"{outputs}/a.zarr", "new")]
        fs.put_file(f"{staged}/zarr.json", f"{BUCKET}/landing/b.zarr/zarr.json")  # uploaded
        second = ingest_flow(landing, outputs, str(model_path), **run)
        assert [(r["output"], r["reason"]) for r in second] == [(f"{outputs}/b.zarr", "new")]
        assert ingest_flow(landing, outputs, str(model_path), **run) == []
        # Prefect's database holds the flows' parameters, logs and artifacts: no secret there
        database = get_current_settings().server.database.connection_url
        assert database is not None
        stored = Path(database.get_secret_value().split(":///", 1)[1])
        files = [p for p in stored.parent.iterdir() if p.name.startswith(stored.name)]  # -wal
        assert stored.stat().st_size and not [p for p in files if SECRET.encode() in p.read_bytes()]
    assert read_status(f"{outputs}/b.zarr").complete


@pytest.mark.parametrize("fault", ["slowdown", "drop", "short"])
def test_remote_transient_faults_over_http_are_retried_counted_and_change_nothing(
    fault: str,
    image: tuple[str, str],
    model_path: Path,
    remote_client: Client,
    local_prediction: str,
    tmp_path: Path,
) -> None:
    local = Path(image[0])
    out = str(tmp_path / "out.zarr")
    with (
        FolderServer(local.parent) as server,
        CountingProxy(server.url, fail=0.25, faults=(fault,), seed=1) as proxy,
    ):
        source = f"{proxy.url}/{local.name}"
        assert main(predict_args(source, out, model_path, *on(remote_client))) == EXIT_OK
        injected = proxy.traffic.faults[fault]
    assert_same_arrays(out, local_prediction, ("probabilities", "segmentation"))
    counted = sum(read_status(out).store_faults.values())  # the workers' retries
    assert injected > 0 and counted <= injected
    if fault != "drop":  # aiohttp reconnects a dropped keep-alive connection by itself
        assert counted > 0


def cli_through(proxy: CountingProxy, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m unet_volume ARGS`` whose S3 requests (its workers' too) go through
    ``proxy``: a fresh process finds its store the standard way, from the environment."""
    endpoint = {"FSSPEC_S3_ENDPOINT_URL": proxy.url, "AWS_ENDPOINT_URL": proxy.url}
    return subprocess.run(
        [sys.executable, "-m", "unet_volume", *args],
        env={**os.environ, **endpoint},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_remote_s3_throttling_is_retried_counted_in_the_report_and_status_bit_identical(
    s3: str, image: tuple[str, str], model_path: Path, local_prediction: str
) -> None:
    output = f"{s3}/throttled.zarr"
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    with CountingProxy(endpoint, fail=0.1, faults=("slowdown",), seed=2, only=r"/c/") as proxy:
        done = cli_through(proxy, *predict_args(image[1], output, model_path), "--workers", "1")
        injected = proxy.traffic.faults["slowdown"]
    assert done.returncode == EXIT_OK, done.stderr[-2000:]
    assert injected > 0 and "transient store faults retried (503: " in done.stderr
    assert 0 < read_status(output).store_faults.get("503", 0) <= injected
    assert_same_arrays(output, local_prediction, ("probabilities", "segmentation"))


def test_remote_an_input_the_store_refuses_is_one_line_naming_it_and_nothing_is_written(
    s3: str, image: tuple[str, str], model_path: Path
) -> None:
    output = f"{s3}/refused.zarr"
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    for forbid in (r"/in\.zarr/c/", r"/in\.zarr"):  # its chunks; the whole input
        with CountingProxy(endpoint, forbid=forbid) as proxy:
            done = cli_through(proxy, *predict_args(image[1], output, model_path), "--workers", "1")
        assert done.returncode == EXIT_USAGE
        line = done.stderr.strip()
        assert len(line.splitlines()) == 1 and f"{image[1]}: access denied" in line
        assert "check the credentials" in line
        assert not fsspec.filesystem("s3").exists(f"{BUCKET}/refused.zarr")


def test_remote_the_secret_is_written_nowhere_locally_or_in_the_bucket(
    s3_prediction: str,
    local_prediction: str,
    tmp_path_factory: pytest.TempPathFactory,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """Runs last in this module: by then every command above has written what it writes."""
    assert main(["status", s3_prediction]) == EXIT_OK
    printed = capfd.readouterr()
    assert SECRET not in printed.out + printed.err
    fs = fsspec.filesystem("s3", skip_instance_cache=True, use_listings_cache=False)
    objects = fs.find(BUCKET)
    assert len(objects) > 100 and not [key for key in objects if SECRET.encode() in fs.cat(key)]
    prefect_home = os.environ.get("PREFECT_HOME")  # scripts/test.sh makes a throw-away one
    folders = [tmp_path_factory.getbasetemp(), *([Path(prefect_home)] if prefect_home else [])]
    written = [p for folder in folders for p in folder.rglob("*") if p.is_file()]
    assert written and not [p for p in written if SECRET.encode() in p.read_bytes()]
