"""Benchmark of the deterministic prefix, step by step, on the volumes of a task folder.

The prefix (load, reorient, resample, crop, normalise, index lists) runs once per item per
cache fill, so at MSD size (512 x 512 in-plane, tens to hundreds of slices) its seconds per
volume bound how fast the smart cache can replace items. For each training case of
``--data_dir`` (the first ``--num_cases``, sorted by name) this runs the task's prefix one
transform at a time and records each step's wall time (the minimum of ``--repeats`` runs, so
that a busy neighbour on a shared machine inflates it less), the whole prefix's time, the
source and output shapes, and the bytes of the output item's arrays. The table shows the
median over the cases and one row per case; the CT intensity statistics (once per run, not per
volume) are timed apart::

    python -m tf_medseg.bench.prefix --data_dir=/tmp/msd/spleen --json=runs/bench/prefix.json
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np
from absl import app, flags

from tf_medseg.bench import cpu_name, write_json
from tf_medseg.data.msd import load_task
from tf_medseg.data.stats import compute_intensity_stats
from tf_medseg.transforms import build_preprocessing
from tf_medseg.transforms.base import Compose

FLAGS = flags.FLAGS

#: Step names of the table, by transform class; a class not listed is shown by its own name.
STEP_NAMES = {
    "LoadImage": "load",
    "Orientation": "orient",
    "Resample": "resample",
    "CropForeground": "crop",
    "ResampleAndCrop": "resample+crop",
    "NormalizeCT": "normalise",
    "NormalizeMRI": "normalise",
    "ForegroundIndices": "indices",
}


def define_flags() -> None:
    """Declares the benchmark's flags (at run time, so importing the module declares none)."""
    flags.DEFINE_string("data_dir", None, "Task folder (MSD layout) whose training cases to time.")
    flags.DEFINE_integer("num_cases", 0, "Cases to time (the first, by name); 0 for all.")
    flags.DEFINE_integer("repeats", 2, "Runs per case; each step's minimum is reported.")
    flags.DEFINE_bool("stats", True, "Also time the CT intensity statistics (CT tasks only).")
    flags.DEFINE_string("json", "", "Where to write the results (nothing written if empty).")


def item_bytes(item: dict) -> int:
    """Bytes held by an item's arrays."""
    return int(sum(v.nbytes for v in item.values() if isinstance(v, np.ndarray)))


def time_steps(prefix: Compose, item: dict, repeats: int = 1) -> dict:
    """Runs ``prefix`` on ``item`` one transform at a time, timing each.

    Args:
        prefix: A chain of transforms (the task's deterministic prefix).
        item: ``{"case", "image", "label"}`` with file paths.
        repeats: Runs; each step's minimum (and the minimum total) is reported.

    Returns:
        ``{"case", "source_shape", "shape", "steps": {name: s}, "total_s", "bytes"}``.
    """
    runs = []
    for _ in range(max(1, repeats)):
        data, steps = dict(item), {}
        start = time.perf_counter()
        for transform in prefix.transforms:
            name = STEP_NAMES.get(type(transform).__name__, type(transform).__name__)
            step_start = time.perf_counter()
            data = transform(data)
            steps[name] = steps.get(name, 0.0) + time.perf_counter() - step_start
        runs.append((time.perf_counter() - start, steps))
    out = data
    return {
        "case": item["case"],
        "source_shape": list(out["geometry"]["source_shape"]),
        "shape": list(out["image"].shape[:3]),
        "steps": {name: min(r[1][name] for r in runs) for name in runs[0][1]},
        "total_s": min(r[0] for r in runs),
        "bytes": item_bytes(out),
    }


def run_benchmark(
    data_dir: str, num_cases: int = 0, repeats: int = 2, time_stats: bool = True
) -> dict:
    """Times the task's prefix on its training cases.

    Args:
        data_dir: Task folder.
        num_cases: Cases to time (the first by name), 0 for all.
        repeats: Runs per case.
        time_stats: Time the CT intensity statistics over the timed cases.

    Returns:
        The report: settings, ``stats_s`` (or None), one result per case and the medians.
    """
    task = load_task(data_dir)
    items = sorted(task.training, key=lambda it: it["case"])
    items = items[:num_cases] if num_cases else items
    stats_s = None
    if task.is_ct and time_stats:
        start = time.perf_counter()
        compute_intensity_stats(items, task.num_channels, task.num_classes, progress=False)
        stats_s = time.perf_counter() - start
    prefix = build_preprocessing(task, items, progress=False)
    cases = []
    for item in items:
        cases.append(time_steps(prefix, item, repeats))
        row = cases[-1]
        print(f"{row['case']}: {row['total_s']:.2f} s", flush=True)
    names = list(cases[0]["steps"])
    median = {name: statistics.median(c["steps"][name] for c in cases) for name in names}
    return {
        "data_dir": os.path.abspath(data_dir),
        "task": task.name,
        "repeats": repeats,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "stats_s": stats_s,
        "stats_cases": len(items) if stats_s is not None else 0,
        "cases": cases,
        "median": {
            "steps": median,
            "total_s": statistics.median(c["total_s"] for c in cases),
            "bytes": statistics.median(c["bytes"] for c in cases),
        },
    }


def format_table(report: dict) -> str:
    """The results as a fixed-width text table (seconds per step, bytes in MB)."""
    names = list(report["median"]["steps"])
    head = f"{'case':14s} {'source':>14s} {'output':>14s} " + " ".join(f"{n:>13s}" for n in names)
    lines = [
        f"{report['task']} ({report['data_dir']}), seconds per volume, min of {report['repeats']}",
        head + f" {'total':>8s} {'MB':>7s}",
    ]

    def row(case, source, shape, steps, total, nbytes):
        cells = " ".join(f"{steps[n]:13.3f}" for n in names)
        return f"{case:14s} {source:>14s} {shape:>14s} {cells} {total:8.2f} {nbytes / 2**20:7.1f}"

    med = report["median"]
    lines.append(row("median", "", "", med["steps"], med["total_s"], med["bytes"]))
    for c in report["cases"]:
        source = "x".join(str(s) for s in c["source_shape"])
        shape = "x".join(str(s) for s in c["shape"])
        lines.append(row(c["case"], source, shape, c["steps"], c["total_s"], c["bytes"]))
    if report["stats_s"] is not None:
        lines.append(
            f"CT intensity statistics over {report['stats_cases']} cases: "
            f"{report['stats_s']:.2f} s (once per run)"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.data_dir:
        raise app.UsageError("--data_dir is required")
    report = run_benchmark(FLAGS.data_dir, FLAGS.num_cases, FLAGS.repeats, FLAGS.stats)
    print(format_table(report))
    if FLAGS.json:
        write_json(FLAGS.json, report)


if __name__ == "__main__":
    define_flags()
    app.run(main)
