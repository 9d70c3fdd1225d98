"""Validation during training: sliding-window inference over whole volumes, shared across workers.

Each worker predicts its share of the validation volumes (case ``i`` goes to worker
``i % size``), turns the prediction into confusion sums per case (intersection, predicted and
true volumes per foreground class), and the per-case sums are all-reduced. Every worker then
holds the same numbers as a single process would: per-class Dice per case, their means per
class over the cases that contain the class and the overall mean over classes
(:func:`tf_medseg.metrics.mean_dice`, as ``tf-medseg-evaluate``), the FP/FN indices of
equations 5 and 6 over the whole set (per class, and averaged over the classes as the paper
does), and the pooled sums that feed the adaptive sampler.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf

from tf_medseg import metrics
from tf_medseg.distributed import Distributed
from tf_medseg.inference import keep_largest_component, sliding_window_inference
from tf_medseg.surface_metrics import surface_metrics_per_class


@dataclass
class ValidationResult:
    """The outcome of one validation.

    Attributes:
        dice: Per foreground class, mean over the cases that contain it of the per-case Dice.
        mean_dice: Mean of ``dice`` over classes (NaN excluded): the overall mean.
        case_dice: (num_cases, num_classes - 1) per-case Dice, NaN where a label is empty.
        sums: Confusion sums pooled over all cases.
        r_fp: False positive index (equation 5) of the pooled sums, averaged over classes.
        r_fn: False negative index (equation 6), averaged over classes.
        r_fp_per_class: Equation 5 per foreground class, before the average.
        r_fn_per_class: Equation 6 per foreground class.
        example: For image summaries: (image slice, true slice, predicted slice) of the first
            case this worker predicted, or None.
        surface: The surface metrics asked for (``nsd``, ``hd95``, ``assd``), per foreground
            class the mean over the cases where it is defined (mm for the distances; an
            infinite distance, a class missed in some case, makes its mean infinite).
    """

    dice: np.ndarray
    mean_dice: float
    case_dice: np.ndarray
    sums: metrics.ConfusionSums
    r_fp: float
    r_fn: float
    r_fp_per_class: np.ndarray
    r_fn_per_class: np.ndarray
    example: tuple[np.ndarray, np.ndarray, np.ndarray] | None = field(default=None, repr=False)
    surface: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class SurfaceOptions:
    """The surface metrics validation computes besides Dice.

    Attributes:
        metrics: Any of ``nsd``, ``hd95``, ``assd`` (:mod:`tf_medseg.surface_metrics`).
        spacing: The validation volumes' voxel size in mm (the training grid's).
        tolerance_mm: The NSD tolerance.
    """

    metrics: tuple[str, ...]
    spacing: tuple[float, ...]
    tolerance_mm: float


def make_window_predictor(
    model: tf.keras.Model, roi_size: Sequence[int], channels: int, batch: int
):
    """A ``tf.function`` running the model on a fixed-shape batch of windows (traced once)."""
    spec = tf.TensorSpec([batch, *roi_size, channels], tf.float32)

    @tf.function(input_signature=[spec])
    def predict(windows):
        return tf.cast(model(windows, training=False), tf.float32)

    return predict


def _middle_foreground_slice(image, label, pred):
    """The axial slice through the labelled foreground's centre (or the middle one)."""
    zs = np.flatnonzero(label.any(axis=(0, 1)))
    z = int(zs[len(zs) // 2]) if zs.size else label.shape[2] // 2
    return image[:, :, z, 0], label[:, :, z], pred[:, :, z]


def predict_labels(
    predictor, image, roi_size: Sequence[int], overlap: float, mode: str, sw_batch_size: int
) -> np.ndarray:
    """The argmax labels (uint8) of one preprocessed volume ``(*spatial, C)`` by sliding
    window."""
    probs = sliding_window_inference(
        np.asarray(image, np.float32)[None],
        predictor,
        roi_size,
        overlap=overlap,
        mode=mode,
        sw_batch_size=sw_batch_size,
    )
    return np.argmax(np.asarray(probs)[0], axis=-1).astype(np.uint8)


def validate(
    predictor,
    items: Sequence[dict],
    num_classes: int,
    roi_size: Sequence[int],
    overlap: float,
    mode: str = "constant",
    sw_batch_size: int = 1,
    keep_largest: bool = False,
    dist: Distributed | None = None,
    case_offset: int = 0,
    num_cases: int | None = None,
    check_interrupt=None,
    progress: bool = False,
    surface: SurfaceOptions | None = None,
) -> ValidationResult:
    """Scores this worker's validation volumes and combines the result over all workers.

    Args:
        predictor: Callable from (sw_batch_size, *roi, C) windows to (.., K) probabilities.
        items: This worker's preprocessed validation items (``image``, ``label``); item ``j``
            is case ``case_offset + j * size`` of the whole set.
        num_classes: Classes including background.
        roi_size: Sliding-window size.
        overlap: Window overlap (fraction, or voxels >= 1).
        mode: ``constant`` or ``gaussian`` blending.
        sw_batch_size: Windows per predictor call.
        keep_largest: Keep the largest connected component per class before scoring.
        dist: The workers; None for a single process.
        case_offset: This worker's first case index (its rank).
        num_cases: Cases in the whole validation set (default: ``len(items)``).
        check_interrupt: Called before each case; raises to abandon the validation (the
            trainer's Ctrl-C check, single worker only).
        progress: Show a progress bar over this worker's volumes.
        surface: The surface metrics to compute too (None: Dice only).

    Returns:
        The combined :class:`ValidationResult` (identical on every worker).
    """
    dist = dist or Distributed()
    num_cases = len(items) if num_cases is None else num_cases
    per_case = np.zeros((num_cases, 3, num_classes - 1), np.float64)
    names = surface.metrics if surface is not None else ()
    # Per case, like the sums: a row of another worker's case is zeros (NaN and inf survive).
    distances = np.zeros((num_cases, len(names), num_classes - 1), np.float64)
    example = None
    if progress and items:
        from tqdm import tqdm

        items = tqdm(items, desc="validation", unit="volume", leave=False, dynamic_ncols=True)
    for j, item in enumerate(items):
        if check_interrupt is not None:
            check_interrupt()
        pred = predict_labels(predictor, item["image"], roi_size, overlap, mode, sw_batch_size)
        if keep_largest:
            pred = keep_largest_component(pred)
        label = np.asarray(item["label"])
        case = case_offset + j * dist.size
        per_case[case] = metrics.confusion_sums(pred, label, num_classes).to_array()
        if names:
            values = surface_metrics_per_class(
                pred, label, num_classes, surface.spacing, surface.tolerance_mm, names
            )
            distances[case] = np.stack([values[name] for name in names])
        if example is None:
            example = _middle_foreground_slice(np.asarray(item["image"]), label, pred)
    per_case = dist.allreduce_sum(per_case, name="validation_sums")
    if names:
        distances = dist.allreduce_sum(distances, name="validation_surface")
    case_dice = np.stack(
        [metrics.dice_from_sums(metrics.ConfusionSums.from_array(s)) for s in per_case]
    )
    pooled = metrics.ConfusionSums.from_array(per_case.sum(axis=0))
    r_fp_per_class, r_fn_per_class = metrics.fp_fn_per_class(pooled)
    dice = metrics.mean_dice_per_class(case_dice)  # a class empty in every case: NaN
    mean_dice = metrics.mean_dice(case_dice)
    return ValidationResult(
        dice=dice,
        mean_dice=mean_dice,
        case_dice=case_dice,
        sums=pooled,
        r_fp=float(np.mean(r_fp_per_class)),
        r_fn=float(np.mean(r_fn_per_class)),
        r_fp_per_class=r_fp_per_class,
        r_fn_per_class=r_fn_per_class,
        example=example,
        surface={
            name: metrics.mean_dice_per_class(distances[:, k]) for k, name in enumerate(names)
        },
    )


def postprocessing_dice(
    predictor,
    items: Sequence[dict],
    num_classes: int,
    roi_size: Sequence[int],
    overlap: float,
    mode: str = "constant",
    sw_batch_size: int = 1,
    dist: Distributed | None = None,
    case_offset: int = 0,
    num_cases: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per validation case and class, the Dice as predicted and with the class's largest
    component kept (:func:`tf_medseg.postprocessing.case_dice`), over all workers' cases.

    The arguments are :func:`validate`'s. Each worker fills the rows of its cases; a row of
    another worker's case is zeros, so the all-reduced sum is every case's row (a NaN, a class
    not labelled in the case, stays NaN).

    Returns:
        ``(without, with)``, float64 arrays ``(num_cases, num_classes - 1)``, the same on every
        worker.
    """
    from tf_medseg.postprocessing import case_dice

    dist = dist or Distributed()
    num_cases = len(items) if num_cases is None else num_cases
    rows = np.zeros((num_cases, 2, num_classes - 1), np.float64)
    for j, item in enumerate(items):
        pred = predict_labels(predictor, item["image"], roi_size, overlap, mode, sw_batch_size)
        rows[case_offset + j * dist.size] = case_dice(pred, np.asarray(item["label"]), num_classes)
    rows = dist.allreduce_sum(rows, name="postprocessing_dice")
    return rows[:, 0], rows[:, 1]
