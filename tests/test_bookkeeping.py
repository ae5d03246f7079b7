"""Runs that survive: per-block done markers, the run's identity, failures kept, resume."""

from __future__ import annotations

import importlib
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import dask
import numpy as np
import pytest
import xarray as xr
import zarr
from distributed import Client

from unet_volume.cluster.spec import local_cluster_config
from unet_volume.errors import BlockError, OutputExistsError, StallError
from unet_volume.output.bookkeeping import (
    DONE,
    LEGACY_DONE,
    Lease,
    done_blocks,
    identity_differences,
    read_lease,
    write_lease,
)
from unet_volume.output.lifecycle import read_status, reconsolidate
from unet_volume.output.prediction import open_prediction
from unet_volume.prediction.options import PredictOptions
from unet_volume.prediction.plan import PredictionPlan, plan_prediction
from unet_volume.prediction.run import run_plan
from unet_volume.testing import CropPredictor, free_port_cluster, integer_unet, write_zarr
from unet_volume.tiling import TileGeometry

# 1 x 20 x 20 voxels in blocks of 1 x 4 x 4: a 1 x 5 x 5 block grid, 25 blocks.
SHAPE, BLOCK = (1, 20, 20), (1, 4, 4)


class RowsFailPredictor(CropPredictor):
    """A crop probe that fails on tiles whose output starts at y >= 12, as bad data would.

    On the arange volume the value at (0, y, x) is 20 y + x, so the tile's first output
    voxel says where it is: blocks of block rows 3 and 4 fail, 2 x 5 = 10 of them.
    """

    def __call__(self, tile: np.ndarray) -> np.ndarray:
        first = tile[0, 0, self.geometry.halo[1], self.geometry.halo[2]]
        if first // 20 >= 12:
            raise RuntimeError("simulated bad data")
        return super().__call__(tile)


def arange_plan(tmp_path: Path, **options: object) -> PredictionPlan:
    """A plan over the arange volume (written once) into ``out.zarr``, a task per block (the
    records of tasks, each one shard of one block, are what these tests look at)."""
    image = tmp_path / "in.zarr"
    if not image.exists():
        write_zarr(image, np.arange(400, dtype=np.float32).reshape(SHAPE))
    model = integer_unet(depth=2)
    options = {"block_shape": BLOCK, "output_dtype": "float32", **options}
    options.setdefault("task_shape", options.get("shard_shape") or options["block_shape"])
    return plan_prediction(model, str(image), tmp_path / "out.zarr", PredictOptions(**options))


def probe(plan: PredictionPlan, cls: type[CropPredictor] = CropPredictor) -> CropPredictor:
    return cls(TileGeometry.for_unet(2, 2, min_output=plan.geometry.output_shape))


class BigPredictor(CropPredictor):
    """A crop probe that carries 12 MB, as the weights of a big network or an ensemble."""

    def __init__(self, geometry: TileGeometry) -> None:
        super().__init__(geometry)
        self.weights = np.ones(3 * 2**20, dtype=np.float32)


def test_bookkeeping_a_predictor_of_12_mb_travels_once_without_a_warning(
    client: Client, tmp_path: Path
) -> None:
    plan = arange_plan(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = run_plan(plan, client, predictor=probe(plan, BigPredictor))
    assert report.blocks == 25
    assert not [w for w in caught if "large graph" in str(w.message)]


def failed_run(client: Client, tmp_path: Path) -> PredictionPlan:
    """A run whose block rows 3 and 4 failed: 15 of 25 blocks done, 10 failed."""
    plan = arange_plan(tmp_path)
    with pytest.raises(BlockError):
        run_plan(plan, client, predictor=probe(plan, RowsFailPredictor))
    return plan


def test_bookkeeping_failed_blocks_are_recorded_and_finished_blocks_kept(
    client: Client, tmp_path: Path
) -> None:
    plan = arange_plan(tmp_path)
    with pytest.raises(BlockError, match=r"10 block\(s\) failed: block \(0, 3, 0\)") as info:
        run_plan(plan, client, predictor=probe(plan, RowsFailPredictor))
    assert "The 15 finished blocks are kept" in str(info.value)
    status = read_status(plan.output_url)
    assert (status.done, len(status.failures), status.missing, status.total) == (15, 10, 0, 25)
    assert not status.complete
    assert {f.index for f in status.failures} == {(0, y, x) for y in (3, 4) for x in range(5)}
    assert "simulated bad data" in status.failures[0].error
    assert done_blocks(plan.output_url) == {(0, y, x) for y in range(3) for x in range(5)}


def test_bookkeeping_stops_after_max_failures_and_leaves_the_rest_missing(
    client: Client, tmp_path: Path
) -> None:
    plan = arange_plan(tmp_path, max_failures=1)
    with pytest.raises(BlockError, match=r"2 block\(s\) failed"):
        run_plan(plan, client, predictor=probe(plan, RowsFailPredictor))
    status = read_status(plan.output_url)
    assert len(status.failures) == 2 and status.missing > 0
    assert status.done + len(status.failures) + status.missing == 25


def test_bookkeeping_resume_redoes_only_missing_and_failed_blocks(
    client: Client, tmp_path: Path
) -> None:
    failed_run(client, tmp_path)
    resumed = arange_plan(tmp_path)
    assert resumed.existing is not None and resumed.existing.done == 15
    report = run_plan(resumed, client, predictor=probe(resumed))
    assert (report.blocks, report.skipped) == (10, 15)
    status = read_status(resumed.output_url)
    assert status.complete and (status.done, status.failures) == (25, ())
    probabilities = open_prediction(resumed.output_url).probabilities.values
    np.testing.assert_array_equal(probabilities[0], np.arange(400).reshape(SHAPE))


def test_bookkeeping_the_done_markers_are_not_a_variable_of_the_dataset_a_user_opens(
    client: Client, tmp_path: Path
) -> None:
    plan = arange_plan(tmp_path)
    run_plan(plan, client, predictor=probe(plan))
    dataset = xr.open_zarr(plan.output_url)
    assert set(dataset.data_vars) == {"probabilities", "segmentation"}
    assert not {"block_z", "block_y", "block_x"} & set(dataset.dims)
    assert zarr.open_group(plan.output_url)[DONE][...].all()  # kept beside, in their own group


def test_bookkeeping_an_output_with_its_done_markers_at_the_top_still_resumes(
    client: Client, tmp_path: Path
) -> None:
    # Outputs written before kept ``done`` beside the data: they resume, marking it there.
    plan = failed_run(client, tmp_path)
    out = Path(plan.output_url)
    (out / DONE).rename(out / LEGACY_DONE)
    shutil.rmtree(out / DONE.split("/")[0])
    reconsolidate(plan.output_url)
    resumed = arange_plan(tmp_path)
    assert resumed.existing is not None and resumed.existing.done == 15
    report = run_plan(resumed, client, predictor=probe(resumed))
    assert (report.blocks, report.skipped) == (10, 15)
    assert read_status(plan.output_url).complete and not (out / DONE).exists()
    assert zarr.open_group(plan.output_url)[LEGACY_DONE][...].all()
    probabilities = open_prediction(plan.output_url).probabilities.values
    np.testing.assert_array_equal(probabilities[0], np.arange(400).reshape(SHAPE))


def test_bookkeeping_a_complete_output_is_left_as_it_is(client: Client, tmp_path: Path) -> None:
    plan = arange_plan(tmp_path)
    run_plan(plan, client, predictor=probe(plan))
    before = (tmp_path / "out.zarr" / "zarr.json").read_bytes()
    again = arange_plan(tmp_path)
    report = run_plan(again, client, predictor=probe(again))
    assert (report.blocks, report.skipped) == (0, 25)
    assert (tmp_path / "out.zarr" / "zarr.json").read_bytes() == before


def test_bookkeeping_incomplete_output_is_refused_unless_asked_for(
    client: Client, tmp_path: Path
) -> None:
    # Missing blocks must never pass for zeros.
    plan = failed_run(client, tmp_path)
    with pytest.raises(ValueError, match=r"incomplete \(15 of 25 blocks done, 10 failed\)"):
        open_prediction(plan.output_url)
    with pytest.warns(UserWarning, match="done 15 / failed 10 / missing 0 / total 25"):
        ds = open_prediction(plan.output_url, allow_incomplete=True)
    assert ds.done.dims == ("block_z", "block_y", "block_x")
    assert ds.done.values.sum() == 15 and ds.done.values[0, :3].all()


@pytest.mark.parametrize(
    ("change", "named"),
    [
        pytest.param({"output_dtype": "float64"}, "output_dtype: float32, now float64", id="dtype"),
        pytest.param({"block_shape": (1, 8, 8)}, "block_shape", id="geometry"),
        pytest.param({"tta": True}, "tta: False, now True", id="tta"),
    ],
)
def test_bookkeeping_another_run_is_refused_naming_what_differs(
    client: Client, tmp_path: Path, change: dict[str, object], named: str
) -> None:
    failed_run(client, tmp_path)
    with pytest.raises(OutputExistsError, match=named) as info:
        arange_plan(tmp_path, **change)
    assert "pass --overwrite" in str(info.value) and "\n" not in str(info.value)
    fresh = arange_plan(tmp_path, overwrite=True, **change)
    assert fresh.existing is None


def test_bookkeeping_a_changed_input_is_noticed_by_its_sampled_content(
    client: Client, tmp_path: Path
) -> None:
    failed_run(client, tmp_path)
    image = zarr.open_array(tmp_path / "in.zarr", mode="r+")
    image[0, 10, 10] = -1.0  # same URL, shape, dtype and chunks: only the content changed
    with pytest.raises(OutputExistsError, match=r"\(input.samples_sha256: [0-9a-f]+, now "):
        arange_plan(tmp_path)


def test_bookkeeping_identity_differences_name_each_field() -> None:
    before = {"model_sha256": "abc", "tta": False, "input": {"shape": [1, 2, 3]}}
    assert identity_differences(before, before) == []
    now = {**before, "model_sha256": "def"}
    assert identity_differences(before, now) == ["model_sha256: abc, now def"]


class CrashingPredictor(CropPredictor):
    """Kills its own worker process on the tiles of block (0, 4, 4), as an out-of-memory kill."""

    def __call__(self, tile: np.ndarray) -> np.ndarray:
        first = tile[0, 0, self.geometry.halo[1], self.geometry.halo[2]]
        if first == 16 * 20 + 16:  # the arange value at (0, 16, 16), block (0, 4, 4)
            os.kill(os.getpid(), signal.SIGKILL)
        return super().__call__(tile)


def test_bookkeeping_a_block_that_kills_its_worker_twice_is_recorded_not_retried_forever(
    tmp_path: Path,
) -> None:
    # allowed-failures 1 (clusters we start): the second death gives the block up, and the
    # blocks that ran beside it on the dying worker, blamed too, succeed when run alone.
    plan = arange_plan(tmp_path)
    with (
        dask.config.set(local_cluster_config()),
        free_port_cluster(n_workers=2, threads_per_worker=1) as cluster,
        Client(cluster) as own,
        pytest.raises(BlockError, match=r"1 block\(s\) failed: block \(0, 4, 4\)") as info,
    ):
        run_plan(plan, own, predictor=probe(plan, CrashingPredictor))
    assert "killed the workers running it" in str(info.value)
    assert "smaller --block-shape" in str(info.value)
    status = read_status(plan.output_url)
    assert (status.done, len(status.failures)) == (24, 1)


def another_run_lease(seconds: float) -> Lease:
    """The lease of a driver on another machine, expiring in ``seconds``."""
    return Lease("other-host:4242:cafe0000", time.time() + seconds)


def test_bookkeeping_an_output_another_live_run_writes_is_refused_even_with_overwrite(
    client: Client, tmp_path: Path
) -> None:
    plan = failed_run(client, tmp_path)
    write_lease(plan.output_url, another_run_lease(60))
    for options in ({}, {"overwrite": True}):
        with pytest.raises(OutputExistsError, match="being written by another run") as info:
            arange_plan(tmp_path, **options)
        assert "host other-host, pid 4242" in str(info.value)


def test_bookkeeping_a_lease_left_by_a_stopped_run_is_taken_over_with_a_warning(
    client: Client, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    plan = failed_run(client, tmp_path)
    write_lease(plan.output_url, another_run_lease(-1))  # expired a second ago
    resumed = arange_plan(tmp_path)
    run_plan(resumed, client, predictor=probe(resumed))
    assert "taking over the lease of a run that stopped (host other-host" in caplog.text
    left = read_lease(plan.output_url)
    assert left is not None and not left.is_alive()  # released when the run ended


def test_bookkeeping_a_lease_held_on_this_machine_by_a_dead_process_is_free_at_once() -> None:
    # A driver killed with SIGKILL cannot release its lease; on its own machine that is seen.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lease = Lease(f"{platform.node()}:{dead.pid}:0", time.time() + 60)
    assert not lease.is_alive()
    assert Lease(f"{platform.node()}:{os.getpid()}:0", time.time() + 60).is_alive()


class HangingPredictor(CropPredictor):
    """Hangs for ``hang`` seconds on the tiles of block (0, 2, 2), as a read from a dead
    network mount would."""

    hang = 60.0

    def __call__(self, tile: np.ndarray) -> np.ndarray:
        if tile[0, 0, self.geometry.halo[1], self.geometry.halo[2]] == 8 * 20 + 8:
            time.sleep(self.hang)
        return super().__call__(tile)


def test_bookkeeping_a_stalled_run_stops_naming_the_blocks_in_flight_and_their_workers(
    tmp_path: Path,
) -> None:
    with (
        dask.config.set(local_cluster_config()),
        free_port_cluster(n_workers=2, threads_per_worker=1) as cluster,
        Client(cluster) as own,
    ):
        # The limit is scaled by this machine's speed now: a whole undisturbed run of the same
        # plan (which warms the workers too) takes at most a quarter of it, so only the hung
        # block can stall, however busy the machine.
        (tmp_path / "warm").mkdir()
        warm = arange_plan(tmp_path / "warm")
        began = time.monotonic()
        run_plan(warm, own, predictor=probe(warm))
        limit = max(4.0, 4 * (time.monotonic() - began))
        plan = arange_plan(tmp_path, stall_after=limit)
        hanging = probe(plan, HangingPredictor)
        hanging.hang = 10 * limit
        started = time.monotonic()
        with pytest.raises(StallError, match=r"no task finished for \d+ s") as info:
            run_plan(plan, own, predictor=hanging)
        assert time.monotonic() - started < hanging.hang  # stopped, not waited out
    assert "predict-task-0-2-2-" in str(info.value) and " on tcp://" in str(info.value)
    status = read_status(plan.output_url)
    # The others finished and were kept (a block queued behind the hung one may not have run).
    assert status.done >= 20 and not status.complete


class SlowPredictor(CropPredictor):
    """Takes 0.4 s a tile, as a big network on a slow worker does."""

    def __call__(self, tile: np.ndarray) -> np.ndarray:
        time.sleep(0.4)
        return super().__call__(tile)


def test_bookkeeping_a_long_task_is_no_stall_while_its_shards_finish(
    client: Client, tmp_path: Path
) -> None:
    # One task of all 25 shards takes over 10 s, past the 4 s limit; each shard done (every
    # 0.4 s) tells the watchdog the run is alive (a beat), so it runs to the end.
    client.run(importlib.import_module, __name__)  # workers import this module before the clock
    plan = arange_plan(tmp_path, stall_after=4.0, task_shape=SHAPE)
    assert plan.tasks.num_tasks == 1 and plan.layout.num_shards == 25
    report = run_plan(plan, client, predictor=probe(plan, SlowPredictor))
    assert report.tasks == 1 and read_status(plan.output_url).complete
