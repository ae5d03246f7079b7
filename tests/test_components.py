"""Connected components block by block: the whole-volume ``scipy.ndimage.label``, exactly.

The specification: for any mask, block shape and connectivity, the blockwise labels equal
scipy's labels of the whole volume, ids included (objects numbered by their first voxel in C
order, as scipy does), so the comparison is exact equality.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from unet_volume.errors import InputError
from unet_volume.instances.components import label_blockwise, structure


@st.composite
def cases(draw: st.DrawFn) -> tuple[np.ndarray, tuple[int, int, int], int, bool]:
    shape = tuple(draw(st.integers(1, n)) for n in (5, 11, 11))
    density = draw(st.floats(0.2, 0.7))
    seed = draw(st.integers(0, 2**31 - 1))
    mask = np.random.default_rng(seed).random(shape) < density
    block = tuple(draw(st.integers(1, n)) for n in shape)
    return mask, block, draw(st.sampled_from([6, 26])), draw(st.booleans())


@settings(max_examples=300, deadline=None)
@given(cases())
def test_components_equal_scipy_on_the_whole_volume_for_any_block_shape(
    case: tuple[np.ndarray, tuple[int, int, int], int, bool],
) -> None:
    mask, block, connectivity, per_slice = case
    ours, count = label_blockwise(mask, block, connectivity, per_slice=per_slice)
    reference, expected = ndimage.label(mask, structure(connectivity, per_slice=per_slice))
    assert count == expected
    np.testing.assert_array_equal(ours, reference)


def test_components_join_a_diagonal_chain_across_block_corners() -> None:
    # One 26-connected object that crosses blocks only through corners: face merging alone
    # would cut it into pieces.
    mask = np.zeros((4, 4, 4), bool)
    for i in range(4):
        mask[i, i, i] = True
    ours, count = label_blockwise(mask, (1, 1, 1), 26)
    assert count == 1 and set(np.unique(ours)) == {0, 1}
    _, six = label_blockwise(mask, (1, 1, 1), 6)
    assert six == 4


def test_components_per_slice_never_join_slices() -> None:
    mask = np.ones((3, 4, 4), bool)
    ours, count = label_blockwise(mask, (2, 3, 3), 26, per_slice=True)
    assert count == 3
    assert [set(np.unique(ours[z])) for z in range(3)] == [{1}, {2}, {3}]


def test_components_refuse_an_unknown_connectivity() -> None:
    with pytest.raises(InputError, match="connectivity 8 is not 6 or 26"):
        structure(8, per_slice=True)
