"""The border convention: mirrored without an edge repeat, as ``np.pad(mode="reflect")``."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from unet_volume.border import reflect


@pytest.mark.parametrize(
    ("begin", "end", "size", "expected"),
    [
        # Axis 0 1 2 3, period 6: -4 -> 2, -1 -> 1, 4 -> 2, 7 -> 1; the edge voxels 0 and 3
        # appear once per period, never twice in a row.
        pytest.param(-4, 8, 4, [2, 3, 2, 1, 0, 1, 2, 3, 2, 1, 0, 1], id="twice-around"),
        # Axis 0 1, period 2: the mirror of a 2-voxel axis alternates.
        pytest.param(-3, 5, 2, [1, 0, 1, 0, 1, 0, 1, 0], id="two-voxels"),
        # A single voxel has no mirror image but itself.
        pytest.param(-2, 2, 1, [0, 0, 0, 0], id="one-voxel"),
        # Inside the axis nothing moves.
        pytest.param(0, 5, 5, [0, 1, 2, 3, 4], id="inside"),
    ],
)
def test_border_reflect_by_hand(begin: int, end: int, size: int, expected: list[int]) -> None:
    assert reflect(np.arange(begin, end), size).tolist() == expected


@given(st.integers(1, 9), st.integers(0, 40), st.integers(0, 40))
def test_border_reflect_equals_numpy_reflect_padding(size: int, before: int, after: int) -> None:
    # np.pad mirrors repeatedly when the pad is wider than the axis: any distance folds back.
    expected = np.pad(np.arange(size), (before, after), mode="reflect")
    got = reflect(np.arange(-before, size + after), size)
    np.testing.assert_array_equal(got, expected)


def test_border_reflect_keeps_the_shape_and_dtype_of_its_coordinates() -> None:
    coordinates = np.array([[-1, 4], [7, 0]], dtype=np.intp)
    got = reflect(coordinates, 3)  # period 4: -1 -> 1, 4 -> 0, 7 -> 1
    np.testing.assert_array_equal(got, [[1, 0], [1, 0]])
    assert got.dtype == np.intp


def test_border_reflect_refuses_an_empty_axis() -> None:
    with pytest.raises(ValueError, match="axis of size 0"):
        reflect(np.arange(3), 0)
