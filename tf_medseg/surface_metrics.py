"""The Decathlon's surface metrics: NSD (surface Dice), HD95 and ASSD per class, in millimetres.

Dice says how much of a volume overlaps; these say how far apart two boundaries are, in the
labels' own voxel spacing (anisotropic spacings such as 0.7 x 0.7 x 5 mm are the norm):

- **NSD**, the normalised surface distance or surface Dice at a tolerance ``tau`` (mm): the
  fraction of both surfaces that lies within ``tau`` of the other surface,
  ``(|{d in D_pred : d <= tau}| + |{d in D_label : d <= tau}|) / (|D_pred| + |D_label|)``,
  in [0, 1]. The Decathlon ranks by Dice and NSD.
- **HD95**, the 95th percentile Hausdorff distance (mm): the larger of the two directed 95th
  percentiles (``numpy.percentile``, linear interpolation) of the surface distances.
- **ASSD**, the average symmetric surface distance (mm): the mean of both directions'
  distances taken together.

``D_pred`` holds, for every surface voxel of the prediction, the Euclidean distance (mm, between
voxel centres) to the nearest surface voxel of the label, and ``D_label`` the other way round.
A surface voxel is a voxel of the mask with a face neighbour outside it (the mask minus its
erosion by the 6-neighbourhood; outside the volume counts as outside the mask), and each surface
voxel weighs the same. This is MONAI's definition (``compute_surface_dice``,
``compute_hausdorff_distance``, ``compute_average_surface_distance`` with ``symmetric=True`` and
their default ``use_subvoxels=False``). DeepMind's ``surface-distance`` library, which the
Decathlon's evaluation used, weighs surface elements by their area instead, so values differ
slightly from it (more on coarse, anisotropic grids).

Empty masks, as MONAI defines them (DeepMind's library agrees on NSD):

======================  ======  ===========  ===========
prediction / label      NSD     HD95 (mm)    ASSD (mm)
======================  ======  ===========  ===========
both empty              NaN     NaN          NaN
one of the two empty    0       inf          inf
======================  ======  ===========  ===========

Both empty is NaN (0/0: there is no boundary to score), not 1, as in MONAI and DeepMind's
library, and as tf_medseg's Dice of a class absent from the label; means leave NaN out, so such
cases neither reward nor penalise. One mask empty is the worst score: NSD 0 and infinite
distances (a mean over cases that holds one is infinite, as in MONAI). Note that tf_medseg's Dice
is NaN whenever the label is empty (``tf_medseg.metrics``), while NSD is then 0 if anything was
predicted: NSD, like MONAI's, does punish a false positive class.

The distance maps are SimpleITK's signed Maurer maps (exact Euclidean, float32), computed only
inside the bounding box of the two masks, where every surface voxel lies: the crop changes no
distance, and makes a 512 x 512 x 100 volume cost what its organ's box costs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

#: Every metric ``tf-medseg-evaluate`` reports, in its order.
METRICS = ("dice", "nsd", "hd95", "assd")
#: The metrics of this module.
SURFACE_METRICS = ("nsd", "hd95", "assd")
#: NSD tolerance when none is given. Not the challenge's: the per-task tolerances the Decathlon
#: used could not be found in a citable source, so this is a round default, of the order of two
#: in-plane CT voxels; set the task's with ``--nsd_tolerance_mm``.
DEFAULT_NSD_TOLERANCE_MM = 2.0
HD_PERCENTILE = 95.0
# The distance maps are float32 (relative error about 1e-7): a distance that equals the tolerance
# in exact arithmetic must not fall outside it by a rounding.
_TOLERANCE_SLACK = 1e-5


@dataclasses.dataclass(frozen=True)
class SurfaceDistances:
    """The surface distances (mm) of one binary prediction and label, in both directions.

    Attributes:
        pred_to_label: For each surface voxel of the prediction, the distance to the nearest
            surface voxel of the label (``inf`` everywhere when the label is empty).
        label_to_pred: For each surface voxel of the label, the distance to the prediction's
            surface (``inf`` everywhere when the prediction is empty).
    """

    pred_to_label: np.ndarray
    label_to_pred: np.ndarray

    @property
    def empty(self) -> bool:
        """True when both masks are empty: every metric is NaN."""
        return self.pred_to_label.size == 0 and self.label_to_pred.size == 0

    def nsd(self, tolerance_mm: float) -> float:
        """Normalised surface distance (surface Dice) at ``tolerance_mm``; NaN if both empty."""
        if self.empty:
            return math.nan
        limit = tolerance_mm * (1 + _TOLERANCE_SLACK)
        within = np.count_nonzero(self.pred_to_label <= limit) + np.count_nonzero(
            self.label_to_pred <= limit
        )
        return within / (self.pred_to_label.size + self.label_to_pred.size)

    def hausdorff(self, percentile: float = HD_PERCENTILE) -> float:
        """The larger directed ``percentile`` of the distances (HD95 by default)."""
        directions = [d for d in (self.pred_to_label, self.label_to_pred) if d.size]
        if not directions:
            return math.nan
        if any(np.isinf(d).any() for d in directions):
            return math.inf  # one mask empty (a percentile of infinities would be NaN)
        return float(max(np.percentile(d, percentile) for d in directions))

    def assd(self) -> float:
        """Mean of all surface distances of both directions together."""
        if self.empty:
            return math.nan
        return float(np.concatenate([self.pred_to_label, self.label_to_pred]).mean())


def check_spacing(spacing: Sequence[float], ndim: int) -> np.ndarray:
    """Returns the spacing as float64, one positive finite value (mm) per axis.

    Raises:
        ValueError: On a wrong length or a zero, negative or non-finite value.
    """
    spacing = np.asarray(spacing, dtype=np.float64).reshape(-1)
    if spacing.size != ndim or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise ValueError(
            f"spacing must be {ndim} positive finite values (mm), got {spacing.tolist()}"
        )
    return spacing


def surface_voxels(mask: np.ndarray) -> np.ndarray:
    """The mask's voxels that have a face neighbour outside it (outside the array counts).

    Args:
        mask: Boolean array of any rank.

    Returns:
        Boolean array of the mask's shape.
    """
    mask = np.asarray(mask, dtype=bool)
    padded = np.pad(mask, 1)
    interior = mask.copy()
    core = tuple(slice(1, -1) for _ in range(mask.ndim))
    for axis in range(mask.ndim):
        for step in (slice(None, -2), slice(2, None)):
            shifted = list(core)
            shifted[axis] = step
            interior &= padded[tuple(shifted)]
    return mask & ~interior


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def _distance_to(surface: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Distance (mm) of every voxel to the nearest voxel of ``surface`` (float32)."""
    image = sitk.GetImageFromArray(surface.astype(np.uint8))
    image.SetSpacing([float(s) for s in spacing[::-1]])  # SimpleITK's axes are reversed
    signed = sitk.SignedMaurerDistanceMap(
        image, insideIsPositive=False, squaredDistance=False, useImageSpacing=True
    )
    # Negative inside the set: a voxel of the set is at distance 0 from it.
    return np.maximum(sitk.GetArrayViewFromImage(signed), 0)


def surface_distances(
    pred_mask: np.ndarray, label_mask: np.ndarray, spacing: Sequence[float]
) -> SurfaceDistances:
    """The surface distances of one binary prediction against its label.

    Args:
        pred_mask: Boolean (or 0/1) predicted mask, 2-D or 3-D.
        label_mask: Ground-truth mask of the same shape.
        spacing: Voxel size (mm) along each axis of the arrays.

    Returns:
        Both directions' distances; see :class:`SurfaceDistances` for empty masks.

    Raises:
        ValueError: On different shapes, a rank other than 2 or 3, or a bad spacing.
    """
    pred_mask = np.asarray(pred_mask, dtype=bool)
    label_mask = np.asarray(label_mask, dtype=bool)
    if pred_mask.shape != label_mask.shape:
        raise ValueError(
            f"prediction shape {pred_mask.shape} differs from label shape {label_mask.shape}"
        )
    if pred_mask.ndim not in (2, 3):
        raise ValueError(f"masks must be 2-D or 3-D, got shape {pred_mask.shape}")
    spacing = check_spacing(spacing, pred_mask.ndim)
    union = pred_mask | label_mask
    if not union.any():
        return SurfaceDistances(np.zeros(0), np.zeros(0))
    box = _bounding_box(union)
    pred_surface = surface_voxels(pred_mask[box])
    label_surface = surface_voxels(label_mask[box])
    if not label_surface.any() or not pred_surface.any():
        return SurfaceDistances(
            np.full(np.count_nonzero(pred_surface), math.inf),
            np.full(np.count_nonzero(label_surface), math.inf),
        )
    to_label = _distance_to(label_surface, spacing)[pred_surface]
    to_pred = _distance_to(pred_surface, spacing)[label_surface]
    return SurfaceDistances(to_label.astype(np.float64), to_pred.astype(np.float64))


def class_tolerances(tolerance_mm: float | Sequence[float], num_classes: int) -> np.ndarray:
    """One NSD tolerance (mm) per foreground class, from one value or one per class.

    Raises:
        ValueError: On a negative or non-finite tolerance, or a count other than 1 or
            ``num_classes - 1``.
    """
    values = np.atleast_1d(np.asarray(tolerance_mm, dtype=np.float64))
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        raise ValueError(f"NSD tolerances must be finite and >= 0 mm, got {values.tolist()}")
    if values.size == 1:
        return np.full(num_classes - 1, values[0])
    if values.size != num_classes - 1:
        raise ValueError(
            f"{values.size} NSD tolerances for {num_classes - 1} foreground classes: give one "
            "for all or one per class"
        )
    return values


def surface_metrics_per_class(
    pred_labels: np.ndarray,
    true_labels: np.ndarray,
    num_classes: int,
    spacing: Sequence[float],
    tolerance_mm: float | Sequence[float] = DEFAULT_NSD_TOLERANCE_MM,
    metrics: Sequence[str] = SURFACE_METRICS,
) -> dict[str, np.ndarray]:
    """NSD, HD95 and ASSD of every foreground class of one labelled volume.

    Args:
        pred_labels: Integer predicted labels.
        true_labels: Integer ground-truth labels of the same shape.
        num_classes: Classes, background (0) included.
        spacing: Voxel size (mm) along each axis, e.g. the labels' affine's
            (:func:`tf_medseg.data.io.spacing_from_affine`).
        tolerance_mm: NSD tolerance, one for all classes or one per foreground class.
        metrics: Which of :data:`SURFACE_METRICS` to compute.

    Returns:
        ``{metric: float64 array (num_classes - 1,)}`` for the requested metrics.

    Raises:
        ValueError: On an unknown metric, a bad tolerance or spacing, or different shapes.
    """
    unknown = sorted(set(metrics) - set(SURFACE_METRICS))
    if unknown:
        raise ValueError(f"unknown surface metrics {unknown}; choose from {SURFACE_METRICS}")
    tolerances = class_tolerances(tolerance_mm, num_classes)
    results = {name: np.full(num_classes - 1, np.nan) for name in metrics}
    for c in range(1, num_classes):
        distances = surface_distances(pred_labels == c, true_labels == c, spacing)
        for name in metrics:
            if name == "nsd":
                results[name][c - 1] = distances.nsd(tolerances[c - 1])
            elif name == "hd95":
                results[name][c - 1] = distances.hausdorff()
            else:
                results[name][c - 1] = distances.assd()
    return results
