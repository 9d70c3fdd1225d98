"""Dataset intensity statistics: NumPy reference, threads, the JSON cache and its fallback,
and rank 0 computing them for every worker."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from tf_medseg.data.io import DataError, read_nifti
from tf_medseg.data.msd import load_task
from tf_medseg.data.stats import STATS_FILE, compute_intensity_stats, intensity_stats
from tf_medseg.distributed import Distributed
from tf_medseg.transforms import build_preprocessing


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


def _sequential_reference(items, max_voxels_per_case, seed=0):
    """The statistics as computed one case after the other, from one generator."""
    rng = np.random.default_rng(seed)
    samples = []
    for item in items:
        image = read_nifti(item["image"]).data.astype(np.float32)
        fg = image[read_nifti(item["label"]).data > 0][:, None]
        if fg.shape[0] > max_voxels_per_case:
            fg = fg[rng.choice(fg.shape[0], max_voxels_per_case, replace=False)]
        samples.append(fg)
    return np.concatenate(samples).astype(np.float64)


def test_threads_give_the_sequential_result(spleen_task_dir):
    items = list(load_task(spleen_task_dir).training)
    values = _sequential_reference(items, max_voxels_per_case=50)
    for workers in (1, 3):
        stats = compute_intensity_stats(
            items, 1, 2, max_voxels_per_case=50, progress=False, num_workers=workers
        )
        assert stats["num_voxels"] == values.shape[0] == 50 * len(items)
        for p in ("0.5", "5.0", "50.0", "95.0", "99.5"):
            assert stats["percentiles"][p] == [np.percentile(values, float(p))]
        assert stats["mean"] == [values.mean()] and stats["std"] == [values.std()]


def test_a_bad_case_fails_the_computation(spleen_task_dir, tmp_path):
    items = [dict(item) for item in load_task(spleen_task_dir).training]
    items[4]["label"] = str(tmp_path / "missing.nii.gz")
    with pytest.raises(DataError, match="missing.nii.gz: file not found"):
        compute_intensity_stats(items, 1, 2, progress=False, num_workers=2)


def _unwritable(tmp_path) -> str:
    """A folder that cannot be created, for root too: its parent is a regular file."""
    blocker = tmp_path / "data" / "not_a_folder"
    blocker.parent.mkdir()
    blocker.write_text("")
    return str(blocker / ".tf_medseg_cache")


def test_stored_in_the_fallback_when_the_cache_cannot_be_written(spleen_task_dir, tmp_path, caplog):
    items = list(load_task(spleen_task_dir).training)[:3]
    cache, workdir = _unwritable(tmp_path), str(tmp_path / "workdir")
    with caplog.at_level("WARNING"):
        first = intensity_stats(items, 1, 2, cache, progress=False, fallback_dir=workdir)
    messages = [r.getMessage() for r in caplog.records]
    assert any("could not store" in m and cache in m for m in messages)
    path = os.path.join(workdir, STATS_FILE)
    stored = json.load(open(path))
    assert stored["stats"] == first
    # The next run reads them from there.
    stored["stats"]["mean"] = [12345.0]
    json.dump(stored, open(path, "w"))
    again = intensity_stats(items, 1, 2, cache, progress=False, fallback_dir=workdir)
    assert again["mean"] == [12345.0]
    # A writable cache area is used first, and read first.
    cache = str(tmp_path / "cache")
    assert intensity_stats(items, 1, 2, cache, progress=False, fallback_dir=workdir)["mean"] == [
        12345.0
    ]
    assert not os.path.exists(os.path.join(cache, STATS_FILE))
    os.remove(path)
    intensity_stats(items, 1, 2, cache, progress=False, fallback_dir=workdir)
    assert os.path.isfile(os.path.join(cache, STATS_FILE)) and not os.path.exists(path)


def test_a_data_folder_that_cannot_be_written_leaves_them_in_the_workdir(
    spleen_task_dir, tmp_path, caplog
):
    """A read-only data folder, as root sees one too: a regular file where the task's cache
    area would be created (a chmod does not stop root, and CI runs as root)."""
    items = list(load_task(spleen_task_dir).training)[:3]
    data = tmp_path / "data"
    data.write_text("")
    cache, workdir = str(data / ".tf_medseg_cache"), str(tmp_path / "workdir")
    with caplog.at_level("WARNING"):
        first = intensity_stats(items, 1, 2, cache, progress=False, fallback_dir=workdir)
    assert any("could not store" in r.getMessage() for r in caplog.records)
    assert not os.path.isdir(cache)
    path = os.path.join(workdir, STATS_FILE)
    assert json.load(open(path))["stats"] == first
    os.utime(path, (0, 0))  # read back, not written again
    assert intensity_stats(items, 1, 2, cache, progress=False, fallback_dir=workdir) == first
    assert os.stat(path).st_mtime == 0


def test_build_preprocessing_passes_the_workdir_as_fallback(spleen_task_dir, tmp_path):
    root = tmp_path / "task"
    shutil.copytree(spleen_task_dir, root, ignore=shutil.ignore_patterns(".tf_medseg_cache"))
    (root / ".tf_medseg_cache").write_text("")  # the task's cache area cannot be a folder
    task = load_task(str(root))
    run = str(tmp_path / "run")
    chain = build_preprocessing(task, list(task.training), progress=False, fallback_dir=run)
    assert os.path.isfile(os.path.join(run, STATS_FILE))
    assert chain(task.training[0])["image"].dtype == np.float32


class _Workers:
    """Two ranks' view of the collectives: this rank, and what rank 0 broadcasts."""

    def __init__(self, rank: int, from_rank0=None):
        self.rank, self.size, self.from_rank0, self.broadcasts = rank, 2, from_rank0, []

    def broadcast_object(self, value, name):
        self.broadcasts.append(name)
        return value if self.rank == 0 else self.from_rank0


def test_rank0_computes_and_the_others_receive(spleen_task_dir, tmp_path):
    items = list(load_task(spleen_task_dir).training)[:3]
    rank0 = _Workers(0)
    stats = intensity_stats(items, 1, 2, str(tmp_path / "cache"), progress=False, dist=rank0)
    assert rank0.broadcasts == ["intensity_stats"]
    # Rank 1 reads nothing: its items need not even exist.
    absent = [{"case": "x", "image": "/nonexistent/x.nii.gz", "label": "/nonexistent/y.nii.gz"}]
    rank1 = _Workers(1, from_rank0=stats)
    assert intensity_stats(absent, 1, 2, str(tmp_path / "other"), dist=rank1) == stats
    assert rank1.broadcasts == ["intensity_stats"] and not os.path.exists(tmp_path / "other")


def test_an_error_on_rank0_is_raised_on_every_rank(spleen_task_dir, tmp_path):
    items = [dict(item) for item in load_task(spleen_task_dir).training][:3]
    items[1]["image"] = str(tmp_path / "gone.nii.gz")
    rank0 = _Workers(0)
    with pytest.raises(DataError, match="gone.nii.gz"):
        intensity_stats(items, 1, 2, None, progress=False, dist=rank0)
    assert rank0.broadcasts == ["intensity_stats"]  # sent before raising: no rank waits forever
    sent = DataError(f"{items[1]['image']}: file not found")
    with pytest.raises(DataError, match="gone.nii.gz"):
        intensity_stats(items, 1, 2, None, dist=_Workers(1, from_rank0=sent))


def test_a_single_process_broadcasts_to_itself():
    assert Distributed().broadcast_object({"a": 1}, "x") == {"a": 1}
