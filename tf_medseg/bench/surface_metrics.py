"""Benchmark of the surface metrics (NSD, HD95, ASSD) on a Decathlon-size label pair.

``tf-medseg-evaluate`` computes two distance maps per class and case; this times them where
they cost most, at the size of an MSD CT volume (``--shape``, 512 x 512 x 100 by default) with
its anisotropic spacing (``--spacing``, 0.7 x 0.7 x 5 mm). The label holds a liver-sized
ellipsoid (class 1, 160 x 140 x 150 mm) with a 30 mm lesion in it (class 2); the prediction
is the same pair moved by 2 voxels in-plane and one slice, slightly resized. Three rows:

- ``dice``: Dice alone, the floor any evaluation pays;
- ``surface``: Dice, NSD, HD95 and ASSD of both classes, the distance maps cropped to each
  class's bounding box;
- ``surface, stray voxels``: the same with a few false-positive voxels in the volume's corners,
  so that the bounding box, and so the distance maps, span the whole volume (the worst case).

Each row reports the median and the minimum seconds per case over ``--repeats`` runs::

    python -m tf_medseg.bench.surface_metrics --json=runs/bench/surface_metrics.json
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np
from absl import app, flags

from tf_medseg import metrics, surface_metrics
from tf_medseg.bench import cpu_name, write_json

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Declares the benchmark's flags (at run time, so importing the module declares none)."""
    flags.DEFINE_list("shape", ["512", "512", "100"], "Volume shape in voxels (x, y, z).")
    flags.DEFINE_list("spacing", ["0.7", "0.7", "5.0"], "Voxel spacing in mm (x, y, z).")
    flags.DEFINE_float("nsd_tolerance_mm", surface_metrics.DEFAULT_NSD_TOLERANCE_MM, "NSD tau.")
    flags.DEFINE_integer("repeats", 3, "Timed runs per row.")
    flags.DEFINE_string("json", "", "Where to write the results (nothing written if empty).")


def _ellipsoid(shape, spacing, centre_mm, radii_mm) -> np.ndarray:
    # One axis at a time keeps the peak memory at a few float32 volumes.
    total = np.zeros(shape, dtype=np.float32)
    for axis, (n, s, c, r) in enumerate(zip(shape, spacing, centre_mm, radii_mm, strict=True)):
        coordinate = ((np.arange(n, dtype=np.float32) * s - c) / r) ** 2
        total += coordinate.reshape([-1 if a == axis else 1 for a in range(len(shape))])
    return total <= 1


def label_pair(shape, spacing) -> tuple[np.ndarray, np.ndarray]:
    """A liver-sized organ with a lesion (label) and a moved, resized copy (prediction)."""
    extent = np.asarray(shape) * np.asarray(spacing)
    organ = np.array([80.0, 70.0, 75.0])
    lesion = np.array([15.0, 15.0, 15.0])
    centre = extent / 2
    shift = 2 * np.asarray(spacing) * np.array([1, 1, 0.5])
    label = np.zeros(shape, dtype=np.uint8)
    pred = np.zeros(shape, dtype=np.uint8)
    label[_ellipsoid(shape, spacing, centre, organ)] = 1
    label[_ellipsoid(shape, spacing, centre + [20, 10, 0], lesion)] = 2
    pred[_ellipsoid(shape, spacing, centre + shift, organ * 1.02)] = 1
    pred[_ellipsoid(shape, spacing, centre + [20, 10, 0] + shift, lesion * 0.9)] = 2
    return pred, label


def score(pred, label, spacing, tolerance, surface: bool) -> dict:
    """Dice, and the surface metrics if asked, of both classes (as evaluate's score_case)."""
    result = {"dice": metrics.dice_from_sums(metrics.confusion_sums(pred, label, 3))}
    if surface:
        result |= surface_metrics.surface_metrics_per_class(pred, label, 3, spacing, tolerance)
    return {name: [round(float(v), 4) for v in values] for name, values in result.items()}


def time_row(name, pred, label, spacing, tolerance, surface, repeats) -> dict:
    """Seconds per case of one row, and the metrics it gave."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        values = score(pred, label, spacing, tolerance, surface)
        seconds.append(time.perf_counter() - start)
    return {
        "row": name,
        "seconds_per_case_median": round(statistics.median(seconds), 3),
        "seconds_per_case_min": round(min(seconds), 3),
        "metrics": values,
    }


def main(argv):
    del argv
    shape = tuple(int(v) for v in FLAGS.shape)
    spacing = tuple(float(v) for v in FLAGS.spacing)
    pred, label = label_pair(shape, spacing)
    stray = pred.copy()
    for corner in ((0, 0, 0), (-1, -1, -1), (0, -1, 0), (-1, 0, -1)):
        stray[corner] = 1
    tolerance, repeats = FLAGS.nsd_tolerance_mm, FLAGS.repeats
    rows = [
        time_row("dice", pred, label, spacing, tolerance, False, repeats),
        time_row("surface", pred, label, spacing, tolerance, True, repeats),
        time_row("surface, stray voxels", stray, label, spacing, tolerance, True, repeats),
    ]
    print(
        f"{'x'.join(map(str, shape))} voxels at {'x'.join(map(str, spacing))} mm, "
        f"NSD at {tolerance:g} mm; {cpu_name()}, {os.cpu_count()} CPUs"
    )
    print("| row | s per case (median) | s (min) | NSD class 1, 2 | HD95 (mm) | ASSD (mm) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        found = row["metrics"]

        def pair(name, found=found):
            return ", ".join(f"{v:g}" for v in found[name]) if name in found else "-"

        print(
            f"| {row['row']} | {row['seconds_per_case_median']:.2f} | "
            f"{row['seconds_per_case_min']:.2f} | {pair('nsd')} | {pair('hd95')} | "
            f"{pair('assd')} |"
        )
    if FLAGS.json:
        write_json(
            FLAGS.json,
            {
                "cpu": cpu_name(),
                "cpus": os.cpu_count(),
                "shape": shape,
                "spacing_mm": spacing,
                "nsd_tolerance_mm": tolerance,
                "repeats": repeats,
                "rows": rows,
            },
        )


if __name__ == "__main__":
    define_flags()
    app.run(main)
