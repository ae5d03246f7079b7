"""Test helpers shared by the test suite and benchmarks: strategies, probes, references.

Kept in the package (as zarr-python does) so downstream code can test against
the same definitions. Imports hypothesis lazily: it is a test extra.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from unet_volume.geometry import Box
from unet_volume.storage import ArrayLike, read_box
from unet_volume.tiling import TileGeometry


class CropPredictor:
    """A placement probe: "predicts" its input's centre, cropped by the halo.

    Run over an ``arange`` volume, correct tiling must give the volume back
    exactly; a tile read or written one voxel off shows at once.
    """

    def __init__(self, geometry: TileGeometry) -> None:
        self.geometry = geometry

    def __call__(self, tile: np.ndarray) -> np.ndarray:
        inner = Box.from_shape(tile.shape[1:]).shrink(self.geometry.halo)
        return tile[(slice(None), *inner.to_slices())].astype(np.float64)


def predict_whole(
    predictor: Callable[[np.ndarray], np.ndarray], array: ArrayLike, ndim: int, depth: int
) -> np.ndarray:
    """The reference: one forward pass over the whole mirror-padded volume.

    The volume is padded by the margin on both sides (plus the few voxels that
    make its size valid on the high side), run once, and cropped back.
    """
    shape = tuple(array.shape[-3:])
    geometry = TileGeometry.for_unet(ndim, depth, min_output=shape)
    output_box = Box.from_shape(geometry.output_shape)
    result = predictor(read_box(array, geometry.input_box(output_box)))
    return result[(slice(None), *Box.from_shape(shape).to_slices())]


def blob_volume(
    shape: tuple[int, ...], *, seed: int = 0, channels: int | None = None
) -> np.ndarray:
    """A synthetic uint8 volume: bright touching blobs over an intensity ramp.

    The ramp makes every voxel different (so misplaced tiles show), the blobs
    give a segmentation something to find.
    """
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    ramp = sum(g * (k + 1) for k, g in enumerate(grids)) % 97
    blobs = np.zeros(shape)
    for _ in range(max(1, int(np.prod(shape)) // 400)):
        centre = [rng.uniform(0, n) for n in shape]
        radius = rng.uniform(2.0, 6.0)
        dist2 = sum((g - c) ** 2 for g, c in zip(grids, centre))
        blobs = np.maximum(blobs, dist2 < radius**2)
    volume = (ramp + 150 * blobs).clip(0, 255).astype(np.uint8)
    if channels is None:
        return volume
    return np.stack([np.roll(volume, c, axis=-1) for c in range(channels)])


def boxes(ndim: int = 3, low: int = -20, high: int = 40) -> Any:
    """Hypothesis strategy of boxes (possibly empty) with corners in ``[low, high]``."""
    from hypothesis import strategies as st

    corner = st.tuples(*(st.integers(low, high) for _ in range(ndim)))
    return st.tuples(corner, corner).map(
        lambda c: Box(tuple(map(min, c[0], c[1])), tuple(map(max, c[0], c[1])))
    )
