"""tf-medseg-evaluate: per-case, per-class Dice and surface metrics of predicted label files.

Usage::

    tf-medseg-evaluate --pred_dir=runs/spleen/predictions --label_dir=Task09_Spleen/labelsTr \\
        [--csv=dice.csv] [--json=metrics.json] [--num_classes=2] \\
        [--metrics=dice,nsd,hd95,assd] [--nsd_tolerance_mm=2]

Predictions and labels are NIfTI files matched by case name (the file name without ``.nii`` or
``.nii.gz``); every prediction needs a label, labels without a prediction are ignored (so a
folder of validation predictions can be scored against a whole ``labelsTr``). Dice comes from
:mod:`tf_medseg.metrics`, NaN for a class absent from the ground truth of a case. Means are
per class over the cases that contain the class, and the overall mean is the mean of the class
means (:func:`tf_medseg.metrics.mean_dice`, the same definition as validation during training);
each case's mean over its classes is in the table's last column.

Beside Dice, the Decathlon's surface metrics (:mod:`tf_medseg.surface_metrics`, in millimetres
with the labels' spacing): NSD at ``--nsd_tolerance_mm``, HD95 and ASSD, one table each after the
Dice table, with the same means (NaN excluded; an infinite distance, from a class missing in the
prediction or the label, makes its means infinite). ``--metrics=dice`` skips them. The CSV holds
the Dice table; ``--json`` writes every case's per-class metrics and their means::

    {"metrics": [...], "nsd_tolerance_mm": {"1": 2.0},
     "cases": {CASE: {"1": {"dice": ..., "nsd": ..., "hd95": ..., "assd": ...}}},
     "means": {"classes": {"1": {...}}, "overall": {...}}}

where an undefined value (NaN) is ``null`` and an infinite distance is the string ``"inf"``,
so that the file is strict JSON.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from absl import app, flags, logging

from tf_medseg import jsonio, metrics, surface_metrics
from tf_medseg.data.io import DataError, read_nifti, spacing_from_affine

FLAGS = flags.FLAGS
flags.DEFINE_string("pred_dir", None, "Folder of predicted label NIfTI files.")
flags.DEFINE_string("label_dir", None, "Folder of ground-truth label NIfTI files.")
flags.DEFINE_string("csv", None, "Optional path of a CSV file for the table.")
flags.DEFINE_integer(
    "num_classes", None, "Number of classes including background (default: from the data)."
)
flags.DEFINE_string(
    "json", None, "Optional path of a JSON file with every case's per-class metrics and means."
)
flags.DEFINE_list(
    "metrics",
    list(surface_metrics.METRICS),
    "Metrics to report, of dice,nsd,hd95,assd. Dice is always reported; --metrics=dice skips "
    "the surface metrics, which cost a distance map per class and case.",
)
flags.DEFINE_list(
    "nsd_tolerance_mm",
    [f"{surface_metrics.DEFAULT_NSD_TOLERANCE_MM:g}"],
    "NSD tolerance in mm: one value for every class, or one per foreground class (comma "
    "separated; then also the number of classes unless --num_classes is given). The default "
    "is not the Decathlon's per-task value: set the task's.",
)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
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


def case_name(path: str | Path) -> str | None:
    """Returns the case name of a NIfTI file name, or None for another kind of file."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def list_cases(folder: str | Path) -> dict[str, Path]:
    """Maps case names to the NIfTI files of a folder.

    Raises:
        FileNotFoundError: When the folder does not exist.
        DataError: When two files give the same case (``a.nii`` and ``a.nii.gz``).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        name = case_name(path)
        if name is None or name.startswith("."):
            continue
        if name in found:
            raise DataError(f"{path} and {found[name]} are the same case {name!r}")
        found[name] = path
    return found


def match_cases(pred_dir: str | Path, label_dir: str | Path) -> list[tuple[str, Path, Path]]:
    """Pairs each prediction with the label of the same case.

    Returns:
        ``(case, prediction path, label path)`` sorted by case.

    Raises:
        FileNotFoundError: When a folder is missing, holds no prediction, or a prediction has
            no label (the message names the file).
    """
    predictions = list_cases(pred_dir)
    labels = list_cases(label_dir)
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


def _parse_metric_flags() -> tuple[list[str], list[float]]:
    """The --metrics names and --nsd_tolerance_mm values, or one line and exit 2."""

    def fail(message: str) -> None:
        print(f"tf-medseg-evaluate: {message}", file=sys.stderr)
        sys.exit(2)

    names = [m.strip().lower() for m in FLAGS.metrics if m.strip()]
    unknown = [m for m in names if m not in surface_metrics.METRICS]
    if unknown or not names:
        fail(
            f"--metrics={','.join(FLAGS.metrics)}: unknown metric "
            f"{', '.join(unknown) or '(none given)'}; choose from "
            f"{','.join(surface_metrics.METRICS)}"
        )
    try:
        tolerances = [float(t) for t in FLAGS.nsd_tolerance_mm]
    except ValueError:
        tolerances = []
    if not tolerances or not all(math.isfinite(t) and t >= 0 for t in tolerances):
        fail(
            f"--nsd_tolerance_mm={','.join(FLAGS.nsd_tolerance_mm)}: give one distance in mm "
            "(>= 0) for all classes, or one per foreground class, e.g. --nsd_tolerance_mm=2"
        )
    if FLAGS.num_classes and len(tolerances) not in (1, FLAGS.num_classes - 1):
        fail(
            f"--nsd_tolerance_mm has {len(tolerances)} values for --num_classes="
            f"{FLAGS.num_classes}: give one for all classes or one per foreground class "
            f"({FLAGS.num_classes - 1})"
        )
    return names, tolerances


def main(argv: Sequence[str]) -> None:
    """Entry point of ``tf-medseg-evaluate`` (run through ``absl.app``)."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.pred_dir or not FLAGS.label_dir:
        raise app.UsageError("--pred_dir and --label_dir are required")
    names, tolerances = _parse_metric_flags()
    try:
        result = evaluate_dirs(
            FLAGS.pred_dir, FLAGS.label_dir, FLAGS.num_classes, names, tolerances
        )
    except (FileNotFoundError, DataError) as error:
        # Bad input is the user's to fix: the message names the file, a traceback adds nothing.
        raise SystemExit(f"tf-medseg-evaluate: {error}") from error
    print(format_table(result))
    for metric in result.surface:
        print(f"\n{metric_title(result, metric)}\n{format_table(result, metric)}")
    if FLAGS.csv:
        write_csv(result, FLAGS.csv)
        logging.info("wrote %s", FLAGS.csv)
    if FLAGS.json:
        jsonio.write_json(FLAGS.json, to_json(result))
        logging.info("wrote %s", FLAGS.json)


def run() -> None:
    """Console-script entry point."""
    app.run(main)


if __name__ == "__main__":
    run()
