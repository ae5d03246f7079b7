"""Metrics: hand-derived cases, agreement with scikit-image, one-line errors."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from skimage.metrics import adapted_rand_error as skimage_rand
from skimage.metrics import variation_of_information as skimage_voi

from unet_volume.errors import InputError
from unet_volume.evaluation.metrics import (
    PairCounts,
    adapted_rand_error,
    dice,
    instances_from_binary,
    iou,
    pixel_error,
    variation_of_information,
)
from unet_volume.testing import assert_one_line_error, label_pairs

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


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "match"),
    [
        pytest.param(
            lambda: adapted_rand_error(np.zeros(3), np.zeros(4)),
            r"\(3,\) but truth has \(4,\)",
            id="shape-mismatch-arrays",
        ),
        pytest.param(
            lambda: instances_from_binary(np.zeros((3, 3)), connectivity=3),
            "connectivity 3",
            id="connectivity-beyond-2d",
        ),
    ],
)
def test_metrics_bad_input_is_one_line_input_error(call: Callable[[], object], match: str) -> None:
    assert_one_line_error(call, InputError, match)
