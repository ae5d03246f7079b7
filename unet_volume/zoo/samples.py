"""A package's test tensors: an input and the class probabilities it must give.

The input is raw intensities as the training data had them (the package's preprocessing
normalises them): the centre of an image the user passes, else smooth synthetic noise at the
trained mean and std. The same two tensors are also written as TIFF, the spec's sample images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
import torch
from torch import nn

from unet_volume.errors import InputError
from unet_volume.geometry import Box
from unet_volume.io.volumes import open_volume
from unet_volume.models.checkpoint import Checkpoint
from unet_volume.models.unet import UNet

TEST_OUTPUT = {2: 64, 3: 12}
"""Output voxels per spatial axis of the test tensors: a few periods, seconds on a CPU."""


def raw_test_input(net: UNet, checkpoint: Checkpoint, sample: str | None) -> np.ndarray:
    """``(1, c, [z,] y, x)`` raw intensities (before normalisation), float32."""
    ndim, channels = checkpoint.config.ndim, checkpoint.config.in_channels
    shape = net.input_shape_for((TEST_OUTPUT[ndim],) * ndim)
    if sample is None:
        trained = checkpoint.trained_input
        image = trained.mean + trained.std * _smooth_noise((channels, *shape))
    else:
        image = _cut(sample, shape, channels)
    return image[np.newaxis].astype(np.float32)


def _smooth_noise(shape: tuple[int, ...]) -> np.ndarray:
    """Unit-variance noise smoothed over a few voxels: edges and blobs for a net to answer."""
    from scipy.ndimage import gaussian_filter

    noise = gaussian_filter(
        np.random.default_rng(0).standard_normal(shape), (0, *[2] * (len(shape) - 1))
    )
    return (noise - noise.mean()) / noise.std()


def _cut(sample: str, shape: tuple[int, ...], channels: int) -> np.ndarray:
    """The centre of ``sample`` as large as ``shape`` (mirrored where the image is smaller)."""
    volume = open_volume(sample)
    if volume.channels != channels:
        raise InputError(
            f"{sample} has {volume.channels} channels but the net takes {channels}; "
            "pass an image like its training data"
        )
    full = (1, *shape) if len(shape) == 2 else shape
    begin = [(n - s) // 2 for n, s in zip(volume.shape, full)]
    data = volume.read(Box.from_shape(full, begin=begin)).astype(np.float32)
    return data[:, 0] if len(shape) == 2 else data


def normalized(checkpoint: Checkpoint, raw: np.ndarray) -> torch.Tensor:
    """``raw`` as the net was trained to see it, as the package's preprocessing makes it."""
    trained = checkpoint.trained_input
    return torch.from_numpy((raw - np.float32(trained.mean)) / np.float32(trained.std))


def write_test_tensors(
    work: Path, plain: nn.Module, checkpoint: Checkpoint, raw: np.ndarray
) -> np.ndarray:
    """The test input and the probabilities the package must give for it, into ``work``."""
    with torch.inference_mode():
        logits = plain(normalized(checkpoint, raw))
    expected = np.asarray(logits.float().softmax(1).numpy(), dtype=np.float32)
    np.save(work / "test_input.npy", raw)
    np.save(work / "test_output.npy", expected)
    # The same as images a person can open (the spec's sample tensors; imageio reads TIFF).
    tifffile.imwrite(work / "sample_input.tif", raw[0])
    tifffile.imwrite(work / "sample_output.tif", expected[0])
    return expected
