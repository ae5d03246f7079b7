"""Training tiles as a stream of tensors: augmented, normalised and weighted, per loader worker.

:class:`TileStream` is what training's ``DataLoader`` iterates: each worker process draws its
own reproducible tiles from a :class:`~unet_volume.training.sampling.TileSampler`, augments image
and
targets together (:func:`augment_tile`), normalises the image and folds the class weights into
the per-voxel loss weights. :func:`estimate_statistics` samples the normalisation and class
frequencies once, before training.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from unet_volume.training.augment import AugmentConfig, augment
from unet_volume.training.config import TrainConfig
from unet_volume.training.sampling import TileSampler, TrainingTile

STATISTICS_TILES = 32  # tiles sampled once up front for normalisation and class frequencies


def augment_tile(
    tile: TrainingTile, config: AugmentConfig, rng: np.random.Generator, *, ndim: int
) -> TrainingTile:
    """One random transform of the tile's image, labels and weights alike, cropped to the tile."""
    image, targets = augment(
        tile.image,
        {"labels": tile.labels, "weights": tile.weights},
        config,
        rng,
        ndim=ndim,
        apron=tile.apron,
    )
    return TrainingTile(image, targets["labels"], targets["weights"])


class TileStream(IterableDataset[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    """An endless stream of augmented, normalised tiles: ``(image, labels, weights)`` tensors.

    Each DataLoader worker draws from its own generator, seeded by (seed, worker id),
    so runs are reproducible for a given number of workers. A stream that resumes a run after
    ``start`` steps adds them to the seed: it draws new tiles, not the run's first ones again.
    """

    def __init__(
        self,
        sampler: TileSampler,
        config: TrainConfig,
        normalization: tuple[float, float],
        class_weights: np.ndarray,
        start: int = 0,
    ) -> None:
        self.sampler, self.config, self.start = sampler, config, start
        self.mean, self.std = normalization
        self.class_weights = class_weights.astype(np.float32)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        seed = [self.config.seed, 0 if info is None else info.id + 1]
        rng = np.random.default_rng([*seed, self.start] if self.start else seed)
        recipe = self.config.augmentation()  # once per stream, not per tile
        while True:
            tile = augment_tile(self.sampler.sample(rng), recipe, rng, ndim=self.config.model.ndim)
            weights = tile.weights
            if self.sampler.data.weights is None:  # no weight map: balance classes per voxel
                weights = weights * self.class_weights[tile.labels]
            image = (tile.image - self.mean) / self.std
            yield torch.from_numpy(image), torch.from_numpy(tile.labels), torch.from_numpy(weights)


def to_batch(
    x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, ndim: int
) -> tuple[torch.Tensor, ...]:
    """Collated tiles ``(b, c, z, y, x)`` -> network batches; 2D nets take slices as batch items."""
    if ndim == 2:
        return x.permute(0, 2, 1, 3, 4).flatten(0, 1), y.flatten(0, 1), w.flatten(0, 1)
    return x, y, w


def estimate_statistics(
    sampler: TileSampler, rng: np.random.Generator, *, tiles: int = STATISTICS_TILES
) -> tuple[float, float, np.ndarray]:
    """Image mean and std and per-class voxel counts (annotated voxels), from random tiles.

    Also checks the labels of those tiles before any training.
    """
    sums = np.zeros(3)  # voxels, sum, sum of squares
    counts = np.zeros(sampler.num_classes, dtype=np.int64)
    for _ in range(tiles):
        tile = sampler.sample(rng)
        x = tile.image.astype(np.float64)
        sums += (x.size, x.sum(), np.square(x).sum())
        counts += np.bincount(tile.labels[tile.weights > 0], minlength=sampler.num_classes)
    mean = float(sums[1] / sums[0])
    std = math.sqrt(max(sums[2] / sums[0] - mean * mean, 0.0))
    return mean, std if std > 1e-6 else 1.0, counts


def class_weights(counts: np.ndarray) -> np.ndarray:
    """Inverse class frequency, scaled so a balanced class gets 1; absent classes get 1.

    >>> class_weights(np.array([25, 75])).tolist()
    [2.0, 0.6666666666666666]
    """
    frequency = counts / max(int(counts.sum()), 1)
    safe = np.where(counts > 0, frequency, 1.0)
    return np.asarray(np.where(counts > 0, 1.0 / (len(counts) * safe), 1.0), dtype=np.float64)
