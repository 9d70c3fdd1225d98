"""The deterministic preprocessing chain of a task, as the paper describes it.

load -> reorient to RAS -> resample (1.0 mm isotropic) -> crop to the body -> normalise
(CT: foreground percentiles; MRI: z-score of non-zero voxels) -> foreground/background indices.
All of it is deterministic, so all of it is the smart cache's prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

from tf_medseg.data.msd import MSDTask
from tf_medseg.data.stats import intensity_stats
from tf_medseg.transforms.base import Compose
from tf_medseg.transforms.indices import ForegroundIndices
from tf_medseg.transforms.intensity import NormalizeCT, NormalizeMRI
from tf_medseg.transforms.load import LoadImage
from tf_medseg.transforms.spatial import CropForeground, Orientation, Resample

#: Body thresholds of the crop, by normalisation kind: CT in HU, MRI non-zero.
BODY_THRESHOLD = {"ct": -500.0, "mri": 0.0}


@dataclass(frozen=True)
class PreprocessingConfig:
    """Settings of the deterministic chain.

    Attributes:
        spacing: Target voxel size (mm).
        ct_percentiles: Foreground percentiles of the CT range (paper: 5 and 95; 0.5 and 99.5
            is the common alternative).
        crop_margin: Voxels kept around the body's bounding box.
        max_indices: Bound of the foreground/background index lists.
        seed: Seed of the index subsampling.
    """

    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    ct_percentiles: tuple[float, float] = (5.0, 95.0)
    crop_margin: int = 8
    max_indices: int = 20_000
    seed: int = 0


def build_preprocessing(
    task: MSDTask,
    train_items: list[dict],
    config: PreprocessingConfig | None = None,
    progress: bool = True,
) -> Compose:
    """The task's deterministic chain.

    Args:
        task: The task (its modality chooses the normalisation).
        train_items: The training split; CT statistics come from these only, never validation.
        config: Chain settings (defaults: the paper's).
        progress: Show a progress bar while statistics are computed.

    Returns:
        A Compose whose every member is deterministic (its own deterministic prefix).
    """
    config = config or PreprocessingConfig()
    if task.is_ct:
        stats = intensity_stats(
            train_items, task.num_channels, task.num_classes, task.cache_dir, progress=progress
        )
        normalise = NormalizeCT.from_stats(stats, config.ct_percentiles)
        threshold = BODY_THRESHOLD["ct"]
    else:
        normalise = NormalizeMRI()
        threshold = BODY_THRESHOLD["mri"]
    return Compose(
        [
            LoadImage(task.num_channels, task.num_classes),
            Orientation(),
            Resample(config.spacing),
            CropForeground(threshold, config.crop_margin),
            normalise,
            ForegroundIndices(config.max_indices, config.seed),
        ]
    )
