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

import math
import sys
from collections.abc import Sequence

from absl import app, flags, logging

from tf_medseg import jsonio, surface_metrics
from tf_medseg.data.io import DataError
from tf_medseg.inference.scoring import (
    evaluate_dirs,
    format_table,
    metric_title,
    to_json,
    write_csv,
)

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
