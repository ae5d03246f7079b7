"""Runs that survive what happens on clusters: real processes killed, real CLI, bad data.

Each test runs the real thing (a LocalCluster with worker processes, `python -m unet_volume`
in a subprocess), disturbs it, and checks the output against an undisturbed run, bit for bit:
every block is deterministic, so a block computed twice writes the same bytes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from distributed import Client

from unet_volume.cli.main import main
from unet_volume.cluster.spec import local_cluster_config
from unet_volume.errors import UnetVolumeError
from unet_volume.models.checkpoint import read_checkpoint, save_model
from unet_volume.models.unet import UNet
from unet_volume.output.bookkeeping import DONE, done_blocks
from unet_volume.output.lifecycle import read_status
from unet_volume.testing import (
    FULL_DISK,
    SPACE_FILE,
    blob_labels,
    blob_volume,
    free_port_cluster,
    register_full_disk,
    write_zarr,
)

EXIT_OK, EXIT_USAGE = 0, 2
# 6 x 48 x 48 voxels in blocks of 1 x 16 x 16: 6 x 3 x 3 = 54 blocks.
SHAPE, BLOCK = (6, 48, 48), "1,16,16"
LONG = (4 * SHAPE[0], *SHAPE[1:])
"""A volume whose run outlasts the moment a test stops it: a signal sent after 5 of 54 blocks
could land after the last one."""


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    net = UNet(in_channels=1, base_channels=8, depth=2, ndim=2, dropout=0.0)
    return save_model(net, tmp_path_factory.mktemp("model") / "tiny.pt")


def predict_args(image: str, output: Path, model: Path, *where: str) -> list[str]:
    return [
        "predict",
        image,
        str(output),
        "--model",
        str(model),
        "--block-shape",
        BLOCK,
        "--output-dtype",
        "float32",
        "--no-progress",
        *where,
    ]


def arrays(output: Path) -> dict[str, np.ndarray]:
    return {name: zarr.open_array(output / name)[...] for name in ("probabilities", "segmentation")}


def assert_same_output(got: Path, expected: Path) -> None:
    for name, values in arrays(expected).items():
        np.testing.assert_array_equal(arrays(got)[name], values, err_msg=name)


def wait_for_done(output: Path, at_least: int, timeout: float = 120.0) -> int:
    """Poll the done markers until ``at_least`` blocks are done; returns how many are."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = len(done_blocks(str(output))) if (output / DONE).exists() else 0
        if done >= at_least:
            return done
        time.sleep(0.05)
    raise AssertionError(f"fewer than {at_least} blocks done after {timeout} s")


def test_failures_driver_killed_then_the_same_command_resumes_to_the_undisturbed_output(
    client: Client, tmp_path: Path, model_path: Path
) -> None:
    image = write_zarr(tmp_path / "in.zarr", blob_volume(SHAPE))
    expected, output = tmp_path / "expected.zarr", tmp_path / "out.zarr"
    on_suite_cluster = ("--scheduler", client.scheduler.address)
    assert main(predict_args(image, expected, model_path, *on_suite_cluster)) == EXIT_OK
    # The driver and its LocalCluster (one single-threaded worker: a window of 4 blocks) in
    # their own process group, killed at once with SIGKILL, as a pre-empted job would be.
    command = [sys.executable, "-m", "unet_volume", *predict_args(image, output, model_path)]
    driver = subprocess.Popen(
        [*command, "--workers", "1"],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_done(output, 10)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    done = done_blocks(str(output))
    assert 10 <= len(done) < 54
    # Blocks written but not yet marked done were in flight: at most the window.
    chunks = output / "segmentation" / "c"
    # Chunk files c/z/y/x; a write cut short by the kill may leave a temporary file beside them.
    keys = [p.relative_to(chunks).parts for p in chunks.rglob("*") if p.is_file()]
    written = {tuple(map(int, key)) for key in keys if all(part.isdigit() for part in key)}
    assert len(written - done) <= 4
    status = read_status(str(output))
    assert not status.complete and status.missing == 54 - len(done)
    started = time.perf_counter()
    assert main(predict_args(image, output, model_path, *on_suite_cluster)) == EXIT_OK
    print(f"resumed: {54 - len(done)} blocks redone in {time.perf_counter() - started:.1f} s")
    assert read_status(str(output)).complete
    assert_same_output(output, expected)


def test_failures_ctrl_c_stops_driver_and_workers_quietly_keeping_finished_blocks(
    tmp_path: Path, model_path: Path
) -> None:
    # Ctrl-C in a terminal reaches the whole process group: the driver and its workers.
    image = write_zarr(tmp_path / "in.zarr", blob_volume(LONG))
    output = tmp_path / "out.zarr"
    command = [sys.executable, "-m", "unet_volume", *predict_args(image, output, model_path)]
    driver = subprocess.Popen(
        [*command, "--workers", "2"], start_new_session=True, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_for_done(output, 5)
        os.killpg(driver.pid, signal.SIGINT)
        _, stderr = driver.communicate(timeout=60)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.communicate()
    code = driver.returncode
    assert code == 130 and "Traceback" not in stderr, stderr
    assert stderr.splitlines()[-1] == "unet-volume predict: interrupted", stderr
    status = read_status(str(output))
    assert not status.complete and status.done >= 5


def test_failures_worker_killed_mid_run_still_gives_the_undisturbed_output(
    tmp_path: Path, model_path: Path
) -> None:
    image = write_zarr(tmp_path / "in.zarr", blob_volume(SHAPE))
    expected, output = tmp_path / "expected.zarr", tmp_path / "out.zarr"
    with (
        dask_config(),
        free_port_cluster(n_workers=2, threads_per_worker=1) as cluster,
        Client(cluster) as own,
    ):
        where = ("--scheduler", own.scheduler.address)
        assert main(predict_args(image, expected, model_path, *where)) == EXIT_OK
        victim = next(iter(own.run(os.getpid).values()))

        def kill_one_worker() -> None:
            wait_for_done(output, 8)
            os.kill(victim, signal.SIGKILL)

        killer = threading.Thread(target=kill_one_worker)
        killer.start()
        assert main(predict_args(image, output, model_path, *where)) == EXIT_OK
        killer.join()
        assert victim not in own.run(os.getpid).values()  # it really died
    assert read_status(str(output)).complete
    assert_same_output(output, expected)


def dask_config():
    import dask

    return dask.config.set(local_cluster_config())


def test_failures_nan_input_fails_its_blocks_in_one_line_and_keeps_the_rest(
    client: Client, tmp_path: Path, model_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = blob_volume(SHAPE).astype(np.float32)
    data[3, 40, 40] = np.nan  # in block (3, 2, 2); no other block's halo reaches it in z
    image = write_zarr(tmp_path / "in.zarr", data)
    output = tmp_path / "out.zarr"
    args = predict_args(image, output, model_path, "--scheduler", client.scheduler.address)
    assert main(args) == EXIT_USAGE
    lines = capsys.readouterr().err.splitlines()
    error = [line for line in lines if "error:" in line]
    assert len(error) == 1 and error[0].startswith("unet-volume predict: error: ")
    assert "holds nan at voxel (z, y, x) (3, 40, 40)" in error[0]
    assert "finished blocks are kept" in error[0] and "run the same command again" in error[0]
    status = read_status(str(output))
    failed = {failure.index for failure in status.failures}
    # The blocks whose read box holds the voxel: (3, 2, 2) and its in-plane neighbours whose
    # 20-voxel halo reaches y or x = 40 (from 16:32 they read up to 52).
    assert failed == {(3, y, x) for y in (1, 2) for x in (1, 2)}
    assert status.done == 54 - len(failed) and not status.complete
    assert main(["status", str(output)]) == EXIT_OK
    said = capsys.readouterr().out
    assert f"done 50 / failed {len(failed)} / missing 0 / total 54 blocks" in said
    assert said.count("failed: block (3, ") == 4 and "to resume" in said


def weights_args(labels: str, output: Path | str, *where: str) -> list[str]:
    return ["weights", labels, str(output), "--block-shape", BLOCK, "--sigma", "2", *where]


@pytest.fixture
def full_disk(client: Client) -> None:
    """``fulldisk://`` URLs: a local disk whose space a ``.space`` file holds (FullDisk)."""
    register_full_disk()
    client.run(register_full_disk)


@pytest.mark.parametrize("command", ["predict", "weights"])
def test_failures_a_full_disk_keeps_finished_blocks_and_the_run_resumes_once_there_is_space(
    client: Client,
    tmp_path: Path,
    model_path: Path,
    full_disk: None,
    capsys: pytest.CaptureFixture[str],
    command: str,
) -> None:
    volume = blob_volume(SHAPE)
    image = write_zarr(tmp_path / "in.zarr", volume)
    labels = write_zarr(tmp_path / "labels.zarr", blob_labels(SHAPE, 12, seed=3))

    def args(output: Path | str) -> list[str]:
        where = ("--scheduler", client.scheduler.address)
        if command == "predict":
            return predict_args(image, output, model_path, *where)  # type: ignore[arg-type]
        return weights_args(labels, output, *where)

    # How many bytes a whole run writes (metadata, data, records), on a disk that has room.
    roomy, full = tmp_path / "disk0", tmp_path / "disk1"  # paths of one length: same metadata
    for disk, space in ((roomy, 10**9), (full, None)):
        disk.mkdir()
        (disk / SPACE_FILE).write_text(str(space))
    assert main(args(f"{FULL_DISK}://{roomy}/out.zarr")) == EXIT_OK
    used = 10**9 - int((roomy / SPACE_FILE).read_text())
    # Half of that: the output is created, some blocks are written, then the disk is full.
    (full / SPACE_FILE).write_text(str(used // 2))
    output = f"{FULL_DISK}://{full}/out.zarr"
    capsys.readouterr()
    assert main(args(output)) == EXIT_USAGE
    error = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(error) == 1 and error[0].startswith(f"unet-volume {command}: error: "), error
    assert "disk is full" in error[0] and "finished blocks are kept" in error[0], error[0]
    status = read_status(output)
    assert 0 < status.done < status.total == 54 and not status.complete
    assert main(["status", output]) == EXIT_OK
    said = capsys.readouterr().out
    assert f"incomplete; done {status.done} / " in said
    assert f"run the same `unet-volume {command}` command again to resume" in said
    (full / SPACE_FILE).unlink()  # space again
    assert main(args(output)) == EXIT_OK
    assert f"{status.done} " in capsys.readouterr().out  # says how many were done before
    assert read_status(output).complete
    names = ("probabilities", "segmentation") if command == "predict" else ("weights",)
    for name in names:
        np.testing.assert_array_equal(
            zarr.open_array(f"{output}/{name}")[...],
            zarr.open_array(f"{FULL_DISK}://{roomy}/out.zarr/{name}")[...],
            err_msg=name,
        )


def checkpoint_steps(path: Path) -> int:
    """Training steps the checkpoint at ``path`` holds; 0 while there is none (or half a one)."""
    try:
        return int(read_checkpoint(path).metadata["training"]["steps"])
    except (UnetVolumeError, OSError, KeyError):
        return 0


def test_failures_training_killed_mid_run_resumes_from_its_last_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = blob_volume((4, 48, 48))
    labels = (image > 120).astype(np.uint8)
    paths = [write_zarr(tmp_path / "i.zarr", image), write_zarr(tmp_path / "l.zarr", labels)]
    out = tmp_path / "model.pt"
    args = [
        "train", *paths, "--out", str(out), "--steps", "40", "--minutes", "30",
        "--checkpoint-every", "5", "--depth", "2", "--base-channels", "4",
        "--tile-output", "1,12,12", "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    trainer = subprocess.Popen(
        [sys.executable, "-m", "unet_volume", *args],
        start_new_session=True,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while checkpoint_steps(out) < 10 and time.monotonic() < deadline:
            assert trainer.poll() is None, "training finished before it could be killed"
            time.sleep(0.05)
    finally:
        os.killpg(trainer.pid, signal.SIGKILL)
        trainer.wait(timeout=30)
    saved = checkpoint_steps(out)
    assert 10 <= saved < 40
    before = losses(out)  # the curve in the last state file the killed run wrote
    assert main([*args, "--resume", str(out)]) == EXIT_OK
    assert "trained 40 steps" in capsys.readouterr().out
    assert checkpoint_steps(out) == 40
    after = losses(out)
    assert len(after) == 40 and after[: len(before)] == before  # continued, not started over


def losses(model: Path) -> list[float]:
    state = torch.load(model.with_name(model.name + ".state.pt"), weights_only=True)
    return list(state["curve"]["losses"])
