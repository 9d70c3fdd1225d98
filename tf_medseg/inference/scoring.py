"""Scoring predicted label files against the labels, in the labels' own geometry.

Predictions and labels are NIfTI files matched by case name; every prediction needs a label,
labels without a prediction are ignored. Per case and class: Dice (:mod:`tf_medseg.metrics`,
NaN for a class absent from the case's ground truth) and, if asked, the Decathlon's surface
metrics (:mod:`tf_medseg.surface_metrics`, millimetres with the labels' spacing). Means are per
class over the cases that contain the class, and the overall mean is the mean of the class means
(:func:`tf_medseg.metrics.mean_dice`, the definition validation uses). ``tf-medseg-evaluate``
is the command line over it.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from absl import logging

from tf_medseg import metrics, surface_metrics
from tf_medseg.data.io import DataError, nifti_cases, read_nifti, spacing_from_affine

# Same geometry within what float32 NIfTI headers can represent.
_AFFINE_ATOL = 1e-3


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """Dice, and the surface metrics asked for, of every case and class, and their means.

    Attributes:
        cases: Case names, sorted.
        dice: float64 array (num_cases, num_classes - 1), NaN where a class is absent.
        class_means: Mean Dice per foreground class over the cases that contain it.
        case_means: Mean Dice per case over the classes it contains.
        overall: Mean of ``class_means`` over classes (NaN excluded), as in training.
        surface: The surface metrics asked for (``"nsd"``, ``"hd95"``, ``"assd"``), each a
            float64 array shaped like ``dice`` (:mod:`tf_medseg.surface_metrics` for NaN and
            inf); empty for Dice alone.
        nsd_tolerance_mm: The NSD tolerance (mm) of each foreground class, when NSD was asked.
    """

    cases: tuple[str, ...]
    dice: np.ndarray
    class_means: np.ndarray
    case_means: np.ndarray
    overall: float
    surface: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    nsd_tolerance_mm: np.ndarray | None = None

    @property
    def metrics(self) -> tuple[str, ...]:
        """The metrics held, Dice first."""
        return ("dice", *self.surface)

    def values(self, metric: str) -> np.ndarray:
        """The (num_cases, num_classes - 1) table of one metric."""
        return self.dice if metric == "dice" else self.surface[metric]

    def means(self, metric: str) -> tuple[np.ndarray, np.ndarray, float]:
        """Per-class means, per-case means and the overall mean of one metric.

        The same definitions as Dice's (NaN excluded, overall = mean of the class means); an
        infinite distance makes the means that include it infinite.
        """
        if metric == "dice":
            return self.class_means, self.case_means, self.overall
        table = self.surface[metric]
        class_means = _nanmean(table, axis=0)
        return class_means, _nanmean(table, axis=1), float(_nanmean(class_means))


def _nanmean(values: np.ndarray, axis: int | None = None):
    with warnings.catch_warnings():
        # A class absent from every case (all NaN) has an undefined mean, not a warning.
        warnings.simplefilter("ignore", category=RuntimeWarning)
        return np.nanmean(values, axis=axis)


def match_cases(pred_dir: str | Path, label_dir: str | Path) -> list[tuple[str, Path, Path]]:
    """Pairs each prediction with the label of the same case.

    Returns:
        ``(case, prediction path, label path)`` sorted by case.

    Raises:
        FileNotFoundError: When a folder is missing, holds no prediction, or a prediction has
            no label (the message names the file).
    """
    predictions = {k: Path(v) for k, v in nifti_cases(str(pred_dir)).items()}
    labels = {k: Path(v) for k, v in nifti_cases(str(label_dir)).items()}
    if not predictions:
        raise FileNotFoundError(f"no NIfTI predictions (*.nii, *.nii.gz) in {pred_dir}")
    pairs = []
    for name, pred_path in predictions.items():
        if name not in labels:
            raise FileNotFoundError(
                f"prediction {pred_path} has no label {name}.nii.gz or {name}.nii in {label_dir}"
            )
        pairs.append((name, pred_path, labels[name]))
    unused = len(labels) - len(pairs)
    if unused:
        logging.info("%d labels in %s have no prediction and are not scored", unused, label_dir)
    return pairs


def load_labels(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Reads an integer label volume and its affine from a NIfTI file.

    Returns:
        ``(labels, affine)``; labels are 3-D (trailing singleton axes dropped), integer.

    Raises:
        DataError: When the file cannot be read or holds non-integer or negative labels.
    """
    volume = read_nifti(str(path))
    data = volume.data
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if not np.issubdtype(data.dtype, np.integer):
        if not np.all(np.isfinite(data)) or not np.array_equal(data, np.round(data)):
            raise DataError(f"{path}: holds non-integer label values")
        data = data.astype(np.int32)
    if data.size and data.min() < 0:
        raise DataError(f"{path}: holds negative label values (min {data.min()})")
    return data, volume.affine


def evaluate_case(
    pred_path: str | Path, label_path: str | Path, num_classes: int | None = None
) -> np.ndarray:
    """Dice per foreground class of one prediction file against its label file.

    Args:
        pred_path: Predicted label NIfTI file.
        label_path: Ground-truth label NIfTI file.
        num_classes: Classes including background; None takes ``max label + 1`` of the two.

    Returns:
        float64 array (num_classes - 1,), NaN where the class is absent from the label.

    Raises:
        DataError: On a shape or affine mismatch, or labels outside ``num_classes``.
    """
    return score_case(pred_path, label_path, num_classes)["dice"]


def score_case(
    pred_path: str | Path,
    label_path: str | Path,
    num_classes: int | None = None,
    metric_names: Sequence[str] = ("dice",),
    nsd_tolerance_mm: float | Sequence[float] = surface_metrics.DEFAULT_NSD_TOLERANCE_MM,
) -> dict[str, np.ndarray]:
    """Dice and the surface metrics asked for, per foreground class, of one case.

    Args:
        pred_path: Predicted label NIfTI file.
        label_path: Ground-truth label NIfTI file.
        num_classes: Classes including background; None takes ``max label + 1`` of the two.
        metric_names: Metrics of :data:`tf_medseg.surface_metrics.METRICS`; Dice always comes.
        nsd_tolerance_mm: NSD tolerance (mm), one for all classes or one per foreground class.

    Returns:
        ``{metric: float64 array (num_classes - 1,)}``; distances in mm with the label's spacing.

    Raises:
        DataError: On a shape or affine mismatch, or labels outside ``num_classes``.
    """
    pred, label, affine, num_classes = _read_case(pred_path, label_path, num_classes)
    scores = {"dice": metrics.dice_from_sums(metrics.confusion_sums(pred, label, num_classes))}
    wanted = [m for m in surface_metrics.SURFACE_METRICS if m in metric_names]
    if wanted:
        scores |= surface_metrics.surface_metrics_per_class(
            pred, label, num_classes, spacing_from_affine(affine), nsd_tolerance_mm, wanted
        )
    return scores


def _read_case(
    pred_path: str | Path, label_path: str | Path, num_classes: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Reads and checks a prediction and its label: (pred, label, label affine, num_classes)."""
    pred, pred_affine = load_labels(pred_path)
    label, label_affine = load_labels(label_path)
    if pred.shape != label.shape:
        raise DataError(
            f"prediction {pred_path} has shape {pred.shape} but label {label_path} has "
            f"shape {label.shape}"
        )
    if not np.allclose(pred_affine, label_affine, atol=_AFFINE_ATOL):
        raise DataError(
            f"prediction {pred_path} and label {label_path} have different affines:\n"
            f"{pred_affine}\nvs\n{label_affine}"
        )
    largest = max(int(pred.max(initial=0)), int(label.max(initial=0)))
    if num_classes is None:
        num_classes = max(largest + 1, 2)
    elif largest >= num_classes:
        source = pred_path if int(pred.max(initial=0)) == largest else label_path
        raise DataError(f"{source}: holds label {largest}, outside num_classes={num_classes}")
    return pred, label, label_affine, num_classes


def evaluate_dirs(
    pred_dir: str | Path,
    label_dir: str | Path,
    num_classes: int | None = None,
    metric_names: Sequence[str] = ("dice",),
    nsd_tolerance_mm: float | Sequence[float] = surface_metrics.DEFAULT_NSD_TOLERANCE_MM,
) -> Evaluation:
    """Scores every prediction of a folder against the label of the same case.

    Args:
        pred_dir: Folder of predicted label files.
        label_dir: Folder of ground-truth label files.
        num_classes: Classes including background; None takes the largest label seen + 1, or
            one more than the number of per-class NSD tolerances when several are given.
        metric_names: Metrics of :data:`tf_medseg.surface_metrics.METRICS`; Dice always comes.
        nsd_tolerance_mm: NSD tolerance (mm), one for all classes or one per foreground class.

    Returns:
        The per-case, per-class tables and their means.

    Raises:
        ValueError: On an unknown metric or a bad tolerance.
    """
    unknown = sorted(set(metric_names) - set(surface_metrics.METRICS))
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; choose from {surface_metrics.METRICS}")
    tolerances = np.atleast_1d(np.asarray(nsd_tolerance_mm, dtype=np.float64))
    if num_classes is None and tolerances.size > 1:
        num_classes = tolerances.size + 1
    surface_metrics.class_tolerances(tolerances, num_classes or 2)  # checks the values
    pairs = match_cases(pred_dir, label_dir)
    scores = [score_case(p, g, num_classes, metric_names, tolerances) for _, p, g in pairs]
    width = max(len(s["dice"]) for s in scores)
    tables = {}
    for name in scores[0]:
        tables[name] = np.full((len(scores), width), np.nan)
        for row, score in zip(tables[name], scores, strict=True):
            row[: len(score[name])] = score[name]
    dice = tables.pop("dice")
    class_means = metrics.mean_dice_per_class(dice)
    case_means = np.array([metrics.mean_dice(row) for row in dice])
    overall = metrics.mean_dice(dice)
    nsd_tolerance = (
        surface_metrics.class_tolerances(tolerances, width + 1) if "nsd" in tables else None
    )
    return Evaluation(
        tuple(n for n, _, _ in pairs), dice, class_means, case_means, overall, tables, nsd_tolerance
    )


def table_rows(result: Evaluation, digits: int = 4, metric: str = "dice") -> list[list[str]]:
    """One metric's table as text cells: a header, one row per case, and a row of means."""

    def cell(value: float) -> str:
        return "nan" if np.isnan(value) else f"{value:.{digits}f}"  # inf prints as "inf"

    table = result.values(metric)
    class_means, case_means, overall = result.means(metric)
    header = ["case"] + [f"class_{c}" for c in range(1, table.shape[1] + 1)] + ["mean"]
    rows = [header]
    for name, scores, mean in zip(result.cases, table, case_means, strict=True):
        rows.append([name] + [cell(v) for v in scores] + [cell(mean)])
    rows.append(["mean"] + [cell(v) for v in class_means] + [cell(overall)])
    return rows


def metric_title(result: Evaluation, metric: str) -> str:
    """The line above a surface metric's table: what it is and its unit."""
    if metric == "nsd":
        tolerances = ", ".join(f"{t:g}" for t in np.unique(result.nsd_tolerance_mm))
        return f"NSD (surface Dice) at {tolerances} mm"
    return {"hd95": "HD95 (mm)", "assd": "ASSD (mm)"}.get(metric, "Dice")


def format_table(result: Evaluation, metric: str = "dice") -> str:
    """Renders one metric's table (Dice by default) as aligned text."""
    rows = table_rows(result, metric=metric)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    )


def write_csv(result: Evaluation, path: str | Path) -> None:
    """Writes the Dice table, means included, as CSV."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerows(table_rows(result, digits=6))


def _json_number(value: float) -> float | str | None:
    # Strict JSON has neither NaN nor Infinity.
    if math.isnan(value):
        return None
    return "inf" if math.isinf(value) else float(value)


def to_json(result: Evaluation) -> dict:
    """Every case's per-class metrics and their means, as strict-JSON-ready values.

    NaN (undefined) becomes ``None`` and an infinite distance the string ``"inf"``. Class
    indices are strings (JSON keys), 1 for the first foreground class.
    """
    names = result.metrics
    classes = [str(c) for c in range(1, result.dice.shape[1] + 1)]
    cases = {
        case: {
            cls: {m: _json_number(result.values(m)[row, col]) for m in names}
            for col, cls in enumerate(classes)
        }
        for row, case in enumerate(result.cases)
    }
    means = {m: result.means(m) for m in names}
    tolerance = None
    if result.nsd_tolerance_mm is not None:
        tolerance = dict(zip(classes, map(float, result.nsd_tolerance_mm), strict=True))
    return {
        "metrics": list(names),
        "nsd_tolerance_mm": tolerance,
        "cases": cases,
        "means": {
            "classes": {
                cls: {m: _json_number(means[m][0][col]) for m in names}
                for col, cls in enumerate(classes)
            },
            "overall": {m: _json_number(means[m][2]) for m in names},
        },
    }
