"""MSD task folders: dataset.json parsing, path safety, splits."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from tf_medseg.data.io import DataError
from tf_medseg.data.msd import load_task, read_split_file, split_items, task_split


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
