"""Instance labels on a real Dask cluster: scipy's labelling of the whole volume, block by block.

Each block is one task per pass (label, pair, relabel) on worker processes, reading and
writing a real Zarr store; the stored labels equal ``scipy.ndimage.label`` of the whole mask,
ids included, whatever the block shape.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr
import zarr
from distributed import Client
from scipy import ndimage

from unet_volume.cli.main import main
from unet_volume.errors import BlockError, InputError
from unet_volume.evaluation.scores import evaluate
from unet_volume.instances.components import structure
from unet_volume.instances.labelling import label_instances
from unet_volume.models.unet import UNet
from unet_volume.output.bookkeeping import DONE
from unet_volume.output.lifecycle import run_info
from unet_volume.prediction.run import predict_volume
from unet_volume.testing import snapshot

VOXEL = (50.0, 4.0, 4.0)


def random_mask(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """Blobs that touch and wind across blocks: smoothed noise, thresholded."""
    noise = np.random.default_rng(seed).random(shape)
    return ndimage.uniform_filter(noise, size=3) > 0.5


@pytest.mark.parametrize(
    ("block_shape", "connectivity", "per_slice"),
    [((2, 5, 7), 26, False), ((1, 8, 8), 6, True), ((3, 17, 4), 6, False)],
)
def test_instances_equal_scipy_on_the_whole_volume(
    tmp_path: Path,
    client: Client,
    block_shape: tuple[int, int, int],
    connectivity: int,
    per_slice: bool,
) -> None:
    mask = random_mask((5, 17, 19))
    source = tmp_path / "mask.zarr"
    zarr.create_array(
        source, data=mask.astype(np.uint8), chunks=(2, 6, 6), attributes={"voxel_size": VOXEL}
    )
    report = label_instances(
        str(source),
        str(tmp_path / "labels.zarr"),
        client=client,
        connectivity=connectivity,
        per_slice=per_slice,
        block_shape=block_shape,
    )
    expected, count = ndimage.label(mask, structure(connectivity, per_slice=per_slice))
    stored = xr.open_zarr(report.output_url).instances
    assert stored.dims == ("z", "y", "x")
    np.testing.assert_array_equal(stored.values, expected)
    assert report.objects == count > 1
    assert run_info(report.output_url)["complete"]  # type: ignore[index]
    assert_table_describes(report.output_url, expected, count)


def assert_table_describes(
    url: str, labels: np.ndarray, count: int, probability: np.ndarray | None = None
) -> None:
    """The object table holds, per object of ``labels``, what scipy measures on the whole."""
    table = pd.read_parquet(f"{url}.objects.parquet")
    ids = np.arange(1, count + 1)
    assert table["id"].tolist() == ids.tolist()
    assert table["voxels"].tolist() == np.bincount(labels.ravel())[1:].tolist()
    np.testing.assert_allclose(table["volume"], table["voxels"] * np.prod(VOXEL))
    centres = np.array(ndimage.center_of_mass(labels > 0, labels, ids)) * VOXEL
    np.testing.assert_allclose(table[["centroid_z", "centroid_y", "centroid_x"]], centres)
    for row, found in zip(table.itertuples(), ndimage.find_objects(labels)):
        assert (row.bbox_z_begin, row.bbox_z_end) == (found[0].start, found[0].stop)
        assert (row.bbox_y_begin, row.bbox_y_end) == (found[1].start, found[1].stop)
        assert (row.bbox_x_begin, row.bbox_x_end) == (found[2].start, found[2].stop)
    edges = np.zeros(labels.shape, bool)
    for axis in range(3):
        index = [slice(None)] * 3
        index[axis] = 0
        edges[tuple(index)] = True
        index[axis] = -1
        edges[tuple(index)] = True
    expected_touch = np.zeros(count + 1, bool)
    expected_touch[np.unique(labels[edges])] = True
    assert table["touches_border"].tolist() == expected_touch[1:].tolist()
    if probability is not None:
        means = ndimage.mean(probability, labels, ids)
        np.testing.assert_allclose(table["mean_probability"], means, rtol=1e-12)


def test_instances_of_a_prediction_label_its_foreground(tmp_path: Path, client: Client) -> None:
    torch.manual_seed(0)
    image = tmp_path / "image.zarr"
    rng = np.random.default_rng(1)
    zarr.create_array(image, data=rng.integers(0, 255, (2, 40, 44), dtype=np.uint8))
    prediction = tmp_path / "prediction.zarr"
    predict_volume(
        UNet(base_channels=4, depth=2), image, prediction, client=client, voxel_size=VOXEL
    )
    report = label_instances(
        str(prediction), str(tmp_path / "labels.zarr"), client=client, block_shape=(1, 16, 16)
    )
    foreground = zarr.open_group(prediction)["segmentation"][...] == 1
    expected, count = ndimage.label(foreground, structure(6, per_slice=True))
    np.testing.assert_array_equal(zarr.open_group(report.output_url)["instances"][...], expected)
    assert report.objects == count
    stored = zarr.open_group(prediction)["probabilities"][1]
    assert_table_describes(report.output_url, expected, count, stored / 255.0)
    # evaluate scores instance labels as they are: components of the foreground score as the
    # prediction itself (whose instances evaluate takes as the same components)
    truth = ndimage.uniform_filter(rng.random((2, 40, 44)), 5) > 0.5
    ours = evaluate(report.output_url, truth.astype(np.uint8)).to_dict()
    assert ours["volume"] == evaluate(str(prediction), truth.astype(np.uint8)).to_dict()["volume"]


def test_instances_refuse_float_input_and_write_nothing(tmp_path: Path, client: Client) -> None:
    source = tmp_path / "float.zarr"
    zarr.create_array(source, data=np.zeros((2, 8, 8), np.float32))
    before = snapshot(tmp_path)
    with pytest.raises(InputError, match=r"1 channel\(s\) of float32; pass a prediction"):
        label_instances(str(source), str(tmp_path / "labels.zarr"), client=client)
    assert snapshot(tmp_path) == before


def test_instances_cli_segment_labels_in_3d_and_refuses_bad_input_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mask = random_mask((4, 12, 12), seed=2)
    source = tmp_path / "mask.zarr"
    zarr.create_array(source, data=mask.astype(np.uint8))
    out = tmp_path / "labels.zarr"
    args = ["segment", str(source), str(out), "--connectivity", "26", "--3d"]
    assert main([*args, "--block-shape", "2,5,5", "--workers", "1"]) == 0
    expected, count = ndimage.label(mask, structure(26, per_slice=False))
    np.testing.assert_array_equal(zarr.open_group(out)["instances"][...], expected)
    assert f"{count:,} object(s)" in capsys.readouterr().out
    assert main(["objects", str(out), "--largest", "2"]) == 0
    printed = capsys.readouterr().out
    biggest = np.bincount(expected.ravel())[1:].max()
    assert printed.startswith(f"{count:,} objects") and f"max {biggest:,}" in printed
    assert printed.count("  id ") == min(2, count)
    bad = ["segment", str(source), str(tmp_path / "bad.zarr"), "--block-shape", "0,5,5"]
    assert main([*bad, "--workers", "1"]) == 2
    error = capsys.readouterr().err.splitlines()
    assert len(error) == 1 and error[0].startswith("unet-volume segment: error: block shape")
    assert not (tmp_path / "bad.zarr").exists()
    assert main(["objects", str(source)]) == 2  # a mask, not segment's labels
    assert "no object table" in capsys.readouterr().err


def test_instances_a_failed_block_is_recorded_and_the_same_call_redoes_only_it(
    tmp_path: Path, client: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.manual_seed(0)
    image = tmp_path / "image.zarr"
    zarr.create_array(image, data=np.random.default_rng(4).integers(0, 255, (2, 40, 44), np.uint8))
    prediction = tmp_path / "prediction.zarr"
    model = UNet(base_channels=4, depth=2)
    predict_volume(model, image, prediction, client=client, voxel_size=VOXEL)
    # slice 1's probabilities, read by pass 3 for the table, damaged: its blocks fail there
    chunk = next(
        p
        for p in (prediction / "probabilities").rglob("*")
        if p.is_file() and p.relative_to(prediction / "probabilities").parts[:3] == ("c", "0", "1")
    )
    intact = chunk.read_bytes()
    chunk.write_bytes(b"not a chunk")
    out = str(tmp_path / "labels.zarr")
    run = {"client": client, "block_shape": (1, 16, 16), "max_failures": 20}
    with pytest.raises(BlockError, match=r"9 block\(s\) failed.*run the same command again"):
        label_instances(str(prediction), out, **run)
    info = run_info(out)
    assert info is not None and not info["complete"] and len(info["failures"]) == 9
    assert main(["status", out]) == 0
    said = capsys.readouterr().out
    assert "done 9 / failed 9" in said and "run: segment components, blocks 1x16x16" in said
    assert "run the same `unet-volume segment` command again" in said
    chunk.write_bytes(intact)
    report = label_instances(str(prediction), out, **run)
    assert report.skipped == 9  # slice 0's blocks were done
    foreground = zarr.open_group(prediction)["segmentation"][...] == 1
    expected, count = ndimage.label(foreground, structure(6, per_slice=True))
    np.testing.assert_array_equal(zarr.open_group(out)["instances"][...], expected)
    assert_table_describes(
        out, expected, count, zarr.open_group(prediction)["probabilities"][1] / 255.0
    )
    assert sorted(zarr.open_group(out).array_keys()) == ["instances", "x", "y", "z"]
    assert zarr.open_group(out)[DONE][...].all()  # the bookkeeping, in its own group
    again = label_instances(str(prediction), out, **run)  # complete: left be
    assert (again.skipped, again.objects) == (report.blocks, count)
