"""The segmenter: trained models with their preprocessing and window settings, applied to
whole volumes in their own geometry (what ``tf-medseg-predict``, ensembles, the serving export
and the benchmarks use).

A model's folder (a training workdir, or the folder of a ``.keras`` file) holds what the
trainer wrote beside it (:mod:`tf_medseg.rundir`): ``preprocessing.json`` (the deterministic
chain, required), ``config.json`` (the sliding-window defaults, required), ``task.json``
(modality and class names) and ``postprocessing.json`` (the largest-component choice). Each
input goes through the training's preprocessing, the sliding window (several models: their
probabilities averaged; ``tta``: also over the 8 mirrorings), argmax and the chosen
post-processing; then the resampling, crop and reorientation are undone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
import types
from collections.abc import Sequence

import nibabel as nib
import numpy as np
import tensorflow as tf
from absl import logging
from tqdm import tqdm

import tf_medseg.models  # noqa: F401  (registers the custom layers that load_model needs)
from tf_medseg import rundir
from tf_medseg.data.io import DataError, nifti_case, nifti_cases, write_nifti
from tf_medseg.data.msd import case_name
from tf_medseg.inference.window import (
    WindowSettings,
    keep_largest_component,
    make_window_predictor,
    mean_predictor,
    predict_labels,
    window_settings,
)
from tf_medseg.postprocessing import read_decision
from tf_medseg.rundir import RunDir
from tf_medseg.transforms.base import Compose
from tf_medseg.transforms.load import LoadImage
from tf_medseg.transforms.preprocessing import preprocessing_from_config
from tf_medseg.transforms.spatial import invert_label


class ModelError(ValueError):
    """The model, its saved preprocessing and the requested settings do not fit together."""


def model_files(model: str) -> tuple[str, str]:
    """Finds the model file and the folder holding its preprocessing and configuration.

    Args:
        model: A training workdir or a ``.keras`` file.

    Returns:
        ``(model file, folder)``.

    Raises:
        FileNotFoundError: The model file or ``preprocessing.json`` is missing.
    """
    path = RunDir(model).best_model if os.path.isdir(model) else model
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such model file (train first, or pass a .keras file)")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isfile(RunDir(folder).preprocessing):
        raise FileNotFoundError(
            f"{folder}/preprocessing.json not found: predict needs the preprocessing the trainer "
            "wrote beside the model"
        )
    return path, folder


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
        if nifti_case(path) is None:
            raise DataError(f"{path}: not a NIfTI file (.nii or .nii.gz)")
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such file or folder")
    files = sorted(nifti_cases(path).values())
    if not files:
        raise FileNotFoundError(f"{path}: no .nii or .nii.gz files in this folder")
    return files


class Segmenter:
    """Trained models with their preprocessing and window settings, applied to NIfTI files.

    With several models (an ensemble: folds, or configurations sharing one preprocessing) the
    softmax probabilities of all are averaged in each window before the argmax; with ``tta``
    also over the 8 mirrorings of each window batch
    (:func:`tf_medseg.inference.window.mean_predictor`).

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
        self.last_times: dict[str, float] = {}  # the last segment()'s seconds by stage
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
        settings = _window(first["config"], **overrides)
        if overrides.get("keep_largest") is None:
            settings = chosen_postprocessing(settings, [run["folder"] for run in runs])
        for run in runs[1:]:
            for key, what in (("image_chain", "preprocessing.json"), ("labels", "classes")):
                if run[key] != first[key]:
                    raise ModelError(
                        f"{run['folder']}: its {what} differs from {first['folder']}'s; the "
                        "models of an ensemble must share preprocessing and classes"
                    )
            _window(run["config"], roi_size=settings.roi_size)  # the window fits it
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
        """Segments one file; its seconds by stage are then in ``last_times`` (load, reorient,
        resample, crop, normalise, windows with the argmax, components, back to the file's
        grid; :func:`segment_files` adds the write).

        Args:
            path: A NIfTI image.

        Returns:
            ``(labels, affine)``: uint8 labels with the file's spatial shape, and its affine.

        Raises:
            DataError: The file is unreadable or does not fit the model.
        """
        times = self.last_times = {}
        item = {"case": case_name(path), "image": path}
        for transform in self.preprocessing.transforms:
            with _timed(times, STAGES.get(type(transform).__name__, "preprocess")):
                item = transform(item)
        s = self.settings
        with _timed(times, "windows"):  # as validation: the same windows and argmax
            labels = predict_labels(
                self.predictor, item["image"], s.roi_size, s.overlap, s.mode, s.sw_batch_size
            )
        if s.keep_largest:
            with _timed(times, "components"):
                labels = keep_largest_component(labels, classes=s.largest_classes)
        geometry = item["geometry"]
        with _timed(times, "back"):
            labels = invert_label(labels, geometry)
        return labels, np.asarray(geometry["source_affine"])

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
            with _timed(self.last_times, "write"):
                write_nifti(out, labels, affine)
            written.append(out)
            logging.info("%s: %s", case_name(path), describe_times(self.last_times))
        return written


#: The stage of each preprocessing transform in the timings (others: ``preprocess``).
STAGES = {
    "LoadImage": "load",
    "Orientation": "reorient",
    "Resample": "resample",
    "ResampleAndCrop": "resample",
    "CropForeground": "crop",
    "NormalizeCT": "normalise",
    "NormalizeMRI": "normalise",
}


@contextlib.contextmanager
def _timed(times: dict[str, float], stage: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        times[stage] = times.get(stage, 0.0) + time.perf_counter() - start


def describe_times(times: dict[str, float]) -> str:
    """A volume's seconds by stage, in order, with their total (one log line)."""
    parts = ", ".join(f"{stage} {seconds:.2f} s" for stage, seconds in times.items())
    return f"{sum(times.values()):.2f} s ({parts})"


def _window(config, **overrides) -> WindowSettings:
    """:func:`~tf_medseg.inference.window.window_settings`, a bad window as a ModelError."""
    try:
        return window_settings(config, **overrides)
    except ValueError as err:
        raise ModelError(str(err)) from err


#: Saved transforms that act on the label alone (the foreground/background voxel lists of the
#: patch sampler): prediction, without a label, does not run them.
LABEL_ONLY_TRANSFORMS = ("ForegroundIndices",)


#: What the window settings read of a run's ``config.json``.
WINDOW_FIELDS = (
    "val_roi_size",
    "val_overlap",
    "val_mode",
    "val_sw_batch_size",
    "val_keep_largest",
    "depth",
)


def _saved_window(run: RunDir) -> types.SimpleNamespace:
    """The window fields of a run's ``config.json``.

    Raises:
        ModelError: The file is not JSON, or lacks some of :data:`WINDOW_FIELDS`.
    """
    try:
        values = run.read_json(rundir.CONFIG)
    except ValueError as err:
        raise ModelError(f"{run.config}: not a readable configuration ({err})") from err
    missing = [name for name in WINDOW_FIELDS if name not in values]
    if missing:
        raise ModelError(f"{run.config}: no {', '.join(missing)} (not a tf_medseg run's config)")
    return types.SimpleNamespace(**{name: values[name] for name in WINDOW_FIELDS})


def _read_run(model: str) -> dict:
    """The files beside one model: its path and folder, configuration, preprocessing (the
    chain and its config), class labels and modalities."""
    path, folder = model_files(model)
    run = RunDir(folder)
    config_path = run.config
    if not os.path.isfile(config_path):
        # The .keras model takes windows of any size (its spatial input is free): nothing but
        # the run's configuration says which window, overlap and blending it was validated with.
        raise ModelError(
            f"{config_path} not found: the window settings (val_roi_size, val_overlap, val_mode) "
            "are the training run's and the model does not hold them; copy config.json from "
            "the run's workdir beside the model"
        )
    config = _saved_window(run)
    preprocessing_path = run.preprocessing
    with open(preprocessing_path) as f:
        try:
            preprocessing = json.load(f)
            chain = preprocessing_from_config(preprocessing)
        except ValueError as err:  # also json.JSONDecodeError
            raise ModelError(f"{preprocessing_path}: {err}") from err
    task = {}
    if os.path.isfile(run.task):
        task = run.read_json(rundir.TASK)
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
