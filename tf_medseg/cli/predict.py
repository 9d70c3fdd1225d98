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

import dataclasses
import json
import os
from collections.abc import Sequence

import nibabel as nib
import numpy as np
import tensorflow as tf
from absl import app, flags, logging
from tqdm import tqdm

import tf_medseg.models  # noqa: F401  (registers the custom layers that load_model needs)
from tf_medseg.data.io import DataError, write_nifti
from tf_medseg.data.msd import case_name
from tf_medseg.inference import (
    BLEND_MODES,
    keep_largest_component,
    mean_predictor,
    overlap_from_flag,
    sliding_window_inference,
)
from tf_medseg.postprocessing import read_decision
from tf_medseg.training.config import TrainConfig
from tf_medseg.training.validation import make_window_predictor
from tf_medseg.transforms.base import Compose
from tf_medseg.transforms.load import LoadImage
from tf_medseg.transforms.preprocessing import preprocessing_from_config
from tf_medseg.transforms.spatial import invert_label

FLAGS = flags.FLAGS

MODEL_FILE = "best_model.keras"
NIFTI_SUFFIXES = (".nii.gz", ".nii")


class ModelError(ValueError):
    """The model, its saved preprocessing and the requested settings do not fit together."""


@dataclasses.dataclass(frozen=True)
class WindowSettings:
    """How the sliding window runs over a preprocessed volume.

    Attributes:
        roi_size: Window size per axis (divisible by the model's downsampling factor).
        overlap: A fraction in [0, 1), or an int number of voxels.
        mode: ``constant`` or ``gaussian`` blending.
        sw_batch_size: Windows per forward pass.
        keep_largest: Keep the largest connected component of the classes below.
        largest_classes: The classes ``keep_largest`` applies to (None: every foreground
            class), as chosen by validation (``postprocessing.json``).
    """

    roi_size: tuple[int, int, int]
    overlap: float | int
    mode: str
    sw_batch_size: int
    keep_largest: bool
    largest_classes: tuple[int, ...] | None = None


def model_files(model: str) -> tuple[str, str]:
    """Finds the model file and the folder holding its preprocessing and configuration.

    Args:
        model: A training workdir or a ``.keras`` file.

    Returns:
        ``(model file, folder)``.

    Raises:
        FileNotFoundError: The model file or ``preprocessing.json`` is missing.
    """
    path = os.path.join(model, MODEL_FILE) if os.path.isdir(model) else model
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such model file (train first, or pass a .keras file)")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isfile(os.path.join(folder, "preprocessing.json")):
        raise FileNotFoundError(
            f"{folder}/preprocessing.json not found: predict needs the preprocessing the trainer "
            "wrote beside the model"
        )
    return path, folder


def window_settings(config: TrainConfig, **overrides) -> WindowSettings:
    """The training run's validation window settings, with the given overrides (None: keep).

    Raises:
        ModelError: A window size that is not 3 positive multiples of ``2**config.depth``.
    """
    values = {
        "roi_size": config.val_roi_size,
        "overlap": config.val_overlap,
        "mode": config.val_mode,
        "sw_batch_size": config.val_sw_batch_size,
        "keep_largest": config.val_keep_largest,
    }
    values.update({k: v for k, v in overrides.items() if v is not None})
    roi = [int(r) for r in values["roi_size"]]
    roi = roi * 3 if len(roi) == 1 else roi
    step = 2**config.depth
    if len(roi) != 3 or any(r <= 0 or r % step for r in roi):
        raise ModelError(
            f"window size {roi} must be 3 positive multiples of {step} (2^depth of the model)"
        )
    values["overlap"] = overlap_from_flag(values["overlap"])
    values["roi_size"] = tuple(roi)
    values["sw_batch_size"] = int(values["sw_batch_size"])
    values["keep_largest"] = bool(values["keep_largest"])
    return WindowSettings(**values)


def chosen_postprocessing(settings: WindowSettings, folders: Sequence[str]) -> WindowSettings:
    """The window settings with the post-processing chosen by validation after training
    (``postprocessing.json`` in each model's folder, :mod:`tf_medseg.postprocessing`) in place
    of the configuration's ``val_keep_largest``. An ensemble keeps a class's largest component
    only where every model's validation chose it (said in one line when they differ); a model
    without the file keeps the configuration's setting for all."""
    try:
        decisions = [read_decision(folder) for folder in folders]
    except ValueError as err:
        raise ModelError(str(err)) from err
    if any(d is None for d in decisions):
        return settings
    chosen = [set(d.keep_largest) for d in decisions]
    classes = set.intersection(*chosen)
    if any(c != classes for c in chosen):
        logging.warning(
            "the ensemble's models chose the largest component for other classes (%s): kept "
            "for those all chose, %s",
            "; ".join(f"{f}: {sorted(c) or 'none'}" for f, c in zip(folders, chosen, strict=True)),
            sorted(classes) or "none",
        )
    return dataclasses.replace(
        settings, keep_largest=bool(classes), largest_classes=tuple(sorted(classes))
    )


def list_inputs(path: str) -> list[str]:
    """The NIfTI files to segment: the file itself, or every .nii/.nii.gz of a folder, sorted.

    Raises:
        FileNotFoundError: Nothing to segment there.
        DataError: Two files of a folder have the same case name.
    """
    if os.path.isfile(path):
        if not path.endswith(NIFTI_SUFFIXES):
            raise DataError(f"{path}: not a NIfTI file (.nii or .nii.gz)")
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such file or folder")
    files = sorted(
        os.path.join(path, name)
        for name in os.listdir(path)
        if name.endswith(NIFTI_SUFFIXES) and not name.startswith(".")
    )
    if not files:
        raise FileNotFoundError(f"{path}: no .nii or .nii.gz files in this folder")
    seen: dict[str, str] = {}
    for file in files:
        name = case_name(file)
        if name in seen:
            raise DataError(f"{file} and {seen[name]} are the same case {name!r}")
        seen[name] = file
    return files


class Segmenter:
    """Trained models with their preprocessing and window settings, applied to NIfTI files.

    With several models (an ensemble: folds, or configurations sharing one preprocessing) the
    softmax probabilities of all are averaged in each window before the argmax; with ``tta``
    also over the 8 mirrorings of each window batch (:func:`tf_medseg.inference.mean_predictor`).

    Args:
        models: The Keras model, or several with the same input channels and classes
            (channels-last input, softmax output).
        preprocessing: The deterministic chain of training (loading included).
        settings: Sliding-window settings.
        modalities: Channel names, for messages.
        tta: Test-time augmentation by mirroring.
    """

    def __init__(
        self,
        models,
        preprocessing: Compose,
        settings: WindowSettings,
        modalities: Sequence[str] = (),
        tta: bool = False,
    ):
        models = list(models) if isinstance(models, list | tuple) else [models]
        load = preprocessing.transforms[0] if len(preprocessing) else None
        if not isinstance(load, LoadImage):
            raise ModelError("the preprocessing chain must start with LoadImage")
        self.num_channels = int(models[0].input_shape[-1])
        self.num_classes = int(models[0].output_shape[-1])
        shapes = {(int(m.input_shape[-1]), int(m.output_shape[-1])) for m in models}
        if len(shapes) > 1:
            raise ModelError(
                f"the models differ in (input channels, classes): {sorted(shapes)}; an ensemble "
                "needs one task"
            )
        if load.num_channels != self.num_channels:
            raise ModelError(
                f"the model takes {self.num_channels} channel(s) but its preprocessing loads "
                f"{load.num_channels}; preprocessing.json is not this model's"
            )
        self.preprocessing = preprocessing
        self.settings = settings
        self.modalities = tuple(modalities)
        self.tta = bool(tta)
        self.num_models = len(models)
        self.models = models
        self.predictor = mean_predictor(
            [
                make_window_predictor(
                    m, settings.roi_size, self.num_channels, settings.sw_batch_size
                )
                for m in models
            ],
            tta=self.tta,
        )

    @classmethod
    def load(cls, model: str | Sequence[str], tta: bool = False, **overrides) -> Segmenter:
        """Loads one model, or an ensemble, with the files the trainer wrote beside each.

        Args:
            model: A training workdir or a ``.keras`` file; several as a list or separated by
                commas. The first one's ``config.json`` gives the window settings.
            tta: Test-time augmentation by mirroring.
            **overrides: :class:`WindowSettings` fields to take instead of ``config.json``'s.

        Returns:
            The segmenter.

        Raises:
            FileNotFoundError: A model or its ``preprocessing.json`` is missing.
            ModelError: A bad ``preprocessing.json``, a missing ``config.json``, window settings
                a model cannot take, or models of an ensemble with different preprocessing or
                classes.
        """
        names = model.split(",") if isinstance(model, str) else list(model)
        runs = [_read_run(name.strip()) for name in names if name.strip()]
        if not runs:
            raise FileNotFoundError("no model given")
        first = runs[0]
        settings = window_settings(first["config"], **overrides)
        if overrides.get("keep_largest") is None:
            settings = chosen_postprocessing(settings, [run["folder"] for run in runs])
        for run in runs[1:]:
            for key, what in (("image_chain", "preprocessing.json"), ("labels", "classes")):
                if run[key] != first[key]:
                    raise ModelError(
                        f"{run['folder']}: its {what} differs from {first['folder']}'s; the "
                        "models of an ensemble must share preprocessing and classes"
                    )
            window_settings(run["config"], roi_size=settings.roi_size)  # the window fits it
        models = [tf.keras.models.load_model(run["path"], compile=False) for run in runs]
        return cls(models, first["chain"], settings, first["modalities"], tta=tta)

    def check_channels(self, path: str) -> None:
        """Refuses a file whose channel count differs from the model's, reading the header only.

        Unreadable files pass here; loading them reports the problem.

        Raises:
            DataError: The file has another number of channels.
        """
        try:
            shape = nib.load(path).shape
        except (nib.filebasedimages.ImageFileError, OSError, EOFError, ValueError):
            return
        channels = 1 if len(shape) == 3 else shape[3] if len(shape) == 4 else None
        if channels != self.num_channels:
            names = f" ({', '.join(self.modalities)})" if self.modalities else ""
            raise DataError(
                f"{path}: image of shape {tuple(shape)} has {channels} channel(s), the model "
                f"takes {self.num_channels}{names}"
            )

    def segment(self, path: str) -> tuple[np.ndarray, np.ndarray]:
        """Segments one file.

        Args:
            path: A NIfTI image.

        Returns:
            ``(labels, affine)``: uint8 labels with the file's spatial shape, and its affine.

        Raises:
            DataError: The file is unreadable or does not fit the model.
        """
        item = self.preprocessing({"case": case_name(path), "image": path})
        s = self.settings
        probs = sliding_window_inference(
            np.asarray(item["image"], np.float32)[None],
            self.predictor,
            s.roi_size,
            overlap=s.overlap,
            mode=s.mode,
            sw_batch_size=s.sw_batch_size,
        )
        labels = np.argmax(probs[0], axis=-1).astype(np.uint8)
        if s.keep_largest:
            labels = keep_largest_component(labels, classes=s.largest_classes)
        geometry = item["geometry"]
        return invert_label(labels, geometry), np.asarray(geometry["source_affine"])

    def segment_files(self, files: Sequence[str], output: str, progress: bool = True) -> list[str]:
        """Segments files into ``output/<case>.nii.gz``; checks every file's channels first.

        Returns:
            The written paths.
        """
        for path in files:
            self.check_channels(path)
        os.makedirs(output, exist_ok=True)
        written = []
        for path in tqdm(files, desc="predict", unit="file", disable=not progress):
            labels, affine = self.segment(path)
            out = os.path.join(output, f"{case_name(path)}.nii.gz")
            write_nifti(out, labels, affine)
            written.append(out)
        return written


#: Saved transforms that act on the label alone (the foreground/background voxel lists of the
#: patch sampler): prediction, without a label, does not run them.
LABEL_ONLY_TRANSFORMS = ("ForegroundIndices",)


def _read_run(model: str) -> dict:
    """The files beside one model: its path and folder, configuration, preprocessing (the
    chain and its config), class labels and modalities."""
    path, folder = model_files(model)
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        # The .keras model takes windows of any size (its spatial input is free): nothing but
        # the run's configuration says which window, overlap and blending it was validated with.
        raise ModelError(
            f"{config_path} not found: the window settings (val_roi_size, val_overlap, val_mode) "
            "are the training run's and the model does not hold them; copy config.json from "
            "the run's workdir beside the model"
        )
    with open(config_path) as f:
        config = TrainConfig.from_json(f.read())
    preprocessing_path = os.path.join(folder, "preprocessing.json")
    with open(preprocessing_path) as f:
        try:
            preprocessing = json.load(f)
            chain = preprocessing_from_config(preprocessing)
        except ValueError as err:  # also json.JSONDecodeError
            raise ModelError(f"{preprocessing_path}: {err}") from err
    task = {}
    task_path = os.path.join(folder, "task.json")
    if os.path.isfile(task_path):
        with open(task_path) as f:
            task = json.load(f)
    return {
        "path": path,
        "folder": folder,
        "config": config,
        "preprocessing": preprocessing,
        # What an ensemble's models must share: the chain without the patch sampler's settings
        # (its seed is the run's), which an image without a label passes untouched.
        "image_chain": [
            entry
            for entry in preprocessing["transforms"]
            if entry.get("name") not in LABEL_ONLY_TRANSFORMS
        ],
        "chain": chain,
        "labels": task.get("labels"),
        "modalities": tuple(task.get("modalities", ())),
    }


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
