"""A dataset's fingerprint: what the planner (:mod:`tf_medseg.planning.rules`) knows of the data.

Per labelled case its shape and spacing, the extent of its foreground (mm), the number of
sizeable connected foreground components, the class voxel counts and the foreground intensity
percentiles. The cases are read by a pool of threads, and the result is stored beside the
intensity statistics (the task's cache area, or a fallback folder), keyed by the files, so a
second plan reads it back in milliseconds. The summaries here (class fractions, the smallest
class, class diameters) are read off it; no TensorFlow.
"""

from __future__ import annotations

import numpy as np

from tf_medseg.data.io import read_nifti, spacing_from_affine
from tf_medseg.data.stats import in_order, stored_or_computed
from tf_medseg.planning.system import cpu_count

FINGERPRINT_FILE = "fingerprint.json"
#: A component counts when it holds at least this fraction of a case's foreground.
COMPONENT_FRACTION = 0.05
#: A foreground class under this share of the labelled foreground is small (liver lesions: a few
#: percent of the liver; the synthetic liver's lesions: 0.6-1.1% of it).
SMALL_CLASS_SHARE = 0.1
#: A foreground class under this fraction of all voxels is small (spleens and left atria: 0.3-0.8%
#: in the MSD-size phantoms, sized as the Decathlon's; lung and colon tumours are typically far
#: smaller).
SMALL_CLASS_FRACTION = 0.001


def _case_facts(item: dict) -> dict:
    label = read_nifti(item["label"])
    image = read_nifti(item["image"])
    spacing = [float(s) for s in spacing_from_affine(label.affine)]
    data = np.asarray(label.data)
    fg = data > 0
    extent, components = [0.0, 0.0, 0.0], 0
    if fg.any():
        for axis in range(3):
            hit = np.flatnonzero(fg.any(axis=tuple(a for a in range(3) if a != axis)))
            extent[axis] = float((hit[-1] - hit[0] + 1) * spacing[axis])
        import SimpleITK as sitk

        cc = sitk.ConnectedComponent(sitk.GetImageFromArray(fg.astype(np.uint8)))
        sizes = np.bincount(sitk.GetArrayViewFromImage(cc).ravel())[1:]
        components = int(np.sum(sizes >= COMPONENT_FRACTION * fg.sum()))
    first = np.asarray(image.data)
    first = first[..., 0] if first.ndim == 4 else first
    values = first[fg] if fg.any() else first.ravel()
    p05, p50, p95 = (float(v) for v in np.percentile(values, [5, 50, 95]))
    return {
        "case": item["case"],
        "shape": [int(n) for n in data.shape[:3]],
        "spacing": spacing,
        "foreground_extent_mm": extent,
        "components": components,
        "class_voxels": np.bincount(data.ravel().astype(np.int64)).tolist(),
        "foreground_percentiles": [p05, p50, p95],
    }


def fingerprint(task, folders: list[str] | None = None, num_workers: int | None = None) -> dict:
    """The dataset's fingerprint over its labelled cases, stored in the first of ``folders``
    that can be written (default: the task's cache area) and read back while the files are the
    same.

    Returns:
        ``{"task", "modalities", "labels", "num_cases", "cases": [per-case facts]}`` with the
        medians :func:`summarise` adds.
    """
    items = list(task.training)
    folders = folders if folders is not None else [task.cache_dir]

    def compute() -> dict:
        workers = max(1, num_workers or cpu_count())
        return summarise(
            {
                "task": task.name,
                "modalities": list(task.modalities),
                "labels": list(task.labels),
                "num_cases": len(items),
                "cases": list(in_order(_case_facts, items, workers)),
            }
        )

    # Summarised again: a fingerprint stored by an earlier version lacks the newer summaries.
    return summarise(stored_or_computed(items, folders, FINGERPRINT_FILE, compute))


def class_fractions(fp: dict) -> dict[str, dict[str, float]]:
    """Each foreground class's voxels over all labelled cases, as a fraction of all their
    voxels (``of_image``) and of their foreground voxels (``of_foreground``).

    Returns:
        ``{"of_image": {label: fraction}, "of_foreground": {label: fraction}}`` for the
        foreground labels (0 for a class no case contains).
    """
    labels = fp["labels"]
    counts = np.zeros(len(labels), np.float64)
    for case in fp["cases"]:
        voxels = np.asarray(case["class_voxels"], np.float64)[: len(labels)]
        counts[: len(voxels)] += voxels  # bincount: a case without the last classes is short
    total, foreground = max(counts.sum(), 1.0), max(counts[1:].sum(), 1.0)
    named = list(zip(labels[1:], counts[1:], strict=True))
    return {
        "of_image": {n: float(c / total) for n, c in named},
        "of_foreground": {n: float(c / foreground) for n, c in named},
    }


def smallest_class(fp: dict) -> tuple[str, bool, str]:
    """The smallest foreground class, whether it is small (the module's rule), and why."""
    fractions = class_fractions(fp)
    of_image, of_foreground = fractions["of_image"], fractions["of_foreground"]
    name = min(of_image, key=of_image.get)
    share, fraction = of_foreground[name], of_image[name]
    small = share < SMALL_CLASS_SHARE or fraction < SMALL_CLASS_FRACTION
    why = (
        f"smallest class {name!r}: {100 * share:.2g}% of the foreground, "
        f"{100 * fraction:.2g}% of the voxels ("
        + ("small" if small else "not small")
        + f": under {100 * SMALL_CLASS_SHARE:g}% or {100 * SMALL_CLASS_FRACTION:g}% is small)"
    )
    return name, small, why


def class_diameters(fp: dict) -> dict[str, float]:
    """Each foreground class's size (mm): per case, the diameter of the sphere of its voxels'
    volume, the median over the cases that contain it (0 for a class no case contains). A case
    with several lesions counts them as one: the figure bounds the single lesion's from above.
    """
    labels = fp["labels"]
    per_class: list[list[float]] = [[] for _ in labels[1:]]
    for case in fp["cases"]:
        voxel_mm3 = float(np.prod(case["spacing"]))
        for c, count in enumerate(case["class_voxels"][1 : len(labels)]):
            if count > 0:
                per_class[c].append((6.0 * count * voxel_mm3 / np.pi) ** (1.0 / 3.0))
    return {
        name: float(np.median(sizes)) if sizes else 0.0
        for name, sizes in zip(labels[1:], per_class, strict=True)
    }


def summarise(fp: dict) -> dict:
    """Adds the medians and class fractions the rules use to a fingerprint's per-case facts."""
    cases = fp["cases"]

    def median(key):
        return [float(v) for v in np.median(np.array([c[key] for c in cases], float), axis=0)]

    spacing = median("spacing")
    shape = median("shape")
    total = sum(sum(c["class_voxels"]) for c in cases)
    fg = sum(sum(c["class_voxels"][1:]) for c in cases)
    return {
        **fp,
        "median_spacing": spacing,
        "median_shape": shape,
        "median_extent_mm": [n * s for n, s in zip(shape, spacing, strict=True)],
        "median_foreground_extent_mm": median("foreground_extent_mm"),
        "median_components": float(np.median([c["components"] for c in cases])),
        "foreground_fraction": fg / max(total, 1),
        "class_fractions": class_fractions(fp),
        "class_diameters_mm": class_diameters(fp),
    }


# ---------------------------------------------------------------------------------- machine
