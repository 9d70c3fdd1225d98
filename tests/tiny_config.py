"""The tiny training configuration the engine tests share (seconds per run on 2 cores)."""

from __future__ import annotations

import json
import os

from tf_medseg.config import TrainConfig


def tiny_config(data_dir, workdir, **overrides) -> TrainConfig:
    base = dict(
        data_dir=data_dir,
        workdir=str(workdir),
        num_val=2,
        spacing=(2.0, 2.0, 2.0),
        patch_size=(16, 16, 16),
        val_roi_size=(16, 16, 16),
        val_overlap=0.25,
        batch_size=2,
        num_samples=2,
        depth=2,
        base_filters=4,
        cache="smart",
        replace_rate=0.5,
        cache_num=2,
        epochs=2,
        progress=False,
        cache_workers=1,
        # The labels' geometry is tested on its own (test_native.py); elsewhere it would only
        # add a segmentation of the validation files to every run.
        val_native="off",
    )
    base.update(overrides)
    return TrainConfig(**base)


#: The same tiny run as command-line flags (for the CLI and subprocess tests).
TINY_FLAGS = [
    "--num_val=2",
    "--spacing=2",
    "--patch_size=16",
    "--val_roi_size=16",
    "--val_overlap=0.25",
    "--batch_size=2",
    "--num_samples=2",
    "--depth=2",
    "--base_filters=4",
    "--cache_num=2",
    "--cache_workers=1",
    "--epochs=1000",
    "--progress=false",
    "--val_native=off",
    "--noplan",  # these exact settings, not the plan for the data (the default here)
]


def validations(workdir) -> list[dict]:
    """A run's ``metrics.jsonl`` lines without their timings (what must equal between runs)."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    timings = ("wall_s", "validation_s")
    return [{k: v for k, v in line.items() if k not in timings} for line in lines]


def train_to_end(config):
    """Trains ``config``'s run in this process; returns the trainer (closed) and its summary."""
    from tf_medseg.training.loop import Trainer

    trainer = Trainer(config)
    try:
        summary = trainer.fit()
    finally:
        trainer.close()
    return trainer, summary
