"""Spatial deterministic transforms: reorient to RAS, resample, crop to the body; and their inverse.

Each transform appends a step to the item's ``geometry`` record and updates its current affine;
:func:`invert_label` walks the steps backwards to put a label volume back into the geometry of the
file it came from (what ``predict`` writes).
"""

from __future__ import annotations

import copy

import nibabel as nib
import numpy as np
from absl import logging

from tf_medseg.data.io import spacing_from_affine
from tf_medseg.transforms.base import Transform
from tf_medseg.transforms.resampling import (
    array_view,
    copy_array,
    copy_into,
    resample_image,
    resample_label,
    sitk_image,
)


def _with_step(data: dict, step: dict, affine: np.ndarray) -> dict:
    geometry = copy.deepcopy(data["geometry"])
    geometry["steps"].append(step)
    geometry["affine"] = np.asarray(affine).tolist()
    return {**data, "geometry": geometry}


def _layout(array: np.ndarray) -> str:
    return "F" if array.flags.f_contiguous and not array.flags.c_contiguous else "C"


class Orientation(Transform):
    """Reorients the image and label axes to RAS (nibabel's closest canonical orientation).

    The arrays keep their memory order (x fastest, as read), so that a flip is a streaming copy.
    """

    def __call__(self, data: dict) -> dict:
        affine = np.asarray(data["geometry"]["affine"])
        shape = data["image"].shape[:3]
        current = nib.orientations.io_orientation(affine)
        to_ras = nib.orientations.ornt_transform(current, nib.orientations.axcodes2ornt("RAS"))
        if np.array_equal(to_ras, [[0, 1], [1, 1], [2, 1]]):
            return data
        out = dict(data)
        for key in ("image", "label"):
            if key in data:
                array = data[key]
                oriented = nib.orientations.apply_orientation(array, to_ras)
                out[key] = copy_array(oriented, _layout(array))
        new_affine = affine @ nib.orientations.inv_ornt_aff(to_ras, shape)
        step = {"op": "orient", "ornt": to_ras.tolist(), "shape": list(shape)}
        return _with_step(out, step, new_affine)


class Resample(Transform):
    """Resamples to a target voxel spacing with SimpleITK: linear for images, nearest for labels.

    The output shape is ``round(shape * spacing / target)`` per axis and the first voxel's centre
    keeps its position, so the new affine is the old one with its columns rescaled. Images come
    out float32 (SimpleITK interpolates in double whatever the input type, so an int16 image
    gives what its float32 conversion would); labels keep their type.

    Args:
        spacing: Target voxel size in mm (the paper: 1.0 mm isotropic).
    """

    def __init__(self, spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)):
        self.spacing = tuple(float(s) for s in spacing)
        if any(s <= 0 for s in self.spacing):
            raise ValueError(f"target spacing must be positive, got {self.spacing}")

    def config(self) -> dict:
        return {"spacing": list(self.spacing)}

    def plan(self, data: dict) -> dict | None:
        """The geometry step this transform records for ``data``, or None when it is a no-op."""
        spacing = spacing_from_affine(np.asarray(data["geometry"]["affine"]))
        target = np.asarray(self.spacing)
        shape = np.asarray(data["image"].shape[:3])
        if np.allclose(spacing, target, rtol=1e-4):
            return None
        new_shape = np.maximum(1, np.round(shape * spacing / target)).astype(int)
        return {
            "op": "resample",
            "shape": shape.tolist(),
            "spacing": spacing.tolist(),
            "new_shape": new_shape.tolist(),
            "new_spacing": target.tolist(),
        }

    @staticmethod
    def with_step(data: dict, step: dict) -> dict:
        """``data`` (already resampled) with ``step`` recorded and its affine rescaled."""
        affine = np.asarray(data["geometry"]["affine"])
        new_affine = affine.copy()
        ratio = np.asarray(step["new_spacing"]) / np.asarray(step["spacing"])
        new_affine[:3, :3] = affine[:3, :3] * ratio[None, :]
        return _with_step(data, step, new_affine)

    def __call__(self, data: dict) -> dict:
        step = self.plan(data)
        if step is None:
            return data
        spacing, target = np.asarray(step["spacing"]), np.asarray(step["new_spacing"])
        new_shape = tuple(step["new_shape"])
        image = data["image"]
        out = dict(data)
        out["image"] = np.empty(new_shape + image.shape[3:], np.float32)
        for c in range(image.shape[3]):
            source = sitk_image(image[..., c], spacing)
            resampled = resample_image(source, (0, 0, 0), new_shape, target, nearest=False)
            copy_into(out["image"][..., c], array_view(resampled))
        if "label" in data:
            out["label"] = resample_label(data["label"], spacing, new_shape, target)
        return self.with_step(out, step)


def foreground_box(
    masks: list[np.ndarray], margin: int, offset=(0, 0, 0), shape=None
) -> tuple[np.ndarray, np.ndarray] | None:
    """The bounding box of the true voxels of any of ``masks``, widened and clipped to a volume.

    The box of a union is the hull of the boxes, so the masks need not be combined (an OR of
    arrays in different memory orders is a slow transposition).

    Args:
        masks: Boolean (X, Y, Z) arrays of one shape: the volume, or a part of it that starts at
            ``offset``.
        margin: Voxels added on each side.
        offset: Where the masks start in the volume.
        shape: The volume's shape (default: the masks' own).

    Returns:
        ``(start, stop)`` int arrays in the volume's coordinates, or None when all are empty.
    """
    first, last = np.full(3, np.iinfo(np.int64).max), np.full(3, -1)
    for mask in masks:
        plane = mask.any(axis=2)
        for axis, hits in enumerate((plane.any(axis=1), plane.any(axis=0), mask.any(axis=(0, 1)))):
            where = np.flatnonzero(hits)
            if where.size:
                first[axis] = min(first[axis], where[0])
                last[axis] = max(last[axis], where[-1])
    if np.any(last < 0):
        return None
    offset = np.asarray(offset)
    shape = np.asarray(masks[0].shape if shape is None else shape)
    start = np.maximum(0, offset + first - margin)
    stop = np.minimum(shape, offset + last + 1 + margin)
    return start, stop


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

    def body(self, image: np.ndarray, label: np.ndarray | None) -> list[np.ndarray]:
        """The voxels this crop keeps the box of: first channel above the threshold, labelled."""
        return [image[..., 0] > self.threshold] + ([] if label is None else [label > 0])

    @staticmethod
    def with_step(data: dict, shape, start, stop) -> dict:
        """``data`` (already cropped) with the crop recorded and its affine moved."""
        affine = np.asarray(data["geometry"]["affine"])
        new_affine = affine.copy()
        new_affine[:3, 3] = affine[:3, 3] + affine[:3, :3] @ np.asarray(start)
        step = {
            "op": "crop",
            "shape": [int(n) for n in shape],
            "start": [int(a) for a in start],
            "stop": [int(b) for b in stop],
        }
        return _with_step(data, step, new_affine)

    def __call__(self, data: dict) -> dict:
        box = foreground_box(self.body(data["image"], data.get("label")), self.margin)
        if box is None:
            logging.warning("%s: no voxel above %g, not cropped", data["case"], self.threshold)
            return data
        shape = data["image"].shape[:3]
        start, stop = box
        if np.all(start == 0) and np.all(stop == shape):
            return data
        region = tuple(slice(a, b) for a, b in zip(start, stop, strict=True))
        out = dict(data)
        out["image"] = copy_array(data["image"][region])
        if "label" in data:
            out["label"] = copy_array(data["label"][region])
        return self.with_step(out, shape, start, stop)


class ResampleAndCrop(Transform):
    """:class:`Resample` then :class:`CropForeground`, resampling only what the crop keeps.

    The output, and the two geometry steps recorded, are those of the two transforms in a row;
    the resampling skips the air the crop would drop. Why that is the same: a resampled voxel
    can be body (image above the threshold, or labelled) only if one of the source voxels it is
    interpolated from (its 2 x 2 x 2 neighbours, or its nearest voxel at the edges) is body, so
    the resampled body lies inside the source body's box mapped to the new grid and widened by
    one source voxel (and one more new voxel against rounding). That region, plus the margin,
    is resampled, the body's box is found in it exactly as :class:`CropForeground` finds it, and
    the box is cut out. The label is resampled on that region only, by indexing
    (:func:`~tf_medseg.transforms.resampling.resample_label`).

    The image is cut along y and z only and keeps its whole x extent: SimpleITK steps its x
    index along each row from the row's first voxel, so a row cut short would round differently.
    Then with a target spacing whose multiples are exact in binary (1.0 mm) every value is bit
    for bit the whole grid's; with others, a shifted origin can move values by float32 rounding.

    Args:
        spacing: Target voxel size in mm.
        threshold: Intensity above which a voxel is body (see :class:`CropForeground`).
        margin: Voxels added on each side of the body's box.
    """

    def __init__(
        self,
        spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
        *,
        threshold: float,
        margin: int = 8,
    ):
        self.resample = Resample(spacing)
        self.crop = CropForeground(threshold, margin)

    def config(self) -> dict:
        return {**self.resample.config(), **self.crop.config()}

    def _region(self, data: dict, step: dict) -> list[tuple[int, int]] | None:
        """Per axis, the part of the new grid that holds every body voxel and its margin."""
        box = foreground_box(self.crop.body(data["image"], data.get("label")), 0)
        if box is None:
            return None
        ratio = np.asarray(step["spacing"]) / np.asarray(step["new_spacing"])
        size = step["new_shape"]
        region = [(0, size[0])]
        for axis in (1, 2):
            first, last = box[0][axis], box[1][axis] - 1
            lo = int(np.floor((first - 1) * ratio[axis])) - 1 - self.crop.margin
            hi = int(np.ceil((last + 1) * ratio[axis])) + 2 + self.crop.margin
            region.append((max(0, lo), min(size[axis], hi)))
        return region

    def __call__(self, data: dict) -> dict:
        step = self.resample.plan(data)
        if step is None:
            return self.crop(data)
        region = self._region(data, step)
        if region is None:  # nothing to crop to: the two steps (the crop warns)
            return self.crop(self.resample(data))
        spacing, target = np.asarray(step["spacing"]), np.asarray(step["new_spacing"])
        new_shape = tuple(step["new_shape"])
        start = tuple(a for a, _ in region)
        size = tuple(b - a for a, b in region)
        part = tuple(slice(a, b) for a, b in region)
        image, label = data["image"], data.get("label")
        # SimpleITK images and their views; a view is valid while its image lives.
        resampled = [
            resample_image(sitk_image(image[..., c], spacing), start, size, target)
            for c in range(image.shape[3])
        ]
        views = [array_view(r) for r in resampled]
        part_label = None
        if label is not None:
            part_label = resample_label(label, spacing, new_shape, target, part)
        body = self.crop.body(views[0][..., None], part_label)
        box = foreground_box(body, self.crop.margin, start, new_shape)
        if box is None:  # the body vanished in the interpolation: as the two steps do
            return self.crop(self.resample(data))
        first, stop = box
        inner = tuple(slice(a - o, b - o) for a, b, o in zip(first, stop, start, strict=True))
        out = dict(data)
        out["image"] = np.empty(tuple(stop - first) + image.shape[3:], np.float32)
        for c, view in enumerate(views):
            copy_into(out["image"][..., c], view[inner])
        if label is not None:
            cut = part_label[inner]
            out["label"] = cut if cut.flags.c_contiguous else copy_array(cut)
        out = Resample.with_step(out, step)
        if np.all(first == 0) and np.all(stop == new_shape):
            return out
        return CropForeground.with_step(out, new_shape, first, stop)


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
            out = resample_label(
                out, np.asarray(step["new_spacing"]), tuple(step["shape"]), step["spacing"]
            )
        elif step["op"] == "orient":
            ornt = np.asarray(step["ornt"])
            # With RAS as the target, the transform to RAS equals the source orientation.
            inverse = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), ornt)
            out = copy_array(nib.orientations.apply_orientation(out, inverse))
        else:
            raise ValueError(f"unknown geometry step {step['op']!r}")
    if list(out.shape) != list(geometry["source_shape"]):
        raise ValueError(f"inverted shape {out.shape} != source shape {geometry['source_shape']}")
    return out
