"""The prediction engine: exact overlap-tile stitching on a real LocalCluster and real Zarr."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import xarray as xr
import zarr
from distributed import Client, get_task_stream

from unet_volume.checkpoint import checkpoint_bytes, save_model
from unet_volume.cluster import gpu_resources
from unet_volume.errors import (
    BlockError,
    CheckpointError,
    GeometryError,
    InputError,
    OutputExistsError,
)
from unet_volume.model import UNet
from unet_volume.predict import (
    PredictOptions,
    RunReport,
    plan_prediction,
    predict_volume,
    run_prediction,
)
from unet_volume.prediction_store import create_prediction, open_prediction
from unet_volume.predictor import ModelPredictor
from unet_volume.storage import open_volume
from unet_volume.testing import CropPredictor, blob_volume, predict_whole
from unet_volume.tiling import TileGeometry


def write_zarr(
    path: Path, data: np.ndarray, chunks: tuple[int, ...] | None = None, **attrs: object
) -> str:
    """A real Zarr v3 array on disk, with odd chunks unless told otherwise."""
    chunks = chunks or tuple(min(n, c) for n, c in zip(data.shape, (2, 2, 17, 19)[-data.ndim :]))
    array = zarr.create_array(
        path, shape=data.shape, dtype=data.dtype, chunks=chunks, attributes=attrs
    )
    array[:] = data
    return str(path)


def tiny_unet(ndim: int = 2, depth: int = 2, in_channels: int = 1, seed: int = 0) -> UNet:
    # 8 base channels: with 2 channels dead ReLUs could hide a misplaced tile.
    torch.manual_seed(seed)
    return UNet(in_channels=in_channels, base_channels=8, depth=depth, ndim=ndim, dropout=0.0)


@pytest.mark.parametrize(
    ("ndim", "depth", "block", "tile"),
    [
        pytest.param(2, 3, (1, 8, 8), (1, 8, 8), id="2d-small-blocks"),
        pytest.param(2, 2, (3, 24, 20), (2, 8, 12), id="2d-several-tiles-per-block"),
        pytest.param(3, 2, (4, 8, 12), (4, 4, 4), id="3d"),
    ],
)
def test_predict_crop_probe_returns_the_volume_exactly(
    client: Client,
    tmp_path: Path,
    ndim: int,
    depth: int,
    block: tuple[int, ...],
    tile: tuple[int, ...],
) -> None:
    # A predictor that returns its input's centre must reproduce an arange volume voxel for voxel:
    # any tile read, cropped or written one voxel off shows up.
    data = np.arange(5 * 23 * 29, dtype=np.float32).reshape(5, 23, 29)
    volume = open_volume(write_zarr(tmp_path / "in.zarr", data))
    geometry = TileGeometry.for_unet(ndim, depth, min_output=tile)
    store = create_prediction(
        str(tmp_path / "out.zarr"),
        volume=volume,
        num_classes=1,
        block_shape=block,
        output_dtype="float32",
        attrs={},
    )
    report = run_prediction(
        client,
        predictor=CropPredictor(geometry),
        geometry=geometry,
        volume=volume,
        store=store,
        block_shape=block,
    )
    assert report.voxels == data.size
    np.testing.assert_array_equal(zarr.open_array(tmp_path / "out.zarr" / "probabilities")[0], data)


@pytest.mark.parametrize(
    ("ndim", "depth", "shape", "block", "tile"),
    [
        pytest.param(2, 2, (3, 45, 53), (1, 16, 16), None, id="2d-d2-one-tile-per-block"),
        pytest.param(2, 2, (3, 45, 53), (2, 32, 24), (1, 12, 8), id="2d-d2-many-tiles-per-block"),
        pytest.param(2, 3, (2, 37, 41), (1, 24, 40), None, id="2d-d3"),
        pytest.param(3, 2, (13, 21, 19), (8, 8, 8), None, id="3d-d2"),
        pytest.param(3, 2, (13, 21, 19), (4, 12, 8), (4, 4, 4), id="3d-d2-many-tiles"),
    ],
)
def test_predict_stitched_blocks_equal_one_whole_volume_pass(
    client: Client,
    tmp_path: Path,
    ndim: int,
    depth: int,
    shape: tuple[int, ...],
    block: tuple[int, ...],
    tile: tuple[int, ...] | None,
) -> None:
    # The headline property: in float64, the tiled run across worker processes equals one forward
    # pass over the whole volume mirror-padded by the margin: bit for bit in 2D; in 3D, torch's
    # conv3d sums in an order that depends on the input size, which costs a few float64 ulps.
    data = blob_volume(shape)
    volume = open_volume(write_zarr(tmp_path / "in.zarr", data))
    normalization = {"normalization": {"mean": 100.0, "std": 60.0}}  # unsaturated soft-max
    predictor = ModelPredictor(
        checkpoint_bytes(tiny_unet(ndim, depth), normalization), dtype="float64"
    )
    geometry = TileGeometry.for_unet(ndim, depth, min_output=tile or block)
    store = create_prediction(
        str(tmp_path / "out.zarr"),
        volume=volume,
        num_classes=2,
        block_shape=block,
        output_dtype="float64",
        attrs={},
    )
    run_prediction(
        client,
        predictor=predictor,
        geometry=geometry,
        volume=volume,
        store=store,
        block_shape=block,
    )
    expected = predict_whole(predictor, data, ndim, depth)
    got = zarr.open_array(tmp_path / "out.zarr" / "probabilities")[:]
    if ndim == 2:
        np.testing.assert_array_equal(got, expected)
    else:
        np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-15)
    assert np.unique(expected[1]).size > expected[1].size // 2  # a live network: voxels differ


def test_predict_volume_float32_matches_the_whole_pass_to_float32_rounding(
    client: Client, tmp_path: Path
) -> None:
    data = blob_volume((2, 40, 36))
    model = tiny_unet()
    source = write_zarr(tmp_path / "in.zarr", data)
    predict_volume(
        model,
        source,
        tmp_path / "out.zarr",
        block_shape=(1, 16, 32),
        output_dtype="float32",
        client=client,
    )
    expected = predict_whole(ModelPredictor(checkpoint_bytes(model)), data, 2, 2)
    ds = open_prediction(str(tmp_path / "out.zarr"))
    # float32 sums over raw 0..255 inputs through 13 conv layers: agreement to ~1e-5, no seams.
    assert_close_in_float32(ds.probabilities.values, expected)
    decided = np.abs(expected[1] - expected[0]) > 1e-4
    np.testing.assert_array_equal(ds.segmentation.values[decided], expected.argmax(axis=0)[decided])


def assert_close_in_float32(got: np.ndarray, expected: np.ndarray) -> None:
    np.testing.assert_allclose(got, expected, rtol=0, atol=5e-5)


def test_predict_output_is_an_xarray_dataset_with_physical_coordinates(
    client: Client, tmp_path: Path
) -> None:
    source = write_zarr(
        tmp_path / "in.zarr", blob_volume((3, 20, 24)), voxel_size=[50, 4, 4], units="nm"
    )
    model = tiny_unet()
    report = predict_volume(
        model, source, tmp_path / "out.zarr", block_shape=(2, 16, 16), client=client
    )
    ds = xr.open_zarr(tmp_path / "out.zarr")  # plain xarray, no help from us
    assert ds.probabilities.dims == ("class", "z", "y", "x") and ds.segmentation.dims == (
        "z",
        "y",
        "x",
    )
    assert ds.probabilities.dtype == np.uint8 and ds.probabilities.shape == (2, 3, 20, 24)
    assert ds.z.values.tolist() == [0.0, 50.0, 100.0] and ds.x.values[-1] == 23 * 4.0
    assert ds.y.attrs["units"] == "nm"
    info = ds.attrs["unet_volume"]
    assert info["complete"] is True and info["input"]["url"] == source
    assert info["geometry"]["block_shape"] == [2, 16, 16] and info["geometry"]["halo"] == [
        0,
        20,
        20,
    ]
    assert info["model"]["config"]["depth"] == 2 and info["report"]["blocks"] == report.blocks == 8
    # Chunks are the block grid: one chunk per block task.
    assert ds.segmentation.encoding["chunks"] == (2, 16, 16)
    codecs = zarr.open_array(tmp_path / "out.zarr" / "segmentation").metadata.to_dict()["codecs"]
    assert codecs[-1]["name"] == "blosc" and codecs[-1]["configuration"]["cname"] == "zstd"


def test_predict_uint8_stores_rounded_probabilities(client: Client, tmp_path: Path) -> None:
    source = write_zarr(tmp_path / "in.zarr", blob_volume((1, 30, 30)))
    model = tiny_unet()
    for dtype in ("float32", "uint8"):
        predict_volume(
            model,
            source,
            tmp_path / dtype,
            block_shape=(1, 16, 16),
            output_dtype=dtype,
            client=client,
        )
    exact = open_prediction(str(tmp_path / "float32")).probabilities.values
    stored = open_prediction(str(tmp_path / "uint8")).probabilities.values
    np.testing.assert_array_equal(stored, np.rint(exact * 255).astype(np.uint8))


def test_predict_tiff_input_with_channels_and_a_checkpoint_file(
    client: Client, tmp_path: Path
) -> None:
    import tifffile

    data = blob_volume((2, 24, 20), channels=2)
    tifffile.imwrite(tmp_path / "in.tif", data)
    model = tiny_unet(in_channels=2)
    save_model(model, tmp_path / "m.pt")
    predict_volume(
        tmp_path / "m.pt",
        tmp_path / "in.tif",
        tmp_path / "out.zarr",
        block_shape=(1, 16, 16),
        output_dtype="float32",
        client=client,
    )
    expected = predict_whole(ModelPredictor(checkpoint_bytes(model)), data, 2, 2)
    assert_close_in_float32(
        open_prediction(str(tmp_path / "out.zarr")).probabilities.values, expected
    )


def crop_probe_run(
    client: Client,
    tmp_path: Path,
    shape: tuple[int, int, int],
    block: tuple[int, int, int],
    **options: Any,
) -> RunReport:
    """A 2D depth-2 crop probe over an arange volume; its output must equal the volume."""
    data = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)
    volume = open_volume(write_zarr(tmp_path / "in.zarr", data))
    geometry = TileGeometry.for_unet(2, 2, min_output=(1, 4, 4))
    store = create_prediction(
        str(tmp_path / "out.zarr"),
        volume=volume,
        num_classes=1,
        block_shape=block,
        output_dtype="float32",
        attrs={},
    )
    report = run_prediction(
        client,
        predictor=CropPredictor(geometry),
        geometry=geometry,
        volume=volume,
        store=store,
        block_shape=block,
        **options,
    )
    np.testing.assert_array_equal(zarr.open_array(tmp_path / "out.zarr" / "probabilities")[0], data)
    return report


def test_predict_bounded_window_of_one_task_gives_the_same_output(
    client: Client, tmp_path: Path
) -> None:
    report = crop_probe_run(client, tmp_path, (3, 20, 20), (1, 4, 8), max_in_flight=1)
    assert report.blocks == 3 * 5 * 3


class FailingPredictor(CropPredictor):
    """Fails on tiles that start past y = 8, as a corrupt input chunk or an OOM would."""

    def __call__(self, tile: np.ndarray) -> np.ndarray:
        if tile[0, 0, 0, 0] > 9 * 20:  # the arange value at (0, 9, 0)
            raise RuntimeError("simulated failure")
        return super().__call__(tile)


def test_predict_failed_block_names_the_block_and_leaves_no_output(
    client: Client, tmp_path: Path
) -> None:
    from unet_volume.predict import run_plan

    source = write_zarr(tmp_path / "in.zarr", np.arange(400, dtype=np.float32).reshape(1, 20, 20))
    plan = plan_prediction(
        tiny_unet(), source, tmp_path / "out.zarr", PredictOptions(block_shape=(1, 4, 4))
    )
    failing = FailingPredictor(plan.geometry)
    with pytest.raises(BlockError, match=r"predict-block-.*simulated failure"):
        run_plan(plan, client, predictor=failing)
    assert not (tmp_path / "out.zarr").exists()


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        pytest.param(
            {"block_shape": (1, 18, 16)},
            GeometryError,
            "multiple of the network's period 4",
            id="block",
        ),
        pytest.param({"output_dtype": "int8"}, InputError, "output dtype 'int8'", id="dtype"),
        pytest.param({"source": "missing.zarr"}, InputError, "does not exist", id="missing-input"),
        pytest.param(
            {"model": "not-a-model.pt"}, CheckpointError, "does not exist", id="missing-model"
        ),
        pytest.param(
            {"model": "in.zarr/zarr.json"},
            CheckpointError,
            "not a unet-volume checkpoint",
            id="not-ours",
        ),
        pytest.param({"model": tiny_unet(in_channels=3)}, InputError, "expects 3", id="channels"),
        pytest.param({"output": "existing"}, OutputExistsError, "pass --overwrite", id="exists"),
    ],
)
def test_predict_bad_input_is_refused_before_anything_is_written(
    tmp_path: Path, kwargs: dict, error: type[Exception], message: str
) -> None:
    source = write_zarr(tmp_path / "in.zarr", np.zeros((1, 8, 8), dtype=np.uint8))
    (tmp_path / "existing").mkdir()
    args = {"model": tiny_unet(), "source": source, "output": tmp_path / "out.zarr", **kwargs}
    for key in ("model", "source", "output"):
        if isinstance(args[key], str) and not args[key].startswith(str(tmp_path)):
            args[key] = str(tmp_path / args[key])
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(error, match=message) as info:
        plan_prediction(
            args.pop("model"), args.pop("source"), args.pop("output"), PredictOptions(**args)
        )
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize(
    ("ndim", "shape", "block"),
    [
        pytest.param(2, (2, 37, 45), (1, 16, 32), id="2d"),
        pytest.param(3, (5, 13, 11), (4, 8, 8), id="3d"),
    ],
)
def test_predict_test_time_augmentation_keeps_stitching_exact(
    client: Client, tmp_path: Path, ndim: int, shape: tuple[int, ...], block: tuple[int, ...]
) -> None:
    # Averaging over 8 turned copies of each tile: all valid inputs of a depth-d net share one
    # phase modulo 2^d, so turned tiles and the turned whole volume pool on the same lattice and
    # the stitched result still equals one whole-volume pass with the same averaging.
    data = blob_volume(shape)
    volume = open_volume(write_zarr(tmp_path / "in.zarr", data))
    normalization = {"normalization": {"mean": 100.0, "std": 60.0}}
    model = checkpoint_bytes(tiny_unet(ndim, 2), normalization)
    predictor = ModelPredictor(model, dtype="float64", tta=True)
    geometry = TileGeometry.for_unet(ndim, 2, min_output=block)
    store = create_prediction(
        str(tmp_path / "out.zarr"),
        volume=volume,
        num_classes=2,
        block_shape=block,
        output_dtype="float64",
        attrs={},
    )
    run_prediction(
        client,
        predictor=predictor,
        geometry=geometry,
        volume=volume,
        store=store,
        block_shape=block,
    )
    got = zarr.open_array(tmp_path / "out.zarr" / "probabilities")[:]
    expected = predict_whole(predictor, data, ndim, 2)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-15)
    plain = predict_whole(ModelPredictor(model, dtype="float64"), data, ndim, 2)
    assert np.abs(expected - plain).max() > 1e-3  # the averaging did something


def test_predict_blocks_run_only_on_gpu_workers(gpu_client: Client, tmp_path: Path) -> None:
    gpu_worker = next(
        address
        for address, info in gpu_client.scheduler_info()["workers"].items()
        if info["resources"].get("GPU")
    )
    with get_task_stream(gpu_client) as stream:
        report = crop_probe_run(gpu_client, tmp_path, (2, 16, 24), (1, 8, 8))
    blocks = [task for task in stream.data if task["key"].startswith("predict-block-")]
    assert len(blocks) == report.blocks == 2 * 2 * 3
    assert {task["worker"] for task in blocks} == {gpu_worker}


def test_predict_blocks_ask_for_no_gpu_where_no_worker_has_one(client: Client) -> None:
    # Asking for a resource no worker has would wait forever, silently.
    assert gpu_resources(client) is None
