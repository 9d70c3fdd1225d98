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

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf
from absl import logging

from tf_medseg import metrics
from tf_medseg.config import surface_metric_names
from tf_medseg.distributed import Distributed
from tf_medseg.inference.scoring import load_labels
from tf_medseg.inference.segmenter import Segmenter, chosen_postprocessing
from tf_medseg.inference.window import (
    keep_largest_component,
    make_window_predictor,
    mean_predictor,
    predict_labels,
    window_settings,
)
from tf_medseg.postprocessing import PostprocessingDecision, decide_from_dice, write_decision
from tf_medseg.rundir import RunDir
from tf_medseg.surface_metrics import surface_metrics_per_class
from tf_medseg.training.records import WorkdirError
from tf_medseg.training.saving import write_failure


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


def _middle_foreground_slice(image, label, pred):
    """The axial slice through the labelled foreground's centre (or the middle one)."""
    zs = np.flatnonzero(label.any(axis=(0, 1)))
    z = int(zs[len(zs) // 2]) if zs.size else label.shape[2] // 2
    return image[:, :, z, 0], label[:, :, z], pred[:, :, z]


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
    return _combined(per_case, distances, names, example)


def _combined(per_case: np.ndarray, distances: np.ndarray, names, example) -> ValidationResult:
    """The result of every worker's per-case sums and distances (all-reduced)."""
    case_dice = np.stack(
        [metrics.dice_from_sums(metrics.ConfusionSums.from_array(s)) for s in per_case]
    )
    pooled = metrics.ConfusionSums.from_array(per_case.sum(axis=0))
    r_fp_per_class, r_fn_per_class = metrics.fp_fn_per_class(pooled)
    return ValidationResult(
        dice=metrics.mean_dice_per_class(case_dice),  # a class empty in every case: NaN
        mean_dice=metrics.mean_dice(case_dice),
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


class Validator:
    """Scores models on the run's validation cases: this worker's share of them, combined over
    the workers (:func:`validate`, :func:`postprocessing_dice`), with the run's window settings.

    Args:
        config: The run's configuration (``val_*``, ``spacing``).
        num_classes, num_channels: The task's.
        source: This worker's cached validation cases (None: it has none).
        num_cases: Validation cases of the whole run.
        dist: The workers.
        files: This worker's validation cases as files (``image``, ``label``), for
            :meth:`native`.
        prefix: The training's deterministic preprocessing, for :meth:`native`.
    """

    def __init__(
        self,
        config,
        num_classes: int,
        num_channels: int,
        source,
        num_cases: int,
        dist,
        files: Sequence[dict] = (),
        prefix=None,
    ):
        self.config = config
        self.num_classes, self.num_channels = num_classes, num_channels
        self.source, self.num_cases, self.dist = source, num_cases, dist
        self.files, self.prefix = list(files), prefix
        self.window = window_settings(config)  # the --val_* flags, as predict reads them
        self.training_predictor = None  # of the training model, traced at its first validation
        self._training_segmenter = None

    def items(self) -> list[dict]:
        """This worker's preprocessed validation items, in case order."""
        if self.source is None:
            return []
        entries = self.source.epoch_items()
        return [item for _, item in sorted(entries, key=lambda e: e[0])]

    def predictor_of(self, model):
        """The window predictor of ``model`` (traced once per window shape; with ``--val_tta``
        the mean over the 8 mirrorings)."""
        window = self.window
        predictor = make_window_predictor(
            model, window.roi_size, self.num_channels, window.sw_batch_size
        )
        return mean_predictor([predictor], tta=self.config.val_tta)

    def _window_args(self) -> tuple:
        w = self.window
        return (w.roi_size, w.overlap, w.mode, w.sw_batch_size)

    def score(self, model, check_interrupt=None, progress: bool = False) -> ValidationResult:
        """The training model's validation (its predictor kept for the next calls)."""
        if self.training_predictor is None:
            self.training_predictor = self.predictor_of(model)
        roi, overlap, mode, sw_batch = self._window_args()
        return validate(
            self.training_predictor,
            self.items(),
            self.num_classes,
            roi,
            overlap,
            mode,
            sw_batch,
            self.config.val_keep_largest,
            self.dist,
            case_offset=self.dist.rank,
            num_cases=self.num_cases,
            check_interrupt=check_interrupt,
            progress=progress,
            surface=self.surface_options(),
        )

    def surface_options(self) -> SurfaceOptions | None:
        """What ``--val_metrics`` asks besides Dice (None: nothing)."""
        c = self.config
        names = surface_metric_names(c.val_metrics)
        if not names:
            return None
        return SurfaceOptions(names, tuple(float(s) for s in c.spacing), c.val_nsd_tolerance_mm)

    def largest_component_dice(self, model) -> tuple[np.ndarray, np.ndarray]:
        """:func:`postprocessing_dice` of ``model`` on the validation cases."""
        roi, overlap, mode, sw_batch = self._window_args()
        return postprocessing_dice(
            self.predictor_of(model),
            self.items(),
            self.num_classes,
            roi,
            overlap,
            mode,
            sw_batch,
            self.dist,
            case_offset=self.dist.rank,
            num_cases=self.num_cases,
        )

    def choose_postprocessing(self, workdir: str, chief: bool) -> PostprocessingDecision | None:
        """Decides per class whether keeping its largest component raises the best model's
        mean validation Dice (:mod:`tf_medseg.postprocessing`), on the validation cases as
        preprocessed (the training grid), shared out across the workers like validation; the
        chief writes ``postprocessing.json`` and logs one line per class.

        Returns:
            The decision, or None without validation cases or a best model.

        Raises:
            WorkdirError: The chief could not write the decision.
        """
        path = RunDir(workdir).best_model
        if not self.num_cases or not os.path.isfile(path):
            return None
        best = tf.keras.models.load_model(path, compile=False)
        without, with_ = self.largest_component_dice(best)
        decision = decide_from_dice(without, with_)
        if chief:
            try:
                write_decision(workdir, decision)
            except OSError as err:
                raise WorkdirError(
                    f"cannot write the post-processing choice to {workdir}: "
                    f"{write_failure(err)} (the model is saved; tf-medseg-predict then uses "
                    "--val_keep_largest's setting)"
                ) from err
            for line in decision.describe().splitlines():
                logging.info("post-processing: %s", line)
        return decision

    def native(self, model, chosen_in: str | None = None) -> NativeResult:
        """Segments this worker's validation cases from their files as ``tf-medseg-predict``
        does (:class:`~tf_medseg.inference.segmenter.Segmenter`: preprocessing, windows,
        post-processing, back to the file's grid) and scores them against their label files in
        the labels' own geometry, as ``tf-medseg-evaluate`` does; combined over the workers.

        Args:
            model: The training model (``chosen_in`` None: its segmenter is kept, traced once)
                or the best model.
            chosen_in: The run folder whose ``postprocessing.json`` decides the best model's
                post-processing (None: ``--val_keep_largest``).
        """
        start = time.time()
        segmenter = self._segmenter(model, chosen_in)
        rows = np.zeros((self.num_cases, 3, self.num_classes - 1), np.float64)
        for j, item in enumerate(self.files):
            pred, _ = segmenter.segment(item["image"])
            truth, _ = load_labels(item["label"])
            sums = metrics.confusion_sums(pred, truth, self.num_classes)
            rows[self.dist.rank + j * self.dist.size] = sums.to_array()
        rows = self.dist.allreduce_sum(rows, name="native_sums")
        case_dice = np.stack(
            [metrics.dice_from_sums(metrics.ConfusionSums.from_array(r)) for r in rows]
        )
        return NativeResult(
            dice=metrics.mean_dice_per_class(case_dice),
            mean_dice=metrics.mean_dice(case_dice),
            case_dice=case_dice,
            seconds=time.time() - start,
        )

    def native_of_best(self, workdir: str) -> NativeResult | None:
        """:meth:`native` of the run's best model with its chosen post-processing (None
        without validation cases or a best model)."""
        path = RunDir(workdir).best_model
        if not self.num_cases or not os.path.isfile(path):
            return None
        best = tf.keras.models.load_model(path, compile=False)
        result = self.native(best, chosen_in=workdir)
        if self.dist.is_chief:
            logging.info(
                "validation in the labels' own geometry (the best model, as tf-medseg-predict "
                "segments and tf-medseg-evaluate scores): mean Dice %.4f (%.1f s)",
                result.mean_dice,
                result.seconds,
            )
        return result

    def _segmenter(self, model, chosen_in: str | None) -> Segmenter:
        settings = self.window
        if chosen_in is not None:  # the best model, with the chosen post-processing
            settings = chosen_postprocessing(settings, [chosen_in])
            return Segmenter([model], self.prefix, settings, tta=self.config.val_tta)
        if self._training_segmenter is None:  # the training model's, traced once
            self._training_segmenter = Segmenter(
                [model], self.prefix, settings, tta=self.config.val_tta
            )
        return self._training_segmenter


@dataclass
class NativeResult:
    """Validation in the labels' own geometry (:meth:`Validator.native`).

    Attributes:
        dice: Per foreground class, the mean over the cases that contain it.
        mean_dice: Their mean (NaN excluded), as ``tf-medseg-evaluate``'s overall mean.
        case_dice: (num_cases, num_classes - 1) per-case Dice.
        seconds: This worker's wall time for it.
    """

    dice: np.ndarray
    mean_dice: float
    case_dice: np.ndarray
    seconds: float

    def to_json(self, class_names: Sequence[str]) -> dict:
        """Per-class and mean Dice (None where undefined), the cases and the seconds."""

        def number(value):
            return round(float(value), 6) if np.isfinite(value) else None

        return {
            "mean_dice": number(self.mean_dice),
            "dice": {n: number(v) for n, v in zip(class_names, self.dice, strict=True)},
            "cases": int(len(self.case_dice)),
            "seconds": round(self.seconds, 3),
        }
