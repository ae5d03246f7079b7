"""Metrics: hand-derived cases, agreement with scikit-image, and ``evaluate`` on real inputs."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from skimage.metrics import adapted_rand_error as skimage_rand
from skimage.metrics import variation_of_information as skimage_voi

from unet_volume.errors import InputError
from unet_volume.geometry import Box
from unet_volume.metrics import (
    PairCounts,
    adapted_rand_error,
    dice,
    evaluate,
    instances_from_binary,
    iou,
    pixel_error,
    variation_of_information,
)
from unet_volume.prediction_store import create_prediction
from unet_volume.storage import open_volume

ISBI_LABELS = Path(__file__).parents[1] / "data" / "isbi2012" / "train-labels.tif"


def label_pairs(max_label: int = 5) -> st.SearchStrategy[tuple[np.ndarray, np.ndarray]]:
    """Two label images of one random (z, y, x) shape, ids 0..max_label: (segmentation, truth)."""
    shapes = st.tuples(st.integers(1, 3), st.integers(1, 9), st.integers(1, 9))
    return shapes.flatmap(
        lambda shape: st.tuples(
            arrays(np.int64, shape, elements=st.integers(0, max_label)),
            arrays(np.int64, shape, elements=st.integers(0, max_label)),
        )
    )


# --- hand-made cases ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seg", "gt", "expected"),
    [
        # Pairs are ordered pairs of distinct voxels: a segment of s voxels holds s^2 - s of them.
        pytest.param([1, 1, 2, 2], [1, 1, 2, 2], (0.0, 1.0, 1.0), id="identical"),
        pytest.param([7, 7, 3, 3], [1, 1, 2, 2], (0.0, 1.0, 1.0), id="ids-are-only-names"),
        # Truth 1111 split into 11|22: together in both 2+2 = 4, in truth 12, in seg 4.
        # precision 4/4, recall 4/12, error 1 - 2*4/(12+4) = 1/2.
        pytest.param([1, 1, 2, 2], [1, 1, 1, 1], (0.5, 1.0, 1 / 3), id="one-split"),
        # The mirror image: truth 11|22 merged into 1111: precision 4/12, recall 4/4.
        pytest.param([1, 1, 1, 1], [1, 1, 2, 2], (0.5, 1 / 3, 1.0), id="one-merge"),
        # Truth 0 is ignored: only the two voxels of truth cell 1 count, and they agree.
        pytest.param([5, 6, 1, 1], [0, 0, 1, 1], (0.0, 1.0, 1.0), id="truth-zero-ignored"),
        # Singleton cells hold no pairs: nothing can be wrong.
        pytest.param([1, 2, 3], [4, 5, 6], (0.0, 1.0, 1.0), id="no-pairs"),
    ],
)
def test_adapted_rand_error_hand_derived(
    seg: list[int], gt: list[int], expected: tuple[float, float, float]
) -> None:
    assert adapted_rand_error(np.array(seg), np.array(gt)) == expected


@pytest.mark.parametrize(
    ("seg", "gt", "expected"),
    [
        pytest.param([1, 1, 2, 2], [1, 1, 2, 2], (0.0, 0.0), id="identical"),
        # Split: H(seg|gt) = each truth voxel's cell splits 50/50 = 1 bit; H(gt|seg) = 0.
        pytest.param([1, 1, 2, 2], [1, 1, 1, 1], (1.0, 0.0), id="one-split"),
        pytest.param([1, 1, 1, 1], [1, 1, 2, 2], (0.0, 1.0), id="one-merge"),
        # Four truth cells in one segment: H(gt|seg) = log2(4) = 2 bits of merge.
        pytest.param([9, 9, 9, 9], [1, 2, 3, 4], (0.0, 2.0), id="four-merged"),
    ],
)
def test_variation_of_information_hand_derived(
    seg: list[int], gt: list[int], expected: tuple[float, float]
) -> None:
    assert variation_of_information(np.array(seg), np.array(gt)) == expected


def test_adapted_rand_error_background_conventions_on_a_thick_membrane() -> None:
    # One true cell 1111; the prediction calls its first two voxels membrane: 00|11.
    seg, gt = np.array([0, 0, 1, 1]), np.array([1, 1, 1, 1])
    # "segment" (scikit-image): 00 is one more segment, a plain split: 1/2 as in "one-split".
    assert adapted_rand_error(seg, gt) == (0.5, 1.0, 1 / 3)
    # "singletons" (ISBI script): 0|0|11 holds 2 pairs, all true; truth holds 12:
    # precision 2/2, recall 2/12, error 1 - 2*2/(12+2) = 1 - 4/14.
    assert adapted_rand_error(seg, gt, seg_background="singletons") == (1 - 4 / 14, 1.0, 2 / 12)
    # H(seg|gt) = (2 * log2(4/2) + 2 * log2(4/1)) / 4 = (2 + 4) / 4 bits; nothing merged.
    assert variation_of_information(seg, gt, seg_background="singletons") == (1.5, 0.0)


@pytest.mark.parametrize(
    ("pred", "true", "label", "expected_iou", "expected_dice"),
    [
        # P = {0, 1}, T = {0, 2}: |P & T| = 1, |P | T| = 3, Dice 2*1/(2+2).
        pytest.param([1, 1, 0, 0], [1, 0, 1, 0], 1, 1 / 3, 1 / 2, id="binary"),
        # Class 2: P = {2, 3}, T = {1, 2}: the same overlap.
        pytest.param([0, 1, 2, 2], [0, 2, 2, 1], 2, 1 / 3, 1 / 2, id="multi-class"),
        pytest.param([1, 0, 1, 1], [1, 0, 1, 1], 1, 1.0, 1.0, id="identical"),
        pytest.param([0, 0], [0, 0], 1, 1.0, 1.0, id="empty-union-is-perfect"),
        pytest.param([1, 1], [0, 0], 1, 0.0, 0.0, id="disjoint"),
    ],
)
def test_iou_and_dice_hand_derived(
    pred: list[int], true: list[int], label: int, expected_iou: float, expected_dice: float
) -> None:
    assert iou(np.array(pred), np.array(true), label) == expected_iou
    assert dice(np.array(pred), np.array(true), label) == expected_dice


def test_pixel_error_counts_binary_disagreement_with_any_nonzero_as_foreground() -> None:
    # 0/255 truth against a 0/1 prediction: voxels 1 and 3 disagree, 2 of 8.
    assert (
        pixel_error(np.array([0, 1, 0, 1, 1, 0, 0, 0]), np.array([0, 0, 0, 255, 255, 255, 0, 0]))
        == 2 / 8
    )


@pytest.mark.parametrize(
    ("mask", "kwargs", "expected"),
    [
        pytest.param([[1, 0], [0, 1]], {}, [[1, 0], [0, 2]], id="diagonal-apart-4-connected"),
        pytest.param(
            [[1, 0], [0, 1]],
            {"connectivity": 2},
            [[1, 0], [0, 1]],
            id="diagonal-joined-8-connected",
        ),
        pytest.param([[255, 0, 255]], {}, [[1, 0, 2]], id="any-nonzero-is-foreground"),
        # The same blob in two slices: two instances per slice, ids unique across the volume ...
        pytest.param([[[1, 1]], [[1, 1]]], {}, [[[1, 1]], [[2, 2]]], id="per-slice-ids-unique"),
        # ... or one 3D instance.
        pytest.param([[[1, 1]], [[1, 1]]], {"per_slice": False}, [[[1, 1]], [[1, 1]]], id="3d"),
    ],
)
def test_instances_from_binary_connected_components(
    mask: list[object], kwargs: dict[str, object], expected: list[object]
) -> None:
    got = instances_from_binary(np.array(mask), **kwargs)  # type: ignore[arg-type]
    np.testing.assert_array_equal(got, np.array(expected))
    assert got.dtype == np.int64


# --- agreement with scikit-image ---------------------------------------------------------------


@given(label_pairs())
def test_adapted_rand_error_equals_scikit_image(pair: tuple[np.ndarray, np.ndarray]) -> None:
    seg, gt = pair
    counts = PairCounts.of(seg, gt)
    assume(counts.true > 0 and counts.pred > 0)  # scikit-image divides 0 by 0 otherwise
    error, precision, recall = adapted_rand_error(seg, gt)
    sk_error, sk_first, sk_second = skimage_rand(gt, seg)
    # scikit-image's code returns (error, pairs/true pairs, pairs/predicted pairs), the reverse of
    # its docstring (scikit-image issue #6485); we return precision = pairs / predicted pairs.
    np.testing.assert_allclose(
        [error, precision, recall], [sk_error, sk_second, sk_first], rtol=0, atol=1e-12
    )


@given(label_pairs(), st.booleans())
def test_variation_of_information_equals_scikit_image(
    pair: tuple[np.ndarray, np.ndarray], ignore: bool
) -> None:
    seg, gt = pair
    assume(not ignore or np.any(gt != 0))  # scikit-image divides by the voxels counted
    got = variation_of_information(seg, gt, ignore_gt_zero=ignore)
    expected = skimage_voi(gt, seg, ignore_labels=(0,) if ignore else ())
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


@given(label_pairs(max_label=3))
def test_singletons_background_equals_scikit_image_on_relabelled_background(
    pair: tuple[np.ndarray, np.ndarray],
) -> None:
    # "singletons" is defined as: every predicted-0 voxel gets an id of its own.
    seg, gt = pair
    relabelled = seg.copy()
    background = seg == 0
    relabelled[background] = seg.max() + 1 + np.arange(np.count_nonzero(background))
    assert adapted_rand_error(seg, gt, seg_background="singletons") == adapted_rand_error(
        relabelled, gt
    )
    counts = PairCounts.of(relabelled, gt)
    assume(counts.true > 0 and counts.pred > 0)
    np.testing.assert_allclose(
        adapted_rand_error(seg, gt, seg_background="singletons")[0],
        skimage_rand(gt, relabelled)[0],
        rtol=0,
        atol=1e-12,
    )
    np.testing.assert_allclose(
        np.array(variation_of_information(seg, gt, seg_background="singletons")),
        skimage_voi(gt, relabelled, ignore_labels=(0,)),
        rtol=0,
        atol=1e-12,
    )


# --- evaluate: per slice and whole volume ------------------------------------------------------


def test_evaluate_hand_derived_missed_membrane() -> None:
    # Truth: two cells of 4 x 2 voxels either side of a membrane column; the prediction misses the
    # membrane, so it is one cell of 20 voxels.
    truth = np.full((1, 4, 5), 255, dtype=np.uint8)
    truth[:, :, 2] = 0
    report = evaluate(np.ones((1, 4, 5), dtype=np.uint8), truth)
    scores = report.volume
    assert scores.pixel_error == 4 / 20  # the 4 membrane voxels
    # 16 truth-foreground voxels: pairs in truth 2 * (64 - 8) = 112, in the prediction 256 - 16 = 240,
    # in both 112: precision 112/240 = 7/15, recall 1, error 1 - 2*112/352 = 1 - 7/11.
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
        block_shape=(1, 20, 24),
        output_dtype="float32",
        attrs={},
    )
    for z in range(3):  # one block per slice, as predict writes them
        one_hot = np.stack([1 - predicted[z : z + 1], predicted[z : z + 1]]).astype(np.float64)
        store.write(Box((z, 0, 0), (z + 1, 20, 24)), one_hot)
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


# --- bad input ---------------------------------------------------------------------------------

BAD_BACKGROUND: Any = "zero"  # not a SegBackground: the type checker would refuse it


@pytest.mark.parametrize(
    ("call", "match"),
    [
        pytest.param(
            lambda: evaluate(np.zeros((2, 4, 4)), np.zeros((2, 4, 5))),
            r"prediction array has shape \(2, 4, 4\) but labels array have \(2, 4, 5\)",
            id="shape-mismatch",
        ),
        pytest.param(
            lambda: adapted_rand_error(np.zeros(3), np.zeros(4)),
            r"\(3,\) but truth has \(4,\)",
            id="shape-mismatch-arrays",
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
        pytest.param(
            lambda: instances_from_binary(np.zeros((3, 3)), connectivity=3),
            "connectivity 3",
            id="connectivity-beyond-2d",
        ),
    ],
)
def test_metrics_bad_input_is_one_line_input_error(call: Callable[[], object], match: str) -> None:
    with pytest.raises(InputError, match=match) as info:
        call()
    assert "\n" not in str(info.value)
