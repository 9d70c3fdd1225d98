"""Dataset-level intensity statistics over the labelled foreground, for CT normalisation.

The paper normalises CT intensities "according to the 5th and 95th percentiles of the overall
foreground intensities". Those percentiles are a property of the dataset, not of one volume:
the trainer computes them over the labelled foreground of all the data folder's labelled cases
(as nnU-Net's dataset fingerprint), so that every split and cross-validation fold of one folder
normalises alike and their models can be ensembled. They are stored as JSON keyed by the cases'
files, so that a changed set recomputes them.

Reading the volumes is the cost (decompressing a gzip NIfTI is about 0.4 s per MSD-size CT
here), so the cases are read by a pool of threads (the decompression and the array work release
the interpreter lock). Under Horovod only rank 0 reads or computes them, and broadcasts them to
the other ranks. The JSON lives in the task's cache area, or, when the data folder cannot be
written (a read-only mount), in a fallback folder such as the run's workdir.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import pickle
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from typing import Any

import numpy as np
from absl import logging

from tf_medseg.data.io import DataError, check_image, check_label, read_nifti
from tf_medseg.jsonio import write_json
from tf_medseg.planning.system import cpu_count

PERCENTILES = (0.5, 5.0, 50.0, 95.0, 99.5)
STATS_FILE = "intensity_stats.json"


def files_key(items: list[dict]) -> str:
    digest = hashlib.sha256()
    for item in sorted(items, key=lambda it: it["case"]):
        for key in ("image", "label"):
            try:
                st = os.stat(item[key])
            except FileNotFoundError as err:
                raise DataError(f"{item[key]}: file not found") from err
            digest.update(f"{item['case']}|{key}|{st.st_size}|{int(st.st_mtime)}\n".encode())
    return digest.hexdigest()


def _foreground(item: dict, num_channels: int, num_classes: int) -> np.ndarray:
    """The intensities of one case's labelled voxels, (N, channels) float32 in C order."""
    image_vol = read_nifti(item["image"])
    image = check_image(image_vol, num_channels, keep_integer=True)
    label = check_label(read_nifti(item["label"]), image_vol, num_classes)
    return np.asarray(image[label > 0], np.float32)


def in_order(
    function: Callable[[Any], Any], values: Iterable[Any], num_workers: int
) -> Iterator[Any]:
    """``map(function, values)`` on a thread pool, in order, with a bounded number in flight.

    At most ``2 * num_workers`` results are held, so the foreground of a large training set is
    never all in memory at once. A worker's exception is raised here.
    """
    values = iter(values)
    with futures.ThreadPoolExecutor(num_workers, thread_name_prefix="intensity-stats") as pool:
        pending = collections.deque()
        try:
            for value in values:
                pending.append(pool.submit(function, value))
                if len(pending) == 2 * num_workers:
                    break
            while pending:
                result = pending.popleft().result()
                for value in values:  # one more in, if any are left
                    pending.append(pool.submit(function, value))
                    break
                yield result
        finally:
            for future in pending:
                future.cancel()


def compute_intensity_stats(
    items: list[dict],
    num_channels: int,
    num_classes: int,
    max_voxels_per_case: int = 200_000,
    seed: int = 0,
    progress: bool = True,
    num_workers: int | None = None,
) -> dict:
    """Percentiles, mean and standard deviation of the foreground intensities, per channel.

    Args:
        items: Labelled items with "image" and "label" paths.
        num_channels: The task's channels.
        num_classes: The task's classes (labels are checked against them).
        max_voxels_per_case: Foreground voxels kept per case (uniform subsample, fixed seed), so
            that large CT volumes do not dominate memory.
        seed: Seed of the subsampling.
        progress: Show a progress bar.
        num_workers: Threads reading the cases (default: the CPUs this process may use). The
            result does not depend on it: cases are subsampled in their order, from one seed.

    Returns:
        ``{"percentiles": {"0.5": [c0, ...], ...}, "mean": [...], "std": [...],
        "num_voxels": n, "num_cases": m}``.
    """
    from tqdm import tqdm

    num_workers = max(1, num_workers or cpu_count())
    rng = np.random.default_rng(seed)
    samples = []
    foregrounds = in_order(
        lambda item: _foreground(item, num_channels, num_classes), items, num_workers
    )
    for fg in tqdm(
        foregrounds,
        total=len(items),
        desc="intensity statistics",
        disable=not progress,
        leave=False,
    ):
        if fg.shape[0] > max_voxels_per_case:
            fg = fg[rng.choice(fg.shape[0], max_voxels_per_case, replace=False)]
        samples.append(fg)
    values = np.concatenate(samples, axis=0) if samples else np.zeros((0, num_channels))
    if values.shape[0] == 0:
        raise ValueError("no foreground voxels in any label: cannot compute statistics")
    values = values.astype(np.float64)
    return {
        "percentiles": {str(p): np.percentile(values, p, axis=0).tolist() for p in PERCENTILES},
        "mean": values.mean(axis=0).tolist(),
        "std": values.std(axis=0).tolist(),
        "num_voxels": int(values.shape[0]),
        "num_cases": len(items),
    }


def read_keyed(folder: str | None, key: str, name: str = STATS_FILE) -> dict | None:
    """The value stored as ``folder/name`` under ``key``, or None (absent, stale or
    unreadable)."""
    path = os.path.join(folder, name) if folder else None
    if not path or not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            stored = json.load(f)
        if stored.get("key") == key:
            return stored["stats"]
    except (OSError, json.JSONDecodeError, KeyError, AttributeError):
        logging.warning("%s: unreadable, recomputing", path)
    return None


def store_keyed(folder: str, key: str, stats: dict, name: str = STATS_FILE) -> None:
    """Writes ``stats`` under ``key`` atomically as ``folder/name`` (folder created); raises
    OSError on failure."""
    write_json(os.path.join(folder, name), {"key": key, "stats": stats}, indent=1)


def _stats_here(
    items: list[dict],
    num_channels: int,
    num_classes: int,
    folders: list[str],
    progress: bool,
    num_workers: int | None,
) -> dict:
    """Reads the statistics from the first folder that has them, or computes and stores them
    in the first folder that can be written."""
    return stored_or_computed(
        items,
        folders,
        STATS_FILE,
        lambda: compute_intensity_stats(
            items, num_channels, num_classes, progress=progress, num_workers=num_workers
        ),
    )


def stored_or_computed(items: list[dict], folders: list[str], name: str, compute) -> Any:
    """The value stored as ``name`` in the first of ``folders`` that has it for these files
    (:func:`files_key`), or ``compute()``, then stored in the first folder that can be written
    (a folder that cannot is skipped with a warning)."""
    key = files_key(items)
    for folder in folders:
        value = read_keyed(folder, key, name)
        if value is not None:
            return value
    value = compute()
    for folder in folders:
        try:
            store_keyed(folder, key, value, name)
            return value
        except OSError as err:
            logging.warning("could not store %s in %s: %s", name, folder, err)
    return value


def intensity_stats(
    items: list[dict],
    num_channels: int,
    num_classes: int,
    cache_dir: str | None,
    progress: bool = True,
    fallback_dir: str | None = None,
    dist: Any = None,
    num_workers: int | None = None,
) -> dict:
    """The foreground statistics of ``items``: stored ones if the files are the same, else
    computed and stored.

    The stored JSON carries a key of the cases' file names, sizes and modification times; a
    different set of files recomputes. ``cache_dir`` is tried first, then
    ``fallback_dir``, for reading and for writing: a data folder that cannot be written (a
    read-only mount) leaves the statistics in the fallback. A folder that cannot be written is
    skipped with a warning (the statistics are still returned).

    Under Horovod (``dist`` with more than one worker) rank 0 alone reads or computes and
    stores them and broadcasts them; every rank must call this at the same point. An error on
    rank 0 (a bad file) is raised on every rank, so none waits for a broadcast that never comes.

    Args:
        items: The cases to compute them over (the trainer: all the task's labelled cases).
        num_channels: The task's channels.
        num_classes: The task's classes.
        cache_dir: The task's cache area, or None.
        progress: Show a progress bar when computing.
        fallback_dir: A folder for the JSON when ``cache_dir`` cannot be written (the run's
            workdir), or None.
        dist: A :class:`tf_medseg.distributed.Distributed`, or None for a single process.
        num_workers: Threads reading the cases when computing (default: the CPUs).

    Returns:
        The statistics dict of :func:`compute_intensity_stats`.
    """
    folders = [f for f in (cache_dir, fallback_dir) if f]
    if dist is None or dist.size == 1:
        return _stats_here(items, num_channels, num_classes, folders, progress, num_workers)
    result: Any = None
    error = None
    if dist.rank == 0:
        try:
            result = _stats_here(items, num_channels, num_classes, folders, progress, num_workers)
        except Exception as err:  # raised below, on every rank
            error = err
            result = _portable(err)
    result = dist.broadcast_object(result, name="intensity_stats")
    if error is not None:
        raise error
    if isinstance(result, Exception):
        raise result
    return result


def _portable(err: Exception) -> Exception:
    """The exception itself if it can be sent to the other ranks, else its text in one."""
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:
        return RuntimeError(f"rank 0: {type(err).__name__}: {err}")
