"""Augmentation specifications: one transform moves image and targets together, and nothing else.

Tiles are small stand-ins for the real ones. The 2D tile has input 52 and output 12 (halo 20,
as the tiny depth-2 net of test_train); the 3D tile has input (20, 36, 36) and output
(8, 12, 12). The image often encodes the labels (``image = 10 * labels``), so whether the two
moved together can be read off the image itself: round(image / 10) at the output voxel's
place in the input tile must be that voxel's label.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import ndimage

from unet_volume.errors import InputError
from unet_volume.training.augment import AugmentConfig, augment, required_apron

TILE_2D = ((1, 52, 52), (1, 12, 12))  # (z, y, x) input and output; z is a batch of one slice
TILE_3D = ((20, 36, 36), (8, 12, 12))
GEOMETRIC = AugmentConfig(brightness=0.0, contrast=0.0, gamma=0.0)  # the paper's spatial part only
GRAY_ONLY = AugmentConfig(
    elastic_std=0.0, rotate="none", flip=False, brightness=0.3, contrast=0.3, gamma=0.3
)

CONFIGS = [
    pytest.param(AugmentConfig(), id="paper"),
    pytest.param(AugmentConfig.plain(), id="plain"),
    pytest.param(AugmentConfig.upright(), id="upright"),
    pytest.param(
        AugmentConfig(rotate="none", flip=False, brightness=0, contrast=0, gamma=0), id="elastic"
    ),
    pytest.param(
        AugmentConfig(elastic_std=0, flip=False, brightness=0, contrast=0, gamma=0), id="rotate"
    ),
    pytest.param(AugmentConfig(elastic_std=0, rotate="none", flip=False, shift=3.0), id="shift"),
    pytest.param(GRAY_ONLY, id="gray"),
]
TILES = [pytest.param(2, TILE_2D, id="2d"), pytest.param(3, TILE_3D, id="3d")]


def grown(shape: tuple[int, ...], apron: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(n + 2 * m for n, m in zip(shape, apron))


def centre(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The centred ``shape`` of the trailing axes of ``array``: an output tile in its input tile."""
    lead = (slice(None),) * (array.ndim - len(shape))
    return array[
        lead
        + tuple(
            slice((n - s) // 2, (n + s) // 2) for n, s in zip(array.shape[-len(shape) :], shape)
        )
    ]


def blob_labels(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Three classes in blobs about 10 voxels across: few voxels lie on a class boundary."""
    noise = ndimage.gaussian_filter(
        np.random.default_rng(seed).normal(size=shape), 4.0, mode="wrap"
    )
    return np.digitize(noise, np.quantile(noise, [0.33, 0.66])).astype(np.int64)


def label_tile(
    ndim: int,
    tile: tuple[tuple[int, ...], tuple[int, ...]],
    apron: tuple[int, ...],
    seed: int = 0,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Image ``10 * labels`` (c=1) on the grown input tile; labels, weights, mask on the output."""
    in_shape, out_shape = tile
    labels_in = blob_labels(grown(in_shape, apron), seed)
    labels = centre(labels_in, grown(out_shape, apron))
    weights = (1.0 + labels).astype(np.float32)
    return (10.0 * labels_in[None]).astype(np.float32), {
        "labels": labels,
        "weights": weights,
        "mask": labels > 0,
    }


def agreement(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per output voxel: does the image at its place in the input tile say its label?"""
    return np.rint(centre(image[0], labels.shape) / 10) == labels


@pytest.mark.parametrize("ndim, tile", TILES)
@pytest.mark.parametrize("apron", [0, 5], ids=["tiles", "apron5"])
def test_augment_none_gives_tiles_back_exactly(ndim: int, tile: Any, apron: int) -> None:
    spatial = (0, apron, apron) if ndim == 2 else (apron,) * 3
    image, targets = label_tile(ndim, tile, spatial)
    image += np.random.default_rng(1).random(
        image.shape, dtype=np.float32
    )  # not only multiples of 10
    out_image, out_targets = augment(
        image, targets, AugmentConfig.none(), np.random.default_rng(0), ndim=ndim, apron=spatial
    )
    np.testing.assert_array_equal(out_image, centre(image, tile[0]))
    for name, target in targets.items():
        np.testing.assert_array_equal(out_targets[name], centre(target, tile[1]))
        assert out_targets[name].dtype == target.dtype
        assert not np.shares_memory(out_targets[name], target)  # copies: the caller may change them


@pytest.mark.parametrize(
    "config, always_upright",
    [(AugmentConfig.upright(), True), (AugmentConfig(), False), (AugmentConfig.plain(), False)],
    ids=["upright", "paper", "plain"],
)
def test_augment_upright_never_flips_or_turns_a_tile(
    config: AugmentConfig, always_upright: bool
) -> None:
    # Labels registered to the image's orientation (ISBI's sit ~0.6 px above its membranes)
    # need tiles that keep it: image and labels rise with y in every upright draw, as drawn.
    size = 188  # elastic knots 94 px apart: a displacement of ~10 px bends a ramp, never turns it
    y = np.mgrid[:size, :size][0].astype(np.float32)
    image, labels = y[None, None], np.rint(y[None] / 10).astype(np.int64)
    upright = []
    for seed in range(12):
        out, targets = augment(image, {"y": labels}, config, np.random.default_rng(seed), ndim=2)
        rises = [
            np.diff(a[..., :, size // 2].astype(float)).mean() > 0.5
            for a in (out, targets["y"] * 10)
        ]
        flat = abs(np.diff(out[0, 0, size // 2, :]).mean()) < 0.5
        upright.append(all(rises) and flat)
    assert all(upright) if always_upright else not all(upright)


def test_augment_none_draws_nothing() -> None:
    # The identity leaves the caller's random stream where it was.
    rng = np.random.default_rng(0)
    augment(np.zeros((1, 1, 52, 52)), {}, AugmentConfig.none(), rng, ndim=2)
    assert rng.random() == np.random.default_rng(0).random()


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("ndim, tile", TILES)
def test_augment_keeps_shapes_and_dtypes(config: AugmentConfig, ndim: int, tile: Any) -> None:
    image, targets = label_tile(ndim, tile, (0, 0, 0))
    out_image, out_targets = augment(
        image.astype(np.uint8), targets, config, np.random.default_rng(0), ndim=ndim
    )
    assert out_image.shape == (1, *tile[0]) and out_image.dtype == np.float32
    for name, target in targets.items():
        assert out_targets[name].shape == tile[1] and out_targets[name].dtype == target.dtype


@pytest.mark.parametrize("config", CONFIGS)
def test_augment_keeps_non_square_tiles(config: AugmentConfig) -> None:
    # Quarter turns of a non-square tile are 0 or 180 degrees; any angle samples the same grid.
    image, targets = np.ones((2, 3, 52, 60), np.float32), {"labels": np.ones((3, 12, 20), np.int64)}
    for seed in range(4):
        out_image, out_targets = augment(
            image, targets, config, np.random.default_rng(seed), ndim=2
        )
        assert out_image.shape == (2, 3, 52, 60) and out_targets["labels"].shape == (3, 12, 20)


@given(
    seed=st.integers(0, 2**32 - 1),
    values=st.lists(st.integers(-5, 300), min_size=1, max_size=4, unique=True),
    size=st.integers(5, 30),
)
def test_augment_targets_take_only_values_they_had(seed: int, values: list[int], size: int) -> None:
    # Nearest sampling: labels stay labels, and weights and masks stay what they were.
    rng = np.random.default_rng(seed)
    labels = rng.choice(values, size=(2, size, size))
    targets = {"labels": labels, "weights": labels / 7.0, "mask": labels > 0}
    _, out = augment(
        rng.random((1, 2, size + 8, size + 8)), targets, AugmentConfig(shift=2.0), rng, ndim=2
    )
    for name, target in targets.items():
        assert set(np.unique(out[name])) <= set(np.unique(target)), name


@pytest.mark.parametrize("ndim, tile", TILES)
def test_augment_moves_image_and_targets_together(ndim: int, tile: Any) -> None:
    # Elastic + any rotation + flips: the image is bicubic, so only voxels at a class boundary
    # may disagree (hand count for these blobs: a few percent). Weights and mask follow labels.
    apron = required_apron(GEOMETRIC, tile[0], ndim=ndim)
    for seed in range(3):
        image, targets = label_tile(ndim, tile, apron, seed)
        out_image, out = augment(
            image, targets, GEOMETRIC, np.random.default_rng(seed), ndim=ndim, apron=apron
        )
        assert agreement(out_image, out["labels"]).mean() > 0.95
        np.testing.assert_array_equal(out["weights"], 1.0 + out["labels"])
        np.testing.assert_array_equal(out["mask"], out["labels"] > 0)
        assert not np.array_equal(out["labels"], centre(targets["labels"], tile[1]))  # it did move


@pytest.mark.parametrize("ndim, tile", TILES)
def test_augment_plain_moves_image_and_targets_exactly(ndim: int, tile: Any) -> None:
    # Flips and quarter turns are index operations: every voxel agrees, no interpolation.
    for seed in range(8):
        image, targets = label_tile(ndim, tile, (0, 0, 0), seed)
        out_image, out = augment(
            image, targets, AugmentConfig.plain(), np.random.default_rng(seed), ndim=ndim
        )
        assert agreement(out_image, out["labels"]).all()
        np.testing.assert_array_equal(out_image, np.rint(out_image))  # no value was interpolated


@pytest.mark.parametrize("ndim, tile", TILES)
def test_augment_interpolated_path_agrees_with_index_path(ndim: int, tile: Any) -> None:
    # A vanishing elastic warp takes the interpolating path with the same flips and turns
    # (its extra draws come after theirs): the coordinate conventions (tile centre, flip then
    # turn, turn direction) must give the index operations' result.
    image, targets = label_tile(ndim, tile, (0, 0, 0))
    image += np.random.default_rng(1).random(image.shape, dtype=np.float32)
    tiny = AugmentConfig(elastic_std=1e-9, rotate="quarter", brightness=0, contrast=0, gamma=0)
    for seed in range(8):
        exact = augment(
            image, targets, AugmentConfig.plain(), np.random.default_rng(seed), ndim=ndim
        )
        warped = augment(image, targets, tiny, np.random.default_rng(seed), ndim=ndim)
        np.testing.assert_allclose(
            warped[0], exact[0], atol=1e-3
        )  # spline at the knots: float32 error
        for name in targets:
            np.testing.assert_array_equal(warped[1][name], exact[1][name])


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("ndim, tile", TILES)
def test_augment_same_seed_same_tiles_other_seed_other_tiles(
    config: AugmentConfig, ndim: int, tile: Any
) -> None:
    image, targets = label_tile(ndim, tile, (0, 0, 0))
    image += np.random.default_rng(1).random(image.shape, dtype=np.float32)  # so gray changes show
    first, again, other = (
        augment(image, targets, config, np.random.default_rng(seed), ndim=ndim)
        for seed in (7, 7, 8)
    )
    np.testing.assert_array_equal(first[0], again[0])
    for name in targets:
        np.testing.assert_array_equal(first[1][name], again[1][name])
    assert not np.array_equal(first[0], other[0])


def test_augment_2d_slices_are_independent_tiles() -> None:
    # A z batch is its slices augmented one after another from the same random stream.
    image, targets = label_tile(2, ((3, 52, 52), (3, 12, 12)), (0, 0, 0))
    batch = augment(image, targets, AugmentConfig(), np.random.default_rng(0), ndim=2)
    rng = np.random.default_rng(0)
    for k in range(3):
        one = augment(
            image[:, k], {n: t[k] for n, t in targets.items()}, AugmentConfig(), rng, ndim=2
        )
        np.testing.assert_array_equal(batch[0][:, k], one[0])
        np.testing.assert_array_equal(batch[1]["labels"][k], one[1]["labels"])


@pytest.mark.parametrize(
    "ndim, in_shape", [pytest.param(2, (1, 41, 41), id="2d"), pytest.param(3, (9, 41, 41), id="3d")]
)
def test_augment_elastic_knots_are_gaussian_draws_at_the_input_tiles_corners_and_centre(
    ndim: int, in_shape: tuple[int, ...]
) -> None:
    # The paper's field: 3 knots per axis at the input tile's first, middle and last voxel
    # (2D: 0, 20, 40; not the output tile's), displaced by N(0, 10 px) draws, the only randomness
    # when nothing else is on. Channel a of the image is the source array's coordinate a, a ramp
    # that bicubic interpolation reproduces, so the output image reads source points directly.
    config = AugmentConfig(rotate="none", flip=False, brightness=0, contrast=0, gamma=0)
    rank = 2 if ndim == 2 else 3
    spatial = in_shape[-rank:]
    apron = (0,) * (3 - rank) + (45,) * rank  # > 3 std: the ramp is never mirrored near a knot
    source = np.indices(grown(in_shape, apron), dtype=np.float32)[-rank:]  # (rank, *grown)
    for seed in range(3):
        labels = np.zeros(grown(in_shape[:-rank] + (5,) * (rank - 2) + (21, 21), apron), np.int64)
        out, _ = augment(
            source,
            {"labels": labels},
            config,
            np.random.default_rng(seed),
            ndim=ndim,
            apron=apron,
        )
        knots = np.ix_(*[[0, (n - 1) // 2, n - 1] for n in spatial])
        grid = np.indices(spatial)  # tile voxel positions
        for a in range(rank):
            moved = out[a].reshape(spatial)[knots] - apron[-rank + a] - grid[a][knots]
            draws = np.random.default_rng(seed).normal(0.0, 10.0, size=(rank,) + (3,) * rank)
            np.testing.assert_allclose(moved, draws[a], atol=1e-3)


@pytest.mark.parametrize(
    "config", [*CONFIGS, pytest.param(AugmentConfig(shift=4.0), id="paper+shift")]
)
@pytest.mark.parametrize("ndim, tile", TILES)
def test_required_apron_is_enough(config: AugmentConfig, ndim: int, tile: Any) -> None:
    # With the apron no source point lies outside the arrays, so more apron (here: a ring of
    # -1s, which the targets never hold) changes no target voxel.
    apron = required_apron(config, tile[0], ndim=ndim)
    image, targets = label_tile(ndim, tile, apron)
    ring = (0, 6, 6) if ndim == 2 else (6, 6, 6)
    pairs = [(r, r) for r in ring]
    wider = {name: np.pad(t, pairs, constant_values=-1) for name, t in targets.items()}
    wider_image = np.pad(image, [(0, 0), *pairs])
    for seed in range(4):
        _, out = augment(
            image, targets, config, np.random.default_rng(seed), ndim=ndim, apron=apron
        )
        _, out_wider = augment(
            wider_image,
            wider,
            config,
            np.random.default_rng(seed),
            ndim=ndim,
            apron=tuple(m + r for m, r in zip(apron, ring)),
        )
        for name in targets:
            np.testing.assert_array_equal(out_wider[name], out[name])


@pytest.mark.parametrize(
    "config, input_shape, ndim, expected",
    [
        # 2D paper tile 316: corners turn out to 157.5 sqrt(2), 65.2 past the edge; + 3 std = 30
        pytest.param(AugmentConfig(), (1, 316, 316), 2, (0, 96, 96), id="paper-2d"),
        pytest.param(AugmentConfig(), (316, 316), 2, (96, 96), id="paper-2d-yx"),
        # 3D (116, 132, 132): z only elastic (30); y, x: 65.5 (sqrt(2) - 1) = 27.1, + 30
        pytest.param(AugmentConfig(), (116, 132, 132), 3, (30, 58, 58), id="paper-3d"),
        pytest.param(
            AugmentConfig(elastic_std=0, rotate="none", shift=4.5),
            (1, 64, 64),
            2,
            (0, 5, 5),
            id="shift",
        ),
        pytest.param(AugmentConfig.plain(), (1, 316, 316), 2, (0, 0, 0), id="plain"),
        pytest.param(AugmentConfig.none(), (116, 132, 132), 3, (0, 0, 0), id="none"),
    ],
)
def test_required_apron_covers_turned_corners_and_displacements(
    config: AugmentConfig, input_shape: Any, ndim: int, expected: tuple[int, ...]
) -> None:
    assert required_apron(config, input_shape, ndim=ndim) == expected


def test_augment_gray_changes_image_values_only_monotonically() -> None:
    # Gamma, contrast and brightness keep the order of gray values and never touch targets.
    image, targets = label_tile(2, TILE_2D, (0, 0, 0))
    image += np.random.default_rng(1).random(image.shape, dtype=np.float32)
    out_image, out = augment(image, targets, GRAY_ONLY, np.random.default_rng(0), ndim=2)
    assert not np.allclose(out_image, image)
    assert np.all(np.diff(out_image.ravel()[np.argsort(image.ravel())]) >= -1e-4)
    for name, target in targets.items():
        np.testing.assert_array_equal(out[name], centre(target, TILE_2D[1]))


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"elastic_std": -1.0}, id="negative-std"),
        pytest.param({"elastic_grid": 1}, id="grid-1"),
        pytest.param({"rotate": True}, id="rotate-bool"),
        pytest.param({"flip": 1}, id="flip-int"),
        pytest.param({"contrast": 1.0}, id="contrast-1"),
        pytest.param({"gamma": float("nan")}, id="gamma-nan"),
        pytest.param({"image_order": 2}, id="order-2"),
    ],
)
def test_augment_config_rejects_bad_values(changes: dict[str, Any]) -> None:
    with pytest.raises(InputError):
        AugmentConfig(**changes)


@pytest.mark.parametrize(
    "image_shape, target_shape, ndim, apron",
    [
        pytest.param((1, 1, 52, 52), (1, 13, 13), 2, None, id="not-centred"),
        pytest.param((1, 1, 52, 52), (2, 12, 12), 2, None, id="2d-z-mismatch"),
        pytest.param((1, 1, 52, 52), (1, 12, 12), 2, (1, 0, 0), id="2d-z-apron"),
        pytest.param((1, 52, 52), (12, 12), 3, None, id="3d-needs-z"),
        pytest.param((1, 8, 8, 8), (4, 4, 4), 3, (4, 4, 4), id="apron-eats-tile"),
        pytest.param((1, 1, 52, 52), (1, 12, 12), 4, None, id="ndim-4"),
    ],
)
def test_augment_rejects_targets_that_are_not_the_tiles_output(
    image_shape: Any, target_shape: Any, ndim: int, apron: Any
) -> None:
    with pytest.raises(InputError):
        augment(
            np.zeros(image_shape),
            {"labels": np.zeros(target_shape)},
            AugmentConfig(),
            np.random.default_rng(0),
            ndim=ndim,
            apron=apron,
        )
