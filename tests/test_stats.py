"""Dataset intensity statistics: NumPy reference and the JSON cache."""

from __future__ import annotations

import json
import os

import numpy as np

from tf_medseg.data.io import read_nifti
from tf_medseg.data.msd import load_task
from tf_medseg.data.stats import STATS_FILE, compute_intensity_stats, intensity_stats


def test_matches_numpy_over_training_foreground(spleen_task_dir):
    items = list(load_task(spleen_task_dir).training)[:3]
    stats = compute_intensity_stats(items, 1, 2, progress=False)
    values = np.concatenate(
        [read_nifti(i["image"]).data[read_nifti(i["label"]).data > 0] for i in items]
    ).astype(np.float64)
    np.testing.assert_allclose(stats["percentiles"]["5.0"], [np.percentile(values, 5)])
    np.testing.assert_allclose(stats["percentiles"]["95.0"], [np.percentile(values, 95)])
    np.testing.assert_allclose(stats["mean"], [values.mean()])
    np.testing.assert_allclose(stats["std"], [values.std()])
    assert stats["num_voxels"] == values.size


def test_cached_as_json_and_recomputed_when_files_change(spleen_task_dir, tmp_path):
    items = list(load_task(spleen_task_dir).training)
    cache = str(tmp_path / "cache")
    first = intensity_stats(items[:3], 1, 2, cache, progress=False)
    path = os.path.join(cache, STATS_FILE)
    stored = json.load(open(path))
    assert stored["stats"] == first
    # A tampered value is returned as stored: the cache is read, not recomputed.
    stored["stats"]["mean"] = [12345.0]
    json.dump(stored, open(path, "w"))
    assert intensity_stats(items[:3], 1, 2, cache, progress=False)["mean"] == [12345.0]
    # A different training set recomputes.
    other = intensity_stats(items[:4], 1, 2, cache, progress=False)
    assert other["mean"] != [12345.0] and other["num_cases"] == 4
