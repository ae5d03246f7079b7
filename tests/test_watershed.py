"""The seeded watershed: cells touching through a thin gap stay apart, every foreground voxel
gets an object (every voxel, covering), and the distributed run equals the whole-volume
watershed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from distributed import Client
from scipy import ndimage

from unet_volume.cli.main import main
from unet_volume.errors import InputError
from unet_volume.evaluation.scores import evaluate
from unet_volume.instances.components import structure
from unet_volume.instances.labelling import label_instances
from unet_volume.instances.watershed import WatershedConfig, seeded_watershed

PER_SLICE = structure(6, per_slice=True)


def two_cells_with_a_leaky_border() -> np.ndarray:
    """Two discs (p 0.95 at their cores) joined by a one-pixel bridge of p 0.6."""
    _, y, x = np.indices((1, 21, 41))
    p = np.full((1, 21, 41), 0.05)
    for cx in (10, 30):
        r2 = (y - 10) ** 2 + (x - cx) ** 2
        p[r2 < 64] = 0.7
        p[r2 < 25] = 0.95
    p[0, 10, 18:23] = 0.6  # the membrane between them leaks at one row
    return p


def canonical(labels: np.ndarray) -> np.ndarray:
    """Ids renumbered 1, 2, ... by first voxel in C order (how label_instances numbers)."""
    flat = labels.ravel()
    ids, first = np.unique(flat[flat > 0], return_index=True)
    order = np.empty(len(ids), np.int64)
    order[np.argsort(first)] = np.arange(1, len(ids) + 1)
    out = np.zeros(flat.shape, np.int64)
    out[flat > 0] = order[np.searchsorted(ids, flat[flat > 0])]
    return out.reshape(labels.shape)


def test_watershed_keeps_cells_apart_that_components_merge() -> None:
    p = two_cells_with_a_leaky_border()
    _, merged = ndimage.label(p > 0.5, PER_SLICE)
    labels, count = seeded_watershed(p, PER_SLICE, WatershedConfig())
    assert merged == 1 and count == 2
    assert np.array_equal(labels > 0, p > 0.5)  # every foreground voxel has an object
    assert labels[0, 10, 10] != labels[0, 10, 30]


def test_watershed_gives_a_seedless_component_its_own_object() -> None:
    p = np.full((1, 8, 8), 0.1)
    p[0, 1:3, 1:3] = 0.7  # foreground, never confident
    p[0, 5:8, 5:8] = 0.99
    labels, count = seeded_watershed(p, PER_SLICE, WatershedConfig())
    assert count == 2 and np.array_equal(labels > 0, p > 0.5)


def test_covering_watershed_gives_every_voxel_to_the_cell_it_drains_to() -> None:
    p = two_cells_with_a_leaky_border()
    labels, count = seeded_watershed(p, PER_SLICE, WatershedConfig(cover=True))
    assert count == 2 and (labels > 0).all()
    left, right = labels[0, 10, 10], labels[0, 10, 30]
    assert left != right
    assert (labels[0, :, :15] == left).all() and (labels[0, :, 26:] == right).all()


def test_watershed_per_slice_numbers_slices_apart() -> None:
    p = np.concatenate([two_cells_with_a_leaky_border()] * 3)
    labels, count = seeded_watershed(p, PER_SLICE, WatershedConfig())
    assert count == 6
    assert [len(set(np.unique(labels[z])) - {0}) for z in range(3)] == [2, 2, 2]


def test_watershed_refuses_thresholds_out_of_order() -> None:
    with pytest.raises(InputError, match=r"0 <= threshold < seed threshold <= 1"):
        WatershedConfig(threshold=0.9, seed_threshold=0.5)


def write_prediction(root: Path, p: np.ndarray) -> str:
    """A prediction-shaped group: float probabilities (background, foreground), argmax."""
    group = zarr.open_group(root / "prediction.zarr", mode="w")
    group.create_array("probabilities", data=np.stack([1 - p, p]).astype(np.float32))
    group.create_array("segmentation", data=(p > 0.5).astype(np.uint8))
    return str(root / "prediction.zarr")


@pytest.mark.parametrize("cover", [False, True], ids=["within-foreground", "covering"])
def test_watershed_on_dask_equals_the_whole_volume_watershed(
    tmp_path: Path, client: Client, cover: bool
) -> None:
    rng = np.random.default_rng(3)
    p = np.clip(
        np.concatenate([two_cells_with_a_leaky_border()] * 4) + rng.normal(0, 0.1, (4, 21, 41)),
        0,
        1,
    )
    source = write_prediction(tmp_path, p)
    report = label_instances(
        source,
        str(tmp_path / "labels.zarr"),
        client=client,
        watershed=WatershedConfig(cover=cover),
        block_shape=(1, 21, 41),
    )
    stored = zarr.open_group(report.output_url)["instances"][...]
    expected, count = seeded_watershed(
        p.astype(np.float32).astype(np.float64), PER_SLICE, WatershedConfig(cover=cover)
    )
    np.testing.assert_array_equal(stored, canonical(expected))
    assert report.objects == count


def test_watershed_refuses_blocks_that_cut_slices_and_masks(tmp_path: Path, client: Client) -> None:
    source = write_prediction(tmp_path, two_cells_with_a_leaky_border())
    with pytest.raises(InputError, match=r"cuts the slices .* pass --block-shape 1,21,41"):
        label_instances(
            source,
            str(tmp_path / "a.zarr"),
            client=client,
            watershed=WatershedConfig(),
            block_shape=(1, 8, 41),
        )
    mask = tmp_path / "mask.zarr"
    zarr.create_array(mask, data=np.ones((1, 4, 4), np.uint8))
    with pytest.raises(InputError, match="is not a prediction: the watershed floods"):
        label_instances(
            str(mask), str(tmp_path / "b.zarr"), client=client, watershed=WatershedConfig()
        )
    assert not (tmp_path / "a.zarr").exists() and not (tmp_path / "b.zarr").exists()


def test_watershed_from_the_command_line(tmp_path: Path) -> None:
    source = write_prediction(tmp_path, two_cells_with_a_leaky_border())
    out = tmp_path / "labels.zarr"
    args = ["segment", source, str(out), "--watershed", "--block-shape", "1,21,41"]
    assert main([*args, "--seed-threshold", "0.9", "--workers", "1"]) == 0
    assert len(np.unique(zarr.open_group(out)["instances"][...])) == 3  # background and 2 cells
    assert main([*args, "--cover", "--overwrite", "--workers", "1"]) == 0
    assert set(np.unique(zarr.open_group(out)["instances"][...])) == {1, 2}  # no background


def test_evaluate_scores_watershed_labels_as_objects_not_as_components(
    tmp_path: Path, client: Client
) -> None:
    p = two_cells_with_a_leaky_border()
    source = write_prediction(tmp_path, p)
    out = str(tmp_path / "labels.zarr")
    label_instances(
        source, out, client=client, watershed=WatershedConfig(), block_shape=(1, 21, 41)
    )
    truth = (p > 0.5) & (p != 0.6)  # the two cells, without the leak
    split = evaluate(out, truth.astype(np.uint8)).volume
    merged = evaluate(f"{source}/segmentation", truth.astype(np.uint8)).volume
    assert merged.rand_error > 0.3 and split.rand_error < merged.rand_error / 5


def two_cells_drawn_with_a_wide_membrane() -> tuple[np.ndarray, np.ndarray]:
    """Truth: two cells apart by a 1-pixel membrane (column 20); prediction: the same cells
    with a membrane 7 pixels wide (p 0.1 over columns 17-23), as a weight-map model draws it."""
    truth = np.ones((1, 21, 41), np.uint8)
    truth[0, :, 20] = 0
    p = np.full((1, 21, 41), 0.95)
    p[0, :, 17:24] = 0.1
    return truth, p


def test_covering_removes_the_rand_error_of_a_membrane_drawn_wider_than_the_truth(
    tmp_path: Path, client: Client
) -> None:
    truth, p = two_cells_drawn_with_a_wide_membrane()
    source = write_prediction(tmp_path, p)
    errors = {}
    for cover in (False, True):
        out = str(tmp_path / f"labels-{cover}.zarr")
        config = WatershedConfig(cover=cover)
        label_instances(source, out, client=client, watershed=config, block_shape=(1, 21, 41))
        errors[cover] = evaluate(out, truth).volume.rand_error
    # within the foreground, the 6 true-cell columns drawn as membrane are each voxel its own
    # segment: false splits; covering gives them to their cells, as the truth does
    assert errors[False] > 0.1 and errors[True] == 0.0
