"""`unet-volume plan` and `--block-shape auto`: a run's cost in numbers, before it runs."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import zarr
from distributed import Client
from test_cli import EXIT_OK, EXIT_USAGE, model_path, on, predict_args, volume_path  # noqa: F401

from unet_volume.cli.main import main
from unet_volume.geometry import Box
from unet_volume.models.checkpoint import save_model
from unet_volume.models.config import UNetConfig
from unet_volume.models.unet import UNet
from unet_volume.output.lifecycle import run_info
from unet_volume.prediction.estimate import AUTO_SIDE, auto_block_shape, summarize
from unet_volume.prediction.memory import WORKER_BASELINE
from unet_volume.prediction.options import PredictOptions
from unet_volume.prediction.plan import fit_to_workers, plan_prediction
from unet_volume.testing import snapshot
from unet_volume.tiling import read_box_of


def plan_args(volume: str, output: Path, model: Path, client: Client) -> list[str]:
    """``unet-volume plan`` with predict's arguments (plan shows no progress bar)."""
    args = ["plan", *predict_args(volume, output, model, *on(client))[1:]]
    args.remove("--no-progress")
    return args


def test_plan_prints_the_numbers_and_writes_nothing(
    client: Client,
    tmp_path: Path,
    volume_path: str,  # noqa: F811
    model_path: Path,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    before = snapshot(tmp_path)
    output = tmp_path / "out.zarr"
    assert main(plan_args(volume_path, output, model_path, client)) == EXIT_OK
    said = capsys.readouterr().err
    # 3 x 40 x 36 voxels in blocks of 1 x 16 x 16: 27 blocks, too few to share a shard; the
    # tasks span whole slices (two of them, the z chunks are 2 deep) and read each chunk once.
    assert "blocks: 27 of 1x16x16 over a 3x40x36 volume" in said
    assert "shards: 27 of 1x16x16; 81 stored objects" in said
    assert "tasks: 2 of 2x48x48 (18 shard(s) each, read together)" in said
    assert "input read: 1.00x the stored chunks (12 fetched of 12 chunks of 2x17x19)" in said
    assert "halo overhead: " in said and "memory per worker: " in said
    assert "estimated run time: " in said and "ms per block, timed on one worker" in said
    assert snapshot(tmp_path) == before and not output.exists()


def test_plan_says_when_the_input_is_read_moved_onto_the_labels(
    client: Client,
    tmp_path: Path,
    volume_path: str,  # noqa: F811
    model_path: Path,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = [*plan_args(volume_path, tmp_path / "out.zarr", model_path, client), "--no-timing"]
    assert main([*args, "--label-offset", "0.5,0.25"]) == EXIT_OK
    assert "input read moved by 0,0.5,0.25 voxels (z,y,x)" in capsys.readouterr().err
    assert main([*args, "--label-offset", "0,0"]) == EXIT_OK
    assert "moved" not in capsys.readouterr().err


def test_plan_halo_overhead_is_the_read_box_per_output_voxel(tmp_path: Path) -> None:
    image = tmp_path / "in.zarr"
    zarr.create_array(image, shape=(4, 256, 256), chunks=(1, 128, 128), dtype="uint8")
    config = UNetConfig(in_channels=1, base_channels=2, depth=2, ndim=2)
    options = PredictOptions(block_shape=(1, 64, 64), shard_shape=(2, 64, 128))
    plan = plan_prediction(UNet.from_config(config), image, tmp_path / "o.zarr", options)
    summary = summarize(plan, {}, on_gpu=False)
    read = read_box_of(Box.from_shape((2, 64, 128)), plan.geometry)
    assert read.shape == (2, 64 + 2 * 20, 128 + 2 * 20)  # halo 20 a side at depth 2
    assert summary.read_per_output == read.size / (2 * 64 * 128)
    assert (summary.blocks, summary.shards, summary.objects) == (64, 16, 48)
    assert summary.estimated_seconds is None  # nothing timed, nothing guessed
    assert summary.memory.parts["input"] == read.size  # uint8, read as stored
    moved = replace(options, label_offset=(0.5, 0.25))
    plan = plan_prediction(UNet.from_config(config), image, tmp_path / "o.zarr", moved)
    assert summarize(plan, {}, on_gpu=False).memory.parts["input"] == 4 * read.size  # float32


@pytest.mark.parametrize("on_gpu", [False, True])
def test_plan_auto_block_reads_whole_or_aligned_parts_of_input_chunks(on_gpu: bool) -> None:
    config = UNetConfig(ndim=2, depth=4, base_channels=64)
    for chunks in [(1, 256, 256), (1, 1024, 1024), (1, 2048, 2048), (1, 100, 100)]:
        block = auto_block_shape(config, (500, 8192, 8192), chunks, on_gpu=on_gpu)
        z_side, side = AUTO_SIDE[("gpu" if on_gpu else "cpu", 2)]
        assert block[0] == z_side and all(s % 16 == 0 for s in block[1:])
        if chunks[1] % 16 == 0:  # aligned: a multiple of the chunk, or a power-of-2 part of it
            assert block[1] % chunks[1] == 0 or chunks[1] % block[1] == 0
            assert block[1] <= max(side, chunks[1]) and block[1] >= min(side, chunks[1]) // 2
        else:
            assert block[1] == side


def test_plan_auto_block_shrinks_to_fit_the_workers_memory() -> None:
    config = UNetConfig(ndim=3, depth=3, base_channels=32)
    roomy = auto_block_shape(config, (512, 512, 512), (64, 64, 64), on_gpu=False)
    tight = auto_block_shape(
        config, (512, 512, 512), (64, 64, 64), on_gpu=False, memory_limit=WORKER_BASELINE + 2**28
    )
    assert roomy == (64, 64, 64)
    assert np.prod(tight) < np.prod(roomy) and all(s % 8 == 0 for s in tight)


def test_plan_predict_with_auto_block_records_the_block_it_picked(
    client: Client,
    tmp_path: Path,
    volume_path: str,  # noqa: F811
    model_path: Path,  # noqa: F811
) -> None:
    output = tmp_path / "out.zarr"
    args = predict_args(volume_path, output, model_path, *on(client))
    args[args.index("1,16,16")] = "auto"
    assert main(args) == EXIT_OK
    info = run_info(str(output))
    assert info is not None and info["complete"]
    # The volume (3 x 40 x 36, chunks 2 x 17 x 19) is smaller than the CPU side: one block
    # per slice, the volume rounded up to the period 4.
    assert info["identity"]["block_shape"] == [1, 40, 36]
    assert main(args) == EXIT_OK  # the same command: the same block, a complete output


def test_plan_block_shape_takes_integers_or_auto_only(
    tmp_path: Path,
    volume_path: str,  # noqa: F811
    model_path: Path,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = ["plan", volume_path, "--model", str(model_path), "--block-shape", "big"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == EXIT_USAGE
    assert "expected comma-separated integers like 1,512,512 or auto" in capsys.readouterr().err


def test_plan_an_automatic_block_is_fitted_to_the_workers_without_reading_again(
    tmp_path: Path,
) -> None:
    # The CLI and the flow plan before their cluster exists, then fit the plan to its workers:
    # that re-plan reads neither the model file nor the input (the fingerprint's chunks) again.
    image = str(tmp_path / "in.zarr")
    zarr.create_array(image, shape=(2, 256, 256), chunks=(1, 128, 128), dtype="uint8")[...] = 7
    model = tmp_path / "m.pt"
    save_model(UNet(base_channels=2, depth=2), model)
    plan = plan_prediction(model, image, tmp_path / "out.zarr", PredictOptions(block_shape="auto"))
    model.unlink()
    zarr.open_array(image, mode="r+")[...] = 9  # read again, it would change the fingerprint
    gpu = {"w": {"memory_limit": 2**34, "resources": {"GPU": 1}, "nthreads": 1}}
    fitted = fit_to_workers(plan, gpu)
    assert fitted.identity["input"] == plan.identity["input"]
    assert fitted.block_shape != plan.block_shape  # a GPU worker's block: bigger
