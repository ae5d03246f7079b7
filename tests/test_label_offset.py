"""Registration specifications: a volume read moved by a label offset is one function of the
stored volume, whatever box reads it, so blocks stitch exactly; training and prediction agree.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from distributed import Client
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from unet_volume.errors import InputError
from unet_volume.geometry import Box
from unet_volume.io.volumes import open_volume
from unet_volume.label_offset import check_offset, moved
from unet_volume.models.checkpoint import TrainedInput, read_checkpoint
from unet_volume.models.config import UNetConfig
from unet_volume.output.prediction import open_prediction
from unet_volume.prediction.run import predict_volume
from unet_volume.testing import boxes, write_zarr
from unet_volume.training.augment import AugmentConfig, augment
from unet_volume.training.loop import TrainConfig, train

OFFSETS = st.tuples(*(st.sampled_from([0.0, 0.25, -0.5, 0.75, 1.0, -1.0]) for _ in range(3)))


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> str:
    data = np.random.default_rng(0).integers(0, 256, size=(5, 23, 29), dtype=np.uint8)
    return write_zarr(tmp_path_factory.mktemp("registration") / "v.zarr", data)


@settings(max_examples=60, deadline=None)
@given(boxes(ndim=3, low=-6, high=30), OFFSETS)
def test_a_moved_volume_reads_every_box_as_the_whole_volume_holds_it(
    stored: str, box: Box, offset: tuple[float, float, float]
) -> None:
    # The exactness blocks rely on: any box read moved equals that box of one whole read moved.
    volume = replace(open_volume(stored), offset=offset)
    frame = Box((-8, -8, -8), (34, 34, 34))
    whole = volume.read(frame)
    np.testing.assert_array_equal(
        volume.read(box), whole[(slice(None), *box.to_slices(frame.begin))]
    )


def test_moved_is_linear_interpolation_at_the_offset_points() -> None:
    # Dyadic offsets of an integer ramp are exact: the value at p + offset is the ramp there.
    z, y, x = np.indices((3, 8, 9), dtype=np.float32)
    ramp = (100 * z + 10 * y + x)[None]
    got = moved(ramp, (0.0, 0.5, -0.25))  # one voxel of margin lost per side on y and x
    np.testing.assert_array_equal(got, ramp[:, :, 1:-1, 1:-1] + np.float32(10 * 0.5 - 0.25))
    data = np.random.default_rng(1).random((1, 4, 12, 12)).astype(np.float32)
    reference = ndimage.shift(data, (0, 0, -0.6, -0.2), order=1, mode="mirror")
    np.testing.assert_allclose(moved(data, (0.0, 0.6, 0.2)), reference[..., 1:-1, 1:-1], atol=1e-6)


def test_a_volume_without_offset_reads_as_stored(stored: str) -> None:
    volume = open_volume(stored)
    assert volume.offset == (0.0, 0.0, 0.0)
    assert volume.read(Box((0, 0, 0), (2, 3, 4))).dtype == np.uint8


@pytest.mark.parametrize("offset", [(0.0, 0.0, 0.0), (0.0, 0.6, 0.2)], ids=str)
def test_read_itemsize_is_what_a_read_returns_so_block_memory_counts_it(
    stored: str, offset: tuple[float, float, float]
) -> None:
    # A moved read interpolates to float32: 4 bytes a voxel held where 1 is stored.
    volume = replace(open_volume(stored), offset=offset)
    assert volume.read(Box((0, 0, 0), (2, 3, 4))).dtype.itemsize == volume.read_itemsize


@pytest.mark.parametrize("offset", [(1.5, 0.0), (float("nan"), 0.0), "0.6", (0.6, None)], ids=str)
def test_check_offset_refuses_what_is_not_at_most_one_voxel_per_axis(offset: object) -> None:
    with pytest.raises(InputError, match=r"in \[-1, 1\] per axis") as error:
        check_offset(offset)
    assert "\n" not in str(error.value)


def test_model_offset_is_the_override_else_the_training_record_else_none() -> None:
    recorded = TrainedInput(0.0, 1.0, (0.6, 0.2))
    assert recorded.read_offset() == (0.0, 0.6, 0.2)
    assert recorded.read_offset((0.0, 0.0)) == (0.0, 0.0, 0.0)
    assert TrainedInput().read_offset() == (0.0, 0.0, 0.0)
    # Checkpoints written before kept it in the recipe, where the record still finds it.
    legacy: dict[str, Any] = {
        "normalization": {"mean": 0, "std": 1},
        "training": {"config": {"label_offset": None}},
    }
    assert TrainedInput.of(legacy) == TrainedInput()
    legacy["training"]["config"]["label_offset"] = [0.6, 0.2]
    assert TrainedInput.of(legacy) == recorded
    assert TrainedInput.of(recorded.to_metadata()) == recorded


@pytest.mark.parametrize(
    "config, exact",
    [
        (AugmentConfig.plain(), True),
        (AugmentConfig.none(), True),
        (AugmentConfig.upright(), False),
        (AugmentConfig(), False),
    ],
    ids=["plain", "none", "upright", "paper"],
)
def test_augment_with_an_image_offset_puts_targets_on_the_images_boundaries(
    config: AugmentConfig, exact: bool
) -> None:
    # Labels drawn `offset` away from the image's edges (target = the image's value at s + d):
    # with image_offset d, image and target agree in every draw (to the nearest voxel that a
    # target is gathered from, when the transform interpolates); without, they sit 3.2 apart.
    offset = (0.5, 0.25)
    size, out, apron = 60, 20, 100
    y, x = np.indices((size + 2 * apron,) * 2, dtype=np.float32)
    image = (3 * y + 7 * x)[None, None]
    centre = slice((size - out) // 2, (size + out) // 2 + 2 * apron)  # output tile + apron
    target = (3 * (y + offset[0]) + 7 * (x + offset[1]))[None, centre, centre]
    inner = slice((size - out) // 2, (size + out) // 2)
    for registered in (True, False):
        recipe = replace(
            config, brightness=0, contrast=0, gamma=0, image_offset=offset if registered else ()
        )  # gray values off: the image values are the test
        gaps = []
        for seed in range(8):
            tile, targets = augment(
                image, {"t": target}, recipe, np.random.default_rng(seed), ndim=2,
                apron=(0, apron, apron),
            )  # fmt: skip
            gaps.append(tile[0, 0, inner, inner] - targets["t"][0])
        gap = np.stack(gaps)
        if registered:
            assert abs(gap.mean()) < 0.3  # the nearest voxel's rounding averages out
            assert np.abs(gap).max() < 1e-3 or not exact
        else:
            assert np.abs(gap).mean() > 2.5


def test_a_model_trained_registered_predicts_the_image_moved_by_its_offset(
    tmp_path: Path, client: Client, training_threads: None
) -> None:
    # The offset travels in the checkpoint: predicting with it is predicting the image moved
    # (blocks of 16, so blocks meet inside the volume), and 0,0 reads the image as it is. Only
    # beyond the halo (20) of the border: moving the mirrored volume is not mirroring the moved.
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, size=(3, 64, 68), dtype=np.uint8)
    labels = (255 * (rng.random((3, 64, 68)) > 0.5)).astype(np.uint8)
    paths = [write_zarr(tmp_path / f"{n}.zarr", a) for n, a in (("i", image), ("l", labels))]
    config = TrainConfig(
        model=UNetConfig(depth=2, base_channels=4),
        tile_output=(1, 12, 12),
        steps=2,
        minutes=None,
        weight_map=False,
        label_offset=(0.5, 0.25),
        validation_z_range=(2, 3),
        validate_every=1,
    )
    model = train(*paths, tmp_path / "m.pt", config).checkpoint
    assert read_checkpoint(model).metadata["training"]["config"]["label_offset"] == [0.5, 0.25]
    frame = Box((0, -1, -1), (3, 65, 69))
    registered = moved(open_volume(paths[0]).read(frame), (0.0, 0.5, 0.25))[0]
    premoved = write_zarr(tmp_path / "moved.zarr", registered)
    options = {"block_shape": (1, 16, 16), "output_dtype": "float32", "client": client}
    outputs = {
        "recorded": predict_volume(model, paths[0], tmp_path / "a.zarr", **options),
        "premoved": predict_volume(
            model, premoved, tmp_path / "b.zarr", label_offset=(0.0, 0.0), **options
        ),
        "as is": predict_volume(
            model, paths[0], tmp_path / "c.zarr", label_offset=(0.0, 0.0), **options
        ),
    }
    inner = (slice(None), slice(None), slice(22, -22), slice(22, -22))
    p = {k: open_prediction(r.output_url).probabilities.values[inner] for k, r in outputs.items()}
    np.testing.assert_array_equal(p["recorded"], p["premoved"])
    assert not np.array_equal(p["recorded"], p["as is"])
    attrs = zarr.open_group(outputs["recorded"].output_url).attrs["unet_volume"]
    assert attrs["geometry"]["label_offset"] == [0.0, 0.5, 0.25]
