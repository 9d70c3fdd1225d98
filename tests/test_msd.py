"""MSD task folders: dataset.json parsing, path safety, splits."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from tf_medseg.data.io import DataError
from tf_medseg.data.msd import (
    fold_split,
    load_task,
    read_split_file,
    split_items,
    task_split,
    write_split_file,
)


def _write_meta(root, meta):
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "dataset.json"), "w") as f:
        json.dump(meta, f)


def _meta(training, **extra):
    return {
        "name": "T",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "organ"},
        "training": training,
        **extra,
    }


def test_reads_synthetic_task(spleen_task_dir):
    task = load_task(spleen_task_dir)
    assert task.is_ct and task.num_classes == 2 and task.num_channels == 1
    assert [item["case"] for item in task.training] == [f"spleen_{i:03d}" for i in range(6)]
    for item in task.training:
        assert os.path.isabs(item["image"]) and item["image"].startswith(task.root)


@pytest.mark.parametrize("bad", ["../outside.nii.gz", "./imagesTr/../../outside.nii.gz"])
def test_rejects_paths_that_leave_the_folder(tmp_path, bad):
    root = str(tmp_path / "task")
    _write_meta(root, _meta([{"image": bad, "label": "./labelsTr/a.nii.gz"}]))
    with pytest.raises(DataError, match="outside the data folder") as err:
        load_task(root)
    assert "dataset.json" in str(err.value)


def test_rejects_absolute_paths(tmp_path):
    root = str(tmp_path / "task")
    _write_meta(root, _meta([{"image": "/etc/passwd", "label": "./labelsTr/a.nii.gz"}]))
    with pytest.raises(DataError, match="absolute path"):
        load_task(root)


def test_missing_listed_file_is_named(tmp_path, spleen_task_dir):
    root = str(tmp_path / "copy")
    shutil.copytree(spleen_task_dir, root)
    victim = os.path.join(root, "labelsTr", "spleen_002.nii.gz")
    os.remove(victim)
    with pytest.raises(DataError, match="file not found") as err:
        load_task(root)
    assert victim in str(err.value)


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"modality": {"0": "CT"}, "labels": {"0": "bg", "1": "x"}}), "missing key"),
        (json.dumps(_meta([])), "lists no items"),
        (json.dumps(_meta([{"image": "./a.nii.gz"}])), "needs 'image' and 'label'"),
        (json.dumps([1, 2]), "JSON object"),
    ],
)
def test_bad_dataset_json(tmp_path, content, message):
    root = tmp_path / "task"
    root.mkdir()
    (root / "dataset.json").write_text(content)
    with pytest.raises(DataError, match=message) as err:
        load_task(str(root))
    assert str(root / "dataset.json") in str(err.value)


def test_missing_dataset_json(tmp_path):
    with pytest.raises(DataError, match="MSD task folder"):
        load_task(str(tmp_path))


def _items(n):
    return [{"case": f"case_{i:03d}", "image": f"/x/{i}"} for i in range(n)]


@pytest.mark.parametrize("total, num_val", [(41, 9), (20, 4), (131, 27)])
def test_paper_split_sizes(total, num_val):
    train, val = split_items(_items(total), num_val=num_val, seed=0)
    assert (len(train), len(val)) == (total - num_val, num_val)
    assert not {i["case"] for i in train} & {i["case"] for i in val}


def test_split_is_deterministic_by_seed_and_independent_of_order():
    items = _items(30)
    a = split_items(items, val_fraction=0.2, seed=1)
    b = split_items(list(reversed(items)), val_fraction=0.2, seed=1)
    c = split_items(items, val_fraction=0.2, seed=2)
    assert a == b
    assert a[1] != c[1]
    assert len(a[1]) == 6


def test_split_rejects_impossible_sizes():
    with pytest.raises(ValueError):
        split_items(_items(3), num_val=3)


def test_paper_split_is_used_for_named_task(tmp_path):
    root = tmp_path / "Task02_Heart"
    training = [
        {"image": f"./imagesTr/la_{i:03d}.nii.gz", "label": f"./labelsTr/la_{i:03d}.nii.gz"}
        for i in range(20)
    ]
    _write_meta(str(root), _meta(training))
    task = load_task(str(root), check_files=False)
    train, val = task_split(task, seed=0)
    assert (len(train), len(val)) == (16, 4)


def test_split_file(tmp_path):
    items = _items(5)
    path = tmp_path / "split.json"
    path.write_text(
        json.dumps({"train": ["case_000", "case_001", "case_002"], "validation": ["case_004"]})
    )
    train, val = read_split_file(str(path), items)
    assert [i["case"] for i in train] == ["case_000", "case_001", "case_002"]
    assert [i["case"] for i in val] == ["case_004"]
    path.write_text(json.dumps({"train": ["nope"], "validation": []}))
    with pytest.raises(DataError, match="unknown case"):
        read_split_file(str(path), items)


def _cases(items):
    return [item["case"] for item in items]


@pytest.mark.parametrize("total, num_folds", [(41, 5), (20, 5), (7, 3), (6, 6), (2, 2)])
def test_folds_are_disjoint_cover_every_case_and_differ_in_size_by_at_most_one(total, num_folds):
    items = _items(total)
    folds = [fold_split(items, num_folds, k, seed=0) for k in range(num_folds)]
    validations = [_cases(val) for _, val in folds]
    every = [case for val in validations for case in val]
    assert sorted(every) == _cases(items)  # each case in exactly one validation set
    sizes = [len(val) for val in validations]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    for train, val in folds:
        assert not set(_cases(train)) & set(_cases(val))
        assert sorted(_cases(train) + _cases(val)) == _cases(items)


def test_folds_are_deterministic_by_seed_and_independent_of_order():
    items = _items(30)
    a = [fold_split(items, 5, k, seed=1) for k in range(5)]
    b = [fold_split(list(reversed(items)), 5, k, seed=1) for k in range(5)]
    c = [fold_split(items, 5, k, seed=2) for k in range(5)]
    assert a == b
    assert [_cases(val) for _, val in a] != [_cases(val) for _, val in c]
    assert _cases(a[0][1]) != _cases(c[0][1])


@pytest.mark.parametrize(
    "num_folds, fold, message",
    [
        (1, 0, "at least 2 folds"),
        (0, 0, "at least 2 folds"),
        (7, 0, "at most 6 folds"),
        (3, 3, r"fold must be in \[0, 3\)"),
        (3, -1, r"fold must be in \[0, 3\)"),
    ],
)
def test_impossible_folds_are_rejected(num_folds, fold, message):
    with pytest.raises(ValueError, match=message):
        fold_split(_items(6), num_folds, fold)


def test_task_split_precedence_split_file_then_folds_then_count(tmp_path):
    root = tmp_path / "Task02_Heart"  # a paper split (4 of 20) that the folds override
    training = [
        {"image": f"./imagesTr/la_{i:03d}.nii.gz", "label": f"./labelsTr/la_{i:03d}.nii.gz"}
        for i in range(20)
    ]
    _write_meta(str(root), _meta(training))
    task = load_task(str(root), check_files=False)
    train, val = task_split(task, seed=0, num_folds=5, fold=2, num_val=3)
    assert (train, val) == fold_split(task.training, 5, 2, seed=0)
    assert (len(train), len(val)) == (16, 4)
    path = str(tmp_path / "split.json")
    write_split_file(path, val, train)  # a different split: the file wins over the folds
    assert task_split(task, split_file=path, num_folds=5, fold=2) == (val, train)
    assert len(task_split(task, seed=0, num_val=3)[1]) == 3


def test_written_split_file_is_read_back_to_the_same_split(tmp_path):
    items = _items(11)
    train, val = fold_split(items, 4, 3, seed=7)
    path = str(tmp_path / "run" / "split.json")
    assert write_split_file(path, train, val) == path
    assert json.loads(open(path).read()) == {"train": _cases(train), "validation": _cases(val)}
    assert read_split_file(path, items) == (train, val)


def _task_with_linked_folders(spleen_task_dir, tmp_path) -> str:
    """A copy of the task whose imagesTr/ and labelsTr/ are symlinks to folders elsewhere (as
    on clusters, where the images live on shared storage)."""
    root = str(tmp_path / "task")
    shared = tmp_path / "shared"
    shutil.copytree(spleen_task_dir, root, ignore=shutil.ignore_patterns(".tf_medseg_cache"))
    for name in ("imagesTr", "labelsTr"):
        shutil.move(os.path.join(root, name), shared / name)
        os.symlink(shared / name, os.path.join(root, name))
    return root


def test_symlinked_image_and_label_folders_are_the_folders_own(spleen_task_dir, tmp_path):
    import subprocess
    import sys

    from tiny_config import TINY_FLAGS

    root = _task_with_linked_folders(spleen_task_dir, tmp_path)
    task = load_task(root)
    assert len(task.training) == 6
    for item in task.training:  # the path as dataset.json names it, inside the task folder
        assert item["image"].startswith(os.path.join(root, "imagesTr") + os.sep)
        assert os.path.isfile(item["label"])
    result = subprocess.run(
        [sys.executable, "-m", "tf_medseg.cli.train", *TINY_FLAGS, "--dry_run"]
        + [f"--data_dir={root}", f"--workdir={tmp_path / 'run'}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "dry run: wrote config.json" in result.stdout


@pytest.mark.parametrize("bad", ["../x.nii.gz", "imagesTr/../../x.nii.gz", "/abs/x.nii.gz"])
def test_a_linked_task_still_refuses_paths_that_leave_it(spleen_task_dir, tmp_path, bad):
    root = _task_with_linked_folders(spleen_task_dir, tmp_path)
    _write_meta(root, _meta([{"image": bad, "label": "./labelsTr/spleen_000.nii.gz"}]))
    with pytest.raises(DataError, match="outside the data folder|absolute path") as err:
        load_task(root)
    assert "dataset.json" in str(err.value) and bad in str(err.value)


def test_every_files_header_is_checked_and_a_label_of_another_shape_is_named(
    spleen_task_dir, tmp_path
):
    import numpy as np

    from tf_medseg.data.io import write_nifti
    from tf_medseg.data.msd import check_task_files

    root = str(tmp_path / "task")
    shutil.copytree(spleen_task_dir, root, ignore=shutil.ignore_patterns(".tf_medseg_cache"))
    check_task_files(load_task(root))
    label = os.path.join(root, "labelsTr", "spleen_004.nii.gz")
    write_nifti(label, np.zeros((5, 6, 7), np.uint8), np.eye(4))
    with pytest.raises(DataError, match="label shape") as err:
        check_task_files(load_task(root))
    assert str(err.value).startswith(f"{label}: ") and "spleen_004.nii.gz)" in str(err.value)
