"""Intensity normalisation: CT by the training foreground's percentiles, MRI by z-score.

The paper: "For CT volumes, the voxel intensities of the images are normalized to the range
according to the 5th and 95th percentiles of the overall foreground intensities. For MRI
volumes, the non-zero voxel intensities are processed via standard normalization."
"""

from __future__ import annotations

import numpy as np

from tf_medseg.data.io import DataError
from tf_medseg.transforms.base import Transform


class NormalizeCT(Transform):
    """Clips each channel to [lower, upper] and scales it linearly to [0, 1].

    Args:
        lower: Per-channel lower bound (the training foreground's low percentile).
        upper: Per-channel upper bound (the high percentile).
    """

    def __init__(self, lower: list[float], upper: list[float]):
        self.lower = [float(v) for v in lower]
        self.upper = [float(v) for v in upper]
        if len(self.lower) != len(self.upper):
            raise ValueError("lower and upper need one value per channel")
        for lo, hi in zip(self.lower, self.upper, strict=True):
            if not hi > lo:
                raise ValueError(
                    f"CT normalisation range is empty: [{lo}, {hi}]; the training foreground "
                    "has (almost) constant intensity, choose other percentiles"
                )

    @classmethod
    def from_stats(cls, stats: dict, percentiles: tuple[float, float] = (5.0, 95.0)):
        """Builds the transform from :func:`tf_medseg.data.stats.intensity_stats` output."""
        table = stats["percentiles"]
        keys = [str(float(p)) for p in percentiles]
        missing = [k for k in keys if k not in table]
        if missing:
            raise ValueError(f"percentile(s) {missing} not in the statistics ({sorted(table)})")
        return cls(table[keys[0]], table[keys[1]])

    def config(self) -> dict:
        return {"lower": self.lower, "upper": self.upper}

    def __call__(self, data: dict) -> dict:
        lower = np.asarray(self.lower, np.float32)
        upper = np.asarray(self.upper, np.float32)
        # One new C-order float32 array, then in place: the same float32 operations as
        # (clip(x) - lower) / (upper - lower), without two more volume-sized temporaries.
        image = np.empty(data["image"].shape, np.float32)
        np.clip(data["image"], lower, upper, out=image)
        image -= lower
        image /= upper - lower
        return {**data, "image": image}


class NormalizeMRI(Transform):
    """Z-score of each channel's non-zero voxels; zero voxels (the background) stay zero."""

    def __call__(self, data: dict) -> dict:
        image = data["image"].astype(np.float32, order="C", copy=True)
        for c in range(image.shape[3]):
            channel = image[..., c]
            nonzero = channel != 0
            if not nonzero.any():
                raise DataError(f"{data.get('image_path', data['case'])}: channel {c} is all zero")
            values = channel[nonzero]
            std = float(values.std())
            if std < 1e-8:
                raise DataError(
                    f"{data.get('image_path', data['case'])}: channel {c} has constant intensity "
                    "(zero variance), cannot normalise"
                )
            channel[nonzero] = (values - values.mean()) / std
        return {**data, "image": image}
