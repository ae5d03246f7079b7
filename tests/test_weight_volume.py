"""Weight volumes on a real cluster: chunked equals whole, the halo it needs, bad input."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from distributed import Client

from unet_volume.errors import InputError, OutputExistsError
from unet_volume.io.volumes import open_volume
from unet_volume.output.bookkeeping import DONE
from unet_volume.output.lifecycle import update_run_info
from unet_volume.testing import blob_labels, write_zarr
from unet_volume.training import weight_volume
from unet_volume.training.weight_map import (
    WeightMapConfig,
    balanced_class_weights,
    halo_for,
    training_target,
    weight_map,
)
from unet_volume.training.weight_volume import WeightReport, compute_weight_volume


@pytest.mark.parametrize(
    ("config", "shape", "chunks"),
    [
        pytest.param(WeightMapConfig(ndim=2), (2, 150, 140), (1, 48, 50), id="2d-paper-defaults"),
        pytest.param(
            WeightMapConfig(ndim=2, sigma=1.5), (3, 50, 47), (2, 16, 13), id="2d-small-chunks"
        ),
        pytest.param(WeightMapConfig(ndim=3, sigma=1.0), (16, 40, 36), (6, 13, 11), id="3d"),
        pytest.param(
            WeightMapConfig(ndim=3, sigma=1.5, voxel_size=(2.0, 1.0, 1.0)),
            (12, 44, 40),
            (5, 16, 12),
            id="3d-anisotropic",
        ),
    ],
)
def test_compute_weight_volume_equals_the_whole_volume_weights(
    client: Client,
    tmp_path: Path,
    config: WeightMapConfig,
    shape: tuple[int, int, int],
    chunks: tuple[int, ...],
) -> None:
    # Cells of radius 2-5 cross every chunk border; each block reads far less than the volume.
    labels = blob_labels(shape, int(np.prod(shape)) // 120, seed=1)
    assert all(c + 2 * h < n for c, h, n in zip(chunks[1:], halo_for(config)[1:], shape[1:]))
    report = compute_weight_volume(
        write_zarr(tmp_path / "labels.zarr", labels),
        str(tmp_path / "w.zarr"),
        config,
        block_shape=chunks,
        client=client,
    )
    whole = weight_map(labels, config)
    background = whole[~training_target(labels, config)]
    # The border term is there, and large.
    assert np.mean(background > report.class_weights[0] + 1e-3) > 0.1
    # Bit for bit: integer voxel sizes make every distance exact (see weight_map's docstring).
    np.testing.assert_array_equal(zarr.open_array(tmp_path / "w.zarr" / "weights")[:], whole)
    assert report.voxels == labels.size and report.halo == halo_for(config)


def test_compute_weight_volume_needs_its_whole_halo(
    client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The equality above is not vacuous: with half the halo (5 instead of 11 voxels) the weights
    # differ, e.g. by 10 exp(-(1 + 6)^2 / 4.5) = 2e-4 where a second cell 6 voxels away is missed.
    config, labels = WeightMapConfig(ndim=2, sigma=1.5), blob_labels((2, 50, 47), 40, seed=1)
    monkeypatch.setattr(weight_volume, "halo_for", lambda c: tuple(h // 2 for h in halo_for(c)))
    compute_weight_volume(
        write_zarr(tmp_path / "l.zarr", labels),
        str(tmp_path / "w.zarr"),
        config,
        block_shape=(1, 16, 13),
        client=client,
    )
    assert not np.allclose(
        zarr.open_array(tmp_path / "w.zarr" / "weights")[:], weight_map(labels, config), rtol=1e-6
    )


def test_compute_weight_volume_takes_a_binary_mask_in_whole_slices(
    client: Client, tmp_path: Path
) -> None:
    # A 2D mask's cells are its components per slice: exact when each block holds whole slices.
    mask = (blob_labels((3, 40, 36), 14, seed=2) > 0).astype(np.uint8)
    config = WeightMapConfig(ndim=2, sigma=2.0)
    compute_weight_volume(
        write_zarr(tmp_path / "m.zarr", mask),
        str(tmp_path / "w.zarr"),
        config,
        block_shape=(1, 40, 36),
        client=client,
    )
    np.testing.assert_array_equal(
        zarr.open_array(tmp_path / "w.zarr" / "weights")[:], weight_map(mask, config)
    )


def test_compute_weight_volume_writes_a_float32_array_in_a_zarr_v3_group(
    client: Client, tmp_path: Path
) -> None:
    labels = blob_labels((4, 20, 18), 6, seed=4)
    compute_weight_volume(
        write_zarr(tmp_path / "l.zarr", labels),
        str(tmp_path / "w.zarr"),
        WeightMapConfig(ndim=3, sigma=1.0),
        block_shape=(2, 64, 8),
        client=client,
    )
    array = zarr.open_array(tmp_path / "w.zarr" / "weights")
    assert (array.dtype, array.chunks, array.metadata.dimension_names) == (
        np.float32,
        (2, 20, 8),
        ("z", "y", "x"),
    )
    assert [type(c).__name__ for c in array.metadata.codecs] == ["BytesCodec", "BloscCodec"]
    recipe = zarr.open_group(tmp_path / "w.zarr").attrs["unet_volume"]["weights"]  # type: ignore[index]
    assert recipe["border"] == "background (0) outside the volume"  # type: ignore[index]


def test_compute_weight_volume_balances_classes_over_the_given_slices_only(
    client: Client, tmp_path: Path
) -> None:
    # Slices 0-1 are 1/4 cells, slices 2-3 (held out) all cells: only 0-1 may set the class weights.
    labels = np.zeros((4, 8, 8), np.uint16)
    labels[0:2, :4, :4] = 1
    labels[2:4] = 2
    report = compute_weight_volume(
        write_zarr(tmp_path / "l.zarr", labels),
        str(tmp_path / "w.zarr"),
        WeightMapConfig(w0=0.0),
        block_shape=(1, 8, 8),
        client=client,
        balance_z_range=(0, 2),
    )
    # One cell per slice touches no other: no separation borders, so 2 x 16 of 2 x 64 voxels are
    # target.
    assert report.class_weights == balanced_class_weights(2 * 16, 2 * 64)


def test_compute_weight_volume_resumes_only_missing_blocks_and_leaves_a_complete_output_be(
    client: Client, tmp_path: Path
) -> None:
    # issue 13: the weights share the prediction's records: done markers, identity, resume.
    labels = write_zarr(tmp_path / "l.zarr", blob_labels((4, 24, 24), 10, seed=2))
    out, config = tmp_path / "w.zarr", WeightMapConfig(ndim=2, sigma=1.5)

    def run(config: WeightMapConfig = config) -> WeightReport:
        return compute_weight_volume(
            labels, str(out), config, block_shape=(1, 12, 12), client=client
        )

    first, again = run(), run()
    assert (first.blocks, first.skipped, again.blocks, again.skipped) == (16, 0, 0, 16)
    expected = zarr.open_array(out / "weights")[:]
    # A run stopped midway: two blocks neither written nor marked, the output not complete.
    for index in ((1, 0, 1), (3, 1, 1)):
        (out / DONE / ("c." + ".".join(map(str, index)))).unlink()
        (out / "weights" / "c" / Path(*map(str, index))).unlink()
    update_run_info(str(out), {"complete": False})
    with pytest.raises(InputError, match="is incomplete"):  # e.g. train --weights OUT
        open_volume(str(out))
    resumed = run()
    assert (resumed.blocks, resumed.skipped, resumed.voxels) == (2, 14, 2 * 144)
    np.testing.assert_array_equal(zarr.open_array(out / "weights")[:], expected)
    assert open_volume(str(out)).shape == (4, 24, 24)  # complete: the group opens as its weights
    with pytest.raises(OutputExistsError, match=r"holds another run \(weights.w0: 10.0, now 5.0\)"):
        run(replace(config, w0=5.0))


def bad_inputs(tmp_path: Path) -> dict[str, tuple[str, dict[str, Any]]]:
    """Name -> (labels URL, extra arguments) for each bad input."""
    fine = blob_labels((4, 12, 12), 4)
    (tmp_path / "exists.zarr").mkdir()
    return {
        "missing": (str(tmp_path / "missing.zarr"), {}),
        "rank": (write_zarr(tmp_path / "2d.zarr", fine[0]), {}),
        "float": (write_zarr(tmp_path / "f.zarr", fine.astype(np.float32)), {}),
        "channels": (write_zarr(tmp_path / "c.zarr", np.stack([fine, fine])), {}),
        "negative": (write_zarr(tmp_path / "n.zarr", fine.astype(np.int16) - 1), {}),
        "exists": (
            write_zarr(tmp_path / "ok.zarr", fine),
            {"out_url": str(tmp_path / "exists.zarr")},
        ),
        "chunks": (str(tmp_path / "ok.zarr"), {"block_shape": (4, 4)}),
        "binary": (
            write_zarr(tmp_path / "b.zarr", (fine > 0).astype(np.uint8)),
            {"config": WeightMapConfig(ndim=3)},
        ),
        "balance": (str(tmp_path / "ok.zarr"), {"balance_z_range": (3, 9)}),
    }


@pytest.mark.parametrize(
    ("case", "error", "message"),
    [
        pytest.param("missing", InputError, "does not exist", id="missing-labels"),
        pytest.param("rank", InputError, r"expected \(z, y, x\)", id="wrong-rank"),
        pytest.param("float", InputError, "integer labels", id="float-labels"),
        pytest.param("channels", InputError, "2 channel", id="channels"),
        pytest.param("negative", InputError, "negative values", id="negative-labels"),
        pytest.param("exists", OutputExistsError, "already exists", id="existing-output"),
        pytest.param("chunks", InputError, "block shape", id="block-rank"),
        pytest.param("binary", InputError, "label the cells first", id="binary-mask-across-chunks"),
        pytest.param(
            "balance", InputError, "class-balance z range 3:9", id="balance-range-outside"
        ),
    ],
)
def test_compute_weight_volume_rejects_bad_input_in_one_line(
    client: Client, tmp_path: Path, case: str, error: type[Exception], message: str
) -> None:
    labels_url, extra = bad_inputs(tmp_path)[case]
    arguments: dict[str, Any] = {
        "out_url": str(tmp_path / "w.zarr"),
        "config": WeightMapConfig(ndim=2),
        "block_shape": (2, 8, 8),
        **extra,
    }
    with pytest.raises(error, match=message) as raised:
        compute_weight_volume(
            labels_url,
            arguments.pop("out_url"),
            arguments.pop("config"),
            client=client,
            **arguments,
        )
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "w.zarr").exists()
