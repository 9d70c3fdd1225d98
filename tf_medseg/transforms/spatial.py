"""Spatial deterministic transforms: reorient to RAS, resample, crop to the body; and their inverse.

Each transform appends a step to the item's ``geometry`` record and updates its current affine;
:func:`invert_label` walks the steps backwards to put a label volume back into the geometry of the
file it came from (what ``predict`` writes).
"""

from __future__ import annotations

import copy

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from absl import logging

from tf_medseg.data.io import spacing_from_affine
from tf_medseg.transforms.base import Transform


def _with_step(data: dict, step: dict, affine: np.ndarray) -> dict:
    geometry = copy.deepcopy(data["geometry"])
    geometry["steps"].append(step)
    geometry["affine"] = np.asarray(affine).tolist()
    return {**data, "geometry": geometry}


class Orientation(Transform):
    """Reorients the image and label axes to RAS (nibabel's closest canonical orientation)."""

    def __call__(self, data: dict) -> dict:
        affine = np.asarray(data["geometry"]["affine"])
        shape = data["image"].shape[:3]
        current = nib.orientations.io_orientation(affine)
        to_ras = nib.orientations.ornt_transform(current, nib.orientations.axcodes2ornt("RAS"))
        if np.array_equal(to_ras, [[0, 1], [1, 1], [2, 1]]):
            return data
        out = dict(data)
        out["image"] = np.ascontiguousarray(
            nib.orientations.apply_orientation(data["image"], to_ras)
        )
        if "label" in data:
            out["label"] = np.ascontiguousarray(
                nib.orientations.apply_orientation(data["label"], to_ras)
            )
        new_affine = affine @ nib.orientations.inv_ornt_aff(to_ras, shape)
        step = {"op": "orient", "ornt": to_ras.tolist(), "shape": list(shape)}
        return _with_step(out, step, new_affine)


def resample_array(
    array: np.ndarray,
    spacing: np.ndarray,
    new_shape: tuple[int, int, int],
    new_spacing: np.ndarray,
    nearest: bool,
) -> np.ndarray:
    """Resamples a 3D array with SimpleITK, keeping the first voxel's centre in place.

    Args:
        array: (X, Y, Z) array.
        spacing: Its voxel size (mm).
        new_shape: Output shape.
        new_spacing: Output voxel size (mm).
        nearest: Nearest-neighbour interpolation (labels) instead of linear (images).

    Returns:
        The resampled array, float32 for linear and the input dtype for nearest.
    """
    source = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array, (2, 1, 0))))
    source.SetSpacing([float(s) for s in spacing])
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize([int(n) for n in new_shape])
    resampler.SetOutputSpacing([float(s) for s in new_spacing])
    resampler.SetOutputOrigin(source.GetOrigin())
    resampler.SetOutputDirection(source.GetDirection())
    resampler.SetInterpolator(sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear)
    # The output grid can reach half a voxel past the input's last centre: extend the edge values
    # there rather than filling with 0, which would read as tissue in CT (0 HU).
    resampler.SetUseNearestNeighborExtrapolator(True)
    if not nearest:
        resampler.SetOutputPixelType(sitk.sitkFloat32)
    out = sitk.GetArrayFromImage(resampler.Execute(source))
    return np.ascontiguousarray(np.transpose(out, (2, 1, 0)))


class Resample(Transform):
    """Resamples to a target voxel spacing with SimpleITK: linear for images, nearest for labels.

    The output shape is ``round(shape * spacing / target)`` per axis and the first voxel's centre
    keeps its position, so the new affine is the old one with its columns rescaled.

    Args:
        spacing: Target voxel size in mm (the paper: 1.0 mm isotropic).
    """

    def __init__(self, spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)):
        self.spacing = tuple(float(s) for s in spacing)
        if any(s <= 0 for s in self.spacing):
            raise ValueError(f"target spacing must be positive, got {self.spacing}")

    def config(self) -> dict:
        return {"spacing": list(self.spacing)}

    def __call__(self, data: dict) -> dict:
        affine = np.asarray(data["geometry"]["affine"])
        spacing = spacing_from_affine(affine)
        target = np.asarray(self.spacing)
        shape = np.asarray(data["image"].shape[:3])
        if np.allclose(spacing, target, rtol=1e-4):
            return data
        new_shape = tuple(int(n) for n in np.maximum(1, np.round(shape * spacing / target)))
        out = dict(data)
        out["image"] = np.stack(
            [
                resample_array(data["image"][..., c], spacing, new_shape, target, nearest=False)
                for c in range(data["image"].shape[3])
            ],
            axis=-1,
        )
        if "label" in data:
            out["label"] = resample_array(data["label"], spacing, new_shape, target, nearest=True)
        new_affine = affine.copy()
        new_affine[:3, :3] = affine[:3, :3] * (target / spacing)[None, :]
        step = {
            "op": "resample",
            "shape": shape.tolist(),
            "spacing": spacing.tolist(),
            "new_shape": list(new_shape),
            "new_spacing": target.tolist(),
        }
        return _with_step(out, step, new_affine)


class CropForeground(Transform):
    """Crops to the bounding box of the body (and of the label), with a margin.

    The body is where the first channel exceeds ``threshold`` (CT: -500 HU keeps the body and
    drops the air; MRI: 0 keeps the non-zero voxels). Labelled voxels are always kept.

    Args:
        threshold: Intensity above which a voxel is body.
        margin: Voxels added on each side of the box (clipped to the volume).
    """

    def __init__(self, threshold: float, margin: int = 8):
        self.threshold = float(threshold)
        self.margin = int(margin)

    def config(self) -> dict:
        return {"threshold": self.threshold, "margin": self.margin}

    def __call__(self, data: dict) -> dict:
        mask = data["image"][..., 0] > self.threshold
        if "label" in data:
            mask |= data["label"] > 0
        if not mask.any():
            logging.warning("%s: no voxel above %g, not cropped", data["case"], self.threshold)
            return data
        shape = np.asarray(mask.shape)
        coords = [
            np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != i))) for i in range(3)
        ]
        start = np.maximum(0, [c[0] - self.margin for c in coords])
        stop = np.minimum(shape, [c[-1] + 1 + self.margin for c in coords])
        if np.all(start == 0) and np.all(stop == shape):
            return data
        box = tuple(slice(a, b) for a, b in zip(start, stop, strict=True))
        out = dict(data)
        out["image"] = np.ascontiguousarray(data["image"][box])
        if "label" in data:
            out["label"] = np.ascontiguousarray(data["label"][box])
        affine = np.asarray(data["geometry"]["affine"])
        new_affine = affine.copy()
        new_affine[:3, 3] = affine[:3, 3] + affine[:3, :3] @ start
        step = {
            "op": "crop",
            "shape": shape.tolist(),
            "start": start.tolist(),
            "stop": stop.tolist(),
        }
        return _with_step(out, step, new_affine)


def invert_label(label: np.ndarray, geometry: dict) -> np.ndarray:
    """Puts a label volume in the preprocessed geometry back into the source file's geometry.

    Undoes, last first, the crop (zero padding), the resampling (nearest neighbour) and the
    reorientation recorded in ``geometry``.

    Args:
        label: Integer (X, Y, Z) array in the preprocessed geometry.
        geometry: The item's ``geometry`` record.

    Returns:
        Array with the source file's shape, in its voxel order.
    """
    out = np.asarray(label)
    for step in reversed(geometry["steps"]):
        if step["op"] == "crop":
            full = np.zeros(step["shape"], dtype=out.dtype)
            box = tuple(slice(a, b) for a, b in zip(step["start"], step["stop"], strict=True))
            full[box] = out
            out = full
        elif step["op"] == "resample":
            out = resample_array(
                out,
                np.asarray(step["new_spacing"]),
                tuple(step["shape"]),
                np.asarray(step["spacing"]),
                nearest=True,
            )
        elif step["op"] == "orient":
            ornt = np.asarray(step["ornt"])
            # With RAS as the target, the transform to RAS equals the source orientation.
            inverse = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), ornt)
            out = np.ascontiguousarray(nib.orientations.apply_orientation(out, inverse))
        else:
            raise ValueError(f"unknown geometry step {step['op']!r}")
    if list(out.shape) != list(geometry["source_shape"]):
        raise ValueError(f"inverted shape {out.shape} != source shape {geometry['source_shape']}")
    return out
