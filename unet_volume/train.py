"""Training: random tiles of a volume, class-balanced soft-max cross entropy, periodic checkpoints.

The basic recipe that worked best on a short CPU budget (measured on 2-core machines):
random flips and 90-degree rotations, cross entropy weighted by inverse class frequency, Adam.
The paper's border weight maps and elastic deformations are left to a later issue.

Inputs are never loaded whole. Each training tile is drawn lazily: a random output box
inside the volume (restricted to ``z_range``), the label voxels of that box, and the image
voxels of the box grown by the network's halo (mirrored at the volume border, as prediction
does), so a model sees at training time exactly the context it sees when tiles are stitched::

    image read box   [------[-------------)------)    = output box grown by the halo
    label box               [-------------)            = the tile's output box

Label convention: with ``num_classes=2`` any nonzero label is class 1 (so 0/255 masks work;
for ISBI 2012 class 0 is membrane and class 1 cell interior); with more classes labels are
class indices and must lie in ``[0, num_classes)``.

Usage::

    report = train("image.zarr", "labels.zarr", "model.pt", TrainConfig(minutes=3, z_range=(0, 20)))
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from contextlib import ExitStack, closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from unet_volume.checkpoint import save_model
from unet_volume.errors import InputError
from unet_volume.geometry import Box
from unet_volume.model import UNet
from unet_volume.storage import ArrayLike, Volume, open_volume, opened_array, read_box
from unet_volume.tiling import TileGeometry

log = logging.getLogger(__name__)

DEFAULT_LEARNING_RATE = {"adam": 1e-3, "sgd": 1e-2}  # SGD runs with the paper's momentum 0.99
STATISTICS_PATCHES = 32  # tiles sampled once up front for normalisation and class frequencies
LOG_EVERY = 20  # steps between loss log lines; ``final_loss`` averages this many last steps
BINARY_CLASSES = ["background/membrane", "foreground/interior"]


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class TrainConfig:
    """One training run's recipe; stored in the checkpoint's ``training`` metadata.

    ``tile_output`` is the (z, y, x) output of one training tile (its input follows from the
    net's geometry); a 2D net takes the tile's z slices as extra batch items. Training stops
    after ``steps`` or ``minutes`` (of training, after a second or two of set-up), whichever
    comes first. ``learning_rate=None`` means the optimizer's default (Adam 1e-3, SGD 1e-2).
    """

    base_channels: int = 16
    depth: int = 4
    ndim: int = 2
    num_classes: int = 2
    tile_output: tuple[int, int, int] = (1, 132, 132)
    batch_size: int = 4
    optimizer: Literal["adam", "sgd"] = "adam"
    learning_rate: float | None = None
    steps: int | None = None
    minutes: float | None = 3.0
    z_range: tuple[int, int] | None = None
    class_balance: bool = True
    augment: bool = True
    checkpoint_every: int = 200
    seed: int = 0
    dropout: float = 0.5

    def __post_init__(self) -> None:
        # Everything checked here, once, so a bad value fails before any data is read.
        for name, low in (("base_channels", 1), ("depth", 1), ("batch_size", 1), ("checkpoint_every", 1),
                          ("seed", 0)):
            if not (_is_number(value := getattr(self, name)) and isinstance(value, int) and value >= low):
                raise InputError(f"{name} must be an int >= {low}, got {value!r}")
        if self.ndim not in (2, 3):
            raise InputError(f"ndim must be 2 or 3, got {self.ndim!r}; pass ndim=2 (slices) or 3")
        if not _positive_int(self.num_classes) or self.num_classes < 2:
            raise InputError(f"num_classes must be an int >= 2, got {self.num_classes!r}; pass 2 for binary")
        if self.optimizer not in DEFAULT_LEARNING_RATE:
            raise InputError(f"optimizer {self.optimizer!r} is unknown; pass 'adam' or 'sgd'")
        if self.learning_rate is not None and not (_is_number(self.learning_rate) and self.learning_rate > 0):
            raise InputError(f"learning_rate must be > 0, got {self.learning_rate!r}; e.g. 1e-3")
        if not (_is_number(self.dropout) and 0 <= self.dropout < 1):
            raise InputError(f"dropout must be in [0, 1), got {self.dropout!r}; pass 0.5 or 0")
        self._check_stopping()
        object.__setattr__(self, "tile_output", self._checked_tile_output())
        object.__setattr__(self, "z_range", self._checked_z_range())

    def _check_stopping(self) -> None:
        if self.steps is None and self.minutes is None:
            raise InputError("no stopping criterion: steps and minutes are both None; "
                             "pass steps=1000 or minutes=3")
        if self.steps is not None and not _positive_int(self.steps):
            raise InputError(f"steps must be an int >= 1 or None, got {self.steps!r}")
        if self.minutes is not None and not (_is_number(self.minutes) and self.minutes > 0):
            raise InputError(f"minutes must be > 0 or None, got {self.minutes!r}; e.g. minutes=3")

    def _checked_tile_output(self) -> tuple[int, int, int]:
        shape = tuple(self.tile_output)
        if len(shape) != 3 or not all(_positive_int(s) for s in shape):
            raise InputError(f"tile_output {shape} must be 3 positive ints (z, y, x), e.g. (1, 132, 132)")
        geometry = self.geometry()
        if geometry.output_shape != shape:
            raise InputError(f"tile_output {shape} is not a valid output of a {self.ndim}D depth-{self.depth} "
                             f"U-Net; the nearest valid one above is {geometry.output_shape}: pass that")
        return shape

    def _checked_z_range(self) -> tuple[int, int] | None:
        if self.z_range is None:
            return None
        z = tuple(self.z_range)
        if len(z) != 2 or not all(isinstance(v, int) for v in z) or not 0 <= z[0] < z[1]:
            raise InputError(f"z_range {z} must be (begin, end) with 0 <= begin < end, e.g. (0, 20)")
        return z

    def geometry(self) -> TileGeometry:
        """The training tile: the smallest valid tile whose output covers ``tile_output``."""
        return TileGeometry.for_unet(self.ndim, self.depth, min_output=tuple(self.tile_output))

    def resolved_learning_rate(self) -> float:
        return float(self.learning_rate or DEFAULT_LEARNING_RATE[self.optimizer])

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (tuples become lists) for the checkpoint's metadata."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclass
class TrainReport:
    """What a run did. ``final_loss`` is the mean of the last ``LOG_EVERY`` steps' losses."""

    steps: int
    seconds: float
    final_loss: float
    checkpoint: Path
    losses: list[float] = field(repr=False)

    @property
    def steps_per_second(self) -> float:
        return self.steps / self.seconds if self.seconds > 0 else 0.0


class PatchSampler:
    """Draws random training tiles from an image and a label volume, reading only those tiles.

    Output boxes lie wholly inside ``sample_box`` (the volume, cut to the z range); image read
    boxes are them grown by the halo. Arrays stay open (a TIFF parsed once) until :meth:`close`.
    """

    def __init__(self, image: Volume, labels: Volume, geometry: TileGeometry, *, num_classes: int,
                 z_range: tuple[int, int] | None = None) -> None:
        z0, z1 = z_range if z_range is not None else (0, image.shape[0])
        self.sample_box = Box((z0, 0, 0), (z1, *image.shape[1:]))
        check_volumes(image, labels, geometry, self.sample_box)
        self.geometry, self.num_classes = geometry, num_classes
        self.image_url, self.labels_url = image.url, labels.url
        self._open = ExitStack()
        self._image: ArrayLike = self._open.enter_context(opened_array(image.url, image.kind))
        self._labels: ArrayLike = self._open.enter_context(opened_array(labels.url, labels.kind))

    def output_box(self, rng: np.random.Generator) -> Box:
        """A uniformly random tile output box inside ``sample_box``."""
        begin = [int(rng.integers(b, e - s + 1)) for b, e, s in
                 zip(self.sample_box.begin, self.sample_box.end, self.geometry.output_shape)]
        return Box.from_shape(self.geometry.output_shape, begin=begin)

    def read(self, output_box: Box) -> tuple[np.ndarray, np.ndarray]:
        """Image ``(c, *input_shape)`` float32 and class indices ``(*output_shape)`` int64."""
        image = read_box(self._image, self.geometry.input_box(output_box)).astype(np.float32)
        labels = to_classes(read_box(self._labels, output_box)[0], self.num_classes, self.labels_url)
        return image, labels

    def sample_patch(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        return self.read(self.output_box(rng))

    def close(self) -> None:
        self._open.close()


def check_volumes(image: Volume, labels: Volume, geometry: TileGeometry, sample_box: Box) -> None:
    """Raise InputError unless tiles of ``geometry`` can be drawn from ``sample_box`` of these volumes."""
    if image.shape != labels.shape:
        raise InputError(f"image {image.url} has shape {image.shape} but labels {labels.url} have "
                         f"{labels.shape}; pass labels of the same (z, y, x) shape as the image")
    if labels.channels != 1:
        raise InputError(f"labels {labels.url} have {labels.channels} channels; pass one (z, y, x) label volume")
    if sample_box.end[0] > image.shape[0]:
        raise InputError(f"z_range ({sample_box.begin[0]}, {sample_box.end[0]}) reaches past the volume's "
                         f"{image.shape[0]} slices; pass an end <= {image.shape[0]}")
    if any(r < t for r, t in zip(sample_box.shape, geometry.output_shape)):
        raise InputError(f"the training region {sample_box.shape} (z, y, x) is smaller than one tile output "
                         f"{geometry.output_shape}; pass a smaller tile_output or a wider z_range")


def to_classes(labels: np.ndarray, num_classes: int, source: str = "labels") -> np.ndarray:
    """Class indices (int64) from stored labels: binary masks for 2 classes, else indices.

    >>> to_classes(np.array([0, 255, 1]), 2).tolist()
    [0, 1, 1]
    """
    if num_classes == 2:
        return np.asarray(labels != 0, dtype=np.int64)
    classes = labels.astype(np.int64)
    bad = (classes < 0) | (classes >= num_classes) | (classes != labels)
    if bad.any():
        value = labels[bad].flat[0].item()
        raise InputError(f"labels {source} hold the value {value!r}, not a class index in [0, {num_classes}); "
                         f"pass labels 0..{num_classes - 1}, or num_classes={int(labels.max()) + 1}")
    return classes


def augment_tile(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The same random flip and 90-degree rotation in (y, x) of image ``(c, z, y, x)`` and labels ``(z, y, x)``.

    Non-square tiles rotate by 0 or 180 degrees only, so every tile of a batch keeps its shape.
    """
    square = image.shape[-1] == image.shape[-2]
    turns = int(rng.integers(4)) if square else 2 * int(rng.integers(2))
    flip = bool(rng.integers(2))
    out = []
    for array in (image, labels):
        array = np.rot90(array, turns, axes=(-2, -1))
        out.append(np.ascontiguousarray(array[..., ::-1] if flip else array))
    return out[0], out[1]


def estimate_statistics(sampler: PatchSampler, rng: np.random.Generator, *,
                        patches: int = STATISTICS_PATCHES) -> tuple[float, float, np.ndarray]:
    """Image mean and std and per-class voxel counts, from ``patches`` random tiles.

    Also checks the labels of those tiles (see :func:`to_classes`) before any training.
    """
    sums = np.zeros(3)  # voxels, sum, sum of squares
    counts = np.zeros(sampler.num_classes, dtype=np.int64)
    for _ in range(patches):
        image, labels = sampler.sample_patch(rng)
        x = image.astype(np.float64)
        sums += (x.size, x.sum(), np.square(x).sum())
        counts += np.bincount(labels.ravel(), minlength=sampler.num_classes)
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


def make_batch(sampler: PatchSampler, rng: np.random.Generator, config: TrainConfig,
               mean: float, std: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A normalised batch: 2D ``(b*z, c, y, x)`` / ``(b*z, y, x)``, 3D ``(b, c, z, y, x)`` / ``(b, z, y, x)``."""
    images, targets = [], []
    for _ in range(config.batch_size):
        image, labels = sampler.sample_patch(rng)
        if config.augment:
            image, labels = augment_tile(image, labels, rng)
        images.append((image - mean) / std)
        targets.append(labels)
    x = torch.from_numpy(np.stack(images).astype(np.float32))  # (b, c, z, y, x)
    y = torch.from_numpy(np.stack(targets))  # (b, z, y, x)
    if config.ndim == 2:
        x = x.permute(0, 2, 1, 3, 4).flatten(0, 1)  # (b*z, c, y, x)
        y = y.flatten(0, 1)  # (b*z, y, x)
    return x, y


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    lr = config.resolved_learning_rate()
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.99)
    return torch.optim.Adam(model.parameters(), lr=lr)


def use_all_cores() -> None:
    """Give torch every usable core, unless the user chose a thread count (OMP_NUM_THREADS)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if "OMP_NUM_THREADS" not in os.environ and torch.get_num_threads() != cores:
        torch.set_num_threads(cores)


def train(image: str | Path, labels: str | Path, out: str | Path, config: TrainConfig = TrainConfig(),
          *, progress: bool = False) -> TrainReport:
    """Train a U-Net on random tiles of ``image`` against ``labels``; checkpoint to ``out``.

    Checkpoints (atomic, by :func:`~unet_volume.checkpoint.save_model`) are written every
    ``config.checkpoint_every`` steps and at the end, with normalisation, class names and recipe
    in their metadata. Inputs are validated first: bad input raises InputError, writing nothing.
    """
    image_volume, label_volume = open_volume(image), open_volume(labels)
    sampler = PatchSampler(image_volume, label_volume, config.geometry(),
                           num_classes=config.num_classes, z_range=config.z_range)
    with closing(sampler):
        rng = np.random.default_rng(config.seed)
        torch.manual_seed(config.seed)
        use_all_cores()
        mean, std, counts = estimate_statistics(sampler, rng)
        weights = class_weights(counts) if config.class_balance else np.ones(config.num_classes)
        log.info("normalisation mean %.4g std %.4g; class voxels %s, weights %s",
                 mean, std, counts.tolist(), np.round(weights, 3).tolist())
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = UNet(in_channels=image_volume.channels, num_classes=config.num_classes, depth=config.depth,
                     base_channels=config.base_channels, ndim=config.ndim, dropout=config.dropout)
        loop = _Loop(sampler, model.to(device).train(), config, rng, (mean, std),
                     torch.tensor(weights, dtype=torch.float32, device=device))
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        return loop.run(Path(out), progress)


class _Loop:
    """The optimisation loop and its bookkeeping (losses, clock, checkpoints)."""

    def __init__(self, sampler: PatchSampler, model: UNet, config: TrainConfig, rng: np.random.Generator,
                 normalization: tuple[float, float], weights: torch.Tensor) -> None:
        self.sampler, self.model, self.config, self.rng = sampler, model, config, rng
        (self.mean, self.std), self.weights, self.device = normalization, weights, weights.device
        self.optimizer = build_optimizer(model, config)
        self.losses: list[float] = []
        self.seconds = 0.0

    def step(self) -> float:
        x, y = make_batch(self.sampler, self.rng, self.config, self.mean, self.std)
        logits = self.model(x.to(self.device))
        loss = F.cross_entropy(logits, y.to(self.device), weight=self.weights)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        self.optimizer.step()
        return float(loss.detach())

    def is_done(self) -> bool:
        c = self.config
        return (c.steps is not None and len(self.losses) >= c.steps) or (
            c.minutes is not None and self.seconds >= 60 * c.minutes)

    def run(self, out: Path, progress: bool) -> TrainReport:
        start = time.perf_counter()
        with tqdm(total=self.config.steps, disable=not progress, desc="train", unit="step") as bar:
            while not self.is_done():
                self.losses.append(self.step())
                self.seconds = time.perf_counter() - start
                bar.update()
                n = len(self.losses)
                if n % LOG_EVERY == 0:
                    bar.set_postfix(loss=f"{self.final_loss():.4f}")
                    log.info("step %d: loss %.4f (mean of last %d), %.2f steps/s",
                             n, self.final_loss(), LOG_EVERY, n / self.seconds)
                if n % self.config.checkpoint_every == 0:
                    self.save(out)
        if len(self.losses) % self.config.checkpoint_every:  # else just saved
            self.save(out)
        return TrainReport(len(self.losses), self.seconds, self.final_loss(), out, self.losses)

    def final_loss(self) -> float:
        recent = self.losses[-LOG_EVERY:]
        return float(np.mean(recent)) if recent else math.nan

    def save(self, out: Path) -> None:
        save_model(self.model, out, metadata=self.metadata())
        log.info("checkpoint %s at step %d", out, len(self.losses))

    def metadata(self) -> dict[str, Any]:
        k = self.config.num_classes
        return {
            "normalization": {"mean": self.mean, "std": self.std},
            "classes": BINARY_CLASSES if k == 2 else [str(i) for i in range(k)],
            "training": {
                "config": self.config.to_dict(), "learning_rate": self.config.resolved_learning_rate(),
                "class_weights": [float(w) for w in self.weights.tolist()],
                "image": self.sampler.image_url, "labels": self.sampler.labels_url,
                "steps": len(self.losses), "seconds": round(self.seconds, 3), "final_loss": self.final_loss(),
            },
        }
