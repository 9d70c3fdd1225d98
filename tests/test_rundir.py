"""The run folder's one owner: names, atomic writes and reads, the checkpoint check."""

from __future__ import annotations

import json
import os

import pytest

from tf_medseg import rundir
from tf_medseg.rundir import RunDir


def test_every_file_of_a_run_is_named_once_and_found_under_its_folder(tmp_path):
    run = RunDir(tmp_path / "run")
    paths = {
        run.config: rundir.CONFIG,
        run.split: rundir.SPLIT,
        run.plan: rundir.PLAN,
        run.preprocessing: rundir.PREPROCESSING,
        run.task: rundir.TASK,
        run.best_model: rundir.BEST_MODEL,
        run.postprocessing: rundir.POSTPROCESSING,
        run.summary: rundir.SUMMARY,
        run.metrics: rundir.METRICS,
        run.checkpoints: rundir.CHECKPOINTS,
        run.tensorboard: rundir.TENSORBOARD,
    }
    assert len(paths) == 11  # no two the same
    for path, name in paths.items():
        assert path == os.path.join(str(tmp_path / "run"), name)


def test_writes_are_atomic_and_read_back(tmp_path):
    run = RunDir(tmp_path / "run")  # the folder is made by the first write
    path = run.write_json(rundir.SUMMARY, {"best_dice": 0.9})
    assert path == run.summary and run.read_json(rundir.SUMMARY) == {"best_dice": 0.9}
    run.write_text(rundir.CONFIG, "{}")
    assert run.read_text(rundir.CONFIG) == "{}"
    assert sorted(os.listdir(run.path)) == [rundir.CONFIG, rundir.SUMMARY]  # no temporary left
    (tmp_path / "run" / rundir.PLAN).write_text("{not json")
    with pytest.raises(ValueError):
        run.read_json(rundir.PLAN)
    with pytest.raises(OSError):
        run.read_json(rundir.TASK)


def test_a_checkpoint_is_there_only_with_tensorflows_index_file(tmp_path):
    run = RunDir(tmp_path)
    assert not run.has_checkpoint() and not RunDir("").has_checkpoint()
    os.makedirs(run.checkpoints)
    (tmp_path / rundir.CHECKPOINTS / "ckpt-4.index").write_text("")
    assert not run.has_checkpoint()
    (tmp_path / rundir.CHECKPOINTS / "checkpoint").write_text('model_checkpoint_path: "ckpt-4"')
    assert run.has_checkpoint()
    json.dumps(repr(run))
