"""tf-medseg-evaluate: per-case, per-class Dice of predicted label files against ground truth.

Usage::

    tf-medseg-evaluate --pred_dir=runs/spleen/predictions --label_dir=Task09_Spleen/labelsTr \\
        [--csv=dice.csv] [--num_classes=2]

Predictions and labels are NIfTI files matched by case name (the file name without ``.nii`` or
``.nii.gz``); every prediction needs a label, labels without a prediction are ignored (so a
folder of validation predictions can be scored against a whole ``labelsTr``). Dice comes from
:mod:`tf_medseg.metrics`, NaN for a class absent from the ground truth of a case. Means are
per class over the cases that contain the class, and the overall mean is the mean of the class
means (:func:`tf_medseg.metrics.mean_dice`, the same definition as validation during training);
each case's mean over its classes is in the table's last column.
"""

from __future__ import annotations

import csv
import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from absl import app, flags, logging

from tf_medseg import metrics
from tf_medseg.data.io import DataError, read_nifti

FLAGS = flags.FLAGS
flags.DEFINE_string("pred_dir", None, "Folder of predicted label NIfTI files.")
flags.DEFINE_string("label_dir", None, "Folder of ground-truth label NIfTI files.")
flags.DEFINE_string("csv", None, "Optional path of a CSV file for the table.")
flags.DEFINE_integer(
    "num_classes", None, "Number of classes including background (default: from the data)."
)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
# Same geometry within what float32 NIfTI headers can represent.
_AFFINE_ATOL = 1e-3


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """Dice of every case and class, and its means.

    Attributes:
        cases: Case names, sorted.
        dice: float64 array (num_cases, num_classes - 1), NaN where a class is absent.
        class_means: Mean Dice per foreground class over the cases that contain it.
        case_means: Mean Dice per case over the classes it contains.
        overall: Mean of ``class_means`` over classes (NaN excluded), as in training.
    """

    cases: tuple[str, ...]
    dice: np.ndarray
    class_means: np.ndarray
    case_means: np.ndarray
    overall: float


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
    return metrics.dice_from_sums(metrics.confusion_sums(pred, label, num_classes))


def evaluate_dirs(
    pred_dir: str | Path, label_dir: str | Path, num_classes: int | None = None
) -> Evaluation:
    """Scores every prediction of a folder against the label of the same case.

    Args:
        pred_dir: Folder of predicted label files.
        label_dir: Folder of ground-truth label files.
        num_classes: Classes including background; None takes the largest label seen + 1.

    Returns:
        The per-case, per-class Dice table and its means.
    """
    pairs = match_cases(pred_dir, label_dir)
    scores = [evaluate_case(p, g, num_classes) for _, p, g in pairs]
    width = max(len(s) for s in scores)
    dice = np.full((len(scores), width), np.nan)
    for row, score in zip(dice, scores, strict=True):
        row[: len(score)] = score
    class_means = metrics.mean_dice_per_class(dice)
    case_means = np.array([metrics.mean_dice(row) for row in dice])
    overall = metrics.mean_dice(dice)
    return Evaluation(tuple(n for n, _, _ in pairs), dice, class_means, case_means, overall)


def table_rows(result: Evaluation, digits: int = 4) -> list[list[str]]:
    """The table as text cells: a header, one row per case, and a final row of means."""

    def cell(value: float) -> str:
        return "nan" if np.isnan(value) else f"{value:.{digits}f}"

    header = ["case"] + [f"class_{c}" for c in range(1, result.dice.shape[1] + 1)] + ["mean"]
    rows = [header]
    for name, scores, mean in zip(result.cases, result.dice, result.case_means, strict=True):
        rows.append([name] + [cell(v) for v in scores] + [cell(mean)])
    rows.append(["mean"] + [cell(v) for v in result.class_means] + [cell(result.overall)])
    return rows


def format_table(result: Evaluation) -> str:
    """Renders the Dice table as aligned text."""
    rows = table_rows(result)
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


def main(argv: Sequence[str]) -> None:
    """Entry point of ``tf-medseg-evaluate`` (run through ``absl.app``)."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.pred_dir or not FLAGS.label_dir:
        raise app.UsageError("--pred_dir and --label_dir are required")
    try:
        result = evaluate_dirs(FLAGS.pred_dir, FLAGS.label_dir, FLAGS.num_classes)
    except (FileNotFoundError, DataError) as error:
        # Bad input is the user's to fix: the message names the file, a traceback adds nothing.
        raise SystemExit(f"tf-medseg-evaluate: {error}") from error
    print(format_table(result))
    if FLAGS.csv:
        write_csv(result, FLAGS.csv)
        logging.info("wrote %s", FLAGS.csv)


def run() -> None:
    """Console-script entry point."""
    app.run(main)


if __name__ == "__main__":
    run()
