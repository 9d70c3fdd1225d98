"""tf-medseg-export: a trained model, with its whole predict, as a TensorFlow SavedModel.

Usage::

    tf-medseg-export --model=runs/spleen --out=exports/spleen [--tta] [--keep_largest]
        [--roi_size=96] [--overlap=0.5] [--mode=gaussian] [--sw_batch_size=4]
        [--check=Task09_Spleen/imagesTs]
    tf-medseg-export --model=runs/fold0,runs/fold1 --out=exports/spleen_ensemble

The SavedModel's ``serving_default`` signature takes ``image`` (float32 ``[X, Y, Z, C]``, the
NIfTI's data array as stored) and ``affine`` (float64 ``[4, 4]``) and returns ``labels`` (uint8
``[X, Y, Z]``, the input's grid) and ``probabilities`` (float32 ``[X, Y, Z, K]``); see
:mod:`tf_medseg.inference.serving` for what runs inside. The model, its preprocessing and
window settings are read as ``tf-medseg-predict`` reads them, with the same flags. ``--check``
loads the export back and segments the given NIfTI files (a file or a folder) both ways,
printing per file the share of voxels on which the export's labels equal predict's, the same
share within the union of their foregrounds, and the seconds of each.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

import nibabel as nib
import numpy as np
import tensorflow as tf
from absl import app, flags

from tf_medseg.cli.predict import define_window_flags, window_overrides
from tf_medseg.data.io import DataError
from tf_medseg.inference.segmenter import ModelError, Segmenter, list_inputs
from tf_medseg.inference.serving.module import export_segmenter
from tf_medseg.inference.serving.spec import ExportError

FLAGS = flags.FLAGS


def serving_inputs(path: str) -> tuple[np.ndarray, np.ndarray]:
    """A NIfTI file as the signature takes it: float32 ``[X, Y, Z, C]`` and float64 affine."""
    image = nib.load(path)
    data = np.asarray(image.get_fdata(dtype=np.float32))
    if data.ndim == 3:
        data = data[..., None]
    return data, np.asarray(image.affine, np.float64)


def check_export(segmenter: Segmenter, export: str, files: Sequence[str]) -> list[dict]:
    """Segments each file with predict and with the export; their agreement and seconds.

    Returns:
        Per file: ``file``, ``agreement`` (share of equal voxels), ``foreground_agreement``
        (the same within the union of the two foregrounds; 1 when both are empty),
        ``predict_foreground_voxels``,
        ``predict_seconds``, ``export_seconds``.
    """
    serve = tf.saved_model.load(export).signatures["serving_default"]
    rows = []
    for path in files:
        start = time.perf_counter()
        expected, _ = segmenter.segment(path)
        predict_seconds = time.perf_counter() - start
        image, affine = serving_inputs(path)
        start = time.perf_counter()
        labels = serve(image=tf.constant(image), affine=tf.constant(affine))["labels"].numpy()
        export_seconds = time.perf_counter() - start
        union = (expected > 0) | (labels > 0)
        rows.append(
            {
                "file": path,
                "agreement": float(np.mean(labels == expected)),
                "predict_foreground_voxels": int((expected > 0).sum()),
                "foreground_agreement": float(np.mean(labels[union] == expected[union]))
                if union.any()
                else 1.0,
                "predict_seconds": round(predict_seconds, 3),
                "export_seconds": round(export_seconds, 3),
            }
        )
    return rows


def define_flags() -> None:
    """Declares the command's flags (at run time, as ``tf-medseg-predict``)."""
    flags.DEFINE_string(
        "model",
        None,
        "Training workdir (uses best_model.keras) or a .keras file; several separated by commas "
        "are exported as one ensemble.",
    )
    flags.DEFINE_string("out", None, "The SavedModel folder to write.")
    define_window_flags()
    flags.DEFINE_string(
        "check", None, "NIfTI file or folder: segment with predict and the export, compare."
    )


def main(argv: Sequence[str]) -> None:
    """Entry point of ``tf-medseg-export`` (run through ``absl.app``)."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.model or not FLAGS.out:
        raise app.UsageError("--model and --out are required")
    try:
        files = list_inputs(FLAGS.check) if FLAGS.check else []
        segmenter = Segmenter.load(FLAGS.model, tta=FLAGS.tta, **window_overrides())
        export_segmenter(segmenter, FLAGS.out)
        print(
            f"wrote {FLAGS.out}: serving_default(image float32 [X, Y, Z, "
            f"{segmenter.num_channels}], affine float64 [4, 4]) -> labels uint8 [X, Y, Z], "
            f"probabilities float32 [X, Y, Z, {segmenter.num_classes}]"
        )
        for row in check_export(segmenter, FLAGS.out, files):
            print(json.dumps(row))
    except (FileNotFoundError, DataError, ModelError, ExportError) as error:
        raise SystemExit(f"tf-medseg-export: {error}") from error


def run() -> None:
    """Console-script entry point."""
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
