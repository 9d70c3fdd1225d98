"""Foreground and background voxel lists for the patch sampler, computed once per item.

Finding foreground voxels is the expensive part of choosing a positive patch centre; nnU-Net and
the paper's pipeline do it in the deterministic stage, so that the random tail only draws an
index. The lists are subsampled to a bounded size with a seed derived from the case name, so the
cached item is the same in every run.
"""

from __future__ import annotations

import zlib

import numpy as np
from absl import logging

from tf_medseg.transforms.base import Transform


class ForegroundIndices(Transform):
    """Adds ``fg_indices`` and ``bg_indices``: int32 (N, 3) voxel coordinates of label > 0 and
    label == 0, each subsampled to at most ``max_indices`` rows (the foreground: per class,
    class after class, with ``per_class``, so that a small class keeps its voxels beside a large
    one; with one class the lists are the same either way), and ``fg_counts``: int32 (M,) the
    foreground rows of each class in that order (one entry, all rows, without ``per_class`` or
    with one class), which the class-balanced draw of the random tail reads instead of looking
    the classes up again for every patch.

    An item without a label is passed through. A label with no foreground is allowed (a warning
    is logged) and gets an empty (0, 3) foreground list; the sampler then draws background only.

    Args:
        max_indices: Upper bound of each list's length.
        seed: Seed of the subsampling (combined with the case name).
    """

    def __init__(self, max_indices: int = 20_000, seed: int = 0, per_class: bool = True):
        self.max_indices = int(max_indices)
        self.seed = int(seed)
        self.per_class = bool(per_class)

    def config(self) -> dict:
        return {"max_indices": self.max_indices, "seed": self.seed, "per_class": self.per_class}

    def __call__(self, data: dict) -> dict:
        if "label" not in data:
            return data
        rng = np.random.default_rng([self.seed, zlib.crc32(data["case"].encode())])
        label = data["label"]
        out = dict(data)
        fg = np.flatnonzero(label > 0)
        # The draws are those of ``np.sort(rng.choice(positions, n, replace=False))`` (a choice
        # from an array draws its indices as from its length), foreground first.
        groups = [fg]
        if self.per_class:
            classes = np.unique(label.flat[fg])
            if classes.size > 1:
                groups = [fg[label.flat[fg] == c] for c in classes]
        fg_groups = [self._subsample(group, rng) for group in groups]
        fg_rows = np.concatenate(fg_groups)
        out["fg_counts"] = np.array([group.size for group in fg_groups], np.int32)
        num_bg = label.size - fg.size
        if num_bg > self.max_indices:
            # The k-th background voxel, without listing the background (most of the volume):
            # before it come k background voxels and the foreground voxels below it.
            picks = np.sort(rng.choice(num_bg, self.max_indices, replace=False))
            bg_rows = picks + np.searchsorted(fg - np.arange(fg.size), picks, side="right")
        else:
            bg_rows = np.flatnonzero(label == 0)
        for key, rows in (("fg_indices", fg_rows), ("bg_indices", bg_rows)):
            out[key] = np.stack(np.unravel_index(rows, label.shape), axis=1).astype(np.int32)
        if out["fg_indices"].shape[0] == 0:
            logging.warning(
                "%s: label has no foreground; patches from it are background only",
                data.get("label_path", data["case"]),
            )
        return out

    def _subsample(self, positions: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if positions.size > self.max_indices:
            return positions[np.sort(rng.choice(positions.size, self.max_indices, replace=False))]
        return positions
