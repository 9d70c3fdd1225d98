"""tf-medseg-predict: segments NIfTI volumes with a trained model, in the input's own geometry.

Usage::

    tf-medseg-predict --model=runs/spleen --input=Task09_Spleen/imagesTs --output=preds \\
        [--keep_largest] [--roi_size=160] [--overlap=0.25] [--mode=gaussian] [--sw_batch_size=2]
        [--tta]
    tf-medseg-predict --model=runs/fold0,runs/fold1,runs/fold2 --input=... --output=...

``--model`` is a training workdir (its ``best_model.keras`` is used) or a ``.keras`` file; the
files the trainer writes beside it say how to preprocess: ``preprocessing.json`` (the
deterministic chain, required), ``config.json`` (the sliding-window defaults: ``val_roi_size``,
``val_overlap``, ``val_mode``, ``val_keep_largest``; required) and ``task.json`` (modality and
class names).
Each input goes through the same deterministic preprocessing as in training (reorient, resample,
crop, normalise), the sliding window, argmax and optionally the largest connected component per
class; then the resampling, crop and reorientation are undone and ``OUTPUT/<case>.nii.gz`` is
written as uint8 labels with the input's exact shape and affine. Several models (comma
separated) are an ensemble: their probabilities are averaged before the argmax, after a check
that they share preprocessing and classes; ``--tta`` averages over the 8 mirrorings of every
window batch too (nnU-Net's test-time augmentation, 8 times the forward passes). Bad input
(wrong channel count, unreadable file) stops with a one-line message naming the file and exit
code 1.
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import app, flags

from tf_medseg.data.io import DataError
from tf_medseg.inference.segmenter import ModelError, Segmenter, list_inputs
from tf_medseg.inference.window import BLEND_MODES

FLAGS = flags.FLAGS


def define_window_flags() -> None:
    """Declares the flags that override the run's window settings, and ``--tta`` (shared by
    ``tf-medseg-predict`` and ``tf-medseg-export``)."""
    flags.DEFINE_bool(
        "keep_largest", None, "Keep the largest connected component per class (default: config)."
    )
    flags.DEFINE_list("roi_size", None, "Window size, 1 or 3 ints (default: config val_roi_size).")
    flags.DEFINE_float(
        "overlap",
        None,
        "Window overlap: fraction < 1 or voxels >= 1 (default: config val_overlap).",
    )
    flags.DEFINE_enum("mode", None, BLEND_MODES, "Window blending (default: config val_mode).")
    flags.DEFINE_integer("sw_batch_size", None, "Windows per forward pass (default: config).")
    flags.DEFINE_bool(
        "tta", False, "Test-time augmentation: the mean over the 8 flips of the three axes."
    )


def window_overrides() -> dict:
    """The window flags as :meth:`Segmenter.load` keywords (None: the run's setting)."""
    return {
        "roi_size": FLAGS.roi_size,
        "overlap": FLAGS.overlap,
        "mode": FLAGS.mode,
        "sw_batch_size": FLAGS.sw_batch_size,
        "keep_largest": FLAGS.keep_largest,
    }


def define_flags() -> None:
    """Declares the command's flags (at run time, so that importing this module declares none
    and cannot clash with ``tf-medseg-train``'s ``--model`` in the same process)."""
    flags.DEFINE_string(
        "model",
        None,
        "Training workdir (uses best_model.keras) or a .keras file; several separated by commas "
        "average their probabilities (an ensemble of folds or configurations).",
    )
    flags.DEFINE_string(
        "input", None, "A NIfTI image, or a folder whose .nii/.nii.gz files are used."
    )
    flags.DEFINE_string("output", None, "Folder for the label files (<case>.nii.gz).")
    define_window_flags()
    flags.DEFINE_bool("progress", True, "Progress bar over files.")


def main(argv: Sequence[str]) -> None:
    """Entry point of ``tf-medseg-predict`` (run through ``absl.app``)."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.model or not FLAGS.input or not FLAGS.output:
        raise app.UsageError("--model, --input and --output are required")
    try:
        files = list_inputs(FLAGS.input)
        segmenter = Segmenter.load(FLAGS.model, tta=FLAGS.tta, **window_overrides())
        written = segmenter.segment_files(files, FLAGS.output, progress=FLAGS.progress)
    except (FileNotFoundError, DataError, ModelError) as error:
        # Bad input is the user's to fix: the message names the file, a traceback adds nothing.
        raise SystemExit(f"tf-medseg-predict: {error}") from error
    print(f"wrote {len(written)} label file(s) to {FLAGS.output}")


def run() -> None:
    """Console-script entry point."""
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
