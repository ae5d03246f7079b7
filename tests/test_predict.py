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

from unet_volume.cluster.client import gpu_resources
from unet_volume.errors import (
    CheckpointError,
    GeometryError,
    InputError,
    OutputExistsError,
)
from unet_volume.grid import OutputLayout
from unet_volume.io.volumes import open_volume
from unet_volume.models.checkpoint import checkpoint_bytes, save_model
from unet_volume.models.unet import UNet
from unet_volume.output.prediction import create_prediction, open_prediction
from unet_volume.prediction.engine import (
    PredictionWork,
    RunLimits,
    RunReport,
    run_prediction,
)
from unet_volume.prediction.model_predictor import ModelPredictor
from unet_volume.prediction.options import PredictOptions
from unet_volume.prediction.plan import plan_prediction
from unet_volume.prediction.run import predict_volume
from unet_volume.prediction.tasks import TaskPlan, read_estimate
from unet_volume.prediction.worker import Predictor
from unet_volume.testing import (
    EXACT_LIMIT,
    CropPredictor,
    SumBound,
    blob_volume,
    integer_unet,
    predict_whole,
    write_zarr,
)
from unet_volume.tiling import TileGeometry


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
    geometry = TileGeometry.for_unet(ndim, depth, min_output=tile)
    predictor = CropPredictor(geometry)
    report, got = run_blocks(client, tmp_path, predictor, geometry, data, block, num_classes=1)
    assert report.voxels == data.size
    np.testing.assert_array_equal(got[0], data)


@pytest.mark.parametrize(
    ("ndim", "shard", "task"),
    [
        pytest.param(2, (1, 8, 8), (2, 16, 24), id="2d"),
        pytest.param(3, (4, 8, 8), (8, 16, 16), id="3d"),
    ],
)
def test_predict_tasks_of_several_shards_write_the_volume_and_fetch_each_chunk_once(
    client: Client, tmp_path: Path, ndim: int, shard: tuple[int, ...], task: tuple[int, ...]
) -> None:
    data = np.arange(5 * 23 * 29, dtype=np.float32).reshape(5, 23, 29)
    geometry = TileGeometry.for_unet(ndim, 2, min_output=shard)
    predictor = CropPredictor(geometry)
    reports = {}
    for name, task_shape in (("shard", shard), ("task", task)):
        report, got = run_blocks(
            client,
            tmp_path / name,
            predictor,
            geometry,
            data,
            shard,
            num_classes=1,
            task_shape=task_shape,
        )
        np.testing.assert_array_equal(got[0], data)
        volume = open_volume(tmp_path / name / "in.zarr")
        layout = OutputLayout(volume.shape, shard, shard)
        assert report.chunks_read == read_estimate(volume, layout, task_shape, geometry).fetched
        assert report.tasks == TaskPlan(layout, task_shape).num_tasks
        reports[name] = report
    assert reports["task"].chunks_read < reports["shard"].chunks_read
    assert reports["task"].chunks_stored == reports["shard"].chunks_stored == 3 * 2 * 2


def run_blocks(
    client: Client,
    tmp_path: Path,
    predictor: Predictor,
    geometry: TileGeometry,
    data: np.ndarray,
    block: tuple[int, ...],
    *,
    num_classes: int = 2,
    shard: tuple[int, ...] | None = None,
    task_shape: tuple[int, ...] | None = None,
    max_in_flight: int | None = None,
) -> tuple[RunReport, np.ndarray]:
    """Predict ``data`` block by block (``shard`` blocks a shard, ``task_shape`` voxels a
    task) on the cluster into float64; the report and the output."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    volume = open_volume(write_zarr(tmp_path / "in.zarr", data))
    layout = OutputLayout(volume.shape, block, shard or block)
    store = create_prediction(
        str(tmp_path / "out.zarr"),
        volume=volume,
        num_classes=num_classes,
        layout=layout,
        output_dtype="float64",
        attrs={},
    )
    tasks = TaskPlan(layout, task_shape or layout.shard_shape)
    work = PredictionWork(volume, geometry, tasks, store)
    report = run_prediction(client, work, predictor, limits=RunLimits(max_in_flight=max_in_flight))
    return report, np.asarray(zarr.open_array(tmp_path / "out.zarr" / "probabilities")[:])


def exact_whole_pass(predictor: ModelPredictor, data: np.ndarray, depth: int) -> np.ndarray:
    """The reference pass, with proof that every sum in it is exact (see integer_unet)."""
    with SumBound(predictor.network()) as bound:
        expected = predict_whole(predictor, data, predictor.ndim, depth)
    assert bound.largest < EXACT_LIMIT
    assert np.unique(expected[1]).size > expected[1].size // 2  # a live network: voxels differ
    return expected


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
    # The headline property: the tiled run across worker processes equals one forward pass
    # over the whole volume mirror-padded by the halo, bit for bit, on any CPU. Exact by
    # construction: integer weights and biases (integer_unet) on integer voxels make every
    # partial sum an integer below 2**53 (checked), which float64 holds exactly whatever order
    # the kernels add in; logits are compared, before the soft-max's inexact exp.
    predictor = ModelPredictor(
        checkpoint_bytes(integer_unet(ndim=ndim, depth=depth)), dtype="float64", output="logits"
    )
    data = blob_volume(shape)
    geometry = TileGeometry.for_unet(ndim, depth, min_output=tile or block)
    _, got = run_blocks(client, tmp_path, predictor, geometry, data, block)
    np.testing.assert_array_equal(got, exact_whole_pass(predictor, data, depth))


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
    # The production path (float32, oneDNN): tiles and the whole pass each round to float32.
    assert_close_in_float32(ds.probabilities.values, expected)
    decided = np.abs(expected[1] - expected[0]) > 2 * float32_tolerance()  # cannot flip
    np.testing.assert_array_equal(ds.segmentation.values[decided], expected.argmax(axis=0)[decided])


def float32_tolerance() -> float:
    """How far two float32 passes of the tiny net may differ in probability, by the precision used.

    On a CPU each pass rounds its sums to float32 (ulp 2**-23 at 1.0) in an order that depends
    on the tile size and the CPU's kernels; through the 13 convolutions of the tiny net two
    passes were measured 53 ulps apart at most (a float64 pass: 39 and 51 ulps from each), so
    256 ulps (2**-15, about 3e-5) is allowed. On CUDA, torch runs float32 convolutions in TF32
    (10-bit mantissa, ulp 2**-10) unless told otherwise: measured 0.0061 (6 TF32 ulps) on an
    H100, so 16 TF32 ulps (2**-6). A misplaced tile is off by far more: probabilities differ
    by ~0.1 between neighbouring voxels.
    """
    if torch.cuda.is_available() and torch.backends.cudnn.allow_tf32:
        return 16 * 2.0**-10
    return 256 * 2.0**-23


def assert_close_in_float32(got: np.ndarray, expected: np.ndarray) -> None:
    np.testing.assert_allclose(got, expected, rtol=0, atol=float32_tolerance())


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
    assert ds.probabilities.dims == ("class", "z", "y", "x")
    assert ds.segmentation.dims == ("z", "y", "x")
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
    probabilities = open_prediction(str(tmp_path / "float32")).probabilities.values
    stored = open_prediction(str(tmp_path / "uint8")).probabilities.values
    # Two runs, so two float32 roundings (see float32_tolerance): each stored value is 255 p
    # rounded to the nearest integer, up to that tolerance at a .5 tie.
    scaled = probabilities.astype(np.float64) * 255
    assert np.abs(stored - scaled).max() <= 0.5 + 255 * float32_tolerance()
    assert np.mean(stored == np.rint(scaled)) > 0.99


def test_predict_threshold_segments_the_foreground_probability(
    client: Client, tmp_path: Path
) -> None:
    source = write_zarr(tmp_path / "in.zarr", blob_volume((2, 30, 30)))
    model = tiny_unet()
    for name, threshold in (("argmax", None), ("threshold", 0.3)):
        predict_volume(
            model,
            source,
            tmp_path / name,
            block_shape=(1, 16, 16),
            output_dtype="float32",
            threshold=threshold,
            client=client,
        )
    argmax, thresholded = (open_prediction(str(tmp_path / n)) for n in ("argmax", "threshold"))
    foreground = thresholded.probabilities.values[1]
    assert np.array_equal(thresholded.segmentation.values, foreground > 0.3)
    assert np.array_equal(argmax.segmentation.values, argmax.probabilities.values.argmax(0))
    between = (foreground > 0.3) & (foreground < 0.5)
    assert between.any()  # the two read-outs differ where p is between the thresholds
    assert "> 0.3" in thresholded.segmentation.attrs["long_name"]


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
    geometry = TileGeometry.for_unet(2, 2, min_output=(1, 4, 4))
    predictor = CropPredictor(geometry)
    report, got = run_blocks(
        client, tmp_path, predictor, geometry, data, block, num_classes=1, **options
    )
    np.testing.assert_array_equal(got[0], data)
    return report


def test_predict_bounded_window_of_one_task_gives_the_same_output(
    client: Client, tmp_path: Path
) -> None:
    report = crop_probe_run(client, tmp_path, (3, 20, 20), (1, 4, 8), max_in_flight=1)
    assert report.blocks == 3 * 5 * 3


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
        pytest.param({"image": "missing.zarr"}, InputError, "does not exist", id="missing-input"),
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
        pytest.param({"threshold": 1.5}, InputError, "between 0 and 1", id="threshold"),
        pytest.param(
            {"model": UNet(base_channels=2, depth=1, num_classes=3), "threshold": 0.3},
            InputError,
            "needs a two-class model",
            id="threshold-classes",
        ),
    ],
)
def test_predict_bad_input_is_refused_before_anything_is_written(
    tmp_path: Path, kwargs: dict, error: type[Exception], message: str
) -> None:
    source = write_zarr(tmp_path / "in.zarr", np.zeros((1, 8, 8), dtype=np.uint8))
    (tmp_path / "existing").mkdir()
    args = {"model": tiny_unet(), "image": source, "output": tmp_path / "out.zarr", **kwargs}
    for key in ("model", "image", "output"):
        if isinstance(args[key], str) and not args[key].startswith(str(tmp_path)):
            args[key] = str(tmp_path / args[key])
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(error, match=message) as info:
        plan_prediction(
            args.pop("model"), args.pop("image"), args.pop("output"), PredictOptions(**args)
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
    # the stitched result still equals one whole-volume pass with the same averaging. Exact by
    # construction as the headline test: the 8 integer logits sum exactly, and / 8 is exact.
    model = checkpoint_bytes(integer_unet(ndim=ndim, depth=2))
    predictor = ModelPredictor(model, dtype="float64", tta=True, output="logits")
    data = blob_volume(shape)
    geometry = TileGeometry.for_unet(ndim, 2, min_output=block)
    _, got = run_blocks(client, tmp_path, predictor, geometry, data, block)
    expected = exact_whole_pass(predictor, data, 2)
    np.testing.assert_array_equal(got, expected)
    plain = predict_whole(ModelPredictor(model, dtype="float64", output="logits"), data, ndim, 2)
    assert not np.array_equal(expected, plain)  # the averaging did something


def test_predict_blocks_run_only_on_gpu_workers(gpu_client: Client, tmp_path: Path) -> None:
    gpu_worker = next(
        address
        for address, info in gpu_client.scheduler_info()["workers"].items()
        if info["resources"].get("GPU")
    )
    with get_task_stream(gpu_client) as stream:
        report = crop_probe_run(gpu_client, tmp_path, (2, 16, 24), (1, 8, 8))
    blocks = [task for task in stream.data if task["key"].startswith("predict-task-")]
    assert len(blocks) == report.blocks == 2 * 2 * 3
    assert {task["worker"] for task in blocks} == {gpu_worker}


def test_predict_blocks_ask_for_no_gpu_where_no_worker_has_one(client: Client) -> None:
    # Asking for a resource no worker has would wait forever, silently.
    assert gpu_resources(client) is None
