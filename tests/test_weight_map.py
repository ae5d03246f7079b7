"""Weight maps: separation borders, the paper's formula against brute force, chunked == whole on a real cluster."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from distributed import Client
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import ndimage

from unet_volume import weight_map as wm
from unet_volume.errors import InputError, OutputExistsError
from unet_volume.geometry import Box
from unet_volume.weight_map import (
    WeightMapConfig,
    balanced_class_weights,
    compute_weight_volume,
    cutoff_distance,
    halo_for,
    separation_borders,
    weight_map,
)

# ------------------------------------------------------------------ references and volumes


def brute_force_borders(labels: np.ndarray, ndim: int) -> np.ndarray:
    """The definition, voxel by voxel: a cell voxel with a different nonzero label among its neighbours."""
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
    """The paper's formula with explicit per-voxel minima over every voxel of every cell: no cutoff, float64."""
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


def blobs(
    shape: tuple[int, int, int], count: int, *, seed: int = 0, radius: tuple[float, float] = (2, 5)
) -> np.ndarray:
    """Random balls labelled 1..count, later ones over earlier ones: touching cells with background between."""
    rng = np.random.default_rng(seed)
    grids = np.indices(shape)
    labels = np.zeros(shape, dtype=np.uint16)
    for label in range(1, count + 1):
        centre = rng.uniform(0, shape)[:, None, None, None]
        labels[((grids - centre) ** 2).sum(0) < rng.uniform(*radius) ** 2] = label
    return labels


def voronoi(
    shape: tuple[int, int, int], count: int, *, seed: int = 0, drop: float = 0.15
) -> np.ndarray:
    """Touching cells: each voxel takes its nearest seed's label; a fraction ``drop`` of cells becomes background."""
    rng = np.random.default_rng(seed)
    seeds = tuple(rng.integers(0, n, count) for n in shape)
    grid = np.ones(shape, dtype=bool)
    grid[seeds] = False
    nearest = ndimage.distance_transform_edt(grid, return_distances=False, return_indices=True)
    labels = np.zeros(shape, dtype=np.uint32)
    labels[seeds] = np.arange(1, count + 1)
    keep = np.r_[0, rng.random(count) >= drop].astype(np.uint32)
    return labels[tuple(nearest)] * keep[labels[tuple(nearest)]]


def write_zarr(path: Path, data: np.ndarray, chunks: tuple[int, ...] | None = None) -> str:
    array = zarr.create_array(
        path, shape=data.shape, dtype=data.dtype, chunks=chunks or (1, 2, 17, 19)[-data.ndim :]
    )
    array[:] = data
    return str(path)


def two_squares() -> np.ndarray:
    # Rows 2..7 of a 10 x 12 slice: cell 1 in columns 2..5, cell 2 in columns 6..9, touching along 5|6.
    labels = np.zeros((1, 10, 12), dtype=np.uint8)
    labels[0, 2:8, 2:6], labels[0, 2:8, 6:10] = 1, 2
    return labels


# ------------------------------------------------------------------ borders


def test_separation_borders_of_two_touching_squares_are_the_two_shared_columns() -> None:
    # Each cell's column next to the other cell (5 and 6) has the other cell in its 3x3 neighbourhood,
    # corners included (row 2, column 5 sees row 3, column 6); no other voxel does.
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
    labels = blobs(shape, 8, seed=sum(shape))
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
    # 120 voxels, 48 in the squares, 12 of them border: 36 foreground, 84 background, so
    # w_bg = 120 / (2 * 84) = 0.714 and w_fg = 120 / (2 * 36) = 1.667. A border voxel of cell 1 is 1 from
    # cell 1's remaining voxels and 2 from cell 2's: w = w_bg + 10 exp(-(1 + 2)^2 / 50) = 0.714 + 8.353 = 9.067,
    # the maximum ("about w_c + w0"; the 2-voxel border costs 16% of w0). Cell voxels weigh w_fg.
    weights = weight_map(two_squares(), WeightMapConfig(ndim=2))[0]
    peak = 120 / 168 + 10 * math.exp(-9 / 50)
    np.testing.assert_allclose(weights[2:8, 5:7], peak, rtol=1e-6)
    assert weights.max() == weights[2, 5]
    np.testing.assert_allclose(weights[2:8, 2:5], 120 / 72, rtol=1e-6)


def test_weight_map_of_a_binary_mask_weighs_its_connected_components() -> None:
    # A 0/255 mask is recognised as binary; its components per slice are the cells (face connectivity).
    labels = blobs((2, 30, 30), 10, seed=3)
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
    # The block computation without a cluster: a write box read with halo_for's halo (zero outside the
    # volume), weighed with the volume's class weights, is the crop of the whole-volume weights.
    config = WeightMapConfig(
        ndim=data.draw(st.sampled_from([2, 3])), sigma=1.5, voxel_size=(2.0, 1.0, 1.0)
    )
    labels = blobs((7, 36, 34), 25, seed=data.draw(st.integers(0, 3)))
    begin = data.draw(st.tuples(st.integers(0, 6), st.integers(0, 35), st.integers(0, 33)))
    end = tuple(data.draw(st.integers(b + 1, n)) for b, n in zip(begin, labels.shape))
    box, halo = Box(begin, end), halo_for(config)
    whole = weight_map(labels, config)
    target = wm.training_target(labels, config)
    read = box.grow(halo)
    low, high = read.outside(Box.from_shape(labels.shape))
    context = np.pad(
        labels[read.intersect(Box.from_shape(labels.shape)).to_slices()], list(zip(low, high))
    )
    classes = wm.balanced_class_weights(int(target.sum()), target.size)
    block = weight_map(context, config, classes, write_box=Box.from_shape(box.shape, begin=halo))
    np.testing.assert_array_equal(block, whole[box.to_slices()])


@pytest.mark.parametrize(
    ("config", "halo"),
    [
        # D = 5 sqrt(2 ln(10 / (1e-7 * 0.5))) = 5 * 6.183 = 30.9; halo = ceil(30.9) + 1 = 32, none across slices.
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
    # 1000 and 4000 cells of ~100 voxels (15% dropped, leaving gaps): four times the cells cost about four
    # times the distance transform voxels (one transform per cell over the whole slice would cost 16 times),
    # about 6 slices' worth in all, and at most one transform per cell and search round (radius 5, 10, 20, 30.9).
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


# ------------------------------------------------------------------ chunked on the cluster


@pytest.mark.parametrize(
    ("config", "shape", "chunks"),
    [
        pytest.param(WeightMapConfig(ndim=2), (2, 150, 140), (1, 48, 50), id="2d-paper-defaults"),
        pytest.param(
            WeightMapConfig(ndim=2, sigma=1.5), (3, 50, 47), (2, 16, 13), id="2d-small-chunks"
        ),
        pytest.param(WeightMapConfig(ndim=3, sigma=1.0), (16, 40, 36), (6, 13, 11), id="3d"),
        pytest.param(
            WeightMapConfig(ndim=3, sigma=1.5, voxel_size=(2.0, 1.0, 1.0)),
            (12, 44, 40),
            (5, 16, 12),
            id="3d-anisotropic",
        ),
    ],
)
def test_compute_weight_volume_equals_the_whole_volume_weights(
    client: Client,
    tmp_path: Path,
    config: WeightMapConfig,
    shape: tuple[int, int, int],
    chunks: tuple[int, ...],
) -> None:
    # Cells of radius 2-5 cross every chunk border; each block reads far less than the volume.
    labels = blobs(shape, int(np.prod(shape)) // 120, seed=1)
    assert all(c + 2 * h < n for c, h, n in zip(chunks[1:], halo_for(config)[1:], shape[1:]))
    report = compute_weight_volume(
        write_zarr(tmp_path / "labels.zarr", labels),
        str(tmp_path / "w.zarr"),
        config,
        chunk_shape=chunks,
        client=client,
    )
    whole = weight_map(labels, config)
    background = whole[~wm.training_target(labels, config)]
    assert (
        np.mean(background > report.class_weights[0] + 1e-3) > 0.1
    )  # the border term is there, and large
    np.testing.assert_allclose(zarr.open_array(tmp_path / "w.zarr")[:], whole, rtol=1e-5)
    assert report.voxels == labels.size and report.halo == halo_for(config)


def test_compute_weight_volume_needs_its_whole_halo(
    client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The equality above is not vacuous: with half the halo (5 instead of 11 voxels) the weights differ,
    # e.g. by 10 exp(-(1 + 6)^2 / 4.5) = 2e-4 where a second cell 6 voxels away is missed.
    config, labels = WeightMapConfig(ndim=2, sigma=1.5), blobs((2, 50, 47), 40, seed=1)
    monkeypatch.setattr(wm, "halo_for", lambda c: tuple(h // 2 for h in halo_for(c)))
    compute_weight_volume(
        write_zarr(tmp_path / "l.zarr", labels),
        str(tmp_path / "w.zarr"),
        config,
        chunk_shape=(1, 16, 13),
        client=client,
    )
    assert not np.allclose(
        zarr.open_array(tmp_path / "w.zarr")[:], weight_map(labels, config), rtol=1e-5
    )


def test_compute_weight_volume_takes_a_binary_mask_in_whole_slices(
    client: Client, tmp_path: Path
) -> None:
    # A 2D mask's cells are its components per slice: exact when each block holds whole slices.
    mask = (blobs((3, 40, 36), 14, seed=2) > 0).astype(np.uint8)
    config = WeightMapConfig(ndim=2, sigma=2.0)
    compute_weight_volume(
        write_zarr(tmp_path / "m.zarr", mask),
        str(tmp_path / "w.zarr"),
        config,
        chunk_shape=(1, 40, 36),
        client=client,
    )
    np.testing.assert_allclose(
        zarr.open_array(tmp_path / "w.zarr")[:], weight_map(mask, config), rtol=1e-5
    )


def test_compute_weight_volume_writes_a_float32_zarr_v3_array(
    client: Client, tmp_path: Path
) -> None:
    labels = blobs((4, 20, 18), 6, seed=4)
    compute_weight_volume(
        write_zarr(tmp_path / "l.zarr", labels),
        str(tmp_path / "w.zarr"),
        WeightMapConfig(ndim=3, sigma=1.0),
        chunk_shape=(2, 64, 8),
        client=client,
    )
    array = zarr.open_array(tmp_path / "w.zarr")
    assert (array.dtype, array.chunks, array.metadata.dimension_names) == (
        np.float32,
        (2, 20, 8),
        ("z", "y", "x"),
    )
    assert [type(c).__name__ for c in array.metadata.codecs] == ["BytesCodec", "BloscCodec"]
    assert array.attrs["unet_volume"]["weights"]["border"] == "background (0) outside the volume"


def test_compute_weight_volume_balances_classes_over_the_given_slices_only(
    client: Client, tmp_path: Path
) -> None:
    # Slices 0-1 are 1/4 cells, slices 2-3 (held out) all cells: only 0-1 may set the class weights.
    labels = np.zeros((4, 8, 8), np.uint16)
    labels[0:2, :4, :4] = 1
    labels[2:4] = 2
    report = compute_weight_volume(
        write_zarr(tmp_path / "l.zarr", labels),
        str(tmp_path / "w.zarr"),
        WeightMapConfig(w0=0.0),
        chunk_shape=(1, 8, 8),
        client=client,
        balance_z_range=(0, 2),
    )
    # One cell per slice touches no other: no separation borders, so 2 x 16 of 2 x 64 voxels are target.
    assert report.class_weights == balanced_class_weights(2 * 16, 2 * 64)


def bad_inputs(tmp_path: Path) -> dict[str, tuple[str, dict[str, Any]]]:
    """Name -> (labels URL, extra arguments) for each bad input."""
    fine = blobs((4, 12, 12), 4)
    (tmp_path / "exists.zarr").mkdir()
    return {
        "missing": (str(tmp_path / "missing.zarr"), {}),
        "rank": (write_zarr(tmp_path / "2d.zarr", fine[0]), {}),
        "float": (write_zarr(tmp_path / "f.zarr", fine.astype(np.float32)), {}),
        "channels": (write_zarr(tmp_path / "c.zarr", np.stack([fine, fine])), {}),
        "negative": (write_zarr(tmp_path / "n.zarr", fine.astype(np.int16) - 1), {}),
        "exists": (
            write_zarr(tmp_path / "ok.zarr", fine),
            {"out_url": str(tmp_path / "exists.zarr")},
        ),
        "chunks": (str(tmp_path / "ok.zarr"), {"chunk_shape": (4, 4)}),
        "binary": (
            write_zarr(tmp_path / "b.zarr", (fine > 0).astype(np.uint8)),
            {"config": WeightMapConfig(ndim=3)},
        ),
        "balance": (str(tmp_path / "ok.zarr"), {"balance_z_range": (3, 9)}),
    }


@pytest.mark.parametrize(
    ("case", "error", "message"),
    [
        pytest.param("missing", InputError, "does not exist", id="missing-labels"),
        pytest.param("rank", InputError, r"expected \(z, y, x\)", id="wrong-rank"),
        pytest.param("float", InputError, "integer labels", id="float-labels"),
        pytest.param("channels", InputError, "2 channel", id="channels"),
        pytest.param("negative", InputError, "negative values", id="negative-labels"),
        pytest.param("exists", OutputExistsError, "already exists", id="existing-output"),
        pytest.param("chunks", InputError, "chunk shape", id="chunk-rank"),
        pytest.param("binary", InputError, "label the cells first", id="binary-mask-across-chunks"),
        pytest.param(
            "balance", InputError, "class-balance z range 3:9", id="balance-range-outside"
        ),
    ],
)
def test_compute_weight_volume_rejects_bad_input_in_one_line(
    client: Client, tmp_path: Path, case: str, error: type[Exception], message: str
) -> None:
    labels_url, extra = bad_inputs(tmp_path)[case]
    arguments: dict[str, Any] = {
        "out_url": str(tmp_path / "w.zarr"),
        "config": WeightMapConfig(ndim=2),
        "chunk_shape": (2, 8, 8),
        **extra,
    }
    with pytest.raises(error, match=message) as raised:
        compute_weight_volume(
            labels_url,
            arguments.pop("out_url"),
            arguments.pop("config"),
            client=client,
            **arguments,
        )
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "w.zarr").exists()


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
