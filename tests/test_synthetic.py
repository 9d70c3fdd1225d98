"""Synthetic MSD-layout tasks: layout, labels, determinism, the MSD geometry's ranges."""

from __future__ import annotations

import filecmp
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tf_medseg.data import synthetic
from tf_medseg.data.io import read_nifti
from tf_medseg.data.msd import load_task
from tf_medseg.data.synthetic import TASKS, draw_msd_geometry, generate_task, make_phantom

# The real MSD tasks' ranges: in-plane voxels, in-plane spacing (mm), slices, slice spacing (mm).
MSD_RANGES = {
    "spleen": (512, (0.61, 0.98), (31, 168), (1.5, 8.0)),
    "heart": (320, (1.25, 1.25), (90, 130), (1.37, 1.37)),
    "liver": (512, (0.56, 1.0), (75, 300), (0.7, 5.0)),
}


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


def _neighbours(mask: np.ndarray) -> np.ndarray:
    """The voxels 6-adjacent to ``mask`` and not in it (``mask`` is off the volume's faces)."""
    around = np.zeros_like(mask)
    for axis in range(3):
        for step in (1, -1):
            around |= np.roll(mask, step, axis=axis)
    return around & ~mask


def test_liver_lesions_lie_inside_the_liver(tmp_path):
    """Every lesion is surrounded by liver: none touches the volume's faces, and the voxels
    around the lesions are liver, but for the few where a lesion meets the liver's edge (the
    generator clips a lesion to the liver, so it may reach the edge, never leave it)."""
    root = generate_task("liver", str(tmp_path / "l"), num_train=8, num_test=0, size=32, seed=2)
    lesion_cases = 0
    for item in load_task(root).training:
        label = read_nifti(item["label"]).data
        lesion = label == 2
        if not lesion.any():
            continue
        lesion_cases += 1
        faces = [np.take(lesion, [0, -1], axis=a) for a in range(3)]
        assert not any(face.any() for face in faces), item["case"]
        around = label[_neighbours(lesion)]
        assert np.mean(around == 1) >= 0.9, (item["case"], np.bincount(around, minlength=3))
    assert 1 <= lesion_cases <= 8


def test_cli_writes_task(tmp_path):
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


def test_size_geometry_keeps_its_bytes():
    # Hashes of the arrays the generator gave before the MSD geometry was added (numpy 1.26):
    # the same seed must keep giving the same volumes.
    expected = {
        "spleen": "6d362675d9b6023c",
        "heart": "265c510e797cdfc4",
        "liver": "c845585fce2d0769",
    }
    for task, want in expected.items():
        digest = hashlib.sha256()
        for case in range(3):
            phantom = make_phantom(task, case, 24, 1, 2 if task == "heart" else 1)
            for array in (phantom.image, phantom.label, phantom.affine):
                digest.update(array.tobytes())
        assert digest.hexdigest()[:16] == want, task


@pytest.mark.parametrize("task", TASKS)
def test_msd_geometry_lies_in_the_real_tasks_ranges(task):
    in_plane, in_plane_mm, slices, slice_mm = MSD_RANGES[task]
    draws = [draw_msd_geometry(task, case, seed) for seed in (0, 1) for case in range(300)]
    shapes = np.array([shape for shape, _ in draws])
    spacings = np.array([spacing for _, spacing in draws])
    assert np.all(shapes[:, :2] == in_plane)
    assert np.all((slices[0] <= shapes[:, 2]) & (shapes[:, 2] <= slices[1]))
    assert np.all(spacings[:, 0] == spacings[:, 1])
    assert np.all((in_plane_mm[0] <= spacings[:, 0]) & (spacings[:, 0] <= in_plane_mm[1]))
    assert np.all((slice_mm[0] <= spacings[:, 2]) & (spacings[:, 2] <= slice_mm[1]))
    # The draws cover the ranges, and every scan is long enough to hold the organ (>= 12 cm).
    assert np.ptp(shapes[:, 2]) >= 0.7 * (slices[1] - slices[0])
    assert np.ptp(spacings[:, 0]) >= 0.7 * (in_plane_mm[1] - in_plane_mm[0])
    assert np.ptp(spacings[:, 2]) >= 0.7 * (slice_mm[1] - slice_mm[0])
    assert np.all(shapes[:, 2] * spacings[:, 2] >= 120.0)


def test_unknown_geometry_is_refused():
    with pytest.raises(ValueError, match="unknown geometry"):
        make_phantom("spleen", 0, 16, 0, geometry="ct")


def test_msd_geometry_is_deterministic_by_seed():
    first = [draw_msd_geometry("liver", case, 3) for case in range(20)]
    assert first == [draw_msd_geometry("liver", case, 3) for case in range(20)]
    assert first != [draw_msd_geometry("liver", case, 4) for case in range(20)]
    assert len(set(first)) == 20


@pytest.fixture
def coarse_msd_geometry(monkeypatch):
    """The MSD geometry's fields of view at 1/8 of the in-plane voxels and 16 slices at most, so
    that the MSD anatomy can be generated in milliseconds."""
    draw = synthetic.draw_msd_geometry

    def coarse(task, case_index, seed):
        (nx, ny, nz), (sx, sy, sz) = draw(task, case_index, seed)
        z = min(nz, 16)
        return (nx // 8, ny // 8, z), (sx * 8, sy * 8, sz * nz / z)

    monkeypatch.setattr(synthetic, "draw_msd_geometry", coarse)
    return coarse


@pytest.mark.parametrize("task", TASKS)
def test_msd_anatomy_is_physical_and_deterministic(coarse_msd_geometry, task):
    labelled = []
    for case in range(4):
        phantom = make_phantom(task, case, 0, 5, geometry="msd")
        again = make_phantom(task, case, 0, 5, geometry="msd")
        for a, b in ((phantom.image, again.image), (phantom.label, again.label)):
            assert a.tobytes() == b.tobytes()
        other = make_phantom(task, case, 0, 6, geometry="msd")
        assert phantom.image.tobytes() != other.image.tobytes()
        assert phantom.image.dtype == (np.float32 if task == "heart" else np.int16)
        spacing = np.abs(np.diag(phantom.affine)[:3])
        np.testing.assert_allclose(spacing, coarse_msd_geometry(task, case, 5)[1])
        organ = np.nonzero(phantom.label == 1)
        assert organ[0].size > 0, "every case has its organ"
        # The organ's size is physical whatever the field of view (spleen ~ 11 cm long).
        length_mm = (organ[2].max() - organ[2].min() + 1) * spacing[2]
        low, high = {"spleen": (70, 160), "heart": (30, 90), "liver": (110, 220)}[task]
        assert low <= length_mm <= high, (task, case, length_mm)
        labelled.append(np.mean(phantom.label > 0))
    low, high = {"spleen": (0.002, 0.03), "heart": (0.0005, 0.01), "liver": (0.01, 0.15)}[task]
    assert low < np.mean(labelled) < high


def test_generate_task_with_msd_geometry(coarse_msd_geometry, tmp_path):
    root = generate_task("liver", str(tmp_path / "l"), num_train=2, num_test=1, geometry="msd")
    meta = json.load(open(os.path.join(root, "dataset.json")))
    assert "MSD geometry" in meta["description"]
    task = load_task(root)
    for case, item in enumerate(task.training):
        image = read_nifti(item["image"])
        shape, spacing = coarse_msd_geometry("liver", case, 0)
        assert image.data.shape == shape
        np.testing.assert_allclose(image.spacing, spacing, rtol=1e-6)


def test_cli_refuses_size_with_msd_geometry(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tf_medseg.cli.synth",
            "--task=spleen",
            f"--out={tmp_path / 'x'}",
            "--geometry=msd",
            "--size=32",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and "--size applies to --geometry=size only" in result.stderr
    assert not (tmp_path / "x").exists()
