"""Synthetic MSD-layout tasks: layout, labels, determinism."""

from __future__ import annotations

import filecmp
import json
import os

import numpy as np
import pytest

from tf_medseg.data.io import read_nifti
from tf_medseg.data.msd import load_task
from tf_medseg.data.synthetic import TASKS, generate_task


@pytest.mark.parametrize("task", TASKS)
def test_layout_and_labels(tmp_path, task):
    root = generate_task(task, str(tmp_path / task), num_train=3, num_test=1, size=24, seed=5)
    meta = json.load(open(os.path.join(root, "dataset.json")))
    assert meta["numTraining"] == 3 and meta["numTest"] == 1
    loaded = load_task(root)
    assert len(loaded.training) == 3 and len(loaded.test) == 1
    expected_classes = {"spleen": 2, "heart": 2, "liver": 3}[task]
    assert loaded.num_classes == expected_classes
    for item in loaded.training:
        image, label = read_nifti(item["image"]), read_nifti(item["label"])
        assert image.data.shape == label.data.shape
        np.testing.assert_allclose(image.affine, label.affine)
        values = set(np.unique(label.data).tolist())
        assert values <= set(range(expected_classes))
        assert 1 in values, "every synthetic case has its organ"
        assert 0.001 < np.mean(label.data > 0) < 0.6
    # Test labels are written beside the test images, for scoring predictions.
    assert os.path.isfile(os.path.join(root, "labelsTs", f"{task}_003.nii.gz"))


def test_ct_spacing_is_anisotropic_and_fields_of_view_vary(tmp_path):
    root = generate_task("spleen", str(tmp_path / "s"), num_train=4, num_test=0, size=24, seed=0)
    vols = [read_nifti(item["image"]) for item in load_task(root).training]
    for vol in vols:
        np.testing.assert_allclose(vol.spacing[:2], 0.8, rtol=1e-6)
        assert 2.5 <= vol.spacing[2] <= 5.0
        assert vol.affine[0, 0] < 0 and vol.affine[1, 1] < 0, "stored LPS-like, as MSD CT is"
    assert len({vol.data.shape for vol in vols}) > 1
    assert vols[0].data.dtype == np.int16 and vols[0].data.min() < -900


def test_heart_is_mri_like_and_multimodal(heart_task_dir):
    task = load_task(heart_task_dir)
    assert task.num_channels == 2 and not task.is_ct
    image = read_nifti(task.training[0]["image"]).data
    assert image.ndim == 4 and image.shape[3] == 2
    corners = image[0, 0, :, 0]
    assert np.all(corners == 0), "zero background outside the body"


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = generate_task("liver", str(tmp_path / "a"), num_train=2, num_test=1, size=20, seed=7)
    b = generate_task("liver", str(tmp_path / "b"), num_train=2, num_test=1, size=20, seed=7)
    c = generate_task("liver", str(tmp_path / "c"), num_train=2, num_test=1, size=20, seed=8)
    for rel in (
        "imagesTr/liver_000.nii.gz",
        "labelsTr/liver_001.nii.gz",
        "imagesTs/liver_002.nii.gz",
    ):
        assert filecmp.cmp(os.path.join(a, rel), os.path.join(b, rel), shallow=False)
    assert not filecmp.cmp(
        os.path.join(a, "imagesTr/liver_000.nii.gz"),
        os.path.join(c, "imagesTr/liver_000.nii.gz"),
        shallow=False,
    )


def test_liver_lesions_lie_inside_the_liver(tmp_path):
    root = generate_task("liver", str(tmp_path / "l"), num_train=8, num_test=0, size=32, seed=2)
    lesion_cases = 0
    for item in load_task(root).training:
        label = read_nifti(item["label"]).data
        if (label == 2).any():
            lesion_cases += 1
    assert 1 <= lesion_cases <= 8


def test_cli_writes_task(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "cli"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "tf_medseg.cli.synth",
            "--task=heart",
            f"--out={out}",
            "--num_train=2",
            "--num_test=0",
            "--size=16",
        ],
        check=True,
        capture_output=True,
    )
    assert len(load_task(str(out)).training) == 2
