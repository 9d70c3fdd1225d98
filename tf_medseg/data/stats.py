"""Dataset-level intensity statistics over the training foreground, for CT normalisation.

The paper normalises CT intensities "according to the 5th and 95th percentiles of the overall
foreground intensities". Those percentiles are a property of the training set, not of one
volume: they are computed once over the labelled foreground of the training cases and stored as
JSON in the task's cache area, keyed by the cases' files so that a changed set recomputes them.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile

import numpy as np
from absl import logging

from tf_medseg.data.io import check_image, check_label, read_nifti

PERCENTILES = (0.5, 5.0, 50.0, 95.0, 99.5)
STATS_FILE = "intensity_stats.json"


def _files_key(items: list[dict]) -> str:
    digest = hashlib.sha256()
    for item in sorted(items, key=lambda it: it["case"]):
        for key in ("image", "label"):
            st = os.stat(item[key])
            digest.update(f"{item['case']}|{key}|{st.st_size}|{int(st.st_mtime)}\n".encode())
    return digest.hexdigest()


def compute_intensity_stats(
    items: list[dict],
    num_channels: int,
    num_classes: int,
    max_voxels_per_case: int = 200_000,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Percentiles, mean and standard deviation of the foreground intensities, per channel.

    Args:
        items: Training items with "image" and "label" paths.
        num_channels: The task's channels.
        num_classes: The task's classes (labels are checked against them).
        max_voxels_per_case: Foreground voxels kept per case (uniform subsample, fixed seed), so
            that large CT volumes do not dominate memory.
        seed: Seed of the subsampling.
        progress: Show a progress bar.

    Returns:
        ``{"percentiles": {"0.5": [c0, ...], ...}, "mean": [...], "std": [...],
        "num_voxels": n, "num_cases": m}``.
    """
    from tqdm import tqdm

    rng = np.random.default_rng(seed)
    samples = []
    for item in tqdm(items, desc="intensity statistics", disable=not progress, leave=False):
        image_vol = read_nifti(item["image"])
        image = check_image(image_vol, num_channels)
        label = check_label(read_nifti(item["label"]), image_vol, num_classes)
        fg = image[label > 0]
        if fg.shape[0] > max_voxels_per_case:
            fg = fg[rng.choice(fg.shape[0], max_voxels_per_case, replace=False)]
        samples.append(fg)
    values = np.concatenate(samples, axis=0) if samples else np.zeros((0, num_channels))
    if values.shape[0] == 0:
        raise ValueError("no foreground voxels in any training label: cannot compute statistics")
    values = values.astype(np.float64)
    return {
        "percentiles": {str(p): np.percentile(values, p, axis=0).tolist() for p in PERCENTILES},
        "mean": values.mean(axis=0).tolist(),
        "std": values.std(axis=0).tolist(),
        "num_voxels": int(values.shape[0]),
        "num_cases": len(items),
    }


def intensity_stats(
    items: list[dict],
    num_channels: int,
    num_classes: int,
    cache_dir: str | None,
    progress: bool = True,
) -> dict:
    """The training foreground statistics, read from ``cache_dir`` or computed and stored there.

    The stored JSON carries a key of the cases' file names, sizes and modification times; a
    different set of training files recomputes. A cache folder that cannot be written is
    skipped with a warning (the statistics are still returned).

    Args:
        items: The training items (use the training split only, not validation).
        num_channels: The task's channels.
        num_classes: The task's classes.
        cache_dir: Where the JSON lives, or None to always compute.
        progress: Show a progress bar when computing.

    Returns:
        The statistics dict of :func:`compute_intensity_stats`.
    """
    key = _files_key(items)
    path = os.path.join(cache_dir, STATS_FILE) if cache_dir else None
    if path and os.path.isfile(path):
        try:
            with open(path) as f:
                stored = json.load(f)
            if stored.get("key") == key:
                return stored["stats"]
        except (OSError, json.JSONDecodeError, KeyError):
            logging.warning("%s: unreadable statistics cache, recomputing", path)
    stats = compute_intensity_stats(items, num_channels, num_classes, progress=progress)
    if path:
        try:
            os.makedirs(cache_dir, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump({"key": key, "stats": stats}, f, indent=1)
            os.replace(tmp, path)
        except OSError as err:
            logging.warning("could not store intensity statistics in %s: %s", cache_dir, err)
    return stats
