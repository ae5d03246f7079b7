"""Evaluation of a prediction against labels, slice by slice and for the whole volume.

Opens predictions and labels (prediction groups, Zarr arrays, TIFF stacks or arrays), reads one
slice at a time, and reports the metrics of :mod:`unet_volume.evaluation.metrics` per slice and for
the
volume, from the same additive counts: a terabyte prediction is scored in bounded memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path
from typing import Any, cast

import numpy as np
import zarr

from unet_volume.errors import InputError
from unet_volume.evaluation.metrics import (
    OverlapCounts,
    PairCounts,
    SegBackground,
    instances_from_binary,
)
from unet_volume.io.formats import input_exists, input_kind, opened_array
from unet_volume.io.volumes import check_z_range, open_volume
from unet_volume.output.prediction import open_prediction


@dataclass(frozen=True, slots=True)
class Scores:
    """The metrics of one slice or of the whole volume; see the module docstring for definitions."""

    pixel_error: float
    rand_error: float
    rand_precision: float
    rand_recall: float
    voi_split: float
    voi_merge: float
    iou: float
    dice: float

    @classmethod
    def of(cls, overlap: OverlapCounts, pairs: PairCounts) -> Scores:
        return cls(
            overlap.pixel_error(), *pairs.rand(), *pairs.voi(), overlap.iou(), overlap.dice()
        )


@dataclass(frozen=True, slots=True)
class SliceScores:
    z: int
    scores: Scores


@dataclass(frozen=True, slots=True)
class EvaluationReport:
    """Metrics of a prediction against labels: the whole ``z_range`` and each slice in it.

    Whole-volume numbers pool the voxels (and, for Rand and VOI, the voxel pairs) of all slices;
    they are not the mean of the per-slice numbers.
    """

    prediction: str
    labels: str
    z_range: tuple[int, int]
    foreground_class: int
    per_slice: bool
    connectivity: int
    seg_background: SegBackground
    volume: Scores
    slices: tuple[SliceScores, ...]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (``json.dumps(report.to_dict())``)."""
        info = {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name not in ("volume", "slices")
        }
        return {
            **info,
            "z_range": list(self.z_range),
            "volume": asdict(self.volume),
            "slices": [{"z": s.z, **asdict(s.scores)} for s in self.slices],
        }

    def to_table(self) -> str:
        """A plain-text table for the terminal: one row per slice, then the whole volume."""
        head = (
            f"{self.prediction} vs {self.labels}: z {self.z_range[0]}:{self.z_range[1]}, "
            f"foreground class {self.foreground_class}, "
            f"{'2D' if self.per_slice else '3D'} instances, connectivity {self.connectivity}, "
            f"predicted background as {self.seg_background}"
        )
        names = [f.name for f in fields(Scores)]
        rows = [f"{'z':>6}" + "".join(f"{name:>15}" for name in names)]
        for label, scores in [
            *((str(s.z), s.scores) for s in self.slices),
            ("volume", self.volume),
        ]:
            rows.append(
                f"{label:>6}" + "".join(f"{getattr(scores, name):>15.6f}" for name in names)
            )
        return "\n".join([head, *rows])


@dataclass(frozen=True, slots=True)
class _Source:
    """A (z, y, x) label or class map, read one slice at a time.

    ``num_classes`` is known for a prediction group, None for plain arrays.
    """

    name: str
    shape: tuple[int, ...]
    num_classes: int | None
    read: Callable[[int], np.ndarray]
    instances: bool = False
    """Instance ids (``unet-volume segment``): scored as they are, not as components."""


def evaluate(
    prediction: str | Path | np.ndarray,
    labels: str | Path | np.ndarray,
    *,
    foreground_class: int = 1,
    num_classes: int | None = None,
    per_slice: bool = True,
    z_range: tuple[int, int] | None = None,
    connectivity: int = 1,
    seg_background: SegBackground = "singletons",
) -> EvaluationReport:
    """Score a prediction against labels, slice by slice and for the whole ``z_range`` (half-open).

    A ``prediction`` that is instance labels (``unet-volume segment``) is scored as its objects:
    the foreground is every labelled voxel, and the Rand error and VOI see its ids as they are.

    Each input is a prediction group (its ``segmentation`` is read), a Zarr array, a TIFF stack
    or an array, ``(z, y, x)`` (or ``(y, x)``: one slice). Values are class indices; with
    ``num_classes`` 2 (the default, unless a prediction group says otherwise) any nonzero value
    is class 1, so 0/255 ISBI labels work. Voxels of ``foreground_class`` are the foreground
    (ISBI: 1, cell interior); instances are its connected components, per slice unless
    ``per_slice=False`` (3D components: the whole ``z_range`` is then read into memory).
    """
    with ExitStack() as stack:
        pred, true = (
            _open_source(prediction, "prediction", stack),
            _open_source(labels, "labels", stack),
        )
        if pred.shape != true.shape:
            raise InputError(
                f"prediction {pred.name} has shape {pred.shape} but labels {true.name} have "
                f"{true.shape}; pass labels of the same (z, y, x) shape"
            )
        z_begin, z_end = check_z_range(z_range, pred.shape[0])
        classes = num_classes or pred.num_classes or true.num_classes or 2
        planes = _planes(pred, true, range(z_begin, z_end), classes, foreground_class)
        slices, volume = _score(
            planes, per_slice=per_slice, connectivity=connectivity, seg_background=seg_background
        )
    return EvaluationReport(
        pred.name,
        true.name,
        (z_begin, z_end),
        foreground_class,
        per_slice,
        connectivity,
        seg_background,
        volume,
        slices,
    )


Plane = tuple[int, np.ndarray, np.ndarray, np.ndarray | None]


def _planes(
    pred: _Source, true: _Source, zs: range, num_classes: int, foreground_class: int
) -> Iterator[Plane]:
    """``(z, predicted foreground, true foreground, predicted instance ids or None)`` for each
    slice, read one at a time."""
    for z in zs:
        predicted = pred.read(z)
        yield (
            z,
            predicted != 0
            if pred.instances
            else _foreground(predicted, num_classes, foreground_class),
            _foreground(true.read(z), num_classes, foreground_class),
            predicted if pred.instances else None,
        )


def _score(
    planes: Iterator[Plane],
    *,
    per_slice: bool,
    connectivity: int,
    seg_background: SegBackground,
) -> tuple[tuple[SliceScores, ...], Scores]:
    """Per-slice and whole-volume scores of ``(z, predicted foreground, true foreground)`` planes.

    2D instances: one plane in memory at a time, and the volume's counts are the sum of the
    slices'. 3D instances span slices, so the range is labelled, and its pairs counted, whole.
    """
    label = partial(instances_from_binary, per_slice=per_slice, connectivity=connectivity)
    if per_slice:
        instances: Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = (
            (z, p, t, label(p) if ids is None else ids, label(t)) for z, p, t, ids in planes
        )
    else:
        zs, preds, trues, given = zip(*planes)
        seg = label(np.stack(preds)) if given[0] is None else np.stack(given)
        gt = label(np.stack(trues))
        instances = zip(zs, preds, trues, seg, gt)
    rows: list[SliceScores] = []
    overlap, pairs = OverlapCounts(), PairCounts()
    for z, pred, true, slice_seg, slice_gt in instances:
        slice_overlap = OverlapCounts.of(pred, true)
        slice_pairs = PairCounts.of(slice_seg, slice_gt, seg_background=seg_background)
        rows.append(SliceScores(z, Scores.of(slice_overlap, slice_pairs)))
        overlap, pairs = overlap + slice_overlap, pairs + slice_pairs
    if not per_slice:
        pairs = PairCounts.of(seg, gt, seg_background=seg_background)
    return tuple(rows), Scores.of(overlap, pairs)


def _foreground(values: np.ndarray, num_classes: int, foreground_class: int) -> np.ndarray:
    """The foreground of a class map; with 2 classes any nonzero value is class 1 (0/255 masks)."""
    if num_classes == 2:
        return np.asarray(values != 0) if foreground_class == 1 else np.asarray(values == 0)
    return np.asarray(values == foreground_class)


def _open_source(source: str | Path | np.ndarray, role: str, stack: ExitStack) -> _Source:
    """A prediction group's segmentation, a Zarr array, a TIFF stack or an array, read per slice."""
    if isinstance(source, np.ndarray):
        planes = source[np.newaxis] if source.ndim == 2 else source
        if planes.ndim != 3:
            raise InputError(f"{role} array has shape {source.shape}; pass (z, y, x) or (y, x)")
        return _Source("array", tuple(planes.shape), None, lambda z: np.asarray(planes[z]))
    url = str(source)
    if not input_exists(url):
        raise InputError(
            f"{role} {url} does not exist; pass a prediction group, a Zarr array or a TIFF stack"
        )
    opened = zarr.open(url, mode="r") if input_kind(url) == "zarr" else None
    if isinstance(opened, zarr.Group) and "instances" in opened and "segmentation" not in opened:
        ids = cast("zarr.Array[Any]", opened["instances"])  # the labels of `unet-volume segment`
        return _Source(url, tuple(ids.shape), 2, lambda z: np.asarray(ids[z]), instances=True)
    if isinstance(opened, zarr.Group):
        dataset = open_prediction(url)
        if "segmentation" not in dataset:
            raise InputError(
                f"{role} {url} is a Zarr group without a segmentation; pass a prediction group "
                "written by `unet-volume predict`, or one of its arrays"
            )
        segmentation = dataset["segmentation"]
        return _Source(
            url,
            tuple(segmentation.shape),
            int(dataset.sizes["class"]),
            lambda z: np.asarray(segmentation[z].values),
        )
    volume = open_volume(url)
    if volume.channels != 1:
        raise InputError(
            f"{role} {url} has {volume.channels} channels; pass one (z, y, x) label volume"
        )
    array = stack.enter_context(opened_array(volume.url, volume.kind))
    lead = (0,) * (array.ndim - 3)  # a (1, z, y, x) array's channel
    return _Source(url, volume.shape, None, lambda z: np.asarray(array[(*lead, z)]))
