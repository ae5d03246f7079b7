"""Segmentation metrics: pixel error, adapted Rand error, variation of information, IoU and Dice.

Pixel error here is 1 - accuracy of the binary map. The ISBI 2012 challenge, whose figures the
paper reports (0.0611), defined its pixel error as 1 - the maximal F-score of the foreground
(cell interior) pixels over thresholds of the submitted map (Fiji's
``PixelError.getPixelErrorMaximalFScore``): 1 - Dice, the ``dice`` here, at the best threshold.
1 - F = (FP + FN) / (2 TP + FP + FN) divides the same errors by about twice the foreground
instead of by all pixels: on ISBI, 80% interior, it reads about 0.63x the 1 - accuracy of the
same map (0.047 against 0.075 on held-out slices). Rand error is the challenge's adapted Rand
error: 1 - F-score of the Rand index over voxel pairs. Conventions:

- Arguments are ``(prediction, truth)``; scikit-image's are ``(image_true, image_test)``.
- Rand and VOI compare *instances*: :func:`instances_from_binary` labels the connected components
  of the foreground, **4-connected** (``connectivity=1``) as the ISBI 2012 evaluation script
  (Fiji's ``RandError``) does, not 8-connected as ``skimage.measure.label``; per z slice.
- Truth label 0 (ISBI: membrane) is ignored by Rand and VOI (``ignore_gt_zero=True``), as by
  ``skimage.metrics.adapted_rand_error`` (its ``variation_of_information`` ignores nothing).
- Predicted label 0 is one more segment by default, as scikit-image counts it (``"segment"``).
  :func:`evaluate` uses ``seg_background="singletons"``: each such voxel its own segment, as the
  ISBI script prunes the proposal's zero component, so predicted membrane inside true cells
  does not merge them all.
- Rand precision = true pairs / predicted pairs (1: no false merges), recall = true pairs / true
  pairs (1: no false splits), as skimage's docstring says; its code swaps them (issue #6485).
- VOI split = H(pred|truth) (over-segmentation), merge = H(truth|pred) (under-segmentation), in
  bits: ``skimage.metrics.variation_of_information(truth, pred)``, in that order.
- Nothing to score is no error: Rand (0, 1, 1) without pairs, VOI (0, 0), IoU and Dice 1.

All metrics come from additive counts (:class:`OverlapCounts`, :class:`PairCounts`): a volume's
are the sums of its slices' when instance ids are unique per slice, so
:func:`unet_volume.evaluation.scores.evaluate` reads one slice at a time and gets whole-volume
numbers
from the same counts.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal, Self, get_args

import numpy as np
import scipy.ndimage as ndi

from unet_volume.errors import InputError

SegBackground = Literal["segment", "singletons"]


@dataclass(frozen=True, slots=True)
class _Additive:
    """Counts that add field by field (disjoint voxel sets give the counts of their union)."""

    def __add__(self, other: Self) -> Self:
        return type(self)(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


@dataclass(frozen=True, slots=True)
class OverlapCounts(_Additive):
    """Voxel counts of a binary prediction against a binary truth."""

    voxels: int = 0  # voxels compared
    agree: int = 0  # voxels where prediction and truth agree
    pred: int = 0  # predicted foreground
    true: int = 0  # true foreground
    both: int = 0  # foreground in both

    @classmethod
    def of(cls, pred: np.ndarray, true: np.ndarray) -> OverlapCounts:
        p, t = np.asarray(pred, dtype=bool), np.asarray(true, dtype=bool)
        p_n, t_n, both = (int(np.count_nonzero(x)) for x in (p, t, p & t))
        return cls(p.size, p.size - (p_n + t_n - 2 * both), p_n, t_n, both)

    def pixel_error(self) -> float:
        return (self.voxels - self.agree) / self.voxels if self.voxels else 0.0

    def iou(self) -> float:
        union = self.pred + self.true - self.both
        return self.both / union if union else 1.0

    def dice(self) -> float:
        total = self.pred + self.true
        return 2 * self.both / total if total else 1.0


@dataclass(frozen=True, slots=True)
class PairCounts(_Additive):
    """The contingency table of a segmentation against the truth, reduced to what the metrics need.

    With n_ij the voxels in true segment i and predicted segment j, a_i and b_j its row and
    column sums and n the voxels counted: ``joint``, ``true`` and ``pred`` count ordered pairs
    of distinct voxels in one segment of both, of the truth, of the prediction (sum n_ij^2 - n,
    sum a_i^2 - n, sum b_j^2 - n); ``split_bits`` = sum n_ij log2(a_i / n_ij) = n H(pred|truth)
    and ``merge_bits`` = sum n_ij log2(b_j / n_ij) = n H(truth|pred). Integers are exact; the
    bits are sums of non-negative terms, each exactly 0 where a segment matches.
    """

    voxels: int = 0
    joint: int = 0
    true: int = 0
    pred: int = 0
    split_bits: float = 0.0
    merge_bits: float = 0.0

    @classmethod
    def of(
        cls,
        seg: np.ndarray,
        gt: np.ndarray,
        *,
        ignore_gt_zero: bool = True,
        seg_background: SegBackground = "segment",
    ) -> PairCounts:
        """Count in O(voxels) memory: ``np.unique`` over (truth, prediction) id pairs.

        No dense table of truth ids x prediction ids, which could not fit for big volumes.
        """
        if seg_background not in get_args(SegBackground):
            raise InputError(
                f"seg_background {seg_background!r} is not supported; "
                "pass 'segment' or 'singletons'"
            )
        seg, gt = np.ravel(seg), np.ravel(gt)
        if ignore_gt_zero:
            seg, gt = seg[gt != 0], gt[gt != 0]
        if gt.size == 0:
            return cls()
        gt_ids, gt_index = np.unique(gt, return_inverse=True)
        seg_ids, seg_index = np.unique(seg, return_inverse=True)
        seg_index, n_seg = _split_background(seg, seg_ids, seg_index, seg_background)
        pair_keys, n_ij = np.unique(
            gt_index.astype(np.int64) * n_seg + seg_index, return_counts=True
        )
        a_i = np.bincount(gt_index, minlength=gt_ids.size)[
            pair_keys // n_seg
        ]  # per pair: its true segment's size
        b_j = np.bincount(seg_index, minlength=n_seg)[
            pair_keys % n_seg
        ]  # ... and its predicted segment's
        return cls(
            int(gt.size),
            _pairs(n_ij),
            _pairs(np.bincount(gt_index)),
            _pairs(np.bincount(seg_index)),
            float(np.sum(n_ij * np.log2(a_i / n_ij))),
            float(np.sum(n_ij * np.log2(b_j / n_ij))),
        )

    def rand(self) -> tuple[float, float, float]:
        """(adapted Rand error, precision, recall); see the module docstring for the conventions."""
        precision = self.joint / self.pred if self.pred else 1.0
        recall = self.joint / self.true if self.true else 1.0
        pairs = self.pred + self.true
        return (1.0 - 2 * self.joint / pairs if pairs else 0.0), precision, recall

    def voi(self) -> tuple[float, float]:
        """(split, merge) = (H(pred|truth), H(truth|pred)) in bits."""
        if not self.voxels:
            return 0.0, 0.0
        return self.split_bits / self.voxels, self.merge_bits / self.voxels


def _pairs(sizes: np.ndarray) -> int:
    """Ordered pairs of distinct voxels within segments of these sizes: sum s^2 - sum s (exact)."""
    sizes = sizes.astype(np.int64)
    return int(np.sum(sizes * sizes)) - int(np.sum(sizes))


def _split_background(
    seg: np.ndarray, seg_ids: np.ndarray, seg_index: np.ndarray, seg_background: SegBackground
) -> tuple[np.ndarray, int]:
    """Predicted segment indices, each label-0 voxel its own segment under ``"singletons"``."""
    if seg_background == "segment" or not np.any(seg_ids == 0):
        return seg_index, int(seg_ids.size)
    background = seg == 0
    singles = np.arange(seg_ids.size, seg_ids.size + int(np.count_nonzero(background)))
    seg_index = seg_index.astype(np.int64)
    seg_index[background] = singles
    return seg_index, int(seg_ids.size + singles.size)


def _check_same_shape(pred: np.ndarray, true: np.ndarray) -> None:
    if np.shape(pred) != np.shape(true):
        raise InputError(
            f"prediction has shape {np.shape(pred)} but truth has {np.shape(true)}; "
            "pass equal shapes"
        )


def pixel_error(pred_binary: np.ndarray, true_binary: np.ndarray) -> float:
    """1 - pixel accuracy of two binary maps (nonzero: foreground); stricter than the ISBI
    challenge's pixel error, 1 - :func:`dice` at the best threshold (module docstring).

    >>> pixel_error(np.array([0, 1, 1, 0]), np.array([0, 255, 0, 0]))
    0.25
    """
    _check_same_shape(pred_binary, true_binary)
    return OverlapCounts.of(pred_binary, true_binary).pixel_error()


def iou(pred: np.ndarray, true: np.ndarray, label: int = 1) -> float:
    """Intersection over union of ``pred == label`` and ``true == label``.

    Class maps, or binary maps with ``label=1``.
    """
    _check_same_shape(pred, true)
    return OverlapCounts.of(np.asarray(pred) == label, np.asarray(true) == label).iou()


def dice(pred: np.ndarray, true: np.ndarray, label: int = 1) -> float:
    """Dice coefficient 2|P & T| / (|P| + |T|) of ``pred == label`` and ``true == label``."""
    _check_same_shape(pred, true)
    return OverlapCounts.of(np.asarray(pred) == label, np.asarray(true) == label).dice()


def adapted_rand_error(
    seg: np.ndarray,
    gt: np.ndarray,
    *,
    ignore_gt_zero: bool = True,
    seg_background: SegBackground = "segment",
) -> tuple[float, float, float]:
    """(error, precision, recall) of instance labels ``seg`` against ``gt``: the ISBI 2012 / SNEMI3D
    adapted Rand error, ``skimage.metrics.adapted_rand_error(gt, seg)[0]``. A true cell split in
    halves: no false merges (precision 1), a third of the true pairs found (recall 1/3).

    >>> adapted_rand_error(np.array([1, 1, 2, 2]), np.array([1, 1, 1, 1]))
    (0.5, 1.0, 0.3333333333333333)
    """
    _check_same_shape(seg, gt)
    return PairCounts.of(
        seg, gt, ignore_gt_zero=ignore_gt_zero, seg_background=seg_background
    ).rand()


def variation_of_information(
    seg: np.ndarray,
    gt: np.ndarray,
    *,
    ignore_gt_zero: bool = True,
    seg_background: SegBackground = "segment",
) -> tuple[float, float]:
    """(split, merge) = (H(seg|gt), H(gt|seg)) in bits; their sum is the variation of information.

    >>> variation_of_information(np.array([1, 1, 2, 2]), np.array([1, 1, 1, 1]))
    (1.0, 0.0)
    """
    _check_same_shape(seg, gt)
    return PairCounts.of(
        seg, gt, ignore_gt_zero=ignore_gt_zero, seg_background=seg_background
    ).voi()


def instances_from_binary(
    mask: np.ndarray, *, per_slice: bool = True, connectivity: int = 1
) -> np.ndarray:
    """Instance ids (int64, 0 = background) of the connected components of ``mask != 0``.

    ``connectivity=1`` joins face neighbours only (4-connected in 2D, as the ISBI script);
    ``mask.ndim`` joins all neighbours (8-connected in 2D). With ``per_slice`` a ``(z, y, x)``
    mask is labelled slice by slice, ids numbered on across slices so that each is unique.

    >>> instances_from_binary(np.array([[1, 0], [0, 1]])).tolist()
    [[1, 0], [0, 2]]
    >>> instances_from_binary(np.array([[1, 0], [0, 1]]), connectivity=2).tolist()
    [[1, 0], [0, 1]]
    """
    mask = np.asarray(mask) != 0
    if per_slice and mask.ndim == 3:
        labels = np.zeros(mask.shape, dtype=np.int64)
        offset = 0
        for z, plane in enumerate(mask):
            labels[z], count = _components(plane, connectivity)
            labels[z][labels[z] > 0] += offset
            offset += count
        return labels
    return _components(mask, connectivity)[0]


def _components(mask: np.ndarray, connectivity: int) -> tuple[np.ndarray, int]:
    if not 1 <= connectivity <= max(mask.ndim, 1):
        raise InputError(
            f"connectivity {connectivity} must be in 1..{mask.ndim} for {mask.ndim}D; "
            "pass 1 for face neighbours (4-connected in 2D)"
        )
    labels = np.zeros(mask.shape, dtype=np.int64)
    count = ndi.label(
        mask, structure=ndi.generate_binary_structure(mask.ndim, connectivity), output=labels
    )
    return labels, int(count)
