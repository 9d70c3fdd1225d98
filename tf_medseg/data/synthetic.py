"""Synthetic MSD-layout tasks: small phantoms that look like the real tasks, generated offline.

``make demo`` and the tests need data without a download. Each task writes the MSD layout
(``dataset.json``, ``imagesTr/``, ``labelsTr/``, ``imagesTs/``) plus ``labelsTs/`` (the test
labels, which real MSD tasks withhold) so that predictions can be scored:

- ``spleen``: CT-like. Air at -1000 HU, a body with a fat ring, liver, kidneys and a spine of
  different densities, one smooth irregular spleen (label 1) per volume, Gaussian noise,
  anisotropic spacing (0.8 x 0.8 mm in-plane, 2.5 to 5 mm slices), varying fields of view, stored
  with an LPS-like affine (negative x and y), as MSD's CT volumes are.
- ``heart``: MRI-like. Zero background outside the body, arbitrary intensity scale per case, a
  smooth multiplicative bias field, a small left-atrium-like structure (label 1) beside a
  brighter ventricle-like distractor. ``num_modalities > 1`` writes 4D multi-channel images.
- ``liver``: CT-like. A large liver (label 1) with 0 to 3 small, low-contrast lesions inside it
  (label 2).

The same arguments give the same bytes (the generator draws from ``numpy.random.default_rng``
seeded by (seed, task, case), and nibabel writes gzip members with a zero timestamp).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from tf_medseg.data.io import write_nifti

TASKS = ("spleen", "heart", "liver")
_TASK_CODES = {"spleen": 9, "heart": 2, "liver": 3}


@dataclass(frozen=True)
class Phantom:
    """One generated case: image (x, y, z[, c]), label (x, y, z) and affine."""

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray


def _grid(shape, spacing):
    """Physical coordinates (mm) of voxel centres relative to the volume centre, as open grids."""
    return [
        ((np.arange(n, dtype=np.float32) - (n - 1) / 2.0) * s).reshape(
            [-1 if a == i else 1 for a in range(3)]
        )
        for i, (n, s) in enumerate(zip(shape, spacing, strict=True))
    ]


def _blob(grid, centre, radii, rng, roughness=0.15):
    """A smooth irregular solid: an ellipsoid whose surface is modulated by low-frequency waves."""
    x, y, z = (g - c for g, c in zip(grid, centre, strict=True))
    d = np.sqrt((x / radii[0]) ** 2 + (y / radii[1]) ** 2 + (z / radii[2]) ** 2)
    wave = np.zeros((1, 1, 1), np.float32)
    scale = float(np.mean(radii))
    for _ in range(3):
        k = rng.normal(size=3) * 1.5 / scale
        wave = wave + np.sin(x * k[0] + y * k[1] + z * k[2] + rng.uniform(0, 2 * np.pi))
    return d < 1.0 + roughness * wave / 3.0


def _shape_and_spacing(rng, size, in_plane, slice_range, depth_ratio):
    fov_jitter = rng.uniform(0.9, 1.1, size=3)
    dz = float(rng.uniform(*slice_range))
    spacing = (in_plane[0], in_plane[1], dz)
    base_depth = size * depth_ratio * (slice_range[0] / dz)
    shape = (
        int(round(size * fov_jitter[0])),
        int(round(size * fov_jitter[1])),
        max(8, int(round(base_depth * fov_jitter[2]))),
    )
    return shape, spacing


def _affine(shape, spacing, signs):
    affine = np.diag([signs[0] * spacing[0], signs[1] * spacing[1], signs[2] * spacing[2], 1.0])
    affine[:3, 3] = [-signs[i] * spacing[i] * (shape[i] - 1) / 2.0 for i in range(3)]
    return affine


def _fov(shape, spacing):
    return np.array([n * s for n, s in zip(shape, spacing, strict=True)], np.float32)


def _ct_body(grid, fov, rng):
    """Air, a body with a fat ring and a spine, in HU."""
    x, y, _ = grid
    a, b = 0.45 * fov[0] * rng.uniform(0.92, 1.0), 0.36 * fov[1] * rng.uniform(0.92, 1.0)
    r = np.sqrt((x / a) ** 2 + (y / b) ** 2)
    image = np.full(np.broadcast_shapes(*(g.shape for g in grid)), -1000.0, np.float32)
    image = np.where(r < 1.0, -100.0, image)
    image = np.where(r < 0.88, 40.0, image)
    spine = np.sqrt(x**2 + (y + 0.22 * fov[1]) ** 2) < 0.07 * fov[0]
    image = np.where(spine, 450.0, image)
    return image, r < 0.88


def _spleen(rng, size):
    shape, spacing = _shape_and_spacing(rng, size, (0.8, 0.8), (2.5, 5.0), 0.6)
    grid, fov = _grid(shape, spacing), _fov(shape, spacing)
    image, inner = _ct_body(grid, fov, rng)
    liver = _blob(
        grid,
        (-0.17 * fov[0], 0.04 * fov[1], 0.05 * fov[2]),
        (0.2 * fov[0], 0.2 * fov[1], 0.3 * fov[2]),
        rng,
    )
    image = np.where(liver & inner, 60.0, image)
    for side in (-1, 1):
        kidney = _blob(
            grid,
            (side * 0.16 * fov[0], -0.16 * fov[1], -0.1 * fov[2]),
            (0.06 * fov[0], 0.07 * fov[1], 0.14 * fov[2]),
            rng,
        )
        image = np.where(kidney & inner, 150.0, image)
    jitter = rng.uniform(-0.04, 0.04, size=3) * fov
    centre = np.array([0.2 * fov[0], -0.06 * fov[1], 0.06 * fov[2]]) + jitter
    radii = np.array([0.11, 0.14, 0.16]) * fov * rng.uniform(0.85, 1.15, size=3)
    spleen = _blob(grid, centre, radii, rng) & inner
    image = np.where(spleen, 105.0, image)
    image = image + rng.normal(0.0, 12.0, size=image.shape).astype(np.float32)
    label = spleen.astype(np.uint8)
    return Phantom(np.round(image).astype(np.int16), label, _affine(shape, spacing, (-1, -1, 1)))


def _heart(rng, size, num_modalities=1):
    shape, spacing = _shape_and_spacing(rng, size, (1.25, 1.25), (1.37, 1.37), 0.8)
    grid, fov = _grid(shape, spacing), _fov(shape, spacing)
    x, y, z = grid
    body = np.sqrt((x / (0.46 * fov[0])) ** 2 + (y / (0.4 * fov[1])) ** 2) < 1.0
    body = np.broadcast_to(body, shape)
    jitter = rng.uniform(-0.04, 0.04, size=3) * fov
    centre = np.array([0.05 * fov[0], 0.1 * fov[1], 0.0]) + jitter
    radii = np.array([0.11, 0.09, 0.12]) * fov * rng.uniform(0.85, 1.15, size=3)
    atrium = _blob(grid, centre, radii, rng, roughness=0.2)
    ventricle = _blob(
        grid, centre + np.array([-0.2, -0.18, 0.0]) * fov, np.array([0.13, 0.12, 0.16]) * fov, rng
    )
    ventricle = ventricle & ~atrium
    bias = (
        1.0
        + 0.25
        * np.sin(x / fov[0] * 2.5 + rng.uniform(0, 6))
        * np.cos(y / fov[1] * 2.0 + rng.uniform(0, 6))
        + 0.1 * np.sin(z / fov[2] * 2.0)
    )
    scale = rng.uniform(0.5, 2.0)
    channels = []
    for m in range(num_modalities):
        tissue, blood, distractor = (300.0, 620.0, 800.0) if m % 2 == 0 else (500.0, 200.0, 150.0)
        img = np.where(body, tissue, 0.0).astype(np.float32)
        img = np.where(atrium & body, blood, img)
        img = np.where(ventricle & body, distractor, img)
        img = img * bias * scale
        noise = rng.normal(0.0, 25.0 * scale, size=shape).astype(np.float32)
        img = np.where(body, np.maximum(img + noise, 1.0), 0.0).astype(np.float32)
        channels.append(img)
    image = channels[0] if num_modalities == 1 else np.stack(channels, axis=-1)
    label = (atrium & body).astype(np.uint8)
    return Phantom(image, label, _affine(shape, spacing, (1, -1, 1)))


def _liver(rng, size):
    shape, spacing = _shape_and_spacing(rng, size, (0.8, 0.8), (2.5, 2.5), 0.6)
    grid, fov = _grid(shape, spacing), _fov(shape, spacing)
    image, inner = _ct_body(grid, fov, rng)
    jitter = rng.uniform(-0.03, 0.03, size=3) * fov
    centre = np.array([-0.12 * fov[0], 0.04 * fov[1], 0.0]) + jitter
    radii = np.array([0.26, 0.24, 0.32]) * fov * rng.uniform(0.9, 1.1, size=3)
    liver = _blob(grid, centre, radii, rng) & inner
    image = np.where(liver, 100.0, image)
    label = liver.astype(np.uint8)
    num_lesions = int(rng.integers(0, 4))
    for _ in range(num_lesions):
        offset = rng.uniform(-0.5, 0.5, size=3) * radii
        lesion_r = rng.uniform(0.04, 0.07) * fov[0] * np.ones(3)
        lesion = _blob(grid, centre + offset, lesion_r, rng, roughness=0.1) & liver
        image = np.where(lesion, 70.0, image)
        label[lesion] = 2
    image = image + rng.normal(0.0, 12.0, size=image.shape).astype(np.float32)
    return Phantom(np.round(image).astype(np.int16), label, _affine(shape, spacing, (-1, -1, 1)))


def make_phantom(task: str, case_index: int, size: int, seed: int, num_modalities: int = 1):
    """Generates one case of a synthetic task.

    Args:
        task: One of :data:`TASKS`.
        case_index: The case's index (the random stream is seeded by seed, task and index).
        size: In-plane voxels (before the field-of-view jitter of +-10%).
        seed: The task's seed.
        num_modalities: Channels for ``heart`` (other tasks are single-channel CT).

    Returns:
        The phantom.
    """
    if task not in TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; choose from {TASKS}")
    if size < 8:
        raise ValueError(f"size must be at least 8 voxels, got {size}")
    rng = np.random.default_rng([seed, _TASK_CODES[task], case_index])
    if task == "spleen":
        return _spleen(rng, size)
    if task == "heart":
        return _heart(rng, size, num_modalities)
    return _liver(rng, size)


_META = {
    "spleen": ("SyntheticSpleen", {"0": "CT"}, {"0": "background", "1": "spleen"}),
    "heart": ("SyntheticHeart", {"0": "MRI"}, {"0": "background", "1": "left atrium"}),
    "liver": ("SyntheticLiver", {"0": "CT"}, {"0": "background", "1": "liver", "2": "cancer"}),
}


def generate_task(
    task: str,
    out_dir: str,
    num_train: int = 12,
    num_test: int = 2,
    size: int = 64,
    seed: int = 0,
    num_modalities: int = 1,
    progress: bool = False,
) -> str:
    """Writes a synthetic task in the MSD layout.

    Args:
        task: ``spleen``, ``heart`` or ``liver``.
        out_dir: The task folder to write (created).
        num_train: Labelled training cases (imagesTr/labelsTr).
        num_test: Test cases (imagesTs, with labels in labelsTs).
        size: In-plane size in voxels.
        seed: Seed; the same arguments give the same bytes.
        num_modalities: Channels of the ``heart`` task's images.
        progress: Show a progress bar.

    Returns:
        ``out_dir``.
    """
    from tqdm import tqdm

    if num_train < 1:
        raise ValueError("num_train must be at least 1")
    if num_modalities > 1 and task != "heart":
        raise ValueError("only the heart task has multi-modal images")
    name, modality, labels = _META[task]
    if num_modalities > 1:
        modality = {str(m): f"MRI{m}" for m in range(num_modalities)}
    training, test = [], []
    cases = [(f"{task}_{i:03d}", i, "Tr") for i in range(num_train)]
    cases += [(f"{task}_{num_train + i:03d}", num_train + i, "Ts") for i in range(num_test)]
    for case, index, part in tqdm(cases, desc=f"synthetic {task}", disable=not progress):
        phantom = make_phantom(task, index, size, seed, num_modalities)
        image_rel = f"./images{part}/{case}.nii.gz"
        label_rel = f"./labels{part}/{case}.nii.gz"
        write_nifti(os.path.join(out_dir, image_rel), phantom.image, phantom.affine)
        write_nifti(os.path.join(out_dir, label_rel), phantom.label, phantom.affine)
        if part == "Tr":
            training.append({"image": image_rel, "label": label_rel})
        else:
            test.append(image_rel)
    meta = {
        "name": name,
        "description": f"tf_medseg synthetic {task} phantoms (seed {seed}, size {size})",
        "tensorImageSize": "4D" if num_modalities > 1 else "3D",
        "modality": modality,
        "labels": labels,
        "numTraining": len(training),
        "numTest": len(test),
        "training": training,
        "test": test,
    }
    with open(os.path.join(out_dir, "dataset.json"), "w") as f:
        json.dump(meta, f, indent=2)
    return out_dir
