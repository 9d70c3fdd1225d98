"""A run's folder: the one place that names its files.

Training writes a workdir; ``tf-medseg-predict``, ``tf-medseg-export``, ensembles and the
benchmarks read it. :class:`RunDir` names every file of it, writes them atomically
(:mod:`tf_medseg.jsonio`: a reader never sees half a file) and reads them back. No TensorFlow
here, so the CLIs can use it before importing it.

========================  ==================================================================
``config.json``           the resolved configuration (``TrainConfig``)
``split.json``            the training and validation cases
``plan.json``             the plan a planned run started with (:mod:`tf_medseg.planning.rules`)
``preprocessing.json``    the deterministic prefix: what predict applies to a new volume
``task.json``             channels and classes (names, modalities)
``best_model.keras``      the model of the best validation Dice
``postprocessing.json``   the largest-component choice (:mod:`tf_medseg.postprocessing`)
``summary.json``          the run's result (best Dice, times, why it stopped)
``metrics.jsonl``         a line per validation
``checkpoints/``          model, optimiser, sampler and run state (resume)
``tensorboard/``          the event files
========================  ==================================================================
"""

from __future__ import annotations

import json
import os

from tf_medseg.jsonio import write_json, write_text

CONFIG = "config.json"
SPLIT = "split.json"
PLAN = "plan.json"
PREPROCESSING = "preprocessing.json"
TASK = "task.json"
BEST_MODEL = "best_model.keras"
POSTPROCESSING = "postprocessing.json"
SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tensorboard"


class RunDir:
    """A run's folder (it need not exist yet).

    Args:
        path: The workdir.
    """

    def __init__(self, path: str):
        self.path = str(path)

    def __repr__(self) -> str:
        return f"RunDir({self.path!r})"

    def file(self, name: str) -> str:
        """The path of one of the module's file names in this folder."""
        return os.path.join(self.path, name)

    @property
    def config(self) -> str:
        return self.file(CONFIG)

    @property
    def split(self) -> str:
        return self.file(SPLIT)

    @property
    def plan(self) -> str:
        return self.file(PLAN)

    @property
    def preprocessing(self) -> str:
        return self.file(PREPROCESSING)

    @property
    def task(self) -> str:
        return self.file(TASK)

    @property
    def best_model(self) -> str:
        return self.file(BEST_MODEL)

    @property
    def postprocessing(self) -> str:
        return self.file(POSTPROCESSING)

    @property
    def summary(self) -> str:
        return self.file(SUMMARY)

    @property
    def metrics(self) -> str:
        return self.file(METRICS)

    @property
    def checkpoints(self) -> str:
        return self.file(CHECKPOINTS)

    @property
    def tensorboard(self) -> str:
        return self.file(TENSORBOARD)

    def has_checkpoint(self) -> bool:
        """Whether the folder holds a training checkpoint (TensorFlow's index file)."""
        return bool(self.path) and os.path.isfile(os.path.join(self.checkpoints, "checkpoint"))

    def read_json(self, name: str):
        """One of its JSON files, parsed.

        Raises:
            OSError: The file is missing or unreadable.
            ValueError: It is not JSON.
        """
        with open(self.file(name)) as f:
            return json.load(f)

    def read_text(self, name: str) -> str:
        with open(self.file(name)) as f:
            return f.read()

    def write_json(self, name: str, value) -> str:
        """Writes one of its JSON files atomically; returns the path."""
        return write_json(self.file(name), value)

    def write_text(self, name: str, text: str) -> str:
        """Writes one of its files atomically; returns the path."""
        return write_text(self.file(name), text)
