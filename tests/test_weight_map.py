"""Weight maps in memory: separation borders, the paper's formula against brute force, halos."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import ndimage

from unet_volume.errors import InputError
from unet_volume.geometry import Box
from unet_volume.testing import blob_labels
from unet_volume.training import weight_map as wm
from unet_volume.training.weight_map import (
    WeightMapConfig,
    cutoff_distance,
    halo_for,
    separation_borders,
    weight_map,
)

# ------------------------------------------------------------------ references and volumes


def brute_force_borders(labels: np.ndarray, ndim: int) -> np.ndarray:
    """The definition, voxel by voxel: a cell voxel with another cell among its neighbours."""
    offsets = list(itertools.product((0,) if ndim == 2 else (-1, 0, 1), (-1, 0, 1), (-1, 0, 1)))
    borders = np.zeros(labels.shape, dtype=bool)
    for index in zip(*np.nonzero(labels)):
        for offset in offsets:
            other = tuple(i + o for i, o in zip(index, offset))
            if all(0 <= c < n for c, n in zip(other, labels.shape)) and labels[other] not in (
                0,
                labels[index],
            ):
                borders[index] = True
    return borders


def brute_force_weights(labels: np.ndarray, config: WeightMapConfig) -> np.ndarray:
    """The paper's formula, minima over every voxel of every cell: no cutoff, float64."""
    target = (labels != 0) & ~brute_force_borders(labels, config.ndim)
    cells = np.where(target, labels, 0)
    n_fg, total = int(target.sum()), target.size
    w_bg, w_fg = config.class_weights or tuple(
        total / (2 * n) if n else 1.0 for n in (total - n_fg, n_fg)
    )
    weights = np.where(target, w_fg, w_bg)
    for part, out in [(cells, weights)] if config.ndim == 3 else zip(cells, weights):
        points = np.indices(part.shape).reshape(part.ndim, -1).T * np.array(
            config.sampling
        )  # (voxels, ndim)
        per_cell = [
            np.sqrt(((points[:, None] - points[part.ravel() == c][None]) ** 2).sum(-1)).min(1)
            for c in np.unique(part[part != 0])
        ]
        ranked = np.sort(
            np.array(per_cell + [np.full(len(points), np.inf)] * 2), axis=0
        )  # (cells + 2, voxels)
        term = config.w0 * np.exp(-((ranked[0] + ranked[1]) ** 2) / (2 * config.sigma**2))
        out += np.where(part.ravel() == 0, term, 0.0).reshape(part.shape)
    return weights


def voronoi(
    shape: tuple[int, int, int], count: int, *, seed: int = 0, drop: float = 0.15
) -> np.ndarray:
    """Touching cells: each voxel takes its nearest seed's label; ``drop`` of them is background."""
    rng = np.random.default_rng(seed)
    seeds = tuple(rng.integers(0, n, count) for n in shape)
    grid = np.ones(shape, dtype=bool)
    grid[seeds] = False
    nearest = ndimage.distance_transform_edt(grid, return_distances=False, return_indices=True)
    labels = np.zeros(shape, dtype=np.uint32)
    labels[seeds] = np.arange(1, count + 1)
    keep = np.r_[0, rng.random(count) >= drop].astype(np.uint32)
    return labels[tuple(nearest)] * keep[labels[tuple(nearest)]]


def two_squares() -> np.ndarray:
    # Rows 2..7 of a 10 x 12 slice: cell 1 in columns 2..5, cell 2 in columns 6..9, touching along
    # 5|6.
    labels = np.zeros((1, 10, 12), dtype=np.uint8)
    labels[0, 2:8, 2:6], labels[0, 2:8, 6:10] = 1, 2
    return labels


# ------------------------------------------------------------------ borders


def test_separation_borders_of_two_touching_squares_are_the_two_shared_columns() -> None:
    # Each cell's column next to the other cell (5 and 6) has the other cell in its 3x3
    # neighbourhood, corners included (row 2, column 5 sees row 3, column 6); no other voxel does.
    expected = np.zeros((1, 10, 12), dtype=bool)
    expected[0, 2:8, 5:7] = True
    np.testing.assert_array_equal(separation_borders(two_squares(), ndim=2), expected)


@settings(max_examples=25)
@given(
    hnp.arrays(
        np.uint8,
        st.tuples(st.integers(1, 4), st.integers(1, 7), st.integers(1, 7)),
        elements=st.integers(0, 3),
    ),
    st.sampled_from([2, 3]),
)
def test_separation_borders_equal_the_neighbourhood_definition(
    labels: np.ndarray, ndim: int
) -> None:
    np.testing.assert_array_equal(
        separation_borders(labels, ndim), brute_force_borders(labels, ndim)
    )


def test_separation_borders_handle_labels_near_the_dtype_maximum() -> None:
    # scipy's filters go through float64: uint64 labels 2**40 apart must still be told apart.
    labels = np.array([[[2**40, 2**40 + 1, 0]]], dtype=np.uint64)
    np.testing.assert_array_equal(separation_borders(labels, ndim=3), [[[True, True, False]]])


# ------------------------------------------------------------------ the formula


@pytest.mark.parametrize(
    ("config", "shape"),
    [
        pytest.param(WeightMapConfig(ndim=2), (2, 18, 17), id="2d-paper-defaults"),
        pytest.param(
            WeightMapConfig(ndim=2, sigma=2.0, voxel_size=(1.0, 2.0, 0.5)),
            (1, 16, 20),
            id="2d-anisotropic",
        ),
        pytest.param(WeightMapConfig(ndim=3, sigma=3.0), (6, 13, 12), id="3d"),
        pytest.param(
            WeightMapConfig(ndim=3, sigma=4.0, voxel_size=(2.5, 1.0, 1.0)),
            (5, 12, 14),
            id="3d-anisotropic",
        ),
        pytest.param(
            WeightMapConfig(ndim=3, w0=3.0, class_weights=(1.0, 4.0)),
            (4, 10, 10),
            id="3d-fixed-classes",
        ),
    ],
)
def test_weight_map_equals_brute_force(
    config: WeightMapConfig, shape: tuple[int, int, int]
) -> None:
    # Within 1e-6 relative: the cutoff drops at most 1e-7 of any weight, float32 rounds at 6e-8.
    labels = blob_labels(shape, 8, seed=sum(shape))
    np.testing.assert_allclose(
        weight_map(labels, config), brute_force_weights(labels, config), rtol=1e-6
    )


@settings(max_examples=20)
@given(
    hnp.arrays(
        np.uint8, st.tuples(*(st.integers(1, n) for n in (3, 9, 9))), elements=st.integers(0, 4)
    ),
    st.sampled_from([2, 3]),
    st.floats(0.5, 6.0),
    st.tuples(st.floats(0.5, 3.0), st.floats(0.5, 3.0), st.floats(0.5, 3.0)),
)
def test_weight_map_equals_brute_force_on_any_labels(
    labels: np.ndarray, ndim: int, sigma: float, voxel_size: tuple[float, float, float]
) -> None:
    config = WeightMapConfig(ndim=ndim, sigma=sigma, voxel_size=voxel_size, binary=False)  # type: ignore[arg-type]
    np.testing.assert_allclose(
        weight_map(labels, config), brute_force_weights(labels, config), rtol=1e-6
    )


def test_weight_map_peaks_on_the_shared_border_of_two_squares() -> None:
    # 120 voxels, 48 in the squares, 12 of them border: 36 foreground, 84 background, so w_bg = 120
    # / (2 * 84) = 0.714 and w_fg = 120 / (2 * 36) = 1.667. A border voxel of cell 1 is 1 from cell
    # 1's remaining voxels and 2 from cell 2's: w = w_bg + 10 exp(-(1 + 2)^2 / 50) = 0.714 + 8.353 =
    # 9.067, the maximum ("about w_c + w0"; the 2-voxel border costs 16% of w0). Cell voxels weigh
    # w_fg.
    weights = weight_map(two_squares(), WeightMapConfig(ndim=2))[0]
    peak = 120 / 168 + 10 * math.exp(-9 / 50)
    np.testing.assert_allclose(weights[2:8, 5:7], peak, rtol=1e-6)
    assert weights.max() == weights[2, 5]
    np.testing.assert_allclose(weights[2:8, 2:5], 120 / 72, rtol=1e-6)


def test_weight_map_of_a_binary_mask_weighs_its_connected_components() -> None:
    # A 0/255 mask is recognised as binary; its components per slice are the cells (face
    # connectivity).
    labels = blob_labels((2, 30, 30), 10, seed=3)
    mask = np.where(labels > 0, 255, 0).astype(np.uint8)
    components = ndimage.label(
        mask, structure=[[[0] * 3] * 3, [[0, 1, 0], [1, 1, 1], [0, 1, 0]], [[0] * 3] * 3]
    )[0]
    config = WeightMapConfig(ndim=2)
    np.testing.assert_array_equal(weight_map(mask, config), weight_map(components, config))
    assert not np.array_equal(
        weight_map(mask, config), weight_map(mask, WeightMapConfig(ndim=2, binary=False))
    )


@settings(max_examples=15)
@given(st.data())
def test_weight_map_of_a_write_box_in_its_halo_equals_the_whole_volume_crop(
    data: st.DataObject,
) -> None:
    # The block computation without a cluster: a write box read with halo_for's halo (zero outside
    # the volume), weighed with the volume's class weights, is the crop of the whole-volume weights.
    config = WeightMapConfig(
        ndim=data.draw(st.sampled_from([2, 3])), sigma=1.5, voxel_size=(2.0, 1.0, 1.0)
    )
    labels = blob_labels((7, 36, 34), 25, seed=data.draw(st.integers(0, 3)))
    begin = data.draw(st.tuples(st.integers(0, 6), st.integers(0, 35), st.integers(0, 33)))
    end = tuple(data.draw(st.integers(b + 1, n)) for b, n in zip(begin, labels.shape))
    box, halo = Box(begin, end), halo_for(config)
    whole = weight_map(labels, config)
    target = wm.training_target(labels, config)
    read = box.grow(halo)
    low, high = read.outside(Box.from_shape(labels.shape))
    read_labels = np.pad(
        labels[read.intersect(Box.from_shape(labels.shape)).to_slices()], list(zip(low, high))
    )
    classes = wm.balanced_class_weights(int(target.sum()), target.size)
    block = weight_map(
        read_labels, config, classes, write_box=Box.from_shape(box.shape, begin=halo)
    )
    np.testing.assert_array_equal(block, whole[box.to_slices()])


@pytest.mark.parametrize(
    ("config", "halo"),
    [
        # D = 5 sqrt(2 ln(10 / (1e-7 * 0.5))) = 5 * 6.183 = 30.9; halo = ceil(30.9) + 1 = 32, none
        # across slices.
        pytest.param(WeightMapConfig(ndim=2), (0, 32, 32), id="paper-2d"),
        # z voxels of 4: ceil(30.9 / 4) + 1 = 9.
        pytest.param(
            WeightMapConfig(ndim=3, voxel_size=(4.0, 1.0, 1.0)), (9, 32, 32), id="anisotropic-3d"
        ),
        # sigma 1.5: D = 9.27, halo 11; w0 = 0 has no term: 1 voxel for the borders.
        pytest.param(WeightMapConfig(ndim=3, sigma=1.5), (11, 11, 11), id="small-sigma"),
        pytest.param(WeightMapConfig(ndim=3, w0=0.0), (1, 1, 1), id="no-border-term"),
    ],
)
def test_halo_for_derives_from_sigma_w0_and_the_tolerance(
    config: WeightMapConfig, halo: tuple[int, ...]
) -> None:
    assert halo_for(config) == halo
    # The bound behind it: the term at d1 + d2 = D is 1e-7 of the smallest balanced weight (1/2).
    if config.w0:
        assert config.w0 * math.exp(
            -(cutoff_distance(config) ** 2) / (2 * config.sigma**2)
        ) == pytest.approx(5e-8)


def test_weight_map_work_per_cell_is_bounded_by_its_neighbourhood(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 1000 and 4000 cells of ~100 voxels (15% dropped, leaving gaps): four times the cells cost
    # about four times the distance transform voxels (one transform per cell over the whole slice
    # would cost 16 times), about 6 slices' worth in all, and at most one transform per cell and
    # search round (radius 5, 10, 20, 30.9).
    volumes = {
        count: voronoi((1, side, side), count, seed=count)
        for count, side in ((1000, 316), (4000, 632))
    }
    counts = {"calls": 0, "voxels": 0}
    original: Callable[..., Any] = ndimage.distance_transform_edt

    def counting(input: np.ndarray, *args: Any, **kwargs: Any) -> Any:
        counts["calls"] += 1
        counts["voxels"] += input.size
        return original(input, *args, **kwargs)

    monkeypatch.setattr(ndimage, "distance_transform_edt", counting)
    work = {}
    for count, labels in volumes.items():
        counts.update(calls=0, voxels=0)
        weight_map(labels, WeightMapConfig(ndim=2))
        assert counts["calls"] <= 4 * count
        assert counts["voxels"] < 10 * labels.size  # measured: 6.2 slices
        work[count] = counts["voxels"]
    assert 3.0 < work[4000] / work[1000] < 5.0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        pytest.param({"sigma": 0.0}, "sigma > 0", id="sigma"),
        pytest.param({"w0": -1.0}, "w0 >= 0", id="w0"),
        pytest.param({"ndim": 4}, "must be 2", id="ndim"),
        pytest.param({"voxel_size": (1.0, 0.0, 1.0)}, "voxel_size", id="voxel-size"),
        pytest.param({"class_weights": (1.0,)}, "class_weights", id="class-weights"),
    ],
)
def test_weight_map_config_rejects_bad_values_in_one_line(
    options: dict[str, Any], message: str
) -> None:
    with pytest.raises(InputError, match=message) as raised:
        WeightMapConfig(**options)
    assert "\n" not in str(raised.value)
