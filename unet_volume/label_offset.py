"""Labels registered to the image: one sub-pixel offset that training and prediction share.

Annotations need not sit on the image's own boundaries. The ISBI 2012 labels lie 0.6 px above
and 0.2 px left of the membranes in the image, on every slice (``benchmarks/label_offset.py``
measures it from the image alone and from a model's errors). A net trained with flips and turns
sees that offset in every direction and learns its average, 0, so each edge of every label is
off by a fraction of a pixel: on ISBI most of the pixel error sits there.

The *offset* is where the image's boundaries sit against the labels', in voxels along the
trailing spatial axes (``(y, x)``, or ``(z, y, x)``). Training samples the image that far from
each target voxel's source point (:class:`~unet_volume.training.augment.AugmentConfig`
``image_offset``),
so in every flip and turn the targets lie on the image's boundaries; the checkpoint records it;
prediction reads the image moved by the same offset (:func:`moved`), so the net's boundaries
land where the labels put them.

Prediction moves the image by linear interpolation: two taps per axis, a fixed function of the
mirrored volume, so blocks stitch exactly. A read grows by :data:`REACH` voxels per side on
the moved axes; an offset is at most one voxel per axis.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from unet_volume.errors import InputError

Offset3 = tuple[float, float, float]
REACH = 1
"""Voxels read beyond a box per side, on each moved axis: enough for offsets up to 1."""


def check_offset(offset: object, name: str = "label offset") -> tuple[float, ...]:
    """The offset as floats, or an InputError: a sequence of finite numbers in [-1, 1]."""
    try:
        values = tuple(float(v) for v in offset)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        values = None
    if values is None or any(not math.isfinite(v) or abs(v) > REACH for v in values):
        raise InputError(
            f"{name} {offset!r} must be numbers of voxels in [-1, 1] per axis, e.g. (0.6, 0.2) "
            "for (y, x); benchmarks/label_offset.py measures it"
        )
    return values


def spatial_offset(offset: Sequence[float], rank: int = 3) -> tuple[float, ...]:
    """An offset of the trailing axes, padded with zeros in front to ``rank`` axes."""
    values = check_offset(offset)
    if len(values) > rank:
        raise InputError(
            f"label offset {tuple(offset)} has more axes than the {rank} it moves; pass {rank}"
        )
    return (0.0,) * (rank - len(values)) + values


def offset_reach(offset: Sequence[float]) -> tuple[int, ...]:
    """Voxels to read beyond a box per side on each axis, to move it by ``offset``."""
    return tuple(REACH if v else 0 for v in offset)


def moved(data: np.ndarray, offset: Sequence[float]) -> np.ndarray:
    """``data`` at every voxel p + ``offset``, linearly interpolated; trailing axes move.

    ``data`` carries :func:`offset_reach` extra voxels per side on the moved axes, which the result
    loses. Each output voxel is ``(1 - f) a + f b`` of the same two voxels, in float32, wherever
    the box lies: a block's values are the whole volume's.
    """
    out = np.asarray(data, dtype=np.float32)
    first = out.ndim - len(offset)
    for axis, value in zip(range(first, out.ndim), offset):
        if not value:
            continue
        whole = math.floor(value)
        fraction = np.float32(value - whole)
        n = out.shape[axis] - 2 * REACH
        low = out.take(range(REACH + whole, REACH + whole + n), axis=axis)
        if fraction:
            high = out.take(range(REACH + whole + 1, REACH + whole + 1 + n), axis=axis)
            low = (np.float32(1) - fraction) * low + fraction * high
        out = low
    return out
