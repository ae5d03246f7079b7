"""The GPU pipeline's bookkeeping, run on a CPU: tiles batched per pass, autocast, identity.

The CUDA-only parts (pinned memory, the device lock, cudnn.benchmark, free-memory batch sizing)
run in ``benchmarks/gpu_throughput.py`` on a lent GPU; everything that can run here does.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from distributed import Client
from test_predict import run_blocks

from unet_volume.errors import InputError, OutputExistsError
from unet_volume.models.checkpoint import checkpoint_bytes
from unet_volume.models.unet import UNet
from unet_volume.output.lifecycle import run_info
from unet_volume.output.prediction import (
    OUTPUT_DTYPES,
    encode_probabilities,
    most_probable,
    segment,
)
from unet_volume.prediction.model_predictor import ModelPredictor, _segment
from unet_volume.prediction.run import predict_volume
from unet_volume.testing import blob_volume, integer_unet, write_zarr
from unet_volume.tiling import TileGeometry


def exact_predictor(ndim: int, tiles_per_pass: int | None = None) -> ModelPredictor:
    """Integer weights, float64, logits: every sum exact, so batching cannot change a bit."""
    net = integer_unet(ndim=ndim, depth=2)
    return ModelPredictor(
        checkpoint_bytes(net), dtype="float64", output="logits", tiles_per_pass=tiles_per_pass
    )


@pytest.mark.parametrize("ndim", [2, 3])
def test_gpu_pipeline_a_tile_in_a_batch_gets_what_it_gets_alone(ndim: int) -> None:
    predictor = exact_predictor(ndim)
    shape = (2, 44, 44) if ndim == 2 else (44, 44, 44)
    rng = np.random.default_rng(0)
    tiles = [rng.integers(0, 4, (1, *shape)).astype(np.float64) for _ in range(3)]
    together = predictor.predict_many(tiles)
    for tile, batched in zip(tiles, together):
        np.testing.assert_array_equal(batched, predictor(tile))
    # Depth 2: 40 voxels of context per convolved axis; a 2D net keeps z (its batch).
    assert together[0].shape == ((2, 2, 4, 4) if ndim == 2 else (2, 4, 4, 4))


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("tta", [False, True])
def test_gpu_pipeline_encoded_where_the_net_ran_is_bit_for_bit_the_numpy_encoding(
    ndim: int, tta: bool
) -> None:
    """The segmentation and stored probabilities torch makes (on a GPU: there) are those that
    segment() and encode_probabilities() make from the same float32 probabilities."""
    torch.manual_seed(ndim)
    net = UNet(in_channels=1, base_channels=4, depth=1, ndim=ndim, num_classes=3)
    predictor = ModelPredictor(checkpoint_bytes(net), tta=tta)
    shape = (2, 44, 44) if ndim == 2 else (20, 20, 20)
    rng = np.random.default_rng(ndim)
    tiles = [rng.normal(size=(1, *shape)).astype(np.float32) for _ in range(2)]
    floats = predictor.predict_many(tiles)
    for dtype, threshold in itertools.product(OUTPUT_DTYPES, (None, 0.3)):
        encoded = predictor.predict_encoded(tiles, dtype, threshold)
        for (labels, stored), probs in zip(encoded, floats, strict=True):
            np.testing.assert_array_equal(labels, segment(probs, threshold))
            expected = encode_probabilities(probs, dtype)
            assert stored.dtype == expected.dtype and stored.shape == expected.shape
            np.testing.assert_array_equal(stored.view(np.uint8), expected.view(np.uint8))


def test_gpu_pipeline_the_torch_argmax_lets_the_first_class_win_ties() -> None:
    probs = torch.tensor([[[0.5, 0.2, 0.4]], [[0.5, 0.8, 0.4]], [[0.0, 0.0, 0.2]]]).permute(1, 0, 2)
    assert _segment(probs, None).tolist() == most_probable(probs.permute(1, 0, 2).numpy()).tolist()


@pytest.mark.parametrize("tiles_per_pass", [2, 5])
def test_gpu_pipeline_batched_tiles_stitch_exactly_as_one_at_a_time(
    client: Client, tmp_path: Path, tiles_per_pass: int
) -> None:
    data = np.random.default_rng(1).integers(0, 4, (3, 45, 53)).astype(np.float32)
    geometry = TileGeometry.for_unet(2, 2, min_output=(1, 8, 12))  # several tiles a block
    one = exact_predictor(2, tiles_per_pass=1)
    many = exact_predictor(2, tiles_per_pass=tiles_per_pass)
    _, alone = run_blocks(client, tmp_path / "one", one, geometry, data, (1, 16, 24))
    _, batched = run_blocks(client, tmp_path / "many", many, geometry, data, (1, 16, 24))
    np.testing.assert_array_equal(batched, alone)


def test_gpu_pipeline_batch_size_is_one_tile_on_a_cpu_unless_given() -> None:
    assert exact_predictor(2).batch_size((1, 44, 44)) == 1
    assert exact_predictor(2, tiles_per_pass=7).batch_size((1, 44, 44)) == 7


def test_gpu_pipeline_bfloat16_autocast_stays_close_to_float32() -> None:
    net = UNet(in_channels=1, base_channels=8, depth=2, ndim=2, dropout=0.0).eval()
    blobs = blob_volume((2, 92, 92)).astype(np.float32)
    tile = ((blobs - blobs.mean()) / blobs.std())[None]  # normalised, as a trained net sees it
    full = ModelPredictor(checkpoint_bytes(net))(tile)
    half = ModelPredictor(checkpoint_bytes(net), precision="bfloat16")(tile)
    assert half.dtype == np.float32 and half.shape == full.shape
    # bfloat16 keeps 8 bits of mantissa: probabilities move by ~1e-2 (0.008 here), not by 0.5.
    assert 0 < np.abs(half - full).max() < 0.05


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"precision": "float8"}, "precision 'float8' is not one of"),
        ({"precision": "bfloat16", "dtype": "float64"}, "over a float32 network"),
        ({"tiles_per_pass": 0}, "tiles per pass 0 must be at least 1"),
    ],
)
def test_gpu_pipeline_bad_predictor_options_are_refused(options: dict, match: str) -> None:
    with pytest.raises(InputError, match=match):
        ModelPredictor(checkpoint_bytes(integer_unet()), **options)


def test_gpu_pipeline_precision_is_part_of_the_run_identity(client: Client, tmp_path: Path) -> None:
    image = write_zarr(tmp_path / "in.zarr", blob_volume((2, 32, 32)))
    net = UNet(in_channels=1, base_channels=4, depth=2, ndim=2, dropout=0.0)
    output = tmp_path / "out.zarr"
    predict_volume(net, image, output, client=client, precision="bfloat16", block_shape=(1, 16, 16))
    info = run_info(str(output))
    assert info is not None and info["identity"]["precision"] == "bfloat16"
    with pytest.raises(OutputExistsError, match=r"precision: bfloat16, now float32"):
        predict_volume(net, image, output, client=client, block_shape=(1, 16, 16))


def test_gpu_pipeline_the_gpu_benchmark_runs_its_smoke_test_on_a_cpu(tmp_path: Path) -> None:
    # The script a lent GPU runs once: it must not be the first to find its own bugs there.
    script = Path(__file__).parents[1] / "benchmarks" / "gpu_throughput.py"
    done = subprocess.run(
        [sys.executable, str(script), "--smoke", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if "engine / bare" in line]
    assert len(lines) == 2  # float32 and bfloat16 of the smoke net
    assert all("Mvoxel/s" in line for line in lines)
