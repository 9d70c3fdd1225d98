"""Validation metrics from confusion sums: per-class Dice and the FP / FN indices (eqs. 5, 6).

Every metric is computed from three integer sums per foreground class of a label volume and a
thresholded (argmaxed) prediction: the intersection (true positives), the predicted volume and
the label volume. Sums add, so distributed validation all-reduces ``ConfusionSums.to_array()``
instead of gathering volumes, and Dice and the sampler's FP / FN indices come from one pass.

Conventions:
- Dice of a class whose label is empty in a case is NaN (undefined, whatever was predicted),
  and NaNs are excluded from means. False positives in such a case are still seen by ``r_fp``.
- Means are "per class, then over classes": ``mean_dice_per_class`` averages each class over
  the cases where it is defined (the Decathlon's per-class figures), and ``mean_dice``
  averages those class means over the classes defined in any case.
- Equations 5 and 6 of the paper with hard predictions, per class ``c``::

      r_fp_c = sum(p) / (sum(p) + sum(g) - sum(p * g))
      r_fn_c = sum(g) / (sum(p) + sum(g) - sum(p * g))

  averaged over the foreground classes; a class with nothing predicted and nothing labelled
  has no error and counts as ``r_fp_c = r_fn_c = 1``.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class ConfusionSums:
    """Per-foreground-class confusion sums; int64 arrays of shape ``(num_classes - 1,)``.

    Attributes:
        intersection: Voxels predicted and labelled as the class (true positives).
        pred_volume: Voxels predicted as the class.
        label_volume: Voxels labelled as the class.
    """

    intersection: np.ndarray
    pred_volume: np.ndarray
    label_volume: np.ndarray

    def __post_init__(self):
        arrays = []
        for field in ("intersection", "pred_volume", "label_volume"):
            array = np.array(getattr(self, field), dtype=np.int64)
            if array.ndim != 1:
                raise ValueError(f"{field} must be 1-D, got shape {array.shape}")
            array.setflags(write=False)
            object.__setattr__(self, field, array)
            arrays.append(array)
        if len({array.shape for array in arrays}) != 1:
            raise ValueError(f"sums have different shapes: {[a.shape for a in arrays]}")

    @classmethod
    def zeros(cls, num_classes: int) -> ConfusionSums:
        """Empty sums for ``num_classes`` classes (background included), the sum's identity."""
        zeros = np.zeros(num_classes - 1, dtype=np.int64)
        return cls(zeros, zeros, zeros)

    def __add__(self, other: ConfusionSums) -> ConfusionSums:
        if not isinstance(other, ConfusionSums):
            return NotImplemented
        return ConfusionSums.from_array(self.to_array() + other.to_array())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ConfusionSums):
            return NotImplemented
        return np.array_equal(self.to_array(), other.to_array())

    __hash__ = None

    def to_array(self) -> np.ndarray:
        """Returns the sums stacked as an int64 ``(3, num_classes - 1)`` array."""
        return np.stack([self.intersection, self.pred_volume, self.label_volume])

    @classmethod
    def from_array(cls, array: np.ndarray) -> ConfusionSums:
        """Inverse of ``to_array`` (e.g. after an all-reduce).

        Raises:
            ValueError: If ``array`` is not of shape ``(3, K - 1)``.
        """
        array = np.asarray(array)
        if array.ndim != 2 or array.shape[0] != 3:
            raise ValueError(f"expected a (3, num_classes - 1) array, got shape {array.shape}")
        return cls(array[0], array[1], array[2])


def confusion_sums(
    pred_labels: np.ndarray, true_labels: np.ndarray, num_classes: int
) -> ConfusionSums:
    """Counts intersection, predicted and labelled voxels of each foreground class.

    Args:
        pred_labels: Integer predicted labels (e.g. the argmax of the probabilities).
        true_labels: Integer ground-truth labels of the same shape.
        num_classes: Number of classes, background (0) included.

    Returns:
        The ``ConfusionSums`` of classes ``1 .. num_classes - 1``.

    Raises:
        ValueError: If the shapes differ, the arrays are not integer, ``num_classes < 2``, or a
            label is outside ``[0, num_classes)``.
    """
    pred_labels, true_labels = np.asarray(pred_labels), np.asarray(true_labels)
    if pred_labels.shape != true_labels.shape:
        raise ValueError(
            f"prediction shape {pred_labels.shape} differs from label shape {true_labels.shape}"
        )
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (background included), got {num_classes}")
    for what, labels in (("prediction", pred_labels), ("label", true_labels)):
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"{what} must hold integer class labels, got dtype {labels.dtype}")
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(
                f"{what} values span [{labels.min()}, {labels.max()}], outside the "
                f"{num_classes} classes [0, {num_classes - 1}]"
            )
    intersection, pred_volume, label_volume = [], [], []
    for label in range(1, num_classes):
        predicted, labelled = pred_labels == label, true_labels == label
        intersection.append(np.count_nonzero(predicted & labelled))
        pred_volume.append(np.count_nonzero(predicted))
        label_volume.append(np.count_nonzero(labelled))
    return ConfusionSums(intersection, pred_volume, label_volume)


def dice_from_sums(sums: ConfusionSums) -> np.ndarray:
    """Per-class Dice ``2 * TP / (pred + label)``; NaN where the label volume is 0.

    Args:
        sums: Confusion sums of one case (or of any set of voxels).

    Returns:
        Float64 array of shape ``(num_classes - 1,)``.
    """
    denominator = (sums.pred_volume + sums.label_volume).astype(np.float64)
    dice = np.full(denominator.shape, np.nan)
    defined = sums.label_volume > 0
    dice[defined] = 2.0 * sums.intersection[defined] / denominator[defined]
    return dice


def fp_fn_per_class(sums: ConfusionSums) -> tuple[np.ndarray, np.ndarray]:
    """FP and FN indices of equations 5 and 6 of the paper for each foreground class.

    Args:
        sums: Confusion sums (typically of all validation cases added together).

    Returns:
        ``(r_fp, r_fn)``, float64 arrays of shape ``(num_classes - 1,)``; a class with nothing
        predicted and nothing labelled has ``r_fp = r_fn = 1``.
    """
    union = (sums.pred_volume + sums.label_volume - sums.intersection).astype(np.float64)
    empty = union == 0
    safe_union = np.where(empty, 1.0, union)
    r_fp = np.where(empty, 1.0, sums.pred_volume / safe_union)
    r_fn = np.where(empty, 1.0, sums.label_volume / safe_union)
    return r_fp, r_fn


def fp_fn_from_sums(sums: ConfusionSums) -> tuple[float, float]:
    """FP and FN indices of equations 5 and 6 of the paper, averaged over foreground classes.

    Args:
        sums: Confusion sums (typically of all validation cases added together).

    Returns:
        ``(r_fp, r_fn)``, the means of :func:`fp_fn_per_class`; both are 1 for a perfect
        prediction, ``r_fp > r_fn`` means more false positives than false negatives.
    """
    r_fp, r_fn = fp_fn_per_class(sums)
    return float(np.mean(r_fp)), float(np.mean(r_fn))


def dice_per_class(
    pred_labels: np.ndarray, true_labels: np.ndarray, num_classes: int
) -> np.ndarray:
    """Per-class Dice of one volume: ``dice_from_sums(confusion_sums(...))``.

    Args:
        pred_labels: Integer predicted labels.
        true_labels: Integer ground-truth labels of the same shape.
        num_classes: Number of classes, background included.

    Returns:
        Float64 array ``(num_classes - 1,)``, NaN where the class is absent from the label.
    """
    return dice_from_sums(confusion_sums(pred_labels, true_labels, num_classes))


def _nanmean(values: np.ndarray, axis: int | None = None) -> np.ndarray | float:
    with warnings.catch_warnings():
        # An all-NaN slice is a legitimate "undefined" result here, not a warning.
        warnings.simplefilter("ignore", category=RuntimeWarning)
        return np.nanmean(values, axis=axis)


def mean_dice(per_case: np.ndarray) -> float:
    """The overall mean Dice: per class over the cases that contain it, then over classes.

    This is the one definition tf_medseg uses, in training (``best_dice``, ``--target_dice``)
    and in ``tf-medseg-evaluate``: the Decathlon's and the paper's per-class means
    (:func:`mean_dice_per_class`), averaged over the classes that occur. (Averaging each case
    over its classes first weighs a case without the rare class, such as a liver without
    lesions, by its easy class alone, and gives a different number.)

    Args:
        per_case: ``(num_cases, num_classes - 1)`` Dice values (rows from ``dice_per_class``),
            or one case's ``(num_classes - 1,)`` vector.

    Returns:
        The mean, or NaN when no case has a defined class.
    """
    return float(_nanmean(mean_dice_per_class(per_case)))


def mean_dice_per_class(per_case: np.ndarray) -> np.ndarray:
    """Mean Dice of each class over the cases where it is defined.

    Args:
        per_case: ``(num_cases, num_classes - 1)`` Dice values.

    Returns:
        Float64 array ``(num_classes - 1,)``, NaN for a class absent from every case.
    """
    per_case = np.atleast_2d(np.asarray(per_case, dtype=np.float64))
    return np.asarray(_nanmean(per_case, axis=0), dtype=np.float64)
