"""Training specifications, on tiny real Zarr and TIFF volumes and a tiny U-Net.

The tiny net is 2D, depth 2, 4 base channels: a tile output of 12 needs an input of 52
(halo 20 = 6 * 2**2 - 4), so a (6, 48, 48) volume gives plenty of distinct tiles.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import torch
import zarr
from distributed import Client
from torch.utils.data import DataLoader

import unet_volume.training.loop as train_module
from unet_volume.errors import InputError
from unet_volume.geometry import Box
from unet_volume.models.checkpoint import load_model, read_checkpoint
from unet_volume.models.config import UNetConfig
from unet_volume.models.unet import UNet, channels_last
from unet_volume.progress import Progress
from unet_volume.testing import snapshot
from unet_volume.training import sampling as sampling_module
from unet_volume.training import tile_stream
from unet_volume.training.augment import AugmentConfig
from unet_volume.training.loop import TrainConfig, train
from unet_volume.training.sampling import TileSampler, TrainingData, TrainingTile, to_classes
from unet_volume.training.start import resumed
from unet_volume.training.tile_stream import TileStream, augment_tile, class_weights
from unet_volume.training.weight_map import WeightMapConfig
from unet_volume.training.weight_volume import compute_weight_volume

# Training in this process: one torch thread unless UNET_VOLUME_TEST_THREADS says otherwise.
pytestmark = pytest.mark.usefixtures("training_threads")

SHAPE = (6, 48, 48)
# Weight map off: by default train computes it on a LocalCluster first (tested on its own).
TINY = {"tile_output": (1, 12, 12), "batch_size": 4, "minutes": None, "weight_map": False}
TINY_NET = {"depth": 2, "base_channels": 4}
NET_FIELDS = {f.name for f in dataclasses.fields(UNetConfig)}


def tiny(**options: Any) -> TrainConfig:
    """The tiny recipe with ``options``; U-Net fields (``depth``, ``ndim``, ...) go to its model."""
    net = {k: options.pop(k) for k in set(options) & NET_FIELDS}
    return TrainConfig(**{**TINY, **options}, model=UNetConfig(**{**TINY_NET, **net}))


def blobs(shape: tuple[int, int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Bright discs on a dark noisy ramp, and their mask (0/255, as ISBI's labels)."""
    rng = np.random.default_rng(seed)
    _, y, x = np.indices(shape)
    mask = np.zeros(shape, dtype=bool)
    for _ in range(12 * shape[0]):
        cz, cy, cx = rng.integers(0, shape[0]), rng.integers(0, shape[1]), rng.integers(0, shape[2])
        mask[cz] |= ((y[cz] - cy) ** 2 + (x[cz] - cx) ** 2) < rng.integers(9, 30)
    image = 40 + 0.5 * x + 120 * mask + rng.normal(0, 15, shape)
    return np.clip(image, 0, 255).astype(np.uint8), (255 * mask).astype(np.uint8)


def write_zarr(path: Path, data: np.ndarray) -> str:
    chunks = (1,) * (data.ndim - 2) + (20, 20)  # odd chunks: tiles straddle them
    array = zarr.create_array(str(path), shape=data.shape, dtype=data.dtype, chunks=chunks)
    array[...] = data
    return str(path)


@pytest.fixture
def volumes(tmp_path: Path) -> tuple[str, str]:
    image, labels = blobs(SHAPE)
    return write_zarr(tmp_path / "image.zarr", image), write_zarr(tmp_path / "labels.zarr", labels)


def test_train_loss_decreases_and_checkpoint_loads(
    volumes: tuple[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "runs" / "model.pt"
    config = tiny(steps=60, learning_rate=1e-2, dropout=0.0)
    report = train(*volumes, out, config)
    # Means over 10 steps each, so one lucky or unlucky batch cannot decide the test.
    first, last = np.mean(report.losses[:10]), np.mean(report.losses[-10:])
    assert report.steps == len(report.losses) == 60
    assert last < 0.7 * first, (first, last)
    assert report.final_loss == pytest.approx(np.mean(report.losses[-20:]))
    assert report.checkpoint == out and out.is_file()
    assert load_model(out).config.base_channels == 4
    checkpoint = read_checkpoint(out)
    metadata = checkpoint.metadata
    # How it saw its input, in one record: the normalisation, and no label offset here.
    assert set(metadata["input"]) == {"mean", "std", "label_offset"}
    assert checkpoint.trained_input.std > 0 and checkpoint.trained_input.label_offset == ()
    assert metadata["classes"] == ["background/membrane", "foreground/interior"]
    assert metadata["training"]["steps"] == 60
    assert metadata["training"]["config"]["tile_output"] == [1, 12, 12]


def test_train_weighs_the_loss_by_the_papers_weight_map_by_default(
    volumes: tuple[str, str], tmp_path: Path, client: Client
) -> None:
    # The paper's recipe is the default: the weight map of the labels, class frequencies from
    # the training slices only, written once beside the checkpoint and found done next time.
    assert TrainConfig().weight_map
    out = tmp_path / "model.pt"
    config = tiny(steps=2, weight_map=True, z_range=(0, 4))
    mapped = train(*volumes, out, config, client=client)
    written = tmp_path / "model.pt.weights.zarr"
    assert read_checkpoint(out).metadata["training"]["weights"] == str(written)
    expected = tmp_path / "expected.zarr"
    compute_weight_volume(
        volumes[1], str(expected), WeightMapConfig(), client=client, balance_z_range=(0, 4)
    )
    np.testing.assert_array_equal(
        zarr.open_group(written)["weights"][...], zarr.open_group(expected)["weights"][...]
    )
    before = snapshot(written)
    again = train(*volumes, out, config, client=client)
    assert snapshot(written) == before  # done: not written again
    assert again.losses == mapped.losses  # the same run, the same map
    balanced = train(*volumes, tmp_path / "b.pt", dataclasses.replace(config, weight_map=False))
    assert balanced.losses[0] != mapped.losses[0]  # the map, not class balance, weighs the loss
    assert not (tmp_path / "b.pt.weights.zarr").exists()


@pytest.mark.parametrize("ndim", [2, 3])
def test_train_channels_last_step_computes_the_same_loss_and_gradients(ndim: int) -> None:
    # Training runs in channels-last, oneDNN's fast layout (12-19% faster steps, measured by
    # benchmarks/train_throughput.py's tile sizes): the same sums in another order, so the
    # same loss and gradients within float32 rounding.
    torch.manual_seed(0)
    net = UNet(base_channels=4, depth=2, ndim=ndim).eval()  # no dropout: the same network
    side = net.tile_geometry(min_output=(1, 12, 12) if ndim == 2 else (12, 12, 12))
    x = torch.randn(2, 1, *side.input_shape[3 - ndim :])
    y = torch.randint(0, 2, (2, *side.output_shape[3 - ndim :]))
    w = torch.rand(y.shape)

    def step(layout: torch.memory_format) -> tuple[float, list[torch.Tensor]]:
        model = copy.deepcopy(net).to(memory_format=layout)
        loss = train_module.weighted_cross_entropy(model(x.to(memory_format=layout)), y, w)
        loss.backward()
        return loss.item(), [p.grad.contiguous() for p in model.parameters()]

    loss, grads = step(torch.contiguous_format)
    fast_loss, fast_grads = step(channels_last(ndim))
    assert fast_loss == pytest.approx(loss, rel=1e-5)
    for grad, fast in zip(grads, fast_grads, strict=True):
        torch.testing.assert_close(fast, grad, rtol=1e-4, atol=1e-6)


def test_train_init_fine_tunes_a_models_network_and_weights_on_new_data(
    volumes: tuple[str, str], tmp_path: Path
) -> None:
    source = tmp_path / "source.pt"
    train(*volumes, source, tiny(steps=3, base_channels=6))
    # The same cells in inverted contrast, as a new volume of another microscope.
    image = zarr.open_array(volumes[0], mode="r")[...]
    inverted = write_zarr(tmp_path / "inverted.zarr", 255 - image)
    out = tmp_path / "tuned.pt"
    # The run's network options (base 4) describe a new network; the model's (base 6) wins.
    # A learning rate of 1e-12 leaves the weights where the run started.
    train(inverted, volumes[1], out, tiny(steps=1, learning_rate=1e-12), init=source)
    start, tuned = read_checkpoint(source), read_checkpoint(out)
    assert tuned.config == start.config and tuned.config.base_channels == 6
    for name, weight in start.state_dict.items():
        torch.testing.assert_close(tuned.state_dict[name], weight, rtol=0, atol=1e-9)
    # This data's normalisation (the same tiles, inverted), and where the weights came from.
    mean = start.trained_input.mean
    assert tuned.trained_input.mean == pytest.approx(255 - mean, rel=1e-6)
    assert tuned.metadata["training"]["init"] == {"checkpoint": str(source), "sha256": start.sha256}


def test_train_init_refuses_a_model_of_other_channels_or_with_resume(
    volumes: tuple[str, str], tmp_path: Path
) -> None:
    source = tmp_path / "source.pt"
    train(*volumes, source, tiny(steps=1))
    two_channels = write_zarr(
        tmp_path / "two.zarr", np.stack([zarr.open_array(volumes[0], mode="r")[...]] * 2)
    )
    before = snapshot(tmp_path)
    with pytest.raises(InputError, match=r"takes 1 channel\(s\), the image has 2"):
        train(two_channels, volumes[1], tmp_path / "out.pt", tiny(steps=1), init=source)
    with pytest.raises(InputError, match="got both --init and --resume"):
        train(*volumes, tmp_path / "out.pt", tiny(steps=1), init=source, resume=source)
    assert snapshot(tmp_path) == before  # refused before anything was written


def test_train_normalization_estimates_the_volume_statistics(
    volumes: tuple[str, str], tmp_path: Path
) -> None:
    train(*volumes, tmp_path / "m.pt", tiny(steps=1))
    norm = read_checkpoint(tmp_path / "m.pt").trained_input
    image = zarr.open_array(volumes[0], mode="r")[...].astype(float)
    # Estimated from 32 sampled (mirrored) tiles, not the whole volume: close, not equal.
    assert norm.mean == pytest.approx(image.mean(), rel=0.1)
    assert norm.std == pytest.approx(image.std(), rel=0.2)


def test_train_same_seed_gives_identical_weights(volumes: tuple[str, str], tmp_path: Path) -> None:
    config = tiny(steps=5)
    a = train(*volumes, tmp_path / "a.pt", config)
    b = train(*volumes, tmp_path / "b.pt", config)
    assert a.losses == b.losses
    wa, wb = load_model(a.checkpoint).state_dict(), load_model(b.checkpoint).state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    c = train(*volumes, tmp_path / "c.pt", tiny(steps=5, seed=1))
    assert c.losses != a.losses


@pytest.mark.parametrize(
    "steps, expected",
    [
        pytest.param(5, [2, 4, 5], id="and-at-the-end"),
        pytest.param(4, [2, 4], id="last-save-not-repeated"),
    ],
)
def test_train_checkpoints_every_n_steps(
    volumes: tuple[str, str],
    tmp_path: Path,
    steps: int,
    expected: list[int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    saved: list[int] = []
    real_save = train_module.save_model

    def spy(model: Any, path: Path, *, metadata: dict[str, Any]) -> Path:
        saved.append(metadata["training"]["steps"])
        return real_save(model, path, metadata=metadata)

    monkeypatch.setattr(train_module, "save_model", spy)
    train(*volumes, tmp_path / "m.pt", tiny(steps=steps, checkpoint_every=2))
    assert saved == expected  # every 2 steps, and at the end
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # atomic: no leftovers


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"augment": "none", "class_balance": False}, id="plain"),
        pytest.param({"batch_norm": True, "dropout": 0.0}, id="batch-norm"),
        pytest.param({"ndim": 3, "depth": 1, "tile_output": (4, 4, 4), "batch_size": 1}, id="3d"),
        pytest.param({"tile_output": (2, 8, 12), "z_range": (1, 5)}, id="non-square-two-slices"),
    ],
)
def test_train_runs_with_options(
    volumes: tuple[str, str], tmp_path: Path, options: dict[str, Any]
) -> None:
    config = tiny(**{"steps": 2, **options})
    report = train(*volumes, tmp_path / "m.pt", config)
    assert report.steps == 2 and np.isfinite(report.final_loss)
    assert load_model(report.checkpoint).config == config.unet_config(in_channels=1)


def test_train_reads_tiff_stacks(tmp_path: Path) -> None:
    image, labels = blobs(SHAPE, seed=3)
    tifffile.imwrite(tmp_path / "image.tif", image)
    tifffile.imwrite(tmp_path / "labels.tif", labels)
    report = train(
        tmp_path / "image.tif",
        tmp_path / "labels.tif",
        tmp_path / "m.pt",
        tiny(steps=3, z_range=(0, 4)),
        progress=True,
    )
    assert report.steps == 3
    assert load_model(tmp_path / "m.pt").config.in_channels == 1


def test_train_multi_channel_image_sets_in_channels(tmp_path: Path) -> None:
    image, labels = blobs(SHAPE)
    stacked = np.stack([image, 255 - image])  # (c, z, y, x)
    report = train(
        write_zarr(tmp_path / "i.zarr", stacked),
        write_zarr(tmp_path / "l.zarr", labels),
        tmp_path / "m.pt",
        tiny(steps=1),
    )
    assert load_model(report.checkpoint).config.in_channels == 2


def test_train_time_budget_stops_the_run(volumes: tuple[str, str], tmp_path: Path) -> None:
    # Time, not steps, ends the run: the loop stops at the first step past the 1.2 s budget.
    report = train(*volumes, tmp_path / "m.pt", tiny(minutes=0.02, steps=10**6))
    assert 1 <= report.steps < 10**6 and report.seconds >= 1.2
    assert read_checkpoint(report.checkpoint).metadata["training"]["steps"] == report.steps


def test_train_tells_every_step_its_share_pace_and_running_loss(
    volumes: tuple[str, str], tmp_path: Path
) -> None:
    heard: list[Progress] = []
    report = train(*volumes, tmp_path / "m.pt", tiny(steps=5), on_progress=heard.append)
    assert [p.done for p in heard] == [1, 2, 3, 4, 5] and {p.total for p in heard} == {5}
    assert [p.fraction for p in heard] == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert heard[-1].detail == f"loss {report.final_loss:.4f}" and "steps/s" in heard[-1].rate
    # Trained for minutes only: no total to count to, the time budget gives the share.
    timed: list[Progress] = []
    train(*volumes, tmp_path / "t.pt", tiny(minutes=0.01, steps=None), on_progress=timed.append)
    assert {p.total for p in timed} == {None} and timed[-1].fraction == 1.0


@pytest.mark.parametrize(
    ("optimizer", "momentum", "state_keys"),
    [
        pytest.param("sgd", 0.99, {"momentum_buffer"}, id="sgd-papers-momentum"),
        pytest.param("adam", None, {"step", "exp_avg", "exp_avg_sq"}, id="adam"),
    ],
)
def test_train_optimizer_state_is_the_chosen_optimizers(
    volumes: tuple[str, str],
    tmp_path: Path,
    optimizer: str,
    momentum: float | None,
    state_keys: set[str],
) -> None:
    report = train(*volumes, tmp_path / "m.pt", tiny(steps=2, optimizer=optimizer))
    state = torch.load(tmp_path / "m.pt.state.pt", weights_only=True)["optimizer"]
    assert state["param_groups"][0].get("momentum") == momentum
    assert all(set(s) == state_keys for s in state["state"].values())
    if optimizer == "sgd":  # momentum accumulated: the buffers are the gradients' running sum
        assert all(s["momentum_buffer"].abs().sum() > 0 for s in state["state"].values())
    assert report.steps == 2


def test_train_resumed_run_goes_on_with_its_optimizer_state_and_clock(
    volumes: tuple[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "m.pt"
    first = train(*volumes, out, tiny(steps=4))
    clock = resumed(out, tiny(steps=8))["state"]["seconds"]
    assert clock == pytest.approx(first.seconds, abs=1e-3)  # as the checkpoint records it
    report = train(*volumes, out, tiny(steps=8), resume=out)
    state = torch.load(tmp_path / "m.pt.state.pt", weights_only=True)["optimizer"]
    assert {int(s["step"]) for s in state["state"].values()} == {8}  # Adam counted all 8
    assert report.seconds > first.seconds  # the clock went on: steps/s is the whole run's
    assert report.steps == 8 and read_checkpoint(out).metadata["training"]["steps"] == 8


def is_flip_or_turn(moved: np.ndarray, original: np.ndarray) -> bool:
    """Whether ``moved`` (y, x) is one of the 8 flips and quarter turns of ``original``."""
    turns = [np.rot90(original, k) for k in range(4)]
    return any(np.array_equal(moved, t) for t in turns + [np.fliplr(t) for t in turns])


@pytest.mark.parametrize(
    ("augment", "warped"),
    [
        pytest.param("plain", False, id="plain-only-flips-and-turns"),
        pytest.param("paper", True, id="paper-deforms-and-rotates"),
    ],
)
def test_train_augmentation_transforms_the_tiles(
    volumes: tuple[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    augment: str,
    warped: bool,
) -> None:
    seen: list[tuple[TrainingTile, TrainingTile]] = []
    real_augment = tile_stream.augment_tile

    def spy(tile: TrainingTile, config: AugmentConfig, rng: Any, *, ndim: int) -> TrainingTile:
        seen.append((tile, real_augment(tile, config, rng, ndim=ndim)))
        return seen[-1][1]

    monkeypatch.setattr(tile_stream, "augment_tile", spy)
    train(*volumes, tmp_path / "m.pt", tiny(steps=2, augment=augment))
    # The paper's warp reads an apron around each tile (3 std of 10 px, plus a turn's corners).
    assert all((p.apron[1] > 0) == warped for p, _ in seen)
    flips_or_turns = []
    for tile, moved in seen:
        _, cy, cx = tile.apron
        centre = tile.labels[0, cy : tile.labels.shape[1] - cy, cx : tile.labels.shape[2] - cx]
        flips_or_turns.append(is_flip_or_turn(moved.labels[0], centre))
    assert len(seen) >= 8  # 2 steps of 4 tiles (and the batch drawn when the run ends)
    assert all(flips_or_turns) == (not warped)


# --- bad input: one InputError naming the value and the fix, and no checkpoint ------------------


def test_train_rejects_mismatched_shapes(tmp_path: Path) -> None:
    image, labels = blobs(SHAPE)
    with pytest.raises(InputError, match=r"shape \(6, 48, 48\).*\(6, 48, 40\).*same"):
        train(
            write_zarr(tmp_path / "i.zarr", image),
            write_zarr(tmp_path / "l.zarr", labels[..., :40]),
            tmp_path / "out" / "m.pt",
            tiny(steps=1),
        )
    assert not (tmp_path / "out").exists()


def test_train_rejects_labels_outside_the_classes(tmp_path: Path) -> None:
    image, labels = blobs(SHAPE)
    labels = (labels > 0).astype(np.uint8) * 3  # values 0 and 3; 3 classes are 0, 1, 2
    with pytest.raises(InputError, match=r"value 3.*\[0, 3\).*num_classes=4"):
        train(
            write_zarr(tmp_path / "i.zarr", image),
            write_zarr(tmp_path / "l.zarr", labels),
            tmp_path / "out" / "m.pt",
            tiny(steps=1, num_classes=3),
        )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "options, message",
    [
        pytest.param(
            {"tile_output": (1, 10, 10)}, r"\(1, 10, 10\).*\(1, 12, 12\)", id="invalid-tile"
        ),
        pytest.param({"optimizer": "rmsprop"}, "'rmsprop'.*'adam' or 'sgd'", id="optimizer"),
        pytest.param({"z_range": (3, 3)}, r"z_range 3:3 is not a non-empty", id="empty-z-range"),
        pytest.param({"batch_size": 0}, "batch_size.*>= 1", id="batch-size"),
        pytest.param({"num_classes": 1}, "num_classes.*>= 2", id="one-class"),
        pytest.param({"seed": -1}, "seed must be an int >= 0", id="negative-seed"),
        pytest.param(
            {"label_offset": (0.6, 2.0)}, r"label offset .* in \[-1, 1\] per axis", id="offset"
        ),
        pytest.param(
            {"label_offset": (0.1, 0.6, 0.2)}, r"has 3 axes; a 2D net.*pass y,x$", id="offset-z"
        ),
    ],
)
def test_train_config_rejects_bad_values(options: dict[str, Any], message: str) -> None:
    with pytest.raises(InputError, match=message):
        tiny(**{"steps": 1, **options})


@pytest.mark.parametrize(
    "options, message",
    [
        pytest.param(
            {"z_range": (0, 9)},
            r"z range 0:9 is not a non-empty part of the volume.s 6 slices",
            id="z-range-past-volume",
        ),
        pytest.param(
            {"tile_output": (1, 52, 52)}, r"smaller than one tile output", id="tile-too-big"
        ),
    ],
)
def test_train_rejects_regions_that_do_not_fit(
    volumes: tuple[str, str], tmp_path: Path, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(InputError, match=message):
        train(*volumes, tmp_path / "out" / "m.pt", tiny(**{"steps": 1, **options}))
    assert not (tmp_path / "out").exists()


# --- the sampler: lazy tiles, inside the z range, halo'd image boxes ----------------------------


def test_sampler_reads_output_boxes_in_z_range_and_input_boxes_grown_by_the_halo(
    volumes: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[Box] = []
    real_read = sampling_module.read_box

    def spy(array: Any, box: Box) -> np.ndarray:
        reads.append(box)
        return real_read(array, box)

    monkeypatch.setattr(sampling_module, "read_box", spy)
    config = tiny(steps=1, z_range=(2, 5))
    geometry = config.geometry()  # output (1, 12, 12), input (1, 52, 52): halo (0, 20, 20)
    sampler = TileSampler(TrainingData.open(*volumes, z_range=(2, 5)), geometry, num_classes=2)
    rng = np.random.default_rng(0)
    for _ in range(50):
        tile = sampler.sample(rng)
        assert tile.image.shape == (1, 1, 52, 52) and tile.labels.shape == (1, 12, 12)
    sampler.close()
    image_boxes, label_boxes = reads[0::2], reads[1::2]
    assert all(Box((2, 0, 0), (5, 48, 48)).contains(b) for b in label_boxes)
    assert {b.begin[0] for b in label_boxes} == {2, 3, 4}
    assert all(i == o.grow((0, 20, 20)) for i, o in zip(image_boxes, label_boxes))


def test_sampler_tile_is_the_mirrored_volume_at_its_box(volumes: tuple[str, str]) -> None:
    image = zarr.open_array(volumes[0], mode="r")[...]
    labels = zarr.open_array(volumes[1], mode="r")[...]
    geometry = tiny(steps=1).geometry()
    sampler = TileSampler(TrainingData.open(*volumes), geometry, num_classes=2)
    tile = sampler.read(Box((3, 0, 36), (4, 12, 48)))  # touches two borders
    got_image, got_labels = tile.image, tile.labels
    sampler.close()
    padded = np.pad(image, ((0, 0), (20, 20), (20, 20)), mode="reflect")
    np.testing.assert_array_equal(got_image[0], padded[3:4, 0:52, 36:88])
    np.testing.assert_array_equal(got_labels, labels[3:4, 0:12, 36:48] > 0)


# --- the pieces ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape", [pytest.param((1, 1, 9, 9), id="square"), pytest.param((1, 1, 6, 9), id="non-square")]
)
def test_augment_tile_moves_image_and_labels_together(shape: tuple[int, ...]) -> None:
    image = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    labels = image[0].astype(np.int64)  # labels are a copy of the image: any mismatch shows
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(64):
        moved = augment_tile(
            TrainingTile(image, labels, labels.astype(np.float32)),
            AugmentConfig.plain(),
            rng,
            ndim=2,
        )
        new_image, new_labels = moved.image, moved.labels
        np.testing.assert_array_equal(new_image[0], new_labels)
        np.testing.assert_array_equal(moved.weights, new_labels)
        assert new_image.shape == image.shape  # batches keep one shape
        seen.add(new_image.tobytes())
    assert len(seen) == (
        8 if shape[-1] == shape[-2] else 4
    )  # the dihedral group, or its shape-keeping half


def test_to_classes_binary_treats_any_nonzero_as_class_1() -> None:
    assert to_classes(np.array([0, 1, 255, 7]), 2).tolist() == [0, 1, 1, 1]
    assert to_classes(np.array([0, 1, 2]), 3).tolist() == [0, 1, 2]
    with pytest.raises(InputError, match=r"value 1\.5"):
        to_classes(np.array([0.0, 1.5]), 3)


def test_class_weights_balance_the_classes() -> None:
    counts = np.array([100, 300, 0])
    weights = class_weights(counts)
    # 1 / (3 * 0.25) = 4/3 and 1 / (3 * 0.75) = 4/9: both classes then weigh 1/3 in total.
    np.testing.assert_allclose(weights, [4 / 3, 4 / 9, 1.0])
    assert weights[0] * 100 == pytest.approx(weights[1] * 300)


# --- issue 3: masks, weight maps, validation, resume, the weighted loss ------------------------


def test_weighted_cross_entropy_ignores_zero_weight_voxels_and_equals_ce_at_unit_weight() -> None:
    import torch.nn.functional as F

    from unet_volume.training.loop import weighted_cross_entropy

    torch.manual_seed(0)
    logits, target = torch.randn(2, 2, 5, 5), torch.randint(0, 2, (2, 5, 5))
    ones = torch.ones(2, 5, 5)
    assert torch.allclose(
        weighted_cross_entropy(logits, target, ones), F.cross_entropy(logits, target)
    )
    masked = ones.clone()
    masked[:, :, 3:] = 0  # unannotated: whatever the target says there must not matter
    flipped = target.clone()
    flipped[:, :, 3:] = 1 - flipped[:, :, 3:]
    assert weighted_cross_entropy(logits, target, masked) == weighted_cross_entropy(
        logits, flipped, masked
    )


def test_sampler_mask_zeroes_weights_and_weight_volume_is_read(
    volumes: tuple[str, str], tmp_path: Path
) -> None:
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[:, :24] = 1  # only the top half is annotated
    weights = np.full(SHAPE, 3.0, dtype=np.float32)
    data = TrainingData.open(
        *volumes,
        weights=write_zarr(tmp_path / "w.zarr", weights),
        mask=write_zarr(tmp_path / "m.zarr", mask),
    )
    sampler = TileSampler(data, tiny(steps=1).geometry(), num_classes=2)
    tile = sampler.read(Box((0, 18, 0), (1, 30, 12)))  # rows 18..29: 6 annotated, 6 not
    sampler.close()
    assert tile.weights[0, :6].tolist() == [[3.0] * 12] * 6 and not tile.weights[0, 6:].any()


def test_train_validates_saves_state_and_curve_then_resumes(
    volumes: tuple[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "m.pt"
    config = tiny(
        steps=4, validate_every=2, validation_z_range=(4, 6), z_range=(0, 4), checkpoint_every=4
    )
    first = train(*volumes, out, config)
    assert [v["step"] for v in first.curve.validation] == [2.0, 4.0]
    assert 0 <= first.curve.validation[-1]["pixel_error"] <= 1
    assert read_checkpoint(out).metadata["training"]["validation"]["step"] == 4.0
    assert (tmp_path / "m.pt.state.pt").exists()
    assert (tmp_path / "m.pt.curve.png").read_bytes()[:4] == b"\x89PNG"
    normalization = read_checkpoint(out).trained_input
    resumed = train(*volumes, out, dataclasses.replace(config, steps=6), resume=out)
    assert resumed.steps == 6 and resumed.losses[:4] == first.losses  # the curve goes on
    assert read_checkpoint(out).trained_input == normalization  # kept, not re-estimated


def test_train_resume_refuses_a_different_architecture(
    volumes: tuple[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "m.pt"
    train(*volumes, out, tiny(steps=1))
    with pytest.raises(InputError, match=r"another network.*depth 2 \(checkpoint\) vs 1 \(run\)"):
        train(
            *volumes,
            tmp_path / "n.pt",
            tiny(depth=1, tile_output=(1, 4, 4), steps=1),
            resume=out,
        )
    assert not (tmp_path / "n.pt").exists()


def test_train_reads_and_augments_in_dataloader_workers(
    volumes: tuple[str, str], tmp_path: Path
) -> None:
    report = train(*volumes, tmp_path / "m.pt", tiny(steps=3, loader_workers=1))
    assert report.steps == 3 and np.isfinite(report.final_loss)


def first_batches(
    volumes: tuple[str, str], workers: int, seed: int = 0, start: int = 0
) -> list[torch.Tensor]:
    """The labels of the first 4 batches of 2 tiles that ``workers`` loader processes yield,
    in a run that has done ``start`` steps."""
    config = tiny(steps=1, seed=seed, augment="paper")
    sampler = TileSampler(TrainingData.open(*volumes), config.geometry(), num_classes=2)
    stream = TileStream(sampler, config, (0.0, 1.0), np.ones(2), start)
    loader = DataLoader(stream, batch_size=2, num_workers=workers)
    batches = [labels for (_, labels, _), _ in zip(loader, range(4))]
    sampler.close()
    return batches


def test_tile_stream_seeds_each_loader_worker_reproducibly(volumes: tuple[str, str]) -> None:
    # Generator of worker i: (seed, i + 1); in process: (seed, 0). Batches alternate workers.
    first, again = first_batches(volumes, workers=2), first_batches(volumes, workers=2)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], first[1])  # worker 0 and worker 1 draw different tiles
    in_process = first_batches(volumes, workers=0)
    assert not torch.equal(first[0], in_process[0])
    other_seed = first_batches(volumes, workers=2, seed=1)
    assert not any(torch.equal(a, b) for a, b in zip(first, other_seed))
    resumed = first_batches(volumes, workers=0, start=4)  # a resumed run draws anew
    again = first_batches(volumes, workers=0, start=4)
    assert all(torch.equal(a, b) for a, b in zip(resumed, again, strict=True))
    assert not any(torch.equal(a, b) for a, b in zip(in_process, resumed))
