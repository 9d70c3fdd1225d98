"""Validation in the labels' own geometry (--val_native): the Dice a user gets from
tf-medseg-predict and tf-medseg-evaluate, on a training grid 4x coarser than the labels."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import tensorflow as tf
from tiny_config import tiny_config

from tf_medseg.data.synthetic import generate_task
from tf_medseg.inference import scoring
from tf_medseg.training.loop import Trainer


@pytest.fixture(scope="module")
def coarse_run(tmp_path_factory):
    """A run on 64-voxel spleens of 0.8 mm in-plane, trained at 3.2 mm (4x coarser)."""
    root = tmp_path_factory.mktemp("native")
    data = generate_task("spleen", str(root / "data"), num_train=8, num_test=0, size=64, seed=5)
    config = tiny_config(
        data,
        root / "run",
        num_val=2,
        spacing=(3.2, 3.2, 3.2),
        cache="full",
        optimizer="adam",
        learning_rate=1e-2,
        num_samples=4,
        epochs=15,
        val_every=5,
        val_native="best",
        deterministic=True,
        image_summaries=False,
    )
    trainer = Trainer(config)
    try:
        summary = trainer.fit()
    finally:
        trainer.close()
    tf.keras.backend.clear_session()
    return {"root": root, "data": data, "workdir": config.workdir, "summary": summary}


def test_native_dice_is_what_predict_and_evaluate_give_and_not_the_grid_dice(coarse_run):
    summary, root = coarse_run["summary"], coarse_run["root"]
    native = summary["native"]
    assert native["cases"] == 2 and set(native["dice"]) == {"spleen"}
    assert (
        json.loads(open(os.path.join(coarse_run["workdir"], "summary.json")).read())["native"]
        == native
    )
    # The validation cases, segmented by the command line from their files.
    split = json.load(open(os.path.join(coarse_run["workdir"], "split.json")))
    images = root / "val_images"
    images.mkdir()
    for case in split["validation"]:
        name = f"{case}.nii.gz"
        os.symlink(os.path.join(coarse_run["data"], "imagesTr", name), images / name)
    out = root / "predictions"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tf_medseg.cli.predict",
            f"--model={coarse_run['workdir']}",
            f"--input={images}",
            f"--output={out}",
            "--noprogress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    scored = scoring.evaluate_dirs(out, os.path.join(coarse_run["data"], "labelsTr"), 2)
    assert native["mean_dice"] == pytest.approx(scored.overall, abs=1e-6)
    assert native["dice"]["spleen"] == pytest.approx(scored.class_means[0], abs=1e-6)
    # The training grid's validation is another measurement: on a grid 4x coarser its Dice
    # differs from the one in the labels' geometry.
    assert abs(summary["best_dice"] - native["mean_dice"]) > 1e-3
    assert summary["time_split"]["native_validation"] > 0


def test_val_native_every_scores_each_validation_in_the_labels_geometry(coarse_run, tmp_path):
    config = tiny_config(
        coarse_run["data"],
        tmp_path / "run",
        num_val=2,
        spacing=(3.2, 3.2, 3.2),
        cache="full",
        epochs=2,
        val_every=1,
        val_native="every",
        image_summaries=False,
    )
    trainer = Trainer(config)
    try:
        trainer.fit()
    finally:
        trainer.close()
    lines = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert len(lines) == 2
    for line in lines:
        assert line["native"]["cases"] == 2 and "spleen" in line["native"]["dice"]
    events = [
        value.tag
        for path in (tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*")
        for event in tf.compat.v1.train.summary_iterator(str(path))
        for value in event.summary.value
    ]
    assert {"val/native_mean_dice", "val/native_dice_spleen"} <= set(events)


def test_val_native_is_checked(tmp_path):
    from tf_medseg.config import TrainConfig

    errors = TrainConfig(data_dir="d", workdir=str(tmp_path), val_native="sometimes").validate()
    assert errors == ["--val_native must be one of best, every, off, got 'sometimes'"]
