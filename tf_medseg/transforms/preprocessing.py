"""The deterministic preprocessing chain of a task, as the paper describes it.

load -> reorient to RAS -> resample (1.0 mm isotropic) -> crop to the body -> normalise
(CT: foreground percentiles; MRI: z-score of non-zero voxels) -> foreground/background indices.
All of it is deterministic, so all of it is the smart cache's prefix. Resampling and cropping
are one transform, :class:`~tf_medseg.transforms.spatial.ResampleAndCrop`, which resamples only
the part of the volume the crop keeps (the same output as the two in a row, for less work).

The trainer writes the chain's :meth:`Compose.config` to ``workdir/preprocessing.json``;
:func:`preprocessing_from_config` builds the same chain back from it, so that ``predict``
preprocesses new volumes exactly as training did (the CT range comes from the file, not from
the training data, which predict does not need). Chains saved before the fused transform name
``Resample`` and ``CropForeground`` apart; both are still known, and give the same items.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tf_medseg.data.msd import MSDTask
from tf_medseg.data.stats import intensity_stats
from tf_medseg.transforms.base import Compose, Transform
from tf_medseg.transforms.indices import ForegroundIndices
from tf_medseg.transforms.intensity import NormalizeCT, NormalizeMRI
from tf_medseg.transforms.load import LoadImage
from tf_medseg.transforms.spatial import CropForeground, Orientation, Resample, ResampleAndCrop

#: The transforms a saved chain may name, by class name; each takes its ``config()`` as kwargs.
TRANSFORMS: dict[str, type[Transform]] = {
    cls.__name__: cls
    for cls in (
        LoadImage,
        Orientation,
        Resample,
        CropForeground,
        ResampleAndCrop,
        NormalizeCT,
        NormalizeMRI,
        ForegroundIndices,
    )
}

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
    *,
    dist: Any = None,
    fallback_dir: str | None = None,
    num_workers: int | None = None,
) -> Compose:
    """The task's deterministic chain.

    Args:
        task: The task (its modality chooses the normalisation).
        train_items: The cases the CT statistics are computed over (the trainer gives all the
            task's labelled cases, so that every split and fold of the folder shares them).
        config: Chain settings (defaults: the paper's).
        progress: Show a progress bar while statistics are computed.
        dist: The workers (a :class:`tf_medseg.distributed.Distributed`): under Horovod rank 0
            alone computes the CT statistics and shares them, so every rank must call this at
            the same point. None: a single process.
        fallback_dir: Where the CT statistics are stored when the task's cache area cannot be
            written (a read-only data folder): the run's workdir.
        num_workers: Threads reading the training cases for the CT statistics (the cache's
            workers; default: the CPUs).

    Returns:
        A Compose whose every member is deterministic (its own deterministic prefix).
    """
    config = config or PreprocessingConfig()
    if task.is_ct:
        stats = intensity_stats(
            train_items,
            task.num_channels,
            task.num_classes,
            task.cache_dir,
            progress=progress,
            fallback_dir=fallback_dir,
            dist=dist,
            num_workers=num_workers,
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
            ResampleAndCrop(config.spacing, threshold=threshold, margin=config.crop_margin),
            normalise,
            ForegroundIndices(config.max_indices, config.seed),
        ]
    )


def preprocessing_from_config(config: dict[str, Any]) -> Compose:
    """Rebuilds a deterministic chain from its :meth:`Compose.config` (``preprocessing.json``).

    Args:
        config: ``{"transforms": [{"name": ..., **settings}, ...]}``; nested chains appear as
            entries named ``Compose`` with their own ``transforms``.

    Returns:
        A Compose equal in settings (and so in :meth:`Compose.config_fingerprint`) to the one
        the configuration was taken from.

    Raises:
        ValueError: The configuration names an unknown transform or settings it does not take.
    """
    if not isinstance(config, dict) or not isinstance(config.get("transforms"), list):
        raise ValueError("a preprocessing configuration needs a 'transforms' list")
    transforms: list[Transform] = []
    for entry in config["transforms"]:
        settings = dict(entry)
        name = settings.pop("name", None)
        if name == "Compose":
            transforms.append(preprocessing_from_config(settings))
            continue
        if name not in TRANSFORMS:
            raise ValueError(
                f"unknown transform {name!r} in the preprocessing configuration; "
                f"known: {sorted(TRANSFORMS)}"
            )
        try:
            transforms.append(TRANSFORMS[name](**settings))
        except TypeError as err:
            raise ValueError(f"bad settings for {name}: {settings} ({err})") from err
    return Compose(transforms)
