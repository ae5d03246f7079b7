"""Evaluation: per-slice and whole-volume scores from the same counts, on real files."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from hypothesis import given

from unet_volume.errors import InputError
from unet_volume.evaluation.metrics import (
    adapted_rand_error,
    dice,
    instances_from_binary,
    iou,
    pixel_error,
    variation_of_information,
)
from unet_volume.evaluation.scores import evaluate
from unet_volume.geometry import Box
from unet_volume.grid import OutputLayout
from unet_volume.io.volumes import open_volume
from unet_volume.output.lifecycle import finish_output
from unet_volume.output.prediction import create_prediction
from unet_volume.testing import assert_one_line_error, label_pairs

ISBI_LABELS = Path(__file__).parents[1] / "data" / "isbi2012" / "train-labels.tif"
BAD_BACKGROUND: Any = "zero"  # not a SegBackground: the type checker would refuse it


def test_evaluate_hand_derived_missed_membrane() -> None:
    # Truth: two cells of 4 x 2 voxels either side of a membrane column; the prediction misses the
    # membrane, so it is one cell of 20 voxels.
    truth = np.full((1, 4, 5), 255, dtype=np.uint8)
    truth[:, :, 2] = 0
    report = evaluate(np.ones((1, 4, 5), dtype=np.uint8), truth)
    scores = report.volume
    assert scores.pixel_error == 4 / 20  # the 4 membrane voxels
    # 16 truth-foreground voxels: pairs in truth 2 * (64 - 8) = 112, in the prediction 256 - 16 =
    # 240, in both 112: precision 112/240 = 7/15, recall 1, error 1 - 2*112/352 = 1 - 7/11.
    assert (scores.rand_error, scores.rand_precision, scores.rand_recall) == (
        1 - 7 / 11,
        7 / 15,
        1.0,
    )
    # Each true cell is half of the predicted one: 1 bit of merge, no split.
    assert (scores.voi_split, scores.voi_merge) == (0.0, 1.0)
    assert (scores.iou, scores.dice) == (16 / 20, 32 / 36)
    assert report.slices[0].scores == scores  # one slice: the volume is that slice


@pytest.mark.parametrize(
    "per_slice", [pytest.param(True, id="2d-instances"), pytest.param(False, id="3d-instances")]
)
@given(pair=label_pairs(max_label=1))
def test_evaluate_volume_scores_come_from_the_same_counts_as_the_slices(
    per_slice: bool,
    pair: tuple[np.ndarray, np.ndarray],
) -> None:
    pred, true = pair
    report = evaluate(pred, true, per_slice=per_slice)
    seg = instances_from_binary(pred, per_slice=per_slice)
    gt = instances_from_binary(true, per_slice=per_slice)
    rand = adapted_rand_error(seg, gt, seg_background="singletons")
    volume = report.volume
    # Integer counts summed over slices equal the whole volume's: bit-identical.
    assert (volume.rand_error, volume.rand_precision, volume.rand_recall) == rand
    assert (volume.pixel_error, volume.iou, volume.dice) == (
        pixel_error(pred, true),
        iou(pred, true),
        dice(pred, true),
    )
    # The bits are float sums taken in another order: equal to rounding.
    voi = variation_of_information(seg, gt, seg_background="singletons")
    np.testing.assert_allclose([volume.voi_split, volume.voi_merge], voi, rtol=0, atol=1e-12)
    assert [row.z for row in report.slices] == list(range(pred.shape[0]))
    for row in report.slices:
        z = row.z
        assert (
            row.scores.rand_error
            == adapted_rand_error(seg[z], gt[z], seg_background="singletons")[0]
        )
        assert row.scores.pixel_error == pixel_error(pred[z], true[z])


def test_evaluate_isbi_labels_against_themselves_score_perfectly() -> None:
    report = evaluate(ISBI_LABELS, ISBI_LABELS)  # the TIFF stack as prediction and as labels
    assert len(report.slices) == 25
    for scores in [report.volume, *(row.scores for row in report.slices)]:
        assert (scores.pixel_error, scores.rand_error, scores.voi_split, scores.voi_merge) == (
            0.0,
            0.0,
            0.0,
            0.0,
        )
        assert (scores.rand_precision, scores.rand_recall, scores.iou, scores.dice) == (
            1.0,
            1.0,
            1.0,
            1.0,
        )


def test_evaluate_isbi_labels_shifted_by_three_pixels_score_plausibly() -> None:
    labels = tifffile.imread(ISBI_LABELS)
    shifted = np.roll(labels, 3, axis=2)
    report = evaluate(shifted, ISBI_LABELS, z_range=(20, 25))
    assert [row.z for row in report.slices] == [20, 21, 22, 23, 24]
    scores = report.volume
    # Pixel error is exactly the fraction of pixels the shift changes.
    assert scores.pixel_error == np.count_nonzero(shifted[20:] != labels[20:]) / labels[20:].size
    # Membranes ~0.2 of the area, cells ~ 40 px across: a 3 px shift costs ~0.12 of the pixels and
    # ~0.1 Rand error (measured 0.123 and 0.100 on slices 0-2), with both splits and merges.
    assert 0.05 < scores.pixel_error < 0.2
    assert 0.02 < scores.rand_error < 0.3
    assert scores.voi_split > 0 and scores.voi_merge > 0
    assert 0.7 < scores.iou < scores.dice < 1
    # Counting predicted membrane as one segment merges every cell it crosses: a larger error.
    segment = evaluate(shifted, ISBI_LABELS, z_range=(20, 25), seg_background="segment")
    assert segment.volume.rand_error > scores.rand_error


def test_evaluate_reads_a_prediction_group_and_tiff_labels(tmp_path: Path) -> None:
    # Truth: a 6-voxel grid of membranes; the prediction misses one membrane line (a merge) and
    # adds one (a split), written through the real prediction store.
    labels = np.full((3, 20, 24), 255, dtype=np.uint8)
    labels[:, ::6, :] = 0
    labels[:, :, ::6] = 0
    predicted = (labels != 0).astype(np.uint8)
    predicted[:, 6, :] = 1
    predicted[:, :, 9] = 0
    tiff_path = str(tmp_path / "labels.tif")
    tifffile.imwrite(tiff_path, labels, photometric="minisblack")  # 3 pages, not RGB
    volume = open_volume(tiff_path)
    store = create_prediction(
        str(tmp_path / "out.zarr"),
        volume=volume,
        num_classes=2,
        layout=OutputLayout.unsharded(volume.shape, (1, 20, 24)),
        output_dtype="float32",
        attrs={},
    )
    for z in range(3):  # one block per slice, as predict writes them
        one_hot = np.stack([1 - predicted[z : z + 1], predicted[z : z + 1]]).astype(np.float64)
        store.write(Box((z, 0, 0), (z + 1, 20, 24)), one_hot)
        store.mark_done((z, 0, 0))
    finish_output(store.url, {})  # an incomplete prediction is refused (missing blocks)
    got = evaluate(store.url, tiff_path)
    expected = evaluate(predicted, labels)
    assert (got.prediction, got.labels) == (store.url, tiff_path)
    assert got.volume == expected.volume and got.slices == expected.slices
    assert 0 < got.volume.rand_error < 1 and got.volume.voi_split > 0 and got.volume.voi_merge > 0


def test_evaluation_report_renders_as_json_and_a_table() -> None:
    truth = np.zeros((2, 4, 4), dtype=np.uint8)
    truth[:, 1:3, 1:3] = 1
    report = evaluate(truth, truth)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["z_range"] == [0, 2] and data["seg_background"] == "singletons"
    assert data["volume"]["rand_error"] == 0.0 and [row["z"] for row in data["slices"]] == [0, 1]
    lines = report.to_table().splitlines()
    assert len(lines) == 1 + 1 + 2 + 1  # title, column names, two slices, volume
    assert lines[1].split() == [
        "z",
        "pixel_error",
        "rand_error",
        "rand_precision",
        "rand_recall",
        "voi_split",
        "voi_merge",
        "iou",
        "dice",
    ]
    assert lines[-1].split()[0] == "volume"


@pytest.mark.parametrize(
    ("call", "match"),
    [
        pytest.param(
            lambda: evaluate(np.zeros((2, 4, 4)), np.zeros((2, 4, 5))),
            r"prediction array has shape \(2, 4, 4\) but labels array have \(2, 4, 5\)",
            id="shape-mismatch",
        ),
        pytest.param(
            lambda: evaluate(np.zeros((2, 4, 4)), "/nonexistent/labels.tif"),
            "labels /nonexistent/labels.tif does not exist",
            id="missing-labels",
        ),
        pytest.param(
            lambda: evaluate(np.zeros((2, 4, 4)), np.zeros((2, 4, 4)), z_range=(1, 3)),
            "z range 1:3 .* 2 slices",
            id="z-range-outside",
        ),
        pytest.param(
            lambda: evaluate(
                np.zeros((2, 4, 4)), np.zeros((2, 4, 4)), seg_background=BAD_BACKGROUND
            ),
            "seg_background 'zero'",
            id="unknown-background",
        ),
    ],
)
def test_evaluate_bad_input_is_one_line_input_error(call: Callable[[], object], match: str) -> None:
    assert_one_line_error(call, InputError, match)
