"""Training tiles drawn lazily from volumes of any size.

A :class:`TrainingData` names the volumes (image, labels, and optionally per-voxel
loss weights and an annotation mask) and the region tiles are drawn from. A
:class:`TileSampler` reads one tile at a time, never a whole volume: a random
output box inside the region, the labels / weights / mask of that box, and the
image over the box grown by the network's halo (mirrored at the volume border,
exactly as prediction reads it)::

    image read box   [------[-------------)------)    = output box grown by the halo
    targets                 [-------------)            = the tile's output box

A sampler with an ``apron`` (the augmentation's extra read, see
:func:`~unet_volume.training.augment.required_apron`) grows the output box by it first, so both
reads
grow by the apron, and the image read by the halo on top.

Label convention: with 2 classes any nonzero label is class 1 (so 0/255 masks
work; for ISBI 2012 class 0 is membrane and class 1 cell interior); with more
classes labels are class indices in ``[0, num_classes)``. Voxels outside the mask
(mask == 0) get weight 0: sparse annotation, as in the 3D U-Net paper.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from unet_volume.errors import InputError
from unet_volume.geometry import Box
from unet_volume.io.volumes import (
    ArrayLike,
    Volume,
    check_z_range,
    open_volume,
    opened_array,
    read_box,
)
from unet_volume.tiling import TileGeometry


@dataclass(frozen=True)
class TrainingData:
    """The volumes a model trains on (all of one (z, y, x) shape) and the region tiles come from."""

    image: Volume
    labels: Volume
    region: Box
    weights: Volume | None = None
    mask: Volume | None = None

    @classmethod
    def open(
        cls,
        image: str | Path,
        labels: str | Path,
        *,
        weights: str | Path | None = None,
        mask: str | Path | None = None,
        z_range: tuple[int, int] | None = None,
    ) -> TrainingData:
        """Open and validate the volumes; ``z_range`` (half-open) restricts the region to slices."""
        image_volume, label_volume = open_volume(image), open_volume(labels)
        extra = {
            name: open_volume(url)
            for name, url in (("weights", weights), ("mask", mask))
            if url is not None
        }
        for name, volume in (("labels", label_volume), *extra.items()):
            _check_same_shape(image_volume, volume, name)
        z0, z1 = check_z_range(z_range, image_volume.shape[0])
        region = Box((z0, 0, 0), (z1, *image_volume.shape[1:]))
        _check_labels(label_volume, region)
        return cls(image_volume, label_volume, region, extra.get("weights"), extra.get("mask"))

    def with_region(self, z_range: tuple[int, int]) -> TrainingData:
        """The same volumes, another slab of slices (e.g. a held-out validation region)."""
        z0, z1 = check_z_range(z_range, self.image.shape[0], what="validation z range")
        return TrainingData(
            self.image,
            self.labels,
            Box((z0, 0, 0), (z1, *self.image.shape[1:])),
            self.weights,
            self.mask,
        )


def _check_labels(labels: Volume, region: Box) -> None:
    """Integer labels, none negative in the training ``region`` (read slice by slice).

    A float 0.5 or a -1 would silently become foreground (any nonzero label is class 1 with two
    classes). Training regions are a few annotated slices: reading them once costs little.
    """
    kind = np.dtype(labels.dtype).kind
    if kind not in "uib":
        raise InputError(
            f"labels {labels.url} are {np.dtype(labels.dtype)}, not integers; pass integer "
            "labels (0 = background, 1.. = classes), e.g. converted with numpy's astype(np.uint8)"
        )
    if kind != "i":
        return
    for z in range(region.begin[0], region.end[0]):
        lowest = int(labels.read(Box((z, *region.begin[1:]), (z + 1, *region.end[1:]))).min())
        if lowest < 0:
            raise InputError(
                f"labels {labels.url} hold negative values (min {lowest} in slice {z}); "
                "pass labels >= 0 (0 = background, 1.. = classes)"
            )


def _check_same_shape(image: Volume, other: Volume, name: str) -> None:
    if image.shape != other.shape:
        raise InputError(
            f"image {image.url} has shape {image.shape} but {name} {other.url} have "
            f"{other.shape}; pass {name} of the same (z, y, x) shape as the image"
        )
    if other.channels != 1:
        raise InputError(
            f"{name} {other.url} have {other.channels} channels; pass one (z, y, x) volume"
        )


@dataclass
class TrainingTile:
    """One training tile: image ``(c, *input_shape)`` float32; targets over ``(*output_shape)``.

    Each array may carry ``apron`` extra voxels per side (for augmentation to warp from).
    """

    image: np.ndarray
    labels: np.ndarray  # int64 class indices
    weights: (
        np.ndarray
    )  # float32 loss weight per voxel (mask applied; 1 where no weights are given)
    apron: tuple[int, ...] = (0, 0, 0)


class TileSampler:
    """Reads random training tiles of ``geometry`` from ``data``, one tile at a time.

    Arrays are opened on first use in each process (so a sampler can be pickled to
    DataLoader workers) and stay open (a TIFF is parsed once) until :meth:`close`.
    """

    def __init__(
        self,
        data: TrainingData,
        geometry: TileGeometry,
        *,
        num_classes: int,
        apron: tuple[int, ...] = (0, 0, 0),
    ) -> None:
        if any(r < t for r, t in zip(data.region.shape, geometry.output_shape)):
            raise InputError(
                f"the training region {data.region.shape} (z, y, x) is smaller than one tile "
                f"output {geometry.output_shape}; pass a smaller tile output or a wider z range"
            )
        self.data, self.geometry, self.num_classes = data, geometry, num_classes
        self.apron = tuple(apron)
        self._arrays: dict[str, ArrayLike] | None = None
        self._stack: ExitStack | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {
            "data": self.data,
            "geometry": self.geometry,
            "num_classes": self.num_classes,
            "apron": self.apron,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        TileSampler.__init__(  # rebuilt from its recipe: a worker process opens its own files
            self,
            state["data"],
            state["geometry"],
            num_classes=state["num_classes"],  # type: ignore[misc]
            apron=state["apron"],
        )

    def _open(self) -> dict[str, ArrayLike]:
        if self._arrays is None:
            self._stack = ExitStack()
            volumes = {
                "image": self.data.image,
                "labels": self.data.labels,
                "weights": self.data.weights,
                "mask": self.data.mask,
            }
            self._arrays = {
                name: self._stack.enter_context(opened_array(v.url, v.kind))
                for name, v in volumes.items()
                if v is not None
            }
        return self._arrays

    def output_box(self, rng: np.random.Generator) -> Box:
        """A uniformly random tile output box inside the region."""
        region, shape = self.data.region, self.geometry.output_shape
        begin = [
            int(rng.integers(b, e - s + 1)) for b, e, s in zip(region.begin, region.end, shape)
        ]
        return Box.from_shape(shape, begin=begin)

    def read(self, output_box: Box) -> TrainingTile:
        """The tile whose output is ``output_box``, with the sampler's apron around it."""
        arrays = self._open()
        target_box = output_box.grow(self.apron)
        image = read_box(arrays["image"], self.geometry.input_box(target_box)).astype(np.float32)
        labels = to_classes(
            read_box(arrays["labels"], target_box)[0], self.num_classes, self.data.labels.url
        )
        weights = np.ones(target_box.shape, dtype=np.float32)
        if "weights" in arrays:
            weights = read_box(arrays["weights"], target_box)[0].astype(np.float32)
        if "mask" in arrays:
            weights = weights * (read_box(arrays["mask"], target_box)[0] != 0)
        return TrainingTile(image, labels, weights, self.apron)

    def sample(self, rng: np.random.Generator) -> TrainingTile:
        return self.read(self.output_box(rng))

    def grid(self, limit: int) -> list[Box]:
        """Up to ``limit`` tile output boxes tiling the region (deterministic: for validation)."""
        region, shape = self.data.region, self.geometry.output_shape
        last = Box(region.begin, tuple(e - s + 1 for e, s in zip(region.end, shape)))
        boxes = [Box.from_shape(shape, begin=cell.begin) for _, cell in last.grid(shape)]
        step = max(1, len(boxes) // limit)
        return boxes[::step][:limit]

    def close(self) -> None:
        if self._stack is not None:
            self._stack.close()
        self._arrays, self._stack = None, None


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
        raise InputError(
            f"labels {source} hold the value {value!r}, not a class index in [0, {num_classes}); "
            f"pass labels 0..{num_classes - 1}, or num_classes={int(labels.max()) + 1}"
        )
    return classes
