"""Preview PNGs: a few slices of input + segmentation and foreground probability, read sparingly.

The predictions here are real Zarr outputs written by the prediction store (no model, no torch):
the "probabilities" are the input's brightness, so the preview has something to show.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zarr
from matplotlib import image as mpimg

from unet_volume.errors import InputError
from unet_volume.grid import OutputLayout
from unet_volume.io.volumes import open_volume
from unet_volume.output.lifecycle import finish_output
from unet_volume.output.prediction import create_prediction
from unet_volume.output.preview import choose_slices, write_preview
from unet_volume.testing import blob_volume

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _predicted(tmp_path: Path, data: np.ndarray, chunks: tuple[int, ...]) -> tuple[str, str]:
    """Write ``data`` as the input and a 2-class uint8 prediction of it; return both URLs."""
    image_url = str(tmp_path / "image.zarr")
    zarr.create_array(image_url, shape=data.shape, dtype=data.dtype, chunks=chunks)[:] = data
    volume = open_volume(image_url)
    prediction_url = str(tmp_path / "prediction.zarr")
    store = create_prediction(
        prediction_url,
        volume=volume,
        num_classes=2,
        layout=OutputLayout.unsharded(volume.shape, chunks[-3:]),
        output_dtype="uint8",
        attrs={},
    )
    foreground = (data if data.ndim == 3 else data[0]) / 255.0
    store.write(volume.box, np.stack([1.0 - foreground, foreground]))
    finish_output(prediction_url, {})
    return image_url, prediction_url


def _corrupt(array_url: str, keep: Callable[[tuple[int, ...]], bool]) -> None:
    """Overwrite every chunk file whose index tuple ``keep`` rejects: reading one then fails."""
    for chunk in (Path(array_url) / "c").rglob("*"):
        index = tuple(int(p) for p in chunk.relative_to(Path(array_url) / "c").parts)
        if chunk.is_file() and not keep(index):
            chunk.write_bytes(b"garbage")


def test_preview_writes_a_png_with_one_row_per_slice(tmp_path: Path) -> None:
    image_url, prediction_url = _predicted(tmp_path, blob_volume((7, 40, 40)), chunks=(2, 16, 16))
    three = write_preview(image_url, prediction_url, tmp_path / "three.png")  # z = 0, 3, 6
    one = write_preview(image_url, prediction_url, tmp_path / "one.png", slices=[3])
    assert three.read_bytes()[:8] == PNG_SIGNATURE
    height3, width3, _ = mpimg.imread(three).shape
    height1, width1, _ = mpimg.imread(one).shape
    assert width3 == width1
    assert abs(height3 - 3 * height1) <= 1  # one row per slice (pixel rounding)
    # a row is two square panels side by side plus a strip for their titles
    assert width1 / 2 < height1 < 0.6 * width1
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["one.png", "three.png"]


def test_preview_reads_only_the_chosen_slices_subsampled_to_max_side(tmp_path: Path) -> None:
    # A wide slice: 300 columns with max_side 30 -> stride ceil(300 / 30) = 10, so the preview
    # needs columns 0, 10, ..., 290 of z = 1 only. One column per chunk; every other chunk of the
    # input and of the prediction is garbage, so reading any more voxels would fail.
    image_url, prediction_url = _predicted(tmp_path, blob_volume((3, 10, 300)), chunks=(1, 10, 1))
    _corrupt(image_url, lambda index: index[0] == 1 and index[2] % 10 == 0)
    _corrupt(prediction_url + "/segmentation", lambda index: index[0] == 1 and index[2] % 10 == 0)
    _corrupt(prediction_url + "/probabilities", lambda index: index[1] == 1 and index[3] % 10 == 0)
    out = write_preview(image_url, prediction_url, tmp_path / "wide.png", slices=[1], max_side=30)
    height, width, _ = mpimg.imread(out).shape
    assert height < width / 4  # the panels keep the slice's 10:300 aspect


def test_preview_shows_channel_0_of_a_multichannel_input(tmp_path: Path) -> None:
    image_url, prediction_url = _predicted(
        tmp_path, blob_volume((3, 20, 20), channels=2), chunks=(1, 1, 20, 20)
    )
    _corrupt(image_url, lambda index: index[0] == 0)  # channel 1 is unreadable: it must not be read
    out = write_preview(image_url, prediction_url, tmp_path / "preview.png")
    assert out.read_bytes()[:8] == PNG_SIGNATURE


@pytest.mark.parametrize(
    ("case", "message"),
    [
        pytest.param(
            {"slices": [7]},
            r"slices \[7\] are not in the volume \(depth 7\); pass z indices from 0 to 6",
            id="slice-past-the-end",
        ),
        pytest.param(
            {"slices": [0, -1]}, r"slices \[-1\] are not in the volume", id="negative-slice"
        ),
        pytest.param({"slices": []}, r"slices \[\] are not in the volume", id="no-slices"),
        pytest.param(
            {"prediction": "missing.zarr"},
            r"missing.zarr does not exist; run `unet-volume predict`",
            id="missing-prediction",
        ),
        pytest.param(
            {"image": "missing.zarr"},
            r"missing.zarr does not exist; pass a Zarr array",
            id="missing-input",
        ),
        pytest.param({"max_side": 0}, r"max_side 0 must be at least 1", id="max-side-zero"),
    ],
)
def test_preview_bad_input_is_one_clear_line_and_leaves_no_file(
    tmp_path: Path, case: dict[str, object], message: str
) -> None:
    image_url, prediction_url = _predicted(tmp_path, blob_volume((7, 16, 16)), chunks=(7, 16, 16))
    image = str(tmp_path / str(case.pop("image"))) if "image" in case else image_url
    prediction = (
        str(tmp_path / str(case.pop("prediction"))) if "prediction" in case else prediction_url
    )
    out = tmp_path / "previews" / "preview.png"
    with pytest.raises(InputError, match=message) as error:
        write_preview(image, prediction, out, **case)  # type: ignore[arg-type]
    assert "\n" not in str(error.value)
    assert not (tmp_path / "previews").exists()


def test_preview_refuses_a_prediction_of_another_input(tmp_path: Path) -> None:
    _, prediction_url = _predicted(tmp_path, blob_volume((3, 16, 16)), chunks=(3, 16, 16))
    other_url = str(tmp_path / "other.zarr")
    zarr.create_array(other_url, shape=(3, 16, 17), dtype="uint8")[:] = 0
    with pytest.raises(InputError, match=r"pass the input the prediction was made from"):
        write_preview(other_url, prediction_url, tmp_path / "preview.png")
    assert not (tmp_path / "preview.png").exists()


@pytest.mark.parametrize(
    ("depth", "count", "expected"),
    [
        pytest.param(25, 3, [0, 12, 24], id="first-middle-last"),
        pytest.param(4, 3, [0, 2, 3], id="middle-rounds-half-up"),  # 1.5 -> 2
        pytest.param(1, 3, [0], id="depth-1"),
        pytest.param(2, 3, [0, 1], id="depth-2-no-duplicates"),  # 0, 0.5 -> 1, 1
        pytest.param(5, 10, [0, 1, 2, 3, 4], id="count-over-depth-is-every-slice"),
        pytest.param(9, 1, [4], id="one-slice-is-the-middle"),
    ],
)
def test_choose_slices_spreads_evenly_without_duplicates(
    depth: int, count: int, expected: list[int]
) -> None:
    assert choose_slices(depth, count) == expected


def test_choose_slices_needs_a_positive_depth_and_count() -> None:
    with pytest.raises(InputError, match="cannot choose 3 slices of depth 0"):
        choose_slices(0)
    with pytest.raises(InputError, match="cannot choose 0 slices of depth 5"):
        choose_slices(5, count=0)
