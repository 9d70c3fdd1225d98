"""Benchmark of test-time augmentation and ensembles: Dice and seconds on labelled volumes.

For one model and for an ensemble of several (``--models``, comma separated workdirs), with and
without ``--tta`` (the mean over the 8 mirrorings of every window batch), it segments every
image of ``--images`` as ``tf-medseg-predict`` does
(:class:`~tf_medseg.inference.segmenter.Segmenter`) and scores it against ``--labels``: per-class
Dice per case, their mean over the cases, and the seconds per case (the first case of each row
also loads the models and traces the predictors; the median over cases is reported)::

    python -m tf_medseg.bench.ensemble --models=runs/demo,runs/demo_b \\
        --images=data/synthetic_spleen/imagesTs --labels=data/synthetic_spleen/labelsTs \\
        --json=runs/bench/ensemble.json
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np
from absl import app, flags

from tf_medseg.bench import cpu_name, write_json
from tf_medseg.data.io import read_nifti
from tf_medseg.data.msd import case_name
from tf_medseg.inference.segmenter import Segmenter, list_inputs
from tf_medseg.metrics import dice_per_class

FLAGS = flags.FLAGS
flags.DEFINE_list("models", None, "Training workdirs; the first alone, then all as an ensemble.")
flags.DEFINE_string("images", None, "Folder of images to segment.")
flags.DEFINE_string("labels", None, "Folder of their labels (same file names).")
flags.DEFINE_string("json", None, "Where to write the results.")


def score(models: list[str], tta: bool, images: list[str], labels: str) -> dict:
    """Segments ``images`` with the ensemble of ``models``; Dice per class and seconds."""
    segmenter = Segmenter.load(models, tta=tta)
    per_case, seconds = {}, []
    for path in images:
        start = time.perf_counter()
        prediction, _ = segmenter.segment(path)
        seconds.append(time.perf_counter() - start)
        truth = read_nifti(os.path.join(labels, os.path.basename(path))).data
        dice = dice_per_class(prediction, truth, segmenter.num_classes)
        per_case[case_name(path)] = [float(d) for d in dice]
    dice = np.nanmean(np.array(list(per_case.values()), dtype=np.float64), axis=0)
    return {
        "models": models,
        "tta": tta,
        "dice_per_class": [round(float(d), 4) for d in dice],
        "mean_dice": round(float(np.nanmean(dice)), 4),
        "per_case": per_case,
        "seconds_per_case": round(statistics.median(seconds), 2),
        "seconds_first_case": round(seconds[0], 2),
    }


def main(argv):
    del argv
    if not FLAGS.models or not FLAGS.images or not FLAGS.labels:
        raise app.UsageError("--models, --images and --labels are required")
    images = list_inputs(FLAGS.images)
    sets = [FLAGS.models[:1]] + ([FLAGS.models] if len(FLAGS.models) > 1 else [])
    rows = [score(models, tta, images, FLAGS.labels) for models in sets for tta in (False, True)]
    print(f"{len(images)} case(s) of {FLAGS.images}; {cpu_name()}, {os.cpu_count()} CPUs")
    print("| models | TTA | Dice per class | mean Dice | s per case (median) |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        classes = ", ".join(f"{d:.4f}" for d in row["dice_per_class"])
        print(
            f"| {len(row['models'])} | {'yes' if row['tta'] else 'no'} | {classes} | "
            f"{row['mean_dice']:.4f} | {row['seconds_per_case']:.1f} |"
        )
    if FLAGS.json:
        write_json(FLAGS.json, {"cpu": cpu_name(), "images": FLAGS.images, "rows": rows})


if __name__ == "__main__":
    app.run(main)
