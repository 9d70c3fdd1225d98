"""What the serving graph does, read off a run's preprocessing chain and window settings."""

from __future__ import annotations

from dataclasses import dataclass

from tf_medseg.inference.window import WindowSettings
from tf_medseg.transforms.base import Compose
from tf_medseg.transforms.indices import ForegroundIndices
from tf_medseg.transforms.intensity import NormalizeCT, NormalizeMRI
from tf_medseg.transforms.load import LoadImage
from tf_medseg.transforms.spatial import CropForeground, Orientation, Resample, ResampleAndCrop


class ExportError(ValueError):
    """The model or its preprocessing cannot be expressed as the serving graph."""


@dataclass(frozen=True)
class ServingSpec:
    """What the serving graph does, read off a preprocessing chain and the window settings.

    Attributes:
        num_channels: Image channels.
        num_classes: Classes, background included.
        spacing: Target voxel size (mm), or None when the chain does not resample.
        threshold: Body threshold of the crop, or None when the chain does not crop.
        margin: Voxels kept around the body's box.
        normalise: ``"ct"`` or ``"mri"``.
        ct_lower: Per-channel CT clip bounds (``"ct"``).
        ct_upper: Per-channel upper bounds.
        window: The sliding window and the post-processing, as predict runs them.
        tta: Average over the 8 mirrorings of each window batch.
    """

    num_channels: int
    num_classes: int
    spacing: tuple[float, float, float] | None
    threshold: float | None
    margin: int
    normalise: str
    ct_lower: tuple[float, ...]
    ct_upper: tuple[float, ...]
    window: WindowSettings
    tta: bool


def spec_from_chain(chain: Compose, settings, tta: bool = False) -> ServingSpec:
    """Reads the serving graph's settings off predict's chain and window settings.

    Args:
        chain: The deterministic chain of ``preprocessing.json``: LoadImage, Orientation,
            ResampleAndCrop (or Resample, CropForeground), a normalisation, ForegroundIndices.
        settings: The window settings (:class:`tf_medseg.inference.window.WindowSettings`).
        tta: Test-time augmentation by mirroring.

    Raises:
        ExportError: The chain holds a transform the graph does not have, or not in this order.
    """
    transforms = list(chain.transforms)
    names = [type(t).__name__ for t in transforms]
    if not transforms or not isinstance(transforms[0], LoadImage):
        raise ExportError(f"the chain must start with LoadImage, got {names}")
    load = transforms.pop(0)
    if transforms and isinstance(transforms[-1], ForegroundIndices):
        transforms.pop()  # training's sampling lists: nothing to do at inference
    if not transforms or not isinstance(transforms[0], Orientation):
        raise ExportError(f"the chain must reorient after loading, got {names}")
    transforms.pop(0)
    spacing = threshold = None
    margin = 0
    if transforms and isinstance(transforms[0], ResampleAndCrop):
        step = transforms.pop(0)
        spacing, threshold, margin = step.resample.spacing, step.crop.threshold, step.crop.margin
    else:
        if transforms and isinstance(transforms[0], Resample):
            spacing = transforms.pop(0).spacing
        if transforms and isinstance(transforms[0], CropForeground):
            crop = transforms.pop(0)
            threshold, margin = crop.threshold, crop.margin
    if len(transforms) != 1 or not isinstance(transforms[0], NormalizeCT | NormalizeMRI):
        raise ExportError(
            f"cannot export the chain {names}: expected LoadImage, Orientation, ResampleAndCrop "
            "(or Resample, CropForeground), NormalizeCT or NormalizeMRI, ForegroundIndices"
        )
    normalise = transforms[0]
    is_ct = isinstance(normalise, NormalizeCT)
    return ServingSpec(
        num_channels=int(load.num_channels),
        num_classes=int(load.num_classes),
        spacing=None if spacing is None else tuple(float(s) for s in spacing),
        threshold=None if threshold is None else float(threshold),
        margin=int(margin),
        normalise="ct" if is_ct else "mri",
        ct_lower=tuple(normalise.lower) if is_ct else (),
        ct_upper=tuple(normalise.upper) if is_ct else (),
        window=settings,
        tta=bool(tta),
    )


# --------------------------------------------------------------------------------------------
# Geometry, as TensorFlow ops
