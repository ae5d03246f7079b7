"""The border convention: how voxels outside the volume are filled.

Voxels outside the volume are **mirrored without repeating the edge voxel**, as in the U-Net
authors' release: numpy's ``np.pad(mode="reflect")``, scipy's ``mode="mirror"``. On an axis of 4
voxels::

    coordinate  -3 -2 -1 | 0  1  2  3 | 4  5  6  7
    voxel        3  2  1 | 0  1  2  3 | 2  1  0  1

Dask's ``boundary="reflect"`` and numpy's ``"symmetric"`` repeat the edge voxel instead; we do
not. Reading a box (:func:`unet_volume.io.volumes.read_box`) and gathering augmented targets
(:mod:`unet_volume.training.augment`) both fold coordinates with :func:`reflect`, so the border is
one
rule written once. This module needs only numpy: every layer may import it.
"""

from __future__ import annotations

import numpy as np


def reflect(coordinates: np.ndarray, size: int) -> np.ndarray:
    """Integer ``coordinates`` on an axis of ``size`` voxels, mirrored into ``[0, size)``.

    Mirroring is periodic with period ``2 * (size - 1)``, so coordinates any distance outside
    fold back; a size-1 axis repeats its one voxel. Returns indices of the input's dtype.

    >>> reflect(np.arange(-3, 8), 4).tolist()
    [3, 2, 1, 0, 1, 2, 3, 2, 1, 0, 1]
    """
    if size < 1:
        raise ValueError(f"cannot mirror into an axis of size {size}; the axis needs a voxel")
    period = max(2 * (size - 1), 1)
    folded = np.mod(coordinates, period)
    mirrored: np.ndarray = np.where(folded < size, folded, period - folded)
    return mirrored


def mirrored_range(begin: int, end: int, size: int) -> tuple[int, int]:
    """The stored voxels ``[lo, hi)`` that a mirrored read of ``[begin, end)`` touches.

    What a reader fetches for a read box that may reach outside the volume: the box itself
    where it lies inside, and the voxels it mirrors where it reaches out.

    >>> mirrored_range(-2, 3, 10), mirrored_range(8, 12, 10), mirrored_range(-1, 1, 1)
    ((0, 3), (7, 10), (0, 1))
    """
    if 0 <= begin <= end <= size or end <= begin:
        return begin, max(begin, end)
    span = reflect(np.arange(begin, end), size)
    return int(span.min()), int(span.max()) + 1
