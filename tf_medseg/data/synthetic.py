"""Synthetic MSD-layout tasks: phantoms that look like the real tasks, generated offline.

``make demo`` and the tests need data without a download. Each task writes the MSD layout
(``dataset.json``, ``imagesTr/``, ``labelsTr/``, ``imagesTs/``) plus ``labelsTs/`` (the test
labels, which real MSD tasks withhold) so that predictions can be scored:

- ``spleen``: CT-like. Air at -1000 HU, a body with a fat ring, liver, kidneys and a spine of
  different densities, one smooth irregular spleen (label 1) per volume, Gaussian noise,
  anisotropic spacing, varying fields of view, stored with an LPS-like affine (negative x and y),
  as MSD's CT volumes are.
- ``heart``: MRI-like. Zero background outside the body, arbitrary intensity scale per case, a
  smooth multiplicative bias field, a small left-atrium-like structure (label 1) beside a
  brighter ventricle-like distractor. ``num_modalities > 1`` writes 4D multi-channel images.
- ``liver``: CT-like. A large liver (label 1) with 0 to 3 small, low-contrast lesions inside it
  (label 2).

Two geometries set each case's shape and spacing: ``size`` (the default), small phantoms of
``size`` voxels in-plane (+-10%) with organs in fractions of the field of view; ``msd``, drawn
from the real task's ranges (:data:`MSD_GEOMETRY`), with organs of physical size.

The same arguments give the same bytes (the generator draws from ``numpy.random.default_rng``
seeded by (seed, task, case), and nibabel writes gzip members with a zero timestamp).
"""

from __future__ import annotations

import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from tf_medseg.data.io import write_nifti
from tf_medseg.jsonio import write_json

TASKS = ("spleen", "heart", "liver")
GEOMETRIES = ("size", "msd")
_TASK_CODES = {"spleen": 9, "heart": 2, "liver": 3}


@dataclass(frozen=True)
class Phantom:
    """One generated case: image (x, y, z[, c]), label (x, y, z) and affine."""

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray


@dataclass(frozen=True)
class MsdGeometry:
    """The shapes and spacings of one real MSD task's volumes, which ``geometry="msd"`` draws.

    Attributes:
        in_plane: Voxels along x and y.
        in_plane_mm: Range of the in-plane spacing (mm), the same along x and y.
        slices: Range of the number of slices (both ends included).
        slice_mm: Range of the slice spacing (mm).
        z_extent_mm: Range of the scanned length (slices x slice spacing, mm). A scan covers the
            anatomy, not a slice count: thin slices come in long series, thick ones in short.
        anatomy_mm: The extent (mm) that organ sizes are fractions of (the ``size`` geometry
            takes each case's field of view), chosen so that organs have their physical size.
    """

    in_plane: int
    in_plane_mm: tuple[float, float]
    slices: tuple[int, int]
    slice_mm: tuple[float, float]
    z_extent_mm: tuple[float, float]
    anatomy_mm: tuple[float, float, float]


MSD_GEOMETRY = {
    # Spleen about 7 x 9 x 11 cm, liver 13 x 13 x 20 cm, kidneys 4 x 4.5 x 9.5 cm.
    "spleen": MsdGeometry(512, (0.61, 0.98), (31, 168), (1.5, 8.0), (150, 450), (320, 320, 340)),
    # Left atrium about 5 x 4.5 x 6 cm, ventricle 6 x 6 x 7.5 cm.
    "heart": MsdGeometry(320, (1.25, 1.25), (90, 130), (1.37, 1.37), (120, 180), (240, 240, 240)),
    # Liver about 16 x 14 x 16 cm, lesions 2.5-4 cm. LiTS has up to 987 slices; capped at 300.
    "liver": MsdGeometry(512, (0.56, 1.0), (75, 300), (0.7, 5.0), (180, 500), (300, 300, 250)),
}

# The size geometry: in-plane spacing, slice spacing range, depth over in-plane voxels.
_SIZE_GEOMETRY = {
    "spleen": ((0.8, 0.8), (2.5, 5.0), 0.6),
    "heart": ((1.25, 1.25), (1.37, 1.37), 0.8),
    "liver": ((0.8, 0.8), (2.5, 2.5), 0.6),
}


@dataclass(frozen=True)
class _Frame:
    """A case's voxel grid and the scales its anatomy is drawn at.

    Organs sit at fractions of ``fov`` and measure fractions of ``anatomy`` (mm). ``original``
    marks the ``size`` geometry, which keeps its float64 noise (and so its bytes) and C order;
    the ``msd`` geometry draws float32 noise into arrays of NIfTI's ``order`` (F), which are
    written without a transposing copy.
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    grid: list[np.ndarray]
    fov: np.ndarray
    anatomy: np.ndarray
    original: bool
    order: str


def draw_msd_geometry(
    task: str, case_index: int, seed: int
) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """Draws one case's shape and spacing from the ranges of the real MSD task.

    The spacings are uniform in their ranges; the slice count is uniform among the counts that
    keep the scanned length in :attr:`MsdGeometry.z_extent_mm`. The draw has its own random
    stream, so it is a pure function of its arguments and the case's anatomy does not depend on it.

    Args:
        task: One of :data:`TASKS`.
        case_index: The case's index.
        seed: The task's seed.

    Returns:
        The shape (x, y, z) in voxels and the spacing (x, y, z) in mm.
    """
    geometry = MSD_GEOMETRY[task]
    rng = np.random.default_rng([seed, _TASK_CODES[task], case_index, 1])  # not the anatomy's
    in_plane = float(rng.uniform(*geometry.in_plane_mm))
    dz = float(rng.uniform(*geometry.slice_mm))
    low = max(geometry.slices[0], math.ceil(geometry.z_extent_mm[0] / dz))
    high = min(geometry.slices[1], math.floor(geometry.z_extent_mm[1] / dz))
    slices = int(rng.integers(low, high + 1))
    return (geometry.in_plane, geometry.in_plane, slices), (in_plane, in_plane, dz)


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


def _frame(shape, spacing, anatomy_mm=None):
    """The case's grid; organ sizes are fractions of ``anatomy_mm``, or of the field of view."""
    grid = [
        ((np.arange(n, dtype=np.float32) - (n - 1) / 2.0) * s).reshape(
            [-1 if a == i else 1 for a in range(3)]
        )
        for i, (n, s) in enumerate(zip(shape, spacing, strict=True))
    ]
    fov = np.array([n * s for n, s in zip(shape, spacing, strict=True)], np.float32)
    if anatomy_mm is None:
        return _Frame(shape, spacing, grid, fov, fov, original=True, order="C")
    return _Frame(shape, spacing, grid, fov, np.array(anatomy_mm, np.float32), False, "F")


def _blob(grid, centre, radii, rng, roughness=0.15):
    """A smooth irregular solid: an ellipsoid whose surface is modulated by low-frequency waves.

    The surface lies within (1 + roughness) radii of the centre, so the solid is computed only in
    that bounding box (an organ of a 512 x 512 x 300 volume fills a small part of it).

    Returns:
        The bounding box (a tuple of slices of the grid) and the solid's mask inside it.
    """
    box = []
    for g, c, r in zip(grid, centre, radii, strict=True):
        inside = np.flatnonzero(np.abs(g.ravel() - c) <= 1.01 * (1.0 + roughness) * r)
        box.append(slice(int(inside[0]), int(inside[-1]) + 1) if inside.size else slice(0, 0))
    box = tuple(box)
    x, y, z = (
        g[tuple(box[a] if a == i else slice(None) for a in range(3))] - c
        for i, (g, c) in enumerate(zip(grid, centre, strict=True))
    )
    d = np.sqrt((x / radii[0]) ** 2 + (y / radii[1]) ** 2 + (z / radii[2]) ** 2)
    wave = np.zeros((1, 1, 1), np.float32)
    scale = float(np.mean(radii))
    for _ in range(3):
        k = rng.normal(size=3) * 1.5 / scale
        wave = wave + np.sin(x * k[0] + y * k[1] + z * k[2] + rng.uniform(0, 2 * np.pi))
    return box, d < 1.0 + roughness * wave / 3.0


def _affine(shape, spacing, signs):
    affine = np.diag([signs[0] * spacing[0], signs[1] * spacing[1], signs[2] * spacing[2], 1.0])
    affine[:3, 3] = [-signs[i] * spacing[i] * (shape[i] - 1) / 2.0 for i in range(3)]
    return affine


def _noise(rng, shape, sigma, frame):
    """Gaussian noise, float32, in the frame's order."""
    if frame.original:
        return rng.normal(0.0, sigma, size=shape).astype(np.float32)
    noise = rng.standard_normal(shape[::-1], dtype=np.float32).T
    noise *= np.float32(sigma)
    return noise


def _ct_body(frame, rng):
    """Air, a body with a fat ring and a spine, in HU; and the body's inside, an (x, y, 1) mask."""
    x, y, _ = frame.grid
    fov = frame.fov
    a, b = 0.45 * fov[0] * rng.uniform(0.92, 1.0), 0.36 * fov[1] * rng.uniform(0.92, 1.0)
    r = np.sqrt((x / a) ** 2 + (y / b) ** 2)
    plane = np.full(r.shape, -1000.0, np.float32, order=frame.order)
    plane[r < 1.0] = -100.0
    plane[r < 0.88] = 40.0
    plane[np.sqrt(x**2 + (y + 0.22 * fov[1]) ** 2) < 0.07 * fov[0]] = 450.0
    image = np.empty(frame.shape, np.float32, order=frame.order)
    image[...] = plane
    return image, r < 0.88


def _ct_image(image, rng, frame):
    """Adds noise; rounds to int16 HU, as CT volumes are stored."""
    image += _noise(rng, image.shape, 12.0, frame)
    return np.round(image).astype(np.int16)


def _spleen(rng, frame):
    fov, anatomy = frame.fov, frame.anatomy
    image, inner = _ct_body(frame, rng)
    box, liver = _blob(
        frame.grid,
        (-0.17 * fov[0], 0.04 * fov[1], 0.05 * fov[2]),
        (0.2 * anatomy[0], 0.2 * anatomy[1], 0.3 * anatomy[2]),
        rng,
    )
    image[box][liver & inner[box[:2]]] = 60.0
    for side in (-1, 1):
        box, kidney = _blob(
            frame.grid,
            (side * 0.16 * fov[0], -0.16 * fov[1], -0.1 * fov[2]),
            (0.06 * anatomy[0], 0.07 * anatomy[1], 0.14 * anatomy[2]),
            rng,
        )
        image[box][kidney & inner[box[:2]]] = 150.0
    jitter = rng.uniform(-0.04, 0.04, size=3) * fov
    centre = np.array([0.2 * fov[0], -0.06 * fov[1], 0.06 * fov[2]]) + jitter
    radii = np.array([0.11, 0.14, 0.16]) * anatomy * rng.uniform(0.85, 1.15, size=3)
    box, spleen = _blob(frame.grid, centre, radii, rng)
    spleen &= inner[box[:2]]
    image[box][spleen] = 105.0
    label = np.zeros(frame.shape, np.uint8, order=frame.order)
    label[box][spleen] = 1
    affine = _affine(frame.shape, frame.spacing, (-1, -1, 1))
    return Phantom(_ct_image(image, rng, frame), label, affine)


def _heart(rng, frame, num_modalities=1):
    fov, anatomy, shape = frame.fov, frame.anatomy, frame.shape
    x, y, z = frame.grid
    body = np.sqrt((x / (0.46 * fov[0])) ** 2 + (y / (0.4 * fov[1])) ** 2) < 1.0
    jitter = rng.uniform(-0.04, 0.04, size=3) * fov
    centre = np.array([0.05 * fov[0], 0.1 * fov[1], 0.0]) + jitter
    radii = np.array([0.11, 0.09, 0.12]) * anatomy * rng.uniform(0.85, 1.15, size=3)
    atrium_box, atrium = _blob(frame.grid, centre, radii, rng, roughness=0.2)
    atrium &= body[atrium_box[:2]]
    ventricle_box, ventricle = _blob(
        frame.grid,
        centre + np.array([-0.2, -0.18, 0.0]) * anatomy,
        np.array([0.13, 0.12, 0.16]) * anatomy,
        rng,
    )
    ventricle &= body[ventricle_box[:2]]
    wave_x = np.sin(x / fov[0] * 2.5 + rng.uniform(0, 6))
    wave_y = np.cos(y / fov[1] * 2.0 + rng.uniform(0, 6))
    bias = np.empty(shape, np.float32, order=frame.order)
    bias[...] = 1.0 + 0.25 * wave_x * wave_y
    bias += 0.1 * np.sin(z / fov[2] * 2.0)
    scale = rng.uniform(0.5, 2.0)
    image = np.empty((*shape, num_modalities), np.float32, order=frame.order)
    for m in range(num_modalities):
        tissue, blood, distractor = (300.0, 620.0, 800.0) if m % 2 == 0 else (500.0, 200.0, 150.0)
        img = image[..., m]
        img[...] = np.where(body, tissue, 0.0)
        # The atrium is painted last: where the two solids overlap, it is atrium.
        img[ventricle_box][ventricle] = distractor
        img[atrium_box][atrium] = blood
        img *= bias
        img *= scale
        img += _noise(rng, shape, 25.0 * scale, frame)
        np.maximum(img, 1.0, out=img)
        img *= body  # zero outside the body, where every value is at least 1
    image = image[..., 0] if num_modalities == 1 else image
    label = np.zeros(shape, np.uint8, order=frame.order)
    label[atrium_box][atrium] = 1
    return Phantom(image, label, _affine(shape, frame.spacing, (1, -1, 1)))


def _liver(rng, frame):
    fov, anatomy = frame.fov, frame.anatomy
    image, inner = _ct_body(frame, rng)
    jitter = rng.uniform(-0.03, 0.03, size=3) * fov
    centre = np.array([-0.12 * fov[0], 0.04 * fov[1], 0.0]) + jitter
    radii = np.array([0.26, 0.24, 0.32]) * anatomy * rng.uniform(0.9, 1.1, size=3)
    box, liver = _blob(frame.grid, centre, radii, rng)
    liver &= inner[box[:2]]
    image[box][liver] = 100.0
    label = np.zeros(frame.shape, np.uint8, order=frame.order)
    label[box][liver] = 1
    for _ in range(int(rng.integers(0, 4))):
        offset = rng.uniform(-0.5, 0.5, size=3) * radii
        lesion_r = rng.uniform(0.04, 0.07) * anatomy[0] * np.ones(3)
        box, lesion = _blob(frame.grid, centre + offset, lesion_r, rng, roughness=0.1)
        lesion &= label[box] > 0
        image[box][lesion] = 70.0
        label[box][lesion] = 2
    affine = _affine(frame.shape, frame.spacing, (-1, -1, 1))
    return Phantom(_ct_image(image, rng, frame), label, affine)


def make_phantom(
    task: str,
    case_index: int,
    size: int,
    seed: int,
    num_modalities: int = 1,
    geometry: str = "size",
) -> Phantom:
    """Generates one case of a synthetic task.

    Args:
        task: One of :data:`TASKS`.
        case_index: The case's index (the random stream is seeded by seed, task and index).
        size: In-plane voxels (+-10% field-of-view jitter); ``size`` geometry only.
        seed: The task's seed.
        num_modalities: Channels for ``heart`` (other tasks are single-channel CT).
        geometry: ``size`` or ``msd`` (shape and spacing from :func:`draw_msd_geometry`).

    Returns:
        The phantom.

    Raises:
        ValueError: An unknown task or geometry, or a ``size`` below 8 voxels.
    """
    if task not in TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; choose from {TASKS}")
    if geometry not in GEOMETRIES:
        raise ValueError(f"unknown geometry {geometry!r}; choose from {GEOMETRIES}")
    rng = np.random.default_rng([seed, _TASK_CODES[task], case_index])
    if geometry == "size":
        if size < 8:
            raise ValueError(f"size must be at least 8 voxels, got {size}")
        frame = _frame(*_shape_and_spacing(rng, size, *_SIZE_GEOMETRY[task]))
    else:
        shape, spacing = draw_msd_geometry(task, case_index, seed)
        frame = _frame(shape, spacing, MSD_GEOMETRY[task].anatomy_mm)
    if task == "spleen":
        return _spleen(rng, frame)
    if task == "heart":
        return _heart(rng, frame, num_modalities)
    return _liver(rng, frame)


def _write_case(out_dir: str, image_rel: str, label_rel: str, phantom: Phantom) -> None:
    write_nifti(os.path.join(out_dir, image_rel), phantom.image, phantom.affine)
    write_nifti(os.path.join(out_dir, label_rel), phantom.label, phantom.affine)


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
    geometry: str = "size",
) -> str:
    """Writes a synthetic task in the MSD layout.

    Args:
        task: ``spleen``, ``heart`` or ``liver``.
        out_dir: The task folder to write (created).
        num_train: Labelled training cases (imagesTr/labelsTr).
        num_test: Test cases (imagesTs, with labels in labelsTs).
        size: In-plane size in voxels (``size`` geometry only).
        seed: Seed; the same arguments give the same bytes.
        num_modalities: Channels of the ``heart`` task's images.
        progress: Show a progress bar over the cases.
        geometry: ``size`` (small phantoms of ``size`` voxels in-plane) or ``msd`` (each case's
            shape and spacing drawn from the real task's ranges, :data:`MSD_GEOMETRY`).

    Returns:
        ``out_dir``.

    Raises:
        ValueError: Bad arguments (see also :func:`make_phantom`).
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
    # A writer thread compresses each case (zlib releases the GIL) while the next one is
    # generated; at most one case waits to be written.
    with ThreadPoolExecutor(max_workers=1) as writer:
        writes = []
        for case, index, part in tqdm(cases, desc=f"synthetic {task}", disable=not progress):
            phantom = make_phantom(task, index, size, seed, num_modalities, geometry)
            image_rel = f"./images{part}/{case}.nii.gz"
            label_rel = f"./labels{part}/{case}.nii.gz"
            if writes:
                writes[-1].result()
            writes.append(writer.submit(_write_case, out_dir, image_rel, label_rel, phantom))
            if part == "Tr":
                training.append({"image": image_rel, "label": label_rel})
            else:
                test.append(image_rel)
        writes[-1].result()
    described = f"size {size}" if geometry == "size" else "MSD geometry"
    meta = {
        "name": name,
        "description": f"tf_medseg synthetic {task} phantoms (seed {seed}, {described})",
        "tensorImageSize": "4D" if num_modalities > 1 else "3D",
        "modality": modality,
        "labels": labels,
        "numTraining": len(training),
        "numTest": len(test),
        "training": training,
        "test": test,
    }
    write_json(os.path.join(out_dir, "dataset.json"), meta)
    return out_dir
