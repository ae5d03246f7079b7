"""The SLURM path for real: a single-node SLURM (scripts/slurm-local.sh), dask-jobqueue jobs.

Marker ``slurm``: `.ci/run` runs these after the suite; each skips, saying why, where SLURM
cannot start (not root, no apt). Every test checks that its jobs are gone afterwards.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from distributed import Client
from test_failures import predict_args, wait_for_done  # the same runs as the local ones

from unet_volume.cli.main import main
from unet_volume.models.checkpoint import save_model
from unet_volume.models.unet import UNet
from unet_volume.output.lifecycle import read_status
from unet_volume.testing import blob_labels, blob_volume, write_zarr
from unet_volume.testing.stores import FolderServer

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "scripts" / "slurm-local.sh"
EXIT_OK, EXIT_USAGE = 0, 2
# 8 x 48 x 48 voxels in blocks of 1 x 16 x 16: 72 blocks.
SHAPE, BLOCK, BLOCKS = (8, 48, 48), "1,16,16", 72
LONG = (4 * SHAPE[0], *SHAPE[1:])
"""A volume whose run outlasts the moment a test stops it (the engine got fast enough that a
signal sent after 5 of 72 blocks could land after the last one)."""


def jobs() -> list[str]:
    """The ids of the jobs in the queue."""
    result = subprocess.run(
        ["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=True, timeout=30
    )
    return result.stdout.split()


def wait_for_no_jobs(timeout: float = 90.0) -> float:
    """Seconds until the queue is empty; fails the test after ``timeout``."""
    start = time.monotonic()
    while jobs():
        assert time.monotonic() - start < timeout, f"jobs still queued: {jobs()}"
        time.sleep(0.5)
    return time.monotonic() - start


def slurm_is_up() -> bool:
    """Whether a SLURM answers here with a usable node."""
    if shutil.which("sinfo") is None:
        return False
    result = subprocess.run(
        ["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, check=False, timeout=30
    )
    return result.returncode == 0 and any(
        state.startswith(("idle", "mix", "alloc")) for state in result.stdout.split()
    )


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A running single-node SLURM (started here if need be, and then stopped again)."""
    was_running = slurm_is_up()
    state = tmp_path_factory.mktemp("slurm")
    started = subprocess.run(
        ["bash", str(SCRIPT), "start", str(state)],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    if started.returncode != 0:
        reason = (started.stderr.strip().splitlines() or ["no message"])[-1]
        pytest.skip(f"SLURM cannot start here: {reason}")
    assert wait_for_no_jobs() >= 0  # nothing of ours queued before
    yield
    if not was_running:
        subprocess.run(["bash", str(SCRIPT), "stop", str(state)], check=False, timeout=120)


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in ``tmp_path`` (SLURM job logs land there); cluster specs found by name still."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("UNET_VOLUME_CLUSTERS", str(ROOT / "deploy" / "clusters"))
    return tmp_path


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    net = UNet(in_channels=1, base_channels=8, depth=2, ndim=2, dropout=0.0)
    return save_model(net, tmp_path_factory.mktemp("model") / "tiny.pt")


def arrays(output: Path, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    return {name: zarr.open_array(output / name)[...] for name in names}


def assert_same(got: Path, expected: Path, names: tuple[str, ...]) -> None:
    for name, values in arrays(expected, names).items():
        np.testing.assert_array_equal(arrays(got, names)[name], values, err_msg=name)


PREDICTION = ("probabilities", "segmentation")


@pytest.fixture
def reference(in_tmp: Path, client: Client, model_path: Path) -> tuple[str, Path]:
    """An input, and its prediction on the suite's LocalCluster: what SLURM must give."""
    image = write_zarr(in_tmp / "in.zarr", blob_volume(SHAPE))
    expected = in_tmp / "expected.zarr"
    where = ("--scheduler", client.scheduler.address)
    assert main(predict_args(image, expected, model_path, *where)) == EXIT_OK
    return image, expected


def test_slurm_predict_equals_the_local_cluster_output_and_leaves_no_jobs(
    slurm: None, in_tmp: Path, reference: tuple[str, Path], model_path: Path
) -> None:
    (image, local), through_slurm = reference, in_tmp / "slurm.zarr"
    start = time.monotonic()
    assert main(predict_args(image, through_slurm, model_path, "--cluster", "slurm-cpu")) == 0
    print(f"predict through 2 SLURM jobs: {time.monotonic() - start:.1f} s")
    assert_same(through_slurm, local, PREDICTION)
    lingered = wait_for_no_jobs()
    print(f"jobs gone {lingered:.1f} s after predict returned")
    assert sorted(p.name for p in (in_tmp / "slurm-logs").iterdir())  # the workers' logs


def test_slurm_weights_equal_the_local_cluster_weights(
    slurm: None, in_tmp: Path, client: Client
) -> None:
    labels = write_zarr(in_tmp / "labels.zarr", blob_labels(SHAPE, 12, seed=3))
    args = ["weights", labels, "--block-shape", BLOCK, "--sigma", "2"]
    assert main([*args[:2], "local.zarr", *args[2:], "--scheduler", client.scheduler.address]) == 0
    assert main([*args[:2], "slurm.zarr", *args[2:], "--cluster", "slurm-cpu"]) == 0
    assert_same(in_tmp / "slurm.zarr", in_tmp / "local.zarr", ("weights",))
    wait_for_no_jobs()


def test_slurm_the_predict_flow_runs_its_blocks_in_slurm_jobs(
    slurm: None, in_tmp: Path, reference: tuple[str, Path], model_path: Path
) -> None:
    from prefect.testing.utilities import prefect_test_harness

    from unet_volume_flows.predict import predict_flow

    (image, local), flow = reference, in_tmp / "flow.zarr"
    with prefect_test_harness(server_startup_timeout=120):
        report = predict_flow(
            image,
            str(model_path),
            str(flow),
            {"block_shape": (1, 16, 16), "output_dtype": "float32"},
            cluster="slurm-cpu",
        )
    assert report["blocks"] == BLOCKS
    assert_same(flow, local, PREDICTION)
    assert sorted(p.name for p in (in_tmp / "slurm-logs").iterdir())  # the jobs ran it
    wait_for_no_jobs()


def test_slurm_a_failed_run_leaves_no_jobs(
    slurm: None, in_tmp: Path, model_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = blob_volume(SHAPE).astype(np.float32)
    data[2, 40, 40] = np.nan  # its blocks fail; the run exits 2 naming them
    image = write_zarr(in_tmp / "nan.zarr", data)
    assert main(predict_args(image, in_tmp / "out.zarr", model_path, "--cluster", "slurm-cpu")) == 2
    assert "holds nan at voxel" in capsys.readouterr().err
    print(f"after a failed run: jobs gone {wait_for_no_jobs():.1f} s later")


def test_slurm_the_gpu_spec_schedules_on_a_fake_gpu_and_its_workers_advertise_gpu(
    slurm: None, in_tmp: Path, client: Client, model_path: Path
) -> None:
    # slurm-gpu.yaml as a site would copy it, for this node: its GPU partition (a fake GRES),
    # this environment, small jobs. `--gres=gpu:1` and `--resources GPU=1` stay as shipped.
    text = (ROOT / "deploy" / "clusters" / "slurm-gpu.yaml").read_text()
    site = {
        "scale: 4": "scale: 1",
        "job_cpu: 8": "job_cpu: 1",
        "memory: 32GiB": "memory: 2GiB",
        "python: python": f"python: {sys.executable}\ninterface: lo",
        "# log_directory: slurm-logs": "log_directory: slurm-logs",
        "  - module load cuda 2>/dev/null || true\n": "",
        "  - source ~/unet-volume/.venv/bin/activate\n": "  - echo $CUDA_VISIBLE_DEVICES\n",
    }
    for shipped, mine in site.items():
        assert shipped in text
        text = text.replace(shipped, mine)
    (in_tmp / "gpu.yaml").write_text(text)
    image = write_zarr(in_tmp / "in.zarr", blob_volume((2, 32, 32)))
    local, gpu = in_tmp / "local.zarr", in_tmp / "gpu.zarr"
    assert (
        main(predict_args(image, local, model_path, "--scheduler", client.scheduler.address)) == 0
    )
    assert main(predict_args(image, gpu, model_path, "--cluster", str(in_tmp / "gpu.yaml"))) == 0
    assert_same(gpu, local, PREDICTION)  # blocks asked for GPU=1: they ran on that worker
    (log,) = (in_tmp / "slurm-logs").glob("*.out")
    assert log.read_text().strip() == "0"  # SLURM gave the job GPU 0 (/dev/null behind it)
    wait_for_no_jobs()


def cancel_after(output: Path, blocks: int, which: slice) -> threading.Thread:
    """A thread that cancels the jobs ``which`` selects once ``blocks`` blocks are done."""

    def cancel() -> None:
        wait_for_done(output, blocks)
        subprocess.run(["scancel", *jobs()[which]], check=True, timeout=30)

    thread = threading.Thread(target=cancel)
    thread.start()
    return thread


def test_slurm_a_preempted_job_still_gives_the_undisturbed_output(
    slurm: None, in_tmp: Path, reference: tuple[str, Path], model_path: Path
) -> None:
    (image, expected), output = reference, in_tmp / "out.zarr"
    canceller = cancel_after(output, 10, slice(0, 1))  # one of the two worker jobs
    start = time.monotonic()
    assert main(predict_args(image, output, model_path, "--cluster", "slurm-cpu")) == EXIT_OK
    canceller.join()
    print(f"pre-empted run (1 of 2 jobs cancelled): {time.monotonic() - start:.1f} s")
    assert read_status(str(output)).complete
    assert_same(output, expected, PREDICTION)
    wait_for_no_jobs()


def test_slurm_all_jobs_cancelled_fails_clearly_then_the_same_command_resumes(
    slurm: None,
    in_tmp: Path,
    reference: tuple[str, Path],
    model_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (image, expected), output = reference, in_tmp / "out.zarr"
    # The input over HTTP, one row of its chunks (z 2-3, chunks of 2 slices: 18 of the 72 blocks;
    # a row the input's fingerprint, of its first, middle and last slice, does not read) held
    # unanswered until the first run has failed: however fast the machine, the run cannot
    # finish before the cancel lands, while its other blocks (10 before it) can.
    held, held_blocks = f"/{Path(image).name}/c/1/", 18
    with FolderServer(in_tmp, hold=lambda path: path.startswith(held)) as server:
        url = f"{server.url}/{Path(image).name}"
        args = predict_args(
            url, output, model_path, "--cluster", "slurm-cpu", "--stall-after", "20"
        )
        canceller = cancel_after(output, 10, slice(None))
        start = time.monotonic()
        capsys.readouterr()
        assert main(args) == EXIT_USAGE
        canceller.join()
        failed_after = time.monotonic() - start
        server.release()
        error = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert len(error) == 1 and "no worker is connected" in error[0], error
        print(f"all jobs cancelled: the run stopped after {failed_after:.1f} s")
        done = read_status(str(output)).done
        assert 10 <= done <= BLOCKS - held_blocks
        wait_for_no_jobs()
        assert main(args) == EXIT_OK
    assert read_status(str(output)).complete
    assert_same(output, expected, PREDICTION)
    wait_for_no_jobs()


def driver(args: list[str], cwd: Path) -> subprocess.Popen[str]:
    """``unet-volume ARGS`` in its own process group, as a user's shell would start it."""
    return subprocess.Popen(
        [sys.executable, "-m", "unet_volume", *args],
        cwd=cwd,
        env={**os.environ, "UNET_VOLUME_CLUSTERS": str(ROOT / "deploy" / "clusters")},
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("stop", ["SIGINT", "SIGKILL"])
def test_slurm_jobs_end_when_the_driver_is_interrupted_or_killed(
    slurm: None, in_tmp: Path, model_path: Path, stop: str
) -> None:
    image = write_zarr(in_tmp / "in.zarr", blob_volume(LONG))
    output = in_tmp / "out.zarr"
    running = driver(predict_args(image, output, model_path, "--cluster", "slurm-cpu"), in_tmp)
    try:
        wait_for_done(output, 5)
        assert jobs()
        os.killpg(running.pid, getattr(signal, stop))
        _, stderr = running.communicate(timeout=60)
    finally:
        if running.poll() is None:
            os.killpg(running.pid, signal.SIGKILL)
            running.communicate()
    stopped, code = time.monotonic(), running.returncode
    lingered = wait_for_no_jobs(timeout=120)
    print(f"after {stop}: the driver exited {code}; its jobs were gone {lingered:.1f} s later")
    if stop == "SIGINT":
        assert code == 130 and stderr.splitlines()[-1] == "unet-volume predict: interrupted"
        assert lingered < 20  # cancelled by the driver on its way out
    else:
        assert time.monotonic() - stopped < 120  # the workers' death timeout (30 s) ended them
    assert not read_status(str(output)).complete


def test_slurm_an_adaptive_spec_submits_jobs_as_blocks_queue_and_releases_them(
    slurm: None, in_tmp: Path, model_path: Path
) -> None:
    spec = in_tmp / "adaptive.yaml"
    text = (ROOT / "deploy" / "clusters" / "slurm-cpu.yaml").read_text()
    spec.write_text(text.replace("scale: 2", "adapt: {minimum: 0, maximum: 2}"))
    image = write_zarr(in_tmp / "in.zarr", blob_volume(SHAPE))
    assert not jobs()
    start = time.monotonic()
    running = driver(
        predict_args(image, in_tmp / "out.zarr", model_path, "--cluster", str(spec)), in_tmp
    )
    first = wait_for_done(in_tmp / "out.zarr", 1, timeout=180)
    print(f"adaptive (0..2 jobs): first block {time.monotonic() - start:.1f} s after start")
    assert first >= 1
    _, stderr = running.communicate(timeout=300)
    assert running.returncode == EXIT_OK, stderr
    assert read_status(str(in_tmp / "out.zarr")).complete
    wait_for_no_jobs()


def test_slurm_an_adaptive_cluster_releases_its_jobs_when_idle(slurm: None, in_tmp: Path) -> None:
    from unet_volume.cluster.client import open_client

    spec = in_tmp / "adaptive.yaml"
    text = (ROOT / "deploy" / "clusters" / "slurm-cpu.yaml").read_text()
    spec.write_text(text.replace("scale: 2", "adapt: {minimum: 0, maximum: 2}"))
    with open_client(cluster=str(spec)) as client:
        assert client.gather(client.map(time.sleep, [0.5] * 8, pure=False)) == [None] * 8
        idle = time.monotonic()
        while jobs():  # the cluster stays open: Dask itself gives the idle jobs back
            assert time.monotonic() - idle < 120, f"idle jobs kept: {jobs()}"
            time.sleep(0.5)
        print(f"adaptive: idle jobs released {time.monotonic() - idle:.1f} s after the work")
