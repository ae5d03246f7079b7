"""Box algebra: the half-open voxel boxes every module speaks."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given

from unet_volume.geometry import Box
from unet_volume.testing import boxes


def test_box_rejects_end_before_begin_and_rank_mismatch() -> None:
    with pytest.raises(ValueError, match="lies before"):
        Box((0, 5), (1, 4))
    with pytest.raises(ValueError, match="different ranks"):
        Box((0,), (1, 1))


def test_box_prints_like_slices() -> None:
    assert str(Box((0, 0), (572, 572))) == "[0:572, 0:572]"


@given(boxes(), boxes())
def test_box_intersect_is_commutative_and_contained(a: Box, b: Box) -> None:
    ab, ba = a.intersect(b), b.intersect(a)
    assert ab.shape == ba.shape
    if not ab.is_empty():
        assert ab == ba and a.contains(ab) and b.contains(ab)


@given(boxes(), boxes(), boxes())
def test_box_intersect_is_associative(a: Box, b: Box, c: Box) -> None:
    left, right = a.intersect(b).intersect(c), a.intersect(b.intersect(c))
    assert left.size == right.size == 0 or left == right


@given(boxes())
def test_box_intersect_is_idempotent(a: Box) -> None:
    assert a.intersect(a) == a


@given(boxes(), boxes())
def test_box_hull_contains_both(a: Box, b: Box) -> None:
    h = a.hull(b)
    assert h.contains(a) and h.contains(b)


@given(boxes(), boxes(ndim=3, low=0, high=9))
def test_box_grow_then_shrink_is_identity(a: Box, halo: Box) -> None:
    assert a.grow(halo.begin, halo.end).shrink(halo.begin, halo.end) == a


@given(boxes(low=0, high=12))
def test_box_to_slices_selects_the_box_like_numpy(a: Box) -> None:
    data = np.arange(13**3).reshape(13, 13, 13)
    selected = data[a.to_slices()]
    assert selected.shape == a.shape
    if not a.is_empty():
        assert selected.flat[0] == data[a.begin]


@given(boxes(low=0, high=30))
def test_box_grid_tiles_the_box_exactly(a: Box) -> None:
    covered = np.zeros(a.end, dtype=int)
    for _, cell in a.grid((4, 5, 7)):
        covered[cell.to_slices()] += 1
    assert (covered[a.to_slices()] == 1).all() and covered.sum() == a.size


@given(boxes(low=-40, high=40))
def test_box_snap_grow_contains_and_snap_shrink_is_contained(a: Box) -> None:
    grown, shrunk = a.snap((4, 8, 16)), a.snap((4, 8, 16), mode="shrink")
    assert grown.is_aligned((4, 8, 16)) and grown.contains(a)
    assert shrunk.is_aligned((4, 8, 16)) and a.contains(shrunk)


@given(boxes(low=-30, high=60), boxes(low=0, high=40))
def test_box_outside_plus_inside_is_the_whole_box(a: Box, volume: Box) -> None:
    # A read box = its part inside the volume + what must be mirrored below and above it.
    inside = a.intersect(volume)
    low, high = a.outside(volume)
    if inside.is_empty():  # wholly beyond the volume on some axis: it reaches out that far
        assert any(lo + hi >= n for lo, hi, n in zip(low, high, a.shape))
    else:
        assert inside.grow(low, high) == a
