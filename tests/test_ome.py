"""Viewer-ready outputs: OME-Zarr 0.5 images with pyramids, instance labels under ``labels/``.

A prediction and its instance labels are checked the way viewers and tools read them: by
ome-zarr-models (the spec's validator) and ome-zarr-py's reader (what napari-ome-zarr uses),
while xarray still opens the full resolution with named dims and physical coordinates.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import zarr
from distributed import Client
from ome_zarr.io import parse_url
from ome_zarr.reader import Reader
from ome_zarr_models.v05.image import Image

from unet_volume.cli.main import main
from unet_volume.instances.labelling import label_instances, open_instances
from unet_volume.models.unet import UNet
from unet_volume.output.prediction import open_prediction
from unet_volume.output.pyramid import build_pyramid
from unet_volume.prediction.run import predict_volume

VOXEL = (50.0, 4.0, 4.0)
SHAPE = (2, 300, 36)  # y longer than the pyramid's smallest level: one level below


@pytest.fixture(scope="module")
def prediction(tmp_path_factory: pytest.TempPathFactory, client: Client) -> Path:
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("ome")
    image = root / "image.zarr"
    rng = np.random.default_rng(3)
    zarr.create_array(image, data=rng.integers(0, 255, SHAPE, dtype=np.uint8))
    out = root / "prediction.zarr"
    model = UNet(base_channels=2, depth=1)
    predict_volume(model, image, out, client=client, voxel_size=VOXEL, output_dtype="uint8")
    return out


def window_means(data: np.ndarray) -> np.ndarray:
    """2 x 2 means in (y, x), rounded, the last odd row or column on its own: by hand."""
    out = np.empty((*data.shape[:-2], -(-data.shape[-2] // 2), -(-data.shape[-1] // 2)))
    for j in range(out.shape[-2]):
        for i in range(out.shape[-1]):
            window = data[..., 2 * j : 2 * j + 2, 2 * i : 2 * i + 2].astype(np.float64)
            out[..., j, i] = np.rint(window.mean(axis=(-2, -1)))
    return out.astype(data.dtype)


def test_ome_prediction_is_an_ome_zarr_image_whose_levels_are_means(prediction: Path) -> None:
    group = zarr.open_group(prediction, mode="r")
    image = Image.from_zarr(group)  # raises on anything the spec does not allow
    (multiscale,) = image.attributes.ome.multiscales
    assert [d.path for d in multiscale.datasets] == ["probabilities", "pyramid/1"]
    assert [(a.name, a.type, a.unit) for a in multiscale.axes] == [
        ("class", "channel", None),
        ("z", "space", "nanometer"),
        ("y", "space", "nanometer"),
        ("x", "space", "nanometer"),
    ]
    scales = [d.coordinateTransformations[0].scale for d in multiscale.datasets]
    assert scales == [[1.0, 50.0, 4.0, 4.0], [1.0, 50.0, 8.0, 8.0]]
    level1 = group["pyramid/1"][...]
    assert level1.shape == (2, 2, 150, 18)
    np.testing.assert_array_equal(level1, window_means(group["probabilities"][...]))


def test_ome_pyramid_of_a_sharded_prediction_keeps_its_shards(
    tmp_path: Path, client: Client
) -> None:
    image = tmp_path / "image.zarr"
    data = np.random.default_rng(4).integers(0, 255, (4, 300, 36), dtype=np.uint8)
    zarr.create_array(image, data=data)
    out = tmp_path / "prediction.zarr"
    torch.manual_seed(0)
    model = UNet(base_channels=2, depth=1)
    shards = {"block_shape": (1, 300, 36), "shard_shape": (2, 300, 36)}
    predict_volume(model, image, out, client=client, voxel_size=VOXEL, **shards)  # type: ignore[arg-type]
    group = zarr.open_group(out, mode="r")
    level1 = group["pyramid/1"]
    # a task writes a whole shard: two slices of the level, as of the full resolution
    assert (level1.shards, level1.chunks) == ((2, 2, 150, 18), (2, 1, 150, 18))
    np.testing.assert_array_equal(level1[...], window_means(group["probabilities"][...]))


def test_ome_xarray_still_opens_the_full_resolution_with_physical_coordinates(
    prediction: Path,
) -> None:
    for dataset in (xr.open_zarr(prediction), open_prediction(str(prediction))):
        assert dataset.probabilities.dims == ("class", "z", "y", "x")
        assert dataset.probabilities.shape == (2, *SHAPE)
        assert dataset.segmentation.dims == ("z", "y", "x")
        assert dataset.y.values[:3].tolist() == [0.0, 4.0, 8.0]
        assert not any(str(name).startswith("pyramid") for name in dataset.variables)


def test_ome_labels_under_the_prediction_open_as_image_and_labels_in_ome_zarr_readers(
    prediction: Path, client: Client
) -> None:
    cells = prediction / "labels" / "cells"
    label_instances(str(prediction), str(cells), client=client, overwrite=True)
    group = zarr.open_group(prediction, mode="r")
    image = Image.from_zarr(group)  # labels: listed, valid, as many levels as the image
    assert image.labels is not None and image.labels.label_paths == ["cells"]
    labels = zarr.open_group(cells, mode="r")
    np.testing.assert_array_equal(labels["instances_1"][...], labels["instances"][:, ::2, ::2])
    # a shard per block (a task's write) of viewer-sized chunks; the level keeps the sharding
    assert (labels["instances"].shards, labels["instances"].chunks) == ((1, 300, 36), (1, 150, 36))
    assert (labels["instances_1"].shards, labels["instances_1"].chunks) == ((1, 150, 18),) * 2
    assert labels.attrs["ome"]["image-label"] == {"source": {"image": "../../"}}  # type: ignore[index]
    full = open_instances(str(cells)).instances
    assert full.dims == ("z", "y", "x") and full.shape == SHAPE
    assert full.y.values[:2].tolist() == [0.0, 4.0]

    nodes = list(Reader(parse_url(str(prediction)))())
    probabilities, cell_labels = nodes[0], nodes[-1]
    assert [level.shape for level in probabilities.data] == [(2, *SHAPE), (2, 2, 150, 18)]
    assert probabilities.metadata["coordinateTransformations"][1][0]["scale"] == [
        1.0,
        50.0,
        8.0,
        8.0,
    ]
    assert cell_labels.metadata["name"] == "instances"
    assert [level.shape for level in cell_labels.data] == [SHAPE, (2, 150, 18)]
    assert int(cell_labels.data[0].max().compute()) == int(labels["instances"][...].max())


def test_ome_segment_cli_writes_labels_into_the_prediction(
    prediction: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = prediction / "labels" / "components"
    assert main(["segment", str(prediction), str(out), "--workers", "1"]) == 0
    capsys.readouterr()
    labels = Image.from_zarr(zarr.open_group(prediction, mode="r")).labels
    assert labels is not None and "components" in labels.label_paths


def test_ome_a_3d_pyramid_level_is_the_mean_of_each_2x2x2_window(
    tmp_path: Path, client: Client
) -> None:
    # isotropic: all three axes halve; odd sizes: the last window holds fewer voxels
    data = np.random.default_rng(6).integers(0, 255, (1, 300, 19, 21), dtype=np.uint8)
    url = str(tmp_path / "volume.zarr")
    group = zarr.open_group(url, mode="w", zarr_format=3)
    array = group.create_array(
        "probabilities",
        shape=data.shape,
        chunks=(1, 64, 8, 8),
        dtype="uint8",
        dimension_names=("class", "z", "y", "x"),
    )
    array[...] = data
    assert build_pyramid(client, url, "probabilities", "mean", None) == [(1, 1, 1), (2, 2, 2)]
    padded = np.pad(data, [(0, 0), (0, 0), (0, 1), (0, 1)], mode="edge").astype(np.float64)
    windows = padded.reshape(1, 150, 2, 10, 2, 11, 2).mean(axis=(2, 4, 6))
    np.testing.assert_array_equal(group["pyramid/1"][...], np.rint(windows).astype(np.uint8))
